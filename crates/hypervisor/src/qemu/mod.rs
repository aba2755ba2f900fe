//! The QEMU backend: one `qemu-system-x86_64` process per VM, driven over QMP, with the
//! guest agent's virtio-serial port exposed as a Unix socket in the VM directory.
//!
//! - [`config`]: the backend's settings and facts about the QEMU binary;
//! - [`cmdline`]: the command line of one VM;
//! - `process`: spawning, adopting and killing the process;
//! - `state`: saving and loading device state (templates);
//! - `hotplug`: CPU and DIMM hot-plug; `disk`: disk hot-plug on reserved PCIe ports;
//! - `console`: what QEMU and the guest said last, for errors;
//! - [`jit`]: TCG's translation statistics;
//! - [`qmp`]: the QMP client; [`accel`]: KVM or TCG.

pub mod accel;
pub mod cmdline;
pub mod config;
pub mod qmp;

mod console;
pub mod disk;
mod hotplug;
pub mod jit;
pub mod libstub;
mod orphans;
mod process;
mod state;
mod stubgen;
mod tsc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{watch, Mutex};
use tracing::{debug, warn};

use self::accel::ResolvedAccel;
use self::cmdline::VmPaths;
use self::qmp::Qmp;
use crate::{
    AttachedDisk, Backend, DiskSpec, GuestChannels, Hypervisor, HypervisorError, HypervisorHandle,
    Result, VmSpec,
};

pub use self::config::{
    default_firmware, default_runtime_dir, new_vm_id, qemu_version, resolve_binary, QemuConfig,
    QBOOT_PATH,
};
pub use self::console::{bound_console, failure_report, ConsoleBound, CONSOLE_CAP_BYTES};
pub use self::orphans::{
    orphans_awaiting_adoption, reap_dir, reap_orphans, reap_orphans_but_hand_overs, OWNER_FILE,
};
pub use self::process::{process_cmdline, processes_under, ADOPTED_EXIT_STATUS};

/// What another process needs to take over a running QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuHandle {
    /// VM id.
    pub id: String,
    /// QEMU's pid.
    pub pid: u32,
    /// The VM directory (sockets, logs).
    pub dir: PathBuf,
    /// The accelerator it runs with.
    pub accel: ResolvedAccel,
}

/// The QEMU [`Backend`]: starts one QEMU process per VM with the same settings.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    config: QemuConfig,
}

impl QemuBackend {
    /// A backend with `config`.
    pub fn new(config: QemuConfig) -> Self {
        Self { config }
    }

    /// Its settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        crate::BACKEND_NAMES[0]
    }

    fn version(&self) -> Result<String> {
        qemu_version(&self.config.binary)
    }

    fn program(&self) -> Option<PathBuf> {
        resolve_binary(&self.config.binary).ok()
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Hypervisor>> {
        Ok(Box::new(Qemu::start(&self.config, spec).await?))
    }

    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<Box<dyn Hypervisor>> {
        Ok(Box::new(
            Qemu::start_incoming(&self.config, spec, state).await?,
        ))
    }

    async fn reclaim(&self, handle: &HypervisorHandle) -> bool {
        let HypervisorHandle::Qemu(handle) = handle else {
            return false;
        };
        if !orphans::take_hand_over_mark(&handle.dir) {
            return false; // adopted, or gone
        }
        // It waits (briefly) for the process to exit: not on the async runtime's threads.
        let dir = handle.dir.clone();
        let _ = tokio::task::spawn_blocking(move || orphans::reap_dir(&dir)).await;
        true
    }

    fn awaiting_adoption(&self, handle: &HypervisorHandle) -> bool {
        let HypervisorHandle::Qemu(handle) = handle else {
            return false;
        };
        orphans::hand_over_marked(&handle.dir)
    }

    async fn adopt(&self, handle: HypervisorHandle) -> Result<Box<dyn Hypervisor>> {
        match handle {
            HypervisorHandle::Qemu(handle) => Ok(Box::new(Qemu::adopt(handle).await?)),
            other => Err(HypervisorError::ForeignHandle {
                found: other.backend(),
                expected: self.name(),
            }),
        }
    }
}

/// A QEMU process running one VM.
#[derive(Debug)]
pub struct Qemu {
    id: String,
    pid: u32,
    paths: VmPaths,
    accel: ResolvedAccel,
    /// `Some(status)` once the process has exited.
    exit: watch::Receiver<Option<String>>,
    qmp: Mutex<Option<Qmp>>,
    /// Set once `stop` has finished: nothing left to clean up.
    stopped: bool,
    /// False once handed over: dropping the handle then leaves the VM alone.
    owned: bool,
    /// The process's pidfd, opened before anything could reap it: signals reach this
    /// process and no other (no pid reuse race), and it turns readable when the process
    /// has exited.
    pidfd: std::os::fd::OwnedFd,
    /// Keeps the guest console log bounded while this handle owns the VM.
    console_bound: ConsoleBound,
    /// True when the command line reserved disk hot-plug ports (q35).
    disk_ports: bool,
    /// Serializes disk attaches: choosing a free port and plugging into it is one step.
    disk_lock: Mutex<()>,
}

impl Qemu {
    /// The accelerator this VM runs with.
    pub fn accel(&self) -> ResolvedAccel {
        self.accel
    }

    /// The files of this VM.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Runs a QMP command (connecting QMP first if needed).
    pub async fn qmp(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut guard = self.qmp.lock().await;
        let qmp = match guard.as_mut() {
            Some(qmp) => qmp,
            None => guard.insert(Qmp::connect(&self.paths.qmp).await?),
        };
        let result = qmp.execute(command, arguments).await;
        if result.is_err() && !self.is_running() {
            *guard = None;
            return Err(self.exited().await);
        }
        result
    }

