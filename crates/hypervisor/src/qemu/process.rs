//! The QEMU process: spawning it (to boot, or to wait for a saved state), taking over one
//! another process started, and killing it.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};
use tracing::{debug, info};

use super::accel::{self, HostProbe, ResolvedAccel};
use super::cmdline::{self, StartMode, VmPaths, STATE_FD};
use super::config::{resolve_binary, QemuConfig};
use super::console::ConsoleBound;
use super::qmp::Qmp;
use super::{Qemu, QemuHandle};
use crate::{Hypervisor, HypervisorError, Result, VmSpec};

/// glibc's limit on malloc arenas, which vmfactory sets to 1 for QEMU under TCG.
pub const MALLOC_ARENAS_VAR: &str = "MALLOC_ARENA_MAX";

impl Qemu {
    /// Spawns QEMU for `spec` and waits until its QMP socket answers.
    pub async fn start(config: &QemuConfig, spec: &VmSpec) -> Result<Self> {
        Self::spawn(config, spec, StartMode::Boot, None).await
    }

    /// Spawns QEMU paused and waiting for a device state (`-incoming defer -S`; vmfactory's
    /// QEMU `-incoming fd:3 -S`, see [`QemuConfig::vmfactory_build`]), with the
    /// state file `state` open as fd 3, and loads it.
    pub async fn start_incoming(config: &QemuConfig, spec: &VmSpec, state: &Path) -> Result<Self> {
        let file = std::fs::File::open(state).map_err(|source| HypervisorError::Io {
            action: "Cannot open the saved device state",
            path: state.to_path_buf(),
            source,
        })?;
        let mut qemu = Self::spawn(config, spec, StartMode::Incoming, Some(file)).await?;
        if let Err(err) = qemu.load_device_state(config.vmfactory_build).await {
            let _ = qemu.stop().await;
            return Err(err);
        }
        Ok(qemu)
    }

