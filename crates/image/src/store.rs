//! The cache of prepared images: `<cache_dir>/rootfs/<sha256 hex>/{disk.erofs|disk.ext4,
//! image.json}`, plus `sources.json` (stamp of a directory or tar → digest) and lock files.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::flatten::Flattener;
use crate::source::{self, DirKind, Image};
use crate::tempdirs::{self, OwnedTempDir};
use crate::{io_error, mkfs, FsType, ImageConfig, ImageError, Reference};

const RECORD: &str = "image.json";
const SOURCES: &str = "sources.json";

/// The cache of prepared images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    fs_type: FsType,
}

/// An image ready to be attached to a VM as a read-only disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreparedImage {
    /// `sha256:<hex>`: the manifest digest (OCI), config digest (docker) or tree/tar
    /// content digest (directory).
    pub digest: String,
    /// The filesystem image file.
    pub disk: PathBuf,
    pub fs_type: FsType,
    /// Length of the disk file.
    pub size_bytes: u64,
    pub config: ImageConfig,
    /// Whether it came from the cache (nothing was built).
    pub cached: bool,
}

/// One cached image, for `vmfactory image ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageEntry {
    pub digest: String,
    /// References it was prepared from (canonical paths, with `:TAG` when one was given).
    pub sources: Vec<String>,
    /// Disk images built of it.
    pub fs_types: Vec<FsType>,
    /// Bytes of its disk files.
    pub size_bytes: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last `prepare`.
    pub last_used: u64,
    /// Its cache directory.
    pub dir: PathBuf,
}

/// `image.json` of a cache entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    digest: String,
    sources: Vec<String>,
    config: ImageConfig,
    created: u64,
    last_used: u64,
}

/// `sources.json`: stamp of a directory or tar file → digest, so re-use does not re-hash.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Sources {
    entries: BTreeMap<String, Stamped>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stamped {
    stamp: String,
    digest: String,
}

/// What a cache entry is built from.
enum Content<'a> {
    /// Layers to flatten into a fresh tree.
    Layers(&'a Image),
    /// An existing tree (a root filesystem directory), the bytes of its files and the
    /// paths in it (relative) to leave out: vmfactory's cache directory.
    Tree(&'a Path, u64, &'a [PathBuf]),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An exclusive `flock` held until dropped.
#[derive(Debug)]
struct Lock(#[allow(dead_code)] File);

fn lock(path: &Path) -> Result<Lock, ImageError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error(format!("open lock {}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|err| {
        ImageError::Io {
            what: format!("lock {}", path.display()),
            source: err.into(),
        }
    })?;
    Ok(Lock(file))
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let data = serde_json::to_vec_pretty(value).map_err(|err| ImageError::Io {
        what: format!("encode {}", path.display()),
        source: err.into(),
    })?;
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io_error(format!("write {}", path.display())))?;
    fs::write(tmp.path(), data).map_err(io_error(format!("write {}", path.display())))?;
    tmp.persist(path)
        .map_err(|err| io_error(format!("write {}", path.display()))(err.error))?;
    Ok(())
}

