//! vmfactory's own QEMU: built from Debian's source of the installed `qemu-system-x86`
//! (so it carries Debian's patches and security fixes, and matches the firmware Debian
//! installed), with only the devices vmfactory's VMs use (`qemu/vmfactory-devices.mak`),
//! no optional libraries, no PIE. Debian's QEMU links about 50 libraries and registers
//! every device it has at each start; ours links six, so a VM's QEMU starts in about
//! half the time (the larger part of an on-demand clone that is not the guest's own
//! work). Cached under `qemu/<key>/` by source digest, device list, configure options and
//! compiler; `qemu/current.json` names the build to use together with a stamp of
//! Debian's binary, so that an upgraded `qemu-system-x86` is built again from its new
//! source.
//!
//! Compiled twice, guided by a profile (GCC's `-fprofile-generate`/`-fprofile-use`,
//! through meson's `b_pgo`): the first build is instrumented and boots the guest kernel
//! to its panic (no initramfs) under TCG, once with one vCPU and once with two; the second
//! is optimised for what that run did. Under TCG a VM's QEMU spends most of its CPU
//! translating guest code (an on-demand clone's first answer: about 10,000 blocks), and
//! the profile makes the translator faster. Code the training run does not reach (KVM's)
//! is optimised as without a profile (`-fprofile-partial-training`). A build needs that
//! kernel: without one nothing is built.
//!
//! Hand-written on purpose: no crate builds QEMU; the steps are Debian's tools
//! (`apt-get source`, `dpkg-source`) and QEMU's own (`configure`, `ninja`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{io_error, GuestImageError};
use crate::kernel::{
    compiler_version, install_build, lock_exclusive, missing_build_tools, run_compile, tail,
};

/// The device list of our QEMU.
pub const QEMU_DEVICES: &str = include_str!("../qemu/vmfactory-devices.mak");

/// Our patches to Debian's QEMU source, applied in this order after Debian's; each
/// changes one file (the patch file's header says what and why). A patch that does not
/// apply fails the build.
pub const QEMU_PATCHES: &[(&str, &str)] = &[
    (
        "0001-vl-board-memory-map-in-one-transaction.patch",
        include_str!("../qemu/patches/0001-vl-board-memory-map-in-one-transaction.patch"),
    ),
    (
        "0002-vl-cli-devices-in-one-transaction.patch",
        include_str!("../qemu/patches/0002-vl-cli-devices-in-one-transaction.patch"),
    ),
    (
        "0003-savevm-load-in-one-transaction.patch",
        include_str!("../qemu/patches/0003-savevm-load-in-one-transaction.patch"),
    ),
    (
        "0004-acpi-no-tables-for-incoming.patch",
        include_str!("../qemu/patches/0004-acpi-no-tables-for-incoming.patch"),
    ),
    (
        "0005-migration-x-ignore-shared-property.patch",
        include_str!("../qemu/patches/0005-migration-x-ignore-shared-property.patch"),
    ),
];

/// Version of the QEMU build recipe; bump it when the same inputs give another binary.
const QEMU_BUILD_VERSION: u32 = 3;

/// The Debian package whose source is built (and whose firmware our QEMU loads).
pub const DEBIAN_QEMU_PACKAGE: &str = "qemu-system-x86";

/// Debian's binary: its stamp tells when `qemu-system-x86` was upgraded.
pub const DEBIAN_QEMU_BINARY: &str = "/usr/bin/qemu-system-x86_64";

/// Host packages a QEMU build needs, for the install hint.
pub const QEMU_BUILD_PACKAGES: &str =
    "meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev dpkg-dev gcc";

/// Where our QEMU looks for firmware: Debian's (SeaBIOS, the option ROMs, the PVH
/// loader), installed with `qemu-system-x86`. Outside the configure prefix, so QEMU
/// does not relocate them next to its binary.
const FIRMWARE_PATH: &str = "/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu";

/// `configure` options (besides `--firmwarepath`): one target, TCG and KVM, the device
/// list, and no optional feature (each would link a library a VM never uses) but one
/// that needs none: `malloc_trim` after QEMU frees (without it an idle VM keeps about
/// 5 MiB more heap). AVX2 for the zero-page checks of migration is asked for when the
/// source has the option (QEMU 9.2 dropped it and detects AVX2 itself): [`AVX2_OPTION`].
const CONFIGURE_OPTIONS: &[&str] = &[
    // GCC, whatever `cc` or `$CC` is: the key records its version, and the profile's
    // flags are GCC's.
    "--cc=gcc",
    "--prefix=/opt/vmfactory-qemu",
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--without-default-devices",
    "--with-devices-x86_64=vmfactory",
    "--enable-tcg",
    "--enable-kvm",
    "--enable-malloc-trim",
    "--enable-fdt=system",
    "--disable-docs",
    "--disable-tools",
    "--disable-user",
    "--disable-debug-info",
    "--disable-pie",
    "--extra-ldflags=-no-pie",
    // Code the profile's training run does not reach keeps the usual optimisation.
    "--extra-cflags=-fprofile-partial-training",
];