    /// Kata's clone sequence, kept as a benchmark baseline (`bench clone`): spawns QEMU
    /// with the VM's whole command line (kernel, initrd and kernel parameters, which our
    /// own clones leave out) and `-incoming defer -S`, then QMP `migrate-incoming exec:cat
    /// STATE` and polls `query-migrate` every 100 ms until it completed, as Kata's
    /// `bootFromTemplate` and `waitMigration` do. The VM stays paused.
    pub async fn start_incoming_kata_method(
        config: &QemuConfig,
        spec: &VmSpec,
        state: &Path,
    ) -> Result<Self> {
        let mut qemu = Self::spawn(config, spec, StartMode::IncomingKata, None).await?;
        if let Err(err) = qemu.load_device_state_kata_method(state).await {
            let _ = qemu.stop().await;
            return Err(err);
        }
        Ok(qemu)
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

        super::config::ensure_runtime_dir(&config.runtime_dir)?;
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
        // The owner is recorded before QEMU exists: were we killed between the spawn and a
        // later claim, the VM would have no owner file, count as "being started" and never
        // be reaped.
        super::orphans::claim(&dir);
        debug!(binary = %binary.display(), ?args, "Starting QEMU");
        let mut command = tokio::process::Command::new(&binary);
        if let Some(dir) = &config.library_dir {
            command.env(
                super::libstub::LIBRARY_PATH_VAR,
                super::libstub::library_path(dir),
            );
        }
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
        let arenas_chosen = std::env::var_os(MALLOC_ARENAS_VAR).is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
        if accel == ResolvedAccel::Tcg && !arenas_chosen {
            // glibc gives each QEMU thread that allocates (main loop, vCPU, RCU, workers)
            // its own malloc arena, each with its own free and padded memory. One arena:
            // an idle clone costs 0.2-0.5 MiB less (`bench density -n 10`, interleaved:
            // 20.39, 19.88 MiB against 19.82, 19.65), clone times unchanged (`bench
            // clone`: 106, 119, 117 ms against 106, 106, 104). A value the user set
            // (or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`) stays.
            command.env(MALLOC_ARENAS_VAR, "1");
        }
        if accel == ResolvedAccel::Tcg {
            // QEMU madvises its TCG code buffer (and guest RAM) for transparent huge pages:
            // a clone that translated a few MiB of code then held a whole 2 MiB page in
            // each region it touched, 10 MiB in all. Without them an idle clone costs about
            // 2 MiB less (`bench density`), its times unchanged. Under KVM the guest RAM
            // wants huge pages (nested paging), so they stay.
            // A hint: a kernel or sandbox that refuses it leaves QEMU as it was.
            // SAFETY: prctl is async-signal-safe; it changes only this (child) process,
            // and execve keeps the setting.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                    Ok(())
                });
            }
        }
        if config.die_with_parent {
            let parent = i32::try_from(std::process::id()).unwrap_or(0);
            // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before the prctl: then nobody owns us.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other(
                            "vmfactory exited while starting QEMU",
                        ));
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
        // Opened before the wait below can reap the child, so the pidfd is this process's.
        let pidfd = match open_pidfd(pid) {
            Ok(pidfd) => pidfd,
            Err(err) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(cleanup_dir(HypervisorError::InvalidConfig(format!(
                    "Cannot watch the QEMU process (pidfd_open: {err}); vmfactory needs Linux 5.3 or later"
                ))));
            }
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("unknown status: {err}"),
            };
            let _ = exit_tx.send(Some(status));
        });
        let console_bound = ConsoleBound::start(paths.console.clone(), exit_rx.clone());
        let mut qemu = Qemu {
            id: spec.id.clone(),
            pid,
            paths,
            accel,
            console_bound,
            exit: exit_rx,
            qmp: Mutex::new(None),
            stopped: false,
            owned: true,
            pidfd,
            disk_ports: config.machine_type == "q35",
            disk_lock: Mutex::new(()),
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

    pub(super) async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut exit = self.exit.clone();
        let exited = tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .is_ok();
        exited
    }

    /// Takes over a QEMU another process started and handed over (see
    /// [`Hypervisor::hand_over`]). Its exit is watched through a pidfd.
    pub async fn adopt(handle: QemuHandle) -> Result<Self> {
        let paths = VmPaths::new(&handle.dir)?;
        let gone = |why: &str| {
            HypervisorError::InvalidConfig(format!(
                "Cannot take over VM {} (pid {}): {why}",
                handle.id, handle.pid
            ))
        };
        let pidfd = open_pidfd(handle.pid)
            .map_err(|err| gone(&format!("the process is gone (pidfd_open: {err})")))?;
        // Looked at once the pidfd is open: the pidfd's process is the one checked, not
        // one that reused the pid in between.
        let cmdline = process_cmdline(handle.pid).ok_or_else(|| gone("the process is gone"))?;
        if !super::cmdline::cmdline_names(&cmdline, &paths.qmp) {
            return Err(gone("the process is not that VM's QEMU"));
        }
        let watched = pidfd.try_clone().map_err(|err| gone(&err.to_string()))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        // SAFETY: the cloned pidfd is open and owned by the AsyncFd for its lifetime.
        let exit_fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE)
        }
        .map_err(|err| gone(&std::io::Error::from(err).to_string()))?;
        // Claimed as the mark is taken (a reaper takes a VM without a mark whose recorded
        // owner is gone for an orphan).
        if !super::orphans::adopt_hand_over(&paths.dir) {
            return Err(gone(
                "it was not handed over, or another process took it first (its giver stops a VM nobody adopts in time)",
            ));
        }
        tokio::spawn(async move {
            // A pidfd becomes readable when the process exits.
            let _ = exit_fd.readable().await;
            let _ = exit_tx.send(Some(ADOPTED_EXIT_STATUS.to_string()));
        });
        let console_bound = ConsoleBound::start(paths.console.clone(), exit_rx.clone());
        Ok(Self {
            id: handle.id,
            pid: handle.pid,
            paths,
            accel: handle.accel,
            console_bound,
            exit: exit_rx,
            qmp: Mutex::new(None),
            stopped: false,
            owned: true,
            pidfd,
            disk_ports: cmdline.contains(&format!("id={}0,", super::cmdline::HOTPLUG_PORT_PREFIX)),
            disk_lock: Mutex::new(()),
        })
    }

    pub(super) fn kill(&self) {
        if self.is_running() {
            // Through the pidfd: it names this process, never one that reused its pid.
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        }
    }

    pub(super) fn remove_dir(&self) -> Result<()> {
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

/// The exit status reported for an adopted QEMU: not our child, so its real status cannot
/// be read.
pub const ADOPTED_EXIT_STATUS: &str = "exited (adopted process)";

/// A pidfd for `pid`.
pub(super) fn open_pidfd(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("bad pid {pid}")))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Waits, at most `timeout`, until the process of `pidfd` has exited (its pidfd turns
/// readable then). Blocking: for a drop, where nothing can be awaited.
pub(super) fn wait_pidfd(pidfd: &std::os::fd::OwnedFd, timeout: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let wait = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        match poll(&mut fds, Some(&wait)) {
            Err(rustix::io::Errno::INTR) => continue,
            _ => return,
        }
    }
}

/// The command line of process `pid`, its arguments joined by spaces; `None` when no
/// such process runs (or it has none, as a zombie).
pub fn process_cmdline(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (!cmdline.is_empty()).then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
}

/// QEMU processes on this host whose command line mentions `dir` (a runtime or VM
/// directory): pids and command lines. Finds vmfactory's VMs without their handles.
pub fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = process_cmdline(pid)?;
            (cmdline.contains("qemu-system") && super::cmdline::cmdline_names(&cmdline, dir))
                .then_some((pid, cmdline))
        })
        .collect()
}
