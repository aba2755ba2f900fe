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
pub(crate) const EXIT_VMFACTORY_ERROR: u8 = 125;
/// Exit status for a command line that cannot work as given (as clap's usage errors).
pub(crate) const EXIT_USAGE: u8 = 2;

/// A command line that cannot work as given, found after parsing (a malformed `cp`
/// argument, `-t` without a terminal, a bad name): exit status 2, like clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

/// Returns early with a [`UsageError`].
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err($crate::UsageError(format!($($arg)*)).into())
    };
}
pub(crate) use usage;

/// vmfactory hands out ready, hardware-isolated micro-VMs: QEMU guests booted from a
/// minimal kernel and initramfs whose PID 1 is the vmfactory agent.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log more (-v: info, -vv: vmfactory's debug lines, -vvv: every library's too).
    /// RUST_LOG overrides.
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
    /// Print the effective configuration (file plus defaults, and the VMFACTORY_QEMU,
    /// VMFACTORY_KERNEL, VMFACTORY_INITRD, VMFACTORY_GUEST_KERNEL and VMFACTORY_GUEST_QEMU
    /// variables, each named on stderr when set) as TOML.
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
    #[arg(long, value_parser = parse_vcpus)]
    vcpus: Option<u32>,
    /// Guest memory in MiB, at least 64 (default: hypervisor.qemu.default_memory, 256).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u32>,
    /// Accelerator: auto (KVM when it can run the guest, else TCG), kvm or tcg.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accelerator>,
    /// QEMU binary (path or name in PATH).
    #[arg(long, env = "VMFACTORY_QEMU")]
    qemu: Option<PathBuf>,
    /// A guest kernel file to boot instead of the guest image's (overrides
    /// --guest-kernel, which chooses the kind of kernel the guest image is built with).
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

fn parse_vcpus(value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(0) => Err("a VM needs at least 1 vCPU".into()),
        Ok(vcpus) => Ok(vcpus),
        Err(_) => Err(format!("{value:?} is not a whole number of vCPUs")),
    }
}