/// The CPU model of the training boots: vmfactory's TCG VMs' (the hypervisor crate's
/// `TCG_CPU`; a test in the vmfactory crate checks they agree).
pub const TRAINING_CPU: &str = "max,erms=off,fsrm=off";

/// How long one training boot may take before QEMU is stopped (`SIGTERM`: it still
/// writes its profile). A boot to the panic takes about a second here.
const TRAINING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The training boots' vCPU counts: one (the default VM), two (the translator's
/// multi-threaded paths).
const TRAINING_VCPUS: [u32; 2] = [1, 2];

/// Asked for when the source's `meson_options.txt` has it.
const AVX2_OPTION: &str = "--enable-avx2";

/// How to choose the QEMU of vmfactory's VMs when `[hypervisor.qemu] path` is not set.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum QemuSource {
    /// vmfactory's QEMU, built from Debian's QEMU source with only the devices
    /// vmfactory's VMs use (default).
    #[default]
    Vmfactory,
    /// Debian's `qemu-system-x86_64` as installed.
    Debian,
}

impl QemuSource {
    /// The configuration's and command line's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmfactory => "vmfactory",
            Self::Debian => "debian",
        }
    }
}

impl std::fmt::Display for QemuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QemuSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vmfactory" => Ok(Self::Vmfactory),
            "debian" => Ok(Self::Debian),
            other => Err(format!(
                "unknown QEMU {other:?}: use vmfactory (built from Debian's QEMU source with \
                 vmfactory's devices) or debian (Debian's qemu-system-x86_64)"
            )),
        }
    }
}

/// A QEMU built (or found) in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltQemu {
    /// `qemu/<key>/`.
    pub dir: PathBuf,
    /// `qemu/<key>/bin/qemu-system-x86_64`.
    pub binary: PathBuf,
    /// The Debian source package and version it was built from.
    pub source_package: String,
    /// e.g. `1:7.2+dfsg-7+deb12u18`.
    pub source_version: String,
    /// The build key (directory name).
    pub key: String,
    /// The guest kernel the build's profile was trained on, as it was named then.
    #[serde(default)]
    pub trained_on: String,
}

/// What `qemu/<key>/build.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BuildRecord {
    key: String,
    source_package: String,
    source_version: String,
    compiler: String,
    configure: Vec<String>,
    seconds: u64,
    /// The guest kernel the profile was trained on.
    #[serde(default)]
    trained_on: String,
}

/// What `qemu/current.json` records: the build to use while Debian's binary is the one
/// it was built beside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CurrentRecord {
    key: String,
    /// The recipe's digest when it was built: another vmfactory with another device list
    /// or options builds again.
    recipe: String,
    /// Size and modification time of [`DEBIAN_QEMU_BINARY`] then.
    debian_binary: Option<(u64, i128)>,
}

/// Digest of what this vmfactory contributes to its QEMU: recipe version, device list,
/// configure options.
pub fn qemu_recipe_digest() -> String {
    qemu_key("", "")
}

/// The key of a QEMU build: recipe, source `.dsc` digest, compiler.
fn qemu_key(dsc_sha256: &str, compiler: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"vmfactory-qemu\0");
    hasher.update(format!("recipe={QEMU_BUILD_VERSION}\0").as_bytes());
    hasher.update(format!("source={dsc_sha256}\0").as_bytes());
    for (name, text) in QEMU_PATCHES {
        hasher.update(format!("patch={name}:{:x}\0", Sha256::digest(text)).as_bytes());
    }
    // Only the option lines count: a comment edited does not rebuild QEMU.
    for line in QEMU_DEVICES.lines().map(str::trim) {
        if !line.is_empty() && !line.starts_with('#') {
            hasher.update(format!("device={line}\0").as_bytes());
        }
    }
    for option in CONFIGURE_OPTIONS {
        hasher.update(format!("configure={option}\0").as_bytes());
    }
    hasher.update(format!("firmware={FIRMWARE_PATH}\0").as_bytes());
    hasher.update(format!("compiler={compiler}\0").as_bytes());
    format!("{:x}", hasher.finalize())
}

/// Size and modification time (ns since the epoch) of Debian's QEMU binary.
fn debian_binary_stamp() -> Option<(u64, i128)> {
    let meta = fs::metadata(DEBIAN_QEMU_BINARY).ok()?;
    let modified = meta.modified().ok()?;
    let nanos = match modified.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).ok()?,
        Err(before) => -i128::try_from(before.duration().as_nanos()).ok()?,
    };
    Some((meta.len(), nanos))
}

/// The QEMU `cache_dir` holds for this vmfactory and the installed `qemu-system-x86`,
/// without running anything (a few `stat` calls): `None` when none is built, the recipe
/// changed, or Debian's QEMU was upgraded since.
pub fn current_qemu(cache_dir: &Path) -> Option<BuiltQemu> {
    let record = read_current_record(cache_dir)?;
    if record.recipe != qemu_recipe_digest() || record.debian_binary != debian_binary_stamp() {
        return None;
    }
    load_built(&cache_dir.join("qemu").join(&record.key), &record.key)
}

