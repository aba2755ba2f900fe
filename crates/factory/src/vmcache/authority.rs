//! The `:authority` fix-up of the VMCache server's client connections.
//!
//! gRPC C-core (grpcio for Python, C++) sends, for a `unix:/run/x/cache.sock` target, the
//! socket path without its leading slash and with the other slashes percent-encoded
//! (`run%2Fx%2Fcache.sock`) as `:authority`. h2's server parses `:authority` as an
//! `http::uri::Authority`, rejects that value as malformed and resets every stream with
//! PROTOCOL_ERROR, and neither h2, hyper nor tonic can be told otherwise. gRPC-Go (Kata's
//! client) and grpc-js send `localhost`.
//!
//! [`AuthorityFilterStream`] sits between an accepted connection and tonic. It parses the
//! HTTP/2 frames the client sends; each header block (HEADERS + CONTINUATION) is decoded
//! with an HPACK decoder that keeps the client's dynamic table. A block whose
//! `:authority` `http::uri::Authority` accepts goes on byte for byte. A block with a
//! malformed one is re-encoded with `:authority: localhost`, every field a literal without
//! indexing, so the server's dynamic table is never touched and no table size has to be
//! negotiated. From then on the server's table no longer mirrors the client's, so every
//! later block of that connection is re-encoded the same way. All other frames, and the
//! whole server→client direction, pass through unchanged.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::decoder::{Decoder, DecoderError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
const FRAME_HEADER_LEN: usize = 9;
/// Frame types and flags we look at (RFC 9113, section 6).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Re-encoded frames stay within the smallest SETTINGS_MAX_FRAME_SIZE a peer may set.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The dynamic table size the server allows (h2's default; tonic does not change it).
const HEADER_TABLE_SIZE: usize = 4_096;
/// Largest header block (its frames, as received) we buffer before refusing the client.
/// The server refuses header lists above 16 KiB anyway.
pub(crate) const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (RFC 7541 size: name + value + 32 per field).
const MAX_HEADER_LIST: usize = 64 * 1024;
/// What a malformed `:authority` becomes: what gRPC-Go sends for `unix:` targets.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Why a client connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The client did not open with the HTTP/2 preface.
    #[error("The client did not start with the HTTP/2 connection preface")]
    BadPreface,
    /// A header block is larger than we buffer.
    #[error("A header block exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    /// A decoded header list is larger than we keep.
    #[error("A header list exceeds {MAX_HEADER_LIST} bytes")]
    ListTooLarge,
    /// A frame other than CONTINUATION interrupted a header block.
    #[error("Expected a CONTINUATION frame of stream {stream}, got a frame of type {kind}")]
    ExpectedContinuation {
        /// The stream of the unfinished block.
        stream: u32,
        /// The frame type received.
        kind: u8,
    },
    /// A CONTINUATION frame without a header block to continue.
    #[error("A CONTINUATION frame of stream {0} continues no header block")]
    UnexpectedContinuation(u32),
    /// Padding or priority fields longer than the frame.
    #[error("A HEADERS frame of stream {0} is shorter than its padding and priority fields")]
    BadPadding(u32),
    /// The HPACK decoder refused a header block.
    #[error("Cannot decode a header block of stream {stream}")]
    Hpack {
        /// The stream.
        stream: u32,
        /// Why.
        #[source]
        source: DecoderError,
    },
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the connection preface, `matched` bytes seen.
    Preface { matched: usize },
    /// Collecting a 9-byte frame header.
    FrameHeader,
    /// Forwarding the payload of a frame we do not look into.
    Passthrough { remaining: usize },
    /// Buffering the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload { remaining: usize },
}

/// A header block being collected from a HEADERS frame and its CONTINUATIONs.
#[derive(Debug, Default)]
struct Block {
    stream: u32,
    /// Flags of the HEADERS frame.
    flags: u8,
    /// The PRIORITY fields of the HEADERS frame, if any.
    priority: Option<[u8; 5]>,
    /// The frames as received, forwarded when the block needs no change.
    raw: Vec<u8>,
    /// The concatenated HPACK fragments.
    fragment: Vec<u8>,
}

