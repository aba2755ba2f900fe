//! `bench clone` and `bench density`: template clones against direct boots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmfactory_factory::template;
use vmfactory_factory::{FactoryBase, ReadyTimes, TemplateFactory, Vm, VmConfig, VmRequest};
use vmfactory_hypervisor::qemu::{new_vm_id, Qemu};
use vmfactory_hypervisor::{MemoryBackend, TranslationStats};

use super::{round, Stats, Translated};
use crate::Resolved;

/// A temporary template that is removed however the benchmark ends.
struct ScratchTemplate {
    path: PathBuf,
}

impl ScratchTemplate {
    async fn create(config: &VmConfig) -> Result<(Self, TemplateFactory)> {
        let path = config
            .qemu
            .runtime_dir
            .join(format!("bench-template-{}", new_vm_id()));
        let scratch = Self { path };
        let template = TemplateFactory::new(config, &scratch.path, config.backend())
            .await
            .context("Cannot create the benchmark template")?;
        Ok((scratch, template))
    }
}

impl Drop for ScratchTemplate {
    fn drop(&mut self) {
        if let Err(err) = template::destroy(&self.path) {
            eprintln!(
                "vmfactory: cannot remove the benchmark template {}: {err}",
                self.path.display()
            );
        }
    }
}

/// One hand-out, timed: the base VM taken (a clone loaded, or `GetBaseVM` answered and
/// the VM adopted), then [`Vm::make_ready`] as `Factory::get_vm` runs it (`cont` and the
/// `HandOut` sent together); the first agent answer is the VM being ready.
struct Taken {
    vm: Vm,
    /// get_base_vm returned.
    taken: Duration,
    /// make_ready's own phases, from its start.
    ready: ReadyTimes,
    /// For a VM started for this hand-out (a clone), what TCG translated by its answer.
    translated: Option<TranslationStats>,
    /// For a clone: its QEMU's CPU time from its start to the answer.
    qemu_cpu: Option<Duration>,
}

impl Taken {
    /// From the get_base_vm call to the VM ready.
    fn answered(&self) -> Duration {
        self.taken + self.ready.answered
    }
}

/// With `count_translation`, also reads what TCG translated by the answer: right for a
/// QEMU that ran nothing before the hand-out (a clone), not for a VM warmed up in a cache.
async fn take_timed(factory: &dyn FactoryBase, count_translation: bool) -> Result<Taken> {
    let started = Instant::now();
    let mut vm = factory.get_base_vm().await?;
    let taken = started.elapsed();
    let ready = vm.make_ready(factory.config().agent_timeout).await?;
    let qemu_cpu = count_translation.then(|| super::qemu_cpu(&vm)).flatten();
    let translated = if count_translation {
        vm.hypervisor()
            .translation_stats()
            .await
            .context("Reading TCG's translation statistics failed")?
    } else {
        None
    };
    Ok(Taken {
        vm,
        taken,
        ready,
        translated,
        qemu_cpu,
    })
}

/// Where hand-outs spent their time, as medians in ms from the get_base_vm call.
#[derive(Debug, Serialize)]
struct PhaseMedians {
    /// The base VM in hand (clone: QEMU started and state loaded; VMCache: GetBaseVM
    /// answered and the VM adopted).
    taken_ms: f64,
    /// QEMU answered `cont`.
    resumed_ms: f64,
    /// The guest answered the hand-out.
    answered_ms: f64,
    /// Of that, the guest agent's own work on the hand-out.
    guest_handler_ms: f64,
    /// Under TCG, for clones: guest code blocks translated from the resume to the answer
    /// (a count of the guest's work on the way that host noise does not change; each
    /// first-time block costs QEMU about 10 µs here).
    #[serde(skip_serializing_if = "Option::is_none")]
    translated_blocks: Option<u64>,
    /// For clones: their QEMU's CPU time from its start to the answer (the work host
    /// noise does not inflate: QEMU's start and state load, then under TCG mostly the
    /// translation of those blocks).
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_cpu_ms: Option<f64>,
}

#[derive(Default)]
struct PhaseSamples {
    taken: Vec<Duration>,
    resumed: Vec<Duration>,
    answered: Vec<Duration>,
    guest: Vec<Duration>,
    translated: Translated,
}

impl PhaseSamples {
    fn push(&mut self, taken: &Taken) {
        self.taken.push(taken.taken);
        self.resumed.push(taken.taken + taken.ready.resumed);
        self.answered.push(taken.answered());
        self.guest.push(taken.ready.guest);
        self.translated.push(taken.translated, taken.qemu_cpu);
    }

