//! What a template was built from ([`TemplateMetadata`], stored beside it as JSON), and
//! how a template is compared with the current configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmfactory_hypervisor::{Backend, MemoryBackend};

use super::{io_error, TemplateError, METADATA_FILE, TEMPLATE_FORMAT_VERSION};
use crate::config::VmConfig;

/// The VM settings a template fixes; clones must be started with the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateVmConfig {
    /// vCPUs at boot.
    pub vcpus: u32,
    /// Hot-plug limit of vCPUs.
    pub max_vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// DIMM slots.
    pub memory_slots: u32,
    /// Hot-plug limit of RAM, MiB.
    pub max_memory_mib: u32,
    /// QEMU machine type.
    pub machine_type: String,
    /// Full kernel command line.
    pub kernel_cmdline: String,
    /// Firmware image.
    pub firmware: Option<PathBuf>,
}

impl TemplateVmConfig {
    pub(super) fn of(config: &VmConfig) -> Self {
        let spec = config.spec(String::new(), MemoryBackend::Memfd);
        Self {
            vcpus: spec.vcpus,
            max_vcpus: spec.max_vcpus,
            memory_mib: spec.memory_mib,
            memory_slots: spec.memory_slots,
            max_memory_mib: spec.max_memory_mib,
            machine_type: config.qemu.machine_type.clone(),
            kernel_cmdline: spec.kernel_params,
            firmware: config.qemu.firmware.clone(),
        }
    }
}

/// What a template was built from, stored beside it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMetadata {
    /// [`TEMPLATE_FORMAT_VERSION`] at creation.
    pub format_version: u32,
    /// `qemu-system-x86_64 --version` at creation.
    pub qemu_version: String,
    /// Kernel path at creation.
    pub kernel: PathBuf,
    /// sha256 of the kernel.
    pub kernel_sha256: String,
    /// Initrd path at creation.
    pub initrd: Option<PathBuf>,
    /// sha256 of the initrd.
    pub initrd_sha256: Option<String>,
    /// sha256 of the state file.
    pub state_sha256: String,
    /// Size of the memory file, bytes.
    pub memory_bytes: u64,
    /// The VM settings.
    pub vm: TemplateVmConfig,
    /// Whether vmfactory mounted the tmpfs (informative: `destroy` follows the owner marker).
    pub mounted_tmpfs: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Stamp of the hypervisor program when its version was taken (lets `fetch` skip
    /// asking it again).
    #[serde(default)]
    pub qemu_stamp: Option<FileStamp>,
    /// Stamp of the kernel file when its digest was taken (lets `fetch` skip hashing it).
    #[serde(default)]
    pub kernel_stamp: Option<FileStamp>,
    /// Stamp of the initrd file when its digest was taken.
    #[serde(default)]
    pub initrd_stamp: Option<FileStamp>,
    /// The VM generation ID of the template VM when it was saved (informative: each
    /// clone's QEMU replaces it with its own, which makes the guest reseed its CRNG).
    #[serde(default)]
    pub vm_generation_id: Option<String>,
    /// The template kernel's clocksource when it was saved, which its clones keep
    /// (informative; see [`super::wait_for_refined_clock`]).
    #[serde(default)]
    pub clocksource: Option<String>,
}

/// What the file system says about a file's contents: any write changes its ctime, which
/// no user tool can set back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self, TemplateError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(io_error("Cannot stat", path))?;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// The sha256 of `path` and its stamp. `known` (a stamp, its digest, and when it was
/// recorded, in Unix seconds) is reused instead of reading the file when the file is
/// provably unchanged: same stamp, and last changed more than 2 s before the recording,
/// since ctime ticks coarsely (git's "racy" rule).
fn digest_of(
    path: &Path,
    known: Option<(&FileStamp, &str, u64)>,
) -> Result<(String, FileStamp), TemplateError> {
    let stamp = FileStamp::of(path)?;
    if let Some((recorded, digest, recorded_unix)) = known {
        let settled = recorded.ctime_ns + 2_000_000_000 < i128::from(recorded_unix) * 1_000_000_000;
        if *recorded == stamp && settled {
            return Ok((digest.to_string(), stamp));
        }
    }
    Ok((sha256_file(path)?, stamp))
}

impl TemplateMetadata {
    /// Lists what differs between this template and `current`.
    pub fn differences(&self, current: &TemplateMetadata) -> Vec<String> {
        let digest = |d: &Option<String>| d.as_deref().map(short).unwrap_or_default();
        let (built, now) = (&self.vm, &current.vm);
        let compared: [(&str, String, String); 12] = [
            (
                "format version",
                self.format_version.to_string(),
                current.format_version.to_string(),
            ),
            (
                "QEMU",
                self.qemu_version.clone(),
                current.qemu_version.clone(),
            ),
            (
                "kernel digest",
                short(&self.kernel_sha256),
                short(&current.kernel_sha256),
            ),
            (
                "initrd digest",
                digest(&self.initrd_sha256),
                digest(&current.initrd_sha256),
            ),
            ("vCPUs", built.vcpus.to_string(), now.vcpus.to_string()),
            (
                "max vCPUs",
                built.max_vcpus.to_string(),
                now.max_vcpus.to_string(),
            ),
            (
                "memory (MiB)",
                built.memory_mib.to_string(),
                now.memory_mib.to_string(),
            ),
            (
                "memory slots",
                built.memory_slots.to_string(),
                now.memory_slots.to_string(),
            ),
            (
                "max memory (MiB)",
                built.max_memory_mib.to_string(),
                now.max_memory_mib.to_string(),
            ),
            (
                "machine type",
                built.machine_type.clone(),
                now.machine_type.clone(),
            ),
            (
                "kernel command line",
                format!("{:?}", built.kernel_cmdline),
                format!("{:?}", now.kernel_cmdline),
            ),
            (
                "firmware",
                format!("{:?}", built.firmware),
                format!("{:?}", now.firmware),
            ),
        ];
        compared
            .into_iter()
            .filter(|(_, was, is)| was != is)
            .map(|(what, was, is)| format!("{what} was {was} and is now {is}"))
            .collect()
    }
}

