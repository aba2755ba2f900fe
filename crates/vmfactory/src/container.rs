//! What `run --image` and `sandbox create --image` share: turning an image reference into
//! a cached read-only disk (with progress), and an image's config plus the user's options
//! into the process to run in the container.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use vmfactory_factory::{ContainerSpec, ImageFs};
use vmfactory_image::{FsType, ImageConfig, ImageStore, PreparedImage};

use crate::progress::Progress;

/// Largest writable layer `--disk-size` accepts (64 GiB; it is a tmpfs in guest memory,
/// which only what is written occupies).
const MAX_DISK_SIZE_MIB: u32 = 64 << 10;

/// Parses `--disk-size`: MiB as a number, or with a suffix `M`/`MiB`, `G`/`GiB`.
pub fn parse_disk_size(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let (number, factor) = if let Some(n) = lower
        .strip_suffix("gib")
        .or_else(|| lower.strip_suffix("gb"))
        .or_else(|| lower.strip_suffix('g'))
    {
        (n, 1024)
    } else if let Some(n) = lower
        .strip_suffix("mib")
        .or_else(|| lower.strip_suffix("mb"))
        .or_else(|| lower.strip_suffix('m'))
    {
        (n, 1)
    } else {
        (lower.as_str(), 1)
    };
    let value: u32 = number
        .trim()
        .parse()
        .map_err(|_| format!("{trimmed:?} is not a size: write MiB (512), or 512M or 2G"))?;
    let mib = value
        .checked_mul(factor)
        .filter(|mib| (1..=MAX_DISK_SIZE_MIB).contains(mib))
        .ok_or_else(|| format!("{trimmed:?}: the writable layer must be 1 MiB to 64 GiB"))?;
    Ok(mib)
}

/// The image store under the cache directory (`--cache-dir`, `$VMFACTORY_CACHE_DIR`, else
/// `~/.cache/vmfactory`).
pub fn store(cache_dir: Option<&Path>) -> ImageStore {
    let root = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(vmfactory_guest_image::default_cache_dir);
    ImageStore::new(&root)
}

/// Finds or builds the disk of image `reference`, showing progress when it has to build.
/// Blocking: call it from `spawn_blocking`.
pub fn prepare(cache_dir: Option<PathBuf>, reference: &str) -> Result<PreparedImage> {
    let store = store(cache_dir.as_deref());
    let mut shown: Option<Progress> = None;
    let prepared = store.prepare(reference, &mut |step: &str| match &mut shown {
        Some(progress) => progress.set_message(step),
        None => shown = Some(Progress::spinner(step)),
    });
    match (prepared, shown) {
        (Ok(image), Some(progress)) => {
            progress.finish(&format!(
                "Image {reference} ready ({}, {})",
                image.fs_type.as_str(),
                short_digest(&image.digest)
            ));
            Ok(image)
        }
        (Ok(image), None) => Ok(image),
        (Err(err), shown) => {
            if let Some(progress) = shown {
                progress.abandon();
            }
            Err(err).with_context(|| format!("Cannot prepare image {reference:?}"))
        }
    }
}

/// The first 12 hex digits of a digest (without its `sha256:` prefix).
pub fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// The factory's name for an image's file system.
pub fn image_fs(fs: FsType) -> ImageFs {
    match fs {
        FsType::Erofs => ImageFs::Erofs,
        FsType::Ext4 => ImageFs::Ext4,
    }
}

/// A container with a pause init on `image`, named `id`, whose processes come by exec.
/// The init starts in the image's working directory, which the agent makes when the
/// image lacks it, as Docker does (owned by root, mode 0755).
pub fn pause_container(id: &str, image: &PreparedImage, upper_size_mib: u32) -> ContainerSpec {
    ContainerSpec {
        id: id.to_string(),
        fs: image_fs(image.fs_type),
        upper_size_mib,
        hostname: String::new(),
        init: vmfactory_factory::ProcessSpec {
            workdir: image.config.working_dir.clone().unwrap_or_default(),
            ..Default::default()
        },
    }
}

/// The process to run in a container of an image with config `config`: the user's
/// command (after the image's Entrypoint), or the image's Entrypoint + Cmd; the image's
/// environment with the user's on top; the user's working directory, else the image's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerProcess {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: String,
}

impl ContainerProcess {
    /// A process of the VM itself, not of an image: `command` and `env` as given, in
    /// `workdir` else `/`, as root.
    pub fn in_vm(
        command: Vec<String>,
        env: Vec<(String, String)>,
        workdir: Option<String>,
    ) -> Self {
        Self {
            argv: command,
            env,
            workdir: workdir.unwrap_or_else(|| "/".to_string()),
            user: String::new(),
        }
    }

    pub fn new(
        config: &ImageConfig,
        command: &[String],
        env: &[(String, String)],
        workdir: Option<&str>,
    ) -> Result<Self> {
        let argv = config.command(command);
        if argv.is_empty() {
            crate::usage!("The image names no command (no Entrypoint or Cmd): give one after `--`");
        }
        Ok(Self {
            argv,
            env: merge_env(&config.env, env),
            workdir: workdir
                .map(str::to_string)
                .or_else(|| config.working_dir.clone())
                .filter(|dir| !dir.is_empty())
                .unwrap_or_else(|| "/".to_string()),
            user: config.user.clone().unwrap_or_default(),
        })
    }
}

/// The image's `KEY=VALUE` entries, then the user's: a later key replaces an earlier one
/// in place.
fn merge_env(image: &[String], user: &[(String, String)]) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = Vec::new();
    let parsed = image.iter().filter_map(|entry| {
        entry
            .split_once('=')
            .map(|(key, value)| (key.to_string(), value.to_string()))
    });
    for (key, value) in parsed.chain(user.iter().cloned()) {
        match merged.iter_mut().find(|(existing, _)| *existing == key) {
            Some(slot) => slot.1 = value,
            None => merged.push((key, value)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes() {
        assert_eq!(parse_disk_size("512"), Ok(512));
        assert_eq!(parse_disk_size("512M"), Ok(512));
        assert_eq!(parse_disk_size("2G"), Ok(2048));
        assert_eq!(parse_disk_size("1GiB"), Ok(1024));
        for bad in ["", "0", "x", "-1", "100G", "99999999999"] {
            assert!(parse_disk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_env_overrides_the_images_in_place() {
        let merged = merge_env(
            &["PATH=/bin".into(), "A=1".into(), "broken".into()],
            &[("A".into(), "2".into()), ("B".into(), "3".into())],
        );
        assert_eq!(
            merged,
            vec![
                ("PATH".into(), "/bin".into()),
                ("A".into(), "2".into()),
                ("B".into(), "3".into())
            ]
        );
    }
}
