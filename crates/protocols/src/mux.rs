//! The agent connection's transport: gRPC calls (tonic's generated client and server,
//! unchanged) carried as streams of small frames over one byte stream, the VM's
//! virtio-serial port, in place of HTTP/2.
//!
//! Why not HTTP/2: every block of guest code a template's clone runs after its resume is
//! translated by that clone's QEMU for the first time, and HTTP/2 was the largest piece
//! of the agent's work on a clone's hand-out (`h2` alone about 1,450 of its 3,800
//! blocks: connection settings, HPACK, its frames and flow control, through hyper). Here
//! nothing is negotiated: the agent waits for the first frame, a call is one `HEAD`, the
//! request's `DATA` and `END`, and the answer is one `HEAD`, `DATA` and `END` (its
//! trailers). Multiplexing crates such as yamux carry bytes, not calls with headers and
//! trailers, so gRPC would still need HTTP on top of them; this is the little of HTTP/2
//! the agent API uses, written out.
//!
//! Wire format, integers big-endian. The host opens with [`PREFACE`]; then both sides
//! send frames `length: u32, kind: u8, stream: u32, payload[length]`, with `length` at
//! most [`MAX_FRAME`]:
//! - `HEAD`: the host opens stream `stream` (each new stream's number is above the last)
//!   with the request's header block, `:path` first; the agent answers with the
//!   response's, `:status` first.
//! - `DATA`: body bytes, never none. Each frame costs its bytes plus [`FRAME_COST`] of
//!   two windows: a side has at most [`WINDOW`] of a stream and [`CONNECTION_WINDOW`] of
//!   all streams together in flight beyond what the other side granted back (flow
//!   control: a slow reader holds the writer back).
//! - `END`: the end of this side's body; its payload is the trailers' header block.
//! - `RESET`: the stream is given up (the host dropped the call, or a side failed it).
//!   On stream 0: the agent ended the connection after the host broke the protocol.
//! - `GRANT`: a `u32` of window given back: on a stream, of that stream's and the
//!   connection's; on stream 0 (what ended calls held), of the connection's only.
//!
//! A header block is `count: u16`, then for each header `name_len: u16, name,
//! value_len: u32, value`.
//!
//! Everything read is checked: frame sizes, stream numbers, header names and values, the
//! flow-control windows; a peer that breaks the protocol ends the connection with
//! [`MuxError::Protocol`], never a panic. On the agent's side a new host's preface where
//! a frame was due ends the connection with [`MuxError::Superseded`] (the port did not
//! show the last host leave).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body, Frame as BodyFrame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;
use tonic::Status;

use crate::contract::{AGENT_CONNECTION_WINDOW, AGENT_MAX_FRAME_SIZE, AGENT_STREAM_WINDOW};

/// What the host sends first on a new connection.
pub const PREFACE: &[u8; 8] = b"VMFMUX1\n";

/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = AGENT_MAX_FRAME_SIZE as usize;

/// Body bytes a side may send on one stream beyond what the other has granted back.
pub const WINDOW: u32 = AGENT_STREAM_WINDOW;

/// Body bytes all of a connection's calls together may send in one direction beyond what
/// the other side has granted back.
pub const CONNECTION_WINDOW: u32 = AGENT_CONNECTION_WINDOW;

/// What each `DATA` frame costs of both windows besides its bytes: the receiver's
/// bookkeeping for it, so that a flood of tiny frames is bounded too.
const FRAME_COST: u32 = 256;

/// Payloads below this size are copied out of the read buffer: a slice of it, queued,
/// would keep the whole buffer's allocation.
const COPY_BELOW: usize = 16 << 10;

/// `DATA` bytes queued and not yet taken into the write buffer, all calls together (a
/// side that grants credit but does not read cannot make the other queue without end).
const UNWRITTEN: usize = 4 << 20;

/// Connection credit owed for calls that ended is sent back once this much is owed.
const RETURN_AT: u32 = CONNECTION_WINDOW / 8;

/// Largest `DATA` payload sent; larger body chunks are split.
const DATA_CHUNK: usize = 256 << 10;

/// Streams the agent serves at once; a call beyond them is reset.
const MAX_STREAMS: usize = 1024;

/// Most headers in one header block.
const MAX_HEADERS: usize = 256;

/// Bytes of a frame's header.
const FRAME_HEADER: usize = 9;

/// Room made in the read buffer before each read.
const READ_ROOM: usize = 64 << 10;

/// Frames are taken from the queue into the write buffer up to this many bytes.
const WRITE_HIGH: usize = 1 << 20;

