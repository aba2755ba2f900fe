//! The `vmfactory` command: run a command in a fresh micro-VM, build the guest image,
//! measure boot times.

mod bench;
mod container;
mod factory;
mod guest;
mod image;
mod progress;
mod run;
mod sandbox;
mod terminal;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use vmfactory_factory::{Settings, VmConfig, VmRequest};
use vmfactory_hypervisor::qemu::accel::Accelerator;

/// Exit status for vmfactory's own failures (as `docker run` does), distinct from the
/// guest command's exit codes.
const EXIT_VMFACTORY_ERROR: u8 = 125;

/// vmfactory hands out ready, hardware-isolated micro-VMs: QEMU guests booted from a
/// minimal kernel and initramfs whose PID 1 is the vmfactory agent.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log more (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Configuration file (TOML); default: /etc/vmfactory/configuration.toml if it
    /// exists, else built-in defaults.
    #[arg(long, global = true, env = "VMFACTORY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one command in a freshly booted VM; print its output and exit with its exit code.
    ///
    /// Example: vmfactory run -- uname -a
    Run(run::RunArgs),
    /// Manage the guest image (kernel + initramfs with the agent).
    #[command(subcommand)]
    Guest(guest::GuestCommand),
    /// Measure vmfactory's speed; prints medians and p99 (JSON with --json).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Manage the VM factory of the [factory] section: the template (enable_template) and
    /// the VMCache server (vm_cache_number > 0).
    #[command(subcommand)]
    Factory(factory::FactoryCommand),
    /// Long-lived VMs (sandboxes): create, list, exec into, pause, resume, remove.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Container images as read-only guest disks: build (flatten and cache), ls, rm.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (file plus defaults) as TOML.
    Show {
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// Options describing the VM to boot, shared by `run` and `bench`. Each overrides the
/// configuration file.
#[derive(Debug, Clone, Args)]
struct VmArgs {
    /// vCPUs of the VM (default: hypervisor.qemu.default_vcpus, 1).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory in MiB (default: hypervisor.qemu.default_memory, 256).
    #[arg(long)]
    memory: Option<u32>,
    /// Accelerator: auto (KVM when it can run the guest, else TCG), kvm or tcg.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accelerator>,
    /// QEMU binary (path or name in PATH).
    #[arg(long, env = "VMFACTORY_QEMU")]
    qemu: Option<PathBuf>,
    /// Guest kernel; default: the one of the built guest image.
    #[arg(long, env = "VMFACTORY_KERNEL")]
    kernel: Option<PathBuf>,
    /// Guest initramfs; default: the configured one, else the one of the built guest image
    /// (also with --kernel: the agent in it is the guest's /init).
    #[arg(long, env = "VMFACTORY_INITRD")]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    #[arg(long)]
    kernel_params: Option<String>,
    /// Seconds a boot may take before giving up (1 to 3600).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=vmfactory_factory::settings::MAX_TIMEOUT_SECS))]
    boot_timeout: Option<u64>,
    #[command(flatten)]
    image: guest::ImageArgs,
}

fn parse_accel(s: &str) -> Result<Accelerator, String> {
    s.parse()
        .map_err(|err: vmfactory_hypervisor::HypervisorError| err.to_string())
}

/// What a command works with: the effective settings, the factory's VM config (the
/// configuration's sizes) and what the user asked for (sizes from the command line).
#[derive(Debug, Clone)]
struct Resolved {
    settings: Settings,
    base: VmConfig,
    request: VmRequest,
}

impl Resolved {
    /// The config of a VM booted directly at the requested size.
    fn direct_config(&self) -> VmConfig {
        self.base.for_direct_boot(&self.request)
    }
}

impl VmArgs {
    /// Loads the configuration and applies these options; finds (or builds) the guest
    /// image when no kernel is configured and `local` says the VM config is needed here
    /// (not when a VMCache server will say which config its VMs have).
    fn resolve(&self, config_file: Option<&std::path::Path>, local: bool) -> Result<Resolved> {
        let mut settings = Settings::load(config_file)?;
        let qemu = &mut settings.hypervisor.qemu;
        if let Some(binary) = &self.qemu {
            qemu.path = binary.clone();
        }
        if let Some(accel) = self.accel {
            qemu.accelerator = accel;
        }
        if let Some(params) = &self.kernel_params {
            qemu.kernel_params = params.clone();
        }
        if let Some(timeout) = self.boot_timeout {
            qemu.boot_timeout = timeout;
        }
        let image = match (&self.kernel, &self.initrd) {
            (Some(kernel), Some(initrd)) => Some((kernel.clone(), initrd.clone())),
            // Another kernel with the initramfs of the configuration, else of the guest
            // image (the agent is /init): without one the kernel has no root to mount.
            (Some(kernel), None) => {
                let configured = &settings.hypervisor.qemu.initrd;
                let initrd = if !configured.as_os_str().is_empty() {
                    configured.clone()
                } else if local && kernel.exists() {
                    guest::ensure_image(&self.image, settings.guest.kernel, false)?.initrd
                } else {
                    // A kernel that is not there is refused by name before anything is
                    // booted; a VMCache server's VMs come with their own.
                    PathBuf::new()
                };
                Some((kernel.clone(), initrd))
            }
            (None, _) if local && settings.uses_guest_image() => {
                let image = guest::ensure_image(&self.image, settings.guest.kernel, false)?;
                Some((image.kernel, self.initrd.clone().unwrap_or(image.initrd)))
            }
            (None, _) => None,
        };
        if let Some((kernel, initrd)) = &image {
            settings.hypervisor.qemu.kernel = kernel.clone();
            settings.hypervisor.qemu.initrd = initrd.clone();
        }
        check_request(&settings.hypervisor.qemu, self.vcpus, self.memory)?;
        let mut base = settings.vm_config(None);
        // VMs are owned by the process that makes them (and die with it), except the
        // VMCache server's, which are handed over and must outlive it.
        base.qemu.die_with_parent = true;
        let request = VmRequest {
            vcpus: self.vcpus,
            memory_mib: self.memory,
        };
        Ok(Resolved {
            settings,
            base,
            request,
        })
    }
}

/// Refuses `--vcpus` / `--memory` beyond the configured hot-plug limits and the host.
fn check_request(
    qemu: &vmfactory_factory::settings::QemuSettings,
    vcpus: Option<u32>,
    memory: Option<u32>,
) -> Result<()> {
    let host_cpus = vmfactory_factory::settings::host_cpus();
    if let Some(vcpus) = vcpus.filter(|&v| v > qemu.default_maxvcpus.min(host_cpus)) {
        anyhow::bail!(
            "--vcpus {vcpus} exceeds the limit of {} (default_maxvcpus = {}, host CPUs = {host_cpus}): {}",
            qemu.default_maxvcpus.min(host_cpus),
            qemu.default_maxvcpus,
            if host_cpus < qemu.default_maxvcpus {
                "ask for fewer: a VM gets at most one vCPU per host CPU"
            } else {
                "ask for fewer, or raise default_maxvcpus in [hypervisor.qemu]"
            }
        );
    }
    if let Some(memory) = memory.filter(|&m| m > qemu.default_maxmemory) {
        anyhow::bail!(
            "--memory {memory} MiB exceeds default_maxmemory ({} MiB): ask for less, or raise default_maxmemory in [hypervisor.qemu] (at most the host's memory)",
            qemu.default_maxmemory
        );
    }
    Ok(())
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// How long a benchmark's tasks and threads get to remove what they set up when the
/// process ends (`bench run` finishes its current run, then stops a VMCache server).
const TASK_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("vmfactory: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_VMFACTORY_ERROR);
        }
    };
    // A benchmark keeps VMs in tasks of its own (warm pools, caches): shutting the runtime
    // down drops those tasks, and their VMs with them, before the process ends, also when
    // a signal ended the benchmark half-way.
    let drop_tasks = matches!(cli.command, Command::Bench(_));
    let code = match runtime.block_on(dispatch(cli.command, cli.config)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmfactory: {err:#}");
            ExitCode::from(EXIT_VMFACTORY_ERROR)
        }
    };
    if drop_tasks {
        runtime.shutdown_timeout(TASK_SHUTDOWN);
    } else {
        // Do not wait for a blocking read of our stdin that the guest command never needed.
        runtime.shutdown_background();
    }
    code
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

async fn dispatch(command: Command, config: Option<PathBuf>) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run::run(args, config).await,
        Command::Factory(command) => factory::run(command, config).await,
        Command::Sandbox(command) => sandbox::run(command, config).await,
        Command::Config(ConfigCommand::Show { json }) => {
            let settings = Settings::load(config.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                print!("{}", toml::to_string_pretty(&settings)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Guest(command) => {
            tokio::task::spawn_blocking(move || guest::run(command, config.as_deref()))
                .await
                .context("Guest image task failed")?
        }
        Command::Image(command) => tokio::task::spawn_blocking(move || image::run(command))
            .await
            .context("Image task failed")?,
        Command::Bench(command) => bench::run(command, config).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_beyond_the_limits_are_refused() {
        let qemu = vmfactory_factory::settings::QemuSettings::default();
        assert!(check_request(&qemu, Some(1), Some(qemu.default_maxmemory)).is_ok());
        assert!(check_request(&qemu, None, None).is_ok());
        let err = check_request(&qemu, None, Some(32 << 10)).expect_err("32 GiB");
        assert!(
            err.to_string()
                .contains("--memory 32768 MiB exceeds default_maxmemory"),
            "{err}"
        );
        let err = check_request(&qemu, Some(1000), None).expect_err("1000 vCPUs");
        assert!(err.to_string().contains("--vcpus 1000 exceeds"), "{err}");
    }
}