/// `qemu/current.json`, if it can be read.
fn read_current_record(cache_dir: &Path) -> Option<CurrentRecord> {
    let bytes = fs::read(cache_dir.join("qemu").join("current.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The key `qemu/current.json` names, whichever vmfactory or Debian QEMU it was built
/// for.
pub(crate) fn current_qemu_key(cache_dir: &Path) -> Option<String> {
    read_current_record(cache_dir).map(|record| record.key)
}

/// `build.json` of the build cached under `dir`, if it can be read.
fn read_build_record(dir: &Path) -> Option<BuildRecord> {
    serde_json::from_slice(&fs::read(dir.join("build.json")).ok()?).ok()
}

/// The Debian source package and version a build cached under `dir` was compiled from.
pub(crate) fn built_source(dir: &Path) -> Option<(String, String)> {
    read_build_record(dir).map(|record| (record.source_package, record.source_version))
}

/// A Debian version without its epoch (`1:7.2+dfsg-7` → `7.2+dfsg-7`), as source file
/// names carry it.
fn upstream_version(version: &str) -> &str {
    version.split_once(':').map_or(version, |(_, rest)| rest)
}

/// Name of the directory under `downloads/` holding the source of `package` `version`.
pub(crate) fn source_dir_name(package: &str, version: &str) -> String {
    format!("{package}-source-{}", upstream_version(version))
}

/// Reads the build cached under `dir`, if complete.
fn load_built(dir: &Path, key: &str) -> Option<BuiltQemu> {
    let record = read_build_record(dir)?;
    let binary = dir.join("bin/qemu-system-x86_64");
    (record.key == key && binary.is_file()).then(|| BuiltQemu {
        dir: dir.to_owned(),
        binary,
        source_package: record.source_package,
        source_version: record.source_version,
        key: key.to_owned(),
        trained_on: record.trained_on,
    })
}

/// Checks the host tools a QEMU build needs; the error names the `apt-get install`.
fn check_build_tools() -> Result<(), GuestImageError> {
    let missing = missing_build_tools(
        &[
            ("meson", "meson"),
            ("ninja", "ninja-build"),
            ("pkg-config", "pkg-config"),
            ("dpkg-source", "dpkg-dev"),
            ("gcc", "gcc"),
            ("python3", "python3"),
        ],
        &[
            ("/usr/include/glib-2.0/glib.h", "libglib2.0-dev"),
            ("/usr/include/pixman-1/pixman.h", "libpixman-1-dev"),
            ("/usr/include/libfdt.h", "libfdt-dev"),
            ("/usr/include/zlib.h", "zlib1g-dev"),
        ],
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GuestImageError::QemuBuildTools {
            missing: missing.join(", "),
        })
    }
}

/// Runs a command (C locale, no stdin), capturing its output; a failure is
/// [`GuestImageError::QemuBuild`] at `step`.
fn run_step(command: &mut Command, step: &str) -> Result<String, GuestImageError> {
    let output = command
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                GuestImageError::ToolMissing {
                    tool: command.get_program().to_string_lossy().into_owned(),
                }
            } else {
                GuestImageError::ToolFailed {
                    tool: command.get_program().to_string_lossy().into_owned(),
                    source,
                }
            }
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(GuestImageError::QemuBuild {
        step: step.into(),
        detail: tail(&output.stderr, &output.stdout),
    })
}

/// The installed `qemu-system-x86`'s source package and version.
fn installed_source() -> Result<(String, String), GuestImageError> {
    let output = Command::new("dpkg-query")
        .args([
            "-W",
            "-f=${db:Status-Abbrev}\t${source:Package}\t${source:Version}",
            DEBIAN_QEMU_PACKAGE,
        ])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                GuestImageError::QemuNotInstalled
            } else {
                GuestImageError::ToolFailed {
                    tool: "dpkg-query".into(),
                    source,
                }
            }
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_installed_source(&text).ok_or(GuestImageError::QemuNotInstalled)
}

/// Parses `dpkg-query`'s `status\tsource\tversion` line: only an installed package.
fn parse_installed_source(text: &str) -> Option<(String, String)> {
    let mut fields = text.trim_end().split('\t');
    let (status, package, version) = (fields.next()?, fields.next()?, fields.next()?);
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:~".contains(c))
    };
    // The second letter is the state: installed, or installed with triggers pending or
    // awaited (the first is the wish: `h` for a held package).
    let installed = matches!(status.chars().nth(1), Some('i' | 't' | 'W'));
    (installed && valid(package) && valid(version))
        .then(|| (package.to_owned(), version.to_owned()))
}

/// The `deb-src` lines matching the host's `deb` sources (the same mirrors, suites and
/// components), from `apt-get indextargets`.
fn source_lines(indextargets: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for stanza in indextargets.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(": "))
                    .map(str::trim)
            })
        };
        let (Some(uri), Some(release)) = (field("Repo-URI"), field("Release")) else {
            continue;
        };
        // Only the distribution's own archives: their keys are apt's defaults, while a
        // third-party source's `signed-by` key is not known here (and its sources are
        // not needed: QEMU comes from the distribution).
        if !matches!(field("Origin"), Some("Debian" | "Ubuntu")) {
            continue;
        }
        let component = field("Component").unwrap_or("");
        let safe = |s: &str| !s.chars().any(|c| c.is_whitespace() || c == '#');
        if uri.is_empty() || !safe(uri) || !safe(release) || !safe(component) {
            continue;
        }
        let line = format!("deb-src {uri} {release} {component}")
            .trim_end()
            .to_owned();
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines
}

