//! Finding or building the guest image for the CLI. The agent is the one embedded in
//! this binary (see `build.rs`) unless `--agent` names another. Commands that boot VMs
//! take the current image from the cache's `current.json` (a few `stat` calls, nothing
//! spawned); only a missing or stale image, and `vmfactory guest build`, ask apt.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use vmfactory_factory::settings::Settings;
use vmfactory_guest_image::{
    build, check, current, current_qemu, default_cache_dir, embedded_agent_path, ensure_qemu,
    install_embedded_agent, prune_cache, BuildOptions, BuiltQemu, GuestImage, KernelSource,
    QemuBuild, QemuSource, UpdateCheck, UpdateStatus, PRUNE_IDLE,
};
use vmfactory_hypervisor::qemu::libstub::untrusted_code_path;

/// The static guest agent, built by `build.rs` with the workspace's `agent` profile.
static EMBEDDED_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmfactory-agent"));
/// Hex SHA-256 of [`EMBEDDED_AGENT`], computed by `build.rs`.
const EMBEDDED_AGENT_SHA256: &str = env!("VMFACTORY_AGENT_SHA256");

/// Exit status of `guest build --check` when apt offers another kernel or busybox than
/// the current image has.
pub const EXIT_UPDATE_AVAILABLE: u8 = 100;
/// Exit status of `guest build --check` when no image is current for these options.
pub const EXIT_NO_IMAGE: u8 = 101;

/// Where the guest image and the agent come from.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Cache directory of guest images (default: $VMFACTORY_CACHE_DIR, else
    /// $XDG_CACHE_HOME/vmfactory, else ~/.cache/vmfactory).
    #[arg(long, env = "VMFACTORY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Static agent binary to use as the guest's /init instead of the one built into
    /// vmfactory.
    #[arg(long, env = "VMFACTORY_AGENT")]
    pub agent: Option<PathBuf>,
    /// Guest kernel: vmfactory (built from Debian's kernel source with vmfactory's
    /// config, every driver built in) or debian (Debian's cloud kernel and its virtio
    /// modules). Default: [guest] kernel of the configuration, else vmfactory.
    #[arg(long, env = "VMFACTORY_GUEST_KERNEL", value_name = "vmfactory|debian")]
    pub guest_kernel: Option<KernelSource>,
    /// QEMU of the VMs when no `--qemu` or `[hypervisor.qemu] path` names one: vmfactory
    /// (built by `guest build` from the source of the installed qemu-system-x86, with only
    /// the devices vmfactory's VMs use; starts in about half the time) or debian (the
    /// installed qemu-system-x86_64). Default: [guest] qemu of the configuration, else
    /// vmfactory.
    #[arg(long, env = "VMFACTORY_GUEST_QEMU", value_name = "vmfactory|debian")]
    pub guest_qemu: Option<QemuSource>,
}

/// `vmfactory guest …`
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Build the guest image: ask apt for Debian's newest kernel and busybox, download
    /// them, compile vmfactory's kernel from the kernel source (once per source version,
    /// config and compiler; needs bc bison flex libelf-dev libssl-dev make gcc xz-utils), and pack
    /// it with the agent. Then build vmfactory's QEMU from the source of the installed
    /// qemu-system-x86 (once per version, about 5 minutes on two cores: compiled twice,
    /// the second time optimised by a profile of the first booting the kernel; needs meson
    /// ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev
    /// dpkg-dev), unless Debian's QEMU or a QEMU path is configured. Does nothing when both are up to date; prints
    /// their paths. Then removes from the cache what earlier versions left and nothing
    /// current uses (guest images, kernel and QEMU builds, downloaded packages, QEMU
    /// sources) once unused for 7 days, and says how much.
    Build(BuildArgs),
}

/// Options of `vmfactory guest build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Rebuild even if an up-to-date image is cached, compiling vmfactory's kernel (and
    /// QEMU) again (minutes).
    #[arg(long, conflicts_with = "check")]
    force: bool,
    /// Only say whether apt offers a newer kernel or busybox than the current image, and
    /// whether vmfactory's QEMU is built for the installed qemu-system-x86; build
    /// nothing. Exit status: 0 up to date, 100 an update is available (or the QEMU is to
    /// be built), 101 no image is built yet, 125 the check failed.
    #[arg(long)]
    check: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    image: ImageArgs,
}

