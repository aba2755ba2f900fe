//! VMCache: a server that hands out cached VMs over Kata's `cache.proto` on a Unix
//! socket, and the client factory that takes them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vmfactory_hypervisor::Backend;
use vmfactory_protocols::cache::cache_service_client::CacheServiceClient;
use vmfactory_protocols::cache::cache_service_server::{CacheService, CacheServiceServer};
use vmfactory_protocols::cache::{GrpcStatus, GrpcVm, GrpcVmConfig, GrpcVmStatus};

use crate::base::{FactoryBase, FactoryError, VmStatus};
use crate::config::VmConfig;
use crate::handover::HandOverRecord;
use crate::lock::{LockError, LockKind, PathLock};
use crate::socket::SocketAt;
use crate::vm::{Vm, VmError};

mod authority;

/// Interval of HTTP/2 pings on idle connections, both ways: a peer that is gone or frozen
/// is noticed within this plus [`KEEPALIVE_TIMEOUT`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most calls one client connection may have open at once (tonic sets no limit of its
/// own, which lifts hyper's): a client opening streams without end cannot take the
/// server's memory and tasks. Kata's client makes one call at a time.
const MAX_CALLS_PER_CONNECTION: u32 = 64;
/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client call may take (a `GetBaseVM` waits while the cache refills).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors of the VMCache server and client.
#[derive(Debug, thiserror::Error)]
pub enum VmCacheError {
    /// Another server answers on the endpoint.
    #[error(
        "A VMCache server already answers on {0}: stop it with `vmfactory factory destroy` first"
    )]
    AlreadyRunning(PathBuf),
    /// The endpoint exists and is not a socket: it is not vmfactory's to remove.
    #[error("vm_cache_endpoint {0} exists and is not a Unix socket: set vm_cache_endpoint to another path, or move that file away")]
    NotASocket(PathBuf),
    /// No server answers on the endpoint.
    #[error(
        "No VMCache server answers on {path} ({reason}): start one with `vmfactory factory init`"
    )]
    NotRunning {
        /// The endpoint.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// A socket file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection to the server broke during a call: it stopped, was killed, or
    /// stopped answering.
    #[error("The VMCache server on {path} stopped answering ({reason}): it was stopped or killed; start it again with `vmfactory factory init`")]
    Gone {
        /// The endpoint.
        path: PathBuf,
        /// What the transport said.
        reason: String,
    },
    /// The server answered with an error.
    #[error("VMCache {rpc} failed: {}", .status.message())]
    Rpc {
        /// The RPC.
        rpc: &'static str,
        /// Its status.
        status: Status,
    },
    /// The server sent something unusable.
    #[error("VMCache server sent an invalid {what}: {detail}")]
    Invalid {
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Another server holds the endpoint.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// Serving failed.
    #[error("VMCache server failed: {0}")]
    Serve(String),
}

/// Serves `factory` (normally a [`crate::CacheFactory`]) on the Unix socket `endpoint`
/// until `shutdown` is notified or a client calls `Quit`. Refuses to start while another
/// server answers there, and when the path is anything but a socket; removes a stale socket; the socket is mode 0600 and removed on
/// exit. The factory is not closed here: the caller decides what to release. Holds the
/// endpoint's lock ([`lock_endpoint`]) while it serves.
pub async fn serve(
    factory: Arc<dyn FactoryBase>,
    endpoint: &Path,
    shutdown: Arc<Notify>,
) -> Result<(), VmCacheError> {
    let lock = lock_endpoint(endpoint)?;
    serve_locked(factory, endpoint, &lock, shutdown).await
}

/// The pid of a server that holds `endpoint`'s lock but may not answer yet (it creates its
/// template or fills its cache first), read from the lock file without taking the lock:
/// a live vmfactory process.
pub fn starting_server(endpoint: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(crate::lock::lock_file_of(endpoint)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("vmfactory")
        .then_some(pid)
}

/// Takes the lock of `endpoint` (`<endpoint>.lock`), refusing at once, with the holder's
/// pid, while another server holds it. Hold it for the server's whole life.
pub fn lock_endpoint(endpoint: &Path) -> Result<PathLock, VmCacheError> {
    Ok(PathLock::acquire(endpoint, LockKind::Endpoint)?)
}

/// [`serve`] with the endpoint's lock already held by the caller (taken before it
/// started filling its cache, so a second server is refused before it boots anything).
pub async fn serve_locked(
    factory: Arc<dyn FactoryBase>,
    endpoint: &Path,
    lock: &PathLock,
    shutdown: Arc<Notify>,
) -> Result<(), VmCacheError> {
    serve_locked_with_grace(
        factory,
        endpoint,
        lock,
        shutdown,
        HANDOVER_GRACE,
        MAX_UNADOPTED,
    )
    .await
}

/// How long a client has to take over ([`Vm::adopt`]) a VM it was handed before the
/// server stops the VM: a client that died or dropped the answer would otherwise leave
/// a running QEMU nobody owns for the server's whole life.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(30);

/// The most VMs handed out and not yet adopted at once. A client that keeps asking for
/// VMs without adopting them (a bug, or one that dies each time) would otherwise make the
/// server keep up to a grace's worth of refills running for nobody; past this,
/// `GetBaseVM` answers `RESOURCE_EXHAUSTED` until adopters or the reclaimer catch up.
/// Clients adopt within milliseconds of their answer, so only VMs nobody takes count;
/// calls waiting for a VM do not (however many clients ask at once).
pub const MAX_UNADOPTED: usize = 32;

/// [`serve_locked`] with the time clients get to adopt their VMs and the most VMs that
/// may wait for their adopter at once.
pub async fn serve_locked_with_grace(
    factory: Arc<dyn FactoryBase>,
    endpoint: &Path,
    _lock: &PathLock,
    shutdown: Arc<Notify>,
    grace: Duration,
    max_unadopted: usize,
) -> Result<(), VmCacheError> {
    let listener = bind(endpoint).await?;
    info!(endpoint = %endpoint.display(), pid = std::process::id(), "VMCache server listening");
    let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reclaimer = tokio::spawn(reclaim_unadopted(factory.clone(), handed.clone(), grace));
    let service = CacheServer {
        factory,
        shutdown: shutdown.clone(),
        handed,
        max_unadopted,
        grace,
    };
    // Each connection goes through the `:authority` fix-up that gRPC C-core clients need.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |connection| connection.map(authority::AuthorityFilterStream::new),
    );
    // Keepalive pings close the connections of clients that vanished or froze.
    let result = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CALLS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION as usize)
        .add_service(CacheServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.notified())
        .await;
    reclaimer.abort();
    let _ = std::fs::remove_file(endpoint);
    result.map_err(|err| VmCacheError::Serve(err.to_string()))
}