/// apt options that use a private source list and index directory under `apt_dir`, so
/// the host's apt configuration is neither needed nor changed.
fn apt_options(apt_dir: &Path) -> Vec<String> {
    vec![
        "-o".into(),
        format!(
            "Dir::Etc::sourcelist={}",
            apt_dir.join("sources.list").display()
        ),
        "-o".into(),
        "Dir::Etc::sourceparts=-".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", apt_dir.join("lists").display()),
        "-o".into(),
        "Dir::Cache::pkgcache=".into(),
        "-o".into(),
        "Dir::Cache::srcpkgcache=".into(),
    ]
}

/// Downloads the source package (`.dsc` and its files) into `dir` unless it is there;
/// returns the `.dsc`.
fn ensure_source(
    cache_dir: &Path,
    package: &str,
    version: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, GuestImageError> {
    let dir = cache_dir
        .join("downloads")
        .join(source_dir_name(package, version));
    let dsc = dir.join(format!("{package}_{}.dsc", upstream_version(version)));
    if dsc.is_file() && dir.join(".complete").is_file() {
        return Ok(dsc);
    }
    let apt_dir = cache_dir.join("apt-source");
    let lists = apt_dir.join("lists");
    crate::make_cache_dir(&lists.join("partial"))?;
    // One download at a time (apt locks its lists and would fail a second `update`);
    // whoever waited finds the first one's.
    progress("Waiting for another download of QEMU's source");
    let _lock = lock_exclusive(&apt_dir.join(".lock"))?;
    if dsc.is_file() && dir.join(".complete").is_file() {
        return Ok(dsc);
    }
    let targets = run_step(
        Command::new("apt-get").args(["indextargets", "Created-By: Packages"]),
        "list apt's sources",
    )?;
    let lines = source_lines(&targets);
    if lines.is_empty() {
        return Err(GuestImageError::QemuBuild {
            step: "list apt's sources".into(),
            detail: "apt has no Debian package sources configured (`apt-get indextargets` \
                     lists none)"
                .into(),
        });
    }
    let list = apt_dir.join("sources.list");
    fs::write(&list, lines.join("\n") + "\n").map_err(io_error(&list))?;
    let options = apt_options(&apt_dir);
    progress("Reading Debian's source package lists (apt-get update)");
    run_step(
        Command::new("apt-get")
            .args(&options)
            .args(["-q", "update"]),
        "apt-get update of the source lists",
    )?;
    progress(&format!("Downloading the source of {package} {version}"));
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache_dir.join("downloads"))
        .map_err(io_error(&cache_dir.join("downloads")))?;
    run_step(
        Command::new("apt-get")
            .current_dir(staging.path())
            .args(&options)
            .args(["-q", "source", "--download-only"])
            .arg(format!("{package}={version}")),
        "apt-get source",
    )?;
    let _ = fs::remove_dir_all(&dir);
    // The staging directory becomes the download's (its drop then finds nothing).
    fs::rename(staging.path(), &dir).map_err(io_error(&dir))?;
    if !dsc.is_file() {
        return Err(GuestImageError::QemuBuild {
            step: "apt-get source".into(),
            detail: format!("{} is missing after the download", dsc.display()),
        });
    }
    fs::write(dir.join(".complete"), b"").map_err(io_error(&dir))?;
    Ok(dsc)
}

/// What [`ensure_qemu`] builds.
#[derive(Debug, Clone, Copy)]
pub struct QemuBuild<'a> {
    /// Root of the cache.
    pub cache_dir: &'a Path,
    /// Build again even when a build of the same key is cached.
    pub force: bool,
    /// The guest kernel a build's profile is trained on (booted to its panic): the one
    /// the VMs boot.
    pub training_kernel: &'a Path,
}