const HEAD: u8 = 1;
const DATA: u8 = 2;
const END: u8 = 3;
const RESET: u8 = 4;
const GRANT: u8 = 5;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// Reading or writing the connection failed.
    #[error("The agent connection failed: {0}")]
    Io(#[from] io::Error),
    /// The other side sent something this protocol does not allow.
    #[error("The other side of the agent connection broke its protocol: {0}")]
    Protocol(&'static str),
    /// (Agent side.) A new connection's preface arrived where the next frame was due: its
    /// host connected before this side saw the last one leave (a port only tells "a host
    /// is there"). Carries what was read from the preface on, for the next connection.
    #[error("A new host connected before the last one was seen to leave")]
    Superseded(Bytes),
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The host: opens streams, reads answers.
    Client,
    /// The agent: answers streams.
    Server,
}

/// A frame waiting to be written.
#[derive(Debug)]
struct Out {
    kind: u8,
    stream: u32,
    payload: Bytes,
}

impl Out {
    fn encode(&self, buffer: &mut BytesMut) {
        buffer.reserve(FRAME_HEADER + self.payload.len());
        // Payloads are built no larger than MAX_FRAME, which fits a u32.
        buffer.put_u32(self.payload.len() as u32);
        buffer.put_u8(self.kind);
        buffer.put_u32(self.stream);
        buffer.put_slice(&self.payload);
    }
}

/// What the reader hands a stream's receiving end.
#[derive(Debug)]
enum Event {
    /// The answer's status and headers (host side).
    Head(Box<(StatusCode, HeaderMap)>),
    Data(Bytes),
    /// The end of the body, with its trailers.
    End(Box<HeaderMap>),
    Reset,
}

/// One open stream, as the connection's reader sees it.
#[derive(Debug)]
struct Slot {
    /// The receiving end's queue; `None` once the other side's body ended.
    incoming: Option<mpsc::UnboundedSender<Event>>,
    /// Window received (bytes and [`FRAME_COST`]s) and not yet given back.
    received: Arc<AtomicU32>,
    /// Body bytes this side may still send.
    credit: Arc<Semaphore>,
    /// The task sending this side's body (the host's request, the agent's answer).
    task: Option<AbortHandle>,
    /// The answer's head arrived (host side; a second one is refused).
    head: bool,
}

impl Slot {
    fn close(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        self.credit.close();
        if let Some(incoming) = self.incoming {
            let _ = incoming.send(Event::Reset);
        }
    }
}

#[derive(Debug, Default)]
struct Streams {
    map: HashMap<u32, Slot>,
    /// The connection ended: no new stream.
    closed: bool,
    /// The last stream number used.
    last: u32,
    /// The driver, while it drains (ends once no stream is left), to be woken then.
    draining: Option<std::task::Waker>,
}

/// What a connection's reader, writer and streams share.
#[derive(Debug)]
struct Shared {
    out: mpsc::UnboundedSender<Out>,
    streams: Mutex<Streams>,
    /// Connection window this side may still send.
    conn_credit: Semaphore,
    /// Connection window received and not yet given back.
    conn_received: AtomicU32,
    /// Connection window owed back for calls that ended, sent at [`RETURN_AT`].
    conn_owed: AtomicU32,
    /// Room for `DATA` queued and not yet in the write buffer.
    unwritten: Semaphore,
    /// How the connection ended, for the calls it ends.
    ended: Mutex<Option<String>>,
}

impl Shared {
    fn new(out: mpsc::UnboundedSender<Out>) -> Arc<Self> {
        Arc::new(Self {
            out,
            streams: Mutex::new(Streams::default()),
            conn_credit: Semaphore::new(CONNECTION_WINDOW as usize),
            conn_received: AtomicU32::new(0),
            conn_owed: AtomicU32::new(0),
            unwritten: Semaphore::new(UNWRITTEN),
            ended: Mutex::new(None),
        })
    }

    /// Gives `amount` of window back on stream `stream`, and on the connection.
    fn grant(&self, stream: u32, amount: u32) {
        if amount == 0 {
            return;
        }
        self.conn_received.fetch_sub(amount, Ordering::AcqRel);
        self.send(GRANT, stream, Bytes::copy_from_slice(&amount.to_be_bytes()));
    }

    /// Gives `amount` of connection window back (what a call that ended still held),
    /// [`RETURN_AT`] at a time.
    fn give_back(&self, amount: u32) {
        if amount == 0 {
            return;
        }
        let owed = self.conn_owed.fetch_add(amount, Ordering::AcqRel) + amount;
        if owed >= RETURN_AT {
            let owed = self.conn_owed.swap(0, Ordering::AcqRel);
            self.grant(0, owed);
        }
    }

    /// Records how the connection ended.
    fn set_ended(&self, result: &Result<(), MuxError>) {
        let reason = match result {
            Ok(()) => "the other side closed it".to_string(),
            Err(err) => err.to_string(),
        };
        if let Ok(mut ended) = self.ended.lock() {
            ended.get_or_insert(reason);
        }
    }

    /// The status of a call the connection's end ended.
    fn lost(&self) -> Status {
        let reason = self.ended.lock().ok().and_then(|ended| ended.clone());
        match reason {
            Some(reason) => Status::unavailable(format!("The agent connection was lost: {reason}")),
            None => Status::unavailable("The agent connection was lost"),
        }
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        // A panic while holding this lock cannot leave the map inconsistent in a way that
        // matters more than losing the connection would.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, kind: u8, stream: u32, payload: Bytes) {
        // Fails only once the connection's writer is gone; its streams end with it.
        let _ = self.out.send(Out {
            kind,
            stream,
            payload,
        });
    }

    /// Forgets stream `stream`, stopping its sending task.
    fn remove(&self, stream: u32) {
        let (slot, drained) = {
            let mut streams = self.streams();
            let slot = streams.map.remove(&stream);
            // A draining driver ends once no stream is left.
            let drained = if streams.map.is_empty() {
                streams.draining.take()
            } else {
                None
            };
            (slot, drained)
        };
        if let Some(slot) = slot {
            slot.close();
        }
        if let Some(driver) = drained {
            driver.wake();
        }
    }

    /// Gives up stream `stream`: tells the other side and forgets it.
    fn reset(&self, stream: u32) {
        self.send(RESET, stream, Bytes::new());
        self.remove(stream);
    }

    fn set_task(&self, stream: u32, task: AbortHandle) {
        match self.streams().map.get_mut(&stream) {
            Some(slot) => slot.task = Some(task),
            // Already over.
            None => task.abort(),
        }
    }

    /// The connection ended: every stream ends with it, and no new one starts.
    fn close_all(&self) {
        self.conn_credit.close();
        self.unwritten.close();
        let slots: Vec<Slot> = {
            let mut streams = self.streams();
            streams.closed = true;
            streams.map.drain().map(|(_, slot)| slot).collect()
        };
        for mut slot in slots {
            // The receiving ends see their queue closed: the connection was lost.
            slot.incoming = None;
            slot.close();
        }
    }
}

/// Closes every stream of a connection when its driver ends, however it ends.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

fn new_slot() -> (Slot, mpsc::UnboundedReceiver<Event>) {
    let (incoming, rx) = mpsc::unbounded_channel();
    let slot = Slot {
        incoming: Some(incoming),
        received: Arc::new(AtomicU32::new(0)),
        credit: Arc::new(Semaphore::new(WINDOW as usize)),
        task: None,
        head: false,
    };
    (slot, rx)
}

/// A stream's received body: the agent's request bodies and the host's answers.
pub struct RecvBody {
    rx: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    stream: u32,
    received: Arc<AtomicU32>,
    /// Bytes handed on and not yet granted back.
    consumed: u32,
    ended: bool,
    /// On the host's side (an answer), its connection, kept while the answer is read;
    /// dropping such a body before its end gives the call up (the agent stops sending).
    connection: Option<Arc<Connection>>,
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBody")
            .field("stream", &self.stream)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl RecvBody {
    fn new(
        rx: mpsc::UnboundedReceiver<Event>,
        shared: Arc<Shared>,
        stream: u32,
        received: Arc<AtomicU32>,
        connection: Option<Arc<Connection>>,
    ) -> Self {
        Self {
            rx,
            shared,
            stream,
            received,
            consumed: 0,
            ended: false,
            connection,
        }
    }

    /// Grants back what was handed on: a quarter window at a time, or all of it when the
    /// reader has caught up (so a call read as it comes never holds window back).
    fn consumed(&mut self, cost: u32, caught_up: bool) {
        self.consumed += cost;
        if self.consumed >= WINDOW / 4 || caught_up {
            self.received.fetch_sub(self.consumed, Ordering::AcqRel);
            self.shared.grant(self.stream, self.consumed);
            self.consumed = 0;
        }
    }

    /// The body is over: the window it still holds (read or queued) goes back to the
    /// connection, and what still arrives for it is given back as it comes.
    fn finish(&mut self) {
        self.ended = true;
        self.consumed = 0;
        let rest = {
            // Under the lock the reader holds while it queues data: nothing queued is
            // counted twice or lost.
            let _streams = self.shared.streams();
            self.rx.close();
            self.received.swap(0, Ordering::AcqRel)
        };
        self.shared.give_back(rest);
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let event = ready!(this.rx.poll_recv(cx));
        let frame = match event {
            Some(Event::Data(data)) => {
                // A DATA payload is at most MAX_FRAME, so this fits.
                let cost = data.len() as u32 + FRAME_COST;
                let caught_up = this.rx.is_empty();
                this.consumed(cost, caught_up);
                return Poll::Ready(Some(Ok(BodyFrame::data(data))));
            }
            Some(Event::End(trailers)) if trailers.is_empty() => None,
            Some(Event::End(trailers)) => Some(Ok(BodyFrame::trailers(*trailers))),
            Some(Event::Reset) => Some(Err(Status::cancelled(
                "The other side of the agent connection gave up the call",
            ))),
            // The reader only hands a stream one head, before its body.
            Some(Event::Head(..)) => Some(Err(Status::internal("A second answer head"))),
            None => Some(Err(this.shared.lost())),
        };
        this.finish();
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if !self.ended {
            if self.connection.is_some() {
                self.shared.reset(self.stream);
            }
            self.finish();
        }
    }
}

/// Encodes a header block: the pseudo-header `pseudo` first, then `headers`.
fn encode_block(pseudo: (&str, &str), headers: &HeaderMap) -> Option<Bytes> {
    let count = headers.len() + 1;
    if count > MAX_HEADERS {
        return None;
    }
    let mut block = BytesMut::new();
    block.put_u16(count as u16);
    let pseudo = std::iter::once((pseudo.0.as_bytes(), pseudo.1.as_bytes()));
    let rest = headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    for (name, value) in pseudo.chain(rest) {
        let name_len = u16::try_from(name.len()).ok()?;
        block.put_u16(name_len);
        block.put_slice(name);
        block.put_u32(u32::try_from(value.len()).ok()?);
        block.put_slice(value);
        if block.len() > MAX_FRAME {
            return None;
        }
    }
    Some(block.freeze())
}

/// Decodes a header block whose first entry is the pseudo-header `pseudo`.
fn decode_block(mut block: Bytes, pseudo: &str) -> Result<(String, HeaderMap), MuxError> {
    const BAD: MuxError = MuxError::Protocol("a malformed header block");
    if block.remaining() < 2 {
        return Err(BAD);
    }
    let count = usize::from(block.get_u16());
    if count == 0 || count > MAX_HEADERS {
        return Err(BAD);
    }
    let mut first = None;
    let mut headers = HeaderMap::with_capacity(count - 1);
    for _ in 0..count {
        if block.remaining() < 2 {
            return Err(BAD);
        }
        let name_len = usize::from(block.get_u16());
        if block.remaining() < name_len + 4 {
            return Err(BAD);
        }
        let name = block.split_to(name_len);
        let value_len = block.get_u32() as usize;
        if block.remaining() < value_len {
            return Err(BAD);
        }
        let value = block.split_to(value_len);
        if first.is_none() {
            if name != pseudo.as_bytes() {
                return Err(BAD);
            }
            first = Some(String::from_utf8(value.to_vec()).map_err(|_| BAD)?);
            continue;
        }
        let name = HeaderName::from_bytes(&name).map_err(|_| BAD)?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| BAD)?;
        headers.append(name, value);
    }
    if block.has_remaining() {
        return Err(BAD);
    }
    Ok((first.unwrap_or_default(), headers))
}

/// Gives a stream up if its sending task ends without its `END` (a panic, an abort
/// while the stream is still open): the other side must not wait for it for ever.
struct SendGuard {
    shared: Arc<Shared>,
    stream: u32,
    done: bool,
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        if !self.done && self.shared.streams().map.contains_key(&self.stream) {
            self.shared.reset(self.stream);
        }
    }
}

