//! The free space the image store leaves on its filesystem.
//!
//! Flattening an image writes its whole tree and then a disk of about the same size, and
//! an image's layers say nothing trustworthy about that size beforehand (a few MB of gzip
//! may hold GiBs). Writing until `ENOSPC` would fill the host's filesystem, which the
//! sandboxes, the template's tmpfs and everything else on it then share. So every file's
//! size is checked before it is written, and the tree's size before the disk is built:
//! whatever would leave less than [`reserve`] free fails first, with an error that says
//! so, and the staging directory goes away as on any other error.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The most the store keeps free: 1 GiB, or 5% of a smaller filesystem.
pub(crate) const MAX_RESERVE: u64 = 1 << 30;
/// Small files are checked together, once this many bytes of them were written.
const SMALL_FILES_CHECKED_EVERY: u64 = 8 << 20;

/// The free space to keep on a filesystem of `total` bytes.
pub(crate) fn reserve(total: u64) -> u64 {
    (total / 20).min(MAX_RESERVE)
}

/// Refuses a write of `needed` bytes that would leave less than the reserve.
pub(crate) fn check(
    dir: &Path,
    what: &str,
    needed: u64,
    available: u64,
    total: u64,
) -> Result<(), ImageError> {
    let reserve = reserve(total);
    if available.saturating_sub(needed) >= reserve {
        return Ok(());
    }
    Err(ImageError::NoSpace {
        dir: dir.to_path_buf(),
        what: what.to_string(),
        needed,
        available,
        reserve,
    })
}

/// Available and total bytes of the filesystem holding `fd`.
fn usage(fd: impl AsFd, dir: &Path) -> Result<(u64, u64), ImageError> {
    let stat = rustix::fs::fstatvfs(fd).map_err(|err| ImageError::Io {
        what: format!("read the free space of {}", dir.display()),
        source: err.into(),
    })?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// Refuses to build a disk of about `size` bytes in `dir` when that would leave less than
/// the reserve.
pub(crate) fn ensure_room_for_disk(dir: &Path, size: u64) -> Result<(), ImageError> {
    let handle = std::fs::File::open(dir).map_err(|source| ImageError::Io {
        what: format!("open {}", dir.display()),
        source,
    })?;
    let (available, total) = usage(&handle, dir)?;
    check(dir, "build the image's disk", size, available, total)
}

/// Checks the writes into one directory tree against the reserve.
#[derive(Debug)]
pub(crate) struct SpaceGuard {
    dir: PathBuf,
    /// Bytes of small files written since the last check.
    unchecked: std::cell::Cell<u64>,
}

impl SpaceGuard {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            unchecked: std::cell::Cell::new(0),
        }
    }

    /// Before a file of `size` bytes is written through `fd` (any descriptor on the
    /// filesystem): a file of 1 MiB or more is checked alone, smaller ones together.
    pub(crate) fn before_file(&self, fd: impl AsFd, size: u64) -> Result<(), ImageError> {
        let pending = self.unchecked.get().saturating_add(size);
        if size < (1 << 20) && pending < SMALL_FILES_CHECKED_EVERY {
            self.unchecked.set(pending);
            return Ok(());
        }
        self.unchecked.set(0);
        let (available, total) = usage(fd, &self.dir)?;
        check(
            &self.dir,
            "write the image's files",
            pending,
            available,
            total,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn the_reserve_is_five_percent_up_to_a_gib() {
        assert_eq!(reserve(100 * MIB), 5 * MIB);
        assert_eq!(reserve(20 * GIB), GIB);
        assert_eq!(reserve(500 * GIB), GIB);
        assert_eq!(reserve(0), 0);
    }

    #[test]
    fn a_write_that_would_eat_into_the_reserve_is_refused() {
        let dir = Path::new("/store");
        // 100 MiB filesystem, 5 MiB reserve.
        check(dir, "write", 10 * MIB, 15 * MIB, 100 * MIB).expect("leaves exactly the reserve");
        let err = check(
            dir,
            "write the image's files",
            10 * MIB + 1,
            15 * MIB,
            100 * MIB,
        )
        .expect_err("leaves less than the reserve");
        let text = err.to_string();
        assert!(text.contains("/store"), "{text}");
        assert!(text.contains("write the image's files"), "{text}");
        assert!(text.contains("5 MiB"), "{text}");
        assert!(matches!(err, ImageError::NoSpace { .. }));
        // More needed than available at all.
        assert!(check(dir, "write", 20 * MIB, 15 * MIB, 100 * MIB).is_err());
    }

    #[test]
    fn small_files_are_checked_together() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let fd = std::fs::File::open(dir.path())?;
        let guard = SpaceGuard::new(dir.path());
        for _ in 0..10 {
            guard.before_file(&fd, 4096)?;
        }
        assert_eq!(guard.unchecked.get(), 40960);
        guard.before_file(&fd, 2 * MIB)?;
        assert_eq!(
            guard.unchecked.get(),
            0,
            "a large file checks everything pending"
        );
        // A file larger than the filesystem can hold is refused before it is written.
        let err = guard
            .before_file(&fd, u64::MAX / 2)
            .expect_err("larger than any disk");
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
        Ok(())
    }
}
