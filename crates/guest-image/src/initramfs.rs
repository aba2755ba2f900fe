//! The layout of the guest's initramfs: base directories and device nodes, the agent as
//! `/init`, kernel modules with their load order, and busybox with its applet links.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cpio::{CpioError, CpioWriter};

/// Directory that holds the modules (flat) and their `load-order` file.
pub const MODULES_DIR: &str = "lib/modules";
/// Path of the file listing module file names in load order, one per line.
pub const LOAD_ORDER_PATH: &str = "lib/modules/load-order";
/// Path of the busybox binary; every applet link points here.
pub const BUSYBOX_PATH: &str = "bin/busybox";

const BASE_DIRS: [(&str, u32); 14] = [
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("etc", 0o755),
    ("root", 0o700),
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("lib", 0o755),
    ("lib/modules", 0o755),
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";

/// Errors of writing the initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// A source file could not be read.
    #[error("Could not read {}, which goes into the initramfs; check that it exists and is readable", path.display())]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The archive could not be written.
    #[error("Could not write the initramfs {}; check free space in the cache directory", path.display())]
    Write {
        /// The archive being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: CpioError,
    },
}

/// A kernel module to place in the initramfs.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    /// Canonical module name.
    pub name: String,
    /// The `.ko` file on the host.
    pub source: PathBuf,
}

impl ModuleFile {
    /// File name inside `/lib/modules` (the module's own file name).
    pub fn file_name(&self) -> String {
        self.source
            .file_name()
            .and_then(|n| n.to_str())
            .map_or_else(|| format!("{}.ko", self.name), str::to_owned)
    }
}

/// Everything that goes into the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsContents {
    /// The agent executable, installed as `/init`.
    pub agent: PathBuf,
    /// The static busybox binary, installed as `/bin/busybox`.
    pub busybox: PathBuf,
    /// Applet paths (such as `bin/sh`) to link to busybox.
    pub applets: Vec<String>,
    /// Modules in load order.
    pub modules: Vec<ModuleFile>,
}

/// Turns `busybox --list-full` output into the applet paths to link, skipping `init`
/// and `linuxrc` (the agent is the init) and busybox itself.
pub fn applet_paths(list_full: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    list_full
        .lines()
        .map(|line| line.trim().trim_start_matches('/'))
        .filter(|path| !path.is_empty() && !path.contains(".."))
        .filter(|path| {
            let file = path.rsplit('/').next().unwrap_or(path);
            file != "init" && file != "linuxrc" && *path != BUSYBOX_PATH
        })
        .filter(|path| seen.insert((*path).to_owned()))
        .map(str::to_owned)
        .collect()
}

/// A cpio writer that tracks names, creates missing parent directories and skips
/// duplicates.
struct Tree<W: Write> {
    writer: CpioWriter<W>,
    names: BTreeSet<String>,
}

impl<W: Write> Tree<W> {
    /// Returns `false` (and writes nothing) if `name` already exists; adds parents.
    fn claim(&mut self, name: &str) -> Result<bool, CpioError> {
        let name = name.trim_start_matches('/');
        if self.names.contains(name) {
            tracing::debug!(name, "skipping duplicate initramfs entry");
            return Ok(false);
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !self.names.contains(parent) && self.claim(parent)? {
                self.writer.directory(parent, 0o755)?;
            }
        }
        self.names.insert(name.to_owned());
        Ok(true)
    }
}

/// Writes the initramfs described by `contents` to `path` as an uncompressed newc cpio.
pub fn write_initramfs(path: &Path, contents: &InitramfsContents) -> Result<(), InitramfsError> {
    let write_err = |source: CpioError| InitramfsError::Write {
        path: path.to_owned(),
        source,
    };
    let file = File::create(path).map_err(|source| write_err(source.into()))?;
    let mut tree = Tree {
        writer: CpioWriter::new(BufWriter::new(file)),
        names: BTreeSet::new(),
    };
    write_tree(&mut tree, contents).map_err(|err| match err {
        TreeError::Read(path, source) => InitramfsError::Read { path, source },
        TreeError::Cpio(source) => write_err(source),
    })?;
    let inner = tree.writer.finish().map_err(write_err)?;
    let file = inner
        .into_inner()
        .map_err(|err| write_err(err.into_error().into()))?;
    file.sync_all().map_err(|source| write_err(source.into()))?;
    Ok(())
}

enum TreeError {
    Read(PathBuf, io::Error),
    Cpio(CpioError),
}

impl From<CpioError> for TreeError {
    fn from(err: CpioError) -> Self {
        Self::Cpio(err)
    }
}

fn add_file<W: Write>(
    tree: &mut Tree<W>,
    name: &str,
    perm: u32,
    source: &Path,
) -> Result<(), TreeError> {
    if !tree.claim(name)? {
        return Ok(());
    }
    let read_err = |err| TreeError::Read(source.to_owned(), err);
    let mut file = File::open(source).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    tree.writer.file_from_reader(name, perm, size, &mut file)?;
    Ok(())
}

