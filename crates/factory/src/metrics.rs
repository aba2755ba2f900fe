//! Prometheus metrics of a VMCache server (`[factory] metrics_address`): VMs ready,
//! hand-outs and their latency, refill failures, dead VMs replaced, and the template's
//! age, served as text on `GET /metrics` over TCP or a Unix socket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::pool::PoolObserver;
use crate::socket::SocketAt;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is neither `HOST:PORT` nor a Unix socket path.
    #[error("Invalid metrics address {0:?}: use 127.0.0.1:PORT or a Unix socket path (/run/…/metrics.sock or unix:/…)")]
    Address(String),
    /// The endpoint could not be opened.
    #[error("Cannot serve metrics on {address} ({reason}): set metrics_address to a free port, or to a socket path in a directory that exists")]
    Listen {
        /// The address.
        address: String,
        /// Why (in the message, before the advice).
        reason: std::io::Error,
    },
    /// A live process serves on the Unix socket path.
    #[error("Cannot serve metrics on {0}: a running process answers on it (another VMCache server?); stop it, or set metrics_address to another path")]
    InUse(PathBuf),
    /// The Unix socket path holds something else.
    #[error("Cannot serve metrics on {0}: it exists and is not a Unix socket; remove it or choose another metrics_address")]
    NotASocket(PathBuf),
}

/// Where metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// A TCP address, e.g. `127.0.0.1:9464`.
    Tcp(SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddress {
    type Err = MetricsError;

    fn from_str(text: &str) -> Result<Self, MetricsError> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Self::Unix(path.into()));
        }
        if text.starts_with('/') {
            return Ok(Self::Unix(text.into()));
        }
        text.parse()
            .map(Self::Tcp)
            .map_err(|_| MetricsError::Address(text.chars().take(200).collect()))
    }
}

impl std::fmt::Display for MetricsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => write!(f, "{address}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The metrics of one VMCache server.
#[derive(Debug)]
pub struct FactoryMetrics {
    registry: Registry,
    vms_ready: Gauge,
    vms_target: Gauge,
    handouts: Counter,
    handout_seconds: Histogram,
    refill_failures: Counter,
    dead_replaced: Counter,
    handout_failures: Counter,
    reclaimed: Counter,
    template_age: Gauge<f64, AtomicU64>,
    template_created: Mutex<Option<SystemTime>>,
}

impl Default for FactoryMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vmfactory");
        let vms_ready = Gauge::default();
        let vms_target = Gauge::default();
        let handouts = Counter::default();
        // 0.1 ms to ~13 s: a hand-out from a ready cache waits well under a millisecond.
        let handout_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let refill_failures = Counter::default();
        let dead_replaced = Counter::default();
        let handout_failures = Counter::default();
        let reclaimed = Counter::default();
        let template_age = Gauge::<f64, AtomicU64>::default();
        registry.register("vms_ready", "VMs ready in the cache", vms_ready.clone());
        registry.register(
            "vms_target",
            "VMs the cache keeps ready (vm_cache_number): alert on vms_ready below it",
            vms_target.clone(),
        );
        registry.register(
            "build",
            "The vmfactory that serves",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        registry.register(
            "handouts",
            "VMs handed out (GetBaseVM answered with a running VM)",
            handouts.clone(),
        );
        registry.register(
            "handout_seconds",
            "Time a GetBaseVM waited for a ready VM in the cache (about 0 while VMs are ready)",
            handout_seconds.clone(),
        );
        registry.register(
            "refill_failures",
            "Failed attempts to make a VM for the cache",
            refill_failures.clone(),
        );
        registry.register(
            "dead_vms_replaced",
            "Cached VMs found dead and replaced",
            dead_replaced.clone(),
        );
        registry.register(
            "handout_failures",
            "GetBaseVM calls answered with an error: no VM could be had, too many handed out wait for their adopter, or the one taken could not be resumed",
            handout_failures.clone(),
        );
        registry.register(
            "handouts_reclaimed",
            "VMs handed out that no client took over in time, stopped by the server",
            reclaimed.clone(),
        );
        registry.register(
            "template_age_seconds",
            "Age of the template the cache clones (0 without a template)",
            template_age.clone(),
        );
        Self {
            registry,
            vms_ready,
            vms_target,
            handouts,
            handout_seconds,
            refill_failures,
            dead_replaced,
            handout_failures,
            reclaimed,
            template_age,
            template_created: Mutex::new(None),
        }
    }
}

