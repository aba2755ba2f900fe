//! Applying image layers (tar streams) to a root directory, in order, with OCI whiteouts.
//!
//! Layers are untrusted. Every path is normalised (`.` and empty components dropped,
//! `..` refused), parents are opened with `openat2(RESOLVE_IN_ROOT)` so that a symlink in
//! the tree (even one planted by an earlier entry) resolves inside the root, never outside
//! it, and the last component is always created or removed without following symlinks.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::ImageError;

/// What one layer did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Files, directories, links and fifos written.
    pub entries: u64,
    /// Whiteouts applied (`.wh.NAME` and opaque markers).
    pub whiteouts: u64,
    /// Device nodes and other entries left out.
    pub skipped: u64,
}

/// A root directory that layers are applied to.
#[derive(Debug)]
pub struct Flattener {
    root: OwnedFd,
    /// Keeps the store's free-space reserve while files are written.
    space: crate::space::SpaceGuard,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

fn bad(what: impl Into<String>) -> ImageError {
    ImageError::BadLayer(what.into())
}

fn io_err(what: &str, path: &[u8], err: impl Into<io::Error>) -> ImageError {
    ImageError::Io {
        what: format!("{what} {}", String::from_utf8_lossy(path)),
        source: err.into(),
    }
}

/// Splits a path of a tar entry into checked components: no `..`, no NUL; a leading `/`,
/// `.` and empty components are dropped (tar paths are relative to the root).
pub(crate) fn components(path: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(ImageError::PathEscape(
                    String::from_utf8_lossy(path).into_owned(),
                ))
            }
            _ if part.contains(&0) => return Err(bad("a path contains a NUL byte")),
            _ => out.push(part),
        }
    }
    Ok(out)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

