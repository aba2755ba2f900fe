//! Block devices hot-plugged into a running VM: what to attach ([`DiskSpec`]) and what was
//! attached ([`AttachedDisk`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Result};

/// Longest virtio-blk serial the guest sees (the virtio spec's `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL: usize = 20;

/// A disk image file to hot-plug into a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The image file (raw: an EROFS or ext4 file system image).
    pub path: PathBuf,
    /// Attach read-only: the guest cannot change the file.
    pub read_only: bool,
    /// The serial the guest reads in `/sys/block/vd*/serial` to find the disk; empty lets
    /// the hypervisor pick a unique one. At most [`MAX_SERIAL`] letters, digits, `-`, `_`.
    pub serial: String,
}

/// A disk attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedDisk {
    /// Id to detach it with.
    pub id: String,
    /// The serial the guest sees.
    pub serial: String,
}

/// A fresh serial: `vmf` and 12 random hex digits.
pub fn new_serial() -> String {
    format!("vmf{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Checks a serial (the guest matches it byte for byte, QEMU names nodes after it).
pub fn validate_serial(serial: &str) -> Result<()> {
    if serial.is_empty()
        || serial.len() > MAX_SERIAL
        || !serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(HypervisorError::InvalidConfig(format!(
            "Invalid disk serial {serial:?}: use 1 to {MAX_SERIAL} letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl DiskSpec {
    /// Checks the file and the serial; returns the serial to use.
    pub fn checked_serial(&self) -> Result<String> {
        let serial = if self.serial.is_empty() {
            new_serial()
        } else {
            self.serial.clone()
        };
        validate_serial(&serial)?;
        let meta = std::fs::metadata(&self.path).map_err(|source| HypervisorError::Io {
            action: "Cannot use the disk image",
            path: self.path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(HypervisorError::InvalidConfig(format!(
                "Disk image {} is not a regular file: give an EROFS or ext4 image file",
                self.path.display()
            )));
        }
        if meta.len() == 0 {
            return Err(HypervisorError::InvalidConfig(format!(
                "Disk image {} is empty",
                self.path.display()
            )));
        }
        Ok(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials() {
        let serial = new_serial();
        assert_eq!(serial.len(), 15);
        validate_serial(&serial).expect("fresh serial");
        validate_serial("disk_1-a").expect("plain");
        assert!(validate_serial("").is_err());
        assert!(validate_serial(&"a".repeat(21)).is_err());
        assert!(validate_serial("a,b").is_err());
        assert!(validate_serial("a b").is_err());
    }

    #[test]
    fn spec_checks_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = |path: PathBuf| DiskSpec {
            path,
            read_only: true,
            serial: String::new(),
        };
        assert!(spec(dir.path().join("missing")).checked_serial().is_err());
        assert!(spec(dir.path().to_path_buf()).checked_serial().is_err());
        let file = dir.path().join("img");
        std::fs::write(&file, b"").expect("write");
        assert!(spec(file.clone()).checked_serial().is_err());
        std::fs::write(&file, b"data").expect("write");
        assert!(spec(file).checked_serial().expect("ok").starts_with("vmf"));
    }
}