/// The client→server half of the fix-up, without I/O: bytes in, bytes for the server out.
pub(crate) struct AuthorityFilter {
    state: State,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Type and flags of the frame whose payload is being buffered.
    frame: (u8, u8),
    payload: Vec<u8>,
    block: Option<Block>,
    decoder: Decoder<'static>,
    /// True once a block was re-encoded: the server's table no longer mirrors the client's.
    reencoding: bool,
}

impl std::fmt::Debug for AuthorityFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFilter")
            .field("state", &self.state)
            .field("block", &self.block)
            .field("reencoding", &self.reencoding)
            .finish_non_exhaustive()
    }
}

impl AuthorityFilter {
    /// A filter for a new connection.
    pub(crate) fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            state: State::Preface { matched: 0 },
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            frame: (0, 0),
            payload: Vec::new(),
            block: None,
            decoder,
            reencoding: false,
        }
    }

    /// Takes the next bytes from the client and appends what the server should read to
    /// `out`. Incomplete frames are kept for the next call.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        while !input.is_empty() {
            match self.state {
                State::Preface { matched } => {
                    let expected = &PREFACE[matched..];
                    let n = expected.len().min(input.len());
                    if input[..n] != expected[..n] {
                        return Err(AuthorityError::BadPreface);
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if matched + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface {
                            matched: matched + n,
                        }
                    };
                }
                State::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len == FRAME_HEADER_LEN {
                        self.header_len = 0;
                        self.begin_frame(out)?;
                    }
                }
                State::Passthrough { remaining } => {
                    let n = remaining.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == remaining {
                        State::FrameHeader
                    } else {
                        State::Passthrough {
                            remaining: remaining - n,
                        }
                    };
                }
                State::HeaderPayload { remaining } => {
                    let n = remaining.min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if n == remaining {
                        self.state = State::FrameHeader;
                        self.end_header_frame(out)?;
                    } else {
                        self.state = State::HeaderPayload {
                            remaining: remaining - n,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Acts on a complete frame header.
    fn begin_frame(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let header = self.header;
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5] & 0x7f, header[6], header[7], header[8]]);
        match (kind, self.block.as_mut()) {
            (HEADERS, None) => {
                self.block = Some(Block {
                    stream,
                    flags,
                    ..Block::default()
                })
            }
            (CONTINUATION, Some(block)) if block.stream == stream => {}
            (CONTINUATION, _) => return Err(AuthorityError::UnexpectedContinuation(stream)),
            (kind, Some(block)) => {
                return Err(AuthorityError::ExpectedContinuation {
                    stream: block.stream,
                    kind,
                })
            }
            (_, None) => {
                out.extend_from_slice(&header);
                self.state = if length == 0 {
                    State::FrameHeader
                } else {
                    State::Passthrough { remaining: length }
                };
                return Ok(());
            }
        }
        let block = self
            .block
            .as_mut()
            .ok_or(AuthorityError::UnexpectedContinuation(stream))?;
        if block.raw.len() + FRAME_HEADER_LEN + length > MAX_HEADER_BLOCK {
            return Err(AuthorityError::BlockTooLarge);
        }
        block.raw.extend_from_slice(&header);
        self.frame = (kind, flags);
        self.payload.clear();
        if length == 0 {
            self.end_header_frame(out)
        } else {
            self.state = State::HeaderPayload { remaining: length };
            Ok(())
        }
    }

    /// Adds a complete HEADERS or CONTINUATION payload to the block; finishes the block on
    /// END_HEADERS.
    fn end_header_frame(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let (kind, flags) = self.frame;
        let payload = std::mem::take(&mut self.payload);
        let Some(block) = self.block.as_mut() else {
            return Err(AuthorityError::UnexpectedContinuation(0));
        };
        block.raw.extend_from_slice(&payload);
        let mut fragment = payload.as_slice();
        if kind == HEADERS {
            let stream = block.stream;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&length, rest) = fragment
                    .split_first()
                    .ok_or(AuthorityError::BadPadding(stream))?;
                padding = usize::from(length);
                fragment = rest;
            }
            if flags & PRIORITY != 0 {
                let (priority, rest) = fragment
                    .split_first_chunk::<5>()
                    .ok_or(AuthorityError::BadPadding(stream))?;
                block.priority = Some(*priority);
                fragment = rest;
            }
            let end = fragment
                .len()
                .checked_sub(padding)
                .ok_or(AuthorityError::BadPadding(stream))?;
            fragment = &fragment[..end];
        }
        block.fragment.extend_from_slice(fragment);
        self.payload = payload;
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.finish_block(block, out)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block and forwards it, as received or re-encoded.
    fn finish_block(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|source| AuthorityError::Hpack {
                stream: block.stream,
                source,
            })?;
        if size > MAX_HEADER_LIST {
            return Err(AuthorityError::ListTooLarge);
        }
        let mut replaced = false;
        for (name, value) in &mut fields {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                debug!(
                    stream = block.stream,
                    authority = %String::from_utf8_lossy(value),
                    "Replacing a malformed :authority with localhost"
                );
                *value = REPLACEMENT_AUTHORITY.to_vec();
                replaced = true;
            }
        }
        if !replaced && !self.reencoding {
            out.extend_from_slice(&block.raw);
            return Ok(());
        }
        self.reencoding = true;
        let mut encoded = Vec::new();
        for (name, value) in &fields {
            encode_literal(name, value, &mut encoded);
        }
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// A field as "literal header field without indexing — new name" (RFC 7541, 6.2.2),
/// strings without Huffman coding.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for string in [name, value] {
        encode_integer(string.len(), 7, 0, out);
        out.extend_from_slice(string);
    }
}