/// Sends `body` on stream `stream` as `DATA` frames within the stream's and the
/// connection's credit, then its `END`; gives the stream up if the body fails.
async fn send_body<B>(shared: Arc<Shared>, stream: u32, credit: Arc<Semaphore>, body: B)
where
    B: Body<Data = Bytes>,
{
    let mut guard = SendGuard {
        shared: shared.clone(),
        stream,
        done: false,
    };
    let mut body = std::pin::pin!(body);
    loop {
        // A body's error is not sent on: the stream is given up.
        let frame = std::future::poll_fn(|cx| {
            body.as_mut()
                .poll_frame(cx)
                .map(|frame| frame.map(Result::ok))
        })
        .await;
        let frame = match frame {
            None => {
                shared.send(END, stream, empty_block());
                guard.done = true;
                return;
            }
            Some(Some(frame)) => frame,
            Some(None) => return,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    let piece = data.len().min(DATA_CHUNK);
                    let cost = piece as u32 + FRAME_COST;
                    // Each only fails once the stream or the connection is over.
                    if !take(&credit, cost).await
                        || !take(&shared.conn_credit, cost).await
                        || !take(&shared.unwritten, piece as u32).await
                    {
                        return;
                    }
                    shared.send(DATA, stream, data.split_to(piece));
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if let Some(block) = encode_block(("", ""), &trailers) {
                        shared.send(END, stream, block);
                        guard.done = true;
                    }
                    return;
                }
            }
        }
    }
}

