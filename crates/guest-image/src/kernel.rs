//! vmfactory's own guest kernel: built from Debian's `linux-source-<series>` package with
//! our patches (`kernel/patches/`) applied, `make tinyconfig` plus our fragment
//! (`kernel/vmfactory.config`), checked option by option, and cached under
//! `kernels/<key>/` by source digest, patches, fragment and compiler.
//! Concurrent builds of one key wait on a lock instead of building twice.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{io_error, GuestImageError};

/// Our config fragment, applied on top of `make tinyconfig`.
pub const KERNEL_CONFIG_FRAGMENT: &str = include_str!("../kernel/vmfactory.config");

/// Our patches to Debian's kernel source, applied in this order before configuring; each
/// changes one file (the patch file's header says what and why). A patch that does not
/// apply fails the build.
pub const KERNEL_PATCHES: &[(&str, &str)] = &[
    (
        "0001-x86-mm-free-init-memory-without-poisoning.patch",
        include_str!("../kernel/patches/0001-x86-mm-free-init-memory-without-poisoning.patch"),
    ),
    (
        "0002-x86-apic-lapic-timer-hz-parameter.patch",
        include_str!("../kernel/patches/0002-x86-apic-lapic-timer-hz-parameter.patch"),
    ),
    (
        "0003-x86-tsc-early-khz-skips-cpu-calibration.patch",
        include_str!("../kernel/patches/0003-x86-tsc-early-khz-skips-cpu-calibration.patch"),
    ),
    (
        "0004-virt-vmgenid-gpe-parameter.patch",
        include_str!("../kernel/patches/0004-virt-vmgenid-gpe-parameter.patch"),
    ),
];

/// Version of the kernel build recipe; bump it when the same inputs give another kernel.
const KERNEL_BUILD_VERSION: u32 = 1;

/// `LOCALVERSION` of our kernel: its release is e.g. `6.1.192-vmfactory`.
const LOCAL_VERSION: &str = "-vmfactory";

/// Host packages a kernel build needs, for the install hint.
pub const KERNEL_BUILD_PACKAGES: &str = "bc bison flex libelf-dev libssl-dev make gcc xz-utils";

/// Which kernel the guest image boots.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// vmfactory's kernel, built from Debian's kernel source with our config (default).
    #[default]
    Vmfactory,
    /// Debian's cloud kernel package with its virtio modules.
    Debian,
}

impl KernelSource {
    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmfactory => "vmfactory",
            Self::Debian => "debian",
        }
    }

    /// The value of records written before there was a choice: Debian's kernel.
    pub(crate) fn legacy() -> Self {
        Self::Debian
    }
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KernelSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vmfactory" => Ok(Self::Vmfactory),
            "debian" => Ok(Self::Debian),
            other => Err(format!(
                "unknown guest kernel {other:?}: use \"vmfactory\" (built from source) or \"debian\" (Debian's cloud kernel)"
            )),
        }
    }
}

/// The options the fragment asks for, by name (`CONFIG_…`), with their wanted value
/// (`y`, `n`, a number or string).
pub fn requested_options(fragment: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for line in fragment.lines() {
        let line = line.trim();
        if let Some((name, value)) = parse_config_line(line) {
            options.insert(name.to_owned(), value.to_owned());
        }
    }
    options
}

/// One `.config` line as (name, value): `CONFIG_X=v`, or `# CONFIG_X is not set` as `n`.
fn parse_config_line(line: &str) -> Option<(&str, &str)> {
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return name.starts_with("CONFIG_").then_some((name, "n"));
    }
    let (name, value) = line.split_once('=')?;
    name.starts_with("CONFIG_").then_some((name, value))
}

/// The options of `fragment` whose value in the resulting `config` differs, as
/// `CONFIG_X (wanted y, got n)`. An option missing from `config` counts as `n`.
pub fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let mut have = BTreeMap::new();
    for line in config.lines() {
        if let Some((name, value)) = parse_config_line(line.trim()) {
            have.insert(name, value);
        }
    }
    requested_options(fragment)
        .into_iter()
        .filter_map(|(name, wanted)| {
            let got = have.get(name.as_str()).copied().unwrap_or("n");
            (got != wanted).then(|| format!("{name} (wanted {wanted}, got {got})"))
        })
        .collect()
}

