//! The virtio-serial port: finding it, waiting for the host, and serving one HTTP/2
//! connection after another on it.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustix::buffer::spare_capacity;
use rustix::event::{epoll, Timespec};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tracing::{debug, info, warn};
use vmfactory_protocols::agent::agent_service_server::AgentServiceServer;

use vmfactory_protocols::contract::{
    AGENT_CONNECTION_WINDOW, AGENT_MAX_FRAME_SIZE, AGENT_MAX_MESSAGE_SIZE as MAX_MESSAGE_SIZE,
    AGENT_STREAM_WINDOW, CONSOLE_HOST_LEFT, CONSOLE_PORT_OPENED,
};

use crate::service::Agent;

/// How often a port waiting for its host is checked even without a wake-up (a safety
/// net: the host's connection wakes the waiter).
const HOST_POLL: Duration = Duration::from_secs(1);

/// Serves the agent API on the port named `name`, forever.
pub async fn serve_port(name: &str) {
    let device = find_port(name).await;
    info!(device = ?device, "Found the agent port");
    let agent = Agent::default();
    loop {
        let port = open_port(&device).await;
        wait_for_host(&port).await;
        debug!("Host connected");
        let io = match PortIo::new(port) {
            Ok(io) => io,
            Err(err) => {
                warn!(%err, "Cannot register the port with the runtime");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = AgentServiceServer::new(agent.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(AGENT_STREAM_WINDOW)
            .initial_connection_window_size(AGENT_CONNECTION_WINDOW)
            .max_frame_size(AGENT_MAX_FRAME_SIZE)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .await;
        match result {
            Ok(()) => info!("{}", CONSOLE_HOST_LEFT[0]),
            Err(err) => info!(%err, "{}", CONSOLE_HOST_LEFT[1]),
        }
        // The port is closed here (PortIo dropped) and reopened for the next host, so the
        // host sees the guest side close and open again (QMP VSERPORT_CHANGE).
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
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            info!("{}", CONSOLE_PORT_OPENED);
            return fd;
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

/// Waits until the host connects.
///
/// While no host is connected the port polls as hung up, so there is no readiness to
/// wait for, and the runtime keeps a hang-up as final. But the host's connection wakes
/// the port's wait queue (virtio-console's `PORT_OPEN`), and an edge-triggered epoll set
/// of the port's own (`PortEdges`) turns that wake-up into its readability, which the
/// runtime waits for. The set is made before the first check, so no connection is
/// missed; a slow poll is the safety net. This replaced SIGIO (`O_ASYNC`), whose
/// delivery, handler and self-pipe were guest code that each template clone ran, and its
/// QEMU translated, on every hand-out.
async fn wait_for_host(port: &OwnedFd) {
    let edges = match PortEdges::new(port) {
        Ok(edges) => Some(edges),
        Err(err) => {
            warn!(%err, "Cannot watch the port for its host; polling instead");
            None
        }
    };
    while !host_connected(port) {
        match &edges {
            Some(edges) => match tokio::time::timeout(HOST_POLL, edges.fd.readable()).await {
                Ok(Ok(mut guard)) => {
                    edges.drain();
                    guard.clear_ready();
                }
                Ok(Err(err)) => {
                    debug!(%err, "Waiting on the port's epoll set failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(_elapsed) => {}
            },
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// An epoll set holding only the port, edge-triggered: it becomes readable whenever the
/// port's wait queue is woken.
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

/// Non-blocking async I/O on the port's file descriptor.
#[derive(Debug)]
struct PortIo {
    fd: AsyncFd<OwnedFd>,
}

impl PortIo {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the OwnedFd is valid, open, and owned by the AsyncFd for its lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reading into a valid, initialized buffer of the given length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: writing from a valid buffer of the given length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return Poll::Ready(result),
                // With the host gone, writes would block forever while poll keeps
                // reporting HUP: end the connection instead of waiting on it.
                Err(_would_block) if !host_connected(self.fd.get_ref()) => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