/// Takes `amount` of `credit` for good (it comes back as new permits); false once the
/// credit is closed.
async fn take(credit: &Semaphore, amount: u32) -> bool {
    match credit.acquire_many(amount).await {
        Ok(permit) => {
            permit.forget();
            true
        }
        Err(_) => false,
    }
}

fn empty_block() -> Bytes {
    encode_block(("", ""), &HeaderMap::new()).unwrap_or_default()
}

/// Starts answering a request: the server's callback for each new stream.
type OnRequest<'a> =
    Box<dyn FnMut(u32, Arc<Semaphore>, http::Request<RecvBody>) -> AbortHandle + Send + 'a>;

/// Runs one connection's reading and writing in one task (the agent's port wakes one
/// task only), until the other side leaves.
struct Driver<'a, T> {
    io: T,
    role: Role,
    shared: Arc<Shared>,
    out: mpsc::UnboundedReceiver<Out>,
    read: BytesMut,
    write: BytesMut,
    /// Once ready, the server takes no new call and ends when its calls are answered.
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    draining: bool,
    /// The server still waits for [`PREFACE`].
    preface: bool,
    on_request: Option<OnRequest<'a>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<'_, T> {
    async fn run(&mut self) -> Result<(), MuxError> {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), MuxError>> {
        loop {
            let mut progress = false;
            while self.write.len() < WRITE_HIGH {
                match self.out.poll_recv(cx) {
                    Poll::Ready(Some(out)) => {
                        out.encode(&mut self.write);
                        if out.kind == DATA {
                            self.shared.unwritten.add_permits(out.payload.len());
                        }
                    }
                    _ => break,
                }
            }
            if !self.write.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.write) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.write.advance(n);
                        progress = true;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                    Poll::Pending => {}
                }
            }
            self.read.reserve(READ_ROOM);
            let spare = self.read.spare_capacity_mut();
            let start = spare.as_ptr().cast::<u8>();
            let mut buffer = ReadBuf::uninit(spare);
            match Pin::new(&mut self.io).poll_read(cx, &mut buffer) {
                Poll::Ready(Ok(())) => {
                    let n = buffer.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    // A reader that swapped the buffer for another (no sound one does)
                    // filled nothing of ours.
                    if buffer.filled().as_ptr() != start {
                        return Poll::Ready(Err(io::Error::other(
                            "the reader replaced its buffer",
                        )
                        .into()));
                    }
                    // SAFETY: the read initialised the first n bytes of the spare capacity.
                    unsafe { self.read.set_len(self.read.len() + n) };
                    self.parse()?;
                    progress = true;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                Poll::Pending => {}
            }
            if !progress {
                return if self.drained(cx) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
        }
    }

    fn parse(&mut self) -> Result<(), MuxError> {
        if self.preface {
            let have = self.read.len().min(PREFACE.len());
            if self.read[..have] != PREFACE[..have] {
                return Err(MuxError::Protocol("not a vmfactory agent connection"));
            }
            if have < PREFACE.len() {
                return Ok(());
            }
            self.read.advance(PREFACE.len());
            self.preface = false;
        }
        while self.read.len() >= FRAME_HEADER {
            if self.role == Role::Server && self.read.starts_with(PREFACE) {
                return Err(MuxError::Superseded(self.read.split().freeze()));
            }
            let length =
                u32::from_be_bytes([self.read[0], self.read[1], self.read[2], self.read[3]])
                    as usize;
            if length > MAX_FRAME {
                return Err(MuxError::Protocol("a frame larger than allowed"));
            }
            if self.read.len() < FRAME_HEADER + length {
                return Ok(());
            }
            let kind = self.read[4];
            let stream =
                u32::from_be_bytes([self.read[5], self.read[6], self.read[7], self.read[8]]);
            self.read.advance(FRAME_HEADER);
            let payload = if length < COPY_BELOW {
                let payload = Bytes::copy_from_slice(&self.read[..length]);
                self.read.advance(length);
                payload
            } else {
                self.read.split_to(length).freeze()
            };
            self.dispatch(kind, stream, payload)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, kind: u8, stream: u32, payload: Bytes) -> Result<(), MuxError> {
        match (kind, self.role) {
            (HEAD, Role::Server) => self.open(stream, payload),
            (HEAD, Role::Client) => {
                let (status, headers) = decode_block(payload, ":status")?;
                let status = status
                    .parse::<u16>()
                    .ok()
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or(MuxError::Protocol("an answer without a valid status"))?;
                let mut streams = self.shared.streams();
                if let Some(slot) = streams.map.get_mut(&stream) {
                    if std::mem::replace(&mut slot.head, true) {
                        return Err(MuxError::Protocol("a second answer head"));
                    }
                    if let Some(incoming) = &slot.incoming {
                        let _ = incoming.send(Event::Head(Box::new((status, headers))));
                    }
                }
                Ok(())
            }
            (DATA, _) => self.data(stream, payload),
            (END, _) => {
                let (_, trailers) = decode_block(payload, "")?;
                let incoming = {
                    let mut streams = self.shared.streams();
                    streams
                        .map
                        .get_mut(&stream)
                        .and_then(|slot| slot.incoming.take())
                };
                if let Some(incoming) = incoming {
                    let _ = incoming.send(Event::End(Box::new(trailers)));
                }
                if self.role == Role::Client {
                    // The answer is complete: the call is over, and what is left of its
                    // request is not wanted.
                    self.shared.remove(stream);
                }
                Ok(())
            }
            // Stream 0: the other side ended the connection after an error of its own.
            (RESET, _) if stream == 0 => Err(MuxError::Protocol(
                "the other side ended the connection after an error",
            )),
            (RESET, _) => {
                self.shared.remove(stream);
                Ok(())
            }
            (GRANT, _) => {
                let bytes: [u8; 4] = payload[..]
                    .try_into()
                    .map_err(|_| MuxError::Protocol("a malformed window frame"))?;
                let bytes = u32::from_be_bytes(bytes) as usize;
                const BEYOND: MuxError = MuxError::Protocol("a window grant beyond the window");
                // Stream 0 gives back connection window only; a stream's grant gives
                // back both (the stream's, if it is still open).
                if stream != 0 {
                    let streams = self.shared.streams();
                    if let Some(slot) = streams.map.get(&stream) {
                        if slot.credit.available_permits() + bytes > WINDOW as usize {
                            return Err(BEYOND);
                        }
                        slot.credit.add_permits(bytes);
                    }
                }
                let credit = &self.shared.conn_credit;
                if credit.available_permits() + bytes > CONNECTION_WINDOW as usize {
                    return Err(BEYOND);
                }
                credit.add_permits(bytes);
                Ok(())
            }
            _ => Err(MuxError::Protocol("an unknown frame kind")),
        }
    }

    /// Whether the driver was told to shut down and has nothing left to do: no call
    /// under way and nothing to write (else it is woken when the last call ends).
    fn drained(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(shutdown) = self.shutdown.as_mut() {
            if shutdown.as_mut().poll(cx).is_ready() {
                self.shutdown = None;
                self.draining = true;
            }
        }
        if !self.draining || !self.write.is_empty() {
            return false;
        }
        let mut streams = self.shared.streams();
        if streams.map.is_empty() {
            return true;
        }
        streams.draining = Some(cx.waker().clone());
        false
    }

    /// A new stream on the server: the request's head.
    fn open(&mut self, stream: u32, payload: Bytes) -> Result<(), MuxError> {
        let (path, headers) = decode_block(payload, ":path")?;
        let uri = http::Uri::try_from(path).map_err(|_| MuxError::Protocol("a malformed path"))?;
        let (slot, rx) = new_slot();
        let received = slot.received.clone();
        let credit = slot.credit.clone();
        {
            let mut streams = self.shared.streams();
            if stream <= streams.last {
                return Err(MuxError::Protocol("a stream number used before"));
            }
            streams.last = stream;
            if streams.map.len() >= MAX_STREAMS || self.draining {
                drop(streams);
                self.shared.send(RESET, stream, Bytes::new());
                return Ok(());
            }
            streams.map.insert(stream, slot);
        }
        let body = RecvBody::new(rx, self.shared.clone(), stream, received, None);
        let mut request = http::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = headers;
        if let Some(on_request) = self.on_request.as_mut() {
            let task = on_request(stream, credit, request);
            self.shared.set_task(stream, task);
        }
        Ok(())
    }

    fn data(&mut self, stream: u32, payload: Bytes) -> Result<(), MuxError> {
        if payload.is_empty() {
            return Err(MuxError::Protocol("an empty data frame"));
        }
        // A DATA payload is at most MAX_FRAME, so this fits.
        let cost = payload.len() as u32 + FRAME_COST;
        let conn_received = self.shared.conn_received.load(Ordering::Acquire);
        if conn_received.saturating_add(cost) > CONNECTION_WINDOW {
            return Err(MuxError::Protocol(
                "more data than the connection window allows",
            ));
        }
        self.shared.conn_received.fetch_add(cost, Ordering::AcqRel);
        let streams = self.shared.streams();
        let Some(slot) = streams.map.get(&stream) else {
            // Data of a stream already over is dropped, and its window given back.
            drop(streams);
            self.shared.give_back(cost);
            return Ok(());
        };
        let Some(incoming) = &slot.incoming else {
            return Err(MuxError::Protocol("data after the end of a body"));
        };
        let received = slot.received.load(Ordering::Acquire);
        if received.saturating_add(cost) > WINDOW {
            return Err(MuxError::Protocol("more data than the window allows"));
        }
        if incoming.send(Event::Data(payload)).is_ok() {
            slot.received.fetch_add(cost, Ordering::AcqRel);
        } else {
            // Nobody reads this body any more (the agent's handler dropped it): it is
            // dropped, and granted back so the sender is not held up.
            drop(streams);
            self.shared.grant(stream, cost);
        }
        Ok(())
    }
}

