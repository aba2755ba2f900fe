//! `bench run`: what a user waits for. Times whole `vmfactory run -- true` processes,
//! spawn to exit, through a VMCache server, a template and a direct boot, interleaved in
//! one run, and splits each into its phases from the `-v` timing line of `run`. With
//! `--image REF` each run is `run --image REF -- true` (a container of the image), and with
//! `--first-use` the image is removed from the cache before every run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmfactory_factory::Settings;
use vmfactory_hypervisor::qemu::new_vm_id;

use super::{round, Stats, INTERRUPTED};
use crate::run::RUN_TIMING;
use crate::Resolved;

/// The phases `run` reports, in order.
const PHASES: [&str; 6] = [
    "config_ms",
    "open_factory_ms",
    "get_vm_ms",
    "container_ms",
    "exec_ms",
    "teardown_ms",
];

/// One way of getting a VM, with its configuration file.
struct Mode {
    name: &'static str,
    config: PathBuf,
    samples: Vec<Duration>,
    phases: BTreeMap<&'static str, Vec<f64>>,
}

/// Scratch directory with the configurations; the sandboxes and factories it set up are
/// removed and destroyed, and the directory removed, however the benchmark ends.
pub(super) struct Scratch {
    pub(super) dir: PathBuf,
    pub(super) configs: Vec<PathBuf>,
    /// Sandboxes under this runtime directory are removed first (with `configs[0]`).
    pub(super) sandboxes: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let (Some(runtime), Some(config)) = (&self.sandboxes, self.configs.first()) {
            for (_, record) in vmfactory_sandbox::dir::list(runtime) {
                let _ = vmfactory(config, &["sandbox", "rm", "-f", &record.id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for config in &self.configs {
            let _ = vmfactory(config, &["factory", "destroy"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn vmfactory(config: &Path, args: &[&str]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "vmfactory".into());
    let mut command = Command::new(exe);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

/// Writes `settings` with the factory section `factory` to `path`.
pub(super) fn write_config(
    path: &Path,
    settings: &Settings,
    dir: &Path,
    factory: impl FnOnce(&mut vmfactory_factory::settings::FactorySettings),
) -> Result<()> {
    let mut settings = settings.clone();
    settings.hypervisor.qemu.runtime_dir = dir.join("run");
    settings.factory = Default::default();
    factory(&mut settings.factory);
    std::fs::write(path, toml::to_string_pretty(&settings)?)
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// VMs the server at `config` holds ready, per `factory status --json`.
fn cached(config: &Path) -> usize {
    let Ok(output) = vmfactory(config, &["factory", "status", "--json"]).output() else {
        return 0;
    };
    serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .and_then(|report| report["vms"].as_array().map(Vec::len))
        .unwrap_or(0)
}

pub(super) fn wait_cached(config: &Path, count: usize) -> Result<()> {
    let started = Instant::now();
    while cached(config) < count {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("Interrupted");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("The VMCache server did not fill within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether the runs use a container image, and whether each pays for building it.
#[derive(Debug, Clone, Default)]
pub struct ImageRuns {
    /// `run --image REF`.
    pub reference: Option<String>,
    /// Remove the image from the cache before every run.
    pub first_use: bool,
}

impl ImageRuns {
    /// The `vmfactory` arguments of one run.
    fn args(&self) -> Vec<&str> {
        let mut args = vec!["-v", "run"];
        if let Some(reference) = &self.reference {
            args.extend(["--image", reference.as_str()]);
        }
        args.extend(["--", "true"]);
        args
    }

    /// The command line the report names.
    fn command(&self) -> String {
        let mut command = format!("vmfactory {}", self.args()[1..].join(" "));
        if self.first_use {
            command.push_str(" (image removed from the cache before each run)");
        }
        command
    }
}

/// One `vmfactory -v run [--image REF] -- true`: wall time and the phases it logged.
fn run_once(config: &Path, image: &ImageRuns) -> Result<(Duration, BTreeMap<&'static str, f64>)> {
    if let (Some(reference), true) = (&image.reference, image.first_use) {
        // Not timed: the image's disk is removed so the run builds it again.
        let _ = vmfactory(config, &["image", "rm", reference])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let started = Instant::now();
    let output = vmfactory(config, &image.args())
        .stdout(Stdio::null())
        .output()
        .context("Cannot start vmfactory run")?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("vmfactory run failed ({}): {stderr}", output.status);
    }
    let line = stderr
        .lines()
        .find(|line| line.contains(RUN_TIMING))
        .context("vmfactory run -v printed no timing line")?;
    let mut phases = BTreeMap::new();
    for field in line.split_whitespace() {
        if let Some((key, value)) = field.split_once('=') {
            if let Some(phase) = PHASES.iter().find(|p| **p == key) {
                phases.insert(*phase, value.parse().unwrap_or(0.0));
            }
        }
    }
    Ok((elapsed, phases))
}

#[derive(Debug, Serialize)]
struct ModeReport {
    #[serde(flatten)]
    stats: Stats,
    /// Median of each phase `run` logged, and of the rest (process start and exit).
    phases_median_ms: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Serialize)]
struct RunReport {
    what: &'static str,
    command: String,
    modes: BTreeMap<&'static str, ModeReport>,
    /// direct median / VMCache median.
    direct_over_vmcache: f64,
    /// direct median / template median.
    direct_over_template: f64,
}

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs `bench run`.
pub fn bench_run(
    n: usize,
    direct: usize,
    cache_size: u32,
    image: &ImageRuns,
    json: bool,
    resolved: Resolved,
) -> Result<ExitCode> {
    let mut settings = resolved.settings.clone();
    settings.hypervisor.qemu.kernel = resolved.base.kernel.clone();
    settings.hypervisor.qemu.initrd = resolved.base.initrd.clone().unwrap_or_default();
    let dir = resolved
        .base
        .qemu
        .runtime_dir
        .join(format!("bench-run-{}", new_vm_id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let mut scratch = Scratch {
        dir: dir.clone(),
        configs: Vec::new(),
        sandboxes: None,
    };
    let (direct_toml, template_toml, cache_toml) = (
        dir.join("direct.toml"),
        dir.join("template.toml"),
        dir.join("cache.toml"),
    );
    write_config(&direct_toml, &settings, &dir, |_| {})?;
    write_config(&template_toml, &settings, &dir, |f| {
        f.enable_template = true;
        f.template_path = dir.join("template");
    })?;
    write_config(&cache_toml, &settings, &dir, |f| {
        f.enable_template = true;
        f.template_path = dir.join("cache-template");
        f.vm_cache_number = cache_size;
        f.vm_cache_endpoint = dir.join("cache.sock");
    })?;
    scratch.configs = vec![template_toml.clone(), cache_toml.clone()];

    let status = vmfactory(&template_toml, &["factory", "init"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("Creating the benchmark template failed ({status})");
    }
    let mut server = vmfactory(&cache_toml, &["factory", "init"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start the VMCache server")?;
    let measured = (|| {
        wait_cached(&cache_toml, cache_size as usize)?;
        let mut modes = [
            ("vmcache", cache_toml.clone()),
            ("template", template_toml.clone()),
            ("direct", direct_toml.clone()),
        ]
        .map(|(name, config)| Mode {
            name,
            config,
            samples: Vec::new(),
            phases: BTreeMap::new(),
        });
        for round in 0..n {
            for mode in &mut modes {
                if mode.name == "direct" && round >= direct {
                    continue;
                }
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bail!("Interrupted");
                }
                // Every mode meets a full, idle cache: a warm cache for the VMCache runs,
                // and no refill competing for the CPU during the others.
                wait_cached(&cache_toml, cache_size as usize)?;
                let (elapsed, phases) = run_once(&mode.config, image)?;
                let known: f64 = phases.values().sum();
                mode.samples.push(elapsed);
                for (phase, ms) in phases {
                    mode.phases.entry(phase).or_default().push(ms);
                }
                mode.phases
                    .entry("process_rest_ms")
                    .or_default()
                    .push(elapsed.as_secs_f64() * 1e3 - known);
            }
            if !json {
                let last = |name: &str| {
                    modes
                        .iter()
                        .find(|m| m.name == name)
                        .and_then(|m| m.samples.get(round))
                        .map_or("-".to_string(), |d| {
                            format!("{:.0} ms", d.as_secs_f64() * 1e3)
                        })
                };
                eprintln!(
                    "round {}/{n}: vmcache {}, template {}, direct {}",
                    round + 1,
                    last("vmcache"),
                    last("template"),
                    last("direct")
                );
            }
        }
        Ok::<_, anyhow::Error>(modes)
    })();
    let _ = vmfactory(&cache_toml, &["factory", "destroy"])
        .stdout(Stdio::null())
        .status();
    let _ = server.wait();
    drop(scratch);
    let modes = measured?;
    let mut reports = BTreeMap::new();
    for mode in modes {
        let stats = Stats::from_samples(&mode.samples).context("No samples")?;
        let phases_median_ms = mode
            .phases
            .into_iter()
            .map(|(phase, values)| (phase, round(median(values))))
            .collect();
        reports.insert(
            mode.name,
            ModeReport {
                stats,
                phases_median_ms,
            },
        );
    }
    let median_of = |name: &str| reports.get(name).map_or(f64::NAN, |r| r.stats.median_ms);
    let report = RunReport {
        what: "run",
        command: image.command(),
        direct_over_vmcache: round(median_of("direct") / median_of("vmcache")),
        direct_over_template: round(median_of("direct") / median_of("template")),
        modes: reports,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (name, mode) in &report.modes {
            let phases: Vec<String> = mode
                .phases_median_ms
                .iter()
                .map(|(phase, ms)| format!("{} {ms:.1}", phase.trim_end_matches("_ms")))
                .collect();
            println!(
                "{name}: median {:.1} ms, p99 {:.1} ms ({})",
                mode.stats.median_ms,
                mode.stats.p99_ms,
                phases.join(", ")
            );
        }
        println!(
            "direct/vmcache {:.1}x, direct/template {:.1}x",
            report.direct_over_vmcache, report.direct_over_template
        );
    }
    Ok(ExitCode::SUCCESS)
}
