//! The hypervisor layer of vmfactory. Two traits cover a VM's whole life:
//! - [`Backend`] starts VMs: boots a [`VmSpec`], restores one from saved device state, or
//!   adopts one another process handed over (described by a [`HypervisorHandle`]);
//! - [`Hypervisor`] is one running VM: pause/resume, save its state, hot-plug vCPUs and
//!   memory and disks, stop it, or hand it over.
//!
//! [`qemu`] implements both with one `qemu-system-x86_64` process per VM, driven over QMP;
//! [`mock`] implements both in memory for unit tests of factory logic. What the guest agent
//! says on its channel is not this layer's business: a hypervisor only tells where the
//! channel and the console end on the host ([`GuestChannels`]).

pub mod mock;
pub mod qemu;

mod disk;
mod error;
mod handle;
mod spec;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use disk::{new_serial, validate_serial, AttachedDisk, DiskSpec, MAX_SERIAL};
pub use error::{HypervisorError, Result};
pub use handle::{HypervisorHandle, BACKEND_NAMES};
pub use spec::{MemoryBackend, VmSpec, MIN_MEMORY_MIB};

/// Linux onlines memory in blocks of 128 MiB: hot-plugged DIMMs are sized in multiples.
pub const MEMORY_BLOCK_MIB: u32 = 128;

/// What a translating accelerator (QEMU's TCG) has made of the guest's code so far. A
/// count of guest work that does not depend on how busy the host is: under TCG, running
/// a guest path for the first time costs about its translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationStats {
    /// Translated blocks in the cache (all translated so far when `flushes` is 0).
    pub blocks: u64,
    /// Host code made for them, bytes.
    pub code_bytes: u64,
    /// Times the translation cache was full and emptied.
    pub flushes: u64,
}

/// Where a VM's guest-facing channels end on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestChannels {
    /// Unix socket connected to the guest agent's port.
    pub agent_socket: PathBuf,
    /// File the guest's serial console is written to, when the backend keeps one.
    pub console_log: Option<PathBuf>,
}

/// Starts VMs of one kind (one per factory; cheap to share behind an `Arc`).
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name, also the tag of this backend's [`HypervisorHandle`]s (`qemu`, `mock`).
    fn name(&self) -> &'static str;
    /// Version of the hypervisor program; templates record it and refuse another.
    fn version(&self) -> Result<String>;
    /// The hypervisor program's file, when it has one: templates stamp it so that an
    /// unchanged program need not be asked its version again.
    fn program(&self) -> Option<PathBuf> {
        None
    }
    /// Boots `spec`; the VM runs when this returns.
    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Hypervisor>>;
    /// Starts `spec` from the device state saved at `state` by
    /// [`Hypervisor::save_state`]; guest RAM comes from `spec.memory`. The VM is paused
    /// when this returns and identical to the saved one.
    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<Box<dyn Hypervisor>>;
    /// Takes over a running VM another handle gave away with [`Hypervisor::hand_over`],
    /// possibly in another process.
    async fn adopt(&self, handle: HypervisorHandle) -> Result<Box<dyn Hypervisor>>;
    /// Takes back and stops the VM this process handed over as `handle`, if nobody has
    /// adopted it; true if it did. Taking back and adopting exclude each other (whoever
    /// takes the hand-over mark first wins), so a VM is never stopped under its adopter.
    /// A VMCache server calls it after a grace, so a client that went away before
    /// adopting its VM leaves nothing running. Default: never.
    async fn reclaim(&self, _handle: &HypervisorHandle) -> bool {
        false
    }
    /// True while the VM this process handed over as `handle` waits for its adopter (no
    /// one has adopted or reclaimed it). Default: never (nothing to wait for).
    fn awaiting_adoption(&self, _handle: &HypervisorHandle) -> bool {
        false
    }
}

/// One running (or paused) VM. Dropping a handle that still owns its VM kills the VM.
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// The VM's id.
    fn id(&self) -> &str;
    /// Process id of the hypervisor, when it has one.
    fn pid(&self) -> Option<u32>;
    /// The VM's private directory (sockets, logs).
    fn vm_dir(&self) -> &Path;
    /// Where the guest agent's channel and the console end on the host.
    fn channels(&self) -> GuestChannels;
    /// True while the VM exists.
    fn is_running(&self) -> bool;
    /// What the hypervisor and the guest console said last, for error messages.
    fn failure_report(&self) -> String;
    /// Resolves when the VM has gone, with an error that explains why.
    async fn exited(&self) -> HypervisorError;
    /// Pauses the vCPUs.
    async fn pause(&self) -> Result<()>;
    /// Resumes the vCPUs.
    async fn resume(&self) -> Result<()>;
    /// Pauses the VM and saves its device state to `path`. Guest RAM in a shared memory
    /// file is not copied: a restore maps the same file.
    async fn save_state(&self, path: &Path) -> Result<()>;
    /// The VM generation ID (a GUID, lower case) the guest sees now, if the VM has a
    /// generation ID device. Each QEMU process has its own: a clone differs from its
    /// template and from its siblings.
    async fn vm_generation_id(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// How much guest code the hypervisor has translated so far (TCG), if it translates
    /// and can tell; `None` under KVM.
    async fn translation_stats(&self) -> Result<Option<TranslationStats>> {
        Ok(None)
    }
    /// Hot-plugs `count` vCPUs into free CPU slots; returns how many were added.
    async fn add_vcpus(&self, count: u32) -> Result<u32>;
    /// Hot-plugs `mib` MiB of memory (a multiple of [`MEMORY_BLOCK_MIB`]) as one DIMM.
    async fn add_memory(&self, mib: u32) -> Result<()>;
    /// Hot-plugs the disk image `disk` (virtio-blk with `disk.serial`, read-only when
    /// asked). The hypervisor keeps nothing on the host for it beyond the VM's life: a
    /// stopped or discarded VM takes its disks with it.
    async fn attach_disk(&self, _disk: &DiskSpec) -> Result<AttachedDisk> {
        Err(HypervisorError::Unsupported("Disk hot-plug"))
    }
    /// Unplugs disk `id` (from [`Hypervisor::attach_disk`]); the guest must have released
    /// it (unmounted) or this times out.
    async fn detach_disk(&self, _id: &str) -> Result<()> {
        Err(HypervisorError::Unsupported("Disk hot-plug"))
    }
    /// What of hot-plugged disks the hypervisor holds now: device ids and block node
    /// names (a detached disk leaves none).
    async fn disk_leftovers(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Stops the VM (gracefully, then by force) and removes its directory. Idempotent.
    async fn stop(&mut self) -> Result<()>;
    /// Throws the VM away at once, without a graceful shutdown (a VM that served one
    /// command): kills it and removes its directory without waiting for the process.
    async fn discard(&mut self) -> Result<()> {
        self.stop().await
    }
    /// Gives the VM away: it keeps running, this handle no longer owns it, and the
    /// returned description lets [`Backend::adopt`] take it over.
    fn hand_over(self: Box<Self>) -> Result<HypervisorHandle>;
}
