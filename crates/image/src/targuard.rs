//! Bounds on a tar stream before the `tar` crate reads it.
//!
//! Image layers are untrusted, and `tar` reads a GNU long name or long link (`L`, `K`) and
//! PAX extensions (`x`) whole into memory, however long their header says they are: a
//! gzip layer of a few MB can hold a "long name" of 8 GiB of zeros. `TarGuard` sits
//! between the decompressed stream and `tar::Archive`, follows the archive's blocks as
//! they pass (headers, GNU sparse extension blocks, data and padding, with PAX `size`
//! overrides applied as `tar` applies them), and fails the read when an extension entry
//! is larger than [`MAX_EXTENSION_BYTES`], when the archive holds more than
//! [`MAX_ENTRIES`] entries, or when it is longer than [`MAX_ARCHIVE_BYTES`]. Bytes pass
//! through unchanged. No crate offers this: `tar` has no limits, and its raw mode would
//! leave PAX and long names to us instead.

use std::io::{self, Read};

/// Largest GNU long name or long link, or PAX extension block, accepted.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Most entries (headers) one archive may hold.
pub const MAX_ENTRIES: u64 = 4_000_000;
/// Longest uncompressed archive accepted (64 GiB).
pub const MAX_ARCHIVE_BYTES: u64 = 64 << 30;

const BLOCK: usize = 512;

#[derive(Debug)]
enum State {
    /// Collecting a header block in `block`.
    Header,
    /// Collecting a GNU sparse extension block in `block`; the entry's data follows.
    SparseExtension { data: u64 },
    /// Inside an entry's data (`left` bytes), then its padding to the next block.
    Data { left: u64, pad: u64, pax: bool },
}

