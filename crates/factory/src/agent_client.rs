//! Host side of the guest agent API: a gRPC client over the VM's agent socket.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::UnixStream;
use vmfactory_protocols::agent::agent_service_client::AgentServiceClient;
use vmfactory_protocols::agent::health_check_response::ServingStatus;
use vmfactory_protocols::agent::{
    CheckRequest, GuestDetailsRequest, HandOutRequest, OnlineCpuMemRequest, ReseedRandomDevRequest,
    SetGuestDateTimeRequest,
};

use vmfactory_protocols::contract::{
    AGENT_MAX_MESSAGE_SIZE as MAX_MESSAGE_SIZE, AGENT_MAX_RESPONSE_SIZE,
};
pub use vmfactory_protocols::mux::Channel as AgentChannel;
use vmfactory_protocols::mux::{self, Connector};

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent socket could not be connected.
    #[error("Cannot connect to the guest agent at {path}")]
    Connect {
        /// The agent socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error status.
    #[error("{}", rpc_message(rpc, status))]
    Rpc {
        /// The RPC that failed.
        rpc: &'static str,
        /// The status the agent returned.
        status: tonic::Status,
    },
    /// The agent answered, but not with SERVING.
    #[error("Guest agent is not serving (status {0})")]
    NotServing(i32),
    /// The host clock is before 1970.
    #[error("Host clock is before the Unix epoch")]
    Clock,
    /// A local file could not be read or written while copying to or from the guest.
    #[error("Cannot {action} {}", .path.display())]
    Local {
        /// What was being done.
        action: &'static str,
        /// The local path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// One entry of a copy cannot be copied (inside a tree, the copy goes on without it).
    #[error("Cannot copy {path}: {reason}")]
    CopyEntry {
        /// The path (local or in the guest) that cannot be copied.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A copy cannot go on because the guest misbehaves or vmfactory itself failed.
    #[error("Cannot copy {path}: {reason}")]
    CopyBroken {
        /// The path being copied.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A copy to or from the guest cannot go on.
    #[error("Cannot copy {path}: {reason}")]
    Copy {
        /// The path (local or in the guest) that cannot be copied.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
}

impl AgentError {
    /// Whether the agent does not know the RPC (an agent older than this host).
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, Self::Rpc { status, .. } if status.code() == tonic::Code::Unimplemented)
    }
}

pub(crate) fn rpc_error(rpc: &'static str) -> impl FnOnce(tonic::Status) -> AgentError {
    move |status| AgentError::Rpc { rpc, status }
}

/// What the user reads of a failed agent call: the agent's own message when it refused
/// the request (it names the path or the process and what to do), else which call failed
/// and how (a broken connection, an internal failure), which only that context explains.
fn rpc_message(rpc: &str, status: &tonic::Status) -> String {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::OutOfRange
            if !status.message().is_empty() =>
        {
            status.message().to_string()
        }
        _ => format!("Guest agent {rpc} failed: {}", status.message()),
    }
}

/// Facts the agent reports about the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDetails {
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// Online CPUs.
    pub online_cpus: u32,
    /// MemTotal, KiB.
    pub mem_total_kib: u64,
    /// Version of the agent binary.
    pub agent_version: String,
    /// The guest kernel's clocksource (empty if the agent did not say).
    pub clocksource: String,
}

/// A connection to one guest agent. Cloning shares the connection; it is closed when the
/// last clone is dropped or on [`AgentClient::disconnect`].
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub(crate) inner: AgentServiceClient<AgentChannel>,
    socket: Arc<SocketGuard>,
    /// The container whose root file operations (`copy_in`, `copy_out`) work in; empty:
    /// the VM's. See [`AgentClient::files_in`].
    files_container: String,
    /// Counts the bytes of file content `copy_in` and `copy_out` have moved, as they go
    /// (for progress). See [`AgentClient::counting_bytes`].
    copied: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// A duplicate of the connected socket's fd, to shut the connection down on demand: the
/// channel's connection lives while any clone of it or an answer being read holds it,
/// and the guest agent only goes back to waiting for a host once the host side is really
/// gone.
#[derive(Debug, Default)]
struct SocketGuard {
    fd: Mutex<Option<OwnedFd>>,
}

impl SocketGuard {
    fn set(&self, fd: OwnedFd) {
        if let Ok(mut slot) = self.fd.lock() {
            if let Some(old) = slot.replace(fd) {
                shutdown(&old);
            }
        }
    }