fn write_tree<W: Write>(tree: &mut Tree<W>, contents: &InitramfsContents) -> Result<(), TreeError> {
    for (dir, perm) in BASE_DIRS {
        if tree.claim(dir)? {
            tree.writer.directory(dir, perm)?;
        }
    }
    if tree.claim("dev/console")? {
        tree.writer.char_device("dev/console", 0o600, 5, 1)?;
    }
    if tree.claim("dev/null")? {
        tree.writer.char_device("dev/null", 0o666, 1, 3)?;
    }
    add_file(tree, "init", 0o755, &contents.agent)?;

    let mut load_order = String::new();
    for module in &contents.modules {
        let file_name = module.file_name();
        add_file(
            tree,
            &format!("{MODULES_DIR}/{file_name}"),
            0o644,
            &module.source,
        )?;
        load_order.push_str(&file_name);
        load_order.push('\n');
    }
    if tree.claim(LOAD_ORDER_PATH)? {
        tree.writer
            .file(LOAD_ORDER_PATH, 0o644, load_order.as_bytes())?;
    }

    for (name, text) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        if tree.claim(name)? {
            tree.writer.file(name, 0o644, text.as_bytes())?;
        }
    }

    add_file(tree, BUSYBOX_PATH, 0o755, &contents.busybox)?;
    let target = format!("/{BUSYBOX_PATH}");
    for applet in &contents.applets {
        if tree.claim(applet)? {
            tree.writer.symlink(applet, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{read_entries, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
    use std::fs;

    #[test]
    fn applet_list_skips_init_linuxrc_busybox_and_duplicates() {
        let list = "usr/bin/[\nbin/busybox\nsbin/init\nlinuxrc\nbin/sh\nbin/sh\n\n/usr/sbin/chroot\nsbin/run-init\n../etc/x\n";
        assert_eq!(
            applet_paths(list),
            ["usr/bin/[", "bin/sh", "usr/sbin/chroot", "sbin/run-init"]
        );
    }

    #[test]
    fn writes_the_full_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, data: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, data).expect("write");
            path
        };
        let contents = InitramfsContents {
            agent: write("agent", b"AGENT"),
            busybox: write("busybox", b"BUSYBOX!"),
            applets: applet_paths("bin/sh\nbin/ls\nsbin/init\nopt/extra/tool\nbin/busybox\n"),
            modules: vec![
                ModuleFile {
                    name: "virtio_ring".into(),
                    source: write("virtio_ring.ko", b"ring"),
                },
                ModuleFile {
                    name: "virtio_rng".into(),
                    source: write("virtio-rng.ko", b"rng"),
                },
            ],
        };
        let image = dir.path().join("initrd.img");
        write_initramfs(&image, &contents).expect("write initramfs");
        let entries = read_entries(&fs::read(&image).expect("read")).expect("parse");
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        for dir in [
            "dev",
            "proc",
            "sys",
            "tmp",
            "usr/sbin",
            "lib/modules",
            "opt",
            "opt/extra",
        ] {
            assert_eq!(find(dir).mode & S_IFMT, S_IFDIR, "{dir}");
        }
        assert_eq!(find("tmp").mode, S_IFDIR | 0o1777);
        assert_eq!(find("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(find("dev/null").rdev_minor, 3);
        assert_eq!(find("init").mode, S_IFREG | 0o755);
        assert_eq!(find("init").data, b"AGENT");
        assert_eq!(find("bin/busybox").data, b"BUSYBOX!");
        assert_eq!(find("lib/modules/virtio-rng.ko").data, b"rng");
        assert_eq!(
            find(LOAD_ORDER_PATH).data,
            b"virtio_ring.ko\nvirtio-rng.ko\n"
        );
        assert_eq!(find("bin/sh").mode & S_IFMT, S_IFLNK);
        assert_eq!(find("opt/extra/tool").data, b"/bin/busybox");
        assert!(find("etc/passwd").data.starts_with(b"root:x:0:0:"));
        assert!(entries.iter().all(|e| e.name != "sbin/init"));
        let names: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names.len(), entries.len(), "no duplicate names");
        // Every entry's parent directory comes before it.
        for (index, entry) in entries.iter().enumerate() {
            if let Some((parent, _)) = entry.name.rsplit_once('/') {
                assert!(
                    entries[..index].iter().any(|e| e.name == parent),
                    "{} before its parent",
                    entry.name
                );
            }
        }
    }

    #[test]
    fn missing_source_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let contents = InitramfsContents {
            agent: dir.path().join("no-agent"),
            busybox: dir.path().join("no-busybox"),
            applets: Vec::new(),
            modules: Vec::new(),
        };
        let err = write_initramfs(&dir.path().join("initrd.img"), &contents).expect_err("fails");
        assert!(matches!(err, InitramfsError::Read { ref path, .. } if path.ends_with("no-agent")));
    }
}
