//! A writer (and a strict reader) for the "newc" cpio format the Linux kernel unpacks as
//! its initramfs: `070701` headers of 13 eight-digit hex fields, NUL-terminated names and
//! file data each padded to a multiple of four bytes, closed by a `TRAILER!!!` entry.

use std::io::{self, Read, Write};

use thiserror::Error;

/// File type bits of a directory.
pub const S_IFDIR: u32 = 0o040_000;
/// File type bits of a regular file.
pub const S_IFREG: u32 = 0o100_000;
/// File type bits of a symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// File type bits of a character device.
pub const S_IFCHR: u32 = 0o020_000;
/// Mask selecting the file type bits of a mode.
pub const S_IFMT: u32 = 0o170_000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Errors of writing or reading a newc archive.
#[derive(Debug, Error)]
pub enum CpioError {
    /// Writing to the underlying sink failed.
    #[error("Could not write the cpio archive")]
    Io(#[from] io::Error),
    /// A field does not fit the format's 32-bit fields.
    #[error(
        "Entry {name} is too large for a newc archive ({what} exceeds 4 GiB); make it smaller"
    )]
    TooLarge {
        /// Name of the entry.
        name: String,
        /// Which field overflowed.
        what: &'static str,
    },
    /// An entry name is empty or contains a NUL byte.
    #[error("Entry name {name:?} is not valid in a cpio archive; use a non-empty name without NUL bytes")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A reader handed to [`CpioWriter::file_from_reader`] gave fewer bytes than announced.
    #[error("Entry {name} was announced with {expected} bytes but its source gave {actual}; was the file changed while the archive was written?")]
    ShortRead {
        /// Name of the entry.
        name: String,
        /// Announced size.
        expected: u64,
        /// Bytes actually read.
        actual: u64,
    },
    /// The bytes are not a valid newc archive.
    #[error("Malformed cpio archive at byte {offset}: {reason}")]
    Malformed {
        /// Offset of the offending header.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Streams entries into a newc archive.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    inner: W,
    offset: u64,
    next_ino: u32,
}

/// The header fields of one entry, before encoding.
struct Header<'a> {
    name: &'a str,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive writing into `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn directory(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, (0, 0))?;
        self.pad()
    }

    /// Adds a regular file with permission bits `perm` and contents `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let size = to_u32(data.len() as u64, name, "the file size")?;
        self.entry(name, S_IFREG | (perm & 0o7777), 1, size, (0, 0))?;
        self.write_all(data)?;
        self.pad()
    }

    /// Adds a regular file of exactly `size` bytes read from `reader`.
    pub fn file_from_reader(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let size32 = to_u32(size, name, "the file size")?;
        self.entry(name, S_IFREG | (perm & 0o7777), 1, size32, (0, 0))?;
        let copied = io::copy(&mut reader.take(size), &mut self.inner)?;
        self.offset += copied;
        if copied != size {
            return Err(CpioError::ShortRead {
                name: name.to_owned(),
                expected: size,
                actual: copied,
            });
        }
        self.pad()
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let size = to_u32(target.len() as u64, name, "the link target")?;
        self.entry(name, S_IFLNK | 0o777, 1, size, (0, 0))?;
        self.write_all(target.as_bytes())?;
        self.pad()
    }

    /// Adds a character device node with permission bits `perm`.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))?;
        self.pad()
    }

    /// Writes the trailer, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(&Header {
            name: TRAILER,
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.pad()?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        filesize: u32,
        (rdev_major, rdev_minor): (u32, u32),
    ) -> Result<(), CpioError> {
        let name = normalize_name(name)?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.header(&Header {
            name,
            ino,
            mode,
            nlink,
            filesize,
            rdev_major,
            rdev_minor,
        })
    }

    fn header(&mut self, header: &Header<'_>) -> Result<(), CpioError> {
        let namesize = to_u32(header.name.len() as u64 + 1, header.name, "the name")?;
        let fields = [
            header.ino,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime: fixed for reproducible images
            header.filesize,
            0, // devmajor
            0, // devminor
            header.rdev_major,
            header.rdev_minor,
            namesize,
            0, // check
        ];
        let mut encoded = Vec::with_capacity(HEADER_LEN + header.name.len() + 4);
        encoded.extend_from_slice(MAGIC);
        for field in fields {
            encoded.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        encoded.extend_from_slice(header.name.as_bytes());
        encoded.push(0);
        self.write_all(&encoded)?;
        self.pad()
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), CpioError> {
        self.inner.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..padding])
    }
}

