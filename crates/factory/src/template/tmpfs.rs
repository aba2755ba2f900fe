//! The tmpfs a template's memory lives on: mounting it, recognising it, removing a
//! template.

use std::ffi::CString;
use std::path::Path;

use super::metadata::read_metadata;
use super::{io_error, TemplateError};

/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn path_cstring(path: &Path) -> Result<CString, TemplateError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| TemplateError::Io {
        action: "Path contains a NUL byte:",
        path: path.to_path_buf(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })
}

/// True when `path` lies on a tmpfs.
fn is_on_tmpfs(path: &Path) -> Result<bool, TemplateError> {
    let c_path = path_cstring(path)?;
    // SAFETY: statfs is plain old data; the call fills it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io_error("Cannot statfs", path)(
            std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(stat.f_type as i64 == TMPFS_MAGIC)
}

/// Makes sure `path` is a directory on a tmpfs: mounts one (`nosuid,nodev`, `size_mib`)
/// unless the directory already is on tmpfs. Returns whether it mounted.
pub(super) fn prepare_tmpfs(path: &Path, size_mib: u32) -> Result<bool, TemplateError> {
    std::fs::create_dir_all(path).map_err(io_error("Cannot create", path))?;
    if is_on_tmpfs(path)? {
        return Ok(false);
    }
    let target = path_cstring(path)?;
    let options =
        CString::new(format!("size={size_mib}m,mode=0700")).map_err(|_| TemplateError::Io {
            action: "Bad mount options for",
            path: path.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(TemplateError::Mount {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(true)
}

/// Lazily unmounts `path` (clones may still map the memory file; the kernel frees the
/// tmpfs when the last one exits) so no mount stays visible.
pub(super) fn unmount(path: &Path) -> Result<(), TemplateError> {
    let target = path_cstring(path)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(io_error("Cannot unmount", path)(err));
        }
    }
    Ok(())
}

/// Removes the template at `path`: unmounts the tmpfs vmfactory mounted and deletes the
/// directory. Does nothing when there is no template.
pub fn destroy(path: &Path) -> Result<bool, TemplateError> {
    if !path.exists() {
        return Ok(false);
    }
    let metadata = read_metadata(path).ok();
    let mounted = metadata.as_ref().is_some_and(|m| m.mounted_tmpfs)
        || (is_on_tmpfs(path)? && is_mountpoint(path));
    if mounted {
        unmount(path)?;
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error("Cannot remove", path)(err)),
    }
    Ok(metadata.is_some() || mounted)
}

/// True when `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = canonical.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point == target)
}
