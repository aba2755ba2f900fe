//! A mock backend for unit tests of factory logic: no process, only state, files in a
//! directory, and an optional guest hook (a test's stand-in for the guest agent).
//! It implements the whole [`Backend`] / [`Hypervisor`] life cycle: boot, restore from a
//! saved state file, save, pause/resume, hot-plug, stop, hand over and adopt (within this
//! process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::qemu::cmdline::HOTPLUG_PORTS;
use crate::{
    AttachedDisk, Backend, DiskSpec, GuestChannels, Hypervisor, HypervisorError, HypervisorHandle,
    MemoryBackend, Result, VmSpec, MEMORY_BLOCK_MIB,
};

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPED: u8 = 2;

/// Version string the mock backend reports.
pub const MOCK_VERSION: &str = "mock hypervisor 1";

/// Shared switches a test uses to observe and break a mock VM.
#[derive(Debug, Default)]
pub struct MockControl {
    state: AtomicU8,
    crashed: AtomicBool,
    added_vcpus: AtomicU32,
    added_memory_mib: AtomicU32,
    resumes: AtomicU32,
    disks: Mutex<Vec<AttachedDisk>>,
}

impl MockControl {
    /// Simulates the hypervisor process dying.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PAUSED
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        self.state.load(Ordering::SeqCst) == STOPPED
    }

    /// True while neither crashed nor stopped.
    pub fn is_alive(&self) -> bool {
        !self.crashed.load(Ordering::SeqCst) && !self.is_stopped()
    }

    /// Times the VM was resumed (`cont`) so far.
    pub fn resumes(&self) -> u32 {
        self.resumes.load(Ordering::SeqCst)
    }

    /// vCPUs hot-plugged so far.
    pub fn added_vcpus(&self) -> u32 {
        self.added_vcpus.load(Ordering::SeqCst)
    }

    /// Memory hot-plugged so far, MiB.
    pub fn added_memory_mib(&self) -> u32 {
        self.added_memory_mib.load(Ordering::SeqCst)
    }

    /// Disks attached now.
    pub fn attached_disks(&self) -> Vec<AttachedDisk> {
        self.disks.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn forget_disks(&self) {
        if let Ok(mut disks) = self.disks.lock() {
            disks.clear();
        }
    }
}

/// Called when a mock VM starts running a guest (boot or restore): a test serves its
/// stand-in agent on `channels.agent_socket` and stops when `control` says the VM is gone.
pub type GuestHook = Arc<dyn Fn(GuestChannels, Arc<MockControl>) + Send + Sync>;

/// What a mock VM hands over: its id (the VM itself stays in this process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockHandle {
    /// VM id.
    pub id: String,
    /// The VM directory.
    pub dir: PathBuf,
}

/// What a mock "saves" as device state.
#[derive(Debug, Serialize, Deserialize)]
struct MockState {
    format: String,
    spec: VmSpec,
}

/// Mock VMs handed over and not yet adopted, by id.
fn handed_over() -> &'static Mutex<HashMap<String, MockHypervisor>> {
    static HANDED_OVER: std::sync::OnceLock<Mutex<HashMap<String, MockHypervisor>>> =
        std::sync::OnceLock::new();
    HANDED_OVER.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Every VM a backend started: its id and control handle.
type StartedVms = Arc<Mutex<Vec<(String, Arc<MockControl>)>>>;

/// Starts mock VMs with their directories under `dir`.
#[derive(Clone)]
pub struct MockBackend {
    dir: PathBuf,
    guest: Option<GuestHook>,
    controls: StartedVms,
}

impl std::fmt::Debug for MockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockBackend")
            .field("dir", &self.dir)
            .field("guest", &self.guest.is_some())
            .finish_non_exhaustive()
    }
}

