//! Prometheus metrics of a VMCache server (`[factory] metrics_address`): VMs ready,
//! hand-outs and their latency, refill failures, dead VMs replaced, and the template's
//! age, served as text on `GET /metrics` over TCP or a Unix socket.

use std::convert::Infallible;
use std::net::SocketAddr;
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
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::pool::PoolObserver;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is neither `HOST:PORT` nor a Unix socket path.
    #[error("Invalid metrics address {0:?}: use 127.0.0.1:PORT or a Unix socket path (/run/…/metrics.sock or unix:/…)")]
    Address(String),
    /// The endpoint could not be opened.
    #[error("Cannot serve metrics on {address}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    handouts: Counter,
    handout_seconds: Histogram,
    refill_failures: Counter,
    dead_replaced: Counter,
    template_age: Gauge<f64, AtomicU64>,
    template_created: Mutex<Option<SystemTime>>,
}

impl Default for FactoryMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vmfactory");
        let vms_ready = Gauge::default();
        let handouts = Counter::default();
        // 1 ms to ~16 s.
        let handout_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let refill_failures = Counter::default();
        let dead_replaced = Counter::default();
        let template_age = Gauge::<f64, AtomicU64>::default();
        registry.register("vms_ready", "VMs ready in the cache", vms_ready.clone());
        registry.register("handouts", "VMs handed out (GetBaseVM)", handouts.clone());
        registry.register(
            "handout_seconds",
            "Time from a GetBaseVM request to the VM handed over",
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
            "template_age_seconds",
            "Age of the template the cache clones (0 without a template)",
            template_age.clone(),
        );
        Self {
            registry,
            vms_ready,
            handouts,
            handout_seconds,
            refill_failures,
            dead_replaced,
            template_age,
            template_created: Mutex::new(None),
        }
    }
}

impl FactoryMetrics {
    /// Counts one hand-out that took `elapsed`.
    pub fn handed_out(&self, elapsed: Duration) {
        self.handouts.inc();
        self.handout_seconds.observe(elapsed.as_secs_f64());
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
        self.handed_out(elapsed);
    }
}

/// Serves `metrics` on `address` until `shutdown` is notified; removes its Unix socket.
pub async fn serve(
    metrics: Arc<FactoryMetrics>,
    address: &MetricsAddress,
    shutdown: Arc<Notify>,
) -> Result<(), MetricsError> {
    let listen_error = |source| MetricsError::Listen {
        address: address.to_string(),
        source,
    };
    info!(%address, "Serving metrics");
    match address {
        MetricsAddress::Tcp(socket) => {
            let listener = tokio::net::TcpListener::bind(socket)
                .await
                .map_err(listen_error)?;
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => answer(stream, metrics.clone()),
                        Err(err) => debug!(%err, "Metrics accept failed"),
                    },
                    () = shutdown.notified() => return Ok(()),
                }
            }
        }
        MetricsAddress::Unix(path) => {
            if path.exists() && tokio::net::UnixStream::connect(path).await.is_err() {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(listen_error)?;
            let served = loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => answer(stream, metrics.clone()),
                        Err(err) => debug!(%err, "Metrics accept failed"),
                    },
                    () = shutdown.notified() => break Ok(()),
                }
            };
            let _ = std::fs::remove_file(path);
            served
        }
    }
}

/// Answers one HTTP/1 connection: the metrics on `/metrics`, 404 elsewhere.
fn answer(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    metrics: Arc<FactoryMetrics>,
) {
    tokio::spawn(async move {
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

    #[tokio::test]
    async fn serves_counts_over_a_unix_socket() {
        let metrics = Arc::new(FactoryMetrics::default());
        metrics.handed_out(Duration::from_millis(12));
        metrics.ready(3);
        metrics.make_failed();
        metrics.set_template_created(SystemTime::now() - Duration::from_secs(60));
        let text = metrics.encode();
        assert!(text.contains("vmfactory_handouts_total 1"), "{text}");
        assert!(text.contains("vmfactory_vms_ready 3"), "{text}");
        assert!(text.contains("vmfactory_refill_failures_total 1"), "{text}");
        assert!(text.contains("vmfactory_handout_seconds_count 1"), "{text}");
        assert!(text.contains("vmfactory_template_age_seconds 6"), "{text}");

        let dir = tempfile::tempdir().expect("tempdir");
        let address = MetricsAddress::Unix(dir.path().join("metrics.sock"));
        let shutdown = Arc::new(Notify::new());
        let server = tokio::spawn({
            let (metrics, address, shutdown) = (metrics.clone(), address.clone(), shutdown.clone());
            async move { serve(metrics, &address, shutdown).await }
        });
        let path = dir.path().join("metrics.sock");
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("vmfactory_handouts_total 1"),
            "{response}"
        );
        shutdown.notify_one();
        server.await.expect("join").expect("serve");
        assert!(!path.exists(), "socket removed");
    }
}