/// A reader that checks the tar structure flowing through it (see the module docs).
#[derive(Debug)]
pub struct TarGuard<R> {
    inner: R,
    state: State,
    block: Vec<u8>,
    /// The data of the PAX extension entry being read.
    pax: Vec<u8>,
    /// `size` of the last PAX extension, for the next entry that is not an extension.
    pax_size: Option<u64>,
    entries: u64,
    total: u64,
    max_archive_bytes: u64,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: Read> TarGuard<R> {
    /// Guards `inner` with the default limits.
    pub fn new(inner: R) -> Self {
        Self::with_max_bytes(inner, MAX_ARCHIVE_BYTES)
    }

    /// Guards `inner`, allowing at most `max_archive_bytes` in all.
    pub fn with_max_bytes(inner: R, max_archive_bytes: u64) -> Self {
        Self {
            inner,
            state: State::Header,
            block: Vec::with_capacity(BLOCK),
            pax: Vec::new(),
            pax_size: None,
            entries: 0,
            total: 0,
            max_archive_bytes,
        }
    }

    /// Follows `bytes` through the archive's structure.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header | State::SparseExtension { .. } => {
                    let take = (BLOCK - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.block.len() == BLOCK {
                        self.end_of_block()?;
                        self.block.clear();
                    }
                }
                State::Data { left, pad, pax } => {
                    let in_data = (*left).min(bytes.len() as u64) as usize;
                    if *pax {
                        self.pax.extend_from_slice(&bytes[..in_data]);
                    }
                    *left -= in_data as u64;
                    bytes = &bytes[in_data..];
                    let in_pad = (*pad).min(bytes.len() as u64) as usize;
                    *pad -= in_pad as u64;
                    bytes = &bytes[in_pad..];
                    if *left == 0 && *pad == 0 {
                        if *pax {
                            self.pax_size = pax_size(&self.pax);
                            self.pax.clear();
                        }
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }

    fn end_of_block(&mut self) -> io::Result<()> {
        if let State::SparseExtension { data } = self.state {
            // `isextended` follows the 21 sparse entries of 24 bytes.
            if self.block[504] != 1 {
                self.enter_data(data, false);
            }
            return Ok(());
        }
        if self.block.iter().all(|b| *b == 0) {
            return Ok(()); // the end of the archive, or padding
        }
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(invalid(format!(
                "the archive holds more than {MAX_ENTRIES} entries"
            )));
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        // As `tar` 0.4's `next_entry`: a GNU or ustar header of a long name, long link or
        // PAX extension is read whole into memory and describes the next entry; any other
        // header is an entry, which uses up pending PAX extensions. Their `size` replaces
        // the header's unless the header's type is an extension's (`next_entry_raw`).
        let extension_type = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let buffered = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        let mut size = header
            .entry_size()
            .map_err(|err| invalid(format!("a tar header's size is unreadable: {err}")))?;
        if buffered && size > MAX_EXTENSION_BYTES {
            return Err(invalid(format!(
                "a tar extension entry (long name, long link or PAX) of {size} bytes, \
                 more than {MAX_EXTENSION_BYTES}"
            )));
        }
        let pending = if buffered {
            self.pax_size
        } else {
            self.pax_size.take()
        };
        if let Some(pax_size) = pending.filter(|_| !extension_type) {
            size = pax_size;
        }
        let pax = buffered && kind.is_pax_local_extensions();
        if kind.is_gnu_sparse() && header.as_gnu().is_some_and(|gnu| gnu.is_extended()) {
            self.state = State::SparseExtension { data: size };
        } else {
            self.enter_data(size, pax);
        }
        Ok(())
    }

    fn enter_data(&mut self, size: u64, pax: bool) {
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.state = if size == 0 {
            if pax {
                self.pax_size = None;
            }
            State::Header
        } else {
            State::Data {
                left: size,
                pad,
                pax,
            }
        };
    }
}

/// The `size` record of PAX extension data, as `tar` reads it (the first one; none if a
/// record before it is malformed).
fn pax_size(data: &[u8]) -> Option<u64> {
    for extension in tar::PaxExtensions::new(data) {
        let extension = extension.ok()?;
        if extension.key() == Ok("size") {
            return extension.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.total += n as u64;
        if self.total > self.max_archive_bytes {
            return Err(invalid(format!(
                "the archive is longer than {} bytes uncompressed",
                self.max_archive_bytes
            )));
        }
        self.follow(&out[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `entries` (path, data), with `long` paths written as GNU long names and
    /// PAX paths (both are what real layers carry).
    fn archive(entries: &[(&str, &[u8])], gnu: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = if gnu {
                tar::Header::new_gnu()
            } else {
                tar::Header::new_ustar()
            };
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            if gnu {
                builder
                    .append_data(&mut header, path, *data)
                    .expect("append");
            } else {
                builder
                    .append_pax_extensions([("path", path.as_bytes())])
                    .expect("pax");
                header.set_path("short").expect("path");
                header.set_cksum();
                builder.append(&header, *data).expect("append");
            }
        }
        builder.into_inner().expect("finish")
    }

    /// Every path and size `tar` reads through the guard, read in odd-sized pieces.
    fn read_through(bytes: &[u8]) -> io::Result<Vec<(String, usize)>> {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(self.0.len()).min(333);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut archive = tar::Archive::new(TarGuard::new(Trickle(bytes)));
        let mut seen = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            seen.push((path, data.len()));
        }
        Ok(seen)
    }

    #[test]
    fn honest_archives_pass_unchanged() {
        let long = format!("{}/file", "d".repeat(300));
        let big = vec![7u8; 70_000];
        for gnu in [true, false] {
            let bytes = archive(
                &[("a", b"hello"), (&long, &big), ("empty", b""), ("b", b"x")],
                gnu,
            );
            assert_eq!(
                read_through(&bytes).expect("read"),
                [
                    ("a".to_string(), 5),
                    (long.clone(), 70_000),
                    ("empty".to_string(), 0),
                    ("b".to_string(), 1)
                ],
                "gnu: {gnu}"
            );
        }
    }

    /// An entry "next" holding "ok" with `header`'s format, then the end of the archive.
    fn closing_entry(mut header: tar::Header) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        header.set_size(2);
        header.set_path("next").expect("path");
        header.set_cksum();
        builder.append(&header, b"ok".as_slice()).expect("append");
        builder.into_inner().expect("inner")
    }

    /// A GNU long-name entry claiming `size` bytes, followed by `data` of that length.
    fn long_name_entry(size: u64) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(size);
        header.set_path("././@LongLink").expect("path");
        header.set_cksum();
        header.as_bytes().to_vec()
    }

    #[test]
    fn an_oversized_long_name_is_refused_before_it_is_read() {
        let mut bytes = long_name_entry(8 << 30);
        // A few MiB of the "name" follow; the guard fails before `tar` takes them all.
        bytes.extend(vec![b'a'; 3 << 20]);
        let err = read_through(&bytes).expect_err("refused");
        assert!(err.to_string().contains("more than 1048576"), "{err}");
    }

    #[test]
    fn oversized_pax_data_is_refused() {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_size(2 << 20);
        header.set_path("pax").expect("path");
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend(vec![b'1'; 2 << 20]);
        let err = read_through(&bytes).expect_err("refused");
        assert!(err.to_string().contains("PAX"), "{err}");
    }

    #[test]
    fn archives_longer_than_the_budget_are_refused() {
        let bytes = archive(&[("a", &[1u8; 4096]), ("b", &[2u8; 4096])], true);
        let mut guard = TarGuard::with_max_bytes(bytes.as_slice(), 6000);
        let err = io::copy(&mut guard, &mut io::sink()).expect_err("refused");
        assert!(err.to_string().contains("longer than 6000"), "{err}");
        let mut guard = TarGuard::with_max_bytes(bytes.as_slice(), bytes.len() as u64);
        io::copy(&mut guard, &mut io::sink()).expect("exactly the budget");
    }

    #[test]
    fn pax_sizes_override_the_header_as_tar_reads_them() {
        // A PAX `size` record makes the next entry's data longer than its header says:
        // the guard must follow it, or it would read data as headers.
        let data = vec![b'z'; 1500];
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("size", b"1500".as_slice())])
            .expect("pax");
        let mut header = tar::Header::new_ustar();
        header.set_path("sized").expect("path");
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        // Without the end-of-archive blocks `into_inner` would add.
        let mut bytes = builder.get_ref().clone();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        bytes.extend(vec![0u8; 1536 - 1500]);
        bytes.extend(closing_entry(tar::Header::new_ustar()));
        assert_eq!(
            read_through(&bytes).expect("read"),
            [("sized".to_string(), 1500), ("next".to_string(), 2)]
        );
    }

