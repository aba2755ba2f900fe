//! Container images for vmfactory guests, host side: an image reference (a root
//! filesystem directory, an OCI image layout directory or tar, a `docker save` archive)
//! becomes a read-only filesystem image file (EROFS by default, or ext4) plus the image's
//! config, cached under `<cache_dir>/rootfs/<sha256 hex>/` by content digest.
//!
//! See `docs/architecture.md` ("`image`") for the cache layout, the flattening rules and
//! why EROFS is the default.

mod flatten;
mod mkfs;
mod source;
mod space;
mod store;
mod targuard;
mod tempdirs;

#[cfg(any(test, feature = "testing"))]
pub mod fixtures;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use flatten::{Flattener, LayerStats};
pub use store::{ImageEntry, ImageStore, PreparedImage};

/// `PATH` of an image whose config sets none (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The filesystem of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// EROFS, built with `mkfs.erofs` (package `erofs-utils`), uncompressed. The default:
    /// built fastest, and the guest reads it without decompressing (under TCG every CPU
    /// cycle of the guest is expensive).
    #[default]
    Erofs,
    /// ext4 without journal, built with `mkfs.ext4 -d` (package `e2fsprogs`).
    Ext4,
}

impl FsType {
    /// `erofs` or `ext4`: the name `mount -t` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }

    /// Name of the disk file in a cache entry.
    pub fn file_name(self) -> &'static str {
        match self {
            FsType::Erofs => "disk.erofs",
            FsType::Ext4 => "disk.ext4",
        }
    }

    /// Both, default first.
    pub const ALL: [FsType; 2] = [FsType::Erofs, FsType::Ext4];
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FsType {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s {
            "erofs" => Ok(FsType::Erofs),
            "ext4" => Ok(FsType::Ext4),
            _ => Err(ImageError::BadReference(format!(
                "unknown filesystem {s:?}: use erofs or ext4"
            ))),
        }
    }
}

/// What a container of the image runs with (the `config` of an OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE`; has a `PATH` (the default one when the image sets none).
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// The config of a plain root filesystem: only the default `PATH`.
    pub fn rootfs_default() -> Self {
        Self::default().with_default_path()
    }

    fn with_default_path(mut self) -> Self {
        if !self.env.iter().any(|e| e.starts_with("PATH=")) {
            self.env.insert(0, DEFAULT_PATH.to_string());
        }
        self
    }

    /// The command line to run, by Docker's rules: the entrypoint followed by the user's
    /// arguments when there are some, else by the image's `Cmd`.
    pub fn command(&self, user_args: &[String]) -> Vec<String> {
        let tail = if user_args.is_empty() {
            &self.cmd
        } else {
            user_args
        };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

/// Errors of image handling.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    BadReference(String),
    #[error("Invalid image: {0}")]
    BadImage(String),
    #[error("Invalid image layer: {0}")]
    BadLayer(String),
    #[error("Refusing path {0:?} in an image: it leaves the root filesystem")]
    PathEscape(String),
    #[error("Digest mismatch: expected {expected}, got {actual}; the image is corrupt or was modified, fetch it again")]
    DigestMismatch { expected: String, actual: String },
    #[error("{0}")]
    NoSuchImage(String),
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    MissingTool { tool: String, package: String },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("No cached image matches {0:?}; see `vmfactory image ls`")]
    NotCached(String),
    #[error("{0:?} matches several cached images ({1}); give more of the digest")]
    Ambiguous(String, String),
    #[error(
        "Not enough free space in {} to {what}: it needs about {} MiB, {} MiB are available, and vmfactory leaves {} MiB free (5% of the filesystem, at most 1 GiB); remove cached images (`vmfactory image rm`) or free space there",
        .dir.display(),
        mib(*.needed),
        mib(*.available),
        mib(*.reserve)
    )]
    NoSpace {
        dir: PathBuf,
        what: String,
        needed: u64,
        available: u64,
        reserve: u64,
    },
    #[error(
        "Not enough free inodes in {} to write the image's files: {free} are free, and vmfactory leaves {reserve} (5% of the filesystem's); remove cached images (`vmfactory image rm`) or free some there",
        .dir.display()
    )]
    NoInodes {
        dir: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[error("Cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Bytes in MiB, rounded up.
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Where an image came from, as parsed from a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    pub path: PathBuf,
    pub tag: Option<String>,
}

impl Reference {
    /// `PATH` or `PATH:TAG` (the tag selects a manifest of a layout with several). A path
    /// that exists as given wins over a split at its last `:`.
    pub fn parse(reference: &str) -> Result<Self, ImageError> {
        if reference.is_empty() {
            return Err(ImageError::BadReference("Empty image reference".into()));
        }
        let whole = PathBuf::from(reference);
        if whole.exists() {
            return Ok(Self {
                path: whole,
                tag: None,
            });
        }
        if let Some((path, tag)) = reference.rsplit_once(':') {
            if !tag.is_empty() && !tag.contains('/') && PathBuf::from(path).exists() {
                return Ok(Self {
                    path: PathBuf::from(path),
                    tag: Some(tag.to_string()),
                });
            }
        }
        Err(ImageError::BadReference(format!(
            "Image {reference:?} not found: give a root filesystem directory, an OCI image \
             layout (directory or tar, optionally PATH:TAG) or a `docker save` archive \
             (registry references are not supported)"
        )))
    }
}

#[cfg(test)]
mod tests;