fn short(digest: &str) -> String {
    digest.get(..12).unwrap_or(digest).to_string()
}

pub(super) fn sha256_file(path: &Path) -> Result<String, TemplateError> {
    let mut file = std::fs::File::open(path).map_err(io_error("Cannot read", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error("Cannot read", path))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// What the current configuration would record in a template's metadata (the state
/// digest and memory size are left empty). Digests recorded in `built` are reused for
/// files that provably did not change since (see [`digest_of`]).
pub(super) fn expected_metadata(
    config: &VmConfig,
    backend: &dyn Backend,
    built: Option<&TemplateMetadata>,
) -> Result<TemplateMetadata, TemplateError> {
    let kernel_known = built.and_then(|b| {
        let stamp = b
            .kernel_stamp
            .as_ref()
            .filter(|_| b.kernel == config.kernel)?;
        Some((stamp, b.kernel_sha256.as_str(), b.created_unix))
    });
    let (kernel_sha256, kernel_stamp) = digest_of(&config.kernel, kernel_known)?;
    let (initrd_sha256, initrd_stamp) = match &config.initrd {
        Some(initrd) => {
            let known = built.and_then(|b| {
                let stamp = b
                    .initrd_stamp
                    .as_ref()
                    .filter(|_| b.initrd.as_ref() == Some(initrd))?;
                Some((stamp, b.initrd_sha256.as_deref()?, b.created_unix))
            });
            let (digest, stamp) = digest_of(initrd, known)?;
            (Some(digest), Some(stamp))
        }
        None => (None, None),
    };
    // The hypervisor's version is asked only when its program changed since it was
    // recorded (`qemu --version` would be a process on every clone otherwise).
    let qemu_stamp = backend
        .program()
        .and_then(|program| FileStamp::of(&program).ok());
    let known_version = built.and_then(|b| {
        let recorded = b.qemu_stamp.as_ref()?;
        let settled =
            recorded.ctime_ns + 2_000_000_000 < i128::from(b.created_unix) * 1_000_000_000;
        (Some(recorded) == qemu_stamp.as_ref() && settled).then(|| b.qemu_version.clone())
    });
    let qemu_version = match known_version {
        Some(version) => version,
        None => backend.version()?,
    };
    Ok(TemplateMetadata {
        format_version: TEMPLATE_FORMAT_VERSION,
        qemu_version,
        qemu_stamp,
        kernel: config.kernel.clone(),
        kernel_sha256,
        kernel_stamp: Some(kernel_stamp),
        initrd: config.initrd.clone(),
        initrd_sha256,
        initrd_stamp,
        state_sha256: String::new(),
        memory_bytes: 0,
        vm: TemplateVmConfig::of(config),
        mounted_tmpfs: false,
        created_unix: 0,
        vm_generation_id: None,
        clocksource: None,
    })
}

/// Reads and parses the metadata of the template at `path`.
pub fn read_metadata(path: &Path) -> Result<TemplateMetadata, TemplateError> {
    let file = path.join(METADATA_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(TemplateError::Missing(path.to_path_buf()))
        }
        Err(err) => return Err(io_error("Cannot read", &file)(err)),
    };
    serde_json::from_str(&text).map_err(|err| TemplateError::Corrupt {
        path: path.to_path_buf(),
        problem: format!("unreadable {METADATA_FILE}: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    fn now_unix() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    #[test]
    fn digest_is_reused_only_for_a_provably_unchanged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("kernel");
        std::fs::write(&file, b"kernel v1").expect("write");
        let (real, stamp) = digest_of(&file, None).expect("digest");
        assert_eq!(real, sha256_file(&file).expect("sha"));

        // Recorded well after the file last changed: the known digest is trusted.
        let later = now_unix() + 10;
        let (reused, _) = digest_of(&file, Some((&stamp, "recorded", later))).expect("digest");
        assert_eq!(reused, "recorded");

        // Recorded within 2 s of the change (ctime is coarse): hashed again.
        let (hashed, _) = digest_of(&file, Some((&stamp, "recorded", now_unix()))).expect("digest");
        assert_eq!(hashed, real);

        // Rewritten in place, same length, a few timestamp ticks later (the test fakes the
        // recording time, so it must not rely on the 2 s rule): hashed again.
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::write(&file, b"kernel v2").expect("rewrite");
        let (changed, new_stamp) =
            digest_of(&file, Some((&stamp, "recorded", later))).expect("digest");
        assert_ne!(new_stamp, stamp);
        assert_eq!(changed, sha256_file(&file).expect("sha"));
        assert_ne!(changed, real);
    }
}