impl ImageStore {
    /// The store under `<cache_dir>/rootfs` (`cache_dir` is normally
    /// `vmfactory_guest_image::default_cache_dir()`), building the default filesystem.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            root: cache_dir.join("rootfs"),
            fs_type: FsType::default(),
        }
    }

    /// Builds `fs_type` disks instead of the default.
    pub fn with_fs_type(mut self, fs_type: FsType) -> Self {
        self.fs_type = fs_type;
        self
    }

    /// `<cache_dir>/rootfs`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache directory (the store's parent) and the store itself as (device, inode):
    /// a root filesystem directory that holds them leaves them out of its image.
    fn own_dirs(&self) -> Vec<(u64, u64)> {
        let cache_dir = self
            .root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        [cache_dir, self.root.as_path()]
            .into_iter()
            .filter_map(|dir| fs::metadata(dir).ok())
            .map(|meta| (meta.dev(), meta.ino()))
            .collect()
    }

    fn entry_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join(source::sha256_of(digest)?))
    }

    /// Makes the disk of `reference` (see [`Reference`]): from the cache when the image's
    /// digest is there, else by flattening its layers and running mkfs. Concurrent calls
    /// for one image build it once.
    pub fn prepare(
        &self,
        reference: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PreparedImage, ImageError> {
        let reference = Reference::parse(reference)?;
        fs::create_dir_all(self.root.join("locks"))
            .map_err(io_error(format!("create {}", self.root.display())))?;
        // What builds killed by a signal left (they run no destructor).
        tempdirs::sweep(&self.root);
        let path = fs::canonicalize(&reference.path)
            .map_err(io_error(format!("resolve {}", reference.path.display())))?;
        let mut source_name = path.display().to_string();
        if let Some(tag) = &reference.tag {
            source_name = format!("{source_name}:{tag}");
        }
        let meta = fs::metadata(&path).map_err(io_error(format!("stat {}", path.display())))?;
        let tag = reference.tag.as_deref();
        if meta.is_dir() {
            match source::dir_kind(&path) {
                DirKind::Oci => {
                    let image = source::oci_image(&path, tag)?;
                    self.make(
                        &image.digest,
                        &image.config,
                        Content::Layers(&image),
                        &source_name,
                        progress,
                    )
                }
                DirKind::Docker => {
                    let image = source::docker_image(&path, tag)?;
                    self.make(
                        &image.digest,
                        &image.config,
                        Content::Layers(&image),
                        &source_name,
                        progress,
                    )
                }
                DirKind::Rootfs => {
                    if tag.is_some() {
                        return Err(ImageError::BadReference(format!(
                            "{} is a root filesystem directory: it has no tags",
                            path.display()
                        )));
                    }
                    let empty = fs::read_dir(&path)
                        .map_err(io_error(format!("read {}", path.display())))?
                        .next()
                        .is_none();
                    if empty {
                        return Err(ImageError::BadReference(format!(
                            "{} is empty: give a root filesystem directory (one made with \
                             debootstrap, say), an OCI image layout or a `docker save` archive",
                            path.display()
                        )));
                    }
                    let store = fs::canonicalize(&self.root)
                        .map_err(io_error(format!("resolve {}", self.root.display())))?;
                    if path.starts_with(&store) {
                        return Err(ImageError::BadReference(format!(
                            "{} is inside vmfactory's image cache {}: give a root filesystem \
                             directory outside it",
                            path.display(),
                            store.display()
                        )));
                    }
                    let own = self.own_dirs();
                    let (stamp, file_bytes, left_out) = dir_stamp(&path, &own)?;
                    for rel in &left_out {
                        tracing::info!(
                            tree = %path.display(),
                            left_out = %rel.display(),
                            "leaving vmfactory's cache directory out of the image"
                        );
                    }
                    let digest = match self.stamped(&source_name, &stamp)? {
                        Some(digest) => digest,
                        None => {
                            progress(&format!("hashing {}", path.display()));
                            let digest = dir_digest(&path, &own)?;
                            self.remember(&source_name, &stamp, &digest)?;
                            digest
                        }
                    };
                    let config = ImageConfig::rootfs_default();
                    self.make(
                        &digest,
                        &config,
                        Content::Tree(&path, file_bytes, &left_out),
                        &source_name,
                        progress,
                    )
                }
            }
        } else if meta.is_file() {
            let stamp = format!(
                "{}:{}:{}:{}.{}",
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            if let Some(digest) = self.stamped(&source_name, &stamp)? {
                if let Some(hit) = self.cached(&digest, &source_name)? {
                    return Ok(hit);
                }
            }
            progress(&format!("unpacking {}", path.display()));
            let unpacked = OwnedTempDir::new(&self.root, tempdirs::UNPACK)?;
            source::unpack_outer_tar(&path, unpacked.path())?;
            let image = match source::dir_kind(unpacked.path()) {
                DirKind::Oci => source::oci_image(unpacked.path(), tag)?,
                DirKind::Docker => source::docker_image(unpacked.path(), tag)?,
                DirKind::Rootfs => {
                    return Err(ImageError::BadReference(format!(
                        "{} is neither an OCI image layout tar (oci-layout, index.json) nor a \
                         `docker save` archive (manifest.json)",
                        path.display()
                    )))
                }
            };
            self.remember(&source_name, &stamp, &image.digest)?;
            self.make(
                &image.digest,
                &image.config,
                Content::Layers(&image),
                &source_name,
                progress,
            )
        } else {
            Err(ImageError::BadReference(format!(
                "{} is neither a directory nor a file",
                path.display()
            )))
        }
    }

    fn stamped(&self, source: &str, stamp: &str) -> Result<Option<String>, ImageError> {
        let _lock = lock(&self.root.join("locks/sources.lock"))?;
        let sources = self.read_sources();
        Ok(sources
            .entries
            .get(source)
            .filter(|s| s.stamp == stamp)
            .map(|s| s.digest.clone()))
    }

    fn read_sources(&self) -> Sources {
        fs::read(self.root.join(SOURCES))
            .ok()
            .and_then(|data| serde_json::from_slice(&data).ok())
            .unwrap_or_default()
    }

    fn remember(&self, source: &str, stamp: &str, digest: &str) -> Result<(), ImageError> {
        let _lock = lock(&self.root.join("locks/sources.lock"))?;
        let mut sources = self.read_sources();
        sources.entries.insert(
            source.to_string(),
            Stamped {
                stamp: stamp.to_string(),
                digest: digest.to_string(),
            },
        );
        write_json_atomic(&self.root.join(SOURCES), &sources)
    }

    /// The cached disk of `digest` in the store's filesystem, recording the use.
    fn cached(&self, digest: &str, source_name: &str) -> Result<Option<PreparedImage>, ImageError> {
        let dir = self.entry_dir(digest)?;
        let _lock = lock(
            &self
                .root
                .join("locks")
                .join(format!("{}.lock", source::sha256_of(digest)?)),
        )?;
        self.hit(&dir, source_name)
    }

    /// Under the entry's lock: the prepared image if its disk exists.
    fn hit(&self, dir: &Path, source_name: &str) -> Result<Option<PreparedImage>, ImageError> {
        let disk = dir.join(self.fs_type.file_name());
        let Some(mut record) = read_record(dir) else {
            return Ok(None);
        };
        let Ok(meta) = fs::metadata(&disk) else {
            return Ok(None);
        };
        record.last_used = now();
        if !record.sources.iter().any(|s| s == source_name) {
            record.sources.push(source_name.to_string());
        }
        write_json_atomic(&dir.join(RECORD), &record)?;
        Ok(Some(PreparedImage {
            digest: record.digest,
            disk,
            fs_type: self.fs_type,
            size_bytes: meta.len(),
            config: record.config,
            cached: true,
        }))
    }

    /// A free-space error names the store, not its staging directory.
    fn named_store(&self, mut err: ImageError) -> ImageError {
        if let ImageError::NoSpace { dir, .. } | ImageError::NoInodes { dir, .. } = &mut err {
            dir.clone_from(&self.root);
        }
        err
    }

    fn make(
        &self,
        digest: &str,
        config: &ImageConfig,
        content: Content<'_>,
        source_name: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PreparedImage, ImageError> {
        let hex = source::sha256_of(digest)?;
        let dir = self.root.join(hex);
        let _lock = lock(&self.root.join("locks").join(format!("{hex}.lock")))?;
        if let Some(hit) = self.hit(&dir, source_name)? {
            return Ok(hit);
        }
        let staging = OwnedTempDir::new(&self.root, tempdirs::STAGING)?;
        let disk_name = self.fs_type.file_name();
        let staged_disk = staging.path().join(disk_name);
        match content {
            Content::Tree(tree, file_bytes, left_out) => {
                if self.fs_type == FsType::Ext4 && !left_out.is_empty() {
                    return Err(ImageError::BadReference(format!(
                        "{} holds vmfactory's cache directory (at {}), which mkfs.ext4 cannot \
                         leave out of the image: build an EROFS disk (the default) or use a \
                         cache directory outside it (--cache-dir or VMFACTORY_CACHE_DIR)",
                        tree.display(),
                        tree.join(&left_out[0]).display()
                    )));
                }
                crate::space::ensure_room_for_disk(staging.path(), file_bytes)
                    .map_err(|err| self.named_store(err))?;
                progress(&format!(
                    "building {} image of {}",
                    self.fs_type,
                    tree.display()
                ));
                mkfs::build(self.fs_type, tree, &staged_disk, left_out)?;
            }
            Content::Layers(image) => {
                let rootfs = staging.path().join("rootfs");
                fs::create_dir(&rootfs)
                    .map_err(io_error(format!("create {}", rootfs.display())))?;
                let flattener = Flattener::new(&rootfs)?;
                let count = image.layers.len();
                for (i, layer) in image.layers.iter().enumerate() {
                    progress(&format!("applying layer {}/{count}", i + 1));
                    let stats = source::read_layer(layer, |tar| flattener.apply(tar))
                        .map_err(|err| self.named_store(err))?;
                    tracing::debug!(layer = i + 1, ?stats, "applied layer");
                }
                // The tree as flattened: later layers may have deleted much of what
                // earlier ones wrote.
                let mut file_bytes = FileBytes::default();
                walk(&rootfs, &mut |_, _, meta| {
                    file_bytes.add(meta);
                    Ok(true)
                })?;
                crate::space::ensure_room_for_disk(staging.path(), file_bytes.total)
                    .map_err(|err| self.named_store(err))?;
                progress(&format!("building {} image", self.fs_type));
                mkfs::build(self.fs_type, &rootfs, &staged_disk, &[])?;
                fs::remove_dir_all(&rootfs)
                    .map_err(io_error(format!("remove {}", rootfs.display())))?;
            }
        }
        let size_bytes = fs::metadata(&staged_disk)
            .map_err(io_error(format!("stat {}", staged_disk.display())))?
            .len();
        let time = now();
        let mut record = read_record(&dir).unwrap_or(Record {
            digest: digest.to_string(),
            sources: Vec::new(),
            config: config.clone(),
            created: time,
            last_used: time,
        });
        record.last_used = time;
        if !record.sources.iter().any(|s| s == source_name) {
            record.sources.push(source_name.to_string());
        }
        if dir.is_dir() {
            // The entry has the other filesystem already: add this disk to it.
            fs::rename(&staged_disk, dir.join(disk_name))
                .map_err(io_error(format!("move the disk into {}", dir.display())))?;
            write_json_atomic(&dir.join(RECORD), &record)?;
        } else {
            write_json_atomic(&staging.path().join(RECORD), &record)?;
            let (staged, _lock) = staging.keep();
            if let Err(err) = fs::rename(&staged, &dir) {
                let _ = fs::remove_dir_all(&staged);
                return Err(io_error(format!("move the image into {}", dir.display()))(
                    err,
                ));
            }
        }
        Ok(PreparedImage {
            digest: digest.to_string(),
            disk: dir.join(disk_name),
            fs_type: self.fs_type,
            size_bytes,
            config: record.config,
            cached: false,
        })
    }

    /// The cached images, least recently used first.
    pub fn list(&self) -> Result<Vec<ImageEntry>, ImageError> {
        let listing = match fs::read_dir(&self.root) {
            Ok(listing) => listing,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_error(format!("list {}", self.root.display()))(err)),
        };
        let mut entries = Vec::new();
        for child in listing {
            let child = child.map_err(io_error(format!("list {}", self.root.display())))?;
            let name = child.file_name();
            if name.len() != 64 || !name.as_bytes().iter().all(u8::is_ascii_hexdigit) {
                continue;
            }
            let dir = child.path();
            let Some(record) = read_record(&dir) else {
                continue;
            };
            let mut fs_types = Vec::new();
            let mut size_bytes = 0;
            for fs_type in FsType::ALL {
                if let Ok(meta) = fs::metadata(dir.join(fs_type.file_name())) {
                    fs_types.push(fs_type);
                    size_bytes += meta.len();
                }
            }
            entries.push(ImageEntry {
                digest: record.digest,
                sources: record.sources,
                fs_types,
                size_bytes,
                created: record.created,
                last_used: record.last_used,
                dir,
            });
        }
        entries.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.digest.cmp(&b.digest)));
        Ok(entries)
    }

    /// Removes a cached image named by its digest (`sha256:…` or hex), a unique prefix of
    /// it, or a reference it was prepared from.
    pub fn remove(&self, what: &str) -> Result<ImageEntry, ImageError> {
        let entries = self.list()?;
        let hex = what.strip_prefix("sha256:").unwrap_or(what);
        let mut matches: Vec<&ImageEntry> =
            if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                entries
                    .iter()
                    .filter(|e| {
                        e.digest
                            .trim_start_matches("sha256:")
                            .starts_with(&hex.to_ascii_lowercase())
                    })
                    .collect()
            } else {
                Vec::new()
            };
        if matches.is_empty() {
            let forms = recorded_forms(what);
            matches = entries
                .iter()
                .filter(|e| e.sources.iter().any(|s| forms.contains(s)))
                .collect();
        }
        let entry = match matches.as_slice() {
            [] => return Err(ImageError::NotCached(what.to_string())),
            [one] => (*one).clone(),
            many => {
                return Err(ImageError::Ambiguous(
                    what.to_string(),
                    many.iter()
                        .map(|e| e.digest.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                ))
            }
        };
        let hex = source::sha256_of(&entry.digest)?;
        let lock_path = self.root.join("locks").join(format!("{hex}.lock"));
        {
            let _lock = lock(&lock_path)?;
            fs::remove_dir_all(&entry.dir)
                .map_err(io_error(format!("remove {}", entry.dir.display())))?;
        }
        let _ = fs::remove_file(&lock_path);
        let _lock = lock(&self.root.join("locks/sources.lock"))?;
        let mut sources = self.read_sources();
        sources.entries.retain(|_, s| s.digest != entry.digest);
        write_json_atomic(&self.root.join(SOURCES), &sources)?;
        Ok(entry)
    }
}

