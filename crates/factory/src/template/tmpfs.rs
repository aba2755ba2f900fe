//! The tmpfs a template's memory lives on: mounting it, recognising it, and removing a
//! template. vmfactory removes only what it made: when it creates the template directory
//! or mounts the tmpfs, it says so in [`OWNER_MARKER`] inside the directory, and `destroy`
//! undoes exactly that. A directory holding anything else is refused, never emptied.

use std::ffi::CString;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::metadata::read_metadata;
use super::{io_error, TemplateError, MEMORY_FILE, METADATA_FILE, STATE_FILE};
use crate::lock::{LockKind, PathLock};

/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Marker file inside a template directory: what vmfactory made there (JSON).
pub const OWNER_MARKER: &str = ".vmfactory-template";
/// Most nested markers `destroy` follows (a tmpfs over a directory vmfactory made).
const MAX_MARKER_LAYERS: usize = 4;

/// What vmfactory made at a template path, as recorded in [`OWNER_MARKER`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// vmfactory created the directory (so it removes it, once empty).
    pub created_directory: bool,
    /// vmfactory mounted the tmpfs on it (so it unmounts it).
    pub mounted_tmpfs: bool,
}

impl Ownership {
    /// The marker in `dir`, if there is a readable one.
    fn read(dir: &Path) -> Option<Self> {
        let text = std::fs::read(dir.join(OWNER_MARKER)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The marker in `dir` (tests).
    #[cfg(test)]
    pub(super) fn read_for_tests(dir: &Path) -> Option<Self> {
        Self::read(dir)
    }

    fn write(self, dir: &Path) -> Result<(), TemplateError> {
        let file = dir.join(OWNER_MARKER);
        let json = serde_json::to_vec(&self).map_err(|err| TemplateError::Corrupt {
            path: dir.to_path_buf(),
            problem: err.to_string(),
        })?;
        std::fs::write(&file, json).map_err(io_error("Cannot write", &file))
    }
}

/// True when `path` lies on a tmpfs.
fn is_on_tmpfs(path: &Path) -> Result<bool, TemplateError> {
    let stat =
        rustix::fs::statfs(path).map_err(|err| io_error("Cannot statfs", path)(err.into()))?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(stat.f_type as i64 == TMPFS_MAGIC)
}

/// Makes `path` a template directory on a tmpfs that vmfactory may fill: creates it when
/// missing and mounts a tmpfs (`nosuid,nodev`, `size_mib`) unless it already is on one,
/// recording both in [`OWNER_MARKER`]. Refuses a path that is not a directory and a
/// non-empty directory that vmfactory did not make. Returns what vmfactory made.
pub(super) fn prepare_tmpfs(path: &Path, size_mib: u32) -> Result<Ownership, TemplateError> {
    let mut ownership = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(TemplateError::NotADirectory(path.to_path_buf())),
        Ok(_) => match Ownership::read(path) {
            // Left by an earlier creation that did not finish: ours to reuse.
            Some(ownership) => {
                remove_our_files(path, false)?;
                ownership
            }
            None if is_empty_dir(path)? => Ownership::default(),
            None => return Err(TemplateError::NotOurs(path.to_path_buf())),
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(io_error("Cannot create", path))?;
            Ownership {
                created_directory: true,
                mounted_tmpfs: false,
            }
        }
        Err(err) => return Err(io_error("Cannot stat", path)(err)),
    };
    ownership.write(path)?;
    if is_on_tmpfs(path)? {
        // The user's tmpfs: a guest touching memory beyond its room would crash QEMU
        // (SIGBUS) half-way through the boot, so refuse now.
        let free_mib = free_mib(path)?;
        if free_mib < u64::from(size_mib) {
            return Err(TemplateError::NoSpace {
                path: path.to_path_buf(),
                free_mib,
                need_mib: size_mib,
            });
        }
        return Ok(ownership);
    }
    mount_tmpfs(path, size_mib)?;
    ownership.mounted_tmpfs = true;
    if let Err(err) = ownership.write(path) {
        let _ = unmount(path);
        return Err(err);
    }
    Ok(ownership)
}

/// Room left for an unprivileged writer on the file system of `path`, MiB.
fn free_mib(path: &Path) -> Result<u64, TemplateError> {
    let stat =
        rustix::fs::statvfs(path).map_err(|err| io_error("Cannot statvfs", path)(err.into()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize) >> 20)
}

fn is_empty_dir(path: &Path) -> Result<bool, TemplateError> {
    let mut entries = std::fs::read_dir(path).map_err(io_error("Cannot read", path))?;
    Ok(entries.next().is_none())
}

fn mount_tmpfs(path: &Path, size_mib: u32) -> Result<(), TemplateError> {
    let options =
        CString::new(format!("size={size_mib}m,mode=0700")).map_err(|_| TemplateError::Io {
            action: "Bad mount options for",
            path: path.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    use rustix::mount::MountFlags;
    rustix::mount::mount(
        "tmpfs",
        path,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        options.as_c_str(),
    )
    .map_err(|err| TemplateError::Mount {
        path: path.to_path_buf(),
        reason: err.into(),
    })
}

/// Lazily unmounts `path` (clones may still map the memory file; the kernel frees the
/// tmpfs when the last one exits) so no mount stays visible.
pub(super) fn unmount(path: &Path) -> Result<(), TemplateError> {
    match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        // Not a mount point (any more).
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(err) => Err(io_error("Cannot unmount", path)(err.into())),
    }
}

/// Removes the files a template consists of (and the marker, with `marker`); nothing else.
fn remove_our_files(path: &Path, marker: bool) -> Result<(), TemplateError> {
    let names = [METADATA_FILE, STATE_FILE, MEMORY_FILE, OWNER_MARKER];
    for name in &names[..if marker { 4 } else { 3 }] {
        let file = path.join(name);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("Cannot remove", &file)(err)),
        }
    }
    Ok(())
}