async fn bind(endpoint: &Path) -> Result<UnixListener, VmCacheError> {
    let io = |action: &'static str| {
        move |source| VmCacheError::Io {
            action,
            path: endpoint.to_path_buf(),
            source,
        }
    };
    // The endpoint's directory exists: taking its lock (`lock_endpoint`, before the
    // server made anything) created it, ours alone.
    match crate::socket::probe(endpoint).await {
        SocketAt::Nothing => {}
        SocketAt::NotASocket => return Err(VmCacheError::NotASocket(endpoint.to_path_buf())),
        SocketAt::Answered => return Err(VmCacheError::AlreadyRunning(endpoint.to_path_buf())),
        // Under the endpoint's lock: no live server of ours can be there.
        SocketAt::Refused | SocketAt::Unanswered(_) => {
            warn!(endpoint = %endpoint.display(), "Removing the stale socket of a dead VMCache server");
            std::fs::remove_file(endpoint).map_err(io("Cannot remove the stale socket"))?;
        }
    }
    let listener = UnixListener::bind(endpoint).map_err(io("Cannot listen on"))?;
    std::fs::set_permissions(endpoint, std::fs::Permissions::from_mode(0o600))
        .map_err(io("Cannot restrict the permissions of"))?;
    Ok(listener)
}

/// VMs handed over, with when: checked by [`reclaim_unadopted`] and the admission limit.
type Handed = Arc<std::sync::Mutex<Vec<(HandOverRecord, Instant)>>>;

#[derive(Debug)]
struct CacheServer {
    factory: Arc<dyn FactoryBase>,
    shutdown: Arc<Notify>,
    handed: Handed,
    max_unadopted: usize,
    /// How long a client has to adopt its VM.
    grace: Duration,
}

impl CacheServer {
    /// Refuses another hand-out while `max_unadopted` VMs handed out wait for their
    /// adopter (adopted ones are forgotten on the way). Calls waiting for a VM are not
    /// counted, so the limit can be passed by as many as arrive at once; it bounds what
    /// a client that never adopts can pile up, not concurrency.
    fn check_unadopted(&self) -> Result<(), Status> {
        let backend = self.factory.backend();
        let mut handed = self
            .handed
            .lock()
            .map_err(|_| Status::internal("The hand-out list is poisoned"))?;
        handed.retain(|(record, _)| backend.awaiting_adoption(&record.hypervisor));
        if handed.len() >= self.max_unadopted {
            return Err(Status::resource_exhausted(format!(
                "{} VMs handed out wait for their client to take them over (at most {} \
                 may): a client asks for VMs without adopting them; they are stopped {} s \
                 after their hand-out",
                handed.len(),
                self.max_unadopted,
                self.grace.as_secs()
            )));
        }
        Ok(())
    }
}

