//! The cache factory: keeps `size` base VMs ready in a [`ReadyPool`], refilled in the
//! background.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;
use vmfactory_hypervisor::Backend;

use crate::base::{FactoryBase, FactoryError, VmStatus};
use crate::config::VmConfig;
use crate::pool::{Maker, PoolObserver, ReadyPool};
use crate::vm::Vm;

/// How long a handed-out VM's replacement waits while other VMs are still cached: making
/// one (a clone loaded, its guest warmed up) keeps a core busy for a few hundred ms under
/// TCG, and started at once it slows the hand-out and first commands of the VM just taken
/// (measured with `bench getvm`, 1 client on 2 cores: ready median 16-24 ms at once,
/// 7-9 ms with 30-100 ms of grace; 8 clients: p99 129 ms at once, 43 ms with 100 ms;
/// the refill rate did not change).
pub const REFILL_GRACE: Duration = Duration::from_millis(100);

/// `size` ready VMs from a base factory. A dead VM is discarded and replaced, never
/// handed out; `close` stops the refill and every ready VM, then the base factory.
#[derive(Debug)]
pub struct CacheFactory {
    base: Arc<dyn FactoryBase>,
    pool: ReadyPool<Vm>,
    observer: Option<Arc<dyn PoolObserver>>,
}

impl CacheFactory {
    /// Starts filling a cache of `size` VMs from `base`.
    pub fn new(base: Arc<dyn FactoryBase>, size: usize) -> Self {
        Self::with_warm_up(base, size, false)
    }

    /// Like [`CacheFactory::new`]; with `warm_up`, every VM is warmed (see
    /// [`Vm::warm_up`]) before it is cached.
    pub fn with_warm_up(base: Arc<dyn FactoryBase>, size: usize, warm_up: bool) -> Self {
        Self::start(base, size, warm_up, None)
    }

    /// Like [`CacheFactory::with_warm_up`], telling `observer` (metrics) what happens.
    pub fn start(
        base: Arc<dyn FactoryBase>,
        size: usize,
        warm_up: bool,
        observer: Option<Arc<dyn PoolObserver>>,
    ) -> Self {
        let maker_base = base.clone();
        let maker: Maker<Vm> = Arc::new(move || {
            let base = maker_base.clone();
            Box::pin(async move {
                let mut vm = base.get_base_vm().await?;
                // A clone from a template's warm pool comes warmed up already.
                if warm_up && !vm.is_warmed() {
                    if let Err(err) = vm.warm_up().await {
                        let _ = vm.stop().await;
                        return Err(err.into());
                    }
                }
                Ok(vm)
            })
        });
        let pool = ReadyPool::start_observed("cache", size, maker, observer.clone(), REFILL_GRACE);
        Self {
            base,
            pool,
            observer,
        }
    }

    /// VMs ready right now.
    pub async fn ready_count(&self) -> usize {
        self.pool.ready_count().await
    }
}

#[async_trait]
impl FactoryBase for CacheFactory {
    fn config(&self) -> &VmConfig {
        self.base.config()
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        self.base.backend()
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        let vm = self.pool.take().await?;
        debug!(id = vm.id(), "VM taken from the cache");
        Ok(vm)
    }

    async fn status(&self) -> Vec<VmStatus> {
        self.pool
            .map_ready(|vm| VmStatus {
                pid: vm.pid().unwrap_or(0),
                cpu: vm.cpu,
                memory_mib: vm.memory_mib,
            })
            .await
    }

    async fn close(&self) -> Result<(), FactoryError> {
        self.pool.close().await;
        self.base.close().await
    }

