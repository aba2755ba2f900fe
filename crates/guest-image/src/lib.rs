//! Builds the guest image of vmfactory's micro-VMs: a kernel (by default vmfactory's own,
//! compiled from Debian's kernel source with `kernel/vmfactory.config`, every driver built
//! in; or Debian's cloud kernel with its virtio modules), as a bzImage and an uncompressed
//! PVH-bootable `vmlinux`, plus an uncompressed newc initramfs holding the agent as
//! `/init`, the modules it loads (Debian's kernel only), and a static busybox. Images live in a cache directory under a key derived from every
//! input, so a build only does work when an input changed. [`build`] asks apt for the
//! newest packages and records its result in the cache's `current.json`, with stamps of
//! the image's files; [`current`] finds that image again without running anything, and
//! [`check`] tells whether apt has newer packages. See `docs/guest-image.md`.

pub mod cpio;
pub mod initramfs;

mod agent;
mod apt;
mod assemble;
mod current;
mod digest;
mod elf;
mod error;
mod image;
mod kernel;
mod modules;
mod prune;
mod qemu;
mod vmlinux;

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use agent::{
    build_agent, build_agent_with, check_static_executable, embedded_agent_path,
    install_embedded_agent,
};
pub use apt::PackageVersion;
pub use current::{current, FileStamp, CURRENT_FILE};
pub use elf::ElfError;
pub use error::GuestImageError;
pub use image::{
    default_cache_dir, read_manifest, GuestImage, ImageInputs, Manifest, MANIFEST_FILE,
};
pub use kernel::{
    kernel_key, missing_options, requested_options, BuiltKernel, KernelSource,
    KERNEL_BUILD_PACKAGES, KERNEL_CONFIG_FRAGMENT, KERNEL_PATCHES,
};
pub use modules::ModuleError;
pub use prune::{prune_cache, Pruned, PRUNE_IDLE};
pub use qemu::{
    current_qemu, ensure_qemu, qemu_recipe_digest, BuiltQemu, QemuBuild, QemuSource,
    DEBIAN_QEMU_BINARY, QEMU_BUILD_PACKAGES, QEMU_DEVICES, TRAINING_CPU,
};
pub use vmlinux::VmlinuxError;

use assemble::{assemble, Assembly};
use digest::{sha256_file, sha256_file_remembered};
use error::io_error;
use image::sweep_stale_staging;
use image::{digests_match, load_cached_manifest};

/// Version of the image layout; bump it whenever the output for the same inputs changes.
/// 2: `vmlinux` without its section headers and symbol table
/// (`vmlinux::without_sections`).
pub const FORMAT_VERSION: u32 = 2;
/// Meta package resolved to the kernel package when none is given.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Root modules included when none are given (their dependencies are added): the agent's
/// channel, and for containers hot-plugged disks (`virtio_blk`), EROFS images and the
/// overlay root. In Debian's cloud kernel ext4 and PCIe hot-plug (`pciehp`) are built in.
pub const DEFAULT_MODULES: [&str; 5] = [
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "erofs",
    "overlay",
];
/// Debian package providing the static busybox userland.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Rust target the agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Options for building the guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Root of the cache (see [`default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// Statically linked agent executable; becomes `/init`.
    pub agent_binary: PathBuf,
    /// Hex SHA-256 of `agent_binary` when the caller knows it (an agent embedded at
    /// compile time); `None`: [`build`] hashes the file and [`current`] recognises it by
    /// its stamp.
    pub agent_sha256: Option<String>,
    /// Which kernel to boot: vmfactory's (built from source, the default) or Debian's.
    pub kernel: KernelSource,
    /// Meta package to resolve; `None` means [`DEFAULT_KERNEL_PACKAGE`]. For
    /// vmfactory's kernel it names the version whose source is built.
    pub kernel_package: Option<String>,
    /// Root modules to include with Debian's kernel; their dependency closure is added.
    /// vmfactory's kernel has every driver built in and takes none.
    pub modules: Vec<String>,
    /// Rebuild even if a cached image exists.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            agent_binary: PathBuf::new(),
            agent_sha256: None,
            kernel: KernelSource::default(),
            kernel_package: None,
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            force: false,
        }
    }
}

impl BuildOptions {
    /// The root modules of the image, canonicalised: none for vmfactory's kernel.
    pub fn root_modules(&self) -> Vec<String> {
        match self.kernel {
            KernelSource::Vmfactory => Vec::new(),
            KernelSource::Debian => self
                .modules
                .iter()
                .map(|m| modules::canonical_name(m))
                .collect(),
        }
    }
}

/// Hex SHA-256 of the file at `path` (reads all of it).
pub fn file_sha256(path: &Path) -> Result<String, GuestImageError> {
    sha256_file(path)
}

