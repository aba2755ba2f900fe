//! The image cache: one directory per image under `images/<key>/`, its manifest, and
//! installing a finished image into place.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::sha256_file;
use crate::error::{io_error, GuestImageError};
use crate::kernel::KernelSource;
use crate::FORMAT_VERSION;

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
    /// Which kernel this is: vmfactory's own or Debian's cloud kernel.
    #[serde(default = "KernelSource::legacy")]
    pub kernel_source: KernelSource,
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
    /// Key of vmfactory's kernel build (source, config fragment, compiler); `None` for
    /// Debian's kernel, whose `.deb` digest says it all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_build: Option<String>,
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
        // Only vmfactory's kernel adds this, so Debian images keep their keys.
        if let Some(build) = &self.kernel_build {
            hasher.update(format!("kernel-build={build}\0").as_bytes());
        }
        format!("{:x}", hasher.finalize())
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

/// Returns the image in `dir` if its manifest is present, current and its files exist.
pub(crate) fn load_cached(dir: &Path, key: &str) -> Option<GuestImage> {
    load_cached_manifest(dir, key).map(|manifest| manifest.image)
}

/// [`load_cached`] with the whole manifest, its image's paths rebased on `dir`.
pub(crate) fn load_cached_manifest(dir: &Path, key: &str) -> Option<Manifest> {
    if !dir.join(MANIFEST_FILE).is_file() {
        return None;
    }
    let mut manifest = match read_manifest(dir) {
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
    manifest.image = rebased(manifest.image, dir);
    let image = &manifest.image;
    let files_present = image.bzimage.is_file()
        && image.initrd.is_file()
        && image.vmlinux.as_ref().map_or(true, |v| v.is_file());
    if !files_present {
        tracing::warn!(dir = %dir.display(), "cached image is missing files; rebuilding");
        return None;
    }
    Some(manifest)
}

/// True when the kernel and initramfs files of `manifest`'s image have the digests the
/// manifest recorded (reads every file: only for images whose stamps changed).
pub(crate) fn digests_match(manifest: &Manifest) -> bool {
    let image = &manifest.image;
    let matches =
        |path: &Path, expected: &str| sha256_file(path).is_ok_and(|digest| digest == expected);
    let vmlinux_ok = match (&image.vmlinux, &manifest.vmlinux_sha256) {
        (Some(path), Some(expected)) => matches(path, expected),
        (None, _) => true,
        (Some(_), None) => false,
    };
    vmlinux_ok
        && matches(&image.bzimage, &manifest.vmlinuz_sha256)
        && matches(&image.initrd, &manifest.initrd_sha256)
}

/// Points every path of `image` into `dir`.
pub(crate) fn rebased(image: GuestImage, dir: &Path) -> GuestImage {
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

/// Moves the finished `staging` directory to `dir`. An existing complete image is kept
/// unless `force` (another build of the same inputs won the race); otherwise it is
/// replaced.
pub(crate) fn install(
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

/// Removes staging directories (`.build-*`, `.unpack-*`, `.download-*`, `.old-*`) and
/// temporary `.current-*` files older than a day that a killed build left in `dir`.
pub(crate) fn sweep_stale_staging(dir: &Path) {
    const PREFIXES: [&str; 5] = [".build-", ".unpack-", ".download-", ".old-", ".current-"];
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
        } else if stale && name.starts_with(".current-") {
            // A temporary current.json of a killed writer.
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Inputs with fixed fake digests.
    pub(crate) fn inputs() -> ImageInputs {
        ImageInputs {
            kernel_deb_sha256: "aa".repeat(32),
            busybox_deb_sha256: "bb".repeat(32),
            agent_sha256: "cc".repeat(32),
            modules: vec!["virtio_pci".into(), "virtio_console".into()],
            kernel_build: None,
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
                kernel_build: Some("dd".repeat(32)),
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
    fn default_cache_dir_is_absolute_or_env() {
        // Only checks the shape: the environment is shared with other tests.
        let dir = default_cache_dir();
        assert!(dir.ends_with("vmfactory") || std::env::var_os("VMFACTORY_CACHE_DIR").is_some());
    }
}
