//! The QEMU backend: one `qemu-system-x86_64` process per VM, driven over QMP, with the
//! guest agent's virtio-serial port exposed as a Unix socket in the VM directory.

pub mod accel;
pub mod cmdline;
pub mod qmp;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use self::accel::{Accelerator, HostProbe, ResolvedAccel};
use self::cmdline::{StartMode, VmPaths, AGENT_PORT_ID, STATE_FD};
use self::qmp::Qmp;
use crate::{Hypervisor, HypervisorError, Result, VmSpec};

/// Lines of QEMU's stderr and of the console quoted when QEMU dies.
const REPORT_LINES: usize = 15;

/// Settings of the QEMU backend shared by all VMs of a factory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuConfig {
    /// QEMU binary: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    /// Machine type (`q35` or `pc`).
    pub machine_type: String,
    /// Accelerator choice.
    pub accelerator: Accelerator,
    /// The guest kernel is built with `CONFIG_PVM_GUEST` (runs on kvm_pvm).
    pub kernel_is_pvm: bool,
    /// TCG translation buffer size, MiB (bounds QEMU's memory per VM under TCG).
    pub tb_size_mib: Option<u32>,
    /// Directory holding one sub-directory per VM.
    pub runtime_dir: PathBuf,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
    /// Firmware image (`-bios`); `None` keeps QEMU's default (SeaBIOS).
    pub firmware: Option<PathBuf>,
}

/// QEMU's minimal firmware: boots Linux straight from fw_cfg, faster than SeaBIOS.
pub const QBOOT_PATH: &str = "/usr/share/qemu/qboot.rom";

/// qboot when QEMU ships it, else QEMU's default firmware.
pub fn default_firmware() -> Option<PathBuf> {
    let qboot = Path::new(QBOOT_PATH);
    qboot.is_file().then(|| qboot.to_path_buf())
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            machine_type: "q35".into(),
            accelerator: Accelerator::Auto,
            kernel_is_pvm: false,
            tb_size_mib: None,
            runtime_dir: default_runtime_dir(),
            start_timeout: Duration::from_secs(30),
            firmware: default_firmware(),
        }
    }
}

/// `$VMFACTORY_RUNTIME_DIR`, else `/run/vmfactory` for root, else
/// `$XDG_RUNTIME_DIR/vmfactory`, else `/tmp/vmfactory-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMFACTORY_RUNTIME_DIR") {
        return dir.into();
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return "/run/vmfactory".into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("vmfactory");
    }
    format!("/tmp/vmfactory-{uid}").into()
}

/// Finds the QEMU binary: a path is checked, a bare name is searched in `PATH`.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf> {
    let missing = || HypervisorError::MissingFile {
        what: "QEMU binary",
        path: binary.to_path_buf(),
        hint: "install it with `apt-get install qemu-system-x86` or set the QEMU path",
    };
    if binary.components().count() > 1 {
        return if binary.is_file() {
            Ok(binary.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(missing)
}

/// The first line of `<binary> --version`, e.g. `QEMU emulator version 7.2.22 (Debian …)`.
pub fn qemu_version(binary: &Path) -> Result<String> {
    let binary = resolve_binary(binary)?;
    let output = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|source| HypervisorError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|line| line.trim().to_string())
        .filter(|line| output.status.success() && !line.is_empty())
        .ok_or_else(|| {
            HypervisorError::InvalidConfig(format!(
                "{} --version printed no version: is it a QEMU binary?",
                binary.display()
            ))
        })
}

/// A new random VM id (16 hex digits).
pub fn new_vm_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The last `n` lines of a file, or an empty string.
fn tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What QEMU and the guest said last: quoted in errors when QEMU dies.
pub fn failure_report(paths: &VmPaths) -> String {
    let mut report = String::new();
    for (label, path) in [
        ("QEMU stderr", &paths.stderr),
        ("guest console", &paths.console),
    ] {
        let text = tail(path, REPORT_LINES);
        if !text.is_empty() {
            report.push_str(&format!("\n--- last lines of {label} ---\n{text}"));
        }
    }
    report
}

/// What another process needs to take over a running QEMU (sent as JSON in
/// `GrpcVM.hypervisor`).
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
    /// For an adopted QEMU (not our child): a pidfd to signal it without pid reuse races.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// Console length when the agent connection was last handed over.
    console_mark: std::sync::Mutex<u64>,
}