impl MockBackend {
    /// A backend keeping VM directories under `dir`; `guest` runs for every started VM.
    pub fn new(dir: &Path, guest: Option<GuestHook>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            guest,
            controls: Arc::default(),
        }
    }

    /// Controls of every VM this backend started, oldest first, with their ids.
    pub fn controls(&self) -> Vec<(String, Arc<MockControl>)> {
        self.controls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn start(&self, spec: &VmSpec, paused: bool) -> Result<MockHypervisor> {
        if spec.vcpus == 0 || spec.memory_mib == 0 {
            return Err(HypervisorError::InvalidConfig(
                "Mock VMs need vCPUs and memory".into(),
            ));
        }
        let dir = self.dir.join(&spec.id);
        std::fs::create_dir_all(&dir).map_err(|source| HypervisorError::Io {
            action: "Cannot create the VM directory",
            path: dir.clone(),
            source,
        })?;
        if let MemoryBackend::File { path, share: true } = &spec.memory {
            // As QEMU does: a shared memory file is created at the guest's size.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(u64::from(spec.memory_mib) << 20));
            file.map_err(|source| HypervisorError::Io {
                action: "Cannot create the memory file",
                path: path.clone(),
                source,
            })?;
        }
        let control = Arc::new(MockControl::default());
        if paused {
            control.state.store(PAUSED, Ordering::SeqCst);
        }
        if let Ok(mut controls) = self.controls.lock() {
            controls.push((spec.id.clone(), control.clone()));
        }
        let vm = MockHypervisor {
            spec: spec.clone(),
            dir,
            control: control.clone(),
            owned: true,
        };
        if let Some(guest) = &self.guest {
            guest(vm.channels(), control);
        }
        Ok(vm)
    }
}

#[async_trait]
impl Backend for MockBackend {
    fn name(&self) -> &'static str {
        crate::BACKEND_NAMES[1]
    }

    fn version(&self) -> Result<String> {
        Ok(MOCK_VERSION.to_string())
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Hypervisor>> {
        spec.validate()?;
        Ok(Box::new(self.start(spec, false)?))
    }

    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<Box<dyn Hypervisor>> {
        spec.validate()?;
        let bad_state = |message: String| HypervisorError::Qmp {
            command: "migrate-incoming".into(),
            message,
        };
        let text = std::fs::read(state).map_err(|source| HypervisorError::Io {
            action: "Cannot open the saved device state",
            path: state.to_path_buf(),
            source,
        })?;
        let saved: MockState = serde_json::from_slice(&text)
            .map_err(|err| bad_state(format!("Unreadable device state: {err}")))?;
        if saved.format != MOCK_VERSION {
            return Err(bad_state(format!("State of {}", saved.format)));
        }
        if (saved.spec.vcpus, saved.spec.memory_mib) != (spec.vcpus, spec.memory_mib) {
            return Err(bad_state("State of a VM of another size".into()));
        }
        if let MemoryBackend::File { path, .. } = &spec.memory {
            if !path.is_file() {
                return Err(bad_state(format!("No memory file {}", path.display())));
            }
        }
        Ok(Box::new(self.start(spec, true)?))
    }

    async fn reclaim(&self, handle: &HypervisorHandle) -> bool {
        let HypervisorHandle::Mock(handle) = handle else {
            return false;
        };
        let taken = take_handed_over(&handle.id);
        match taken {
            Some(mut vm) => {
                let _ = vm.stop().await;
                true
            }
            None => false,
        }
    }

    fn awaiting_adoption(&self, handle: &HypervisorHandle) -> bool {
        let HypervisorHandle::Mock(handle) = handle else {
            return false;
        };
        handed_over()
            .lock()
            .is_ok_and(|vms| vms.contains_key(&handle.id))
    }

    async fn adopt(&self, handle: HypervisorHandle) -> Result<Box<dyn Hypervisor>> {
        let HypervisorHandle::Mock(handle) = handle else {
            return Err(HypervisorError::ForeignHandle {
                found: handle.backend(),
                expected: self.name(),
            });
        };
        let taken = take_handed_over(&handle.id);
        match taken {
            Some(mut vm) => {
                vm.owned = true;
                Ok(Box::new(vm))
            }
            None => Err(HypervisorError::InvalidConfig(format!(
                "Cannot take over mock VM {}: not handed over",
                handle.id
            ))),
        }
    }
}

/// Takes mock VM `id` out of the hand-over registry: for the one caller that finds it.
fn take_handed_over(id: &str) -> Option<MockHypervisor> {
    handed_over().lock().ok().and_then(|mut vms| vms.remove(id))
}

/// A VM that exists only in memory (and its directory).
#[derive(Debug)]
pub struct MockHypervisor {
    spec: VmSpec,
    dir: PathBuf,
    control: Arc<MockControl>,
    owned: bool,
}

impl MockHypervisor {
    /// The spec the mock was started with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The control handle of this VM.
    pub fn control(&self) -> Arc<MockControl> {
        self.control.clone()
    }

    fn check_alive(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(HypervisorError::Exited {
                status: "mock crash".into(),
                when: "unexpectedly",
                report: String::new(),
            })
        }
    }
}