/// Runs a `vmfactory guest` command (blocking: it may run apt and build an image).
pub fn run(command: GuestCommand, config: Option<&Path>) -> Result<ExitCode> {
    let GuestCommand::Build(args) = command;
    let settings = Settings::load(config)?;
    let configured = settings.guest.kernel;
    let options = build_options(&args.image, configured)?;
    if args.check {
        let report = check(&options).context("Cannot check for a newer guest kernel")?;
        // vmfactory's QEMU is current when it was built for the installed
        // qemu-system-x86 by this vmfactory (`None`: VMs run another QEMU).
        let qemu_current = wants_built_qemu(&args.image, &settings)
            .then(|| current_qemu(&options.cache_dir).is_some());
        print_check(
            &report,
            qemu_current,
            &build_command(&args.image),
            args.json,
        )?;
        return Ok(match (report.status, qemu_current) {
            (UpdateStatus::NoImage, _) => ExitCode::from(EXIT_NO_IMAGE),
            (UpdateStatus::UpdateAvailable, _) | (_, Some(false)) => {
                ExitCode::from(EXIT_UPDATE_AVAILABLE)
            }
            (UpdateStatus::UpToDate, _) => ExitCode::SUCCESS,
        });
    }
    let image = build_image(&options, args.force)?;
    let qemu = if wants_built_qemu(&args.image, &settings) {
        let cache = &options.cache_dir;
        if let Some(dir) = untrusted_code_path(cache, &cache.join("qemu")) {
            bail!(
                "Not building vmfactory's QEMU in {}: another user may write to {} (vmfactory \
                 runs it only from a cache no one else can change); use a cache of your own \
                 (--cache-dir), or Debian's QEMU (--guest-qemu debian)",
                cache.display(),
                dir.display()
            );
        }
        let built = build_qemu(cache, args.force, &image.kernel)?;
        let _ = std::fs::remove_file(cache.join(QEMU_FAILURE_FILE));
        Some(built)
    } else {
        None
    };
    // What earlier versions, kernels and QEMU recipes left behind, once nothing current
    // refers to it and it was not used for a week.
    let pruned = prune_cache(&options.cache_dir, PRUNE_IDLE);
    if !pruned.removed.is_empty() {
        let count = pruned.removed.len();
        eprintln!(
            "vmfactory: Removed {count} cache {} nothing current uses and unused for {} days \
             ({:.1} MiB): earlier guest images, kernel or QEMU builds, packages",
            if count == 1 { "entry" } else { "entries" },
            PRUNE_IDLE.as_secs() / 86_400,
            pruned.bytes as f64 / f64::from(1u32 << 20)
        );
    }
    if args.json {
        let mut value = serde_json::to_value(&image)?;
        if let Some(object) = value.as_object_mut() {
            object.insert("qemu".into(), serde_json::to_value(&qemu)?);
            object.insert("pruned".into(), serde_json::to_value(&pruned)?);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("kernel: {}", image.kernel.display());
        println!("initrd: {}", image.initrd.display());
        println!("kernel release: {}", image.kernel_release);
        println!("kernel source: {}", image.kernel_source);
        if let Some(qemu) = &qemu {
            println!("qemu: {}", qemu.binary.display());
            println!(
                "qemu source: {} {}",
                qemu.source_package, qemu.source_version
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// True when VMs of these options run vmfactory's built QEMU: no QEMU is named
/// (`[hypervisor.qemu] path`, `VMFACTORY_QEMU`) and `--guest-qemu`, else `[guest] qemu`,
/// says vmfactory.
pub fn wants_built_qemu(args: &ImageArgs, settings: &Settings) -> bool {
    settings.hypervisor.qemu.path.as_os_str().is_empty()
        && !std::env::var_os("VMFACTORY_QEMU").is_some_and(|given| !given.is_empty())
        && args.guest_qemu.unwrap_or(settings.guest.qemu) == QemuSource::Vmfactory
}

/// True when `binary` (a path or a name in `PATH`) is the QEMU build of this vmfactory's
/// recipe, the one [`current_qemu`] names, so it has every patch of that recipe: when a
/// command resolved it itself, and when a configuration names it (`bench run` writes one).
pub fn is_built_qemu(args: &ImageArgs, binary: &Path) -> bool {
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let Some(built) = current_qemu(&cache_dir) else {
        return false;
    };
    let canonical = |path: &Path| std::fs::canonicalize(path).ok();
    vmfactory_hypervisor::qemu::config::resolve_binary(binary)
        .ok()
        .and_then(|binary| canonical(&binary))
        .is_some_and(|binary| canonical(&built.binary) == Some(binary))
}

/// Records a failed build of vmfactory's QEMU for a while, so commands do not retry it
/// (apt and a compile) one after another.
const QEMU_FAILURE_FILE: &str = "qemu/build-failed";
/// How long a failed build is not retried by commands other than `guest build`.
const QEMU_RETRY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// The QEMU for a command's VMs: vmfactory's, found in the cache or built now (with apt;
/// minutes). `None` (Debian's `qemu-system-x86_64` then, with a warning) when the cache
/// is one another user may write to (this would run their binary), or when the build
/// failed within the last hour: a command still runs, and `vmfactory guest build` says
/// why.
///
/// A build's profile is trained on `kernel`, the kernel the command's VMs boot; without
/// one (none is configured) nothing is built.
pub fn built_qemu(args: &ImageArgs, kernel: Option<&Path>) -> Option<PathBuf> {
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    if let Some(dir) = untrusted_code_path(&cache_dir, &cache_dir.join("qemu")) {
        tracing::warn!(
            "Running Debian's QEMU: another user may write to {} (vmfactory's QEMU is \
             run only from a cache no one else can change)",
            dir.display()
        );
        return None;
    }
    if let Some(built) = current_qemu(&cache_dir) {
        if let Some(dir) = untrusted_code_path(&cache_dir, &built.binary) {
            tracing::warn!(
                "Running Debian's QEMU: another user may write to {}",
                dir.display()
            );
            return None;
        }
        tracing::debug!(binary = %built.binary.display(), "using vmfactory's QEMU");
        return Some(built.binary);
    }
    let Some(kernel) = kernel else {
        tracing::warn!(
            "Running Debian's QEMU: vmfactory's is built with a profile of the VMs' kernel, \
             and no kernel file is configured (`vmfactory guest build` builds both)"
        );
        return None;
    };
    let failed = cache_dir.join(QEMU_FAILURE_FILE);
    let recent = std::fs::metadata(&failed)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|age| age < QEMU_RETRY);
    if recent {
        tracing::warn!(
            "Running Debian's QEMU: building vmfactory's failed less than an hour ago \
             (`vmfactory guest build` tries again and says why)"
        );
        return None;
    }
    match build_qemu(&cache_dir, false, kernel) {
        Ok(built) => {
            let _ = std::fs::remove_file(&failed);
            Some(built.binary)
        }
        Err(err) => {
            if let Some(parent) = failed.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&failed, format!("{err:#}\n"));
            tracing::warn!("Running Debian's QEMU: {err:#}");
            None
        }
    }
}

/// Builds (or finds cached) vmfactory's QEMU, with progress; a build's profile is trained
/// on `training_kernel`.
fn build_qemu(cache_dir: &Path, force: bool, training_kernel: &Path) -> Result<BuiltQemu> {
    let mut shown = crate::progress::Progress::spinner("Preparing vmfactory's QEMU");
    let mut progress = |message: &str| shown.set_message(message);
    let built = ensure_qemu(
        QemuBuild {
            cache_dir,
            force,
            training_kernel,
        },
        &mut progress,
    );
    match &built {
        Ok(qemu) => shown.finish(&format!(
            "QEMU ready (built from {} {})",
            qemu.source_package, qemu.source_version
        )),
        Err(_) => shown.abandon(),
    }
    built.context("Cannot build vmfactory's QEMU")
}

/// The `guest build` command line that builds the image these options name (the kernel
/// kind and cache directory given), for hints.
fn build_command(image: &ImageArgs) -> String {
    let mut command = "vmfactory guest build".to_string();
    if let Some(kernel) = image.guest_kernel {
        command.push_str(&format!(" --guest-kernel {kernel}"));
    }
    if let Some(dir) = &image.cache_dir {
        command.push_str(&format!(
            " --cache-dir {}",
            crate::shell_word(&dir.to_string_lossy())
        ));
    }
    command
}

fn print_check(
    report: &UpdateCheck,
    qemu_current: Option<bool>,
    build: &str,
    json: bool,
) -> Result<()> {
    if json {
        let mut value = serde_json::to_value(report)?;
        if let Some(object) = value.as_object_mut() {
            object.insert("qemu_current".into(), serde_json::to_value(qemu_current)?);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let candidate = format!(
        "{} {} with {} {}",
        report.candidate_kernel.name,
        report.candidate_kernel.version,
        report.candidate_busybox.name,
        report.candidate_busybox.version
    );
    match (&report.current, report.status) {
        (Some(image), UpdateStatus::UpToDate) => println!(
            "The guest image is up to date: {} {} ({})",
            image.kernel_package, image.kernel_version, image.kernel_release
        ),
        (Some(image), _) => println!(
            "{}",
            crate::hints(&format!(
                "An update is available: apt offers {candidate}; the current image has {} {} with busybox {}. Run `{build}` to update it.",
                image.kernel_package,
                image.kernel_version,
                report.current_busybox_version.as_deref().unwrap_or("?")
            ))
        ),
        (None, _) => println!(
            "{}",
            crate::hints(&format!(
                "No guest image is built yet; apt offers {candidate}. Run `{build}` to build it."
            ))
        ),
    }
    match qemu_current {
        Some(false) => println!(
            "{}",
            crate::hints(&format!(
                "vmfactory's QEMU is not built for the installed qemu-system-x86 yet (or was built by another vmfactory): `{build}` builds it."
            ))
        ),
        Some(true) => println!("vmfactory's QEMU is built for the installed qemu-system-x86."),
        None => {}
    }
    Ok(())
}

/// Returns the current guest image, building it (with apt) only when there is none or
/// it changed on disk; `force` rebuilds it.
pub fn ensure_image(args: &ImageArgs, configured: KernelSource, force: bool) -> Result<GuestImage> {
    let options = build_options(args, configured)?;
    if !force {
        if let Some(image) = current(&options) {
            tracing::debug!(dir = %image.dir.display(), "using the current guest image");
            return Ok(image);
        }
    }
    build_image(&options, force)
}

/// The build options for `args`: the embedded agent (by its digest) unless `--agent`,
/// the kernel of `--guest-kernel`, else `configured` (the configuration's).
fn build_options(args: &ImageArgs, configured: KernelSource) -> Result<BuildOptions> {
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let (agent_binary, agent_sha256) = match &args.agent {
        Some(agent) => {
            if !agent.is_file() {
                bail!(
                    "Agent binary {} not found: pass the path of a static vmfactory-agent, or \
                     leave out --agent (and VMFACTORY_AGENT) to use the one built into vmfactory",
                    agent.display()
                );
            }
            (agent.clone(), None)
        }
        None => (
            embedded_agent_path(&cache_dir, EMBEDDED_AGENT_SHA256),
            Some(EMBEDDED_AGENT_SHA256.to_owned()),
        ),
    };
    Ok(BuildOptions {
        cache_dir,
        agent_binary,
        agent_sha256,
        kernel: args.guest_kernel.unwrap_or(configured),
        ..BuildOptions::default()
    })
}

/// Builds (or finds cached) the image with apt, writing the embedded agent first if it
/// is the one to use.
fn build_image(options: &BuildOptions, force: bool) -> Result<GuestImage> {
    if options.agent_sha256.is_some() {
        install_embedded_agent(&options.cache_dir, EMBEDDED_AGENT, EMBEDDED_AGENT_SHA256)
            .context("Cannot write the embedded guest agent into the cache")?;
    }
    let options = BuildOptions {
        force,
        ..options.clone()
    };
    let mut shown = crate::progress::Progress::spinner("Preparing the guest image");
    let mut progress = |message: &str| shown.set_message(message);
    let built = build(&options, &mut progress);
    match &built {
        Ok(image) => shown.finish(&format!(
            "Guest image ready ({} kernel {})",
            image.kernel_source, image.kernel_release
        )),
        Err(_) => shown.abandon(),
    }
    built.context("Cannot build the guest image")
}

#[cfg(test)]
mod tests {
    #[test]
    fn qemus_profile_is_trained_on_the_vms_cpu_model() {
        assert_eq!(
            vmfactory_guest_image::TRAINING_CPU,
            vmfactory_hypervisor::qemu::cmdline::TCG_CPU
        );
    }
}