impl FactoryMetrics {
    /// Records that a `GetBaseVM` waited `elapsed` for a ready VM.
    pub fn waited(&self, elapsed: Duration) {
        self.handout_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts one VM handed out (resumed, its record sent).
    pub fn delivered(&self) {
        self.handouts.inc();
    }

    /// Sets how many VMs the cache keeps ready.
    pub fn set_target(&self, vms: u32) {
        self.vms_target.set(i64::from(vms));
    }

    /// Records when the template was created (its age is reported from then on).
    pub fn set_template_created(&self, created: SystemTime) {
        if let Ok(mut slot) = self.template_created.lock() {
            *slot = Some(created);
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let created = self.template_created.lock().ok().and_then(|slot| *slot);
        if let Some(age) = created.and_then(|c| SystemTime::now().duration_since(c).ok()) {
            self.template_age.set(age.as_secs_f64());
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl PoolObserver for FactoryMetrics {
    fn ready(&self, count: usize) {
        self.vms_ready.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn make_failed(&self) {
        self.refill_failures.inc();
    }

    fn dead_replaced(&self) {
        self.dead_replaced.inc();
    }

    fn taken(&self, elapsed: Duration) {
        self.waited(elapsed);
    }

    fn delivered(&self) {
        FactoryMetrics::delivered(self);
    }

    fn handout_failed(&self) {
        self.handout_failures.inc();
    }

    fn reclaimed(&self) {
        self.reclaimed.inc();
    }
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// Pause after a failed `accept` (out of descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound metrics endpoint, not yet serving.
#[derive(Debug)]
pub enum MetricsListener {
    /// A TCP port.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, with the identity of the file bound (removed at the end only while
    /// the path still names it).
    Unix {
        /// The socket.
        listener: tokio::net::UnixListener,
        /// Its path.
        path: std::path::PathBuf,
        /// Device and inode of the socket file bound.
        bound: Option<(u64, u64)>,
    },
}

/// Binds `address`, so that a port in use or a socket that cannot be made is an error
/// before anything says the metrics are served. A path that holds something other than
/// a socket is refused, not replaced; a dead socket is replaced.
pub async fn bind(address: &MetricsAddress) -> Result<MetricsListener, MetricsError> {
    let listen_error = |reason| MetricsError::Listen {
        address: address.to_string(),
        reason,
    };
    match address {
        MetricsAddress::Tcp(socket) => Ok(MetricsListener::Tcp(
            tokio::net::TcpListener::bind(socket)
                .await
                .map_err(listen_error)?,
        )),
        MetricsAddress::Unix(path) => {
            match crate::socket::probe(path).await {
                SocketAt::NotASocket => return Err(MetricsError::NotASocket(path.clone())),
                SocketAt::Answered => return Err(MetricsError::InUse(path.clone())),
                // Stale: nothing listens.
                SocketAt::Refused => {
                    let _ = std::fs::remove_file(path);
                }
                // A busy live server may answer EAGAIN: left alone, so the bind below
                // fails and says so.
                SocketAt::Nothing | SocketAt::Unanswered(_) => {}
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(listen_error)?;
            let bound = std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            Ok(MetricsListener::Unix {
                listener,
                path: path.clone(),
                bound,
            })
        }
    }
}

impl MetricsListener {
    /// Serves `metrics` until `shutdown` is notified; removes its Unix socket.
    pub async fn serve(self, metrics: Arc<FactoryMetrics>, shutdown: Arc<Notify>) {
        match self {
            MetricsListener::Tcp(listener) => {
                accept_until(
                    || async { listener.accept().await.map(|(stream, _)| stream) },
                    metrics,
                    shutdown,
                )
                .await;
            }
            MetricsListener::Unix {
                listener,
                path,
                bound,
            } => {
                accept_until(
                    || async { listener.accept().await.map(|(stream, _)| stream) },
                    metrics,
                    shutdown,
                )
                .await;
                // Removed only while the path still names the socket bound here.
                let still_ours = std::fs::symlink_metadata(&path)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                if bound.is_some() && bound == still_ours {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Accepts connections from `accept` and answers each, at most [`MAX_CONNECTIONS`] at
/// once, until `shutdown` is notified.
async fn accept_until<S, F, Fut>(accept: F, metrics: Arc<FactoryMetrics>, shutdown: Arc<Notify>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = shutdown.notified() => return,
        };
        tokio::select! {
            accepted = accept() => match accepted {
                Ok(stream) => answer(stream, metrics.clone(), slot),
                Err(err) => {
                    debug!(%err, "Metrics accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = shutdown.notified() => return,
        }
    }
}

/// Answers one HTTP/1 connection: the metrics on `/metrics`, 404 elsewhere.
fn answer(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    metrics: Arc<FactoryMetrics>,
    slot: OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let _slot = slot;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let metrics = metrics.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(metrics.encode())))
                } else {
                    Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::from_static(b"Not found: try /metrics\n")))
                };
                Ok::<_, Infallible>(response.unwrap_or_default())
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        if let Err(err) = tokio::time::timeout(Duration::from_secs(30), connection).await {
            debug!(%err, "Metrics connection timed out");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsAddress>().expect("tcp"),
            MetricsAddress::Tcp("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            "/run/m.sock".parse::<MetricsAddress>().expect("unix"),
            MetricsAddress::Unix("/run/m.sock".into())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddress>().expect("unix"),
            MetricsAddress::Unix("/run/m.sock".into())
        );
        assert!("localhost".parse::<MetricsAddress>().is_err());
    }

    /// `serve` on the Unix socket `path`, once the socket exists: its shutdown and task.
    async fn serving(
        metrics: Arc<FactoryMetrics>,
        path: &std::path::Path,
    ) -> (Arc<Notify>, tokio::task::JoinHandle<()>) {
        let address = MetricsAddress::Unix(path.to_path_buf());
        let shutdown = Arc::new(Notify::new());
        let listener = bind(&address).await.expect("bind");
        // Bound: the socket exists from here on.
        let server = tokio::spawn(listener.serve(metrics, shutdown.clone()));
        (shutdown, server)
    }

    /// The whole HTTP answer to `GET /metrics` on the Unix socket `path`.
    async fn get_metrics(path: PathBuf) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn serves_counts_over_a_unix_socket() {
        let metrics = Arc::new(FactoryMetrics::default());
        metrics.waited(Duration::from_millis(12));
        metrics.delivered();
        metrics.ready(3);
        metrics.make_failed();
        metrics.set_template_created(SystemTime::now() - Duration::from_secs(60));
        let text = metrics.encode();
        assert!(text.contains("vmfactory_handouts_total 1"), "{text}");
        assert!(text.contains("vmfactory_vms_ready 3"), "{text}");
        assert!(text.contains("vmfactory_refill_failures_total 1"), "{text}");
        assert!(text.contains("vmfactory_handout_seconds_count 1"), "{text}");
        assert!(text.contains("vmfactory_template_age_seconds 6"), "{text}");
        metrics.set_target(4);
        let text = metrics.encode();
        assert!(text.contains("vmfactory_vms_target 4"), "{text}");
        assert!(
            text.contains(&format!(
                "vmfactory_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.sock");
        let (shutdown, server) = serving(metrics.clone(), &path).await;
        let response = get_metrics(path.clone()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("vmfactory_handouts_total 1"),
            "{response}"
        );
        shutdown.notify_one();
        server.await.expect("join");
        assert!(!path.exists(), "socket removed");
    }

    #[tokio::test]
    async fn a_file_at_the_socket_path_is_refused_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("important.db");
        std::fs::write(&file, b"data").expect("write");
        let err = bind(&MetricsAddress::Unix(file.clone()))
            .await
            .expect_err("not a socket");
        assert!(matches!(err, MetricsError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&file).expect("kept"), b"data");
    }

    #[tokio::test]
    async fn a_port_in_use_is_refused_when_bound() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = MetricsAddress::Tcp(taken.local_addr().expect("addr"));
        let err = bind(&address).await.expect_err("a port in use");
        assert!(matches!(err, MetricsError::Listen { .. }), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = MetricsAddress::Unix(dir.path().join("no/such/dir/m.sock"));
        assert!(bind(&missing).await.is_err());
        // A socket something answers on is refused, naming the reason; a stale one is
        // replaced.
        let path = dir.path().join("m.sock");
        let live = tokio::net::UnixListener::bind(&path).expect("bind");
        let err = bind(&MetricsAddress::Unix(path.clone()))
            .await
            .expect_err("in use");
        assert!(matches!(err, MetricsError::InUse(_)), "{err}");
        drop(live);
        bind(&MetricsAddress::Unix(path))
            .await
            .expect("a stale socket is replaced");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_accept_errors_do_not_spin() {
        // Accepts that fail: the loop sleeps between them instead of spinning.
        let calls = Arc::new(AtomicU64::new(0));
        let shutdown = Arc::new(Notify::new());
        let looping = tokio::spawn({
            let (calls, shutdown) = (calls.clone(), shutdown.clone());
            async move {
                accept_until(
                    || {
                        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async { Err::<tokio::net::UnixStream, _>(std::io::Error::other("EMFILE")) }
                    },
                    Arc::new(FactoryMetrics::default()),
                    shutdown,
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(550)).await;
        shutdown.notify_one();
        looping.await.expect("join");
        let calls = calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!((2..=10).contains(&calls), "{calls} accepts in 550 ms");

        // Idle connections hold at most MAX_CONNECTIONS slots; the next one waits.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.sock");
        let (shutdown, server) = serving(Arc::new(FactoryMetrics::default()), &path).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(
                tokio::net::UnixStream::connect(&path)
                    .await
                    .expect("connect"),
            );
        }
        let waiting = tokio::spawn(get_metrics(path.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "answered beyond the connection limit"
        );
        drop(idle);
        let response = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("answered once slots are free")
            .expect("join");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        shutdown.notify_one();
        server.await.expect("join");
    }
}