#[async_trait]
impl Hypervisor for MockHypervisor {
    fn id(&self) -> &str {
        &self.spec.id
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn vm_dir(&self) -> &Path {
        &self.dir
    }

    fn channels(&self) -> GuestChannels {
        GuestChannels {
            agent_socket: self.dir.join("agent.sock"),
            console_log: Some(self.dir.join("console.log")),
        }
    }

    fn is_running(&self) -> bool {
        self.control.is_alive()
    }

    fn failure_report(&self) -> String {
        String::new()
    }

    async fn exited(&self) -> HypervisorError {
        while self.is_running() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        HypervisorError::Exited {
            status: "mock exit".into(),
            when: "unexpectedly",
            report: String::new(),
        }
    }

    async fn pause(&self) -> Result<()> {
        self.check_alive()?;
        self.control.state.store(PAUSED, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.check_alive()?;
        self.control.resumes.fetch_add(1, Ordering::SeqCst);
        self.control.state.store(RUNNING, Ordering::SeqCst);
        Ok(())
    }

    async fn save_state(&self, path: &Path) -> Result<()> {
        self.pause().await?;
        let state = MockState {
            format: MOCK_VERSION.to_string(),
            spec: self.spec.clone(),
        };
        let json = serde_json::to_vec(&state)
            .map_err(|err| HypervisorError::InvalidConfig(err.to_string()))?;
        std::fs::write(path, json).map_err(|source| HypervisorError::Io {
            action: "Cannot write the device state",
            path: path.to_path_buf(),
            source,
        })
    }

    async fn add_vcpus(&self, count: u32) -> Result<u32> {
        self.check_alive()?;
        let now = self.spec.vcpus + self.control.added_vcpus();
        if now + count > self.spec.max_vcpus {
            return Err(HypervisorError::InvalidConfig(format!(
                "Cannot add {count} vCPUs: only {} free CPU slots",
                self.spec.max_vcpus - now
            )));
        }
        self.control.added_vcpus.fetch_add(count, Ordering::SeqCst);
        Ok(count)
    }

    async fn add_memory(&self, mib: u32) -> Result<()> {
        self.check_alive()?;
        if mib == 0 || mib % MEMORY_BLOCK_MIB != 0 || self.spec.memory_slots == 0 {
            return Err(HypervisorError::InvalidConfig(format!(
                "Cannot hot-plug {mib} MiB"
            )));
        }
        self.control
            .added_memory_mib
            .fetch_add(mib, Ordering::SeqCst);
        Ok(())
    }

    async fn attach_disk(&self, disk: &DiskSpec) -> Result<AttachedDisk> {
        self.check_alive()?;
        let serial = disk.checked_serial()?;
        let mut disks = self
            .control
            .disks
            .lock()
            .map_err(|_| HypervisorError::InvalidConfig("mock disk table poisoned".into()))?;
        if disks.len() >= HOTPLUG_PORTS {
            return Err(HypervisorError::InvalidConfig(format!(
                "All {HOTPLUG_PORTS} disk hot-plug ports are in use: detach a disk first"
            )));
        }
        if disks.iter().any(|d| d.serial == serial) {
            return Err(HypervisorError::InvalidConfig(format!(
                "A disk with serial {serial} is attached already"
            )));
        }
        let attached = AttachedDisk {
            id: format!("vmfdisk-{serial}"),
            serial,
        };
        disks.push(attached.clone());
        Ok(attached)
    }

    async fn detach_disk(&self, id: &str) -> Result<()> {
        self.check_alive()?;
        let mut disks = self
            .control
            .disks
            .lock()
            .map_err(|_| HypervisorError::InvalidConfig("mock disk table poisoned".into()))?;
        let before = disks.len();
        disks.retain(|d| d.id != id);
        if disks.len() == before {
            return Err(HypervisorError::Qmp {
                command: "device_del".into(),
                message: format!("Device '{id}' not found"),
            });
        }
        Ok(())
    }

    async fn disk_leftovers(&self) -> Result<Vec<String>> {
        Ok(self
            .control
            .attached_disks()
            .into_iter()
            .map(|disk| disk.id)
            .collect())
    }

    async fn stop(&mut self) -> Result<()> {
        self.control.state.store(STOPPED, Ordering::SeqCst);
        self.control.forget_disks();
        // A test's stand-in agent may write one last console line while the directory
        // goes: try again shortly, as it stops once it sees the VM stopped.
        let mut attempts = 0;
        loop {
            match std::fs::remove_dir_all(&self.dir) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) if attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => {
                    return Err(HypervisorError::Io {
                        action: "Cannot remove the VM directory",
                        path: self.dir.clone(),
                        source: err,
                    })
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    fn hand_over(mut self: Box<Self>) -> Result<HypervisorHandle> {
        self.check_alive()?;
        let handle = MockHandle {
            id: self.spec.id.clone(),
            dir: self.dir.clone(),
        };
        self.owned = false;
        let id = self.spec.id.clone();
        if let Ok(mut vms) = handed_over().lock() {
            vms.insert(id, *self);
        }
        Ok(HypervisorHandle::Mock(handle))
    }
}

impl Drop for MockHypervisor {
    fn drop(&mut self) {
        if self.owned {
            self.control.state.store(STOPPED, Ordering::SeqCst);
            self.control.forget_disks();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, id: &str) -> VmSpec {
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"k").expect("kernel");
        VmSpec {
            id: id.into(),
            vcpus: 1,
            max_vcpus: 2,
            memory_mib: 128,
            memory_slots: 1,
            max_memory_mib: 512,
            kernel,
            initrd: None,
            kernel_params: String::new(),
            memory: MemoryBackend::File {
                path: dir.join("memory"),
                share: true,
            },
        }
    }

    #[tokio::test]
    async fn whole_life_cycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = MockBackend::new(&dir.path().join("vms"), None);
        let mut vm = backend.boot(&spec(dir.path(), "m1")).await.expect("boot");
        let control = backend.controls()[0].1.clone();
        assert_eq!(
            std::fs::metadata(dir.path().join("memory"))
                .expect("memory")
                .len(),
            128 << 20
        );
        vm.pause().await.expect("pause");
        assert!(control.is_paused());
        vm.resume().await.expect("resume");
        assert!(!control.is_paused());
        assert_eq!(vm.add_vcpus(1).await.expect("cpu"), 1);
        assert!(vm.add_vcpus(1).await.is_err(), "beyond max_vcpus");
        vm.add_memory(128).await.expect("memory");
        let state = dir.path().join("state");
        vm.save_state(&state).await.expect("save");
        vm.stop().await.expect("stop");
        assert!(control.is_stopped());

        let restored = backend
            .restore(&spec(dir.path(), "m2"), &state)
            .await
            .expect("restore");
        assert!(
            backend.controls()[1].1.is_paused(),
            "restored VMs are paused"
        );
        let handle = restored.hand_over().expect("hand over");
        assert_eq!(handle.backend(), "mock");
        let mut adopted = backend.adopt(handle.clone()).await.expect("adopt");
        assert_eq!(adopted.id(), "m2");
        assert!(backend.adopt(handle).await.is_err(), "adopted only once");
        adopted.stop().await.expect("stop");

        std::fs::write(&state, b"garbage").expect("damage");
        assert!(backend
            .restore(&spec(dir.path(), "m3"), &state)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn disks_attach_detach_and_go_with_the_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("img");
        std::fs::write(&image, b"erofs").expect("image");
        let backend = MockBackend::new(dir.path(), None);
        let mut vm = backend.boot(&spec(dir.path(), "d1")).await.expect("boot");
        let control = backend.controls()[0].1.clone();
        let disk = DiskSpec {
            path: image.clone(),
            read_only: true,
            serial: String::new(),
        };
        let a = vm.attach_disk(&disk).await.expect("attach");
        assert!(a.id.ends_with(&a.serial));
        vm.detach_disk(&a.id).await.expect("detach");
        assert!(vm.detach_disk(&a.id).await.is_err(), "detached twice");
        for _ in 0..HOTPLUG_PORTS {
            vm.attach_disk(&disk).await.expect("attach");
        }
        assert!(vm.attach_disk(&disk).await.is_err(), "ports full");
        assert_eq!(control.attached_disks().len(), HOTPLUG_PORTS);
        vm.stop().await.expect("stop");
        assert!(control.attached_disks().is_empty());
    }

    #[tokio::test]
    async fn crashes_are_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = MockBackend::new(dir.path(), None);
        let vm = backend.boot(&spec(dir.path(), "c1")).await.expect("boot");
        backend.controls()[0].1.crash();
        assert!(!vm.is_running());
        assert!(vm.resume().await.is_err());
        assert!(matches!(vm.exited().await, HypervisorError::Exited { .. }));
    }
}
