//! Thin, checked wrappers over the system calls containers need.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// A path or string as a C string (NUL bytes refused).
pub fn cstr(value: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(value.as_ref().to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a string"))
}

/// A path as a C string.
pub fn cpath(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    cstr(path.as_os_str().as_bytes())
}

/// `Err(errno)` with `what` in the message when `rc` is negative.
pub fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

/// mount(2).
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c_source = cstr(source)?;
    let c_target = cpath(target)?;
    let c_fstype = fstype.map(cstr).transpose()?;
    let c_data = data.map(cstr).transpose()?;
    // SAFETY: valid NUL-terminated strings (or null) that outlive the call.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            c_data
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(
        rc,
        &format!(
            "mount {source} on {} ({})",
            target.display(),
            fstype.unwrap_or("bind/move")
        ),
    )
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let c_target = cpath(target)?;
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c_target.as_ptr(), flags) };
    check(rc, &format!("unmount {}", target.display()))
}

/// Unmounts `target`, lazily if it is busy; a path that is not mounted is fine.
pub fn umount_quietly(target: &Path) -> io::Result<()> {
    match umount(target, 0) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => umount(target, libc::MNT_DETACH),
        Err(err) => Err(err),
    }
}

/// True when `path` is a mount point (its device differs from its parent's, or it is
/// listed in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// The capabilities a container's processes keep: Docker's default set (`CHOWN`,
/// `DAC_OVERRIDE`, `FOWNER`, `FSETID`, `KILL`, `SETGID`, `SETUID`, `SETPCAP`,
/// `NET_BIND_SERVICE`, `NET_RAW`, `SYS_CHROOT`, `MKNOD`, `AUDIT_WRITE`, `SETFCAP`), so
/// root in a container cannot mount, change the VM's clock or network, trace other
/// processes or reach the kernel's administration.
pub const CONTAINER_CAPABILITIES: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Limits the calling process to [`CONTAINER_CAPABILITIES`] from its next `execve` on:
/// every other capability leaves the bounding set, and the inheritable set is emptied
/// (root's inheritable capabilities would pass an exec outside the bounding set). The
/// effective and permitted sets stay until the exec (the caller still changes ids).
/// Only raw system calls on the stack: async-signal-safe, for a child between fork and
/// exec.
pub fn limit_capabilities() -> io::Result<()> {
    for capability in 0..64u64 {
        if CONTAINER_CAPABILITIES & (1 << capability) != 0 {
            continue;
        }
        // EINVAL: beyond the kernel's last capability.
        // SAFETY: prctl with integer arguments only.
        let rc =
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget and capset with a version-3 header and the two data words that
    // version reads and writes, all on this stack.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for word in &mut data {
        word.inheritable = 0;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