    fn medians(&self) -> Option<PhaseMedians> {
        let median = |samples: &[Duration]| Stats::from_samples(samples).map(|s| s.median_ms);
        Some(PhaseMedians {
            taken_ms: median(&self.taken)?,
            resumed_ms: median(&self.resumed)?,
            answered_ms: median(&self.answered)?,
            guest_handler_ms: median(&self.guest)?,
            translated_blocks: self.translated.median_blocks(),
            qemu_cpu_ms: self.translated.median_cpu_ms(),
        })
    }
}

/// Clone → resume → first agent answer, recorded in `phases`. `count_translation` for a
/// clone restored on demand, not for one from the warm pool (warmed up before it waits:
/// its count would not be the hand-out's).
async fn clone_once(
    template: &TemplateFactory,
    phases: &mut PhaseSamples,
    count_translation: bool,
) -> Result<()> {
    let taken = take_timed(template, count_translation).await?;
    phases.push(&taken);
    taken.vm.stop().await?;
    Ok(())
}

/// Kata's clone sequence on the same template, for the baseline: fresh QEMU with
/// `-incoming defer`, `migrate-incoming exec:cat STATE`, `query-migrate` polled every
/// 100 ms until completed, `cont`; answered by the agent's `Check` on a fresh connection.
async fn kata_clone_once(config: &VmConfig, template: &std::path::Path) -> Result<Duration> {
    let memory = MemoryBackend::File {
        path: template.join(template::MEMORY_FILE),
        share: false,
    };
    let spec = config.spec(new_vm_id(), memory);
    let started = Instant::now();
    let qemu =
        Qemu::start_incoming_kata_method(&config.qemu, &spec, &template.join(template::STATE_FILE))
            .await?;
    let vm = Vm::from_hypervisor(Box::new(qemu), config.vcpus, config.memory_mib);
    vm.resume().await?;
    vm.agent().check().await?;
    let answered = started.elapsed();
    vm.stop().await?;
    Ok(answered)
}

async fn direct_once(config: &VmConfig) -> Result<Duration> {
    let started = Instant::now();
    let vm = Vm::boot(config.backend().as_ref(), config).await?;
    let answered = started.elapsed();
    vm.stop().await?;
    Ok(answered)
}