/// The strings `what` (a reference given to `remove`) may have been recorded as, the way
/// `prepare` records sources: as given, and its absolute form, the whole of it and (when
/// it ends in `:TAG`) the path before the tag. The file need not exist any more.
fn recorded_forms(what: &str) -> Vec<String> {
    let mut forms = vec![what.to_string()];
    let mut split = vec![(what, None)];
    if let Some((path, tag)) = what.rsplit_once(':') {
        if !tag.is_empty() && !tag.contains('/') {
            split.push((path, Some(tag)));
        }
    }
    for (path, tag) in split {
        if path.is_empty() {
            continue;
        }
        if let Some(absolute) = absolute_path(Path::new(path)) {
            let absolute = absolute.display().to_string();
            forms.push(match tag {
                Some(tag) => format!("{absolute}:{tag}"),
                None => absolute,
            });
        }
    }
    forms
}

/// `path` as `prepare` records it (canonical), also when it no longer exists: its longest
/// existing ancestor canonical, the rest appended (`.` and `..` in the rest taken
/// lexically).
fn absolute_path(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    let parts: Vec<Component<'_>> = absolute.components().collect();
    (1..=parts.len()).rev().find_map(|existing| {
        let mut out = fs::canonicalize(parts[..existing].iter().collect::<PathBuf>()).ok()?;
        for part in &parts[existing..] {
            match part {
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(name) => out.push(name),
                _ => {}
            }
        }
        Some(out)
    })
}

