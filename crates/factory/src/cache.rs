//! The cache factory: keeps `size` base VMs ready, refilled in the background.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::base::{FactoryBase, FactoryError, VmStatus};
use crate::config::VmConfig;
use crate::vm::Vm;

/// How often ready VMs are checked for a dead hypervisor.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// `size` ready VMs from a base factory. A dead VM is discarded and replaced, never
/// handed out; `close` stops the refill tasks and every ready VM.
#[derive(Debug)]
pub struct CacheFactory {
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    warm_up: bool,
    base: Arc<dyn FactoryBase>,
    ready: Mutex<VecDeque<Vm>>,
    /// One permit per empty place in the cache.
    free: Semaphore,
    /// Signalled when a VM becomes ready or the cache closes.
    filled: Notify,
    closed: AtomicBool,
}

impl CacheFactory {
    /// Starts filling a cache of `size` VMs from `base` (one refill task per place).
    pub fn new(base: Arc<dyn FactoryBase>, size: usize) -> Self {
        Self::with_warm_up(base, size, false)
    }

    /// Like [`CacheFactory::new`]; with `warm_up`, every VM is warmed (see
    /// [`Vm::warm_up`]) before it is cached.
    pub fn with_warm_up(base: Arc<dyn FactoryBase>, size: usize, warm_up: bool) -> Self {
        let shared = Arc::new(Shared {
            warm_up,
            base,
            ready: Mutex::new(VecDeque::new()),
            free: Semaphore::new(size),
            filled: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let mut tasks: Vec<JoinHandle<()>> = (0..size)
            .map(|_| tokio::spawn(refill(shared.clone())))
            .collect();
        tasks.push(tokio::spawn(watch(shared.clone())));
        Self {
            shared,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    /// VMs ready right now.
    pub async fn ready_count(&self) -> usize {
        self.shared.ready.lock().await.len()
    }
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Produces VMs while there is room, until the cache closes.
async fn refill(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        let Ok(permit) = shared.free.acquire().await else {
            return; // closed
        };
        if shared.is_closed() {
            return;
        }
        let made = match shared.base.get_base_vm().await {
            Ok(mut vm) if shared.warm_up => match vm.warm_up().await {
                Ok(()) => Ok(vm),
                Err(err) => {
                    let _ = vm.stop().await;
                    Err(FactoryError::from(err))
                }
            },
            other => other,
        };
        match made {
            Ok(vm) => {
                failures = 0;
                if shared.is_closed() {
                    let _ = vm.stop().await;
                    return;
                }
                permit.forget();
                shared.ready.lock().await.push_back(vm);
                shared.filled.notify_one();
            }
            Err(err) => {
                drop(permit);
                failures += 1;
                warn!(%err, "Cannot make a VM for the cache");
                let backoff = Duration::from_millis(200 * u64::from(failures.min(25)));
                tokio::time::sleep(backoff).await;
                if shared.is_closed() {
                    return;
                }
            }
        }
    }
}

/// Discards ready VMs whose hypervisor died, freeing their place for a new one.
async fn watch(shared: Arc<Shared>) {
    while !shared.is_closed() {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let dead: Vec<Vm> = {
            let mut ready = shared.ready.lock().await;
            let (alive, dead): (VecDeque<Vm>, VecDeque<Vm>) =
                ready.drain(..).partition(|vm| vm.hypervisor().is_running());
            *ready = alive;
            dead.into()
        };
        for vm in dead {
            warn!(id = vm.id(), "A cached VM died; replacing it");
            let _ = vm.stop().await;
            shared.free.add_permits(1);
        }
    }
}

#[async_trait]
impl FactoryBase for CacheFactory {
    fn config(&self) -> &VmConfig {
        self.shared.base.config()
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        loop {
            if self.shared.is_closed() {
                return Err(FactoryError::Closed);
            }
            let notified = self.shared.filled.notified();
            let taken = self.shared.ready.lock().await.pop_front();
            match taken {
                Some(vm) if vm.hypervisor().is_running() => {
                    self.shared.free.add_permits(1);
                    debug!(id = vm.id(), "VM taken from the cache");
                    return Ok(vm);
                }
                Some(dead) => {
                    warn!(id = dead.id(), "Discarding a dead cached VM");
                    let _ = dead.stop().await;
                    self.shared.free.add_permits(1);
                }
                None => notified.await,
            }
        }
    }

    async fn status(&self) -> Vec<VmStatus> {
        self.shared
            .ready
            .lock()
            .await
            .iter()
            .map(|vm| VmStatus {
                pid: vm.pid().unwrap_or(0),
                cpu: vm.cpu,
                memory_mib: vm.memory_mib,
            })
            .collect()
    }

    async fn close(&self) -> Result<(), FactoryError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.free.close();
        self.shared.filled.notify_waiters();
        let tasks = self
            .tasks
            .lock()
            .map(|mut tasks| std::mem::take(&mut *tasks))
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        let vms: Vec<Vm> = self.shared.ready.lock().await.drain(..).collect();
        for vm in vms {
            let _ = vm.stop().await;
        }
        self.shared.base.close().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use vmfactory_hypervisor::mock::{MockControl, MockHypervisor};
    use vmfactory_hypervisor::{Hypervisor, MemoryBackend};

    use super::*;
    use crate::agent_client::AgentClient;

    /// Makes mock VMs, optionally slowly, and remembers their controls.
    #[derive(Debug)]
    struct MockFactory {
        config: VmConfig,
        made: AtomicUsize,
        delay: Duration,
        controls: std::sync::Mutex<Vec<Arc<MockControl>>>,
    }

    impl MockFactory {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                config: VmConfig::default(),
                made: AtomicUsize::new(0),
                delay,
                controls: std::sync::Mutex::new(Vec::new()),
            })
        }

        fn controls(&self) -> Vec<Arc<MockControl>> {
            self.controls.lock().expect("lock").clone()
        }
    }

    #[async_trait]
    impl FactoryBase for MockFactory {
        fn config(&self) -> &VmConfig {
            &self.config
        }

        async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
            tokio::time::sleep(self.delay).await;
            let n = self.made.fetch_add(1, Ordering::SeqCst);
            let spec = self.config.spec(format!("mock{n}"), MemoryBackend::Memfd);
            let (hypervisor, control) =
                MockHypervisor::start(&spec).map_err(|err| FactoryError::Vm(err.into()))?;
            self.controls.lock().expect("lock").push(control);
            let agent = AgentClient::connect_lazy(&hypervisor.agent_socket());
            Ok(Vm::from_parts(Box::new(hypervisor), agent, 1, 256))
        }

        async fn status(&self) -> Vec<VmStatus> {
            Vec::new()
        }

        async fn close(&self) -> Result<(), FactoryError> {
            Ok(())
        }
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
    async fn get_waits_for_the_next_vm_and_close_ends_slow_refills() {
        let base = MockFactory::new(Duration::from_millis(200));
        let cache = Arc::new(CacheFactory::new(base.clone(), 1));
        let vm = cache.get_base_vm().await.expect("waited for a VM");
        assert!(vm.hypervisor().is_running());
        // A refill is now in flight; close must wait for it and stop what it made.
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.close().await.expect("close");
        assert!(matches!(
            cache.get_base_vm().await,
            Err(FactoryError::Closed)
        ));
        let controls = base.controls();
        assert_eq!(controls.len(), 2);
        assert!(
            controls[1].is_stopped(),
            "the VM made during close was stopped"
        );
        assert!(
            !controls[0].is_stopped(),
            "the handed-out VM belongs to its taker"
        );
    }
}