fn parse_memory(value: &str) -> Result<u32, String> {
    let least = vmfactory_hypervisor::MIN_MEMORY_MIB;
    match value.trim().parse::<u32>() {
        Ok(mib) if mib < least => Err(format!("a VM needs at least {least} MiB")),
        Ok(mib) => Ok(mib),
        Err(_) => Err(format!("{value:?} is not a whole number of MiB (e.g. 512)")),
    }
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
        self.check_given_files()?;
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
            // The configured kernel with another initramfs.
            (None, Some(initrd)) if !settings.hypervisor.qemu.kernel.as_os_str().is_empty() => {
                Some((settings.hypervisor.qemu.kernel.clone(), initrd.clone()))
            }
            (None, _) => None,
        };
        if let Some((kernel, initrd)) = &image {
            settings.hypervisor.qemu.kernel = kernel.clone();
            settings.hypervisor.qemu.initrd = initrd.clone();
        }
        // Recorded, so a configuration written from these settings (`bench run`'s)
        // chooses the same QEMU.
        if let Some(source) = self.image.guest_qemu {
            settings.guest.qemu = source;
        }
        if local && guest::wants_built_qemu(&self.image, &settings) {
            // A build's profile is trained on the kernel these VMs boot.
            let kernel =
                Some(settings.hypervisor.qemu.kernel.as_path()).filter(|kernel| kernel.is_file());
            if let Some(binary) = guest::built_qemu(&self.image, kernel) {
                settings.hypervisor.qemu.path = binary;
            }
        }
        check_request(&settings.hypervisor.qemu, self.vcpus, self.memory)?;
        let mut base = settings.vm_config(None);
        // The build of this vmfactory's recipe, chosen here or named by the configuration,
        // has every one of its patches.
        base.qemu.vmfactory_build = local && guest::is_built_qemu(&self.image, &base.qemu.binary);
        // VMs are owned by the process that makes them (and die with it), except the
        // VMCache server's, which are handed over and must outlive it.
        base.qemu.die_with_parent = true;
        if local && settings.hypervisor.qemu.stub_unused_libraries {
            // Checked once per QEMU binary; every later command only looks at a marker.
            if let Ok(binary) =
                vmfactory_hypervisor::qemu::config::resolve_binary(&base.qemu.binary)
            {
                let cache = self
                    .image
                    .cache_dir
                    .clone()
                    .unwrap_or_else(vmfactory_guest_image::default_cache_dir);
                base.qemu.library_dir =
                    vmfactory_hypervisor::qemu::libstub::prepare(&cache, &binary);
            }
        }
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

    /// Refuses `--vcpus` / `--memory` beyond the configuration's limits (exit status 2),
    /// for a command that resolves the VM later, elsewhere (`sandbox create`: its
    /// supervisor), before it does anything else.
    fn check_size(&self, config_file: Option<&std::path::Path>) -> Result<()> {
        let settings = Settings::load(config_file)?;
        check_request(&settings.hypervisor.qemu, self.vcpus, self.memory)
    }

    /// Refuses a file named by `--kernel`, `--initrd` or `--qemu` (or their environment
    /// variables) that is not there, by the option that named it, before anything starts.
    fn check_given_files(&self) -> Result<()> {
        let files = [
            ("--kernel", "VMFACTORY_KERNEL", "guest kernel", &self.kernel),
            ("--initrd", "VMFACTORY_INITRD", "initramfs", &self.initrd),
        ];
        for (flag, env, what, path) in files {
            if let Some(path) = path.as_ref().filter(|path| !path.is_file()) {
                anyhow::bail!(
                    "{flag} {}: no such file; give the path of a {what}, or leave out {flag} \
                     (and {env}) to use the guest image's",
                    path.display()
                );
            }
        }
        if let Some(qemu) = &self.qemu {
            if vmfactory_hypervisor::qemu::config::resolve_binary(qemu).is_err() {
                anyhow::bail!(
                    "--qemu {}: {}; give the path of qemu-system-x86_64, or leave out --qemu \
                     (and VMFACTORY_QEMU) to use the configured one",
                    qemu.display(),
                    if qemu.components().count() > 1 {
                        "no such file"
                    } else {
                        "not found in PATH"
                    }
                );
            }
        }
        Ok(())
    }
}

/// Refuses `--vcpus` / `--memory` beyond the configured hot-plug limits and the host, as
/// a command line that cannot work (exit status 2), before anything starts.
fn check_request(
    qemu: &vmfactory_factory::settings::QemuSettings,
    vcpus: Option<u32>,
    memory: Option<u32>,
) -> Result<()> {
    let host_cpus = vmfactory_factory::settings::host_cpus();
    if let Some(vcpus) = vcpus.filter(|&v| v > qemu.default_maxvcpus.min(host_cpus)) {
        usage!(
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
        usage!(
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

/// Makes a failed write to standard output end vmfactory as a shell tool ends, instead of
/// with a panic and its backtrace: `println!` panics when the output is closed (a reader
/// such as `head` went away: exit status 141, quietly, as a process killed by SIGPIPE)
/// or cannot be written (a full disk: the reason, exit status 125). The Rust runtime
/// ignores SIGPIPE, which our sockets need (a write to a VM that died must fail, not kill
/// us), so the signal itself cannot do it. Other panics keep the default report.
fn end_quietly_on_output_failures() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(reason) = message.strip_prefix("failed printing to stdout: ") {
            if reason.contains("Broken pipe") {
                std::process::exit(i32::from(run::EXIT_BROKEN_PIPE));
            }
            eprintln!("vmfactory: cannot write to standard output: {reason}");
            std::process::exit(i32::from(EXIT_VMFACTORY_ERROR));
        }
        report(info);
    }));
}