/// Strips leading `/` (newc names are relative to the root) and rejects bad names.
fn normalize_name(name: &str) -> Result<&str, CpioError> {
    let trimmed = name.trim_start_matches('/');
    if trimmed.is_empty() || trimmed.contains('\0') || trimmed == TRAILER {
        return Err(CpioError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(trimmed)
}

fn to_u32(value: u64, name: &str, what: &'static str) -> Result<u32, CpioError> {
    u32::try_from(value).map_err(|_| CpioError::TooLarge {
        name: name.to_owned(),
        what,
    })
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// Full mode: file type bits and permissions.
    pub mode: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
    /// Device major number of a device node.
    pub rdev_major: u32,
    /// Device minor number of a device node.
    pub rdev_minor: u32,
    /// File contents, or the target of a symbolic link.
    pub data: Vec<u8>,
    /// Offset of this entry's header in the archive.
    pub header_offset: usize,
}

/// Parses a complete newc archive, checking magic, alignment and the trailer.
pub fn read_entries(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let malformed = |reason: &str| CpioError::Malformed {
            offset,
            reason: reason.to_owned(),
        };
        if offset % 4 != 0 {
            return Err(malformed("header is not 4-byte aligned"));
        }
        let header = bytes
            .get(offset..offset + HEADER_LEN)
            .ok_or_else(|| malformed("archive ends before the TRAILER!!! entry"))?;
        if &header[..6] != MAGIC {
            return Err(malformed("bad magic, expected 070701"));
        }
        let mut fields = [0u32; 13];
        for (index, field) in fields.iter_mut().enumerate() {
            let start = 6 + index * 8;
            let text = std::str::from_utf8(&header[start..start + 8])
                .map_err(|_| malformed("header field is not ASCII"))?;
            *field =
                u32::from_str_radix(text, 16).map_err(|_| malformed("header field is not hex"))?;
        }
        let [ino, mode, _uid, _gid, _nlink, mtime, filesize, _maj, _min, rdev_major, rdev_minor, namesize, _check] =
            fields;
        let name_start = offset + HEADER_LEN;
        let name_end = name_start
            .checked_add(namesize as usize)
            .ok_or_else(|| malformed("name size overflows"))?;
        let name_bytes = bytes
            .get(name_start..name_end)
            .ok_or_else(|| malformed("name runs past the end"))?;
        let name_bytes = name_bytes
            .strip_suffix(&[0])
            .ok_or_else(|| malformed("name is not NUL-terminated"))?;
        let name =
            String::from_utf8(name_bytes.to_vec()).map_err(|_| malformed("name is not UTF-8"))?;
        let data_start = align4(name_end);
        let data_end = data_start
            .checked_add(filesize as usize)
            .ok_or_else(|| malformed("file size overflows"))?;
        let data = bytes
            .get(data_start..data_end)
            .ok_or_else(|| malformed("file data runs past the end"))?;
        if bytes[name_end..data_start.min(bytes.len())]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(malformed("name padding is not zero"));
        }
        let header_offset = offset;
        offset = align4(data_end);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            ino,
            mode,
            mtime,
            rdev_major,
            rdev_minor,
            data: data.to_vec(),
            header_offset,
        });
    }
}

