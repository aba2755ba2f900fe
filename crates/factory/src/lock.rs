//! Advisory locks (`flock`) that keep two vmfactory processes from making, using or
//! removing the same thing at once: a template (`<template_path>.lock`, held while it is
//! created or destroyed) and a VMCache endpoint (`<endpoint>.lock`, held for the server's
//! life). The holder writes its pid into the lock file, so a refused process can say who
//! holds it. The lock goes with the holder's file descriptor (on exit too), and a holder
//! that lets go removes the file first, so nothing is left behind. A process that opened
//! the file before its removal and then locks it sees that the path no longer names the
//! file it locked, and starts again with a new one: only the file the path names counts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;

/// How often, and how long apart, a refused process reads the holder's pid (the holder
/// writes it just after it takes the lock).
const PID_READS: (u32, Duration) = (20, Duration::from_millis(5));
/// How many times a lock taken on a file removed meanwhile is taken again on the new one.
const RELOCKS: u32 = 100;

/// Errors of taking a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{what} {} is in use by {}: {advice}", .target.display(), holder(*.pid))]
    Busy {
        /// What is locked, e.g. "The template at".
        what: &'static str,
        /// The locked path (not the lock file).
        target: PathBuf,
        /// The holder's pid, when it could be read.
        pid: Option<u32>,
        /// What to do.
        advice: &'static str,
    },
    /// The lock file could not be opened or locked.
    #[error("Cannot lock {}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("vmfactory process {pid}"),
        None => "another vmfactory process".to_string(),
    }
}

/// What a lock protects, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A template path, locked while the template is created or destroyed.
    Template,
    /// A VMCache endpoint, locked for the server's life.
    Endpoint,
}

impl LockKind {
    fn what(self) -> &'static str {
        match self {
            Self::Template => "The template at",
            Self::Endpoint => "The VMCache endpoint",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Self::Template => "it is creating or destroying that template; wait for it to finish, or stop that process",
            Self::Endpoint => "a VMCache server runs there; stop it with `vmfactory factory destroy`, or set another vm_cache_endpoint",
        }
    }
}

/// A held lock on a path; released when dropped, its lock file removed.
#[derive(Debug)]
pub struct PathLock {
    file: File,
    path: PathBuf,
}

impl Drop for PathLock {
    /// Removes the lock file while the lock is still held (the descriptor closes after
    /// this), and only if the path still names it.
    fn drop(&mut self) {
        if names(&self.path, &self.file).unwrap_or(false) {
            if let Err(err) = std::fs::remove_file(&self.path) {
                debug!(lock = %self.path.display(), %err, "Cannot remove the lock file");
            }
        }
    }
}

/// Whether `path` names `file` now (same device and inode); false when it names nothing.
fn names(path: &Path, file: &File) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// The lock file of `target`: `<target>.lock` beside it.
pub fn lock_file_of(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

impl PathLock {
    /// Takes the lock of `target` without waiting; refuses, naming the holder's pid, when
    /// another process (or another open of it in this one) holds it.
    pub fn acquire(target: &Path, kind: LockKind) -> Result<Self, LockError> {
        let path = lock_file_of(target);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Made ours alone (0700): a lock lies in the runtime directory or beside a
            // template or endpoint, which are vmfactory's.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io)?;
        }
        for _ in 0..RELOCKS {
            let (mut file, ours) = Self::lock_once(&path, target, kind)?;
            if !ours {
                // The holder before us removed this file after we opened it.
                continue;
            }
            let written = file
                .set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| writeln!(file, "{}", std::process::id()));
            written.map_err(io)?;
            debug!(lock = %path.display(), "Lock taken");
            return Ok(Self { file, path });
        }
        Err(io(std::io::Error::other(format!(
            "the lock file was replaced {RELOCKS} times while this process locked it"
        ))))
    }

    /// Opens (or creates) and locks the lock file at `path`; true when `path` still names
    /// the file locked.
    fn lock_once(path: &Path, target: &Path, kind: LockKind) -> Result<(File, bool), LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            return Err(LockError::Busy {
                what: kind.what(),
                target: target.to_path_buf(),
                pid: read_holder(&mut file),
                advice: kind.advice(),
            });
        }
        let ours = names(path, &file).map_err(io)?;
        Ok((file, ours))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the holder wrote, read a few times while the holder may still be writing it.
fn read_holder(file: &mut File) -> Option<u32> {
    for _ in 0..PID_READS.0 {
        let mut text = String::new();
        let read = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&*file).take(32).read_to_string(&mut text));
        if let Ok(pid) = text.trim().parse::<u32>() {
            return Some(pid);
        }
        if read.is_err() {
            return None;
        }
        std::thread::sleep(PID_READS.1);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("template");
        let held = PathLock::acquire(&target, LockKind::Template).expect("first");
        assert_eq!(held.path(), dir.path().join("template.lock"));
        let err = PathLock::acquire(&target, LockKind::Template).expect_err("second");
        let pid = std::process::id();
        assert!(
            matches!(err, LockError::Busy { pid: Some(p), .. } if p == pid),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("vmfactory process {pid}")),
            "{message}"
        );
        assert!(message.contains(&target.display().to_string()), "{message}");
        drop(held);
        assert!(
            !dir.path().join("template.lock").exists(),
            "the holder removes its lock file"
        );
        drop(PathLock::acquire(&target, LockKind::Template).expect("free again"));
        assert!(!target.exists(), "the lock never creates its target");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("read dir").count(),
            0,
            "nothing is left"
        );
    }

    #[test]
    fn a_lock_file_removed_under_an_opener_is_not_a_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("template");
        let path = lock_file_of(&target);
        // A process opened the lock file, then its holder removed it (letting go).
        let held = PathLock::acquire(&target, LockKind::Template).expect("first");
        let opened = File::open(&path).expect("open the lock file");
        drop(held);
        let (_, ours) = PathLock::lock_once(&path, &target, LockKind::Template).expect("lock");
        assert!(ours, "a new file, named by the path");
        // The stale descriptor's file is not what the path names.
        assert!(!names(&path, &opened).expect("stat"));
    }

    #[test]
    fn holders_that_come_and_go_never_overlap() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Arc::new(dir.path().join("endpoint"));
        let inside = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (target, inside, taken) = (target.clone(), inside.clone(), taken.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let Ok(lock) = PathLock::acquire(&target, LockKind::Endpoint) else {
                            continue;
                        };
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        taken.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(lock);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no two holders at once");
        }
        assert!(taken.load(Ordering::SeqCst) > 0);
        assert!(
            !lock_file_of(&target).exists(),
            "the last holder removed it"
        );
    }
}
