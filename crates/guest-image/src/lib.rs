//! Builds the guest image of vmfactory's micro-VMs: Debian's cloud kernel (as a bzImage
//! and, when it can be extracted, an uncompressed PVH-bootable `vmlinux`) plus an
//! uncompressed newc initramfs holding the agent as `/init`, the virtio modules it loads,
//! and a static busybox. Images live in a cache directory under a key derived from every
//! input, so a build only does work when an input changed.

pub mod cpio;
pub mod initramfs;

mod agent;
mod apt;
mod assemble;
mod digest;
mod elf;
mod error;
mod image;
mod modules;
mod vmlinux;

use std::fs;
use std::path::PathBuf;

pub use agent::{build_agent, build_agent_with, check_static_executable};
pub use elf::ElfError;
pub use error::GuestImageError;
pub use image::{
    default_cache_dir, read_manifest, GuestImage, ImageInputs, Manifest, MANIFEST_FILE,
};
pub use modules::ModuleError;
pub use vmlinux::VmlinuxError;

use assemble::{assemble, Assembly};
use digest::{sha256_file, sha256_file_remembered};
use error::io_error;
use image::{load_cached, sweep_stale_staging};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_use_the_virtio_modules() {
        let opts = BuildOptions::default();
        assert_eq!(opts.modules, ["virtio_pci", "virtio_console"]);
        assert_eq!(opts.kernel_package, None);
        assert!(!opts.force);
        assert!(opts.agent_binary.as_os_str().is_empty());
    }
}