/// Finds the QEMU for the installed `qemu-system-x86` in the cache or builds it (apt for
/// the source, then `configure` and `ninja`, a few minutes), records it as current and
/// returns it. A concurrent build of the same key is waited for, not repeated.
pub fn ensure_qemu(
    spec: QemuBuild<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltQemu, GuestImageError> {
    // Taken first: an upgrade of Debian's QEMU during the build is seen next time.
    let debian_binary = debian_binary_stamp();
    let (package, version) = installed_source()?;
    let downloads = spec.cache_dir.join("downloads");
    let root = spec.cache_dir.join("qemu");
    for dir in [spec.cache_dir, &downloads, &root] {
        crate::make_cache_dir(dir)?;
    }
    crate::image::sweep_stale_staging(&downloads);
    // A quick answer when the current record is right (the usual `guest build`).
    if !spec.force {
        if let Some(built) = current_qemu(spec.cache_dir) {
            if built.source_version == version {
                return Ok(built);
            }
        }
    }
    // Before apt runs: a missing tool is named at once (a cached build needs none).
    check_build_tools()?;
    let dsc = ensure_source(spec.cache_dir, &package, &version, progress)?;
    let compiler = compiler_version()?;
    let key = qemu_key(&crate::digest::sha256_file(&dsc)?, &compiler);
    let dir = root.join(&key);
    let built = match (!spec.force).then(|| load_built(&dir, &key)).flatten() {
        Some(built) => built,
        None => {
            progress("Waiting for another build of the same QEMU");
            let _lock = lock_exclusive(&root.join(format!(".{key}.lock")))?;
            match (!spec.force).then(|| load_built(&dir, &key)).flatten() {
                Some(built) => built,
                None => build(
                    &Source {
                        dsc: &dsc,
                        package: &package,
                        version: &version,
                        compiler: &compiler,
                    },
                    &root,
                    &key,
                    spec.training_kernel,
                    progress,
                )?,
            }
        }
    };
    record_current(&root, &key, debian_binary)?;
    Ok(built)
}

/// Writes `qemu/current.json` for the build `key` (through a rename).
fn record_current(
    root: &Path,
    key: &str,
    debian_binary: Option<(u64, i128)>,
) -> Result<(), GuestImageError> {
    let record = CurrentRecord {
        key: key.to_owned(),
        recipe: qemu_recipe_digest(),
        debian_binary,
    };
    let path = root.join("current.json");
    let json = serde_json::to_vec_pretty(&record).map_err(|source| GuestImageError::Manifest {
        path: path.clone(),
        source,
    })?;
    // A new file of its own (not a name a link could already stand on), renamed over.
    let mut temporary = tempfile::Builder::new()
        .prefix(".current-")
        .tempfile_in(root)
        .map_err(io_error(root))?;
    std::io::Write::write_all(&mut temporary, &json)
        .and_then(|()| temporary.as_file().sync_all())
        .map_err(io_error(temporary.path()))?;
    temporary
        .persist(&path)
        .map(drop)
        .map_err(|err| io_error(&path)(err.error))
}

/// The source a build compiles, and the compiler.
struct Source<'a> {
    dsc: &'a Path,
    package: &'a str,
    version: &'a str,
    compiler: &'a str,
}

/// Unpacks, configures and compiles the source into `root/key`, twice: instrumented, then
/// optimised by the profile of its boot of `training_kernel`.
fn build(
    source: &Source<'_>,
    root: &Path,
    key: &str,
    training_kernel: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltQemu, GuestImageError> {
    let Source {
        dsc,
        package,
        version,
        compiler,
    } = *source;
    crate::image::sweep_stale_staging(root);
    let started = std::time::Instant::now();
    let staging = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(root)
        .map_err(io_error(root))?;
    let tree = staging.path().join("src");
    progress(&format!(
        "Unpacking the source of {package} {version} (with Debian's patches)"
    ));
    run_step(
        Command::new("dpkg-source").arg("-x").arg(dsc).arg(&tree),
        "dpkg-source -x",
    )?;
    progress(&format!(
        "Applying {} vmfactory patches",
        QEMU_PATCHES.len()
    ));
    crate::kernel::apply_patches(&tree, QEMU_PATCHES, &|step, detail| {
        GuestImageError::QemuBuild { step, detail }
    })?;
    let devices = tree.join("configs/devices/x86_64-softmmu/vmfactory.mak");
    fs::write(&devices, QEMU_DEVICES).map_err(io_error(&devices))?;
    let build_dir = tree.join("build-vmfactory");
    fs::create_dir(&build_dir).map_err(io_error(&build_dir))?;
    progress("Configuring QEMU (x86_64, TCG and KVM, vmfactory's devices only)");
    let meson_options = tree.join("meson_options.txt");
    let has_avx2 = fs::read_to_string(&meson_options)
        .map_err(io_error(&meson_options))?
        .contains("option('avx2'");
    // Run, and recorded in `build.json`.
    let configure: Vec<String> = CONFIGURE_OPTIONS
        .iter()
        .map(|option| (*option).to_owned())
        .chain(has_avx2.then(|| AVX2_OPTION.to_owned()))
        .chain([
            format!("--firmwarepath={FIRMWARE_PATH}"),
            pkgversion(version),
        ])
        .collect();
    run_step(
        Command::new("../configure")
            .current_dir(&build_dir)
            .args(&configure),
        "configure",
    )?;
    let out = staging.path().join("out");
    let bin = out.join("bin");
    crate::make_cache_dir(&bin)?;
    let from = build_dir.join("qemu-system-x86_64");
    let binary = bin.join("qemu-system-x86_64");
    set_profile_mode(&build_dir, "generate")?;
    compile(&build_dir, "instrumented, 1 of 2", progress)?;
    // Run from its installed place: in the build tree QEMU looks for its firmware there.
    // The profile goes next to the objects (absolute paths).
    fs::rename(&from, &binary).map_err(io_error(&from))?;
    train(&binary, training_kernel, &build_dir, progress)?;
    set_profile_mode(&build_dir, "use")?;
    compile(&build_dir, "optimised by the profile, 2 of 2", progress)?;
    fs::rename(&from, &binary).map_err(io_error(&from))?;
    // Writable by us alone whatever the umask: vmfactory runs it only so
    // (`untrusted_code_path`).
    {
        use std::os::unix::fs::PermissionsExt;
        for (path, mode) in [(&out, 0o755), (&bin, 0o755), (&binary, 0o755)] {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_error(path))?;
        }
    }
    let record = BuildRecord {
        key: key.to_owned(),
        source_package: package.to_owned(),
        source_version: version.to_owned(),
        compiler: compiler.to_owned(),
        configure,
        seconds: started.elapsed().as_secs(),
        trained_on: training_kernel.to_string_lossy().into_owned(),
    };
    let dir = root.join(key);
    let json = serde_json::to_vec_pretty(&record).map_err(|source| GuestImageError::Manifest {
        path: dir.join("build.json"),
        source,
    })?;
    crate::digest::write_synced(&out.join("build.json"), &json)?;
    install_build(&out, &dir, staging.path())?;
    progress("Removing the QEMU source tree");
    drop(staging);
    tracing::info!(dir = %dir.display(), seconds = record.seconds, "built QEMU");
    load_built(&dir, key).ok_or_else(|| GuestImageError::QemuBuild {
        step: "install".into(),
        detail: format!("{} is incomplete after the build", dir.display()),
    })
}