/// An HPACK integer with a `prefix_bits`-bit prefix after the bits `first` (RFC 7541, 5.1).
fn encode_integer(value: usize, prefix_bits: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        // Fits in the prefix: value < max <= 255.
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A re-encoded block as a HEADERS frame (END_STREAM and PRIORITY kept, padding dropped)
/// and as many CONTINUATION frames as needed.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME_PAYLOAD - priority_len));
    let mut flags = block.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame_header(
        priority_len + first.len(),
        HEADERS,
        flags,
        block.stream,
        out,
    );
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, remainder) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = remainder;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame_header(chunk.len(), CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn write_frame_header(length: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    // length <= MAX_FRAME_PAYLOAD < 2^24.
    let length = length.to_be_bytes();
    out.extend_from_slice(&length[length.len() - 3..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A server-side connection whose client→server bytes go through an [`AuthorityFilter`];
/// writes go straight to the inner stream.
pub(crate) struct AuthorityFilterStream<S> {
    inner: S,
    filter: AuthorityFilter,
    /// Filtered bytes not yet read by the server, from `pending_start`.
    pending: Vec<u8>,
    pending_start: usize,
}

impl<S> std::fmt::Debug for AuthorityFilterStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFilterStream")
            .field("filter", &self.filter)
            .field("pending", &(self.pending.len() - self.pending_start))
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityFilterStream<S> {
    /// Wraps an accepted connection.
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            filter: AuthorityFilter::new(),
            pending: Vec::new(),
            pending_start: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFilterStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending_start < this.pending.len() {
                let available = &this.pending[this.pending_start..];
                let n = available.len().min(buf.remaining());
                buf.put_slice(&available[..n]);
                this.pending_start += n;
                if this.pending_start == this.pending.len() {
                    this.pending.clear();
                    this.pending_start = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(err) = this.filter.feed(read.filled(), &mut this.pending) {
                warn!(error = %err, "Closing a VMCache client connection");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFilterStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFilterStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;
