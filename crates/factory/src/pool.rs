//! [`ReadyPool`]: `size` things made ahead of demand and refilled in the background. The
//! template factory's warm pool (clones, warmed up) and the cache factory (whole VMs,
//! warmed up) are both one. A dead item is discarded and replaced,
//! never handed out; a failing maker backs off; `close` stops the refill and every item.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::base::FactoryError;

/// How often ready items are checked for a dead hypervisor.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Makes one refill task failed in a row after which a taker finding nothing ready gets
/// the error instead of waiting.
pub const FAILING_AFTER: u32 = 3;
/// Back-off after each consecutive failure of the maker, up to [`MAX_BACKOFF_STEPS`] times.
const BACKOFF_STEP: Duration = Duration::from_millis(200);
/// Cap of the back-off multiplier (5 s).
const MAX_BACKOFF_STEPS: u32 = 25;

/// Something a pool can hold.
#[async_trait]
pub trait Poolable: Send + Sync + 'static {
    /// Its id, for logs.
    fn pool_id(&self) -> String;
    /// False once its VM died.
    fn is_alive(&self) -> bool;
    /// Stops it for good.
    async fn discard(self);
}

/// Told what happens in a pool (metrics).
pub trait PoolObserver: Send + Sync + std::fmt::Debug {
    /// Items ready now.
    fn ready(&self, count: usize);
    /// The maker failed once.
    fn make_failed(&self);
    /// A ready item died and was replaced.
    fn dead_replaced(&self);
    /// An item was taken after waiting `elapsed`.
    fn taken(&self, elapsed: Duration) {
        let _ = elapsed;
    }
    /// A VMCache hand-out succeeded: the VM taken was resumed and its record sent.
    fn delivered(&self) {}
    /// A VMCache hand-out failed: no VM could be had, or it could not be resumed.
    fn handout_failed(&self) {}
    /// A VM handed out was adopted by no client in time and was stopped.
    fn reclaimed(&self) {}
}

/// The future a pool's maker returns.
pub type MakeFuture<T> = Pin<Box<dyn Future<Output = Result<T, FactoryError>> + Send>>;
/// Makes one item.
pub type Maker<T> = Arc<dyn Fn() -> MakeFuture<T> + Send + Sync>;

/// `size` items kept ready by one refill task per place plus a watcher.
pub struct ReadyPool<T: Poolable> {
    shared: Arc<Shared<T>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl<T: Poolable> std::fmt::Debug for ReadyPool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyPool")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

struct Shared<T> {
    name: &'static str,
    maker: Maker<T>,
    ready: Mutex<VecDeque<T>>,
    /// One permit per empty place.
    free: Semaphore,
    /// Signalled when an item becomes ready or the pool closes.
    filled: Notify,
    /// Signalled (to every waiter) when the pool closes: makes in flight are abandoned.
    closing: Notify,
    closed: AtomicBool,
    observer: Option<Arc<dyn PoolObserver>>,
    /// How long a taken item's place stays empty while other items are still ready.
    refill_grace: Duration,
    /// The grace applies even when nothing else is ready: nobody ever waits on this pool
    /// (it is only taken from with [`ReadyPool::try_take`]).
    grace_when_empty: AtomicBool,
    /// Set once a refill task's last [`FAILING_AFTER`] makes failed in a row: how many,
    /// and the last error; cleared by any make that succeeds.
    failing: std::sync::Mutex<Option<(u32, String)>>,
}

impl<T> Shared<T> {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// `work`'s output, or `None` (and `work` dropped) once the pool is closed, also when it
    /// already was.
    async fn until_closed<F: Future>(&self, work: F) -> Option<F::Output> {
        // Registered before the check, so a close in between still wakes us.
        let closing = self.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if self.is_closed() {
            return None;
        }
        tokio::select! {
            output = work => Some(output),
            () = &mut closing => None,
        }
    }

    /// The failures in a row and the last error, while a refill task keeps failing.
    fn failing(&self) -> Option<(u32, String)> {
        self.failing.lock().ok()?.clone()
    }

    fn set_failing(&self, failing: Option<(u32, String)>) {
        if let Ok(mut state) = self.failing.lock() {
            *state = failing;
        }
    }