async fn wait_for_pool(template: &TemplateFactory, size: usize) -> Result<()> {
    let started = Instant::now();
    while template.warm_pool_ready().await < size {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("The warm pool did not fill within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the host settle after the pool's warm-ups before timing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[derive(Debug, Serialize)]
struct CloneReport {
    what: &'static str,
    vcpus: u32,
    memory_mib: u32,
    /// Clone to first agent answer, no warm pool.
    clone: Stats,
    /// Where a clone's time went (medians).
    clone_phases: PhaseMedians,
    /// The same with a warm pool of `pool_size` QEMUs.
    clone_warm_pool: Stats,
    /// Where a warm-pool clone's time went (medians).
    clone_warm_pool_phases: PhaseMedians,
    pool_size: usize,
    /// Direct boot to first agent answer, measured in the same run.
    direct: Stats,
    /// Kata's clone sequence (`migrate-incoming exec:cat`, `query-migrate` every 100 ms,
    /// `cont`) on the same template to first agent answer, measured in the same run.
    kata_method: Stats,
    /// Kata-method median / clone median (above 1: ours is faster).
    kata_over_clone: f64,
    /// Kata-method median / warm-pool clone median.
    kata_over_warm_pool: f64,
    /// direct median / clone median.
    direct_over_clone: f64,
    /// direct median / warm-pool clone median.
    direct_over_warm_pool: f64,
}

pub async fn bench_clone(
    n: usize,
    pool: usize,
    direct: usize,
    json: bool,
    resolved: Resolved,
) -> Result<ExitCode> {
    let direct_config = resolved.direct_config();
    let (scratch, plain) = ScratchTemplate::create(&resolved.base).await?;
    let pooled = TemplateFactory::fetch(&resolved.base, &scratch.path, resolved.base.backend())
        .await?
        .with_warm_pool(pool);
    let (mut directs, mut katas) = (Vec::new(), Vec::new());
    // Clone and warm-pool clone times are their phases' `answered` samples.
    let (mut clone_phases, mut warm_phases) = (PhaseSamples::default(), PhaseSamples::default());
    for round in 0..n {
        wait_for_pool(&pooled, pool).await?;
        clone_once(&pooled, &mut warm_phases, false).await?;
        // The pool refills in the background: let it finish before timing anything else.
        wait_for_pool(&pooled, pool).await?;
        clone_once(&plain, &mut clone_phases, true).await?;
        katas.push(kata_clone_once(&resolved.base, &scratch.path).await?);
        if round < direct {
            directs.push(direct_once(&direct_config).await?);
        }
        if !json {
            eprintln!(
                "round {}/{n}: clone {:.1} ms, warm pool {:.1} ms, Kata method {:.1} ms{}",
                round + 1,
                ms(clone_phases.answered[round]),
                ms(warm_phases.answered[round]),
                ms(katas[round]),
                directs
                    .get(round)
                    .map(|d| format!(", direct {:.1} ms", ms(*d)))
                    .unwrap_or_default()
            );
        }
    }
    pooled.close().await?;
    drop(pooled);
    drop(plain);
    drop(scratch);
    let (
        Some(clone),
        Some(clone_warm_pool),
        Some(direct),
        Some(kata_method),
        Some(clone_phases),
        Some(clone_warm_pool_phases),
    ) = (
        Stats::from_samples(&clone_phases.answered),
        Stats::from_samples(&warm_phases.answered),
        Stats::from_samples(&directs),
        Stats::from_samples(&katas),
        clone_phases.medians(),
        warm_phases.medians(),
    )
    else {
        bail!("No samples");
    };
    let report = CloneReport {
        what: "clone",
        vcpus: resolved.base.vcpus,
        memory_mib: resolved.base.memory_mib,
        direct_over_clone: round(direct.median_ms / clone.median_ms),
        direct_over_warm_pool: round(direct.median_ms / clone_warm_pool.median_ms),
        kata_over_clone: round(kata_method.median_ms / clone.median_ms),
        kata_over_warm_pool: round(kata_method.median_ms / clone_warm_pool.median_ms),
        kata_method,
        clone,
        clone_phases,
        clone_warm_pool,
        clone_warm_pool_phases,
        pool_size: pool,
        direct,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "clone: median {:.1} ms, p99 {:.1} ms\nclone with warm pool: median {:.1} ms, p99 {:.1} ms\nKata-method clone: median {:.1} ms, p99 {:.1} ms\ndirect boot: median {:.1} ms\ndirect/clone {:.1}x, direct/warm pool {:.1}x\nKata method/clone {:.2}x, Kata method/warm pool {:.2}x",
            report.clone.median_ms,
            report.clone.p99_ms,
            report.clone_warm_pool.median_ms,
            report.clone_warm_pool.p99_ms,
            report.kata_method.median_ms,
            report.kata_method.p99_ms,
            report.direct.median_ms,
            report.direct_over_clone,
            report.direct_over_warm_pool,
            report.kata_over_clone,
            report.kata_over_warm_pool
        );
        for (what, phases) in [
            ("clone", &report.clone_phases),
            ("warm pool clone", &report.clone_warm_pool_phases),
        ] {
            println!(
                "{what} phases (medians): taken {:.1} ms, resumed {:.1} ms, answered {:.1} ms, guest handler {:.1} ms{}",
                phases.taken_ms,
                phases.resumed_ms,
                phases.answered_ms,
                phases.guest_handler_ms,
                phases
                    .translated_blocks
                    .map(|blocks| format!(", {blocks} blocks translated"))
                    .unwrap_or_default()
                    + &phases
                        .qemu_cpu_ms
                        .map(|ms| format!(", QEMU CPU {ms:.1} ms"))
                        .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct GetvmReport {
    what: &'static str,
    clients: usize,
    cache_size: usize,
    pool_size: usize,
    /// get_vm call to first agent answer (resumed; the first answer is the hand-out's).
    first_answer: Stats,
    /// get_vm call to a VM ready for use (handed out: reseeded, clock and hostname set).
    ready: Stats,
    /// Where a hand-out's time went (medians).
    phases: PhaseMedians,
    /// VMs (cloned and warmed) the cache made per second: VMs taken in a round divided
    /// by the time from the round's requests until the cache was full again.
    refill_per_second: f64,
}

/// One get_vm over gRPC: first agent answer and ready times; the VM is returned to stop.
async fn getvm_once(endpoint: PathBuf) -> Result<Taken> {
    let remote = vmfactory_factory::GrpcCacheFactory::connect(&endpoint).await?;
    take_timed(&remote, false).await
}

async fn wait_full(cache: &vmfactory_factory::CacheFactory, size: usize) -> Result<Duration> {
    let started = Instant::now();
    while cache.ready_count().await < size {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("The cache did not fill within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

pub async fn bench_getvm(
    n: usize,
    clients: usize,
    cache_size: usize,
    pool: usize,
    json: bool,
    resolved: Resolved,
) -> Result<ExitCode> {
    // Every client of a round must find a warm VM.
    let cache_size = cache_size.max(clients);
    let (scratch, template) = ScratchTemplate::create(&resolved.base).await?;
    let template: std::sync::Arc<dyn FactoryBase> =
        std::sync::Arc::new(template.with_warm_pool(pool));
    let cache = std::sync::Arc::new(vmfactory_factory::CacheFactory::with_warm_up(
        template, cache_size, true,
    ));
    let endpoint = scratch.path.with_extension("sock");
    let shutdown = std::sync::Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn({
        let (cache, endpoint, shutdown) = (cache.clone(), endpoint.clone(), shutdown.clone());
        async move { vmfactory_factory::vmcache::serve(cache, &endpoint, shutdown).await }
    });
    let result = async {
        wait_full(&cache, cache_size).await?;
        let mut refills = Vec::new();
        let mut phases = PhaseSamples::default();
        let rounds = n.div_ceil(clients);
        for round in 0..rounds {
            let batch = clients.min(n - round * clients);
            let round_started = Instant::now();
            let tasks: Vec<_> = (0..batch)
                .map(|_| tokio::spawn(getvm_once(endpoint.clone())))
                .collect();
            let mut vms = Vec::new();
            for task in tasks {
                let taken = task.await??;
                phases.push(&taken);
                vms.push(taken.vm);
            }
            for vm in vms {
                vm.stop().await?;
            }
            wait_full(&cache, cache_size).await?;
            // Taking a VM starts its replacement: time from the round's requests to a full
            // cache again.
            let refill = round_started.elapsed();
            refills.push((batch, refill));
            if !json {
                eprintln!(
                    "round {}/{rounds}: {batch} VMs, refilled in {:.0} ms",
                    round + 1,
                    ms(refill)
                );
            }
        }
        Ok::<_, anyhow::Error>((phases, refills))
    }
    .await;
    shutdown.notify_one();
    let _ = server.await;
    cache.close().await?;
    drop(scratch);
    let (phases, refills) = result?;
    let (Some(ready), Some(phases)) = (Stats::from_samples(&phases.answered), phases.medians())
    else {
        bail!("No samples");
    };
    let refilled: usize = refills.iter().map(|(count, _)| count).sum();
    let refill_time: f64 = refills.iter().map(|(_, time)| time.as_secs_f64()).sum();
    let report = GetvmReport {
        what: "getvm",
        clients,
        cache_size,
        pool_size: pool,
        // The first answer is the hand-out's, so both series are the same.
        first_answer: ready.clone(),
        ready,
        phases,
        refill_per_second: round(refilled as f64 / refill_time.max(1e-3)),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "get_vm with {} client(s): ready median {:.1} ms, p99 {:.1} ms (taken {:.1}, resumed {:.1}, answered {:.1}, guest handler {:.1}); refill {:.2} VMs/s",
            clients,
            report.ready.median_ms,
            report.ready.p99_ms,
            report.phases.taken_ms,
            report.phases.resumed_ms,
            report.phases.answered_ms,
            report.phases.guest_handler_ms,
            report.refill_per_second
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// PSS of a process: total, and of the mapping that backs guest RAM, in KiB.
fn pss_kib(pid: u32, guest_ram: &dyn Fn(&str) -> bool) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("Cannot read /proc/{pid}/smaps"))?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: address range, perms, offset, dev, inode, [path].
            let path: Vec<&str> = line.split_whitespace().skip(5).collect();
            in_guest_ram = guest_ram(&path.join(" "));
        } else if first == "Pss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if in_guest_ram {
                guest += kib;
            }
        }
    }
    Ok((total, guest))
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Serialize)]
struct DensitySide {
    count: usize,
    /// Median PSS per VM process, MiB.
    pss_total_mib: f64,
    /// Median PSS of the guest RAM mapping per VM, MiB.
    pss_guest_ram_mib: f64,
    /// Host MemAvailable drop per VM, MiB.
    host_used_per_vm_mib: f64,
}

#[derive(Debug, Serialize)]
struct DensityReport {
    what: &'static str,
    memory_mib: u32,
    tb_size_mib: Option<u32>,
    clones: DensitySide,
    direct: DensitySide,
    /// direct / clone, median PSS per VM.
    pss_ratio: f64,
    /// direct / clone, host memory per VM; null when the clones' share is below what
    /// `MemAvailable` can tell apart from the rest of the host's activity.
    host_memory_ratio: Option<f64>,
}

/// Below this drop of `MemAvailable` per VM (MiB), the host's own churn dominates.
const HOST_MEMORY_NOISE_MIB: f64 = 1.0;

/// `direct / clone`, or None when `clone` is below `floor` (a ratio of noise).
fn ratio(direct: f64, clone: f64, floor: f64) -> Option<f64> {
    (clone >= floor && floor > 0.0).then(|| round(direct / clone))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn measure(
    vms: &[Vm],
    before_kib: u64,
    guest_ram: &dyn Fn(&str) -> bool,
) -> Result<DensitySide> {
    // Let the guests settle into idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_kib = mem_available_kib();
    let (mut totals, mut guests) = (Vec::new(), Vec::new());
    for vm in vms {
        let pid = vm.pid().context("VM without a pid")?;
        let (total, guest) = pss_kib(pid, guest_ram)?;
        totals.push(total as f64 / 1024.0);
        guests.push(guest as f64 / 1024.0);
    }
    Ok(DensitySide {
        count: vms.len(),
        pss_total_mib: round(median(totals)),
        pss_guest_ram_mib: round(median(guests)),
        host_used_per_vm_mib: round(
            before_kib.saturating_sub(after_kib) as f64 / 1024.0 / vms.len().max(1) as f64,
        ),
    })
}

pub async fn bench_density(
    count: usize,
    tb_size: u32,
    json: bool,
    mut resolved: Resolved,
) -> Result<ExitCode> {
    let tb = (tb_size > 0).then_some(tb_size);
    resolved.base.qemu.tb_size_mib = tb;
    let direct_config = resolved.direct_config();
    let (scratch, template) = ScratchTemplate::create(&resolved.base).await?;
    let factory = vmfactory_factory::Factory::new(std::sync::Arc::new(template));
    let memory_file = scratch.path.join(template::MEMORY_FILE);
    let memory_file = memory_file.to_string_lossy().to_string();

    let before = mem_available_kib();
    let mut clones = Vec::new();
    for _ in 0..count {
        clones.push(factory.get_vm(&VmRequest::default()).await?);
    }
    let is_template_memory = |path: &str| path == memory_file;
    let clone_side = measure(&clones, before, &is_template_memory).await;
    for vm in clones {
        vm.stop().await?;
    }
    drop(factory);
    drop(scratch);
    let clone_side = clone_side?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mem_available_kib();
    let mut directs = Vec::new();
    for _ in 0..count {
        directs.push(Vm::boot(direct_config.backend().as_ref(), &direct_config).await?);
    }
    let is_memfd = |path: &str| path.starts_with("/memfd:memory-backend-memfd");
    let direct_side = measure(&directs, before, &is_memfd).await;
    for vm in directs {
        vm.stop().await?;
    }
    let direct_side = direct_side?;

    let report = DensityReport {
        what: "density",
        memory_mib: resolved.base.memory_mib,
        tb_size_mib: tb,
        pss_ratio: ratio(
            direct_side.pss_total_mib,
            clone_side.pss_total_mib,
            f64::MIN_POSITIVE,
        )
        .unwrap_or(0.0),
        host_memory_ratio: ratio(
            direct_side.host_used_per_vm_mib,
            clone_side.host_used_per_vm_mib,
            HOST_MEMORY_NOISE_MIB,
        ),
        clones: clone_side,
        direct: direct_side,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (name, side) in [("clones", &report.clones), ("direct", &report.direct)] {
            println!(
                "{name}: {} VMs, PSS {:.1} MiB per VM (guest RAM {:.1} MiB), host memory {:.1} MiB per VM",
                side.count, side.pss_total_mib, side.pss_guest_ram_mib, side.host_used_per_vm_mib
            );
        }
        let host = match report.host_memory_ratio {
            Some(ratio) => format!("{ratio:.1}x"),
            None => "not measurable (the clones' host memory is within the host's noise)".into(),
        };
        println!(
            "direct / clone: PSS {:.1}x, host memory {host}",
            report.pss_ratio
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_of_noise_are_not_reported() {
        assert_eq!(ratio(80.0, 20.0, HOST_MEMORY_NOISE_MIB), Some(4.0));
        // MemAvailable rose while the clones ran: no ratio, not 8000x.
        assert_eq!(ratio(80.0, 0.0, HOST_MEMORY_NOISE_MIB), None);
        assert_eq!(ratio(80.0, 0.5, HOST_MEMORY_NOISE_MIB), None);
        assert_eq!(ratio(93.7, 30.6, f64::MIN_POSITIVE), Some(3.06));
        assert_eq!(ratio(93.7, 0.0, f64::MIN_POSITIVE), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn pss_of_this_process_is_positive() {
        let (total, guest) = pss_kib(std::process::id(), &|_| false).expect("smaps");
        assert!(total > 0);
        assert_eq!(guest, 0);
    }
}