    /// A QMP query of something this VM may lack: `None` when QEMU's error contains
    /// `absent` (its message for "not here"), any other error as it is.
    pub(crate) async fn qmp_if_present(
        &self,
        command: &str,
        absent: &str,
    ) -> Result<Option<Value>> {
        match self.qmp(command, None).await {
            Ok(reply) => Ok(Some(reply)),
            Err(HypervisorError::Qmp { message, .. }) if message.contains(absent) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn vm_dir(&self) -> &Path {
        &self.paths.dir
    }

    fn channels(&self) -> GuestChannels {
        GuestChannels {
            agent_socket: self.paths.agent.clone(),
            console_log: Some(self.paths.console.clone()),
        }
    }

    fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    fn failure_report(&self) -> String {
        failure_report(&self.paths)
    }

    async fn exited(&self) -> HypervisorError {
        let mut exit = self.exit.clone();
        let status = match exit.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or_default(),
            Err(_) => "unknown status".to_string(),
        };
        HypervisorError::Exited {
            status,
            when: if self.stopped {
                "after stop"
            } else {
                "unexpectedly"
            },
            report: failure_report(&self.paths),
        }
    }

    async fn pause(&self) -> Result<()> {
        self.qmp("stop", None).await.map(drop)
    }

    async fn resume(&self) -> Result<()> {
        self.qmp("cont", None).await.map(drop)
    }

    async fn save_state(&self, path: &Path) -> Result<()> {
        self.save_device_state(path).await
    }

    async fn vm_generation_id(&self) -> Result<Option<String>> {
        // A VM without the device (booted with qboot) has no generation ID.
        let Some(reply) = self
            .qmp_if_present(
                "query-vm-generation-id",
                "VM Generation ID device not found",
            )
            .await?
        else {
            return Ok(None);
        };
        let guid = reply
            .get("guid")
            .and_then(serde_json::Value::as_str)
            .filter(|guid| {
                guid.len() == 36 && guid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            })
            .ok_or_else(|| HypervisorError::Qmp {
                command: "query-vm-generation-id".into(),
                message: format!("unexpected reply {reply}"),
            })?;
        Ok(Some(guid.to_ascii_lowercase()))
    }

    async fn translation_stats(&self) -> Result<Option<crate::TranslationStats>> {
        self.query_jit().await
    }

    async fn add_vcpus(&self, count: u32) -> Result<u32> {
        self.plug_vcpus(count).await
    }

    async fn add_memory(&self, mib: u32) -> Result<()> {
        self.plug_memory(mib).await
    }

    async fn attach_disk(&self, disk: &DiskSpec) -> Result<AttachedDisk> {
        self.plug_disk(disk, self.disk_ports).await
    }

    async fn detach_disk(&self, id: &str) -> Result<()> {
        self.unplug_disk(id).await
    }

    async fn disk_leftovers(&self) -> Result<Vec<String>> {
        self.disk_names().await
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if self.is_running() {
            let quit = tokio::time::timeout(Duration::from_secs(1), self.qmp("quit", None));
            if let Ok(Err(err)) = quit.await {
                debug!(%err, "QMP quit failed; killing QEMU");
            }
            if !self.wait_exit(Duration::from_secs(3)).await {
                warn!(pid = self.pid, "QEMU did not quit; killing it");
                self.kill();
                if !self.wait_exit(Duration::from_secs(5)).await {
                    return Err(HypervisorError::Timeout {
                        what: format!("waiting for QEMU (pid {}) to die", self.pid),
                        seconds: 8.0,
                    });
                }
            }
        }
        *self.qmp.get_mut() = None;
        self.remove_dir()?;
        self.stopped = true;
        Ok(())
    }

    async fn discard(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        // SIGKILL ends QEMU at once (no QMP round trip, no device shutdown); wait only
        // for the kernel to tear the process down, so nothing of it outlives the call.
        self.kill();
        if !self.wait_exit(Duration::from_secs(5)).await {
            warn!(pid = self.pid, "QEMU did not die within 5 s of SIGKILL");
        }
        *self.qmp.get_mut() = None;
        self.stopped = true;
        self.remove_dir()
    }

    fn hand_over(mut self: Box<Self>) -> Result<HypervisorHandle> {
        if !self.is_running() {
            return Err(HypervisorError::Exited {
                status: "gone".into(),
                when: "before hand-over",
                report: failure_report(&self.paths),
            });
        }
        // The adopter takes this mark, or the giver takes it back: whoever is first.
        orphans::set_hand_over_mark(&self.paths.dir)?;
        // Close our QMP session so the new owner can open its own.
        *self.qmp.get_mut() = None;
        self.owned = false;
        self.console_bound.stop();
        Ok(HypervisorHandle::Qemu(QemuHandle {
            id: self.id.clone(),
            pid: self.pid,
            dir: self.paths.dir.clone(),
            accel: self.accel,
        }))
    }
}

/// The longest a dropped handle waits for its killed QEMU to exit (it only waits longer
/// than a moment when the process is stuck in the kernel).
const DROP_DEATH_WAIT: Duration = Duration::from_secs(5);

impl Drop for Qemu {
    fn drop(&mut self) {
        if !self.stopped && self.owned {
            // Never leak a VM: a handle dropped without `stop` takes its VM down with it.
            self.kill();
            // A killed process takes a moment to go: its guest memory is unmapped after
            // /proc stops showing its command line. Its owner may exit right after the
            // drop (`run` refusing an image while the VM starts, a signal during template
            // creation), and nothing may outlive it: wait until it has exited.
            process::wait_pidfd(&self.pidfd, DROP_DEATH_WAIT);
            let _ = self.remove_dir();
        }
    }
}
