//! PID 1 duties: mount the pseudo file systems, load kernel modules, supervise the server.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

/// Directory of the modules in the initramfs and the file that lists their load order.
const MODULES_DIR: &str = "/lib/modules";

/// Mounts `/proc`, `/sys`, `/dev`, `/dev/pts`, `/tmp`, `/run` and loads the kernel modules.
pub fn prepare_system() {
    let mounts: [(&str, &str, &str, libc::c_ulong); 6] = [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
        // Pseudo-terminals of terminal processes (/dev/ptmx finds its instance here).
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
        ),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ];
    for (source, target, fstype, flags) in mounts {
        if let Err(err) = mount(source, target, fstype, flags) {
            warn!(target, %err, "Mount failed");
        }
    }
    protect_from_oom();
    std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    std::env::set_var("HOME", "/root");
    load_modules(Path::new(MODULES_DIR));
}

/// `oom_score_adj` of PID 1 and the agent server: the guest's OOM killer never picks
/// them (the server inherits it across `fork`; processes it starts for users are reset to
/// 0 before `exec`, see `process::lead_own_session`).
pub const AGENT_OOM_SCORE_ADJ: &str = "-1000";

/// Exempts this process (and the children it forks) from the guest's OOM killer.
pub fn protect_from_oom() {
    if let Err(err) = std::fs::write("/proc/self/oom_score_adj", AGENT_OOM_SCORE_ADJ) {
        warn!(%err, "Cannot exempt the agent from the OOM killer");
    }
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|_| std::io::ErrorKind::InvalidInput);
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(()); // already mounted
    }
    Err(err)
}

/// Loads the modules named in `<dir>/load-order`, one file name per line, in order.
fn load_modules(dir: &Path) {
    let order = match std::fs::read_to_string(dir.join("load-order")) {
        Ok(order) => order,
        Err(err) => {
            warn!(%err, "No module load order; assuming a kernel with built-in drivers");
            return;
        }
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        match finit_module(&path) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => error!(module = name, %err, "Cannot load kernel module"),
        }
    }
}

fn finit_module(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = c"";
    // SAFETY: finit_module reads the module from a valid open fd; params is a valid empty
    // C string; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Forks the agent server. The parent (PID 1) never returns: it reaps every child and
/// restarts the server when it dies. The child returns and runs the server.
pub fn supervise() {
    let mut last_start: Option<Instant> = None;
    loop {
        // Back off when the server keeps dying right after start.
        if let Some(started) = last_start {
            if started.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        last_start = Some(Instant::now());
        // SAFETY: PID 1 is single-threaded at this point (no runtime has been started in
        // this process), so the child may keep running arbitrary Rust code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            return;
        }
        if pid < 0 {
            error!(err = %std::io::Error::last_os_error(), "Cannot fork the agent server");
            continue;
        }
        info!(pid, "Agent server started");
        reap_until_exit(pid);
        error!(pid, "Agent server exited; restarting it");
    }
}

/// Reaps children until `server` itself has exited.
fn reap_until_exit(server: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local status integer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == server {
            return;
        }
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ECHILD) {
                return;
            }
        }
    }
}
