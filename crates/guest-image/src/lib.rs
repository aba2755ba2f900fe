//! Builds the guest image of vmfactory's micro-VMs: Debian's cloud kernel (as a bzImage
//! and, when it can be extracted, an uncompressed PVH-bootable `vmlinux`) plus an
//! uncompressed newc initramfs holding the agent as `/init`, the virtio modules it loads,
//! and a static busybox. Images live in a cache directory under a key derived from every
//! input, so a build only does work when an input changed.

pub mod cpio;
pub mod initramfs;

mod apt;
mod elf;
mod modules;
mod vmlinux;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use elf::ElfError;
pub use modules::ModuleError;
pub use vmlinux::VmlinuxError;

use apt::PackageVersion;
use initramfs::{InitramfsContents, InitramfsError, ModuleFile};

/// Version of the image layout; bump it whenever the output for the same inputs changes.
pub const FORMAT_VERSION: u32 = 1;
/// Meta package resolved to the kernel package when none is given.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Root modules included when none are given (their dependencies are added).
pub const DEFAULT_MODULES: [&str; 2] = ["virtio_pci", "virtio_console"];
/// Debian package providing the static busybox userland.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Rust target the agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Errors of building the guest image or the agent.
#[derive(Debug, Error)]
pub enum GuestImageError {
    /// A required Debian tool is not installed.
    #[error("Command {tool} not found: vmfactory builds its guest image from Debian packages; run it on Debian/Ubuntu or pass a prebuilt kernel and initrd")]
    ToolMissing {
        /// The missing program.
        tool: String,
    },
    /// A tool exists but could not be started.
    #[error("Could not run {tool}; check that it is executable")]
    ToolFailed {
        /// The program.
        tool: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `apt-cache` could not resolve a package.
    #[error("Could not resolve package {package} with apt-cache ({detail}); check the package name and run `apt-get update`")]
    AptResolve {
        /// The package being resolved.
        package: String,
        /// What apt said.
        detail: String,
    },
    /// A package has no installable version.
    #[error(
        "Package {package} has no candidate version; run `apt-get update` (as root) and try again"
    )]
    NoCandidate {
        /// The package.
        package: String,
    },
    /// `apt-get download` failed.
    #[error("apt-get could not download {package}: {stderr}; check access to the Debian mirror and run `apt-get update`")]
    AptDownload {
        /// `name=version` of the package.
        package: String,
        /// apt's error output.
        stderr: String,
    },
    /// `dpkg-deb` could not read or unpack a package.
    #[error("Could not unpack {} with dpkg-deb ({detail}); delete the file and build again to download it afresh", path.display())]
    Unpack {
        /// The `.deb` file.
        path: PathBuf,
        /// What dpkg-deb said.
        detail: String,
    },
    /// The kernel package lacks an expected file.
    #[error("Kernel package {package} has no {what}; pick another kernel package (it must ship boot/vmlinuz-* and lib/modules)")]
    KernelLayout {
        /// The kernel package.
        package: String,
        /// What is missing.
        what: String,
    },
    /// The busybox package lacks its binary or the binary does not list its applets.
    #[error("Busybox from {package} is unusable ({detail}); check that the host can run x86-64 binaries and that the package is not corrupt")]
    Busybox {
        /// The busybox package.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// Kernel module lookup or ordering failed.
    #[error(transparent)]
    Modules(#[from] ModuleError),
    /// Writing the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// A file or directory operation failed.
    #[error("Could not access {}; check that the directory is writable and the disk is not full", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The manifest could not be encoded or decoded.
    #[error("Image manifest {} is not valid JSON of this version; delete the image directory and build again", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The agent binary was not given or does not exist.
    #[error("Agent binary {} does not exist; build it first (`cargo build --profile agent -p vmfactory-agent --target x86_64-unknown-linux-gnu` with RUSTFLAGS='-C target-feature=+crt-static') and pass its path", path.display())]
    AgentMissing {
        /// The configured path.
        path: PathBuf,
    },
    /// Building the agent with cargo failed.
    #[error(
        "Building the agent failed ({detail}); fix the errors cargo printed above and try again"
    )]
    AgentBuild {
        /// What failed.
        detail: String,
    },
    /// The agent is not an ELF executable.
    #[error("Agent binary {} is not an ELF executable; pass the built vmfactory-agent binary", path.display())]
    AgentNotElf {
        /// The agent path.
        path: PathBuf,
        /// Why it is not readable as ELF.
        #[source]
        source: ElfError,
    },
    /// The agent is dynamically linked and cannot run as `/init`.
    #[error("Agent binary {} is dynamically linked (it has an ELF interpreter) and cannot run as /init; build it with RUSTFLAGS='-C target-feature=+crt-static' and --target x86_64-unknown-linux-gnu", path.display())]
    AgentNotStatic {
        /// The agent path.
        path: PathBuf,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> GuestImageError + '_ {
    move |source| GuestImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Options for building the guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Root of the cache (see [`default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Statically linked agent executable; becomes `/init`.
    pub agent_binary: PathBuf,
    /// Meta package to resolve; `None` means [`DEFAULT_KERNEL_PACKAGE`].
    pub kernel_package: Option<String>,
    /// Root modules to include; their dependency closure is added.
    pub modules: Vec<String>,
    /// Rebuild even if a cached image exists.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            agent_binary: PathBuf::new(),
            kernel_package: None,
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            force: false,
        }
    }
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Directory of the image: `cache_dir/images/<key>/`.
    pub dir: PathBuf,
    /// Preferred kernel to boot: `vmlinux` if it was extracted, else `vmlinuz`.
    pub kernel: PathBuf,
    /// The bzImage, `dir/vmlinuz` (always present).
    pub bzimage: PathBuf,
    /// Uncompressed ELF kernel with a Xen PVH entry note, `dir/vmlinux`, if extracted.
    pub vmlinux: Option<PathBuf>,
    /// The initramfs, `dir/initrd.img` (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// Kernel package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub kernel_package: String,
    /// Debian version of the kernel package, e.g. `6.1.192-2`.
    pub kernel_version: String,
    /// Hex SHA-256 of the inputs.
    pub key: String,
}

/// The digests that determine an image's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInputs {
    /// SHA-256 of the kernel `.deb`.
    pub kernel_deb_sha256: String,
    /// SHA-256 of the busybox `.deb`.
    pub busybox_deb_sha256: String,
    /// SHA-256 of the agent binary.
    pub agent_sha256: String,
    /// Root modules, canonicalised (`_` for `-`), in the order given.
    pub modules: Vec<String>,
}

impl ImageInputs {
    /// Hex SHA-256 over [`FORMAT_VERSION`] and every input.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"vmfactory-guest-image\0");
        hasher.update(format!("format={FORMAT_VERSION}\0").as_bytes());
        hasher.update(format!("kernel-deb={}\0", self.kernel_deb_sha256).as_bytes());
        hasher.update(format!("busybox-deb={}\0", self.busybox_deb_sha256).as_bytes());
        hasher.update(format!("agent={}\0", self.agent_sha256).as_bytes());
        hasher.update(format!("modules={}\0", self.modules.join(",")).as_bytes());
        hex(&hasher.finalize())
    }
}

/// Contents of `manifest.json` in each image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the crate that wrote the image.
    pub format_version: u32,
    /// The image itself.
    #[serde(flatten)]
    pub image: GuestImage,
    /// Busybox package name.
    pub busybox_package: String,
    /// Debian version of the busybox package.
    pub busybox_version: String,
    /// The digests the key was computed from.
    pub inputs: ImageInputs,
    /// Module file names in the order the agent loads them.
    pub module_load_order: Vec<String>,
    /// SHA-256 of `vmlinuz`.
    pub vmlinuz_sha256: String,
    /// SHA-256 of `vmlinux`, if present.
    pub vmlinux_sha256: Option<String>,
    /// SHA-256 of `initrd.img`.
    pub initrd_sha256: String,
}

/// Name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Reads the manifest of the image in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, GuestImageError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| GuestImageError::Manifest { path, source })
}

/// The cache root: `$VMFACTORY_CACHE_DIR`, else `$XDG_CACHE_HOME/vmfactory`, else
/// `$HOME/.cache/vmfactory`, else `/var/cache/vmfactory`.
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("VMFACTORY_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("vmfactory");
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".cache").join("vmfactory");
    }
    PathBuf::from("/var/cache/vmfactory")
}

/// Builds the guest image (or returns the cached one) as `opts` describes, reporting
/// each long step to `progress`.
pub fn build(
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, GuestImageError> {
    check_static_executable(&opts.agent_binary)?;
    apt::check_tools()?;

    let meta = opts
        .kernel_package
        .as_deref()
        .unwrap_or(DEFAULT_KERNEL_PACKAGE);
    tracing::info!(
        package = meta,
        "resolving the kernel package with apt-cache"
    );
    let apt_dir = opts.cache_dir.join("apt");
    fs::create_dir_all(&apt_dir).map_err(io_error(&apt_dir))?;
    let apt_cache = apt::AptCache::with_private_cache(&apt_dir);
    let kernel_name = apt::resolve_kernel_package(&apt_cache, meta)?;
    let kernel = apt::candidate_version(&apt_cache, &kernel_name)?;
    let busybox = apt::candidate_version(&apt_cache, BUSYBOX_PACKAGE)?;
    tracing::info!(
        kernel = %kernel.name,
        kernel_version = %kernel.version,
        busybox_version = %busybox.version,
        "resolved guest packages"
    );

    let downloads = opts.cache_dir.join("downloads");
    let images = opts.cache_dir.join("images");
    for dir in [&downloads, &images] {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    for dir in [&opts.cache_dir, &downloads, &images] {
        sweep_stale_staging(dir);
    }
    let kernel_deb = apt::ensure_downloaded(&downloads, &kernel, progress)?;
    let busybox_deb = apt::ensure_downloaded(&downloads, &busybox, progress)?;

    let inputs = ImageInputs {
        kernel_deb_sha256: sha256_file_remembered(&kernel_deb)?,
        busybox_deb_sha256: sha256_file_remembered(&busybox_deb)?,
        agent_sha256: sha256_file(&opts.agent_binary)?,
        modules: opts
            .modules
            .iter()
            .map(|m| modules::canonical_name(m))
            .collect(),
    };
    let key = inputs.key();
    let dir = images.join(&key);
    if !opts.force {
        if let Some(image) = load_cached(&dir, &key) {
            tracing::info!(key = %key, dir = %dir.display(), "guest image is cached");
            return Ok(image);
        }
    }

    let unpacked = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&opts.cache_dir)
        .map_err(io_error(&opts.cache_dir))?;
    let kernel_root = unpacked.path().join("kernel");
    let busybox_root = unpacked.path().join("busybox");
    progress(&format!("Unpacking {} {}", kernel.name, kernel.version));
    apt::unpack(&kernel_deb, &kernel_root)?;
    progress(&format!("Unpacking {} {}", busybox.name, busybox.version));
    apt::unpack(&busybox_deb, &busybox_root)?;

    let image = assemble(
        &Assembly {
            images_dir: &images,
            key: &key,
            kernel_root: &kernel_root,
            busybox_root: &busybox_root,
            agent: &opts.agent_binary,
            kernel: &kernel,
            busybox: &busybox,
            inputs: &inputs,
            force: opts.force,
        },
        progress,
    )?;
    tracing::info!(key = %key, dir = %image.dir.display(), vmlinux = image.vmlinux.is_some(), "built guest image");
    Ok(image)
}

/// Returns the image in `dir` if its manifest is present, current and its files exist.
fn load_cached(dir: &Path, key: &str) -> Option<GuestImage> {
    if !dir.join(MANIFEST_FILE).is_file() {
        return None;
    }
    let manifest = match read_manifest(dir) {
        Ok(manifest) => manifest,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "ignoring unreadable cached image");
            return None;
        }
    };
    if manifest.format_version != FORMAT_VERSION || manifest.image.key != key {
        tracing::warn!(dir = %dir.display(), "ignoring cached image of another format");
        return None;
    }
    // Rebase the paths on where the image is now, in case the cache was moved.
    let image = rebased(manifest.image, dir);
    let files_present = image.bzimage.is_file()
        && image.initrd.is_file()
        && image.vmlinux.as_ref().map_or(true, |v| v.is_file());
    if !files_present {
        tracing::warn!(dir = %dir.display(), "cached image is missing files; rebuilding");
        return None;
    }
    Some(image)
}

/// Points every path of `image` into `dir`.
fn rebased(image: GuestImage, dir: &Path) -> GuestImage {
    let vmlinux = image.vmlinux.map(|_| dir.join("vmlinux"));
    GuestImage {
        dir: dir.to_owned(),
        kernel: vmlinux.clone().unwrap_or_else(|| dir.join("vmlinuz")),
        bzimage: dir.join("vmlinuz"),
        vmlinux,
        initrd: dir.join("initrd.img"),
        ..image
    }
}

/// Everything [`assemble`] needs, once the packages are unpacked.
struct Assembly<'a> {
    images_dir: &'a Path,
    key: &'a str,
    kernel_root: &'a Path,
    busybox_root: &'a Path,
    agent: &'a Path,
    kernel: &'a PackageVersion,
    busybox: &'a PackageVersion,
    inputs: &'a ImageInputs,
    force: bool,
}

/// Writes the image from unpacked packages into a staging directory and moves it into
/// `images_dir/<key>` in one rename.
fn assemble(
    spec: &Assembly<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, GuestImageError> {
    let (release, vmlinuz_source) = find_kernel(spec.kernel_root, &spec.kernel.name)?;
    let staging = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(spec.images_dir)
        .map_err(io_error(spec.images_dir))?;

    let bzimage_bytes = fs::read(&vmlinuz_source).map_err(io_error(&vmlinuz_source))?;
    write_synced(&staging.path().join("vmlinuz"), &bzimage_bytes)?;
    progress("Extracting the uncompressed vmlinux from the bzImage");
    let vmlinux_bytes = match vmlinux::extract_vmlinux(&bzimage_bytes) {
        Ok(bytes) => {
            write_synced(&staging.path().join("vmlinux"), &bytes)?;
            Some(bytes)
        }
        Err(err) => {
            tracing::warn!(error = %err, kernel = %vmlinuz_source.display(), "no PVH vmlinux; VMs will boot the bzImage");
            None
        }
    };

    progress("Resolving kernel module dependencies");
    let modules_root = find_modules_root(spec.kernel_root, &release).ok_or_else(|| {
        GuestImageError::KernelLayout {
            package: spec.kernel.name.clone(),
            what: format!("lib/modules/{release}/kernel directory"),
        }
    })?;
    let index = modules::ModuleIndex::scan(&modules_root)?;
    tracing::debug!(count = index.len(), "indexed kernel modules");
    let resolved = modules::resolve(&index, &spec.inputs.modules)?;
    let module_files: Vec<ModuleFile> = resolved
        .into_iter()
        .map(|module| ModuleFile {
            name: module.name,
            source: module.path,
        })
        .collect();

    let busybox = find_busybox(spec.busybox_root, &spec.busybox.name)?;
    let applets = list_applets(&busybox, &spec.busybox.name)?;

    progress("Writing initramfs");
    let initrd_path = staging.path().join("initrd.img");
    initramfs::write_initramfs(
        &initrd_path,
        &InitramfsContents {
            agent: spec.agent.to_owned(),
            busybox,
            applets,
            modules: module_files.clone(),
        },
    )?;

    let dir = spec.images_dir.join(spec.key);
    let image = rebased(
        GuestImage {
            dir: dir.clone(),
            kernel: PathBuf::new(),
            bzimage: PathBuf::new(),
            vmlinux: vmlinux_bytes.as_ref().map(|_| PathBuf::new()),
            initrd: PathBuf::new(),
            kernel_release: release,
            kernel_package: spec.kernel.name.clone(),
            kernel_version: spec.kernel.version.clone(),
            key: spec.key.to_owned(),
        },
        &dir,
    );
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        image: image.clone(),
        busybox_package: spec.busybox.name.clone(),
        busybox_version: spec.busybox.version.clone(),
        inputs: spec.inputs.clone(),
        module_load_order: module_files.iter().map(ModuleFile::file_name).collect(),
        vmlinuz_sha256: hex(&Sha256::digest(&bzimage_bytes)),
        vmlinux_sha256: vmlinux_bytes.as_deref().map(|b| hex(&Sha256::digest(b))),
        initrd_sha256: sha256_file(&initrd_path)?,
    };
    let manifest_path = staging.path().join(MANIFEST_FILE);
    let mut json =
        serde_json::to_vec_pretty(&manifest).map_err(|source| GuestImageError::Manifest {
            path: dir.join(MANIFEST_FILE),
            source,
        })?;
    json.push(b'\n');
    write_synced(&manifest_path, &json)?;

    install(staging, &dir, spec.key, spec.force)
}

/// Moves the finished `staging` directory to `dir`. An existing complete image is kept
/// unless `force` (another build of the same inputs won the race); otherwise it is
/// replaced.
fn install(
    staging: tempfile::TempDir,
    dir: &Path,
    key: &str,
    force: bool,
) -> Result<GuestImage, GuestImageError> {
    if dir.exists() {
        if !force {
            if let Some(existing) = load_cached(dir, key) {
                tracing::info!(dir = %dir.display(), "another build finished the same image first");
                return Ok(existing);
            }
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        let old = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(parent)
            .map_err(io_error(parent))?;
        let aside = old.path().join("image");
        fs::rename(dir, &aside).map_err(io_error(dir))?;
        // `old` is removed with its contents when it goes out of scope.
    }
    if let Err(err) = fs::rename(staging.path(), dir) {
        // A concurrent build may have installed the same image in the meantime.
        if !force {
            if let Some(existing) = load_cached(dir, key) {
                return Ok(existing);
            }
        }
        return Err(io_error(dir)(err));
    }
    // The staging path is gone now; nothing left to clean up.
    let _ = staging.keep();
    if let Ok(parent) = File::open(dir.parent().unwrap_or(Path::new("."))) {
        // Best effort: make the rename durable.
        let _ = parent.sync_all();
    }
    load_cached(dir, key).ok_or_else(|| GuestImageError::Io {
        path: dir.join(MANIFEST_FILE),
        source: io::Error::new(io::ErrorKind::NotFound, "image vanished after install"),
    })
}

/// Finds `boot/vmlinuz-<release>` in the unpacked kernel package; the release is the
/// package name without `linux-image-`, or the only vmlinuz present.
fn find_kernel(root: &Path, package: &str) -> Result<(String, PathBuf), GuestImageError> {
    let boot = root.join("boot");
    if let Some(release) = package.strip_prefix("linux-image-") {
        let candidate = boot.join(format!("vmlinuz-{release}"));
        if candidate.is_file() {
            return Ok((release.to_owned(), candidate));
        }
    }
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(&boot) {
        for entry in entries.flatten() {
            if let Some(release) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
            {
                found.push((release.to_owned(), entry.path()));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(GuestImageError::KernelLayout {
            package: package.to_owned(),
            what: "boot/vmlinuz-* file".to_owned(),
        }),
        _ => Err(GuestImageError::KernelLayout {
            package: package.to_owned(),
            what: "single boot/vmlinuz-* file (it has several)".to_owned(),
        }),
    }
}

/// The `kernel` directory of the modules of `release` (under `lib` or `usr/lib`).
fn find_modules_root(root: &Path, release: &str) -> Option<PathBuf> {
    ["lib", "usr/lib"]
        .iter()
        .map(|prefix| {
            root.join(prefix)
                .join("modules")
                .join(release)
                .join("kernel")
        })
        .find(|dir| dir.is_dir())
}

/// The busybox binary in the unpacked busybox package.
fn find_busybox(root: &Path, package: &str) -> Result<PathBuf, GuestImageError> {
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|rel| root.join(rel))
        .find(|path| path.is_file())
        .ok_or_else(|| GuestImageError::Busybox {
            package: package.to_owned(),
            detail: "it contains no bin/busybox".to_owned(),
        })
}

/// Runs `busybox --list-full` on the host and returns the applet paths to link.
fn list_applets(busybox: &Path, package: &str) -> Result<Vec<String>, GuestImageError> {
    let failed = |detail: String| GuestImageError::Busybox {
        package: package.to_owned(),
        detail,
    };
    let output = Command::new(busybox)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| failed(format!("cannot run {}: {err}", busybox.display())))?;
    if !output.status.success() {
        return Err(failed(format!(
            "`busybox --list-full` failed with {}",
            output.status
        )));
    }
    let applets = initramfs::applet_paths(&String::from_utf8_lossy(&output.stdout));
    if applets.is_empty() {
        return Err(failed("`busybox --list-full` listed no applets".to_owned()));
    }
    Ok(applets)
}

/// Checks that `path` is an ELF executable without an interpreter (statically linked).
pub fn check_static_executable(path: &Path) -> Result<(), GuestImageError> {
    if path.as_os_str().is_empty() || !path.is_file() {
        return Err(GuestImageError::AgentMissing {
            path: path.to_owned(),
        });
    }
    let bytes = fs::read(path).map_err(io_error(path))?;
    let not_elf = |source| GuestImageError::AgentNotElf {
        path: path.to_owned(),
        source,
    };
    let elf = elf::Elf::parse(&bytes).map_err(not_elf)?;
    if elf.has_interpreter().map_err(not_elf)? {
        return Err(GuestImageError::AgentNotStatic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Builds the static agent with cargo (`--profile agent`, `+crt-static`) in
/// `workspace_root` and returns the path of the binary under `target_dir`.
pub fn build_agent(workspace_root: &Path, target_dir: &Path) -> Result<PathBuf, GuestImageError> {
    build_agent_with(workspace_root, target_dir, false)
}

/// [`build_agent`], with cargo's progress output suppressed when `quiet` (errors and
/// warnings still reach stderr).
pub fn build_agent_with(
    workspace_root: &Path,
    target_dir: &Path,
    quiet: bool,
) -> Result<PathBuf, GuestImageError> {
    tracing::info!(workspace = %workspace_root.display(), target_dir = %target_dir.display(), "building the agent");
    let mut command = agent_build_command(workspace_root, target_dir);
    if quiet {
        command.arg("--quiet");
    }
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|err| GuestImageError::AgentBuild {
            detail: format!(
                "cannot run {}: {err}",
                Path::new(command.get_program()).display()
            ),
        })?;
    if !status.success() {
        return Err(GuestImageError::AgentBuild {
            detail: format!("cargo exited with {status}"),
        });
    }
    let binary = target_dir
        .join(AGENT_TARGET)
        .join("agent")
        .join("vmfactory-agent");
    if !binary.is_file() {
        return Err(GuestImageError::AgentBuild {
            detail: format!("cargo succeeded but {} does not exist", binary.display()),
        });
    }
    check_static_executable(&binary)?;
    Ok(binary)
}

/// The cargo invocation that builds the static agent.
fn agent_build_command(workspace_root: &Path, target_dir: &Path) -> Command {
    // Under cargo (tests, `cargo run`) use the same cargo; otherwise the one on PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace_root)
        .args([
            "build",
            "--profile",
            "agent",
            "-p",
            "vmfactory-agent",
            "--target",
            AGENT_TARGET,
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        // With an explicit --target these flags reach only the target crates, not build
        // scripts; CARGO_ENCODED_RUSTFLAGS would take precedence, so drop it.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
}

/// Removes staging directories (`.build-*`, `.unpack-*`, `.download-*`, `.old-*`) older
/// than a day that a killed build left in `dir`.
fn sweep_stale_staging(dir: &Path) {
    const PREFIXES: [&str; 4] = [".build-", ".unpack-", ".download-", ".old-"];
    const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > MAX_AGE);
        if stale && entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(path = %entry.path().display(), "removing stale staging directory");
            if let Err(err) = fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %err, "could not remove stale staging directory");
            }
        }
    }
}

/// Writes `data` to `path` and flushes it to disk.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), GuestImageError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(data).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Hex SHA-256 of the file at `path`.
fn sha256_file(path: &Path) -> Result<String, GuestImageError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hex SHA-256 of a downloaded file, remembered in a `<file>.sha256` sidecar together
/// with the file's size and modification time, so a cached build need not re-read it.
fn sha256_file_remembered(path: &Path) -> Result<String, GuestImageError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let mtime_ns = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stamp = format!("{} {mtime_ns}", metadata.len());
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push(".sha256");
    let sidecar = PathBuf::from(sidecar);
    if let Ok(text) = fs::read_to_string(&sidecar) {
        if let Some(digest) = parse_sidecar(&text, &stamp) {
            return Ok(digest);
        }
    }
    let digest = sha256_file(path)?;
    if let Err(err) = fs::write(&sidecar, format!("{stamp} {digest}\n")) {
        tracing::debug!(path = %sidecar.display(), error = %err, "could not remember a digest");
    }
    Ok(digest)
}

/// Returns the digest in a sidecar's `<size> <mtime_ns> <hex>` line if the stamp matches.
fn parse_sidecar(text: &str, stamp: &str) -> Option<String> {
    let (recorded_stamp, digest) = text.trim().rsplit_once(' ')?;
    (recorded_stamp == stamp && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| digest.to_owned())
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::read_entries;
    use crate::elf::tests::{build_elf, note};
    use crate::elf::PT_NOTE;
    use std::os::unix::fs::PermissionsExt;

    fn inputs() -> ImageInputs {
        ImageInputs {
            kernel_deb_sha256: "aa".repeat(32),
            busybox_deb_sha256: "bb".repeat(32),
            agent_sha256: "cc".repeat(32),
            modules: vec!["virtio_pci".into(), "virtio_console".into()],
        }
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = inputs();
        let key = base.key();
        assert_eq!(key.len(), 64);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(key, inputs().key(), "key is deterministic");
        let variants = [
            ImageInputs {
                kernel_deb_sha256: "ab".repeat(32),
                ..base.clone()
            },
            ImageInputs {
                busybox_deb_sha256: "ab".repeat(32),
                ..base.clone()
            },
            ImageInputs {
                agent_sha256: "ab".repeat(32),
                ..base.clone()
            },
            ImageInputs {
                modules: vec!["virtio_pci".into()],
                ..base.clone()
            },
            ImageInputs {
                modules: vec![
                    "virtio_pci".into(),
                    "virtio_console".into(),
                    "virtio_blk".into(),
                ],
                ..base.clone()
            },
        ];
        let mut keys = std::collections::BTreeSet::from([key]);
        for variant in variants {
            assert!(keys.insert(variant.key()), "{variant:?} collides");
        }
    }

    #[test]
    fn hex_and_sha256_match_known_vector() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn remembered_digest_follows_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pkg_1_amd64.deb");
        fs::write(&path, b"abc").expect("write");
        let first = sha256_file_remembered(&path).expect("hash");
        assert_eq!(first, sha256_file(&path).expect("hash"));
        let sidecar = dir.path().join("pkg_1_amd64.deb.sha256");
        assert!(fs::read_to_string(&sidecar)
            .expect("sidecar")
            .ends_with(&format!("{first}\n")));
        // A stale sidecar (different size) is ignored and rewritten.
        fs::write(&path, b"abcd").expect("write");
        let second = sha256_file_remembered(&path).expect("hash");
        assert_eq!(second, sha256_file(&path).expect("hash"));
        assert_ne!(first, second);
        assert_eq!(parse_sidecar("3 5 zz", "3 5"), None);
        assert_eq!(parse_sidecar(&format!("3 5 {first}"), "3 6"), None);
        assert_eq!(parse_sidecar(&format!("3 5 {first}"), "3 5"), Some(first));
    }

    #[test]
    fn agent_is_built_static_with_the_agent_profile() {
        let command = agent_build_command(Path::new("/ws"), Path::new("/ws/target/agent"));
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--profile",
                "agent",
                "-p",
                "vmfactory-agent",
                "--target",
                "x86_64-unknown-linux-gnu"
            ]
        );
        assert_eq!(command.get_current_dir(), Some(Path::new("/ws")));
        let envs: Vec<_> = command.get_envs().collect();
        assert!(envs.contains(&(
            std::ffi::OsStr::new("RUSTFLAGS"),
            Some(std::ffi::OsStr::new("-C target-feature=+crt-static"))
        )));
        assert!(envs.contains(&(
            std::ffi::OsStr::new("CARGO_TARGET_DIR"),
            Some(std::ffi::OsStr::new("/ws/target/agent"))
        )));
        assert!(envs.contains(&(std::ffi::OsStr::new("CARGO_ENCODED_RUSTFLAGS"), None)));
    }

    #[test]
    fn sweeps_only_old_staging_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = dir.path().join(".build-fresh");
        let old = dir.path().join(".unpack-old");
        let image = dir.path().join("0123abcd");
        for path in [&fresh, &old, &image] {
            fs::create_dir(path).expect("mkdir");
        }
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        for path in [&old, &image] {
            File::open(path)
                .and_then(|f| f.set_modified(two_days_ago))
                .expect("set mtime");
        }
        sweep_stale_staging(dir.path());
        assert!(fresh.exists());
        assert!(!old.exists());
        assert!(image.exists());
    }

    #[test]
    fn default_options_use_the_virtio_modules() {
        let opts = BuildOptions::default();
        assert_eq!(opts.modules, ["virtio_pci", "virtio_console"]);
        assert_eq!(opts.kernel_package, None);
        assert!(!opts.force);
        assert!(opts.agent_binary.as_os_str().is_empty());
    }

    #[test]
    fn agent_must_be_a_static_elf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let static_bin = dir.path().join("static");
        fs::write(&static_bin, build_elf(&[], &[])).expect("write");
        check_static_executable(&static_bin).expect("static is fine");
        let dynamic = dir.path().join("dynamic");
        fs::write(
            &dynamic,
            build_elf(&[(elf::PT_INTERP, b"/lib64/ld.so\0")], &[]),
        )
        .expect("write");
        assert!(matches!(
            check_static_executable(&dynamic),
            Err(GuestImageError::AgentNotStatic { .. })
        ));
        let script = dir.path().join("script");
        fs::write(&script, b"#!/bin/sh\n").expect("write");
        assert!(matches!(
            check_static_executable(&script),
            Err(GuestImageError::AgentNotElf { .. })
        ));
        assert!(matches!(
            check_static_executable(Path::new("")),
            Err(GuestImageError::AgentMissing { .. })
        ));
    }

    /// Lays out a fake unpacked kernel and busybox package under `root`.
    fn fake_packages(root: &Path, release: &str, with_pvh: bool) {
        let kernel = root.join("kernel");
        let boot = kernel.join("boot");
        fs::create_dir_all(&boot).expect("mkdir");
        let notes = if with_pvh {
            note("Xen", vmlinux::XEN_ELFNOTE_PHYS32_ENTRY, &[0, 0, 0, 1])
        } else {
            note("GNU", 3, b"id")
        };
        let vmlinux = build_elf(&[(PT_NOTE, &notes)], &[(".text", &[0x90; 3000])]);
        let mut payload = 0x184C_2102u32.to_le_bytes().to_vec();
        let block = lz4_flex::block::compress(&vmlinux);
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        let mut bzimage = b"bzImage stub ".to_vec();
        bzimage.extend_from_slice(&payload);
        fs::write(boot.join(format!("vmlinuz-{release}")), bzimage).expect("write");

        let mods = kernel.join(format!("lib/modules/{release}/kernel/drivers/virtio"));
        fs::create_dir_all(&mods).expect("mkdir");
        for (name, modinfo) in [
            ("virtio_ring", &b"depends=\0name=virtio_ring\0"[..]),
            ("virtio", b"depends=virtio_ring\0name=virtio\0"),
            (
                "virtio_console",
                b"depends=virtio,virtio_ring\0name=virtio_console\0",
            ),
        ] {
            fs::write(
                mods.join(format!("{name}.ko")),
                build_elf(&[], &[(".modinfo", modinfo)]),
            )
            .expect("write");
        }

        let bin = root.join("busybox/bin");
        fs::create_dir_all(&bin).expect("mkdir");
        let busybox = bin.join("busybox");
        fs::write(
            &busybox,
            "#!/bin/sh\nprintf 'bin/busybox\\nbin/sh\\nsbin/init\\nlinuxrc\\nusr/bin/env\\n'\n",
        )
        .expect("write");
        fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn assembles_installs_and_reuses_an_image_offline() {
        let cache = tempfile::tempdir().expect("tempdir");
        let images = cache.path().join("images");
        fs::create_dir_all(&images).expect("mkdir");
        let release = "6.1.0-99-cloud-amd64";
        fake_packages(cache.path(), release, true);
        let agent = cache.path().join("agent");
        fs::write(&agent, build_elf(&[], &[])).expect("write");
        let kernel = PackageVersion {
            name: format!("linux-image-{release}"),
            version: "6.1.999-1".into(),
        };
        let busybox = PackageVersion {
            name: BUSYBOX_PACKAGE.into(),
            version: "1:1.35.0-4".into(),
        };
        let inputs = ImageInputs {
            modules: vec!["virtio_console".into()],
            ..inputs()
        };
        let key = inputs.key();
        let assembly = Assembly {
            images_dir: &images,
            key: &key,
            kernel_root: &cache.path().join("kernel"),
            busybox_root: &cache.path().join("busybox"),
            agent: &agent,
            kernel: &kernel,
            busybox: &busybox,
            inputs: &inputs,
            force: false,
        };
        let mut messages = Vec::new();
        let image =
            assemble(&assembly, &mut |m: &str| messages.push(m.to_owned())).expect("assemble");
        assert!(messages.iter().any(|m| m.starts_with("Writing initramfs")));
        assert_eq!(image.dir, images.join(&key));
        assert_eq!(image.kernel_release, release);
        assert_eq!(image.kernel_version, "6.1.999-1");
        assert_eq!(
            image.vmlinux.as_deref(),
            Some(image.dir.join("vmlinux").as_path())
        );
        assert_eq!(image.kernel, image.dir.join("vmlinux"));
        assert!(fs::read(image.dir.join("vmlinux"))
            .expect("vmlinux")
            .starts_with(b"\x7fELF"));

        let entries = read_entries(&fs::read(&image.initrd).expect("initrd")).expect("parse");
        let find = |name: &str| entries.iter().find(|e| e.name == name);
        assert_eq!(
            find("lib/modules/load-order").expect("load-order").data,
            b"virtio_ring.ko\nvirtio.ko\nvirtio_console.ko\n"
        );
        assert!(find("init").is_some());
        assert!(find("usr/bin/env").is_some());
        assert!(find("sbin/init").is_none());

        let manifest = read_manifest(&image.dir).expect("manifest");
        assert_eq!(manifest.image, image);
        assert_eq!(manifest.inputs, inputs);
        assert_eq!(
            manifest.module_load_order,
            ["virtio_ring.ko", "virtio.ko", "virtio_console.ko"]
        );
        assert!(manifest.vmlinux_sha256.is_some());
        assert_eq!(
            manifest.initrd_sha256,
            sha256_file(&image.initrd).expect("hash")
        );

        // No staging directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(&images)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        assert_eq!(load_cached(&image.dir, &key), Some(image.clone()));
        assert_eq!(load_cached(&image.dir, "other"), None);

        // A forced rebuild replaces the image in place.
        let forced = assemble(
            &Assembly {
                force: true,
                ..assembly
            },
            &mut |_: &str| {},
        )
        .expect("forced");
        assert_eq!(forced, image);
        assert_eq!(fs::read_dir(&images).expect("list").count(), 1);
    }

    #[test]
    fn falls_back_to_the_bzimage_without_pvh_note() {
        let cache = tempfile::tempdir().expect("tempdir");
        let images = cache.path().join("images");
        fs::create_dir_all(&images).expect("mkdir");
        let release = "6.1.0-98-cloud-amd64";
        fake_packages(cache.path(), release, false);
        let agent = cache.path().join("agent");
        fs::write(&agent, build_elf(&[], &[])).expect("write");
        let kernel = PackageVersion {
            name: format!("linux-image-{release}"),
            version: "1".into(),
        };
        let busybox = PackageVersion {
            name: BUSYBOX_PACKAGE.into(),
            version: "1".into(),
        };
        let inputs = inputs();
        let image = assemble(
            &Assembly {
                images_dir: &images,
                key: "k",
                kernel_root: &cache.path().join("kernel"),
                busybox_root: &cache.path().join("busybox"),
                agent: &agent,
                kernel: &kernel,
                busybox: &busybox,
                inputs: &ImageInputs {
                    modules: vec!["virtio-pci".into()],
                    ..inputs
                },
                force: false,
            },
            &mut |_: &str| {},
        );
        // virtio_pci is not in the fake package: the error names it.
        let err = image.expect_err("missing module");
        assert!(
            err.to_string().contains("virtio-pci") || err.to_string().contains("virtio_pci"),
            "{err}"
        );

        let image = assemble(
            &Assembly {
                images_dir: &images,
                key: "k",
                kernel_root: &cache.path().join("kernel"),
                busybox_root: &cache.path().join("busybox"),
                agent: &agent,
                kernel: &kernel,
                busybox: &busybox,
                inputs: &ImageInputs {
                    modules: vec!["virtio".into()],
                    ..self::inputs()
                },
                force: false,
            },
            &mut |_: &str| {},
        )
        .expect("assemble");
        assert_eq!(image.vmlinux, None);
        assert_eq!(image.kernel, image.bzimage);
        assert!(!image.dir.join("vmlinux").exists());
    }

    #[test]
    fn default_cache_dir_is_absolute_or_env() {
        // Only checks the shape: the environment is shared with other tests.
        let dir = default_cache_dir();
        assert!(dir.ends_with("vmfactory") || std::env::var_os("VMFACTORY_CACHE_DIR").is_some());
    }
}