    fn observe(&self, event: impl FnOnce(&dyn PoolObserver)) {
        if let Some(observer) = &self.observer {
            event(observer.as_ref());
        }
    }

    async fn report_ready(&self) {
        if self.observer.is_some() {
            let count = self.ready.lock().await.len();
            self.observe(|o| o.ready(count));
        }
    }
}

impl<T: Poolable> ReadyPool<T> {
    /// Starts filling a pool of `size` items made by `maker` (`name` appears in logs).
    /// Must be called within a tokio runtime.
    pub fn start(name: &'static str, size: usize, maker: Maker<T>) -> Self {
        Self::start_observed(name, size, maker, None, Duration::ZERO)
    }

    /// Like [`ReadyPool::start`], telling `observer` what happens. A taken item is
    /// replaced `refill_grace` later when other items are still ready (at once when none
    /// is): making one is CPU-heavy (a QEMU starting, a guest warming up), and on a small
    /// host it would compete with the taker's first moments with its item.
    pub fn start_observed(
        name: &'static str,
        size: usize,
        maker: Maker<T>,
        observer: Option<Arc<dyn PoolObserver>>,
        refill_grace: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            name,
            maker,
            ready: Mutex::new(VecDeque::new()),
            free: Semaphore::new(size),
            filled: Notify::new(),
            closing: Notify::new(),
            closed: AtomicBool::new(false),
            observer,
            refill_grace,
            grace_when_empty: AtomicBool::new(false),
            failing: std::sync::Mutex::new(None),
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

    /// For a pool nobody waits on (taken from with [`ReadyPool::try_take`] only, a taker
    /// finding it empty makes its own item): a taken item's replacement always waits out
    /// the refill grace, also when nothing else is ready, so it never competes with the
    /// taker's first moments.
    pub fn grace_even_when_empty(self) -> Self {
        self.shared.grace_when_empty.store(true, Ordering::SeqCst);
        self
    }

    /// Items ready right now.
    pub async fn ready_count(&self) -> usize {
        self.shared.ready.lock().await.len()
    }

    /// `f` of every ready item.
    pub async fn map_ready<R>(&self, f: impl Fn(&T) -> R) -> Vec<R> {
        self.shared.ready.lock().await.iter().map(f).collect()
    }

    /// A live ready item, if one is there now.
    pub async fn try_take(&self) -> Option<T> {
        loop {
            let (taken, others_ready) = self.pop_ready().await?;
            if let Some(item) = self.accept(taken, others_ready).await {
                return Some(item);
            }
        }
    }

    /// The first ready item, and whether others are still ready.
    async fn pop_ready(&self) -> Option<(T, bool)> {
        let mut ready = self.shared.ready.lock().await;
        let item = ready.pop_front()?;
        Some((item, !ready.is_empty()))
    }

    /// The next live item, waiting for one to be made; `Closed` once the pool closed,
    /// `Failing` when nothing is ready and the last [`FAILING_AFTER`] makes failed (a
    /// taker would wait for ever, and never learn why).
    pub async fn take(&self) -> Result<T, FactoryError> {
        let started = std::time::Instant::now();
        loop {
            if self.shared.is_closed() {
                return Err(FactoryError::Closed);
            }
            let notified = self.shared.filled.notified();
            match self.pop_ready().await {
                Some((item, others_ready)) => {
                    if let Some(item) = self.accept(item, others_ready).await {
                        self.shared.observe(|o| o.taken(started.elapsed()));
                        return Ok(item);
                    }
                }
                None => {
                    if let Some((failures, reason)) = self.shared.failing() {
                        return Err(FactoryError::Failing { failures, reason });
                    }
                    notified.await
                }
            }
        }
    }

    /// Frees the taken item's place; returns it if it is alive, else discards it. The
    /// place is freed before the first await: a taker cancelled from then on (a client
    /// gone mid-call) drops its item, but never its place, which would shrink the pool
    /// for good.
    async fn accept(&self, item: T, others_ready: bool) -> Option<T> {
        let alive = item.is_alive();
        self.free_place(alive, others_ready);
        self.shared.report_ready().await;
        if alive {
            return Some(item);
        }
        warn!(
            pool = self.shared.name,
            id = item.pool_id(),
            "Discarding a dead item"
        );
        item.discard().await;
        None
    }

    /// Frees a taken item's place: at once when the item was dead, the pool has no grace
    /// or nothing else is ready (a taker may be waiting), else after the grace.
    fn free_place(&self, alive: bool, others_ready: bool) {
        let grace = self.shared.refill_grace;
        let wait = others_ready || self.shared.grace_when_empty.load(Ordering::SeqCst);
        if !alive || grace.is_zero() || !wait {
            self.shared.free.add_permits(1);
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            shared.free.add_permits(1);
        });
    }

