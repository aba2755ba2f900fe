//! The hypervisor layer of vmfactory: the [`Hypervisor`] trait that the factory drives, its
//! QEMU backend ([`qemu`]: command line, accelerator choice, QMP, process lifecycle) and a
//! [`mock`] backend for unit tests of factory logic.

pub mod mock;
pub mod qemu;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The VM description is unusable.
    #[error("Invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// A file the VM needs does not exist.
    #[error("{what} {path} not found: {hint}")]
    MissingFile {
        /// What the file is ("Kernel", "QEMU binary", …).
        what: &'static str,
        /// The path that was looked up.
        path: PathBuf,
        /// What the user should do.
        hint: &'static str,
    },
    /// The hypervisor process could not be started.
    #[error("Cannot start {binary}")]
    Spawn {
        /// The binary that was executed.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor process exited on its own.
    #[error("QEMU exited ({status}) {when}{report}")]
    Exited {
        /// Exit status as text.
        status: String,
        /// What was happening ("during start-up", …).
        when: &'static str,
        /// Last lines of QEMU's stderr and of the guest console.
        report: String,
    },
    /// A QMP command failed or the QMP connection broke.
    #[error("QMP {command} failed: {message}")]
    Qmp {
        /// The QMP command.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("Timed out after {seconds:.1} s {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long we waited.
        seconds: f64,
    },
    /// A file system operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operation is not supported by this backend.
    #[error("{0} is not supported by this hypervisor")]
    Unsupported(&'static str),
}

/// Result type of the hypervisor layer.
pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

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

/// A running (or paused) VM as the factory sees it.
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// The VM's id.
    fn id(&self) -> &str;
    /// Process id of the hypervisor, when it has one.
    fn pid(&self) -> Option<u32>;
    /// The VM's private directory (sockets, logs).
    fn vm_dir(&self) -> &Path;
    /// Host Unix socket connected to the guest agent's virtio-serial port.
    fn agent_socket(&self) -> PathBuf;
    /// True while the hypervisor process is alive.
    fn is_running(&self) -> bool;
    /// What the hypervisor and the guest console said last, for error messages.
    fn failure_report(&self) -> String {
        String::new()
    }
    /// Resolves when the hypervisor process has exited, with an error that explains why.
    async fn exited(&self) -> HypervisorError;
    /// Pauses the vCPUs.
    async fn pause(&self) -> Result<()>;
    /// Resumes the vCPUs.
    async fn resume(&self) -> Result<()>;
    /// Stops the VM (gracefully, then by force) and removes its directory. Idempotent.
    async fn stop(&mut self) -> Result<()>;
    /// Gives the VM away: returns a JSON description another process can rebuild a
    /// handle from, and leaves the VM running (this handle no longer owns it).
    fn detach(self: Box<Self>) -> Result<serde_json::Value> {
        Err(HypervisorError::Unsupported("Handing a VM over"))
    }
    /// Marks the point after which [`Hypervisor::wait_agent_closed`] looks for the agent
    /// letting go of its port; call it before closing the agent connection.
    async fn mark_agent_handover(&self) {}
    /// Waits until the guest agent has closed its port (after its host left), as the
    /// agent reports on the console. Guest output is untrusted: a false report only makes
    /// the next connection early, which callers tolerate by retrying. From then
    /// on a new host connection is safe: its bytes wait until the agent opens the port
    /// again, so no stale connection can swallow them.
    async fn wait_agent_closed(&self, timeout: std::time::Duration) -> Result<()> {
        let _ = timeout;
        Err(HypervisorError::Unsupported("Watching the agent port"))
    }
    /// Hot-plugs `count` vCPUs into free CPU slots; returns how many were added.
    async fn add_vcpus(&self, count: u32) -> Result<u32> {
        let _ = count;
        Err(HypervisorError::Unsupported("CPU hot-plug"))
    }
    /// Hot-plugs `mib` MiB of memory as one DIMM.
    async fn add_memory(&self, mib: u32) -> Result<()> {
        let _ = mib;
        Err(HypervisorError::Unsupported("Memory hot-plug"))
    }
}