/// The kernel and busybox versions apt offers now for `opts`.
fn resolve_packages(
    opts: &BuildOptions,
) -> Result<(PackageVersion, PackageVersion), GuestImageError> {
    apt::check_tools()?;
    let meta = opts
        .kernel_package
        .as_deref()
        .unwrap_or(DEFAULT_KERNEL_PACKAGE);
    tracing::info!(
        package = meta,
        "resolving the kernel package with apt-cache"
    );
    make_cache_dir(&opts.cache_dir)?;
    let apt_dir = opts.cache_dir.join("apt");
    fs::create_dir_all(&apt_dir).map_err(io_error(&apt_dir))?;
    let apt_cache = apt::AptCache::with_private_cache(&apt_dir);
    let kernel_name = apt::resolve_kernel_package(&apt_cache, meta)?;
    let kernel = apt::candidate_version(&apt_cache, &kernel_name)?;
    let busybox = apt::candidate_version(&apt_cache, BUSYBOX_PACKAGE)?;
    let kernel = match opts.kernel {
        KernelSource::Debian => kernel,
        KernelSource::Vmfactory => source_package(&apt_cache, &kernel)?,
    };
    tracing::info!(
        kernel = %kernel.name,
        kernel_version = %kernel.version,
        busybox_version = %busybox.version,
        "resolved guest packages"
    );
    Ok((kernel, busybox))
}

/// Debian's kernel source package of the same version as the binary `kernel` package
/// (`linux-source-6.1` for `6.1.192-2`).
fn source_package(
    apt_cache: &apt::AptCache,
    kernel: &PackageVersion,
) -> Result<PackageVersion, GuestImageError> {
    let series: Vec<&str> = kernel.version.split(['.', '-']).take(2).collect();
    let name = format!("linux-source-{}", series.join("."));
    let source = apt::candidate_version(apt_cache, &name)?;
    if source.version != kernel.version {
        tracing::warn!(
            source = %source.version,
            kernel = %kernel.version,
            "apt offers another version of the kernel source than of the cloud kernel; building the source's"
        );
    }
    Ok(source)
}

/// Builds the guest image (or returns the cached one) as `opts` describes, reporting
/// each long step to `progress`. Always asks apt for the newest kernel and busybox, and
/// records the result as the [`current`] image for `opts`.
pub fn build(
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, GuestImageError> {
    check_static_executable(&opts.agent_binary)?;
    let (kernel, busybox) = resolve_packages(opts)?;

    make_cache_dir(&opts.cache_dir)?;
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
    let kernel_deb_sha256 = sha256_file_remembered(&kernel_deb)?;

    let built_kernel = match opts.kernel {
        KernelSource::Debian => None,
        KernelSource::Vmfactory => Some(kernel::ensure_kernel(
            &kernel::KernelBuild {
                cache_dir: &opts.cache_dir,
                source_deb: &kernel_deb,
                source_deb_sha256: &kernel_deb_sha256,
                source_package: &kernel.name,
                source_version: &kernel.version,
                force: opts.force,
            },
            progress,
        )?),
    };

    let agent_sha256 = match &opts.agent_sha256 {
        Some(digest) => digest.clone(),
        None => sha256_file(&opts.agent_binary)?,
    };
    let inputs = ImageInputs {
        kernel_deb_sha256,
        busybox_deb_sha256: sha256_file_remembered(&busybox_deb)?,
        agent_sha256: agent_sha256.clone(),
        modules: opts.root_modules(),
        kernel_build: built_kernel.as_ref().map(|built| built.key.clone()),
    };
    let key = inputs.key();
    let dir = images.join(&key);
    if !opts.force {
        if let Some(manifest) = load_cached_manifest(&dir, &key) {
            // Files whose stamps changed since they were recorded are checked against
            // the manifest's digests before the image is trusted again.
            if current::is_recorded_unchanged(&opts.cache_dir, &key) || digests_match(&manifest) {
                tracing::info!(key = %key, dir = %dir.display(), "guest image is cached");
                current::record_current(opts, &agent_sha256, &manifest, &dir)?;
                return Ok(manifest.image);
            }
            tracing::warn!(dir = %dir.display(), "cached guest image files do not match their digests; rebuilding");
        }
    }

    let unpacked = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&opts.cache_dir)
        .map_err(io_error(&opts.cache_dir))?;
    let kernel_root = unpacked.path().join("kernel");
    let busybox_root = unpacked.path().join("busybox");
    if built_kernel.is_none() {
        progress(&format!("Unpacking {} {}", kernel.name, kernel.version));
        apt::unpack(&kernel_deb, &kernel_root)?;
    }
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
            built_kernel: built_kernel.as_ref(),
        },
        progress,
    )?;
    tracing::info!(key = %key, dir = %image.dir.display(), vmlinux = image.vmlinux.is_some(), "built guest image");
    let manifest = read_manifest(&image.dir)?;
    current::record_current(opts, &agent_sha256, &manifest, &image.dir)?;
    Ok(image)
}