/// A kernel built (or found) in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltKernel {
    /// `kernels/<key>/`.
    pub dir: PathBuf,
    /// The uncompressed ELF kernel with the PVH entry.
    pub vmlinux: PathBuf,
    /// The bzImage.
    pub bzimage: PathBuf,
    /// The resulting `.config`.
    pub config: PathBuf,
    /// `make kernelrelease`, e.g. `6.1.192-vmfactory`.
    pub release: String,
    /// The build key (directory name).
    pub key: String,
}

/// What `kernels/<key>/build.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BuildRecord {
    release: String,
    key: String,
    source_package: String,
    source_version: String,
    compiler: String,
    /// Our patches applied to the source, by file name.
    #[serde(default)]
    patches: Vec<String>,
    seconds: u64,
}

/// Digest of what this vmfactory binary contributes to its kernel: the recipe version, our
/// patches and the fragment (not the source `.deb` or the compiler, which take apt and
/// `gcc` to know). The current-image lookup compares it, so an upgraded vmfactory whose
/// kernel recipe changed builds the new kernel instead of booting the old one.
pub fn kernel_recipe_digest() -> String {
    kernel_key("", KERNEL_PATCHES, KERNEL_CONFIG_FRAGMENT, "")
}

/// The key of a kernel build: recipe version, source `.deb` digest, patches, fragment,
/// compiler.
pub fn kernel_key(
    source_deb_sha256: &str,
    patches: &[(&str, &str)],
    fragment: &str,
    compiler: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"vmfactory-kernel\0");
    hasher.update(format!("recipe={KERNEL_BUILD_VERSION}\0").as_bytes());
    hasher.update(format!("source={source_deb_sha256}\0").as_bytes());
    for (name, text) in patches {
        hasher.update(format!("patch={name}:{:x}\0", Sha256::digest(text)).as_bytes());
    }
    // Only the option lines count (`# CONFIG_X is not set` is one): a comment edited does
    // not rebuild the kernel.
    let options: String = fragment
        .lines()
        .map(str::trim)
        .filter(|line| parse_config_line(line).is_some())
        .flat_map(|line| [line, "\n"])
        .collect();
    hasher.update(format!("fragment={:x}\0", Sha256::digest(options)).as_bytes());
    hasher.update(format!("compiler={compiler}\0").as_bytes());
    format!("{:x}", hasher.finalize())
}

/// Checks the host tools a kernel build needs; the error names the `apt-get install`.
pub(crate) fn check_build_tools() -> Result<(), GuestImageError> {
    let tools = ["bc", "bison", "flex", "make", "gcc", "xz", "tar"].map(|tool| (tool, tool));
    let missing = missing_build_tools(
        &tools,
        &[
            ("/usr/include/gelf.h", "libelf-dev"),
            ("/usr/include/openssl/ssl.h", "libssl-dev"),
        ],
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GuestImageError::KernelBuildTools {
            missing: missing.join(", "),
        })
    }
}