/// Stops every VM handed over at least `grace` ago that no client has adopted.
async fn reclaim_unadopted(factory: Arc<dyn FactoryBase>, handed: Handed, grace: Duration) {
    let mut ticks =
        tokio::time::interval((grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let due: Vec<HandOverRecord> = match handed.lock() {
            Ok(mut handed) => {
                let (due, waiting) = handed.drain(..).partition(|(_, at)| at.elapsed() >= grace);
                *handed = waiting;
                due.into_iter().map(|(record, _)| record).collect()
            }
            Err(_) => return,
        };
        for record in due {
            if factory.backend().reclaim(&record.hypervisor).await {
                if let Some(observer) = factory.observer() {
                    observer.reclaimed();
                }
                warn!(
                    id = record.id,
                    grace_s = grace.as_secs_f64(),
                    "No client took over this handed-out VM in time: stopped it"
                );
            }
        }
    }
}

#[tonic::async_trait]
impl CacheService for CacheServer {
    async fn config(&self, _request: Request<()>) -> Result<Response<GrpcVmConfig>, Status> {
        let data = serde_json::to_vec(self.factory.config())
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(GrpcVmConfig {
            data,
            agent_config: b"{}".to_vec(),
        }))
    }

    async fn get_base_vm(&self, _request: Request<()>) -> Result<Response<GrpcVm>, Status> {
        let failed = |err: &dyn std::fmt::Display| {
            if let Some(observer) = self.factory.observer() {
                observer.handout_failed();
            }
            Status::unavailable(err.to_string())
        };
        self.check_unadopted().inspect_err(|_| {
            if let Some(observer) = self.factory.observer() {
                observer.handout_failed();
            }
        })?;
        let vm = self
            .factory
            .get_base_vm()
            .await
            .map_err(|err| failed(&err))?;
        // Resumed here, on the server's live QMP session, so the guest already runs when
        // the client's hand-out arrives; the client sends no `cont` of its own.
        let record = vm
            .resume_and_hand_over()
            .await
            .map_err(|err| failed(&err))?;
        info!(id = record.id, "VM handed over");
        if let Some(observer) = self.factory.observer() {
            observer.delivered();
        }
        let message = grpc_vm(&record);
        if let Ok(mut handed) = self.handed.lock() {
            handed.push((record, Instant::now()));
        }
        Ok(Response::new(message))
    }

    async fn status(&self, _request: Request<()>) -> Result<Response<GrpcStatus>, Status> {
        let vmstatus = self
            .factory
            .status()
            .await
            .into_iter()
            .map(|vm| GrpcVmStatus {
                pid: i64::from(vm.pid),
                cpu: vm.cpu,
                memory: vm.memory_mib,
            })
            .collect();
        Ok(Response::new(GrpcStatus {
            pid: i64::from(std::process::id()),
            vmstatus,
        }))
    }

    async fn quit(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        info!("Quit requested");
        // notify_one stores a permit, so a shutdown future polled later still sees it.
        self.shutdown.notify_one();
        Ok(Response::new(()))
    }
}

/// Kata's `GrpcVM` for a handed-over VM: the Kata fields filled from the record, and the
/// whole record (JSON) in `hypervisor`, where Kata puts its hypervisor's own description.
pub fn grpc_vm(record: &HandOverRecord) -> GrpcVm {
    GrpcVm {
        id: record.id.clone(),
        hypervisor: record.to_json(),
        proxy_pid: 0,
        proxy_url: String::new(),
        cpu: record.cpu,
        memory: record.memory_mib,
        cpu_delta: record.cpu_delta,
    }
}

/// The hand-over record in a `GrpcVM`, checked against the message's own fields.
pub fn record_of(vm: &GrpcVm) -> Result<HandOverRecord, VmError> {
    let record = HandOverRecord::from_json(&vm.hypervisor)?;
    if record.id != vm.id || record.hypervisor.id() != vm.id {
        return Err(VmError::Remote(format!(
            "The hand-over record describes VM {:?}, the message VM {:?}",
            record.id, vm.id
        )));
    }
    Ok(record)
}

/// A gRPC client of a VMCache server.
pub async fn connect(endpoint: &Path) -> Result<CacheServiceClient<Channel>, VmCacheError> {
    let path = endpoint.to_path_buf();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    let channel = Endpoint::from_static("http://vmcache")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|err| VmCacheError::NotRunning {
            path: endpoint.to_path_buf(),
            reason: err.to_string(),
        })?;
    Ok(CacheServiceClient::new(channel))
}