/// Serves `service` on the connection `io` (the agent's side) until the host leaves:
/// `Ok` when it closed the connection, an error when reading or writing failed or it
/// broke the protocol. Each call is answered in a task of its own; they all end with the
/// connection. Once `shutdown` is ready (`std::future::pending()`: never), new calls are
/// refused (reset), and once the calls under way are answered and written, `Ok`.
pub async fn serve<T, S, B>(
    io: T,
    service: S,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MuxError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: tower_service::Service<http::Request<RecvBody>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    B: Body<Data = Bytes> + Send + 'static,
{
    let (out, out_rx) = mpsc::unbounded_channel();
    let shared = Shared::new(out);
    let _close = CloseOnDrop(shared.clone());
    let answering = shared.clone();
    let on_request: OnRequest<'_> = Box::new(move |stream, credit, request| {
        let shared = answering.clone();
        let mut service = service.clone();
        tokio::spawn(async move {
            let answer = async {
                std::future::poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .ok()?;
                service.call(request).await.ok()
            };
            let Some(response) = answer.await else {
                shared.reset(stream);
                return;
            };
            let (parts, body) = response.into_parts();
            match encode_block((":status", parts.status.as_str()), &parts.headers) {
                Some(block) => shared.send(HEAD, stream, block),
                None => {
                    shared.reset(stream);
                    return;
                }
            }
            send_body(shared.clone(), stream, credit, body).await;
            shared.remove(stream);
        })
        .abort_handle()
    });
    let mut driver = Driver {
        io,
        role: Role::Server,
        shared,
        out: out_rx,
        read: BytesMut::new(),
        write: BytesMut::new(),
        preface: true,
        on_request: Some(on_request),
        shutdown: Some(Box::pin(shutdown)),
        draining: false,
    };
    let result = driver.run().await;
    if let (Err(MuxError::Protocol(_)), false) = (&result, driver.preface) {
        // Tells the host, which cannot otherwise know (an agent cannot close its end of
        // the port), so that it ends the connection and makes a new one. Only a host
        // that spoke this protocol is told: one that did not would not understand, and
        // may already be gone, with a new host in its place that would take it for its
        // own connection's end.
        let mut goaway = BytesMut::new();
        Out {
            kind: RESET,
            stream: 0,
            payload: Bytes::new(),
        }
        .encode(&mut goaway);
        let write = tokio::io::AsyncWriteExt::write_all(&mut driver.io, &goaway);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
    }
    result
}

/// A byte stream a [`Channel`] connects over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Makes a new connection for a [`Channel`].
pub type Connector =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>> + Send + Sync>;