fn read_record(dir: &Path) -> Option<Record> {
    let data = fs::read(dir.join(RECORD)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Walks a tree (not following symlinks), calling `visit` with each entry's path relative
/// to the root, its path and its metadata, in a stable (sorted) order. A directory for
/// which `visit` returns `false` is not entered.
pub(crate) fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> Result<bool, ImageError>,
) -> Result<(), ImageError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut children = fs::read_dir(&dir)
            .map_err(io_error(format!("list {}", dir.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error(format!("list {}", dir.display())))?;
        children.sort_by_key(|e| e.file_name());
        for child in children.into_iter().rev() {
            let rel = rel.join(child.file_name());
            // fstatat on the listed directory, not following symlinks.
            let meta = child
                .metadata()
                .map_err(io_error(format!("stat {}", child.path().display())))?;
            if visit(&rel, &child.path(), &meta)? && meta.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// Whether `meta` is one of the directories `own` (device, inode) that a walk of a root
/// filesystem directory leaves out.
fn is_own(meta: &fs::Metadata, own: &[(u64, u64)]) -> bool {
    meta.is_dir() && own.contains(&(meta.dev(), meta.ino()))
}

/// The stamp of a tree: path, inode, size, mode, owner, mtime and ctime of every entry.
/// Any change to the tree changes it; computing it only stats. Also the bytes of the
/// tree's regular files (about the size of a disk built from it), and where (relative to
/// `root`) it met the directories `own` (device, inode: vmfactory's cache), which it
/// leaves out.
pub(crate) fn dir_stamp(
    root: &Path,
    own: &[(u64, u64)],
) -> Result<(String, u64, Vec<PathBuf>), ImageError> {
    let mut hasher = Sha256::new();
    let top = fs::symlink_metadata(root).map_err(io_error(format!("stat {}", root.display())))?;
    hasher.update(format!(
        "{}:{}:{}.{}\n",
        top.dev(),
        top.ino(),
        top.ctime(),
        top.ctime_nsec()
    ));
    // Collected, then hashed once: cheaper than many small updates.
    let mut record = Vec::with_capacity(1 << 20);
    let mut file_bytes = FileBytes::default();
    let mut left_out = Vec::new();
    walk(root, &mut |rel, _, meta| {
        if is_own(meta, own) {
            left_out.push(rel.to_path_buf());
            return Ok(false);
        }
        file_bytes.add(meta);
        record.extend_from_slice(rel.as_os_str().as_bytes());
        for n in [
            meta.ino(),
            meta.size(),
            u64::from(meta.mode()),
            u64::from(meta.uid()),
            u64::from(meta.gid()),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ] {
            record.extend_from_slice(&n.to_le_bytes());
        }
        record.push(0);
        Ok(true)
    })?;
    hasher.update(&record);
    Ok((
        format!("{:x}", hasher.finalize()),
        file_bytes.total,
        left_out,
    ))
}

/// The bytes of a tree's regular files, each hard-linked file once.
#[derive(Debug, Default)]
struct FileBytes {
    total: u64,
    linked: std::collections::HashSet<(u64, u64)>,
}

impl FileBytes {
    fn add(&mut self, meta: &fs::Metadata) {
        if !meta.is_file() || (meta.nlink() > 1 && !self.linked.insert((meta.dev(), meta.ino()))) {
            return;
        }
        self.total = self.total.saturating_add(meta.size());
    }
}

/// The content digest of a tree: paths, types, modes, owners, file contents, symlink
/// targets and device numbers (not times, not inode numbers), leaving out the directories
/// `own` (device, inode: vmfactory's cache).
pub(crate) fn dir_digest(root: &Path, own: &[(u64, u64)]) -> Result<String, ImageError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    walk(root, &mut |rel, abs, meta| {
        if is_own(meta, own) {
            return Ok(false);
        }
        hasher.update(rel.as_os_str().as_bytes());
        hasher.update(format!("\0{}:{}:{}:", meta.mode(), meta.uid(), meta.gid()));
        let kind = meta.file_type();
        if kind.is_file() {
            let mut file = File::open(abs).map_err(io_error(format!("open {}", abs.display())))?;
            let mut content = Sha256::new();
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(io_error(format!("read {}", abs.display())))?;
                if n == 0 {
                    break;
                }
                content.update(&buf[..n]);
            }
            hasher.update(content.finalize());
        } else if kind.is_symlink() {
            let target =
                fs::read_link(abs).map_err(io_error(format!("read link {}", abs.display())))?;
            hasher.update(target.as_os_str().as_bytes());
        } else if !kind.is_dir() {
            hasher.update(meta.rdev().to_le_bytes());
        }
        hasher.update(b"\n");
        Ok(true)
    })?;
    Ok(format!("sha256:{:x}", hasher.finalize()))
}