/// What a build lacks, named as what to install: the `(program, package)` pairs whose
/// program is on no `PATH` directory, then the `(header, package)` pairs whose header is
/// not there. Shared by the kernel's and QEMU's checks.
pub(crate) fn missing_build_tools<'a>(
    tools: &[(&str, &'a str)],
    headers: &[(&str, &'a str)],
) -> Vec<&'a str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tools
        .iter()
        .filter(|(tool, _)| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .chain(
            headers
                .iter()
                .filter(|(header, _)| !Path::new(header).is_file()),
        )
        .map(|(_, package)| *package)
        .collect()
}

/// Moves a finished build `out` (inside `staging`) into place at `dir`. An earlier build
/// there (`guest build --force`) is swapped with it in one step (`renameat2`'s
/// `RENAME_EXCHANGE`), so a command starting a VM meanwhile finds one build or the other,
/// never none; the earlier one is then at `out`, removed with `staging` (a QEMU still
/// running it keeps its mapped file). Where the filesystem cannot swap, the earlier build
/// is moved into `staging` first. Shared by the kernel's and QEMU's builds.
pub(crate) fn install_build(out: &Path, dir: &Path, staging: &Path) -> Result<(), GuestImageError> {
    if dir.exists() {
        let swapped = rustix::fs::renameat_with(
            rustix::fs::CWD,
            out,
            rustix::fs::CWD,
            dir,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        if swapped.is_ok() {
            return Ok(());
        }
        let aside = staging.join("old");
        fs::rename(dir, &aside).map_err(io_error(dir))?;
    }
    fs::rename(out, dir).map_err(io_error(dir))
}

/// First line of `gcc --version` (part of the key: another compiler, another kernel).
pub(crate) fn compiler_version() -> Result<String, GuestImageError> {
    let output = Command::new("gcc")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuestImageError::ToolFailed {
            tool: "gcc".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or("unknown").trim().to_owned())
}

/// Reads the kernel cached under `dir`, if complete.
fn load_built(dir: &Path, key: &str) -> Option<BuiltKernel> {
    let record: BuildRecord =
        serde_json::from_slice(&fs::read(dir.join("build.json")).ok()?).ok()?;
    let kernel = BuiltKernel {
        dir: dir.to_owned(),
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        config: dir.join("config"),
        release: record.release,
        key: key.to_owned(),
    };
    (record.key == key
        && kernel.vmlinux.is_file()
        && kernel.bzimage.is_file()
        && kernel.config.is_file())
    .then_some(kernel)
}

/// Holds an exclusive `flock` on a file until dropped.
pub(crate) struct BuildLock {
    _file: fs::File,
}

pub(crate) fn lock_exclusive(path: &Path) -> Result<BuildLock, GuestImageError> {
    let file = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    loop {
        // SAFETY: flock takes a file descriptor that `file` owns and keeps open for the
        // duration of the call; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(BuildLock { _file: file });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(io_error(path)(err));
        }
    }
}

/// What to build: the source `.deb` and its identity.
pub(crate) struct KernelBuild<'a> {
    pub(crate) cache_dir: &'a Path,
    pub(crate) source_deb: &'a Path,
    pub(crate) source_deb_sha256: &'a str,
    pub(crate) source_package: &'a str,
    pub(crate) source_version: &'a str,
    pub(crate) force: bool,
}

/// Finds the kernel of these inputs in the cache or builds it (waiting for a concurrent
/// build of the same key instead of building twice).
pub(crate) fn ensure_kernel(
    spec: &KernelBuild<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltKernel, GuestImageError> {
    let compiler = compiler_version()?;
    let key = kernel_key(
        spec.source_deb_sha256,
        KERNEL_PATCHES,
        KERNEL_CONFIG_FRAGMENT,
        &compiler,
    );
    let kernels = spec.cache_dir.join("kernels");
    fs::create_dir_all(&kernels).map_err(io_error(&kernels))?;
    let dir = kernels.join(&key);
    if !spec.force {
        if let Some(kernel) = load_built(&dir, &key) {
            return Ok(kernel);
        }
    }
    check_build_tools()?;
    progress("Waiting for another build of the same kernel");
    let _lock = lock_exclusive(&kernels.join(format!(".{key}.lock")))?;
    if !spec.force {
        if let Some(kernel) = load_built(&dir, &key) {
            tracing::info!(dir = %dir.display(), "another process built the kernel meanwhile");
            return Ok(kernel);
        }
    }
    crate::image::sweep_stale_staging(&kernels);
    let started = std::time::Instant::now();
    let staging = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&kernels)
        .map_err(io_error(&kernels))?;
    let tree = unpack_source(spec, staging.path(), progress)?;
    progress(&format!(
        "Applying {} vmfactory patches",
        KERNEL_PATCHES.len()
    ));
    apply_patches(&tree, KERNEL_PATCHES, &|step, detail| {
        GuestImageError::KernelBuild { step, detail }
    })?;
    configure(&tree, progress)?;
    compile(&tree, progress)?;
    let release = make_output(&tree, &["-s", "kernelrelease"], "make kernelrelease")?;
    let out = staging.path().join("out");
    fs::create_dir(&out).map_err(io_error(&out))?;
    for (from, to) in [
        ("vmlinux", "vmlinux"),
        ("arch/x86/boot/bzImage", "bzImage"),
        (".config", "config"),
    ] {
        let source = tree.join(from);
        fs::rename(&source, out.join(to)).map_err(io_error(&source))?;
    }
    let record = BuildRecord {
        release: release.trim().to_owned(),
        key: key.clone(),
        source_package: spec.source_package.to_owned(),
        source_version: spec.source_version.to_owned(),
        compiler,
        patches: KERNEL_PATCHES
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect(),
        seconds: started.elapsed().as_secs(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|source| GuestImageError::Manifest {
        path: dir.join("build.json"),
        source,
    })?;
    crate::digest::write_synced(&out.join("build.json"), &json)?;
    install_build(&out, &dir, staging.path())?;
    progress("Removing the kernel source tree");
    drop(staging);
    tracing::info!(dir = %dir.display(), seconds = record.seconds, "built the guest kernel");
    load_built(&dir, &key).ok_or_else(|| GuestImageError::KernelBuild {
        step: "install".into(),
        detail: format!("{} is incomplete after the build", dir.display()),
    })
}

/// Unpacks the source `.deb`, then its `linux-source-*.tar.xz`; returns the tree.
fn unpack_source(
    spec: &KernelBuild<'_>,
    staging: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, GuestImageError> {
    progress(&format!(
        "Unpacking {} {}",
        spec.source_package, spec.source_version
    ));
    let deb_root = staging.join("deb");
    crate::apt::unpack(spec.source_deb, &deb_root)?;
    let src = deb_root.join("usr/src");
    let tarball = fs::read_dir(&src)
        .map_err(io_error(&src))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
        })
        .ok_or_else(|| GuestImageError::KernelBuild {
            step: "unpack".into(),
            detail: format!(
                "{} holds no usr/src/linux-source-*.tar.xz",
                spec.source_deb.display()
            ),
        })?;
    progress("Extracting the kernel source tree");
    let tree_root = staging.join("src");
    fs::create_dir(&tree_root).map_err(io_error(&tree_root))?;
    run_step(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tree_root),
        "extract the source",
    )?;
    fs::remove_dir_all(&deb_root).map_err(io_error(&deb_root))?;
    let tree = fs::read_dir(&tree_root)
        .map_err(io_error(&tree_root))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .ok_or_else(|| GuestImageError::KernelBuild {
            step: "unpack".into(),
            detail: format!("{} holds no kernel tree", tarball.display()),
        })?;
    Ok(tree)
}

/// Applies `patches` (name, unified diff of one file) to the source `tree`, in order.
pub(crate) fn apply_patches(
    tree: &Path,
    patches: &[(&str, &str)],
    error: &dyn Fn(String, String) -> GuestImageError,
) -> Result<(), GuestImageError> {
    for (name, text) in patches {
        let failed = |detail: String| error(format!("apply {name}"), detail);
        let patch = diffy::Patch::from_str(text).map_err(|err| failed(err.to_string()))?;
        let target = patch
            .modified()
            .and_then(|path| path.strip_prefix("b/"))
            .map(Path::new)
            .filter(|path| {
                path.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            })
            .ok_or_else(|| failed("the patch names no file b/<path> inside the tree".into()))?;
        let path = tree.join(target);
        let original = fs::read_to_string(&path).map_err(io_error(&path))?;
        let patched = diffy::apply(&original, &patch).map_err(|err| {
            failed(format!(
                "{err} to {}: this source differs from the one the patch was written for",
                target.display()
            ))
        })?;
        fs::write(&path, patched).map_err(io_error(&path))?;
    }
    Ok(())
}

/// `make tinyconfig`, merge our fragment, `make olddefconfig`, then checks every option.
fn configure(tree: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), GuestImageError> {
    progress("Configuring the kernel (tinyconfig + vmfactory.config)");
    run_step(make(tree).arg("tinyconfig"), "make tinyconfig")?;
    let fragment = tree.join("vmfactory.config");
    fs::write(&fragment, KERNEL_CONFIG_FRAGMENT).map_err(io_error(&fragment))?;
    run_step(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(tree)
            .args(["-m", ".config", "vmfactory.config"]),
        "merge the config fragment",
    )?;
    run_step(make(tree).arg("olddefconfig"), "make olddefconfig")?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    let missing = missing_options(KERNEL_CONFIG_FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(GuestImageError::KernelConfig {
            options: missing.join(", "),
        });
    }
    Ok(())
}

/// `make` in `tree` with our local version.
fn make(tree: &Path) -> Command {
    let mut command = Command::new("make");
    command
        .current_dir(tree)
        .env("LC_ALL", "C")
        .arg(format!("LOCALVERSION={LOCAL_VERSION}"))
        .stdin(Stdio::null());
    command
}

/// Runs a build step, keeping the tail of its output for the error.
fn run_step(command: &mut Command, step: &str) -> Result<(), GuestImageError> {
    let output = command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuestImageError::ToolFailed {
            tool: format!("{:?}", command.get_program()),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(GuestImageError::KernelBuild {
        step: step.into(),
        detail: tail(&output.stderr, &output.stdout),
    })
}

fn make_output(tree: &Path, args: &[&str], step: &str) -> Result<String, GuestImageError> {
    let output = make(tree)
        .args(args)
        .output()
        .map_err(|source| GuestImageError::ToolFailed {
            tool: "make".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(GuestImageError::KernelBuild {
            step: step.into(),
            detail: tail(&output.stderr, &output.stdout),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last lines of a failed step's output.
pub(crate) fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        String::from_utf8_lossy(stderr)
    } else {
        String::from_utf8_lossy(stdout)
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// `make -j<cores> vmlinux bzImage`, reporting the number of compiled objects.
fn compile(tree: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), GuestImageError> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress(&format!("Compiling the kernel with {jobs} jobs"));
    let mut compiled = 0u64;
    run_compile(
        make(tree)
            .arg(format!("-j{jobs}"))
            .args(["vmlinux", "bzImage"]),
        &tree.join("vmfactory-build.log"),
        &mut |line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("CC ") || trimmed.starts_with("AS ") {
                compiled += 1;
                if compiled % 10 == 0 {
                    progress(&format!("Compiling the kernel: {compiled} objects"));
                }
            } else if trimmed.starts_with("LD ") && trimmed.ends_with("vmlinux") {
                progress("Linking vmlinux");
            }
        },
        &|detail| GuestImageError::KernelBuild {
            step: "make vmlinux bzImage".into(),
            detail,
        },
    )?;
    tracing::info!(objects = compiled, "compiled the kernel");
    Ok(())
}

/// Runs a long compile step: its standard output is read line by line (each line given
/// to `on_line`, the last 12 kept), its standard error goes to `log_path`. A failure is
/// `error` of the log's last lines (else of those 12). Shared by the kernel's `make` and
/// QEMU's `ninja`.
pub(crate) fn run_compile(
    command: &mut Command,
    log_path: &Path,
    on_line: &mut dyn FnMut(&str),
    error: &dyn Fn(String) -> GuestImageError,
) -> Result<(), GuestImageError> {
    let tool = command.get_program().to_string_lossy().into_owned();
    let log = fs::File::create(log_path).map_err(io_error(log_path))?;
    let mut child = command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|source| GuestImageError::ToolFailed {
            tool: tool.clone(),
            source,
        })?;
    let mut recent: Vec<String> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            recent.push(line);
            if recent.len() > 12 {
                recent.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|source| GuestImageError::ToolFailed { tool, source })?;
    if status.success() {
        return Ok(());
    }
    let mut errors = String::new();
    if let Ok(mut file) = fs::File::open(log_path) {
        let _ = file.read_to_string(&mut errors);
    }
    Err(error(tail(errors.as_bytes(), recent.join("\n").as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_build_replaces_the_old_in_one_step() {
        let root = tempfile::tempdir().expect("tempdir");
        let staging = root.path().join(".build-x");
        let out = staging.join("out");
        let dir = root.path().join("key");
        fs::create_dir_all(&out).expect("mkdir");
        fs::write(out.join("build.json"), "first").expect("write");
        install_build(&out, &dir, &staging).expect("install");
        assert_eq!(
            fs::read_to_string(dir.join("build.json")).expect("read"),
            "first"
        );
        assert!(!out.exists());
        // Again over it (`--force`): the new one in place, the old one in staging.
        fs::create_dir_all(&out).expect("mkdir");
        fs::write(out.join("build.json"), "second").expect("write");
        install_build(&out, &dir, &staging).expect("install");
        assert_eq!(
            fs::read_to_string(dir.join("build.json")).expect("read"),
            "second"
        );
        let old = [out.join("build.json"), staging.join("old/build.json")]
            .into_iter()
            .find(|path| path.is_file())
            .expect("the old build is in staging");
        assert_eq!(fs::read_to_string(old).expect("read"), "first");
    }

    fn kernel_error(step: String, detail: String) -> GuestImageError {
        GuestImageError::KernelBuild { step, detail }
    }

    #[test]
    fn the_fragment_asks_for_what_vmfactory_needs() {
        let options = requested_options(KERNEL_CONFIG_FRAGMENT);
        for name in [
            "CONFIG_PVH",
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_OVERLAY_FS",
            "CONFIG_EROFS_FS",
            "CONFIG_9P_FS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VMGENID",
            "CONFIG_ACPI_HOTPLUG_CPU",
            "CONFIG_ACPI_HOTPLUG_MEMORY",
            "CONFIG_HOTPLUG_PCI_ACPI",
            "CONFIG_IKCONFIG_PROC",
        ] {
            assert_eq!(options.get(name).map(String::as_str), Some("y"), "{name}");
        }
        for name in [
            "CONFIG_MODULES",
            "CONFIG_PCIEPORTBUS",
            "CONFIG_X86_PM_TIMER",
        ] {
            assert_eq!(options.get(name).map(String::as_str), Some("n"), "{name}");
        }
    }

    #[test]
    fn missing_options_are_named() {
        let fragment = "CONFIG_A=y\n# comment\nCONFIG_B=y\nCONFIG_C=n\nCONFIG_D=64\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=1\n";
        assert_eq!(
            missing_options(fragment, config),
            ["CONFIG_B (wanted y, got n)", "CONFIG_D (wanted 64, got 1)"]
        );
        assert!(missing_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=64\n").is_empty());
    }

    #[test]
    fn key_changes_with_each_input() {
        let patches = [("p", "x")];
        let base = kernel_key("aa", &patches, "CONFIG_A=y\n", "gcc 12");
        assert_ne!(base, kernel_key("ab", &patches, "CONFIG_A=y\n", "gcc 12"));
        assert_ne!(
            base,
            kernel_key("aa", &[("p", "y")], "CONFIG_A=y\n", "gcc 12")
        );
        assert_ne!(base, kernel_key("aa", &[], "CONFIG_A=y\n", "gcc 12"));
        assert_ne!(base, kernel_key("aa", &patches, "CONFIG_A=n\n", "gcc 12"));
        assert_ne!(base, kernel_key("aa", &patches, "CONFIG_A=y\n", "gcc 13"));
        assert_eq!(base, kernel_key("aa", &patches, "CONFIG_A=y\n", "gcc 12"));
        // `# CONFIG_X is not set` is an option line.
        assert_ne!(
            base,
            kernel_key(
                "aa",
                &patches,
                "CONFIG_A=y\n# CONFIG_B is not set\n",
                "gcc 12"
            )
        );
        // Comments and blank lines are not the kernel's.
        assert_eq!(
            base,
            kernel_key(
                "aa",
                &patches,
                "# why\n\n  CONFIG_A=y  \n# more\n",
                "gcc 12"
            )
        );
    }

    /// The lines around the change of our first patch, as in Debian's 6.1 source, moved
    /// down by a few lines (a later source may shift them).
    fn free_init_pages_source(offset: usize) -> String {
        let mut text = "/* filler */\n".repeat(930 + offset);
        text.push_str(concat!(
            "\t\t * writeable and non-executable first.\n",
            "\t\t */\n",
            "\t\tset_memory_nx(begin, (end - begin) >> PAGE_SHIFT);\n",
            "\t\tset_memory_rw(begin, (end - begin) >> PAGE_SHIFT);\n",
            "\n",
            "\t\tfree_reserved_area((void *)begin, (void *)end,\n",
            "\t\t\t\t   POISON_FREE_INITMEM, what);\n",
            "\t}\n",
            "}\n",
            "\n",
        ));
        text
    }

    /// The lines around the change of our second patch, as in Debian's 6.1 source, moved
    /// up by a few lines.
    fn lapic_params_source(offset: usize) -> String {
        let mut text = "/* filler */\n".repeat(2936 - offset);
        text.push_str(concat!(
            "\tlocal_apic_timer_c2_ok = 1;\n",
            "\treturn 0;\n",
            "}\n",
            "early_param(\"lapic_timer_c2_ok\", parse_lapic_timer_c2_ok);\n",
            "\n",
            "static int __init parse_disable_apic_timer(char *arg)\n",
            "{\n",
            "\tdisable_apic_timer = 1;\n",
            "\treturn 0;\n",
        ));
        text
    }

    /// The lines around the change of our third patch, as in Debian's 6.1 source, moved
    /// down by a few lines.
    fn tsc_frequencies_source(offset: usize) -> String {
        let mut text = "/* filler */\n".repeat(1436 + offset);
        text.push_str(concat!(
            "\n",
            "static bool __init determine_cpu_tsc_frequencies(bool early)\n",
            "{\n",
            "\t/* Make sure that cpu and tsc are not already calibrated */\n",
            "\tWARN_ON(cpu_khz || tsc_khz);\n",
            "\n",
            "\tif (early) {\n",
            "\t\tcpu_khz = x86_platform.calibrate_cpu();\n",
            "\t\tif (tsc_early_khz)\n",
            "\t\t\ttsc_khz = tsc_early_khz;\n",
            "\t\telse\n",
            "\t\t\ttsc_khz = x86_platform.calibrate_tsc();\n",
            "\t} else {\n",
        ));
        text
    }

    /// drivers/virt/vmgenid.c as Debian's 6.1 source has it, from its size constant to
    /// its driver, after `header` lines.
    fn vmgenid_source(header: usize) -> String {
        let mut text = "/* header */\n".repeat(header);
        text.push_str(concat!(
            "enum { VMGENID_SIZE = 16 };\n",
            "\n",
            "struct vmgenid_state {\n",
            "\tu8 *next_id;\n",
            "\tu8 this_id[VMGENID_SIZE];\n",
            "};\n",
            "\n",
            "static int vmgenid_add(struct acpi_device *device)\n",
            "{\n",
            "\tstruct acpi_buffer parsed = { ACPI_ALLOCATE_BUFFER };\n",
            "\tstruct vmgenid_state *state;\n",
            "\tunion acpi_object *obj;\n",
            "\tphys_addr_t phys_addr;\n",
            "\tacpi_status status;\n",
            "\tint ret = 0;\n",
            "\n",
            "\tstate = devm_kmalloc(&device->dev, sizeof(*state), GFP_KERNEL);\n",
            "\tif (!state)\n",
            "\t\treturn -ENOMEM;\n",
            "\n",
            "\tstatus = acpi_evaluate_object(device->handle, \"ADDR\", NULL, &parsed);\n",
            "\tif (ACPI_FAILURE(status)) {\n",
            "\t\tACPI_EXCEPTION((AE_INFO, status, \"Evaluating ADDR\"));\n",
            "\t\treturn -ENODEV;\n",
            "\t}\n",
            "\tobj = parsed.pointer;\n",
            "\tif (!obj || obj->type != ACPI_TYPE_PACKAGE || obj->package.count != 2 ||\n",
            "\t    obj->package.elements[0].type != ACPI_TYPE_INTEGER ||\n",
            "\t    obj->package.elements[1].type != ACPI_TYPE_INTEGER) {\n",
            "\t\tret = -EINVAL;\n",
            "\t\tgoto out;\n",
            "\t}\n",
            "\n",
            "\tphys_addr = (obj->package.elements[0].integer.value << 0) |\n",
            "\t\t    (obj->package.elements[1].integer.value << 32);\n",
            "\tstate->next_id = devm_memremap(&device->dev, phys_addr, VMGENID_SIZE, MEMREMAP_WB);\n",
            "\tif (IS_ERR(state->next_id)) {\n",
            "\t\tret = PTR_ERR(state->next_id);\n",
            "\t\tgoto out;\n",
            "\t}\n",
            "\n",
            "\tmemcpy(state->this_id, state->next_id, sizeof(state->this_id));\n",
            "\tadd_device_randomness(state->this_id, sizeof(state->this_id));\n",
            "\n",
            "\tdevice->driver_data = state;\n",
            "\n",
            "out:\n",
            "\tACPI_FREE(parsed.pointer);\n",
            "\treturn ret;\n",
            "}\n",
            "\n",
            "static void vmgenid_notify(struct acpi_device *device, u32 event)\n",
            "{\n",
            "\tstruct vmgenid_state *state = acpi_driver_data(device);\n",
            "\tu8 old_id[VMGENID_SIZE];\n",
            "\n",
            "\tmemcpy(old_id, state->this_id, sizeof(old_id));\n",
            "\tmemcpy(state->this_id, state->next_id, sizeof(state->this_id));\n",
            "\tif (!memcmp(old_id, state->this_id, sizeof(old_id)))\n",
            "\t\treturn;\n",
            "\tadd_vmfork_randomness(state->this_id, sizeof(state->this_id));\n",
            "}\n",
            "\n",
            "static const struct acpi_device_id vmgenid_ids[] = {\n",
            "\t{ \"VMGENCTR\", 0 },\n",
            "\t{ \"VM_GEN_COUNTER\", 0 },\n",
            "\t{ }\n",
            "};\n",
            "\n",
            "static struct acpi_driver vmgenid_driver = {\n",
            "\t.name = \"vmgenid\",\n",
            "\t.ids = vmgenid_ids,\n",
            "\t.owner = THIS_MODULE,\n",
            "\t.ops = {\n",
            "\t\t.add = vmgenid_add,\n",
            "\t\t.notify = vmgenid_notify\n",
            "\t}\n",
            "};\n",
            "\n",
        ));
        text
    }

    #[test]
    fn our_patches_apply_to_the_source_they_were_written_for_and_refuse_another() {
        let tree = tempfile::tempdir().expect("tempdir");
        let dir = tree.path().join("arch/x86/mm");
        fs::create_dir_all(&dir).expect("source dir");
        let file = dir.join("init.c");
        fs::write(&file, free_init_pages_source(5)).expect("source");
        let apic_dir = tree.path().join("arch/x86/kernel/apic");
        fs::create_dir_all(&apic_dir).expect("source dir");
        let apic = apic_dir.join("apic.c");
        fs::write(&apic, lapic_params_source(7)).expect("source");
        let tsc = tree.path().join("arch/x86/kernel/tsc.c");
        fs::write(&tsc, tsc_frequencies_source(3)).expect("source");
        let virt = tree.path().join("drivers/virt");
        fs::create_dir_all(&virt).expect("source dir");
        let vmgenid = virt.join("vmgenid.c");
        fs::write(&vmgenid, vmgenid_source(16)).expect("source");
        apply_patches(tree.path(), KERNEL_PATCHES, &kernel_error).expect("the patches apply");
        let patched = fs::read_to_string(&file).expect("patched source");
        assert!(patched.contains("free_reserved_area((void *)begin, (void *)end, -1, what);"));
        assert!(!patched.contains("POISON_FREE_INITMEM"));
        let patched = fs::read_to_string(&apic).expect("patched source");
        assert!(patched.contains("early_param(\"lapic_timer_hz\", parse_lapic_timer_hz);"));
        assert!(patched.contains("lapic_timer_period = hz / HZ;"));
        let patched = fs::read_to_string(&tsc).expect("patched source");
        assert!(patched.contains("\tif (early && tsc_early_khz) {\n"));
        assert!(patched.contains("\t\tcpu_khz = tsc_early_khz;\n"));
        let patched = fs::read_to_string(&vmgenid).expect("patched source");
        assert!(patched.contains("module_param(gpe, int, 0444);"));
        assert!(patched.contains("\tvmgenid_take_gpe(device);\n"));
        assert!(patched.contains("\t\t.remove = vmgenid_remove,\n"));

        // Applied twice, or to a source that changed there: a build error naming the patch.
        let message = apply_patches(tree.path(), KERNEL_PATCHES, &kernel_error)
            .expect_err("applied twice")
            .to_string();
        assert!(message.contains(KERNEL_PATCHES[0].0), "{message}");
        assert!(message.contains("arch/x86/mm/init.c"), "{message}");
    }

    #[test]
    fn a_patch_may_not_reach_outside_the_tree() {
        let tree = tempfile::tempdir().expect("tempdir");
        let patch = "--- a/../x\n+++ b/../x\n@@ -1 +1 @@\n-a\n+b\n";
        let err = apply_patches(tree.path(), &[("evil.patch", patch)], &kernel_error)
            .expect_err("refused");
        assert!(err.to_string().contains("names no file"), "{err}");
    }

    #[test]
    fn kernel_source_parses() {
        assert_eq!("debian".parse(), Ok(KernelSource::Debian));
        assert_eq!("vmfactory".parse(), Ok(KernelSource::Vmfactory));
        assert!("linux".parse::<KernelSource>().is_err());
        assert_eq!(KernelSource::default(), KernelSource::Vmfactory);
    }
}