/// The host's side: a gRPC transport for tonic's generated client. Cloning shares the
/// connection. It connects on the first call (or at once with [`Channel::connect`]); a
/// call after the connection was lost makes a new one.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
}

struct ChannelInner {
    connector: Connector,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

/// A live connection: its shared state and the task driving it, stopped (closing the
/// connection) when neither a clone of its channel nor an answer being read holds it.
struct Connection {
    shared: Arc<Shared>,
    driver: AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

impl Channel {
    /// A channel that connects with `connector` on its first call.
    pub fn lazy(connector: Connector) -> Self {
        Self {
            inner: Arc::new(ChannelInner {
                connector,
                connection: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// A channel connected now.
    pub async fn connect(connector: Connector) -> io::Result<Self> {
        let channel = Self::lazy(connector);
        channel.connection().await?;
        Ok(channel)
    }

    /// The live connection, made if there is none.
    async fn connection(&self) -> io::Result<Arc<Connection>> {
        let mut connection = self.inner.connection.lock().await;
        if let Some(live) = connection.as_ref() {
            if !live.shared.streams().closed {
                return Ok(live.clone());
            }
        }
        let io = (self.inner.connector)().await?;
        let (out, out_rx) = mpsc::unbounded_channel();
        let shared = Shared::new(out);
        let mut write = BytesMut::new();
        write.put_slice(PREFACE);
        let mut driver = Driver {
            io,
            role: Role::Client,
            shared: shared.clone(),
            out: out_rx,
            read: BytesMut::new(),
            write,
            preface: false,
            on_request: None,
            shutdown: None,
            draining: false,
        };
        let close = CloseOnDrop(shared.clone());
        let driver = tokio::spawn(async move {
            let _close = close;
            // How the connection ended reaches each call it ended (`Unavailable`).
            let result = driver.run().await;
            driver.shared.set_ended(&result);
        })
        .abort_handle();
        let live = Arc::new(Connection { shared, driver });
        *connection = Some(live.clone());
        Ok(live)
    }
}

/// Gives a started call up when it is dropped before its answer's head.
struct CallGuard {
    shared: Arc<Shared>,
    stream: u32,
    armed: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.reset(self.stream);
        }
    }
}

async fn call<B>(
    connection: Arc<Connection>,
    request: http::Request<B>,
) -> Result<http::Response<RecvBody>, Status>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let shared = connection.shared.clone();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let head = encode_block((":path", path), &parts.headers)
        .ok_or_else(|| Status::internal("The call's headers are too large"))?;
    let (slot, mut rx) = new_slot();
    let received = slot.received.clone();
    let credit = slot.credit.clone();
    let stream = {
        let mut streams = shared.streams();
        if streams.closed {
            drop(streams);
            return Err(shared.lost());
        }
        let Some(stream) = streams.last.checked_add(1) else {
            // The next call makes a new connection.
            streams.closed = true;
            return Err(Status::unavailable(
                "The agent connection ran out of call numbers",
            ));
        };
        streams.last = stream;
        streams.map.insert(stream, slot);
        // Queued under the lock: streams reach the agent in the order of their numbers.
        shared.send(HEAD, stream, head);
        stream
    };
    let mut guard = CallGuard {
        shared: shared.clone(),
        stream,
        armed: true,
    };
    let task = tokio::spawn(send_body(shared.clone(), stream, credit, body));
    shared.set_task(stream, task.abort_handle());
    let (status, headers) = match rx.recv().await {
        Some(Event::Head(head)) => *head,
        Some(Event::Reset) => {
            return Err(Status::cancelled(
                "The guest agent gave up the call (too many at once?)",
            ))
        }
        None => return Err(shared.lost()),
        Some(_) => return Err(Status::internal("The guest agent answered without a head")),
    };
    guard.armed = false;
    let body = RecvBody::new(rx, shared, stream, received, Some(connection));
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = http::Version::HTTP_2;
    *response.headers_mut() = headers;
    Ok(response)
}

impl<B> tower_service::Service<http::Request<B>> for Channel
where
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<RecvBody>;
    type Error = Status;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<RecvBody>, Status>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            let connection = channel.connection().await.map_err(|err| {
                Status::unavailable(format!("Cannot connect to the guest agent: {err}"))
            })?;
            call(connection, request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tower_service::Service;

    use super::*;

    /// What the test service's answers report back.
    #[derive(Default)]
    struct Seen {
        /// Bytes the flood answer produced so far.
        produced: AtomicUsize,
        /// The endless answer was dropped.
        dropped: AtomicBool,
    }

    /// The test service's answer bodies.
    enum Answer {
        /// The request's bytes, then trailers.
        Echo(Option<Bytes>),
        /// `left` bytes in 64 KiB chunks.
        Flood { left: usize, seen: Arc<Seen> },
        /// Never ends; holds the request's body unread.
        Endless(Arc<Seen>, #[allow(dead_code)] Option<RecvBody>),
    }

    impl Body for Answer {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
            match self.get_mut() {
                Answer::Echo(data) => Poll::Ready(Some(Ok(match data.take() {
                    Some(data) => BodyFrame::data(data),
                    None => {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        trailers.insert("x-echo", HeaderValue::from_static("done"));
                        return Poll::Ready(Some(Ok(BodyFrame::trailers(trailers))));
                    }
                }))),
                Answer::Flood { left, seen } => {
                    if *left == 0 {
                        return Poll::Ready(None);
                    }
                    let n = (*left).min(64 << 10);
                    *left -= n;
                    seen.produced.fetch_add(n, Ordering::SeqCst);
                    Poll::Ready(Some(Ok(BodyFrame::data(Bytes::from(vec![7; n])))))
                }
                Answer::Endless(..) => Poll::Pending,
            }
        }
    }

    impl Drop for Answer {
        fn drop(&mut self) {
            if let Answer::Endless(seen, _) = self {
                seen.dropped.store(true, Ordering::SeqCst);
            }
        }
    }

    fn service(
        seen: Arc<Seen>,
    ) -> impl tower_service::Service<
        http::Request<RecvBody>,
        Response = http::Response<Answer>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(move |request: http::Request<RecvBody>| {
            let seen = seen.clone();
            async move {
                let path = request.uri().path().to_string();
                let answer = match path.as_str() {
                    "/echo" => {
                        let body = request.into_body().collect().await;
                        Answer::Echo(Some(body.map(|b| b.to_bytes()).unwrap_or_default()))
                    }
                    "/flood" => Answer::Flood {
                        left: 64 << 20,
                        seen,
                    },
                    "/hold" => Answer::Endless(seen, Some(request.into_body())),
                    _ => Answer::Endless(seen, None),
                };
                let mut response = http::Response::new(answer);
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(response)
            }
        })
    }

