//! The container's init: the agent binary re-executed as PID 1 of a new PID namespace
//! (`vmfactory-agent __vmfactory_container_init …`). Single-threaded, so it may enter new
//! mount, UTS and IPC namespaces. It builds the container's root on the overlay the agent
//! mounted, `pivot_root`s into it, reports on its status pipe, waits for StartContainer,
//! then `exec`s the container's program, or stays as a pause process that reaps.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::sys::{check, cpath, cstr, mount};

/// First argument that makes the agent binary a container init.
pub const INIT_ARG: &str = "__vmfactory_container_init";

/// What the agent tells its container init on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitArgs {
    /// The overlay root, in the agent's mount namespace.
    pub rootfs: PathBuf,
    /// An empty directory next to it, for the pivot.
    pub pivot: PathBuf,
    /// Host name.
    pub hostname: String,
    /// Descriptor the init reports "OK" or an error on.
    pub status_fd: i32,
    /// Descriptor StartContainer writes one byte to.
    pub start_fd: i32,
    /// User and group ids.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The program; empty: pause.
    pub argv: Vec<String>,
}

impl InitArgs {
    /// The arguments after the binary.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            INIT_ARG.to_string(),
            self.rootfs.to_string_lossy().into_owned(),
            self.pivot.to_string_lossy().into_owned(),
            self.hostname.clone(),
            self.status_fd.to_string(),
            self.start_fd.to_string(),
            self.uid.to_string(),
            self.gid.to_string(),
            self.groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.cwd.clone(),
            "--".to_string(),
        ];
        args.extend(self.argv.iter().cloned());
        args
    }

    /// Parses what [`InitArgs::to_args`] wrote (after the binary).
    pub fn parse(args: &[String]) -> Option<Self> {
        if args.len() < 11 || args[0] != INIT_ARG || args[10] != "--" {
            return None;
        }
        let groups = if args[8].is_empty() {
            Vec::new()
        } else {
            args[8]
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?
        };
        Some(Self {
            rootfs: PathBuf::from(&args[1]),
            pivot: PathBuf::from(&args[2]),
            hostname: args[3].clone(),
            status_fd: args[4].parse().ok()?,
            start_fd: args[5].parse().ok()?,
            uid: args[6].parse().ok()?,
            gid: args[7].parse().ok()?,
            groups,
            cwd: args[9].clone(),
            argv: args[11..].to_vec(),
        })
    }
}

/// Runs the container init; never returns.
pub fn run(args: &[String]) -> ! {
    let Some(init) = InitArgs::parse(args) else {
        eprintln!("container init: bad arguments");
        std::process::exit(2);
    };
    // SAFETY: the agent passed this descriptor open to this process alone.
    let status_fd = unsafe { OwnedFd::from_raw_fd(init.status_fd) };
    // SAFETY: as above.
    let start_fd = unsafe { OwnedFd::from_raw_fd(init.start_fd) };
    let mut status = std::fs::File::from(status_fd);
    let mut start = std::fs::File::from(start_fd);
    if let Err(err) = setup(&init) {
        let _ = write!(status, "{err}");
        std::process::exit(1);
    }
    let _ = status.write_all(b"OK");
    drop(status);
    let mut byte = [0u8; 1];
    match start.read(&mut byte) {
        Ok(1) => {}
        // The container was removed before it started.
        _ => std::process::exit(1),
    }
    drop(start);
    if init.argv.is_empty() {
        pause();
    }
    let err = std::process::Command::new(&init.argv[0])
        .args(&init.argv[1..])
        .exec();
    eprintln!("Cannot start {:?} in the container: {err}", init.argv[0]);
    std::process::exit(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    });
}

fn mknod(path: &Path, major: u32, minor: u32) -> std::io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: a valid path; mode and device numbers are plain integers.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    check(rc, &format!("mknod {}", path.display()))?;
    // The umask took bits away.
    let c = cpath(path)?;
    // SAFETY: as above.
    check(unsafe { libc::chmod(c.as_ptr(), 0o666) }, "chmod")
}

