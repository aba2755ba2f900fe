//! The virtio-serial port: finding it, and serving one host connection after another on
//! it (the agent API over `vmfactory_protocols::mux`).
//!
//! The port stays open and registered with the runtime from one host to the next, and
//! each connection is made before its host arrives: when a host leaves, the next
//! connection is set up at once and parks, its first read finding no host, until one
//! connects. A template is saved in that state (the host waits for the console line
//! [`CONSOLE_PORT_OPENED`] first), so a clone's hand-out starts with its connection
//! already made: none of that guest code (the server's set-up, the port's registration
//! with epoll, checking for a host with `poll`) is run, and translated by the clone's
//! QEMU, on its path. A clone's hand-out translated about 10% fewer blocks.

use std::ffi::{CStr, CString};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::{epoll, Timespec};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::time::Sleep;
use tracing::{info, warn};
use vmfactory_protocols::agent::agent_service_server::AgentServiceServer;

use vmfactory_protocols::contract::{
    AGENT_MAX_MESSAGE_SIZE as MAX_MESSAGE_SIZE, CONSOLE_HOST_LEFT, CONSOLE_PORT_OPENED,
};
use vmfactory_protocols::mux;

use crate::service::Agent;

/// How often a connection waiting for its host checks the port even without a wake-up
/// (a safety net: the host's connection wakes the port).
const HOST_POLL: Duration = Duration::from_secs(1);

/// Serves the agent API on the port named `name`, forever.
pub async fn serve_port(name: &str) {
    let device = find_port(name).await;
    info!(device = ?device, "Found the agent port");
    let agent = Agent::default();
    let mut port = Port::open(&device).await;
    loop {
        let service = AgentServiceServer::new(agent.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let result = mux::serve(PortIo::new(port.clone()), service, std::future::pending()).await;
        match result {
            Ok(()) => info!("{}", CONSOLE_HOST_LEFT[0]),
            Err(mux::MuxError::Superseded(next)) => {
                // The host left and the next one already spoke: its bytes start the
                // next connection.
                info!("{}", CONSOLE_HOST_LEFT[0]);
                port.keep_for_next(next.to_vec());
                continue;
            }
            Err(err) => info!(%err, "{}", CONSOLE_HOST_LEFT[1]),
        }
        if !port.host_left.load(Ordering::Relaxed) {
            // The connection ended with its host still there (an error, or its host gone
            // in the middle of a write): whatever that host still sends is read and
            // dropped until it leaves, so the next connection starts with the next host.
            // Only one host can be connected at a time, so no other waits meanwhile.
            if let Err(err) = discard_until_host_leaves(port.clone()).await {
                warn!(%err, "Cannot read the port; opening it again");
                drop(port);
                port = Port::open(&device).await;
            }
        }
    }
}

/// Reads and drops what the port's host sends until it leaves, or until a new
/// connection's preface arrives: a host that connected again before this side saw it
/// leave (the port only tells "a host is there"). What follows the preface, the preface
/// included, is kept for the next connection.
async fn discard_until_host_leaves(port: Arc<Port>) -> io::Result<()> {
    let mut io = PortIo::new(port.clone());
    io.host_seen = true;
    let mut buffer = vec![0; 64 << 10];
    // The end of what was read before, in case a preface straddles two reads.
    let mut seen = Vec::new();
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut io, &mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        seen.extend_from_slice(&buffer[..n]);
        if let Some(at) = seen
            .windows(mux::PREFACE.len())
            .position(|window| window == mux::PREFACE)
        {
            seen.drain(..at);
            port.keep_for_next(seen);
            return Ok(());
        }
        seen.drain(..seen.len().saturating_sub(mux::PREFACE.len() - 1));
    }
}

/// The open port, registered with the runtime through an epoll set of its own.
#[derive(Debug)]
struct Port {
    fd: OwnedFd,
    edges: PortEdges,
    /// Set when a connection's host left (its read found no data and no host).
    host_left: AtomicBool,
    /// Bytes read already that belong to the next connection (its first read gets them).
    pending: std::sync::Mutex<Vec<u8>>,
}