impl Qemu {
    /// Spawns QEMU for `spec` and waits until its QMP socket answers.
    pub async fn start(config: &QemuConfig, spec: &VmSpec) -> Result<Self> {
        Self::spawn(config, spec, StartMode::Boot, None).await
    }

    /// Spawns QEMU paused and waiting for a device state (`-incoming defer -S`), with the
    /// state file `state` open as fd 3; [`Qemu::load_state`] loads it.
    pub async fn start_incoming(config: &QemuConfig, spec: &VmSpec, state: &Path) -> Result<Self> {
        let file = std::fs::File::open(state).map_err(|source| HypervisorError::Io {
            action: "Cannot open the template state",
            path: state.to_path_buf(),
            source,
        })?;
        Self::spawn(config, spec, StartMode::Incoming, Some(file)).await
    }

    async fn spawn(
        config: &QemuConfig,
        spec: &VmSpec,
        mode: StartMode,
        state: Option<std::fs::File>,
    ) -> Result<Self> {
        spec.validate()?;
        let binary = resolve_binary(&config.binary)?;
        let (accel, reason) = accel::choose(
            config.accelerator,
            HostProbe::detect(),
            config.kernel_is_pvm,
        )?;
        log_accel_once(accel, reason);

        let dir = config.runtime_dir.join("vm").join(&spec.id);
        let paths = VmPaths::new(&dir)?;
        let args = cmdline::build_args(config, spec, accel, &paths, mode)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| HypervisorError::Io {
                action: "Cannot create the VM directory",
                path: dir.clone(),
                source,
            })?;
        let cleanup_dir = |err: HypervisorError| {
            let _ = std::fs::remove_dir_all(&dir);
            err
        };
        let stderr = std::fs::File::create(&paths.stderr)
            .map_err(|source| HypervisorError::Io {
                action: "Cannot create",
                path: paths.stderr.clone(),
                source,
            })
            .map_err(cleanup_dir)?;
        debug!(binary = %binary.display(), ?args, "Starting QEMU");
        let mut command = tokio::process::Command::new(&binary);
        if let Some(state) = &state {
            let fd = std::os::fd::AsRawFd::as_raw_fd(state);
            // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec; `state`
            // outlives the spawn, so `fd` is open in the child.
            unsafe {
                command.pre_exec(move || {
                    if fd == STATE_FD {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(fd, STATE_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a Ctrl-C at the terminal reaches us, not QEMU; we stop
            // the VM ourselves, and VMs handed to clients outlive their creator.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| HypervisorError::Spawn {
                binary: binary.clone(),
                source,
            })
            .map_err(cleanup_dir)?;
        // The child holds its own copy of the state fd now.
        drop(state);
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("unknown status: {err}"),
            };
            let _ = exit_tx.send(Some(status));
        });
        let mut qemu = Qemu {
            id: spec.id.clone(),
            pid,
            paths,
            accel,
            exit: exit_rx,
            qmp: Mutex::new(None),
            stopped: false,
            owned: true,
            pidfd: None,
            console_mark: std::sync::Mutex::new(0),
        };
        match qemu.connect_qmp(config.start_timeout).await {
            Ok(qmp) => {
                *qemu.qmp.get_mut() = Some(qmp);
                Ok(qemu)
            }
            Err(err) => {
                let _ = qemu.stop().await;
                Err(err)
            }
        }
    }

