//! `vmfactory bench`: speed measurements. Numbers are reported, never asserted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use vmfactory_factory::{Vm, VmConfig};
use vmfactory_hypervisor::TranslationStats;

use crate::run::{signal_exit, Signals};
use crate::{Resolved, VmArgs};

mod clone;
mod run;
mod sandbox;

/// Most samples of one series.
const MAX_SAMPLES: u64 = 10_000;
/// Most VMs a benchmark keeps at once (a pool, a cache, clients, idle VMs), as
/// `vm_cache_number` and `template_warm_pool`.
const MAX_VMS_AT_ONCE: u64 = 64;

/// A count option: 1 to `max` (clap refuses others with exit status 2, naming the option
/// as typed).
fn count(max: u64) -> impl clap::builder::TypedValueParser<Value = usize> {
    use clap::builder::TypedValueParser;
    clap::value_parser!(u64)
        .range(1..=max)
        .map(|value| usize::try_from(value).unwrap_or(usize::MAX))
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Direct boot to first agent answer. When the guest image has both an uncompressed
    /// PVH vmlinux and a bzImage, both are measured, interleaved, and compared.
    /// `--versus debian` also boots the other guest kernel's image, interleaved. Under
    /// TCG it also reports the guest code blocks QEMU translated by the answer: a count
    /// of the boot's work that, unlike its time, does not move with the host's load.
    Boot {
        /// Boots per kernel.
        #[arg(short, default_value_t = 5, value_parser = count(MAX_SAMPLES))]
        n: usize,
        /// Also boot the image of this guest kernel (vmfactory or debian), interleaved.
        #[arg(long, value_name = "vmfactory|debian")]
        versus: Option<vmfactory_guest_image::KernelSource>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Template clone to first agent answer, without and with the warm pool, and direct
    /// boot measured in the same run (interleaved), with their ratios. Creates a
    /// temporary template and removes it afterwards. Warm-pool clones are warmed up
    /// (handed out once, `true` run) before they wait, as VMCache's VMs are. Under TCG
    /// the on-demand clone series also reports the guest code blocks translated from the
    /// resume to the answer.
    Clone {
        /// Clones per series.
        #[arg(short, default_value_t = 10, value_parser = count(MAX_SAMPLES))]
        n: usize,
        /// Warm pool size for the pooled series.
        #[arg(long, default_value_t = 2, value_parser = count(MAX_VMS_AT_ONCE))]
        pool: usize,
        /// Direct boots for the baseline.
        #[arg(long, default_value_t = 5, value_parser = count(MAX_SAMPLES))]
        direct: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// get_vm from a warm VMCache server to first agent answer, with C concurrent
    /// clients; reports median, p99 and the refill rate the cache sustained. Starts a
    /// temporary server (template + cache) in this process and removes it afterwards.
    Getvm {
        /// get_vm calls in all.
        #[arg(short, default_value_t = 20, value_parser = count(MAX_SAMPLES))]
        n: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 1, value_parser = count(MAX_VMS_AT_ONCE))]
        clients: usize,
        /// VMs the server keeps ready (raised to --clients, so that every client of a
        /// round finds one).
        #[arg(long, default_value_t = 4, value_parser = count(MAX_VMS_AT_ONCE))]
        cache: usize,
        /// Warm pool size of the template behind the cache.
        #[arg(long, default_value_t = 2, value_parser = count(MAX_VMS_AT_ONCE))]
        pool: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// What a user waits for: whole `vmfactory run -- true` processes, spawn to exit,
    /// through a VMCache server, a template and a direct boot, interleaved, with where
    /// the time goes (config, get VM, exec, teardown, process start/exit). Sets up a
    /// temporary template and server and removes them afterwards.
    Run {
        /// Runs per mode.
        #[arg(short, default_value_t = 10, value_parser = count(MAX_SAMPLES))]
        n: usize,
        /// Direct-boot runs (the slow baseline).
        #[arg(long, default_value_t = 3, value_parser = count(MAX_SAMPLES))]
        direct: usize,
        /// VMs the temporary VMCache server keeps ready.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_VMS_AT_ONCE as i64))]
        cache: u32,
        /// Run `true` in a container of this image (`run --image REF -- true`).
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// With --image: remove the image from the cache before every run, so each run
        /// pays for building its disk (first use).
        #[arg(long, requires = "image")]
        first_use: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Sandboxes: `sandbox create` from a warm VMCache server, an `exec -- true` round
    /// trip on a live sandbox (whole process, and through the supervisor alone), and copy
    /// throughput in and out. Sets up a temporary server and removes everything after.
    Sandbox {
        /// Sandboxes created, and exec round trips.
        #[arg(short, default_value_t = 5, value_parser = count(MAX_SAMPLES))]
        n: usize,
        /// Size of the file copied each way, MiB (into the guest's /tmp, a tmpfs: at most
        /// a quarter of the VM's memory).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        copy_mib: u64,
        /// VMs the temporary VMCache server keeps ready.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_VMS_AT_ONCE as i64))]
        cache: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Memory of idle VMs: per-VM PSS (total and guest RAM) and host memory used, for
    /// COUNT template clones and COUNT direct boots.
    Density {
        /// VMs per kind (all kept running at once).
        #[arg(short = 'n', long, default_value_t = 10, value_parser = count(MAX_VMS_AT_ONCE))]
        count: usize,
        /// TCG translation buffer size in MiB for the measured VMs (0: QEMU's default).
        #[arg(long, default_value_t = 0)]
        tb_size: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
}

/// Summary of one series of samples, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub n: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl Stats {
    pub fn from_samples(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let raw = ms.clone();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        // Nearest-rank p99.
        let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
        Some(Self {
            n,
            median_ms: round(median),
            p99_ms: round(ms[rank - 1]),
            min_ms: round(ms[0]),
            max_ms: round(ms[n - 1]),
            samples_ms: raw.into_iter().map(round).collect(),
        })
    }
}

pub fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

#[derive(Debug, Serialize)]
struct BootReport {
    what: &'static str,
    accelerator: String,
    vcpus: u32,
    memory_mib: u32,
    /// The kernel the VMs boot by default.
    kernel: String,
    results: Vec<KernelResult>,
    /// Median of the bzImage series divided by the median of the vmlinux series.
    bzimage_over_vmlinux: Option<f64>,
    /// With `--versus`: median of the other kernel's series divided by the default's.
    #[serde(skip_serializing_if = "Option::is_none")]
    versus_over_default: Option<f64>,
}

#[derive(Debug, Serialize)]
struct KernelResult {
    kernel: String,
    #[serde(flatten)]
    stats: Stats,
    /// Under TCG: guest code blocks translated by the time the agent answered (median).
    #[serde(skip_serializing_if = "Option::is_none")]
    translated_blocks: Option<u64>,
    /// QEMU's CPU time from its start to the agent's answer (median; see
    /// [`process_cpu`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_cpu_ms: Option<f64>,
}

/// Translation counts of the VMs of one series (TCG), and their QEMU's CPU time: their
/// medians, when every VM had one.
#[derive(Debug, Default)]
pub(crate) struct Translated {
    blocks: Vec<Option<TranslationStats>>,
    cpu: Vec<Option<Duration>>,
}

impl Translated {
    /// One VM's translation counts and its QEMU's CPU time.
    pub(crate) fn push(&mut self, stats: Option<TranslationStats>, cpu: Option<Duration>) {
        self.blocks.push(stats);
        self.cpu.push(cpu);
    }

    /// Median QEMU CPU time in ms; `None` without samples or when one is missing.
    pub(crate) fn median_cpu_ms(&self) -> Option<f64> {
        let samples: Vec<Duration> = self.cpu.iter().copied().collect::<Option<_>>()?;
        Stats::from_samples(&samples).map(|stats| stats.median_ms)
    }

    /// Median translated blocks; `None` without samples or when one is missing (KVM).
    pub(crate) fn median_blocks(&self) -> Option<u64> {
        let mut blocks: Vec<u64> = self
            .blocks
            .iter()
            .map(|stats| stats.map(|stats| stats.blocks))
            .collect::<Option<_>>()?;
        blocks.sort_unstable();
        blocks.get(blocks.len().checked_sub(1)? / 2).copied()
    }
}

/// CPU time of a process's threads (`/proc/<pid>/task/*/schedstat`: nanoseconds on a
/// CPU, kept by the scheduler): a VM's QEMU work, which a busy host's waits do not inflate
/// the way they do a wall-clock time (under TCG nearly all of it translates guest code).
/// Threads that ended are not counted (QEMU's live for the VM's life). `None` when the
/// kernel keeps no such counts (no `CONFIG_SCHED_INFO`) or the process is gone.
pub(crate) fn process_cpu(pid: u32) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut threads = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that ends meanwhile is skipped.
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
        total = total.checked_add(ns)?;
        threads += 1;
    }
    (threads > 0).then(|| Duration::from_nanos(total))
}

/// The CPU time of a VM's QEMU so far, if it runs in a process of its own here.
pub(crate) fn qemu_cpu(vm: &Vm) -> Option<Duration> {
    process_cpu(vm.hypervisor().pid()?)
}

/// Set when a signal ends the benchmark: `bench run`'s loop, which runs on a blocking
/// thread that dropping its future does not stop, checks it between runs.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Runs a benchmark.
///
/// SIGINT, SIGTERM or SIGHUP ends a benchmark by dropping it (and, for `bench run`, by
/// [`INTERRUPTED`]), so the VMs, templates, servers and sandboxes it set up go as they
/// would at its end; `main` waits for its tasks and threads to finish that.
pub async fn run(command: BenchCommand, config: Option<PathBuf>) -> Result<ExitCode> {
    let mut signals = Signals::install()?;
    tokio::select! {
        result = run_command(command, config) => result,
        stop = signals.recv() => {
            INTERRUPTED.store(true, Ordering::SeqCst);
            Ok(signal_exit(stop))
        }
    }
}

async fn run_command(command: BenchCommand, config: Option<PathBuf>) -> Result<ExitCode> {
    match command {
        BenchCommand::Boot {
            n,
            versus,
            json,
            vm,
        } => bench_boot(n, versus, json, vm, config).await,
        BenchCommand::Clone {
            n,
            pool,
            direct,
            json,
            vm,
        } => clone::bench_clone(n, pool, direct, json, resolve(vm, config).await?).await,
        BenchCommand::Getvm {
            n,
            clients,
            cache,
            pool,
            json,
            vm,
        } => clone::bench_getvm(n, clients, cache, pool, json, resolve(vm, config).await?).await,
        BenchCommand::Run {
            n,
            direct,
            cache,
            image,
            first_use,
            json,
            vm,
        } => {
            let resolved = resolve(vm, config).await?;
            let image = run::ImageRuns {
                reference: image,
                first_use,
            };
            tokio::task::spawn_blocking(move || {
                run::bench_run(n, direct, cache, &image, json, resolved)
            })
            .await
            .context("The benchmark task failed")?
        }
        BenchCommand::Sandbox {
            n,
            copy_mib,
            cache,
            json,
            vm,
        } => sandbox::bench_sandbox(n, copy_mib, cache, json, resolve(vm, config).await?).await,
        BenchCommand::Density {
            count,
            tb_size,
            json,
            vm,
        } => clone::bench_density(count, tb_size, json, resolve(vm, config).await?).await,
    }
}

async fn resolve(vm: VmArgs, config: Option<PathBuf>) -> Result<Resolved> {
    tokio::task::spawn_blocking(move || vm.resolve(config.as_deref(), true))
        .await
        .context("Preparing the VM failed")?
}

/// One direct boot to the agent's answer, what TCG translated on the way and QEMU's CPU
/// time by then.
async fn boot_once(
    config: &VmConfig,
) -> Result<(Duration, Option<TranslationStats>, Option<Duration>)> {
    let started = Instant::now();
    let vm = Vm::boot(config.backend().as_ref(), config)
        .await
        .context("Boot failed")?;
    let elapsed = started.elapsed();
    let cpu = qemu_cpu(&vm);
    let translated = vm.hypervisor().translation_stats().await;
    vm.stop().await.context("Stopping the VM failed")?;
    Ok((
        elapsed,
        translated.context("Reading TCG's translation statistics failed")?,
        cpu,
    ))
}

async fn bench_boot(
    n: usize,
    versus: Option<vmfactory_guest_image::KernelSource>,
    json: bool,
    args: VmArgs,
    config_file: Option<PathBuf>,
) -> Result<ExitCode> {
    let config = resolve(args.clone(), config_file).await?.direct_config();
    let mut kernels = vec![(config.kernel.clone(), config.initrd.clone())];
    // Compare against the bzImage of the same image when booting its vmlinux.
    if args.kernel.is_none()
        && versus.is_none()
        && config.kernel.file_name().is_some_and(|f| f == "vmlinux")
    {
        let bzimage = config.kernel.with_file_name("vmlinuz");
        if bzimage.is_file() {
            kernels.push((bzimage, config.initrd.clone()));
        }
    }
    if let Some(other) = versus {
        let image_args = args.image.clone();
        let image = tokio::task::spawn_blocking(move || {
            crate::guest::ensure_image(&image_args, other, false)
        })
        .await
        .context("Preparing the other guest image failed")??;
        kernels.push((image.kernel, Some(image.initrd)));
    }
    let mut samples = vec![Vec::new(); kernels.len()];
    let mut translated: Vec<Translated> = kernels.iter().map(|_| Translated::default()).collect();
    for round in 0..n {
        for (index, (kernel, initrd)) in kernels.iter().enumerate() {
            let config = VmConfig {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                ..config.clone()
            };
            let (elapsed, stats, cpu) = boot_once(&config).await?;
            translated[index].push(stats, cpu);
            if !json {
                eprintln!(
                    "boot {}/{n} {}: {:.1} ms",
                    round + 1,
                    kernel.display(),
                    elapsed.as_secs_f64() * 1e3
                );
            }
            samples[index].push(elapsed);
        }
    }
    let results: Vec<KernelResult> = kernels
        .iter()
        .zip(samples.iter().zip(&translated))
        .filter_map(|((kernel, _), (samples, translated))| {
            Some(KernelResult {
                kernel: kernel.display().to_string(),
                stats: Stats::from_samples(samples)?,
                translated_blocks: translated.median_blocks(),
                qemu_cpu_ms: translated.median_cpu_ms(),
            })
        })
        .collect();
    let (ratio, versus_ratio) = match (results.as_slice(), versus) {
        ([vmlinux, bzimage], None) => (
            Some(round(bzimage.stats.median_ms / vmlinux.stats.median_ms)),
            None,
        ),
        ([default, other], Some(_)) => (
            None,
            Some(round(other.stats.median_ms / default.stats.median_ms)),
        ),
        _ => (None, None),
    };
    let accel = vmfactory_hypervisor::qemu::accel::choose(
        config.qemu.accelerator,
        vmfactory_hypervisor::qemu::accel::HostProbe::detect(),
        config.qemu.kernel_is_pvm,
    )
    .map(|(accel, _)| format!("{accel:?}").to_lowercase())
    .unwrap_or_else(|_| "unknown".into());
    let report = BootReport {
        what: "boot",
        accelerator: accel,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        kernel: config.kernel.display().to_string(),
        results,
        bzimage_over_vmlinux: ratio,
        versus_over_default: versus_ratio,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for result in &report.results {
            println!(
                "{}: median {:.1} ms, p99 {:.1} ms (n={}){}",
                result.kernel,
                result.stats.median_ms,
                result.stats.p99_ms,
                result.stats.n,
                result
                    .translated_blocks
                    .map(|blocks| format!(", {blocks} blocks translated (median)"))
                    .unwrap_or_default()
                    + &result
                        .qemu_cpu_ms
                        .map(|ms| format!(", QEMU CPU {ms:.1} ms (median)"))
                        .unwrap_or_default()
            );
        }
        if let Some(ratio) = versus_ratio {
            println!("other kernel / default kernel median: {ratio:.2}x");
        }
        if let Some(ratio) = ratio {
            println!("bzImage / vmlinux median: {ratio:.2}x");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_p99() {
        let samples: Vec<Duration> = [5, 1, 3, 2, 4].map(Duration::from_millis).to_vec();
        let stats = Stats::from_samples(&samples).expect("stats");
        assert_eq!(stats.median_ms, 3.0);
        assert_eq!(stats.p99_ms, 5.0);
        assert_eq!(stats.min_ms, 1.0);
        assert_eq!(stats.samples_ms, [5.0, 1.0, 3.0, 2.0, 4.0]);
        let even: Vec<Duration> = [1, 2, 3, 4].map(Duration::from_millis).to_vec();
        assert_eq!(Stats::from_samples(&even).expect("stats").median_ms, 2.5);
        assert!(Stats::from_samples(&[]).is_none());
    }

    #[test]
    fn translated_blocks_median_needs_every_sample() {
        let stats = |blocks| {
            Some(TranslationStats {
                blocks,
                code_bytes: 0,
                flushes: 0,
            })
        };
        let mut series = Translated::default();
        assert_eq!(series.median_blocks(), None);
        for blocks in [30, 10, 20, 40] {
            series.push(stats(blocks), None);
        }
        assert_eq!(series.median_blocks(), Some(20));
        series.push(None, None);
        assert_eq!(series.median_blocks(), None, "a VM under KVM has no count");
    }

    #[test]
    fn cpu_time_of_a_process_and_its_median() {
        // This process has used some CPU by now (a test binary, threads started).
        let own = process_cpu(std::process::id()).expect("schedstat of this process");
        assert!(own > Duration::ZERO, "{own:?}");
        assert_eq!(process_cpu(u32::MAX), None, "no such process");
        let mut series = Translated::default();
        assert_eq!(series.median_cpu_ms(), None);
        for ms in [30, 10, 20] {
            series.push(None, Some(Duration::from_millis(ms)));
        }
        assert_eq!(series.median_cpu_ms(), Some(20.0));
        series.push(None, None);
        assert_eq!(series.median_cpu_ms(), None, "one VM's QEMU was not ours");
    }
}