    fn observer(&self) -> Option<Arc<dyn PoolObserver>> {
        self.observer.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use vmfactory_hypervisor::mock::{MockBackend, MockControl};
    use vmfactory_hypervisor::MemoryBackend;

    use super::*;

    /// Makes mock VMs, optionally slowly, and remembers their controls.
    #[derive(Debug)]
    struct MockFactory {
        config: VmConfig,
        made: AtomicUsize,
        delay: Duration,
        backend: Arc<dyn Backend>,
        mock: MockBackend,
        _dir: tempfile::TempDir,
    }

    impl MockFactory {
        fn new(delay: Duration) -> Arc<Self> {
            let dir = tempfile::tempdir().expect("tempdir");
            let kernel = dir.path().join("kernel");
            std::fs::write(&kernel, b"k").expect("kernel");
            let mock = MockBackend::new(dir.path(), None);
            Arc::new(Self {
                config: VmConfig {
                    kernel,
                    ..VmConfig::default()
                },
                made: AtomicUsize::new(0),
                delay,
                backend: Arc::new(mock.clone()),
                mock,
                _dir: dir,
            })
        }

        /// One whose every VM fails to start (mock VMs need vCPUs).
        fn failing() -> Arc<Self> {
            let mut factory = Self::new(Duration::ZERO);
            if let Some(factory) = Arc::get_mut(&mut factory) {
                factory.config.vcpus = 0;
            }
            factory
        }

        fn controls(&self) -> Vec<Arc<MockControl>> {
            self.mock.controls().into_iter().map(|(_, c)| c).collect()
        }
    }

    #[async_trait]
    impl FactoryBase for MockFactory {
        fn config(&self) -> &VmConfig {
            &self.config
        }

        fn backend(&self) -> &Arc<dyn Backend> {
            &self.backend
        }

        async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
            tokio::time::sleep(self.delay).await;
            let n = self.made.fetch_add(1, Ordering::SeqCst);
            let spec = self.config.spec(format!("mock{n}"), MemoryBackend::Memfd);
            let hypervisor = self
                .backend
                .boot(&spec)
                .await
                .map_err(|err| FactoryError::Vm(err.into()))?;
            Ok(Vm::from_hypervisor(hypervisor, 1, 256))
        }

        async fn status(&self) -> Vec<VmStatus> {
            Vec::new()
        }

        async fn close(&self) -> Result<(), FactoryError> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_out_that_fails_is_answered_unavailable_and_counted() {
        let metrics = Arc::new(crate::metrics::FactoryMetrics::default());
        let cache = Arc::new(CacheFactory::start(
            MockFactory::failing(),
            1,
            false,
            Some(metrics.clone()),
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = dir.path().join("cache.sock");
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let lock = crate::vmcache::lock_endpoint(&endpoint).expect("lock");
        let server = tokio::spawn({
            let (cache, endpoint, shutdown) = (cache.clone(), endpoint.clone(), shutdown.clone());
            async move { crate::vmcache::serve_locked(cache, &endpoint, &lock, shutdown).await }
        });
        let mut client = loop {
            if let Ok(client) = crate::vmcache::connect(&endpoint).await {
                break client;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The cache's maker fails every time: once it has failed often enough in a row,
        // the waiting call gets the error.
        let status = tokio::time::timeout(Duration::from_secs(30), client.get_base_vm(()))
            .await
            .expect("answered")
            .expect_err("no VM can be made");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        let text = metrics.encode();
        assert!(
            text.contains("vmfactory_handout_failures_total 1"),
            "{text}"
        );
        assert!(text.contains("vmfactory_handouts_total 0"), "{text}");
        shutdown.notify_one();
        server.await.expect("join").expect("serve");
        cache.close().await.expect("close");
    }

    async fn wait_ready(cache: &CacheFactory, count: usize) {
        for _ in 0..500 {
            if cache.ready_count().await >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("cache never reached {count} VMs");
    }

    #[tokio::test]
    async fn fills_hands_out_and_refills() {
        let base = MockFactory::new(Duration::from_millis(1));
        let cache = CacheFactory::new(base.clone(), 3);
        wait_ready(&cache, 3).await;
        assert_eq!(cache.status().await.len(), 3);
        let vm = cache.get_base_vm().await.expect("vm");
        assert_eq!(vm.cpu, 1);
        wait_ready(&cache, 3).await;
        assert_eq!(base.made.load(Ordering::SeqCst), 4, "exactly one refill");
        cache.close().await.expect("close");
        let stopped = base.controls().iter().filter(|c| c.is_stopped()).count();
        assert_eq!(
            stopped, 3,
            "close stops every ready VM, not the handed-out one"
        );
    }

    #[tokio::test]
    async fn a_dead_vm_is_replaced_and_never_handed_out() {
        let base = MockFactory::new(Duration::from_millis(1));
        let cache = CacheFactory::new(base.clone(), 2);
        wait_ready(&cache, 2).await;
        let first = base.controls()[0].clone();
        first.crash();
        // The watcher notices and a refill task replaces it.
        for _ in 0..300 {
            if base.made.load(Ordering::SeqCst) == 3 && cache.ready_count().await == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(base.made.load(Ordering::SeqCst), 3);
        for _ in 0..2 {
            let vm = cache.get_base_vm().await.expect("vm");
            assert!(vm.hypervisor().is_running(), "a dead VM was handed out");
        }
        cache.close().await.expect("close");
    }

    #[tokio::test]
    async fn get_waits_for_the_next_vm_and_close_abandons_slow_refills() {
        let base = MockFactory::new(Duration::from_millis(200));
        let cache = Arc::new(CacheFactory::new(base.clone(), 1));
        let vm = cache.get_base_vm().await.expect("waited for a VM");
        assert!(vm.hypervisor().is_running());
        // A refill is now in flight (it would make its VM 150 ms later); close abandons it
        // instead of waiting for it (a real make drops its QEMU handle, killing the VM).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let closing = std::time::Instant::now();
        cache.close().await.expect("close");
        assert!(
            closing.elapsed() < Duration::from_millis(150),
            "close waited for the refill"
        );
        assert!(matches!(
            cache.get_base_vm().await,
            Err(FactoryError::Closed)
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let controls = base.controls();
        assert_eq!(controls.len(), 1, "the abandoned refill made no VM");
        assert!(
            !controls[0].is_stopped(),
            "the handed-out VM belongs to its taker"
        );
    }
}