/// `meson configure -Db_pgo=<mode>`: `generate` (instrumented) or `use` (optimised by the
/// profile; the next `ninja` compiles every object again).
fn set_profile_mode(build_dir: &Path, mode: &str) -> Result<(), GuestImageError> {
    // QEMU 8.1 and later configure through the meson of their own Python venv (which may
    // be the newer one QEMU bundles); 7.2 through the host's.
    let venv = build_dir.join("pyvenv/bin/meson");
    let meson = if venv.is_file() {
        venv.as_path()
    } else {
        Path::new("meson")
    };
    run_step(
        Command::new(meson).current_dir(build_dir).args([
            "configure",
            &format!("-Db_pgo={mode}"),
            ".",
        ]),
        &format!("meson configure -Db_pgo={mode}"),
    )
    .map(drop)
}

/// The profile's training: the instrumented `binary` boots `kernel` without an initramfs
/// under TCG until the kernel panics (it finds no root) and QEMU exits (`-no-reboot`),
/// with each of [`TRAINING_VCPUS`]. A boot still running after [`TRAINING_TIMEOUT`] is
/// stopped with `SIGTERM` (QEMU exits cleanly and writes its profile).
fn train(
    binary: &Path,
    kernel: &Path,
    build_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), GuestImageError> {
    let log = build_dir.join("vmfactory-training.log");
    for vcpus in TRAINING_VCPUS {
        progress(&format!(
            "Training QEMU's profile: booting {} with {vcpus} vCPU(s) to its panic",
            kernel.display()
        ));
        let stderr = fs::File::create(&log).map_err(io_error(&log))?;
        let ended = run_bounded(
            Command::new(binary)
                .args(training_args(vcpus))
                .arg("-kernel")
                .arg(kernel)
                .env("LC_ALL", "C")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
            TRAINING_TIMEOUT,
            TRAINING_TIMEOUT + std::time::Duration::from_secs(30),
        )
        .map_err(|source| GuestImageError::ToolFailed {
            tool: binary.display().to_string(),
            source,
        })?;
        let Some((status, stopped)) = ended else {
            return Err(GuestImageError::QemuBuild {
                step: "training".into(),
                detail: format!(
                    "QEMU booting {} did not end, even after SIGTERM",
                    kernel.display()
                ),
            });
        };
        if stopped {
            tracing::warn!(
                kernel = %kernel.display(),
                vcpus,
                "The kernel did not panic within {TRAINING_TIMEOUT:?} in QEMU's profile \
                 training (does it have a built-in initramfs or command line?); stopped it, \
                 the profile covers what it ran"
            );
        } else if !status.success() {
            let detail = fs::read(&log).unwrap_or_default();
            return Err(GuestImageError::QemuBuild {
                step: "training".into(),
                detail: format!(
                    "QEMU booting the guest kernel {} (the VMs' kernel, to train the build's \
                     profile) with {vcpus} vCPU(s) ended with {status}: {}; check that this \
                     kernel boots in QEMU with -kernel (a bzImage, or a vmlinux with a PVH \
                     note)",
                    kernel.display(),
                    tail(&detail, b"")
                ),
            });
        }
    }
    Ok(())
}