    /// A channel whose every connection is served by `service` in a task; counts them.
    fn channel(
        seen: Arc<Seen>,
        connections: Arc<AtomicUsize>,
    ) -> (Channel, Arc<Mutex<Vec<AbortHandle>>>) {
        let servers = Arc::new(Mutex::new(Vec::new()));
        let tasks = servers.clone();
        let connector: Connector = Arc::new(move || {
            let (host, agent) = tokio::io::duplex(256 << 10);
            connections.fetch_add(1, Ordering::SeqCst);
            let task = tokio::spawn(serve(agent, service(seen.clone()), std::future::pending()));
            tasks
                .lock()
                .expect("the server list")
                .push(task.abort_handle());
            Box::pin(async move { Ok(Box::new(host) as Box<dyn Io>) })
        });
        (Channel::lazy(connector), servers)
    }

    fn request(path: &str, body: Bytes) -> http::Request<Full<Bytes>> {
        let mut request = http::Request::new(Full::new(body));
        *request.uri_mut() = path.parse().expect("a test path");
        request
            .headers_mut()
            .insert("te", HeaderValue::from_static("trailers"));
        request
    }

    #[tokio::test]
    async fn a_call_carries_its_body_headers_and_trailers_both_ways() {
        let seen = Arc::new(Seen::default());
        let connections = Arc::new(AtomicUsize::new(0));
        let (mut channel, _servers) = channel(seen, connections.clone());
        // Above a quarter window, in several DATA frames: grants flow back.
        let sent: Bytes = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // More than the connection window in all: what each call held comes back.
        for _ in 0..8 {
            let response = channel
                .call(request("/echo", sent.clone()))
                .await
                .expect("an answer");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["content-type"], "application/grpc");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("the answer's body");
            let trailers = body.trailers().cloned().expect("trailers");
            assert_eq!(trailers["x-echo"], "done");
            assert_eq!(body.to_bytes(), sent);
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_sender_back_and_then_gets_everything() {
        let seen = Arc::new(Seen::default());
        let (mut channel, _servers) = channel(seen.clone(), Arc::new(AtomicUsize::new(0)));
        let mut body = channel
            .call(request("/flood", Bytes::new()))
            .await
            .expect("an answer")
            .into_body();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let produced = seen.produced.load(Ordering::SeqCst);
        // The window, plus what the answer's task holds while it waits for credit.
        assert!(produced <= WINDOW as usize + (128 << 10), "{produced}");
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame
                .expect("a frame")
                .into_data()
                .map_or(0, |data| data.len());
        }
        assert_eq!(total, 64 << 20);
    }

    #[tokio::test]
    async fn dropping_an_answer_stops_it_in_the_agent() {
        let seen = Arc::new(Seen::default());
        let (mut channel, _servers) = channel(seen.clone(), Arc::new(AtomicUsize::new(0)));
        let response = channel
            .call(request("/endless", Bytes::new()))
            .await
            .expect("an answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!seen.dropped.load(Ordering::SeqCst));
        drop(response);
        for _ in 0..100 {
            if seen.dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the agent kept answering a dropped call");
    }

    #[tokio::test]
    async fn a_lost_connection_fails_its_calls_and_the_next_call_reconnects() {
        let seen = Arc::new(Seen::default());
        let connections = Arc::new(AtomicUsize::new(0));
        let (mut channel, servers) = channel(seen, connections.clone());
        let mut body = channel
            .call(request("/endless", Bytes::new()))
            .await
            .expect("an answer")
            .into_body();
        for server in servers.lock().expect("the server list").drain(..) {
            server.abort();
        }
        let status = body
            .frame()
            .await
            .expect("an end, not silence")
            .expect_err("the connection was lost");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        let response = channel
            .call(request("/echo", Bytes::from_static(b"hi")))
            .await
            .expect("an answer");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the answer's body")
            .to_bytes();
        assert_eq!(&body[..], b"hi");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    /// Serves one raw connection, the host sending `input` and then sending nothing more;
    /// returns how it ended and what the server wrote.
    async fn serve_raw(input: &[u8]) -> (Result<(), MuxError>, Vec<u8>) {
        let (mut host, agent): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve(
            agent,
            service(Arc::new(Seen::default())),
            std::future::pending(),
        ));
        // The server may end (and close) before it read everything.
        let _ = host.write_all(input).await;
        let _ = host.shutdown().await;
        let reader = tokio::spawn(async move {
            let mut written = Vec::new();
            let _ = host.read_to_end(&mut written).await;
            written
        });
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not end")
            .expect("the server task");
        let written = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the server did not close")
            .expect("the reader task");
        (result, written)
    }

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Out {
            kind,
            stream,
            payload: Bytes::copy_from_slice(payload),
        }
        .encode(&mut out);
        out.to_vec()
    }

    fn head(path: &str) -> Bytes {
        encode_block((":path", path), &HeaderMap::new()).expect("a small block")
    }

    #[tokio::test]
    async fn a_peer_breaking_the_protocol_ends_the_connection_with_an_error() {
        let mut case = 0;
        let goaway = frame(RESET, 0, b"");
        let mut protocol = |(result, written): (Result<(), MuxError>, Vec<u8>)| {
            case += 1;
            // The host is told: the connection's last frame ends it.
            assert!(written.ends_with(&goaway), "case {case}: {written:?}");
            match result {
                Err(MuxError::Protocol(what)) => what,
                other => panic!("case {case}: {other:?}"),
            }
        };
        // Not this protocol at all: an error, and nothing written (a host that did not
        // speak it would not understand, and may be gone already).
        let (result, written) = serve_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert!(
            matches!(result, Err(MuxError::Protocol(what)) if what.contains("not a vmfactory")),
            "{result:?}"
        );
        assert!(written.is_empty());
        let mut input = PREFACE.to_vec();
        // A frame too large.
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, DATA, 0, 0, 0, 1]);
        assert!(protocol(serve_raw(&input).await).contains("larger"));
        // A window grant beyond the window.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 1, &head("/endless")));
        input.extend(frame(GRANT, 1, &1u32.to_be_bytes()));
        assert!(protocol(serve_raw(&input).await).contains("window grant"));
        // More data than the window, on a stream whose body is held unread.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 1, &head("/hold")));
        for _ in 0..=(WINDOW as usize / MAX_FRAME) {
            input.extend(frame(DATA, 1, &vec![0; MAX_FRAME]));
        }
        assert!(protocol(serve_raw(&input).await).contains("more data"));
        // A stream number used again, a malformed head, an unknown kind.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 2, &head("/endless")));
        input.extend(frame(HEAD, 1, &head("/endless")));
        assert!(protocol(serve_raw(&input).await).contains("used before"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 1, &[0, 1, 0, 5, b':']));
        assert!(protocol(serve_raw(&input).await).contains("header block"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(9, 1, b""));
        assert!(protocol(serve_raw(&input).await).contains("unknown"));
        // An empty data frame (each would cost the host bookkeeping, not window).
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 1, &head("/hold")));
        input.extend(frame(DATA, 1, b""));
        assert!(protocol(serve_raw(&input).await).contains("empty"));
        // More data than the connection window, on streams each within their own.
        let mut input = PREFACE.to_vec();
        for stream in 1..=3 {
            input.extend(frame(HEAD, stream, &head("/hold")));
            for _ in 0..6 {
                input.extend(frame(DATA, stream, &vec![0; MAX_FRAME]));
            }
        }
        assert!(protocol(serve_raw(&input).await).contains("connection window"));
        // A new connection's preface where the next frame was due: its bytes are handed on.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEAD, 1, &head("/endless")));
        let mut next = PREFACE.to_vec();
        next.extend(frame(HEAD, 1, &head("/echo")));
        input.extend(&next);
        match serve_raw(&input).await {
            (Err(MuxError::Superseded(bytes)), written) => {
                assert_eq!(&bytes[..], &next[..]);
                assert!(written.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // A clean end: the host leaves; nothing is written.
        let (result, written) = serve_raw(PREFACE).await;
        assert!(result.is_ok(), "{result:?}");
        assert!(written.is_empty());
    }

    /// Connects to a fake agent that reads the host's first 8 bytes (its preface), writes
    /// `answer`, then reads and drops whatever else comes until the host leaves.
    fn scripted_agent(answer: Vec<u8>) -> Connector {
        Arc::new(move || {
            let (host, mut agent) = tokio::io::duplex(1 << 20);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut first = [0; 8];
                let _ = agent.read_exact(&mut first).await;
                let _ = agent.write_all(&answer).await;
                let mut sink = Vec::new();
                let _ = agent.read_to_end(&mut sink).await;
            });
            Box::pin(async move { Ok(Box::new(host) as Box<dyn Io>) })
        })
    }

