//! The `vmfactory` command: run a command in a fresh micro-VM, build the guest image,
//! measure boot times.

mod bench;
mod factory;
mod guest;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::io::AsyncWriteExt;
use vmfactory_factory::{ExecRequest, Settings, VmConfig};
use vmfactory_hypervisor::qemu::accel::Accelerator;

/// Exit status for vmfactory's own failures (as `docker run` does), distinct from the
/// guest command's exit codes.
const EXIT_VMFACTORY_ERROR: u8 = 125;
/// Exit status when the guest command hit `--timeout`.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status after Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

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
    Run(RunArgs),
    /// Manage the guest image (kernel + initramfs with the agent).
    #[command(subcommand)]
    Guest(guest::GuestCommand),
    /// Measure vmfactory's speed; prints medians and p99 (JSON with --json).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Manage the VM factory: the template (enable_template) of the [factory] section.
    #[command(subcommand)]
    Factory(factory::FactoryCommand),
    /// Show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (file plus defaults) as TOML.
    Show,
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
    /// Guest initramfs; default: the one of the built guest image.
    #[arg(long, env = "VMFACTORY_INITRD")]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    #[arg(long)]
    kernel_params: Option<String>,
    /// Seconds a boot may take before giving up.
    #[arg(long)]
    boot_timeout: Option<u64>,
    #[command(flatten)]
    image: guest::ImageArgs,
}

fn parse_accel(s: &str) -> Result<Accelerator, String> {
    s.parse()
        .map_err(|err: vmfactory_hypervisor::HypervisorError| err.to_string())
}

/// What a command works with: the effective settings, the factory's VM config (the
/// configuration's sizes) and the VM the user asked for (sizes from the command line).
#[derive(Debug, Clone)]
struct Resolved {
    settings: Settings,
    base: VmConfig,
    request: VmConfig,
}

impl VmArgs {
    /// Loads the configuration, applies these options, and builds the guest image when
    /// no kernel is configured.
    fn resolve(&self, config_file: Option<&std::path::Path>) -> Result<Resolved> {
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
            (Some(kernel), initrd) => Some((kernel.clone(), initrd.clone().unwrap_or_default())),
            (None, _) if settings.uses_guest_image() => {
                let image = guest::ensure_image(&self.image, false)?;
                Some((image.kernel, self.initrd.clone().unwrap_or(image.initrd)))
            }
            (None, _) => None,
        };
        if let Some((kernel, initrd)) = &image {
            settings.hypervisor.qemu.kernel = kernel.clone();
            settings.hypervisor.qemu.initrd = initrd.clone();
        }
        let base = settings.vm_config(None);
        let mut request = base.clone();
        request.vcpus = self.vcpus.unwrap_or(base.vcpus);
        request.memory_mib = self.memory.unwrap_or(base.memory_mib);
        request.max_vcpus = request.max_vcpus.max(request.vcpus);
        request.max_memory_mib = request.max_memory_mib.max(request.memory_mib);
        // A directly booted VM is booted at its final size and never grows: reserving
        // hot-plug room would only slow its boot.
        request.memory_slots = 0;
        Ok(Resolved {
            settings,
            base,
            request,
        })
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<u64>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(short, long, default_value = "/")]
    workdir: String,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

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
    match runtime.block_on(dispatch(cli.command, cli.config)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmfactory: {err:#}");
            ExitCode::from(EXIT_VMFACTORY_ERROR)
        }
    }
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
        Command::Run(args) => run(args, config).await,
        Command::Factory(command) => factory::run(command, config).await,
        Command::Config(ConfigCommand::Show) => {
            let settings = Settings::load(config.as_deref())?;
            print!("{}", toml::to_string_pretty(&settings)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Guest(command) => tokio::task::spawn_blocking(move || guest::run(command))
            .await
            .context("Guest image task failed")?,
        Command::Bench(command) => bench::run(command, config).await,
    }
}

async fn run(args: RunArgs, config_file: Option<PathBuf>) -> Result<ExitCode> {
    let vm_args = args.vm.clone();
    let resolved = tokio::task::spawn_blocking(move || vm_args.resolve(config_file.as_deref()))
        .await
        .context("Preparing the VM failed")??;
    let interrupted = || async {
        // If the handler cannot be installed, behave as if Ctrl-C never comes.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };

    // Dropping a VM that is still starting kills it and removes its directory.
    let vm = tokio::select! {
        vm = factory::get_vm(&resolved) => vm?,
        () = interrupted() => {
            eprintln!("vmfactory: interrupted");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    let request = ExecRequest {
        argv: args.command,
        env: args.env,
        workdir: args.workdir,
        stdin: Vec::new(),
        timeout: args.timeout.map(Duration::from_secs),
    };
    let outcome = tokio::select! {
        output = vm.exec(request) => Some(output),
        () = interrupted() => None,
    };
    let stopped = vm.stop().await;
    let Some(output) = outcome else {
        eprintln!("vmfactory: interrupted");
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    let output = output.context("Cannot run the command in the VM")?;
    if let Err(err) = stopped {
        tracing::warn!(%err, "Stopping the VM failed");
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    stdout.write_all(&output.stdout).await?;
    stdout.flush().await?;
    stderr.write_all(&output.stderr).await?;
    if output.truncated {
        stderr
            .write_all(b"vmfactory: output was truncated by the guest agent's limit\n")
            .await?;
    }
    stderr.flush().await?;
    if output.timed_out {
        eprintln!("vmfactory: the command timed out and was killed");
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    match (output.exit_code, output.signal) {
        (Some(code), _) => Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))),
        (None, Some(signal)) => {
            let code = 128 + (signal & 0x7f);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        (None, None) => bail!("The guest agent reported neither an exit code nor a signal"),
    }
}