    /// Stops the refill and discards every ready item. Makes in flight are abandoned: their
    /// futures are dropped, which stops what they had made so far (a dropped QEMU handle
    /// kills its VM), so a close never waits for a slow or hung guest's warm-up.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.free.close();
        self.shared.filled.notify_waiters();
        self.shared.closing.notify_waiters();
        let tasks = self
            .tasks
            .lock()
            .map(|mut tasks| std::mem::take(&mut *tasks))
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        let items: Vec<T> = self.shared.ready.lock().await.drain(..).collect();
        for item in items {
            item.discard().await;
        }
    }
}

/// Makes items while there is room, until the pool closes.
async fn refill<T: Poolable>(shared: Arc<Shared<T>>) {
    let mut failures = 0u32;
    loop {
        let Ok(permit) = shared.free.acquire().await else {
            return; // closed
        };
        // On a close the make's future is dropped.
        let Some(made) = shared.until_closed((shared.maker)()).await else {
            return;
        };
        match made {
            Ok(item) => {
                failures = 0;
                shared.set_failing(None);
                if shared.is_closed() {
                    item.discard().await;
                    return;
                }
                permit.forget();
                shared.ready.lock().await.push_back(item);
                shared.report_ready().await;
                shared.filled.notify_one();
            }
            Err(err) => {
                drop(permit);
                failures += 1;
                // One task failing again and again, not one bad round of all of them
                // (boots timing out together on a loaded host), makes takers give up.
                if failures >= FAILING_AFTER {
                    shared.set_failing(Some((failures, err.to_string())));
                    // Takers waiting for an item learn of the failures (`take`).
                    shared.filled.notify_waiters();
                }
                shared.observe(|o| o.make_failed());
                warn!(pool = shared.name, %err, failures, "Cannot make a ready item");
                tokio::time::sleep(BACKOFF_STEP * failures.min(MAX_BACKOFF_STEPS)).await;
                if shared.is_closed() {
                    return;
                }
            }
        }
    }
}

