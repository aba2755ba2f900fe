//! Digests and durable writes: SHA-256 of files (remembered for downloads), hex.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io_error, GuestImageError};

/// Writes `data` to `path` and flushes it to disk.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<(), GuestImageError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(data).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Hex SHA-256 of the file at `path`.
pub(crate) fn sha256_file(path: &Path) -> Result<String, GuestImageError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hex SHA-256 of a downloaded file, remembered in a `<file>.sha256` sidecar together
/// with the file's size and modification time, so a cached build need not re-read it.
pub(crate) fn sha256_file_remembered(path: &Path) -> Result<String, GuestImageError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let stamp = sidecar_stamp(&metadata);
    let sidecar = sidecar_path(path);
    if let Ok(text) = fs::read_to_string(&sidecar) {
        if let Some(digest) = parse_sidecar(&text, &stamp) {
            return Ok(digest);
        }
    }
    let digest = sha256_file(path)?;
    if let Err(err) = fs::write(&sidecar, format!("{stamp} {digest}\n")) {
        tracing::debug!(path = %sidecar.display(), error = %err, "could not remember a digest");
    }
    Ok(digest)
}

/// The `<file>.sha256` sidecar of `path`.
pub(crate) fn sidecar_path(path: &Path) -> PathBuf {
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push(".sha256");
    PathBuf::from(sidecar)
}

/// What a sidecar records of its file: `<size> <mtime_ns>`.
pub(crate) fn sidecar_stamp(metadata: &fs::Metadata) -> String {
    let mtime_ns = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {mtime_ns}", metadata.len())
}

/// The digest the sidecar of `path` remembers, if it still describes the file (nothing
/// is hashed).
pub(crate) fn remembered_sha256(path: &Path) -> Option<String> {
    let metadata = fs::metadata(path).ok()?;
    parse_sidecar(
        &fs::read_to_string(sidecar_path(path)).ok()?,
        &sidecar_stamp(&metadata),
    )
}

/// Returns the digest in a sidecar's `<size> <mtime_ns> <hex>` line if the stamp matches.
pub(crate) fn parse_sidecar(text: &str, stamp: &str) -> Option<String> {
    let (recorded_stamp, digest) = text.trim().rsplit_once(' ')?;
    (recorded_stamp == stamp && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| digest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sha256_match_known_vector() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn remembered_digest_follows_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pkg_1_amd64.deb");
        fs::write(&path, b"abc").expect("write");
        let first = sha256_file_remembered(&path).expect("hash");
        assert_eq!(first, sha256_file(&path).expect("hash"));
        let sidecar = dir.path().join("pkg_1_amd64.deb.sha256");
        assert!(fs::read_to_string(&sidecar)
            .expect("sidecar")
            .ends_with(&format!("{first}\n")));
        // A stale sidecar (different size) is ignored and rewritten.
        fs::write(&path, b"abcd").expect("write");
        let second = sha256_file_remembered(&path).expect("hash");
        assert_eq!(second, sha256_file(&path).expect("hash"));
        assert_ne!(first, second);
        assert_eq!(parse_sidecar("3 5 zz", "3 5"), None);
        assert_eq!(parse_sidecar(&format!("3 5 {first}"), "3 6"), None);
        assert_eq!(parse_sidecar(&format!("3 5 {first}"), "3 5"), Some(first));
    }
}
