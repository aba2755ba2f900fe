//! The free space the image store leaves on its filesystem.
//!
//! Flattening an image writes its whole tree and then a disk of about the same size, and
//! an image's layers say nothing trustworthy about that size beforehand (a few MB of gzip
//! may hold GiBs). Writing until `ENOSPC` would fill the host's filesystem, which the
//! sandboxes, the template's tmpfs and everything else on it then share. So every file's
//! size is checked before it is written, and the tree's size before the disk is built:
//! whatever would leave less than [`reserve`] free fails first, with an error that says
//! so, and the staging directory goes away as on any other error.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The most the store keeps free: 1 GiB, or 5% of a smaller filesystem.
pub(crate) const MAX_RESERVE: u64 = 1 << 30;
/// Small files are checked together, at the latest once this many bytes of them were
/// written.
const SMALL_FILES_CHECKED_EVERY: u64 = 8 << 20;
/// Or once this many entries were.
const MAX_BATCH_ENTRIES: u64 = 4096;

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

/// What `statvfs` says of a filesystem.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Bytes available to unprivileged writers.
    available: u64,
    /// Bytes in all.
    total: u64,
    /// Inodes available (0 with `files` 0: the filesystem has no fixed number).
    free_inodes: u64,
    /// Inodes in all.
    inodes: u64,
    /// Block size.
    block: u64,
}

fn usage(fd: impl AsFd, dir: &Path) -> Result<Usage, ImageError> {
    let stat = rustix::fs::fstatvfs(fd).map_err(|err| ImageError::Io {
        what: format!("read the free space of {}", dir.display()),
        source: err.into(),
    })?;
    Ok(Usage {
        available: stat.f_bavail.saturating_mul(stat.f_frsize),
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
        free_inodes: stat.f_favail,
        inodes: stat.f_files,
        block: stat.f_bsize.clamp(512, 1 << 20),
    })
}

/// Refuses to build a disk of about `size` bytes in `dir` when that would leave less than
/// the reserve.
pub(crate) fn ensure_room_for_disk(dir: &Path, size: u64) -> Result<(), ImageError> {
    let handle = std::fs::File::open(dir).map_err(|source| ImageError::Io {
        what: format!("open {}", dir.display()),
        source,
    })?;
    let usage = usage(&handle, dir)?;
    check(
        dir,
        "build the image's disk",
        size,
        usage.available,
        usage.total,
    )
}

/// Checks the writes into one directory tree against the reserve.
///
/// Every entry is charged at least a block and every file its size rounded up to blocks
/// (a layer of millions of empty files or directories costs blocks and inodes, not
/// bytes), and inodes keep the same 5% reserve where the filesystem has a fixed number.
/// A file of 1 MiB or more is checked alone; smaller entries together, once a quarter of
/// the reserve (at most 8 MiB, or 4096 entries) is pending, so one batch cannot eat the
/// reserve.
#[derive(Debug)]
pub(crate) struct SpaceGuard {
    dir: PathBuf,
    block: u64,
    batch_bytes: u64,
    batch_entries: u64,
    /// Bytes charged since the last check.
    pending_bytes: Cell<u64>,
    /// Entries since the last check.
    pending_entries: Cell<u64>,
}

impl SpaceGuard {
    /// A guard for writes into `dir`, whose descriptor is `fd`.
    pub(crate) fn new(dir: &Path, fd: impl AsFd) -> Result<Self, ImageError> {
        let usage = usage(fd, dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            block: usage.block,
            batch_bytes: (reserve(usage.total) / 4).clamp(64 << 10, SMALL_FILES_CHECKED_EVERY),
            batch_entries: (reserve(usage.inodes) / 4).clamp(16, MAX_BATCH_ENTRIES),
            pending_bytes: Cell::new(0),
            pending_entries: Cell::new(0),
        })
    }

    /// Before an entry is created through `fd` (any descriptor on the filesystem) with
    /// `size` bytes of data (0 but for regular files).
    pub(crate) fn before_entry(&self, fd: impl AsFd, size: u64) -> Result<(), ImageError> {
        let charge = size.div_ceil(self.block).max(1).saturating_mul(self.block);
        let bytes = self.pending_bytes.get().saturating_add(charge);
        let entries = self.pending_entries.get() + 1;
        if size < (1 << 20) && bytes < self.batch_bytes && entries < self.batch_entries {
            self.pending_bytes.set(bytes);
            self.pending_entries.set(entries);
            return Ok(());
        }
        self.pending_bytes.set(0);
        self.pending_entries.set(0);
        let usage = usage(fd, &self.dir)?;
        check(
            &self.dir,
            "write the image's files",
            bytes,
            usage.available,
            usage.total,
        )?;
        check_inodes(&self.dir, entries, usage.free_inodes, usage.inodes)
    }
}

/// Refuses `needed` more inodes when that would leave less than the reserve of `inodes`.
pub(crate) fn check_inodes(
    dir: &Path,
    needed: u64,
    free: u64,
    inodes: u64,
) -> Result<(), ImageError> {
    let reserve = reserve(inodes);
    if inodes == 0 || free.saturating_sub(needed) >= reserve {
        return Ok(());
    }
    Err(ImageError::NoInodes {
        dir: dir.to_path_buf(),
        free,
        reserve,
    })
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
    fn small_entries_are_checked_together_and_charged_whole_blocks(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let fd = std::fs::File::open(dir.path())?;
        let guard = SpaceGuard::new(dir.path(), &fd)?;
        let block = guard.block;
        guard.before_entry(&fd, 0)?;
        guard.before_entry(&fd, 1)?;
        guard.before_entry(&fd, block + 1)?;
        assert_eq!(guard.pending_bytes.get(), 4 * block, "1 + 1 + 2 blocks");
        assert_eq!(guard.pending_entries.get(), 3);
        guard.before_entry(&fd, 2 * MIB)?;
        assert_eq!(
            guard.pending_entries.get(),
            0,
            "a large file checks all pending"
        );
        // A batch ends at its entry count or its bytes, whichever comes first.
        let batch = guard.batch_entries.min(guard.batch_bytes / block);
        for _ in 0..batch - 1 {
            guard.before_entry(&fd, 0)?;
        }
        assert_eq!(guard.pending_entries.get(), batch - 1);
        guard.before_entry(&fd, 0)?;
        assert_eq!(guard.pending_entries.get(), 0, "a full batch is checked");
        // A file larger than the filesystem can hold is refused before it is written.
        let err = guard
            .before_entry(&fd, u64::MAX / 2)
            .expect_err("larger than any disk");
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn inodes_keep_the_same_reserve() {
        let dir = Path::new("/store");
        check_inodes(dir, 10, 60, 1000).expect("leaves 50, the reserve");
        let err = check_inodes(dir, 11, 60, 1000).expect_err("leaves 49");
        assert!(err.to_string().contains("inodes"), "{err}");
        assert!(err.to_string().contains("/store"), "{err}");
        check_inodes(dir, 1 << 40, 0, 0).expect("no fixed number of inodes");
    }
}