fn main() -> ExitCode {
    end_quietly_on_output_failures();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(mut err) => {
            let args = std::env::args_os().map(|arg| arg.to_string_lossy().into_owned());
            if let Some(tip) = command_after_dashes(&err, args) {
                err.insert(
                    clap::error::ContextKind::Suggested,
                    clap::error::ContextValue::StyledStrs(vec![tip.into()]),
                );
            }
            err.exit()
        }
    };
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
    if let Some(config) = &cli.config {
        let from_env = std::env::var_os("VMFACTORY_CONFIG");
        if from_env.as_deref() != Some(config.as_os_str()) {
            let _ = CONFIG_FOR_HINTS.set(config.clone());
        }
    }
    let code = match runtime.block_on(dispatch(cli.command, cli.config)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmfactory: {}", printable(&hints(&format!("{err:#}"))));
            let usage = err.downcast_ref::<UsageError>().is_some()
                || matches!(
                    err.downcast_ref::<vmfactory_sandbox::SandboxError>(),
                    Some(vmfactory_sandbox::SandboxError::Name { .. })
                );
            ExitCode::from(if usage {
                EXIT_USAGE
            } else {
                EXIT_VMFACTORY_ERROR
            })
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

/// For a command given to `run` or `sandbox exec` without `--` (`vmfactory run uname -a`):
/// the same command line with `--` before the command, as a tip.
fn command_after_dashes(
    err: &clap::Error,
    args: impl IntoIterator<Item = String>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(unexpected)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let usage = match err.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(usage)) => usage.to_string(),
        _ => return None,
    };
    let takes_command = ["vmfactory run ", "vmfactory sandbox exec "]
        .iter()
        .any(|command| usage.contains(command));
    if unexpected.starts_with('-') || !takes_command {
        return None;
    }
    let args: Vec<String> = args.into_iter().skip(1).collect();
    let with_dashes = |at: usize| {
        std::iter::once("vmfactory")
            .chain(args[..at].iter().map(String::as_str))
            .chain(std::iter::once("--"))
            .chain(args[at..].iter().map(String::as_str))
            .collect::<Vec<_>>()
    };
    // The first place where `--` makes a command line that parses (the unexpected word
    // may also appear earlier, as a sandbox's name or an option's value).
    let words = (0..args.len())
        .filter(|&at| args[at] == *unexpected)
        .map(with_dashes)
        .find(|words| Cli::try_parse_from(words).is_ok())?;
    let words: Vec<String> = words.into_iter().map(shell_word).collect();
    Some(format!("the command goes after `--`: {}", words.join(" ")))
}