/// Server pid and its cached VMs.
pub async fn status(endpoint: &Path) -> Result<(u32, Vec<VmStatus>), VmCacheError> {
    let mut client = connect(endpoint).await?;
    let status = client
        .status(())
        .await
        .map_err(|status| VmCacheError::Rpc {
            rpc: "Status",
            status,
        })?
        .into_inner();
    let vms = status
        .vmstatus
        .into_iter()
        .map(|vm| VmStatus {
            pid: u32::try_from(vm.pid).unwrap_or(0),
            cpu: vm.cpu,
            memory_mib: vm.memory,
        })
        .collect();
    Ok((u32::try_from(status.pid).unwrap_or(0), vms))
}

/// Asks the server to quit.
pub async fn quit(endpoint: &Path) -> Result<(), VmCacheError> {
    let mut client = connect(endpoint).await?;
    client.quit(()).await.map_err(|status| VmCacheError::Rpc {
        rpc: "Quit",
        status,
    })?;
    Ok(())
}

/// The client side of VMCache as a factory: each base VM is taken over from the server.
#[derive(Debug)]
pub struct GrpcCacheFactory {
    client: CacheServiceClient<Channel>,
    endpoint: PathBuf,
    config: VmConfig,
    backend: Arc<dyn Backend>,
}

impl GrpcCacheFactory {
    /// Connects to the server at `endpoint` and fetches its VM config (Kata's `Config`);
    /// VMs are adopted with the backend that config names.
    pub async fn connect(endpoint: &Path) -> Result<Self, VmCacheError> {
        let (client, config) = Self::config_of(endpoint).await?;
        let backend = config.backend();
        Ok(Self {
            client,
            endpoint: endpoint.to_path_buf(),
            config,
            backend,
        })
    }

    /// Like [`GrpcCacheFactory::connect`], adopting VMs with `backend`.
    pub async fn connect_with_backend(
        endpoint: &Path,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, VmCacheError> {
        let (client, config) = Self::config_of(endpoint).await?;
        Ok(Self {
            client,
            endpoint: endpoint.to_path_buf(),
            config,
            backend,
        })
    }

    async fn config_of(
        endpoint: &Path,
    ) -> Result<(CacheServiceClient<Channel>, VmConfig), VmCacheError> {
        let mut client = connect(endpoint).await?;
        let response = client
            .config(())
            .await
            .map_err(|status| VmCacheError::NotRunning {
                path: endpoint.to_path_buf(),
                reason: status.message().to_string(),
            })?
            .into_inner();
        let config: VmConfig =
            serde_json::from_slice(&response.data).map_err(|err| VmCacheError::Invalid {
                what: "VM config",
                detail: err.to_string(),
            })?;
        Ok((client, config))
    }
}

impl GrpcCacheFactory {
    /// The error of a failed call: the server's own answer, or, when the transport broke
    /// (the status carries a transport error as its source), [`VmCacheError::Gone`].
    fn call_failed(&self, status: Status) -> FactoryError {
        if std::error::Error::source(&status).is_some() {
            return FactoryError::VmCache(Box::new(VmCacheError::Gone {
                path: self.endpoint.clone(),
                reason: status.message().to_string(),
            }));
        }
        VmError::Remote(status.message().to_string()).into()
    }
}

#[async_trait]
impl FactoryBase for GrpcCacheFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        let vm = self
            .client
            .clone()
            .get_base_vm(())
            .await
            .map_err(|status| self.call_failed(status))?
            .into_inner();
        let record = record_of(&vm)?;
        Ok(Vm::adopt(self.backend.as_ref(), record).await?)
    }

    async fn close(&self) -> Result<(), FactoryError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_refuses_a_file_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cache.sock");
        std::fs::write(&file, b"not a socket").expect("file");
        let err = bind(&file).await.expect_err("a regular file");
        assert!(matches!(err, VmCacheError::NotASocket(_)), "{err}");
        assert!(err.to_string().contains("is not a Unix socket"), "{err}");
        assert_eq!(std::fs::read(&file).expect("kept"), b"not a socket");

        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("socket"));
        let listener = bind(&stale).await.expect("a stale socket is replaced");
        let err = bind(&stale).await.expect_err("a live one is not");
        assert!(matches!(err, VmCacheError::AlreadyRunning(_)), "{err}");
        drop(listener);
    }

    #[tokio::test]
    async fn a_second_server_is_refused_by_the_lock_naming_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = dir.path().join("cache.sock");
        let held = lock_endpoint(&endpoint).expect("first server");
        let err = lock_endpoint(&endpoint).expect_err("second server");
        let message = err.to_string();
        assert!(
            message.contains(&format!("vmfactory process {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("vmfactory factory destroy"), "{message}");
        drop(held);
        drop(lock_endpoint(&endpoint).expect("free once the first is gone"));
    }
}
