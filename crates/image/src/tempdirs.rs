//! The store's temporary directories (`.staging-*` builds, `.unpack-*` unpacked tars),
//! named after the process that owns them, and the sweep of those a killed process left.
//!
//! A build killed by a signal (Ctrl-C) runs no destructor: its temporary directory, GiBs
//! of unpacked layers or a half-flattened tree, stays. Each one is named
//! `.KIND-PID-STARTTIME-RANDOM` (the owner's pid and its start time in `/proc/PID/stat`,
//! which tell its process apart from a later one with the same pid) and flocked by its
//! owner while it lives. [`sweep`], at the start of every prepare, removes the ones whose
//! owner is gone: no process with that pid and start time, and the flock free (a live
//! owner in another pid namespace sharing the cache still holds it).

use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::{io_error, ImageError};

/// Kinds of temporary directories, as their names start: `.staging-`, `.unpack-`.
pub(crate) const STAGING: &str = "staging";
pub(crate) const UNPACK: &str = "unpack";
const KINDS: [&str; 2] = [STAGING, UNPACK];

/// How old a temporary directory of an older vmfactory (no owner in its name) must be
/// to be removed (as `vmfactory-guest-image` sweeps its own).
const UNOWNED_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// A temporary directory in the store: removed when dropped, flocked while it lives.
#[derive(Debug)]
pub(crate) struct OwnedTempDir {
    dir: tempfile::TempDir,
    /// The directory opened and flocked (fields drop in order: removed, then unlocked).
    _lock: File,
}

impl OwnedTempDir {
    /// A new `.KIND-PID-STARTTIME-RANDOM` directory in `root`.
    pub(crate) fn new(root: &Path, kind: &str) -> Result<Self, ImageError> {
        let what = || format!("create a directory in {}", root.display());
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{kind}-{pid}-{start}-"))
            .tempdir_in(root)
            .map_err(io_error(what()))?;
        let lock = File::open(dir.path()).map_err(io_error(what()))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive).map_err(|err| ImageError::Io {
            what: format!("lock {}", dir.path().display()),
            source: err.into(),
        })?;
        Ok(Self { dir, _lock: lock })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory (to be renamed into place) and returns it with its lock,
    /// which the caller drops once the rename is done (until then a sweep must not take
    /// it for a killed build's).
    pub(crate) fn keep(self) -> (PathBuf, File) {
        let Self { dir, _lock } = self;
        (dir.keep(), _lock)
    }
}

/// The start time of process `pid` (clock ticks after boot, field 22 of
/// `/proc/PID/stat`); `None` when there is no such process (or no `/proc`).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `PID (COMM) STATE PPID …`: COMM may hold spaces and parentheses, so count the
    // fields after its last `)`; STATE is field 3.
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// `PID-STARTTIME-RANDOM` → the owner; `None` for an older vmfactory's `RANDOM`.
fn owner(rest: &str) -> Option<(u32, u64)> {
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start))
}

/// Removes the temporary directories in `root` that a killed process left: those whose
/// owner (pid and start time) is no longer running and whose flock is free, and those of
/// an older vmfactory (no owner in the name) untouched for a day. Best effort: what cannot
/// be removed is logged and left. Does nothing without `/proc` (no way to tell).
pub(crate) fn sweep(root: &Path) {
    if start_time(std::process::id()).is_none() {
        return;
    }
    let Ok(listing) = fs::read_dir(root) else {
        return;
    };
    for child in listing.flatten() {
        let name = child.file_name();
        let Some(rest) = name.to_str().and_then(|name| {
            let name = name.strip_prefix('.')?;
            KINDS
                .iter()
                .find_map(|kind| name.strip_prefix(kind)?.strip_prefix('-'))
        }) else {
            continue;
        };
        if !child.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = child.path();
        let stale = match owner(rest) {
            Some((pid, start)) => start_time(pid) != Some(start),
            None => child
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > UNOWNED_MAX_AGE),
        };
        if stale {
            remove_unlocked(&path);
        } else {
            tracing::debug!(path = %path.display(), "leaving the temporary directory of a running build");
        }
    }
}

/// Removes the directory `path` unless its owner holds its flock.
fn remove_unlocked(path: &Path) {
    let dir: OwnedFd = match rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(dir) => dir,
        Err(_) => return, // gone already (another sweep), or not a directory any more
    };
    if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_err() {
        tracing::debug!(path = %path.display(), "leaving a temporary directory its owner still locks");
        return;
    }
    tracing::info!(path = %path.display(), "removing the temporary directory of a killed image build");
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove the temporary directory of a killed image build");
        }
    }
}