/// Discards ready items whose VM died, freeing their place for a new one.
async fn watch<T: Poolable>(shared: Arc<Shared<T>>) {
    loop {
        if shared
            .until_closed(tokio::time::sleep(WATCH_INTERVAL))
            .await
            .is_none()
        {
            return;
        }
        let dead: Vec<T> = {
            let mut ready = shared.ready.lock().await;
            let (alive, dead): (VecDeque<T>, VecDeque<T>) =
                ready.drain(..).partition(Poolable::is_alive);
            *ready = alive;
            dead.into()
        };
        for item in dead {
            warn!(
                pool = shared.name,
                id = item.pool_id(),
                "A ready item died; replacing it"
            );
            item.discard().await;
            shared.observe(|o| o.dead_replaced());
            shared.free.add_permits(1);
        }
        shared.report_ready().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Debug)]
    struct Item {
        id: usize,
        alive: Arc<AtomicBool>,
        discarded: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Poolable for Item {
        fn pool_id(&self) -> String {
            self.id.to_string()
        }
        fn is_alive(&self) -> bool {
            self.alive.load(Ordering::SeqCst)
        }
        async fn discard(self) {
            self.discarded.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Counters {
        made: AtomicUsize,
        discarded: Arc<AtomicUsize>,
        fail_first: usize,
        lives: std::sync::Mutex<Vec<Arc<AtomicBool>>>,
    }

    fn pool(size: usize, fail_first: usize) -> (ReadyPool<Item>, Arc<Counters>) {
        pool_with_grace(size, fail_first, Duration::ZERO)
    }

    fn pool_with_grace(
        size: usize,
        fail_first: usize,
        grace: Duration,
    ) -> (ReadyPool<Item>, Arc<Counters>) {
        let counters = Arc::new(Counters {
            made: AtomicUsize::new(0),
            discarded: Arc::default(),
            fail_first,
            lives: std::sync::Mutex::default(),
        });
        let c = counters.clone();
        let maker: Maker<Item> = Arc::new(move || {
            let c = c.clone();
            Box::pin(async move {
                let n = c.made.fetch_add(1, Ordering::SeqCst);
                if n < c.fail_first {
                    return Err(FactoryError::Closed);
                }
                let alive = Arc::new(AtomicBool::new(true));
                c.lives.lock().expect("lock").push(alive.clone());
                Ok(Item {
                    id: n,
                    alive,
                    discarded: c.discarded.clone(),
                })
            })
        });
        (
            ReadyPool::start_observed("test", size, maker, None, grace),
            counters,
        )
    }

    async fn wait_ready(pool: &ReadyPool<Item>, count: usize) {
        for _ in 0..500 {
            if pool.ready_count().await >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("pool never reached {count}");
    }

    #[tokio::test]
    async fn refills_skips_dead_and_discards_on_close() {
        let (pool, counters) = pool(2, 2);
        wait_ready(&pool, 2).await;
        assert_eq!(
            counters.made.load(Ordering::SeqCst),
            4,
            "two failures, then two"
        );
        counters.lives.lock().expect("lock")[0].store(false, Ordering::SeqCst);
        let item = pool.take().await.expect("take");
        assert!(item.is_alive(), "a dead item was handed out");
        wait_ready(&pool, 2).await;
        assert!(pool.try_take().await.is_some());
        pool.close().await;
        assert!(matches!(pool.take().await, Err(FactoryError::Closed)));
        assert!(pool.try_take().await.is_none());
        // The dead one and every ready one at close were discarded; taken ones were not.
        assert!(counters.discarded.load(Ordering::SeqCst) >= 2);
        assert!(item.is_alive());
    }

    /// Counts its drops: stands for what a make in flight holds (a QEMU handle).
    struct DropCounter(Arc<AtomicUsize>);

    impl Drop for DropCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn close_abandons_a_make_that_never_ends() {
        let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, d) = (started.clone(), dropped.clone());
        let maker: Maker<Item> = Arc::new(move || {
            let (s, d) = (s.clone(), d.clone());
            Box::pin(async move {
                let _held = DropCounter(d);
                s.fetch_add(1, Ordering::SeqCst);
                // A guest whose warm-up hangs.
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes")
            })
        });
        let pool = ReadyPool::start("test", 2, maker);
        for _ in 0..500 {
            if started.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 2, "both makes started");
        tokio::time::timeout(Duration::from_secs(5), pool.close())
            .await
            .expect("close does not wait for the hung makes");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "what the makes held was dropped"
        );
        assert!(matches!(pool.take().await, Err(FactoryError::Closed)));
    }

    async fn wait_made(counters: &Counters, count: usize) {
        for _ in 0..500 {
            if counters.made.load(Ordering::SeqCst) >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the maker never reached {count} items");
    }

    #[tokio::test]
    async fn a_refill_waits_out_its_grace_unless_nothing_is_left_ready() {
        let grace = Duration::from_secs(2);
        let (pool, counters) = pool_with_grace(2, 0, grace);
        wait_ready(&pool, 2).await;
        let started = std::time::Instant::now();
        // One is still ready: the place stays empty for the grace.
        let first = pool.take().await.expect("take");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            counters.made.load(Ordering::SeqCst),
            2,
            "refilled within the grace"
        );
        // Nothing is left ready: this place is refilled at once.
        let second = pool.take().await.expect("take");
        wait_made(&counters, 3).await;
        assert!(
            started.elapsed() < grace,
            "the empty pool waited for the grace"
        );
        assert_eq!(counters.made.load(Ordering::SeqCst), 3);
        // The first place is refilled once its grace is over.
        wait_ready(&pool, 2).await;
        assert!(started.elapsed() >= grace);
        assert_eq!(counters.made.load(Ordering::SeqCst), 4);
        drop((first, second));
        pool.close().await;
    }

    #[tokio::test]
    async fn a_taker_cancelled_after_its_take_keeps_no_place() {
        // A taker cancelled right after it took an item (a client gone mid-call) drops the
        // item; its place must come back, or the pool shrinks for good. The lock of the
        // ready items is fair: held here, then queued for again, it makes the taker wait
        // after its take, where it is cancelled.
        let (pool, counters) = pool(1, 0);
        wait_ready(&pool, 1).await;
        let held = pool.shared.ready.lock().await;
        let taker = {
            let shared = pool.shared.clone();
            let pool = ReadyPool {
                shared,
                tasks: std::sync::Mutex::new(Vec::new()),
            };
            tokio::spawn(async move { pool.take().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        // Queued for the lock behind the taker: it gets the lock when the taker lets go
        // of it after its take.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let locker = {
            let shared = pool.shared.clone();
            tokio::spawn(async move {
                let _held = shared.ready.lock().await;
                let _ = released.await;
            })
        };
        tokio::task::yield_now().await;
        drop(held);
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        taker.abort();
        let _ = taker.await;
        let _ = release.send(());
        locker.await.expect("locker");
        wait_ready(&pool, 1).await;
        assert_eq!(
            counters.made.load(Ordering::SeqCst),
            2,
            "the place was not freed"
        );
        pool.close().await;
    }

    #[tokio::test]
    async fn one_bad_round_of_makes_is_waited_out() {
        // Three places, each one's first make fails: no task failed three times in a
        // row, so a taker waits for the next round instead of giving up.
        let (pool, counters) = pool(3, 3);
        let item = tokio::time::timeout(Duration::from_secs(20), pool.take())
            .await
            .expect("take")
            .expect("an item after one bad round");
        assert!(item.is_alive());
        assert!(counters.made.load(Ordering::SeqCst) >= 4);
        pool.close().await;
    }

    #[tokio::test]
    async fn a_taker_learns_why_nothing_can_be_made() {
        let (pool, counters) = pool(1, usize::MAX);
        let taken = tokio::time::timeout(Duration::from_secs(20), pool.take())
            .await
            .expect("a taker waited for ever on a pool that cannot make anything");
        match taken {
            Err(FactoryError::Failing { failures, reason }) => {
                assert!(failures >= FAILING_AFTER, "{failures}");
                assert!(reason.contains("closed"), "{reason}");
            }
            other => panic!("{:?}", other.map(|item| item.id)),
        }
        assert!(counters.made.load(Ordering::SeqCst) >= FAILING_AFTER as usize);
        pool.close().await;
        // A make that succeeds clears it: the fourth make of this pool works.
        let (pool, _) = pool_with_grace(1, FAILING_AFTER as usize, Duration::ZERO);
        let item = loop {
            match tokio::time::timeout(Duration::from_secs(20), pool.take()).await {
                Ok(Ok(item)) => break item,
                Ok(Err(FactoryError::Failing { .. })) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{:?}", other.map(|taken| taken.map(|item| item.id))),
            }
        };
        assert_eq!(item.id, FAILING_AFTER as usize);
        pool.close().await;
    }

    #[tokio::test]
    async fn a_pool_nobody_waits_on_keeps_the_grace_when_empty() {
        let grace = Duration::from_millis(600);
        let (pool, counters) = pool_with_grace(1, 0, grace);
        let pool = pool.grace_even_when_empty();
        wait_ready(&pool, 1).await;
        let started = std::time::Instant::now();
        let taken = pool.try_take().await.expect("take");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            counters.made.load(Ordering::SeqCst),
            1,
            "refilled within the grace although the pool was empty"
        );
        assert!(pool.try_take().await.is_none(), "try_take does not wait");
        wait_ready(&pool, 1).await;
        assert!(started.elapsed() >= grace);
        assert_eq!(counters.made.load(Ordering::SeqCst), 2);
        drop(taken);
        pool.close().await;
    }
}