/// Undoes what the markers at `path` say vmfactory made: unmounts its tmpfs, removes its
/// files and, if it created the directory and nothing else is left in it, the directory.
/// Returns whether anything was vmfactory's.
pub(super) fn remove_ours(path: &Path) -> Result<bool, TemplateError> {
    let mut found = false;
    for _ in 0..MAX_MARKER_LAYERS {
        let Some(ownership) = Ownership::read(path) else {
            break;
        };
        found = true;
        if ownership.mounted_tmpfs {
            // The directory underneath may hold the marker of the layer below.
            unmount(path)?;
            continue;
        }
        remove_our_files(path, true)?;
        if ownership.created_directory {
            match std::fs::remove_dir(path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    warn!(path = %path.display(), %err, "Leaving the template directory: it holds files vmfactory did not make");
                }
            }
        }
        break;
    }
    Ok(found)
}

/// Removes the template at `path`, but only what vmfactory made there (see
/// [`OWNER_MARKER`]). Does nothing when there is no template; refuses a path that is not a
/// directory, and refuses while another process holds the template's lock.
pub fn destroy(path: &Path) -> Result<bool, TemplateError> {
    let no_parent = path
        .parent()
        .is_some_and(|parent| !parent.as_os_str().is_empty() && !parent.is_dir());
    if no_parent {
        return Ok(false); // nowhere a template (or its lock file) could be
    }
    let _lock = PathLock::acquire(path, LockKind::Template)?;
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(TemplateError::NotADirectory(path.to_path_buf())),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(io_error("Cannot stat", path)(err)),
    }
    if Ownership::read(path).is_some() {
        return remove_ours(path);
    }
    // A template made before markers existed: its metadata says whether the tmpfs was
    // ours; remove only its files, and the directory only if that leaves it empty.
    let Ok(metadata) = read_metadata(path) else {
        debug!(path = %path.display(), "No template of vmfactory's here: leaving it alone");
        return Ok(false);
    };
    if metadata.mounted_tmpfs {
        unmount(path)?;
    } else {
        remove_our_files(path, false)?;
    }
    if is_empty_dir(path).unwrap_or(false) {
        let _ = std::fs::remove_dir(path);
    }
    Ok(true)
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
        .any(|mount_point| unescape_mountinfo(mount_point) == target)
}

/// Decodes the `\ooo` escapes mountinfo writes for space, tab, newline and backslash.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match (byte, octal) {
            (b'\\', Some(decoded)) => {
                out.push(decoded);
                i += 4;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