    /// Connects to QMP as soon as the socket exists, unless QEMU dies first.
    async fn connect_qmp(&self, timeout: Duration) -> Result<Qmp> {
        let started = Instant::now();
        loop {
            if !self.is_running() {
                return Err(self.exited().await);
            }
            if self.paths.qmp.exists() {
                match Qmp::connect(&self.paths.qmp).await {
                    Ok(qmp) => return Ok(qmp),
                    Err(err) => debug!(%err, "QMP not ready yet"),
                }
            }
            if started.elapsed() > timeout {
                return Err(HypervisorError::Timeout {
                    what: "waiting for QEMU's QMP socket".into(),
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The accelerator this VM runs with.
    pub fn accel(&self) -> ResolvedAccel {
        self.accel
    }

    /// The files of this VM.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Runs a QMP command.
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

    /// Waits (up to `timeout`) for QMP event `name` whose data satisfies `matches`.
    pub async fn wait_event(
        &self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let mut guard = self.qmp.lock().await;
        let qmp = match guard.as_mut() {
            Some(qmp) => qmp,
            None => guard.insert(Qmp::connect(&self.paths.qmp).await?),
        };
        let waited = tokio::select! {
            result = tokio::time::timeout(timeout, qmp.wait_event(name, matches)) => result,
            err = self.exited() => return Err(err),
        };
        match waited {
            Ok(result) => result,
            Err(_) => {
                // The wait may have stopped mid-message: start a fresh session next time.
                *guard = None;
                Err(HypervisorError::Timeout {
                    what: format!(
                        "waiting for QMP event {name}{}",
                        failure_report(&self.paths)
                    ),
                    seconds: timeout.as_secs_f64(),
                })
            }
        }
    }

    /// Forgets QMP events received so far.
    pub async fn discard_events(&self) {
        if let Some(qmp) = self.qmp.lock().await.as_mut() {
            qmp.take_events();
        }
    }

    /// Waits until the guest has opened (`open`) or closed the agent's port. QEMU sends at
    /// most one `VSERPORT_CHANGE` per second per port (later ones are delayed and merged),
    /// so only the first change after a quiet second arrives at once.
    pub async fn wait_agent_port(&self, open: bool, timeout: Duration) -> Result<()> {
        let matches = |data: &Value| {
            data.get("id").and_then(Value::as_str) == Some(AGENT_PORT_ID)
                && data.get("open").and_then(Value::as_bool) == Some(open)
        };
        self.wait_event("VSERPORT_CHANGE", matches, timeout)
            .await
            .map(drop)
    }

    async fn set_ignore_shared(&self) -> Result<()> {
        let capabilities = serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        });
        self.qmp("migrate-set-capabilities", Some(capabilities))
            .await
            .map(drop)
    }

    /// Pauses the VM and saves its device state to `path`; guest RAM (a shared memory
    /// file) is skipped with `x-ignore-shared`, so the state holds only device state.
    pub async fn save_state(&self, path: &Path, timeout: Duration) -> Result<()> {
        let quoted = path.to_string_lossy();
        if quoted.contains(['\'', '\n']) {
            return Err(HypervisorError::InvalidConfig(format!(
                "State path {quoted} must not contain quotes or newlines"
            )));
        }
        self.qmp("stop", None).await?;
        self.set_ignore_shared().await?;
        let uri = format!("exec:cat > '{quoted}'");
        self.qmp("migrate", Some(serde_json::json!({ "uri": uri })))
            .await?;
        let started = Instant::now();
        loop {
            let info = self.qmp("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let reason = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(HypervisorError::Qmp {
                        command: "migrate".into(),
                        message: format!("Saving the device state failed: {reason}"),
                    });
                }
                _ => {}
            }
            if started.elapsed() > timeout {
                return Err(HypervisorError::Timeout {
                    what: "saving the device state".into(),
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Loads the device state inherited as fd 3 (see [`Qemu::start_incoming`]); the VM
    /// stays paused afterwards.
    pub async fn load_state(&self, timeout: Duration) -> Result<()> {
        self.set_ignore_shared().await?;
        let uri = format!("fd:{STATE_FD}");
        self.qmp("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await?;
        let started = Instant::now();
        loop {
            let status = self.qmp("query-status", None).await?;
            match status.get("status").and_then(Value::as_str) {
                Some("inmigrate") | None => {}
                Some(_) => return Ok(()),
            }
            if started.elapsed() > timeout {
                return Err(HypervisorError::Timeout {
                    what: "loading the device state".into(),
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut exit = self.exit.clone();
        let exited = tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .is_ok();
        exited
    }

    /// Takes over a QEMU another process started and handed over (see
    /// [`Hypervisor::detach`]). Its exit is watched through a pidfd.
    pub async fn adopt(handle: QemuHandle) -> Result<Self> {
        let paths = VmPaths::new(&handle.dir)?;
        let gone = |why: &str| {
            HypervisorError::InvalidConfig(format!(
                "Cannot take over VM {} (pid {}): {why}",
                handle.id, handle.pid
            ))
        };
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", handle.pid))
            .map_err(|_| gone("the process is gone"))?;
        if !String::from_utf8_lossy(&cmdline).contains(&*paths.qmp.to_string_lossy()) {
            return Err(gone("the process is not that VM's QEMU"));
        }
        let pid = i32::try_from(handle.pid).map_err(|_| gone("bad pid"))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(gone(&format!(
                "pidfd_open failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let pidfd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) };
        let watched = pidfd.try_clone().map_err(|err| gone(&err.to_string()))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        // SAFETY: the cloned pidfd is open and owned by the AsyncFd for its lifetime.
        let exit_fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE)
        }
        .map_err(|err| gone(&std::io::Error::from(err).to_string()))?;
        tokio::spawn(async move {
            // A pidfd becomes readable when the process exits.
            let _ = exit_fd.readable().await;
            let _ = exit_tx.send(Some("exited (adopted process)".to_string()));
        });
        Ok(Self {
            id: handle.id,
            pid: handle.pid,
            paths,
            accel: handle.accel,
            exit: exit_rx,
            qmp: Mutex::new(None),
            stopped: false,
            owned: true,
            pidfd: Some(pidfd),
            console_mark: std::sync::Mutex::new(0),
        })
    }

    fn kill(&self) {
        if let Some(pidfd) = &self.pidfd {
            if self.is_running() {
                // SAFETY: pidfd_send_signal on our pidfd; no pid reuse possible.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        std::os::fd::AsRawFd::as_raw_fd(pidfd),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
            return;
        }
        if self.is_running() {
            if let Ok(pid) = i32::try_from(self.pid) {
                // SAFETY: signals our own child, which has not been reaped yet (the exit
                // watch has not fired), so the pid cannot have been reused.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    fn remove_dir(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.paths.dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HypervisorError::Io {
                action: "Cannot remove the VM directory",
                path: self.paths.dir.clone(),
                source,
            }),
        }
    }
}

fn log_accel_once(accel: ResolvedAccel, reason: &'static str) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| match accel {
        ResolvedAccel::Kvm => info!(accelerator = "kvm", reason, "Accelerator chosen"),
        ResolvedAccel::Tcg => info!(accelerator = "tcg", reason, "Accelerator chosen"),
    });
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

    fn agent_socket(&self) -> PathBuf {
        self.paths.agent.clone()
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

    async fn mark_agent_handover(&self) {
        let length = std::fs::metadata(&self.paths.console).map_or(0, |m| m.len());
        if let Ok(mut mark) = self.console_mark.lock() {
            *mark = length;
        }
    }

    async fn wait_agent_closed(&self, timeout: Duration) -> Result<()> {
        // Not the QMP VSERPORT_CHANGE event: QEMU throttles it to one a second per port
        // and merges the close with the reopen that follows.
        let mark = self.console_mark.lock().map_or(0, |mark| *mark);
        let started = Instant::now();
        loop {
            if console_has_line_after(&self.paths.console, mark, AGENT_DISCONNECT_LINES) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(self.exited().await);
            }
            if started.elapsed() > timeout {
                return Err(HypervisorError::Timeout {
                    what: format!(
                        "waiting for the agent to let go of its port{}",
                        failure_report(&self.paths)
                    ),
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn detach(mut self: Box<Self>) -> Result<serde_json::Value> {
        if !self.is_running() {
            return Err(HypervisorError::Exited {
                status: "gone".into(),
                when: "before hand-over",
                report: failure_report(&self.paths),
            });
        }
        // Close our QMP session so the new owner can open its own.
        *self.qmp.get_mut() = None;
        self.owned = false;
        let handle = QemuHandle {
            id: self.id.clone(),
            pid: self.pid,
            dir: self.paths.dir.clone(),
            accel: self.accel,
        };
        serde_json::to_value(handle).map_err(|err| HypervisorError::InvalidConfig(err.to_string()))
    }

    async fn add_vcpus(&self, count: u32) -> Result<u32> {
        let free = self.free_cpu_slots().await?;
        if free.len() < count as usize {
            return Err(HypervisorError::InvalidConfig(format!(
                "Cannot add {count} vCPUs: only {} free CPU slots (raise default_maxvcpus)",
                free.len()
            )));
        }
        for (index, mut args) in free.into_iter().take(count as usize).enumerate() {
            let id = format!("vcpu-hp-{}-{index}", rand::random::<u32>());
            if let Some(map) = args.as_object_mut() {
                map.insert("id".into(), Value::String(id));
            }
            self.qmp("device_add", Some(args)).await?;
        }
        Ok(count)
    }

    async fn add_memory(&self, mib: u32) -> Result<()> {
        if mib == 0 || mib % MEMORY_BLOCK_MIB != 0 {
            return Err(HypervisorError::InvalidConfig(format!(
                "Hot-plugged memory must be a positive multiple of {MEMORY_BLOCK_MIB} MiB, not {mib} MiB"
            )));
        }
        let id = format!("dimm-{}", rand::random::<u32>());
        let backend = serde_json::json!({
            "qom-type": "memory-backend-ram",
            "id": format!("{id}-mem"),
            "size": u64::from(mib) << 20,
        });
        self.qmp("object-add", Some(backend)).await?;
        let device = serde_json::json!({
            "driver": "pc-dimm",
            "id": id,
            "memdev": format!("{id}-mem"),
        });
        self.qmp("device_add", Some(device)).await.map(drop)
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
}

/// What the agent prints on the console once a host connection has ended and it closed
/// its port.
const AGENT_DISCONNECT_LINES: [&str; 2] = ["Host disconnected", "Host connection ended"];

/// True when the console file holds one of `needles` after byte `offset`.
fn console_has_line_after(console: &Path, offset: u64, needles: [&str; 2]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(console) else {
        return false;
    };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return false;
    }
    let mut text = Vec::new();
    // Bounded: a chatty guest cannot make us read without end.
    if file.take(1 << 20).read_to_end(&mut text).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&text);
    needles.iter().any(|needle| text.contains(needle))
}

/// Linux onlines memory in blocks of 128 MiB: DIMMs are sized in multiples of it.
pub const MEMORY_BLOCK_MIB: u32 = 128;

impl Qemu {
    /// Free CPU slots as `device_add` arguments (driver and topology ids).
    async fn free_cpu_slots(&self) -> Result<Vec<Value>> {
        let slots = self.qmp("query-hotpluggable-cpus", None).await?;
        let Some(slots) = slots.as_array() else {
            return Err(HypervisorError::Qmp {
                command: "query-hotpluggable-cpus".into(),
                message: "Unexpected answer".into(),
            });
        };
        let mut free: Vec<Value> = slots
            .iter()
            .filter(|slot| slot.get("qom-path").is_none())
            .filter_map(|slot| {
                let mut args = slot.get("props")?.as_object()?.clone();
                args.remove("node-id");
                args.insert("driver".into(), slot.get("type")?.clone());
                Some(Value::Object(args))
            })
            .collect();
        // QEMU lists the highest slots first; plug in ascending order.
        free.reverse();
        Ok(free)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if !self.stopped && self.owned {
            // Never leak a VM: a handle dropped without `stop` takes its VM down with it.
            self.kill();
            let _ = self.remove_dir();
        }
    }
}