fn align4(value: usize) -> usize {
    (value + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("/dev", 0o755).expect("dir");
        writer.directory("bin", 0o755).expect("dir");
        writer
            .char_device("/dev/console", 0o600, 5, 1)
            .expect("console");
        writer.char_device("/dev/null", 0o666, 1, 3).expect("null");
        writer.file("/init", 0o755, b"#!agent\n").expect("file");
        writer.file("bin/a", 0o644, b"").expect("empty file");
        writer.file("bin/odd", 0o644, b"abcde").expect("odd file");
        let mut reader: &[u8] = b"streamed contents";
        writer
            .file_from_reader("bin/streamed", 0o600, 17, &mut reader)
            .expect("streamed");
        writer.symlink("/bin/sh", "/bin/busybox").expect("symlink");
        writer.finish().expect("finish")
    }

    #[test]
    fn round_trips_all_entry_kinds() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0, "archive length is padded");
        let entries = read_entries(&bytes).expect("parse");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "bin",
                "dev/console",
                "dev/null",
                "init",
                "bin/a",
                "bin/odd",
                "bin/streamed",
                "bin/sh"
            ]
        );
        for entry in &entries {
            assert_eq!(entry.header_offset % 4, 0, "{} header aligned", entry.name);
            assert_eq!(entry.mtime, 0);
        }
        let inodes: BTreeSet<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inodes.len(), entries.len(), "inode numbers are unique");
        assert!(!inodes.contains(&0));

        let by_name = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(by_name("dev").mode, S_IFDIR | 0o755);
        let console = by_name("dev/console");
        assert_eq!(console.mode, S_IFCHR | 0o600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        let null = by_name("dev/null");
        assert_eq!((null.rdev_major, null.rdev_minor), (1, 3));
        assert_eq!(by_name("init").mode, S_IFREG | 0o755);
        assert_eq!(by_name("init").data, b"#!agent\n");
        assert!(by_name("bin/a").data.is_empty());
        assert_eq!(by_name("bin/odd").data, b"abcde");
        assert_eq!(by_name("bin/streamed").data, b"streamed contents");
        let sh = by_name("bin/sh");
        assert_eq!(sh.mode & S_IFMT, S_IFLNK);
        assert_eq!(sh.data, b"/bin/busybox");

        // The trailer is the last header and the file ends right after its padding.
        let trailer_at = bytes
            .windows(10)
            .rposition(|w| w == b"TRAILER!!!")
            .expect("trailer")
            - HEADER_LEN;
        assert_eq!(trailer_at % 4, 0);
        assert_eq!(&bytes[trailer_at..trailer_at + 6], b"070701");
        assert_eq!(bytes.len(), align4(trailer_at + HEADER_LEN + 11));
    }

    #[test]
    fn header_layout_is_exact() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.file("ab", 0o644, b"xyz").expect("file");
        let bytes = writer.finish().expect("finish");
        let header = std::str::from_utf8(&bytes[..HEADER_LEN]).expect("ascii header");
        assert_eq!(
            header,
            "070701\
             00000001000081a4000000000000000000000001\
             0000000000000003000000000000000000000000\
             000000000000000300000000"
        );
        // 110 + 3 ("ab\0") = 113 → padded to 116; data 3 bytes → padded to 120.
        assert_eq!(&bytes[110..116], b"ab\0\0\0\0");
        assert_eq!(&bytes[116..120], b"xyz\0");
        assert_eq!(&bytes[120..126], b"070701");
    }

    #[test]
    fn rejects_bad_input() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(matches!(
            writer.file("/", 0o644, b""),
            Err(CpioError::InvalidName { .. })
        ));
        assert!(matches!(
            writer.file("a\0b", 0o644, b""),
            Err(CpioError::InvalidName { .. })
        ));
        let mut short: &[u8] = b"abc";
        assert!(matches!(
            writer.file_from_reader("x", 0o644, 10, &mut short),
            Err(CpioError::ShortRead { .. })
        ));
        let bytes = sample();
        assert!(read_entries(&bytes[..bytes.len() - 8]).is_err());
        assert!(read_entries(b"070702").is_err());
    }

    #[test]
    fn system_cpio_lists_the_same_names() {
        let Ok(status) = Command::new("cpio")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        else {
            eprintln!("note: cpio is not installed; skipping the cross-check with it");
            return;
        };
        assert!(status.success());
        let bytes = sample();
        let mut child = Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&bytes)
            .expect("feed cpio");
        let output = child.wait_with_output().expect("cpio output");
        assert!(output.status.success());
        let listed: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let ours: Vec<String> = read_entries(&bytes)
            .expect("parse")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(listed, ours);
    }
}