/// Runs `command`, sending it `SIGTERM` once `stop_after` has passed and `SIGKILL` at
/// `kill_after`: `Some((status, stopped by SIGTERM))`, or `None` when it had to be
/// killed.
fn run_bounded(
    command: &mut Command,
    stop_after: std::time::Duration,
    kill_after: std::time::Duration,
) -> std::io::Result<Option<(std::process::ExitStatus, bool)>> {
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl(2) only, async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Dies with this thread: a killed build leaves no QEMU behind.
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = command.spawn()?;
    let started = std::time::Instant::now();
    let mut stopped = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some((status, stopped))),
            Ok(None) => {}
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        }
        let elapsed = started.elapsed();
        if elapsed > kill_after {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        if elapsed > stop_after && !stopped {
            stopped = true;
            // Our own child, not yet reaped: the pid is still its.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::TERM,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// QEMU's arguments (but `-kernel`) for a training boot: q35 under TCG with the CPU model
/// of vmfactory's TCG VMs, no devices, no output, exit at the guest's reset (its panic).
fn training_args(vcpus: u32) -> Vec<String> {
    [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        TRAINING_CPU,
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "null",
        "-monitor",
        "none",
        "-no-reboot",
        "-append",
        "panic=-1 quiet",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(["-smp".to_owned(), vcpus.to_string()])
    .collect()
}

/// What `--version` adds to QEMU's version: that it is vmfactory's build, and of which
/// Debian source (templates record the version: one saved by Debian's QEMU is not loaded
/// by ours).
fn pkgversion(version: &str) -> String {
    format!("--with-pkgversion=vmfactory, Debian {version}")
}

/// `ninja -j<cores> qemu-system-x86_64`, reporting its `[done/total]` steps.
fn compile(
    build_dir: &Path,
    stage: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), GuestImageError> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress(&format!("Compiling QEMU ({stage}) with {jobs} jobs"));
    run_compile(
        Command::new("ninja")
            .current_dir(build_dir)
            .arg(format!("-j{jobs}"))
            .arg("qemu-system-x86_64"),
        &build_dir.join("vmfactory-build.log"),
        &mut |line| {
            if let Some((done, total)) = ninja_step(line) {
                if done % 10 == 0 || done == total {
                    progress(&format!("Compiling QEMU ({stage}): {done}/{total}"));
                }
            }
        },
        &|detail| GuestImageError::QemuBuild {
            step: "ninja qemu-system-x86_64".into(),
            detail,
        },
    )
}

/// `[12/1234] Compiling …` → (12, 1234).
fn ninja_step(line: &str) -> Option<(u64, u64)> {
    let inner = line.strip_prefix('[')?.split_once(']')?.0;
    let (done, total) = inner.split_once('/')?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_installed_source() {
        assert_eq!(
            parse_installed_source("ii \tqemu\t1:7.2+dfsg-7+deb12u18"),
            Some(("qemu".into(), "1:7.2+dfsg-7+deb12u18".into()))
        );
        // Removed (config files left), or nothing known.
        assert_eq!(
            parse_installed_source("rc \tqemu\t1:7.2+dfsg-7+deb12u18"),
            None
        );
        // Held, or with triggers pending: installed all the same.
        for status in ["hi ", "it ", "iW "] {
            assert!(
                parse_installed_source(&format!("{status}\tqemu\t1:7.2")).is_some(),
                "{status}"
            );
        }
        assert_eq!(parse_installed_source(""), None);
        // Nothing an apt argument could be abused with.
        assert_eq!(parse_installed_source("ii \tqemu -o x\t1"), None);
    }

    #[test]
    fn source_lines_follow_the_binary_sources() {
        let targets = "Repo-URI: http://deb.debian.org/debian/\nRelease: bookworm\n\
                       Component: main\nOrigin: Debian\nTarget-Of: deb\n\n\
                       Repo-URI: http://deb.debian.org/debian/\nRelease: bookworm\n\
                       Component: main\nOrigin: Debian\nIdentifier: Translations\n\n\
                       Repo-URI: http://deb.debian.org/debian-security/\n\
                       Release: bookworm-security\nComponent: main\nOrigin: Debian\n\n\
                       Repo-URI: http://mirror.example/ubuntu/\nRelease: ./\n\
                       Origin: Ubuntu\n\n\
                       Repo-URI: https://download.docker.com/linux/debian/\n\
                       Release: bookworm\nComponent: stable\nOrigin: Docker\n\n\
                       Repo-URI: http://evil.example/ x\nRelease: a\nComponent: b\n\
                       Origin: Debian\n";
        assert_eq!(
            source_lines(targets),
            [
                "deb-src http://deb.debian.org/debian/ bookworm main",
                "deb-src http://deb.debian.org/debian-security/ bookworm-security main",
                "deb-src http://mirror.example/ubuntu/ ./",
            ]
        );
    }

    #[test]
    fn ninja_steps_are_read() {
        assert_eq!(
            ninja_step("[12/1234] Compiling C object foo.o"),
            Some((12, 1234))
        );
        assert_eq!(ninja_step("FAILED: foo.o"), None);
        assert_eq!(ninja_step("[a/b]"), None);
    }

    #[test]
    fn the_key_follows_the_recipe_and_inputs() {
        let base = qemu_key("abc", "gcc 12");
        assert_eq!(base, qemu_key("abc", "gcc 12"));
        assert_ne!(base, qemu_key("abd", "gcc 12"));
        assert_ne!(base, qemu_key("abc", "gcc 13"));
        assert!(QEMU_DEVICES.contains("CONFIG_Q35=y"));
        assert!(QEMU_DEVICES.contains("CONFIG_PCIE_PORT=y"));
    }

    #[test]
    fn the_patches_apply_to_their_file() {
        // Each patch: its file, and two pieces of the text it makes (for 0001-0003 the
        // start and the end of the memory transaction it wraps a call in).
        let expected = [
            (
                "b/softmmu/vl.c",
                "memory_region_transaction_begin();\n    machine_run_board_init(",
                "&error_fatal);\n    memory_region_transaction_commit();\n\n    drive_check",
            ),
            (
                "b/softmmu/vl.c",
                "memory_region_transaction_begin();\n    qemu_opts_foreach(qemu_find_opts(\"device\")",
                "    }\n    memory_region_transaction_commit();\n    rom_reset_order_override();",
            ),
            (
                "b/migration/savevm.c",
                "if (batched) {\n        memory_region_transaction_begin();\n    }\n    \
                 ret = qemu_loadvm_state_main(f, mis);",
                "mis);\n    if (batched) {\n        memory_region_transaction_commit();\n    }\n",
            ),
            (
                "b/hw/i386/acpi-build.c",
                "    if (from_stream) {\n        g_array_set_size(tables.table_data, 1);\n",
                "    } else {\n        acpi_build(&tables, MACHINE(pcms));\n    }\n",
            ),
            (
                "b/migration/migration.c",
                "#endif\n    /*\n",
                "    DEFINE_PROP_MIG_CAP(\"x-ignore-shared\",\n            \
                 MIGRATION_CAPABILITY_X_IGNORE_SHARED),\n\n    DEFINE_PROP_END_OF_LIST(),",
            ),
        ];
        assert_eq!(QEMU_PATCHES.len(), expected.len());
        for ((name, text), (file, begin, commit)) in QEMU_PATCHES.iter().zip(expected) {
            let patch = diffy::Patch::from_str(text).expect(name);
            assert_eq!(patch.modified(), Some(file), "{name}");
            // The lines the patch was written against, each hunk at its place.
            let mut original = String::new();
            for hunk in patch.hunks() {
                let before = hunk.old_range().start().saturating_sub(1);
                let lines = original.matches('\n').count();
                original.push_str(&"\n".repeat(before.saturating_sub(lines)));
                for line in hunk.lines() {
                    if let diffy::Line::Context(text) | diffy::Line::Delete(text) = line {
                        original.push_str(text);
                    }
                }
            }
            let patched = diffy::apply(&original, &patch).expect(name);
            assert!(patched.contains(begin), "{name}: {patched}");
            assert!(patched.contains(commit), "{name}: {patched}");
        }
    }

    #[test]
    fn the_source_names_parse() {
        assert_eq!("vmfactory".parse::<QemuSource>(), Ok(QemuSource::Vmfactory));
        assert_eq!("debian".parse::<QemuSource>(), Ok(QemuSource::Debian));
        assert!("qemu".parse::<QemuSource>().is_err());
        assert_eq!(QemuSource::default(), QemuSource::Vmfactory);
    }

    #[test]
    fn a_bounded_run_is_stopped_then_killed() {
        use std::time::{Duration, Instant};
        let ms = Duration::from_millis;
        let started = Instant::now();
        let ended = run_bounded(Command::new("true").stdin(Stdio::null()), ms(500), ms(900));
        let (status, stopped) = ended.expect("run").expect("ended");
        assert!(status.success() && !stopped);
        // Ends on SIGTERM (as QEMU does, writing its profile).
        let ended = run_bounded(
            Command::new("sleep").arg("30").stdin(Stdio::null()),
            ms(100),
            ms(5000),
        );
        let (status, stopped) = ended.expect("run").expect("ended");
        assert!(stopped && !status.success(), "{status}");
        // Ignores SIGTERM: killed.
        // (A second for the shell to set its trap, even on a busy machine.)
        let ended = run_bounded(
            Command::new("sh")
                .args(["-c", "trap '' TERM; exec sleep 30"])
                .stdin(Stdio::null()),
            ms(1000),
            ms(1500),
        );
        assert!(ended.expect("run").is_none());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_failed_training_boot_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut said = Vec::new();
        // `false` stands for a QEMU that cannot boot the kernel.
        let err = train(
            Path::new("false"),
            Path::new("/no/kernel"),
            dir.path(),
            &mut |line| said.push(line.to_owned()),
        )
        .expect_err("a failed boot fails the training");
        let text = err.to_string();
        assert!(text.contains("training"), "{text}");
        assert!(
            text.contains(
                "/no/kernel (the VMs' kernel, to train the build's profile) with 1 vCPU(s) \
                 ended with exit status: 1"
            ),
            "{text}"
        );
        assert_eq!(said.len(), 1, "stopped at the first boot: {said:?}");
        // A boot that ends well trains with each vCPU count.
        said.clear();
        train(
            Path::new("true"),
            Path::new("/a/kernel"),
            dir.path(),
            &mut |line| said.push(line.to_owned()),
        )
        .expect("trained");
        assert_eq!(said.len(), TRAINING_VCPUS.len(), "{said:?}");
    }
}