impl Port {
    /// Opens the port device and registers it, retrying until both succeed.
    async fn open(device: &CStr) -> Arc<Self> {
        loop {
            let fd = open_port(device).await;
            match PortEdges::new(&fd) {
                Ok(edges) => {
                    return Arc::new(Self {
                        fd,
                        edges,
                        host_left: AtomicBool::new(false),
                        pending: std::sync::Mutex::new(Vec::new()),
                    })
                }
                Err(err) => {
                    warn!(%err, "Cannot register the port with the runtime");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Keeps `bytes`, read already, for the next connection's first read.
    fn keep_for_next(&self, bytes: Vec<u8>) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = bytes;
        }
    }

    /// Moves as much of the kept bytes as fits into `buf`; false if none are kept.
    fn take_pending(&self, buf: &mut ReadBuf<'_>) -> bool {
        let Ok(mut pending) = self.pending.lock() else {
            return false;
        };
        if pending.is_empty() {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        pending.drain(..n);
        true
    }
}

/// Waits until `/sys/class/virtio-ports/*/name` names `name`; returns its `/dev` node.
async fn find_port(name: &str) -> CString {
    let started = Instant::now();
    let mut warned = false;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let port_name = std::fs::read_to_string(entry.path().join("name"));
                if port_name.is_ok_and(|n| n.trim() == name) {
                    let device = Path::new("/dev").join(entry.file_name());
                    // A directory entry name never contains a NUL byte.
                    if let Ok(device) = CString::new(device.into_os_string().into_encoded_bytes()) {
                        return device;
                    }
                }
            }
        }
        if !warned && started.elapsed() > Duration::from_secs(5) {
            warn!(name, "Still waiting for the virtio-serial port");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Opens the port device, retrying while it is not ready (ENOENT, ENXIO) or busy.
async fn open_port(path: &CStr) -> OwnedFd {
    let mut logged = false;
    loop {
        // SAFETY: path is a valid NUL-terminated string.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just returned by open and is owned by nobody else.
            return unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let err = io::Error::last_os_error();
        if !logged {
            info!(%err, "Cannot open the agent port yet; retrying");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// True when the host side of the port is connected (poll reports no POLLHUP).
fn host_connected(fd: &OwnedFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    rc >= 0 && pollfd.revents & libc::POLLHUP == 0
}

/// An epoll set holding only the port, edge-triggered: it becomes readable whenever the
/// port's wait queue is woken (data in, room to write, a host connecting or leaving).
///
/// The port itself cannot be waited on directly: while no host is connected it polls as
/// hung up, and the runtime keeps a hang-up as final. The host's connection wakes the
/// port's wait queue (virtio-console's `PORT_OPEN`), which this set turns into its own
/// readability. This replaced SIGIO (`O_ASYNC`), whose delivery, handler and self-pipe
/// were guest code that each template clone ran, and its QEMU translated, on every
/// hand-out.
#[derive(Debug)]
struct PortEdges {
    fd: AsyncFd<OwnedFd>,
}

impl PortEdges {
    fn new(port: &OwnedFd) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            port,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN | epoll::EventFlags::OUT | epoll::EventFlags::ET,
        )?;
        // SAFETY: the epoll descriptor is valid, open, and owned by the AsyncFd for its
        // lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Takes the set's pending events, so the next wake-up makes it readable again.
    fn drain(&self) {
        let mut events = Vec::with_capacity(4);
        let _ = epoll::wait(
            self.fd.get_ref(),
            spare_capacity(&mut events),
            Some(&Timespec::default()),
        );
    }
}

/// One connection's non-blocking I/O on the port.
///
/// Until a host has been seen, the port's "no host" answers (a read of nothing, a write
/// that would block) mean "wait for one"; once one has been seen, a read of nothing is
/// the end of the connection (the host left), and a write that would block while the
/// host is gone is a broken pipe. A host is seen when the port says it is there (a read
/// that would block, a write that goes through), not by its data alone, which can come
/// first. The port's kernel driver answers a read with 0 bytes when no host is connected
/// and no data is left, and with `EAGAIN` when a host is connected and sent nothing yet.
#[derive(Debug)]
struct PortIo {
    port: Arc<Port>,
    host_seen: bool,
    announced: bool,
    recheck: Pin<Box<Sleep>>,
}

impl PortIo {
    fn new(port: Arc<Port>) -> Self {
        port.host_left.store(false, Ordering::Relaxed);
        Self {
            port,
            host_seen: false,
            announced: false,
            recheck: Box::pin(tokio::time::sleep(HOST_POLL)),
        }
    }

    /// Says once per connection, on the console, that the agent is ready for its host:
    /// the connection waits for one, or has found one.
    fn announce(&mut self) {
        if !self.announced {
            self.announced = true;
            info!("{}", CONSOLE_PORT_OPENED);
        }
    }

    /// Ready at the port's next wake-up since the last one taken; while no host has been
    /// seen, also every [`HOST_POLL`].
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.port.edges.fd.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // Drained before the readiness is cleared: a wake-up in between makes the
                // set readable again, so none is lost.
                self.port.edges.drain();
                guard.clear_ready();
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => {}
        }
        if !self.host_seen && self.recheck.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + HOST_POLL;
            self.recheck.as_mut().reset(next.into());
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0 && this.port.take_pending(buf) {
            // Data, not yet the host seen (below).
            this.announce();
            return Poll::Ready(Ok(()));
        }
        loop {
            // Read into the buffer's unfilled part as it is: zeroing it first (the
            // connection reads into 64 KiB of room) would be guest work on every read.
            // SAFETY: the bytes are only written to, by read(2), never read here.
            let unfilled = unsafe { buf.unfilled_mut() };
            if unfilled.is_empty() {
                return Poll::Ready(Ok(()));
            }
            // SAFETY: reading into valid memory of the given length.
            let n = unsafe {
                libc::read(
                    this.port.fd.as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                )
            };
            if n > 0 {
                // Data is not yet the host seen: in a template's clone, the host's first
                // bytes can reach the agent before the message that its host connected
                // (another virtqueue), and until then the port answers "no host" (0)
                // once they are read. A host counts as seen when the port says it is
                // there (a read that would block, a write that goes through).
                this.announce();
                // SAFETY: read(2) initialised the first n bytes of the unfilled part.
                unsafe { buf.assume_init(n as usize) };
                buf.advance(n as usize);
                return Poll::Ready(Ok(()));
            }
            if n == 0 {
                if this.host_seen {
                    // No data and no host: it left. The end of this connection.
                    this.port.host_left.store(true, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                this.announce();
            } else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {
                        this.host_seen = true;
                        this.announce();
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Poll::Ready(Err(err)),
                }
            }
            ready!(this.poll_wake(cx))?;
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // SAFETY: writing from a valid buffer of the given length.
            let n =
                unsafe { libc::write(this.port.fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                this.host_seen = true;
                this.announce();
                return Poll::Ready(Ok(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                // With the host gone, writes would block forever: end the connection
                // instead of waiting on it. Before any host, wait for one.
                io::ErrorKind::WouldBlock if this.host_seen => {
                    if !host_connected(&this.port.fd) {
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    }
                }
                io::ErrorKind::WouldBlock => this.announce(),
                io::ErrorKind::Interrupted => continue,
                _ => return Poll::Ready(Err(err)),
            }
            ready!(this.poll_wake(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
