//! The `vmfactory` command: run a command in a fresh micro-VM, build the guest image,
//! measure boot times.

mod bench;
mod guest;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::io::AsyncWriteExt;
use vmfactory_factory::{ExecRequest, Vm, VmConfig};
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
    Guest(GuestCommand),
    /// Measure vmfactory's speed; prints medians and p99 (JSON with --json).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Build the guest image (downloads Debian's cloud kernel and busybox with apt-get,
    /// builds the agent). Does nothing when the cached image is up to date.
    Build {
        /// Rebuild even if an up-to-date image is cached.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        image: guest::ImageArgs,
    },
}

/// Options describing the VM to boot, shared by `run` and `bench`.
#[derive(Debug, Clone, Args)]
struct VmArgs {
    /// vCPUs of the VM.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Accelerator: auto (KVM when it can run the guest, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    accel: Accelerator,
    /// QEMU binary (path or name in PATH).
    #[arg(long, env = "VMFACTORY_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest kernel; default: the one of the built guest image.
    #[arg(long, env = "VMFACTORY_KERNEL")]
    kernel: Option<PathBuf>,
    /// Guest initramfs; default: the one of the built guest image.
    #[arg(long, env = "VMFACTORY_INITRD")]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    #[arg(long, default_value = "")]
    kernel_params: String,
    /// Seconds a boot may take before giving up.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    #[command(flatten)]
    image: guest::ImageArgs,
}

fn parse_accel(s: &str) -> Result<Accelerator, String> {
    s.parse()
        .map_err(|err: vmfactory_hypervisor::HypervisorError| err.to_string())
}

impl VmArgs {
    /// The VM config these options describe; builds the guest image when no kernel is given.
    fn vm_config(&self) -> Result<VmConfig> {
        let (kernel, initrd) = match (&self.kernel, &self.initrd) {
            (Some(kernel), initrd) => (kernel.clone(), initrd.clone()),
            (None, initrd) => {
                let image = guest::ensure_image(&self.image, false)?;
                (image.kernel, Some(initrd.clone().unwrap_or(image.initrd)))
            }
        };
        let mut config = VmConfig {
            kernel,
            initrd,
            kernel_params: self.kernel_params.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            ..VmConfig::default()
        };
        config.max_vcpus = config.max_vcpus.max(self.vcpus);
        config.max_memory_mib = config.max_memory_mib.max(self.memory);
        config.qemu.binary = self.qemu.clone();
        config.qemu.accelerator = self.accel;
        Ok(config)
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
    match runtime.block_on(dispatch(cli.command)) {
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

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Guest(GuestCommand::Build { force, image }) => {
            let image = tokio::task::spawn_blocking(move || guest::ensure_image(&image, force))
                .await
                .context("Guest image build task failed")??;
            println!("kernel: {}", image.kernel.display());
            println!("initrd: {}", image.initrd.display());
            println!("kernel release: {}", image.kernel_release);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(command) => bench::run(command).await,
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let vm_args = args.vm.clone();
    let config = tokio::task::spawn_blocking(move || vm_args.vm_config())
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
        vm = Vm::new(&config) => vm.context("Cannot boot the VM")?,
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
