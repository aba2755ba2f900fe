//! What a VM is, as every backend sees it: [`VmSpec`] and how its RAM is backed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Result};

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackend {
    /// An anonymous shared-memory file (`memory-backend-memfd`).
    Memfd,
    /// A file at `path`; `share` maps it shared (template) or private (clone, copy-on-write).
    File {
        /// The memory file.
        path: PathBuf,
        /// `share=on` when true, `share=off` (MAP_PRIVATE) when false.
        share: bool,
    },
}

/// Everything that describes one VM to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique id; names the VM directory.
    pub id: String,
    /// vCPUs at boot.
    pub vcpus: u32,
    /// vCPUs the VM may grow to by hot-plug.
    pub max_vcpus: u32,
    /// Guest RAM at boot, MiB.
    pub memory_mib: u32,
    /// DIMM slots for memory hot-plug (0 disables it).
    pub memory_slots: u32,
    /// Largest guest RAM reachable by hot-plug, MiB.
    pub max_memory_mib: u32,
    /// Guest kernel (bzImage or PVH-capable vmlinux).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub kernel_params: String,
    /// Guest RAM backing.
    pub memory: MemoryBackend,
}

impl VmSpec {
    /// Checks the numbers and files of the spec.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 {
            return Err(HypervisorError::InvalidConfig(
                "vCPUs is 0: a VM needs at least 1 vCPU".into(),
            ));
        }
        if self.max_vcpus < self.vcpus {
            return Err(HypervisorError::InvalidConfig(format!(
                "{} vCPUs exceed the maximum of {}: raise the maximum or ask for fewer",
                self.vcpus, self.max_vcpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(HypervisorError::InvalidConfig(format!(
                "Memory of {} MiB is too small: give at least {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if self.max_memory_mib < self.memory_mib {
            return Err(HypervisorError::InvalidConfig(format!(
                "Memory of {} MiB exceeds the maximum of {} MiB",
                self.memory_mib, self.max_memory_mib
            )));
        }
        if !self.kernel.is_file() {
            return Err(HypervisorError::MissingFile {
                what: "Kernel",
                path: self.kernel.clone(),
                hint: "run `vmfactory guest build` or point the kernel setting at a guest kernel",
            });
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(HypervisorError::MissingFile {
                    what: "Initrd",
                    path: initrd.clone(),
                    hint: "run `vmfactory guest build` or point the initrd setting at an initramfs",
                });
            }
        }
        Ok(())
    }
}

/// Smallest guest RAM we accept, MiB.
pub const MIN_MEMORY_MIB: u32 = 64;