    #[test]
    fn gnu_sparse_extension_blocks_are_followed() {
        // A sparse file of 5 chunks: 4 in the header, 1 in an extension block, 512 bytes
        // of data each, one hole of 512 before each.
        let mut header = tar::Header::new_gnu();
        header.set_path("sparse").expect("path");
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_size(5 * 512);
        {
            let gnu = header.as_gnu_mut().expect("gnu");
            for (i, chunk) in gnu.sparse.iter_mut().enumerate() {
                chunk.set_offset(1024 * i as u64 + 512);
                chunk.set_length(512);
            }
            gnu.set_real_size(5 * 1024);
            gnu.set_is_extended(true);
        }
        header.set_cksum();
        let mut extension = tar::GnuExtSparseHeader::new();
        extension.sparse_mut()[0].set_offset(4 * 1024 + 512);
        extension.sparse_mut()[0].set_length(512);
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(extension.as_bytes());
        bytes.extend(vec![b's'; 5 * 512]);
        bytes.extend(closing_entry(tar::Header::new_gnu()));
        assert_eq!(
            read_through(&bytes).expect("read"),
            [("sparse".to_string(), 5 * 1024), ("next".to_string(), 2)]
        );
    }

    #[test]
    fn pending_pax_is_used_up_by_any_entry_as_tar_does() {
        // PAX size 60 GB, then a global header (an entry for `tar`, which uses up the PAX
        // data without applying it), then an empty file, then a long name claiming 8 GiB:
        // the guard must not apply the size to the file, or the long name would pass as
        // that file's data and `tar` would read it whole.
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("size", b"60000000000".as_slice())])
            .expect("pax");
        let mut bytes = builder.get_ref().clone();
        let mut global = tar::Header::new_ustar();
        global.set_entry_type(tar::EntryType::XGlobalHeader);
        global.set_path("global").expect("path");
        global.set_size(0);
        global.set_cksum();
        bytes.extend_from_slice(global.as_bytes());
        let mut file = tar::Header::new_ustar();
        file.set_path("empty").expect("path");
        file.set_size(0);
        file.set_cksum();
        bytes.extend_from_slice(file.as_bytes());
        bytes.extend(long_name_entry(8 << 30));
        bytes.extend(vec![b'a'; 3 << 20]);
        let err = read_through(&bytes).expect_err("refused");
        assert!(err.to_string().contains("more than 1048576"), "{err}");
    }
}