/// Namespaces, mounts, pivot_root, host name, user: everything before the program.
fn setup(init: &InitArgs) -> std::io::Result<()> {
    // SAFETY: unshare with namespace flags; this process is single-threaded.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC) };
    check(rc, "unshare")?;
    mount(
        "none",
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let host = cstr(&init.hostname)?;
    // SAFETY: a valid buffer of the given length.
    let rc = unsafe { libc::sethostname(host.as_ptr(), init.hostname.len()) };
    check(rc, "sethostname")?;
    let root = &init.rootfs;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &root.join("proc"), Some("proc"), nosuid, None)?;
    mount(
        "sysfs",
        &root.join("sys"),
        Some("sysfs"),
        nosuid | libc::MS_RDONLY,
        None,
    )?;
    let dev = root.join("dev");
    mount(
        "tmpfs",
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknod(&dev.join(name), major, minor)?;
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(dev.join(dir))?;
    }
    mount(
        "devpts",
        &dev.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount(
        "shm",
        &dev.join("shm"),
        Some("tmpfs"),
        nosuid,
        Some("mode=1777,size=64m"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    mount(
        "tmpfs",
        &root.join("tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    // pivot_root refuses a root on the initramfs (it has no parent mount): move a
    // small tmpfs holding a bind of the new root over "/" first, then pivot into the bind
    // and drop the old root, initramfs included, from view.
    let pivot = &init.pivot;
    mount("tmpfs", pivot, Some("tmpfs"), nosuid, Some("size=64k"))?;
    let inner = pivot.join("root");
    std::fs::create_dir(&inner)?;
    mount(
        &root.to_string_lossy(),
        &inner,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    std::env::set_current_dir(pivot)?;
    mount(".", Path::new("/"), None, libc::MS_MOVE, None)?;
    let dot = cstr(".")?;
    // SAFETY: valid path strings.
    check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot")?;
    std::env::set_current_dir("/root")?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; valid strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(if rc < 0 { -1 } else { 0 }, "pivot_root")?;
    super::sys::umount(Path::new("."), libc::MNT_DETACH)?;
    std::env::set_current_dir("/")?;
    // The image's working directory, made when the image lacks it, as Docker makes it
    // (owned by root, 0755). Inside the container's root already: its links lead nowhere
    // else.
    if !init.cwd.is_empty() && !Path::new(&init.cwd).exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&init.cwd)
            .map_err(|err| {
                std::io::Error::new(err.kind(), format!("workdir {:?}: {err}", init.cwd))
            })?;
    }
    std::env::set_current_dir(if init.cwd.is_empty() { "/" } else { &init.cwd })
        .map_err(|err| std::io::Error::new(err.kind(), format!("workdir {:?}: {err}", init.cwd)))?;
    // SAFETY: the capability limit and plain id calls; `groups` outlives the call.
    unsafe {
        super::sys::limit_capabilities()?;
        check(
            libc::setgroups(init.groups.len(), init.groups.as_ptr()),
            "setgroups",
        )?;
        check(libc::setgid(init.gid), "setgid")?;
        check(libc::setuid(init.uid), "setuid")?;
    }
    Ok(())
}

/// A pause process: PID 1 that reaps orphans and exits on SIGTERM, SIGINT or SIGHUP.
fn pause() -> ! {
    // SAFETY: signal set manipulation on a local set; waitpid/sigwaitinfo with valid args.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        // Blocked signals are queued for PID 1 of a namespace even without handlers.
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            let signal = libc::sigwaitinfo(&set, std::ptr::null_mut());
            if matches!(signal, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) {
                std::process::exit(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let init = InitArgs {
            rootfs: "/run/c/a/rootfs".into(),
            pivot: "/run/c/a/pivot".into(),
            hostname: "h".into(),
            status_fd: 5,
            start_fd: 6,
            uid: 1000,
            gid: 100,
            groups: vec![29, 55],
            cwd: "/".into(),
            argv: vec!["sh".into(), "-c".into(), "--".into()],
        };
        let args = init.to_args();
        assert_eq!(InitArgs::parse(&args), Some(init.clone()));
        let pause = InitArgs {
            argv: vec![],
            groups: vec![],
            ..init
        };
        assert_eq!(InitArgs::parse(&pause.to_args()), Some(pause));
        assert_eq!(InitArgs::parse(&args[..5]), None);
    }
}