/// `word` as a shell would need it written: single-quoted when it holds anything but
/// plain characters.
pub(crate) fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `--config` file of this command, unless it came from `VMFACTORY_CONFIG` (which
/// reaches the next command by itself).
static CONFIG_FOR_HINTS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `message` with its control characters (but newlines and tabs) written as `\x1b`,
/// `\u{9b}`: an error may quote what an image, a guest or a file holds, and its bytes
/// must not drive the user's terminal (colours, titles, cursor moves).
pub(crate) fn printable(message: &str) -> std::borrow::Cow<'_, str> {
    let control = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !message.chars().any(control) {
        return message.into();
    }
    message
        .chars()
        .map(|c| match c {
            c if control(c) && u32::from(c) < 0x80 => format!("\\x{:02x}", u32::from(c)),
            c if control(c) => format!("\\u{{{:x}}}", u32::from(c)),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// `message` with `--config FILE` added to the commands it tells the user to run next
/// (`vmfactory factory destroy`, say): without it, such a command would act on the
/// default configuration's factory, not the one this command used. It is added here,
/// where the command line is known; the libraries that word the hints do not know it.
pub(crate) fn hints(message: &str) -> String {
    with_config_in_hints(message, CONFIG_FOR_HINTS.get().map(PathBuf::as_path))
}

fn with_config_in_hints(message: &str, config: Option<&std::path::Path>) -> String {
    let Some(config) = config else {
        return message.to_string();
    };
    let with = format!(
        "vmfactory --config {} ",
        shell_word(&config.to_string_lossy())
    );
    message
        .replace("`vmfactory ", &format!("`{with}"))
        .replace("'vmfactory ", &format!("'{with}"))
}

/// vmfactory's own crates, whose debug lines `-vv` shows (the libraries' ones, HTTP/2
/// frames above all, only `-vvv`).
const OWN_CRATES: [&str; 7] = [
    "vmfactory",
    "vmfactory_factory",
    "vmfactory_hypervisor",
    "vmfactory_sandbox",
    "vmfactory_image",
    "vmfactory_guest_image",
    "vmfactory_protocols",
];

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn".to_string(),
        1 => "info".to_string(),
        2 => std::iter::once("info".to_string())
            .chain(OWN_CRATES.iter().map(|name| format!("{name}=debug")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "debug".to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // Where a line comes from matters once libraries' lines are shown.
        .with_target(verbose >= 3);
    let only_problems = std::env::var("RUST_LOG").map_or(true, |filter| {
        ["warn", "error", "off"].contains(&filter.trim())
    });
    if verbose == 0 && only_problems {
        // Only warnings and errors: said as every other line of ours is.
        builder.event_format(PlainEvents).init();
    } else {
        builder.init();
    }
}

/// Log events as `vmfactory: warning: message key=value`, the way vmfactory's other
/// lines read (no time stamp, level or source: those are for `-v` and logs).
struct PlainEvents;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for PlainEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        write!(writer, "vmfactory: {level}: ")?;
        context
            .field_format()
            .format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

async fn dispatch(command: Command, config: Option<PathBuf>) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run::run(args, config).await,
        Command::Factory(command) => factory::run(command, config).await,
        Command::Sandbox(command) => sandbox::run(command, config).await,
        Command::Config(ConfigCommand::Show { json }) => {
            let mut settings = Settings::load(config.as_deref())?;
            for said in apply_environment(&mut settings)? {
                eprintln!("vmfactory: {said}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                print!("{}", toml::to_string_pretty(&settings)?);
            }
            // `path` is empty unless a QEMU is named: say which one VMs run (after the
            // configuration, so an output that failed is all that is said).
            if settings.hypervisor.qemu.path.as_os_str().is_empty() {
                eprintln!("vmfactory: {}", qemu_in_use(&settings));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Guest(command) => {
            tokio::task::spawn_blocking(move || guest::run(command, config.as_deref()))
                .await
                .context("Guest image task failed")?
        }
        Command::Image(command) => {
            // Images take nothing from the configuration, but a --config given (or
            // VMFACTORY_CONFIG) that cannot be read is a mistake to report, not to skip.
            if let Some(path) = &config {
                Settings::load(Some(path))?;
            }
            tokio::task::spawn_blocking(move || image::run(command))
                .await
                .context("Image task failed")?
        }
        Command::Bench(command) => bench::run(command, config).await,
    }
}

/// Which QEMU VMs run when `hypervisor.qemu.path` is empty, for `config show`.
fn qemu_in_use(settings: &Settings) -> String {
    match settings.guest.qemu {
        vmfactory_guest_image::QemuSource::Debian => {
            "VMs run Debian's qemu-system-x86_64 (guest.qemu = \"debian\")".to_string()
        }
        vmfactory_guest_image::QemuSource::Vmfactory => {
            match vmfactory_guest_image::current_qemu(&vmfactory_guest_image::default_cache_dir()) {
                Some(built) => format!("VMs run vmfactory's QEMU, {}", built.binary.display()),
                None => "VMs run vmfactory's QEMU, not built yet for the installed \
                         qemu-system-x86 (`vmfactory guest build` builds it)"
                    .to_string(),
            }
        }
    }
}

/// Applies the environment variables that override configuration keys for every command
/// (as the options they stand for would), so `config show` shows what a command would
/// use; returns a line for each variable set: what it overrides, or why it has no effect.
fn apply_environment(settings: &mut Settings) -> Result<Vec<String>> {
    let mut said = Vec::new();
    let given = |variable: &str| std::env::var_os(variable).filter(|given| !given.is_empty());
    if given("VMFACTORY_RUNTIME_DIR").is_some() {
        said.push(
            "VMFACTORY_RUNTIME_DIR sets the default runtime directory (hypervisor.qemu.runtime_dir, and the template and socket in it)"
                .to_string(),
        );
    }
    let qemu = &mut settings.hypervisor.qemu;
    if let Some(path) = given("VMFACTORY_QEMU") {
        qemu.path = PathBuf::from(path);
        said.push("VMFACTORY_QEMU overrides hypervisor.qemu.path".to_string());
    }
    let kernel_given = given("VMFACTORY_KERNEL");
    if let Some(kernel) = &kernel_given {
        qemu.kernel = PathBuf::from(kernel);
        said.push("VMFACTORY_KERNEL overrides hypervisor.qemu.kernel".to_string());
    }
    if let Some(initrd) = given("VMFACTORY_INITRD") {
        qemu.initrd = PathBuf::from(initrd);
        said.push("VMFACTORY_INITRD overrides hypervisor.qemu.initrd".to_string());
    } else if kernel_given.is_some() && qemu.initrd.as_os_str().is_empty() {
        said.push(
            "with VMFACTORY_KERNEL and no initrd, commands boot the guest image's initramfs"
                .to_string(),
        );
    }
    if let Some(source) = given("VMFACTORY_GUEST_KERNEL") {
        let source = source.to_string_lossy();
        settings.guest.kernel = source
            .parse()
            .map_err(|err| anyhow::anyhow!("VMFACTORY_GUEST_KERNEL={source}: {err}"))?;
        said.push(if settings.hypervisor.qemu.kernel.as_os_str().is_empty() {
            "VMFACTORY_GUEST_KERNEL overrides guest.kernel".to_string()
        } else {
            "VMFACTORY_GUEST_KERNEL has no effect: hypervisor.qemu.kernel names the kernel"
                .to_string()
        });
    }
    if let Some(source) = given("VMFACTORY_GUEST_QEMU") {
        let source = source.to_string_lossy();
        settings.guest.qemu = source
            .parse()
            .map_err(|err| anyhow::anyhow!("VMFACTORY_GUEST_QEMU={source}: {err}"))?;
        said.push(if settings.hypervisor.qemu.path.as_os_str().is_empty() {
            "VMFACTORY_GUEST_QEMU overrides guest.qemu".to_string()
        } else {
            "VMFACTORY_GUEST_QEMU has no effect: hypervisor.qemu.path names the QEMU".to_string()
        });
    }
    Ok(said)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(args: &[&str]) -> clap::Error {
        Cli::try_parse_from(args).expect_err("a usage error")
    }

    fn owned(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn a_command_without_dashes_gets_a_tip_with_them() {
        let args = ["vmfactory", "run", "--vcpus", "2", "uname", "-a"];
        let tip = command_after_dashes(&parse_error(&args), owned(&args));
        assert_eq!(
            tip.as_deref(),
            Some("the command goes after `--`: vmfactory run --vcpus 2 -- uname -a")
        );
        let args = ["vmfactory", "sandbox", "exec", "dev", "sh", "-c", "echo hi"];
        let tip = command_after_dashes(&parse_error(&args), owned(&args));
        assert_eq!(
            tip.as_deref(),
            Some("the command goes after `--`: vmfactory sandbox exec dev -- sh -c 'echo hi'")
        );
        // The word may come earlier as a sandbox's name or an option's value.
        let args = ["vmfactory", "sandbox", "exec", "sh", "sh", "-c", "x"];
        let tip = command_after_dashes(&parse_error(&args), owned(&args));
        assert_eq!(
            tip.as_deref(),
            Some("the command goes after `--`: vmfactory sandbox exec sh -- sh -c x")
        );
        // An unknown option is not a command, and other commands take none.
        let args = ["vmfactory", "run", "--bogus"];
        assert_eq!(
            command_after_dashes(&parse_error(&args), owned(&args)),
            None
        );
        let args = ["vmfactory", "sandbox", "pause", "dev", "extra"];
        assert_eq!(
            command_after_dashes(&parse_error(&args), owned(&args)),
            None
        );
    }

    #[test]
    fn an_initrd_option_replaces_the_configured_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").expect("write");
            path
        };
        let (kernel, configured, given) = (file("vmlinux"), file("conf.img"), file("given.img"));
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {configured:?}\n"),
        )
        .expect("config");
        let args = |initrd: Option<&std::path::Path>| VmArgs {
            vcpus: None,
            memory: None,
            accel: None,
            qemu: None,
            kernel: None,
            initrd: initrd.map(std::path::Path::to_path_buf),
            kernel_params: None,
            boot_timeout: None,
            image: guest::ImageArgs {
                cache_dir: None,
                agent: None,
                guest_kernel: None,
                // Debian's: a unit test builds no QEMU.
                guest_qemu: Some(vmfactory_guest_image::QemuSource::Debian),
            },
        };
        for (initrd, expected) in [(None, &configured), (Some(given.as_path()), &given)] {
            let resolved = args(initrd).resolve(Some(&config), true).expect("resolve");
            assert_eq!(&resolved.settings.hypervisor.qemu.kernel, &kernel);
            assert_eq!(&resolved.settings.hypervisor.qemu.initrd, expected);
            // --guest-qemu is kept in the settings (a configuration written from them
            // chooses the same QEMU), and Debian's QEMU is no path of vmfactory's.
            assert_eq!(
                resolved.settings.guest.qemu,
                vmfactory_guest_image::QemuSource::Debian
            );
            assert!(resolved
                .settings
                .hypervisor
                .qemu
                .path
                .as_os_str()
                .is_empty());
        }
    }

    #[test]
    fn errors_cannot_drive_the_terminal() {
        assert_eq!(printable("plain\nline\ttab"), "plain\nline\ttab");
        assert_eq!(
            printable("size of \u{1b}[31mRED\u{1b}]0;t\u{7} \u{9b}2J"),
            "size of \\x1b[31mRED\\x1b]0;t\\x07 \\u{9b}2J"
        );
    }

    #[test]
    fn hints_name_the_configuration_the_command_used() {
        let message =
            "A template already exists at /t: remove it with `vmfactory factory destroy` first";
        assert_eq!(with_config_in_hints(message, None), message);
        assert_eq!(
            with_config_in_hints(message, Some(std::path::Path::new("/etc/my vm.toml"))),
            "A template already exists at /t: remove it with \
             `vmfactory --config '/etc/my vm.toml' factory destroy` first"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("/a/b.toml"), "/a/b.toml");
    }

    #[test]
    fn sizes_below_a_vm_s_least_are_refused_by_the_parser() {
        assert_eq!(parse_vcpus("2"), Ok(2));
        assert!(parse_vcpus("0").expect_err("0").contains("at least 1 vCPU"));
        assert!(parse_vcpus("two").is_err());
        assert_eq!(parse_memory("64"), Ok(64));
        assert!(parse_memory("63")
            .expect_err("63")
            .contains("at least 64 MiB"));
        assert!(parse_memory("-1").is_err());
    }

    #[test]
    fn files_named_on_the_command_line_must_exist() {
        let args = |extra: &[&str]| {
            let mut all = vec!["vmfactory", "run"];
            all.extend_from_slice(extra);
            all.push("--");
            all.push("true");
            match Cli::try_parse_from(all).expect("parses").command {
                Command::Run(run) => run.vm_args().clone(),
                other => panic!("{other:?}"),
            }
        };
        let err = args(&["--kernel", "/nonexistent/vmlinux"])
            .check_given_files()
            .expect_err("missing kernel");
        assert!(
            err.to_string()
                .starts_with("--kernel /nonexistent/vmlinux: no such file"),
            "{err}"
        );
        let err = args(&["--qemu", "no-such-qemu-binary"])
            .check_given_files()
            .expect_err("missing qemu");
        assert!(err.to_string().contains("not found in PATH"), "{err}");
        let here = std::env::current_exe().expect("exe");
        let here = here.to_str().expect("utf-8");
        assert!(args(&["--kernel", here, "--qemu", here])
            .check_given_files()
            .is_ok());
    }

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