impl Flattener {
    /// Applies layers to `root` (an existing, normally empty directory).
    pub fn new(root: &Path) -> Result<Self, ImageError> {
        let root_path = root;
        let root = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| io_err("open", root.as_os_str().as_bytes(), err))?;
        let space = crate::space::SpaceGuard::new(root_path, &root)?;
        Ok(Self { root, space })
    }

    /// Opens the directory `parts` inside the root (symlinks resolved inside the root),
    /// creating missing directories (mode 0755, root-owned) on the way.
    fn open_dir(&self, parts: &[&[u8]]) -> Result<OwnedFd, ImageError> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut current = rustix::io::dup(&self.root).map_err(|err| io_err("dup", b"/", err))?;
        for i in 0..parts.len() {
            let prefix = join(&parts[..=i]);
            let open = |path: &[u8]| {
                rustix::fs::openat2(&self.root, path, dir_flags, Mode::empty(), resolve_flags())
            };
            current = match open(&prefix) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, parts[i], Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(err) => return Err(io_err("create directory", &prefix, err)),
                    }
                    open(&prefix).map_err(|err| io_err("open directory", &prefix, err))?
                }
                Err(Errno::NOTDIR) => {
                    // A lower layer has a file where this layer has a directory: the
                    // directory wins (the file is replaced).
                    remove_at(current.as_fd(), parts[i], &prefix)?;
                    rustix::fs::mkdirat(&current, parts[i], Mode::from_raw_mode(0o755))
                        .map_err(|err| io_err("create directory", &prefix, err))?;
                    open(&prefix).map_err(|err| io_err("open directory", &prefix, err))?
                }
                Err(err) => return Err(io_err("open directory", &prefix, err)),
            };
        }
        Ok(current)
    }

    /// Applies one layer (an uncompressed tar stream).
    pub fn apply<R: Read>(&self, layer: R) -> Result<LayerStats, ImageError> {
        let mut archive = tar::Archive::new(crate::targuard::TarGuard::new(layer));
        let mut stats = LayerStats::default();
        // Paths this layer wrote: an opaque marker hides only what lower layers had.
        let mut written: HashSet<PathKey> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|err| bad(format!("cannot read the layer: {err}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|err| bad(format!("cannot read the layer: {err}")))?;
            let raw_path = entry.path_bytes().into_owned();
            let parts = components(&raw_path)?;
            let Some((&name, parent_parts)) = parts.split_last() else {
                continue; // the root itself
            };
            let path = join(&parts);
            let parent = self.open_dir(parent_parts)?;
            if name == OPAQUE {
                let parent_path = join(parent_parts);
                self.make_opaque(parent.as_fd(), &parent_path, &written)?;
                stats.whiteouts += 1;
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    return Err(bad(format!(
                        "bad whiteout {}",
                        String::from_utf8_lossy(&raw_path)
                    )));
                }
                remove_at(parent.as_fd(), hidden, &path)?;
                stats.whiteouts += 1;
                continue;
            }
            let header = entry.header().clone();
            let kind = header.entry_type();
            let mode = header.mode().map_err(|err| bad(err.to_string()))? & 0o7777;
            let uid = owner(header.uid(), &path)?;
            let gid = owner(header.gid(), &path)?;
            let mtime = header.mtime().unwrap_or(0);
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: mtime as i64,
                    tv_nsec: 0,
                },
                last_modification: Timespec {
                    tv_sec: mtime as i64,
                    tv_nsec: 0,
                },
            };
            let existing = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).ok();
            let existing_is_dir = existing
                .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
            if !(kind.is_dir() && existing_is_dir) && existing.is_some() {
                remove_at(parent.as_fd(), name, &path)?;
            }
            let data = if kind.is_file() || kind == tar::EntryType::Continuous {
                entry.size()
            } else {
                0
            };
            self.space.before_entry(&parent, data)?;
            match kind {
                t if t.is_dir() => {
                    if !existing_is_dir {
                        rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                            .map_err(|err| io_err("create directory", &path, err))?;
                    }
                    let dir = rustix::fs::openat(
                        &parent,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|err| io_err("open directory", &path, err))?;
                    set_owner_mode(dir.as_fd(), uid, gid, mode, &path)?;
                }
                t if t.is_file() || t == tar::EntryType::Continuous => {
                    let fd = rustix::fs::openat(
                        &parent,
                        name,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|err| io_err("create", &path, err))?;
                    let mut file = File::from(fd);
                    io::copy(&mut entry, &mut file).map_err(|err| io_err("write", &path, err))?;
                    set_owner_mode(file.as_fd(), uid, gid, mode, &path)?;
                    rustix::fs::futimens(&file, &times)
                        .map_err(|err| io_err("set times of", &path, err))?;
                }
                t if t.is_symlink() => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("a symlink without a target"))?
                        .into_owned();
                    if target.contains(&0) {
                        return Err(bad("a symlink target contains a NUL byte"));
                    }
                    rustix::fs::symlinkat(target.as_slice(), &parent, name)
                        .map_err(|err| io_err("create symlink", &path, err))?;
                    rustix::fs::chownat(
                        &parent,
                        name,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|err| io_err("chown", &path, err))?;
                    let _ = rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW);
                }
                t if t.is_hard_link() => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("a hard link without a target"))?
                        .into_owned();
                    let target_parts = components(&target)?;
                    let Some((&target_name, target_parent)) = target_parts.split_last() else {
                        return Err(bad("a hard link to the root"));
                    };
                    let target_dir = self.open_dir(target_parent)?;
                    rustix::fs::linkat(&target_dir, target_name, &parent, name, AtFlags::empty())
                        .map_err(|err| io_err("hard link", &path, err))?;
                }
                t if t.is_fifo() => {
                    rustix::fs::mknodat(
                        &parent,
                        name,
                        FileType::Fifo,
                        Mode::from_raw_mode(mode),
                        0,
                    )
                    .map_err(|err| io_err("create fifo", &path, err))?;
                    rustix::fs::chownat(
                        &parent,
                        name,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|err| io_err("chown", &path, err))?;
                }
                // Device nodes: the guest mounts its own /dev; metadata entries (PAX, GNU
                // long names) are consumed by the tar reader.
                _ => {
                    stats.skipped += 1;
                    continue;
                }
            }
            written.insert(path_key(&path));
            stats.entries += 1;
        }
        Ok(stats)
    }

    /// Removes everything in `dir` that this layer did not write.
    fn make_opaque(
        &self,
        dir: BorrowedFd<'_>,
        dir_path: &[u8],
        written: &HashSet<PathKey>,
    ) -> Result<(), ImageError> {
        let listing =
            std::fs::read_dir(proc_path(dir, b"")).map_err(|err| io_err("list", dir_path, err))?;
        for child in listing {
            let child = child.map_err(|err| io_err("list", dir_path, err))?;
            let name = child.file_name();
            let mut path = dir_path.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            if !written.contains(&path_key(&path)) {
                remove_at(dir, name.as_bytes(), &path)?;
            }
        }
        Ok(())
    }
}

/// A written path as the layer's set of them keeps it: 128 bits of its SHA-256, not the
/// path. A layer may hold millions of entries with paths of kilobytes (within
/// `MAX_ENTRIES`): their paths would take gigabytes, their keys some 100 MB.
type PathKey = [u8; 16];

fn path_key(path: &[u8]) -> PathKey {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path);
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

fn owner(id: io::Result<u64>, path: &[u8]) -> Result<u32, ImageError> {
    id.ok()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| bad(format!("bad owner of {}", String::from_utf8_lossy(path))))
}

fn set_owner_mode(
    fd: BorrowedFd<'_>,
    uid: u32,
    gid: u32,
    mode: u32,
    path: &[u8],
) -> Result<(), ImageError> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(|err| io_err("chown", path, err))?;
    // After chown, which clears set-user-ID bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(|err| io_err("chmod", path, err))
}

/// `/proc/self/fd/N/NAME`: a path to `name` in the directory open as `dir`, for the std
/// functions that take paths (the magic link is the directory itself, already resolved).
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        path.push(std::ffi::OsStr::from_bytes(name));
    }
    path
}

/// Removes `name` in `dir` (a whole tree if it is a directory); nothing there is fine.
fn remove_at(dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<(), ImageError> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(err) => return Err(io_err("stat", path, err)),
    };
    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        std::fs::remove_dir_all(proc_path(dir, name)).map_err(|err| io_err("remove", path, err))
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|err| io_err("remove", path, err))
    }
}