    fn shutdown(&self) {
        if let Ok(mut slot) = self.fd.lock() {
            if let Some(fd) = slot.take() {
                shutdown(&fd);
            }
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn shutdown(fd: &OwnedFd) {
    // SAFETY: shutdown on a socket fd we own; it ends the connection for every holder.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

impl AgentClient {
    /// This connection, with file operations (`copy_in`, `copy_out`) in container
    /// `container`'s root instead of the VM's ("" = the VM's).
    pub fn files_in(&self, container: &str) -> Self {
        Self {
            files_container: container.to_string(),
            ..self.clone()
        }
    }

    /// The container file operations work in ("" = the VM).
    pub(crate) fn files_container(&self) -> &str {
        &self.files_container
    }

    /// This client, its `copy_in` and `copy_out` adding to `counter` the bytes of file
    /// content they move, chunk by chunk (to show a long copy's progress).
    pub fn counting_bytes(&self, counter: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            copied: Some(counter),
            ..self.clone()
        }
    }

    /// Adds `bytes` to the counter of [`AgentClient::counting_bytes`], if any.
    pub(crate) fn count_copied(&self, bytes: u64) {
        if let Some(counter) = &self.copied {
            counter.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Connects to the agent socket now; calls wait until the agent in the guest listens,
    /// so this can run while the guest still boots.
    pub async fn connect(socket: &Path) -> Result<Self, AgentError> {
        let (connector, guard) = Self::connector(socket);
        let channel =
            AgentChannel::connect(connector)
                .await
                .map_err(|source| AgentError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })?;
        Ok(Self::with_channel(channel, guard))
    }

    /// A client that connects on its first call: nothing reaches the guest before then
    /// (a paused VM that may change hands must not have a stale connection in its port).
    pub fn connect_lazy(socket: &Path) -> Self {
        let (connector, guard) = Self::connector(socket);
        Self::with_channel(AgentChannel::lazy(connector), guard)
    }

    /// Connects to the agent socket `socket` (each time the channel needs a connection),
    /// keeping a duplicate of the connection's fd in the returned guard.
    fn connector(socket: &Path) -> (Connector, Arc<SocketGuard>) {
        let path = socket.to_path_buf();
        let guard = Arc::new(SocketGuard::default());
        let weak: Weak<SocketGuard> = Arc::downgrade(&guard);
        let connector: Connector = Arc::new(move || {
            let path = path.clone();
            let weak = weak.clone();
            Box::pin(async move {
                let stream = UnixStream::connect(path).await?;
                if let Some(guard) = weak.upgrade() {
                    guard.set(stream.as_fd().try_clone_to_owned()?);
                }
                Ok(Box::new(stream) as Box<dyn mux::Io>)
            })
        });
        (connector, guard)
    }

    fn with_channel(channel: AgentChannel, socket: Arc<SocketGuard>) -> Self {
        let inner = AgentServiceClient::new(channel)
            .max_decoding_message_size(AGENT_MAX_RESPONSE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Self {
            inner,
            socket,
            files_container: String::new(),
            copied: None,
        }
    }

    /// The generated gRPC client on this connection (to forward calls, as a sandbox
    /// supervisor does).
    pub fn grpc(&self) -> AgentServiceClient<AgentChannel> {
        self.inner.clone()
    }

    /// Closes the connection now, for every clone of this client.
    pub fn disconnect(&self) {
        self.socket.shutdown();
    }

    /// Health check: Ok once the agent serves.
    pub async fn check(&self) -> Result<(), AgentError> {
        let response = self
            .inner
            .clone()
            .check(CheckRequest::default())
            .await
            .map_err(rpc_error("Check"))?
            .into_inner();
        if response.status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(AgentError::NotServing(response.status))
        }
    }

    /// Kernel release, online CPUs, memory, agent version.
    pub async fn details(&self) -> Result<GuestDetails, AgentError> {
        let response = self
            .inner
            .clone()
            .guest_details(GuestDetailsRequest {})
            .await
            .map_err(rpc_error("GuestDetails"))?
            .into_inner();
        Ok(GuestDetails {
            kernel_release: response.kernel_release,
            online_cpus: response.online_cpus,
            mem_total_kib: response.mem_total_kib,
            agent_version: response.agent_version,
            clocksource: response.clocksource,
        })
    }

    /// Sets the guest clock to `time`.
    pub async fn set_time(&self, time: SystemTime) -> Result<(), AgentError> {
        let since_epoch = time
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AgentError::Clock)?;
        let request = SetGuestDateTimeRequest {
            sec: i64::try_from(since_epoch.as_secs()).map_err(|_| AgentError::Clock)?,
            usec: i64::from(since_epoch.subsec_micros()),
        };
        self.inner
            .clone()
            .set_guest_date_time(request)
            .await
            .map_err(rpc_error("SetGuestDateTime"))?;
        Ok(())
    }

    /// Adds `entropy` to the guest RNG and reseeds it.
    pub async fn reseed(&self, entropy: Vec<u8>) -> Result<(), AgentError> {
        self.inner
            .clone()
            .reseed_random_dev(ReseedRandomDevRequest { data: entropy })
            .await
            .map_err(rpc_error("ReseedRandomDev"))?;
        Ok(())
    }

    // ---- Hand-out ----
    /// Gives the guest its identity in one round trip: adds `entropy` and reseeds the
    /// CRNG, sets the clock to `time`, and sets `hostname` (empty: left as it is).
    /// Returns how long the guest took to apply it. An agent without `HandOut` (older
    /// than this host) answers `Unimplemented`: see [`AgentError::is_unimplemented`].
    pub async fn hand_out(
        &self,
        entropy: Vec<u8>,
        time: SystemTime,
        hostname: String,
    ) -> Result<std::time::Duration, AgentError> {
        let since_epoch = time
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AgentError::Clock)?;
        let request = HandOutRequest {
            entropy,
            clock_sec: i64::try_from(since_epoch.as_secs()).map_err(|_| AgentError::Clock)?,
            clock_nsec: since_epoch.subsec_nanos(),
            hostname,
        };
        let response = self
            .inner
            .clone()
            .hand_out(request)
            .await
            .map_err(rpc_error("HandOut"))?
            .into_inner();
        Ok(std::time::Duration::from_micros(response.guest_micros))
    }
    // ---- end of hand-out ----

    /// Onlines hot-plugged CPUs and memory, waiting until `cpus` CPUs are online and,
    /// unless `memory_mib` is `None`, until online memory covers `memory_mib`.
    pub async fn online_cpu_mem(
        &self,
        cpus: u32,
        memory_mib: Option<u32>,
    ) -> Result<(), AgentError> {
        self.inner
            .clone()
            .online_cpu_mem(OnlineCpuMemRequest {
                wait: true,
                nb_cpus: cpus,
                cpu_only: memory_mib.is_none(),
                memory_mib: memory_mib.unwrap_or(0),
            })
            .await
            .map_err(rpc_error("OnlineCPUMem"))?;
        Ok(())
    }
}