    #[tokio::test]
    async fn the_host_ends_a_connection_whose_agent_breaks_the_protocol() {
        // An agent that answers stream 1 with two heads (queued without end otherwise).
        let status = encode_block((":status", "200"), &HeaderMap::new()).expect("a small block");
        let mut answer = frame(HEAD, 1, &status);
        answer.extend(frame(HEAD, 1, &status));
        // (Never read: the host ended the connection at the second head.)
        answer.extend(frame(RESET, 0, b""));
        let mut channel = Channel::lazy(scripted_agent(answer));
        let result = channel.call(request("/x", Bytes::new())).await;
        let status = match result {
            Ok(response) => response
                .into_body()
                .frame()
                .await
                .expect("an end, not silence")
                .expect_err("the connection was ended"),
            Err(status) => status,
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().contains("second answer head"), "{status}");
    }

    #[tokio::test]
    async fn an_agent_ending_the_connection_after_an_error_fails_the_hosts_calls() {
        let mut channel = Channel::lazy(scripted_agent(frame(RESET, 0, b"")));
        let status = channel
            .call(request("/x", Bytes::new()))
            .await
            .expect_err("the agent ended the connection");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().contains("after an error"), "{status}");
    }

    #[tokio::test]
    async fn a_server_told_to_shut_down_refuses_new_calls_and_ends_after_the_last() {
        let (tell, told) = tokio::sync::oneshot::channel::<()>();
        let told = Arc::new(Mutex::new(Some(told)));
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let connector: Connector = Arc::new(move || {
            let (host, agent) = tokio::io::duplex(1 << 20);
            let told = told.lock().expect("lock").take();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    if let Some(told) = told {
                        let _ = told.await;
                    }
                };
                let result = serve(agent, service(Arc::new(Seen::default())), shutdown).await;
                let _ = done_tx.send(result.is_ok());
            });
            Box::pin(async move { Ok(Box::new(host) as Box<dyn Io>) })
        });
        let mut channel = Channel::lazy(connector);
        let under_way = channel
            .call(request("/endless", Bytes::new()))
            .await
            .expect("an answer");
        tell.send(()).expect("tell");
        let refused = channel
            .call(request("/echo", Bytes::from_static(b"late")))
            .await
            .expect_err("refused while shutting down");
        assert_eq!(refused.code(), tonic::Code::Cancelled, "{refused}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(done.try_recv().is_err(), "ended with a call under way");
        drop(under_way);
        let ended = tokio::time::timeout(Duration::from_secs(5), done.recv())
            .await
            .expect("the server ends after its last call");
        assert_eq!(ended, Some(true));
    }

    #[test]
    fn header_blocks_round_trip_and_refuse_bad_names() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.append("x-many", HeaderValue::from_static("a"));
        headers.append("x-many", HeaderValue::from_static("b"));
        let block = encode_block((":status", "200"), &headers).expect("a small block");
        let (status, decoded) = decode_block(block, ":status").expect("a good block");
        assert_eq!(status, "200");
        assert_eq!(decoded, headers);
        let mut bad = BytesMut::new();
        bad.put_u16(2);
        for (name, value) in [(&b":path"[..], &b"/x"[..]), (b"Bad Name", b"v")] {
            bad.put_u16(name.len() as u16);
            bad.put_slice(name);
            bad.put_u32(value.len() as u32);
            bad.put_slice(value);
        }
        assert!(decode_block(bad.freeze(), ":path").is_err());
    }
}