/// Whether a build would change the current image, as [`check`] found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStatus {
    /// The current image has the kernel and busybox apt offers.
    UpToDate,
    /// Apt offers another kernel or busybox than the current image has.
    UpdateAvailable,
    /// No image is current for these options (never built, or changed on disk).
    NoImage,
}

/// What [`check`] found: the current image's packages and apt's candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateCheck {
    /// The verdict.
    pub status: UpdateStatus,
    /// The current image, if any.
    pub current: Option<GuestImage>,
    /// Busybox version of the current image, if any.
    pub current_busybox_version: Option<String>,
    /// The kernel package apt would build with now.
    pub candidate_kernel: PackageVersion,
    /// The busybox package apt would build with now.
    pub candidate_busybox: PackageVersion,
}

/// Compares the current image's packages with apt's candidates.
fn update_status(
    current: Option<&Manifest>,
    kernel: &PackageVersion,
    busybox: &PackageVersion,
) -> UpdateStatus {
    match current {
        None => UpdateStatus::NoImage,
        Some(manifest)
            if manifest.image.kernel_package == kernel.name
                && manifest.image.kernel_version == kernel.version
                && manifest.busybox_version == busybox.version =>
        {
            UpdateStatus::UpToDate
        }
        Some(_) => UpdateStatus::UpdateAvailable,
    }
}

/// Makes the cache directory (and its missing parents) 0755 whatever the umask: under a
/// umask of 002 it would be group-writable, and QEMU's library stand-ins are used only
/// from a cache nobody else may write to.
pub(crate) fn make_cache_dir(dir: &Path) -> Result<(), GuestImageError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_error(dir))
}

/// Asks apt which kernel and busybox a build would use now and compares them with the
/// [`current`] image for `opts`. Downloads and builds nothing.
pub fn check(opts: &BuildOptions) -> Result<UpdateCheck, GuestImageError> {
    let (kernel, busybox) = resolve_packages(opts)?;
    let current = current::current_manifest(opts);
    let status = update_status(current.as_ref().map(|(m, _)| m), &kernel, &busybox);
    let (current, current_busybox_version) = match current {
        Some((manifest, dir)) => (
            Some(image::rebased(manifest.image, &dir)),
            Some(manifest.busybox_version),
        ),
        None => (None, None),
    };
    Ok(UpdateCheck {
        status,
        current,
        current_busybox_version,
        candidate_kernel: kernel,
        candidate_busybox: busybox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_use_the_virtio_modules() {
        let opts = BuildOptions::default();
        assert_eq!(opts.modules, DEFAULT_MODULES);
        assert_eq!(opts.kernel_package, None);
        assert!(!opts.force);
        assert!(opts.agent_binary.as_os_str().is_empty());
        assert_eq!(opts.agent_sha256, None);
    }

    #[test]
    fn a_different_candidate_kernel_or_busybox_is_an_update() {
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": FORMAT_VERSION,
            "dir": "/c/images/k", "kernel": "/c/images/k/vmlinuz",
            "bzimage": "/c/images/k/vmlinuz", "vmlinux": null,
            "initrd": "/c/images/k/initrd.img",
            "kernel_release": "6.1.0-56-cloud-amd64",
            "kernel_package": "linux-image-6.1.0-56-cloud-amd64",
            "kernel_version": "6.1.192-2", "key": "k",
            "busybox_package": "busybox-static", "busybox_version": "1:1.35.0-4",
            "inputs": {"kernel_deb_sha256": "", "busybox_deb_sha256": "",
                       "agent_sha256": "", "modules": []},
            "module_load_order": [], "vmlinuz_sha256": "", "vmlinux_sha256": null,
            "initrd_sha256": ""
        }))
        .expect("manifest");
        let package = |name: &str, version: &str| PackageVersion {
            name: name.into(),
            version: version.into(),
        };
        let kernel = package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2");
        let busybox = package(BUSYBOX_PACKAGE, "1:1.35.0-4");
        assert_eq!(
            update_status(Some(&manifest), &kernel, &busybox),
            UpdateStatus::UpToDate
        );
        assert_eq!(
            update_status(None, &kernel, &busybox),
            UpdateStatus::NoImage
        );
        let newer_abi = package("linux-image-6.1.0-57-cloud-amd64", "6.1.193-1");
        assert_eq!(
            update_status(Some(&manifest), &newer_abi, &busybox),
            UpdateStatus::UpdateAvailable
        );
        let rebuilt = package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-3");
        assert_eq!(
            update_status(Some(&manifest), &rebuilt, &busybox),
            UpdateStatus::UpdateAvailable
        );
        let newer_busybox = package(BUSYBOX_PACKAGE, "1:1.36.1-1");
        assert_eq!(
            update_status(Some(&manifest), &kernel, &newer_busybox),
            UpdateStatus::UpdateAvailable
        );
    }
}
