//! The current-image manifest, `current.json` in the cache root: which image is current
//! for which build options, with stamps (size, modification time, inode) of its files.
//! [`current`] answers "which image do I boot?" from it with a few `stat` calls: no apt,
//! no dpkg, no cargo, no hashing. Only a full [`build`](crate::build) writes it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_error, GuestImageError};
use crate::image::{read_manifest, rebased, GuestImage, Manifest, MANIFEST_FILE};
use crate::kernel::{kernel_recipe_digest, KernelSource};
use crate::{BuildOptions, DEFAULT_KERNEL_PACKAGE, FORMAT_VERSION};

/// Name of the current-image manifest in the cache root.
pub const CURRENT_FILE: &str = "current.json";

/// Version of the `current.json` layout.
const CURRENT_FORMAT_VERSION: u32 = 1;

/// How many option sets `current.json` remembers (newest first).
const MAX_ENTRIES: usize = 16;

/// What identifies a file's contents without reading them: size, modification time and
/// inode. Replacing or rewriting a file changes at least one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: i64,
    /// Inode number.
    pub inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` now (one `stat`).
    pub fn of(path: &Path) -> io::Result<Self> {
        let metadata = fs::metadata(path)?;
        Ok(Self {
            size: metadata.len(),
            mtime_sec: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
            inode: metadata.ino(),
        })
    }

    /// True when the file at `path` still has this stamp.
    pub fn matches(&self, path: &Path) -> bool {
        Self::of(path).is_ok_and(|now| now == *self)
    }
}

/// An agent file as it was given, so that an `--agent PATH` override is recognised by
/// its stamp instead of by hashing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentFile {
    path: PathBuf,
    stamp: FileStamp,
}

/// The current image for one set of build options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CurrentEntry {
    /// vmfactory's kernel or Debian's (entries from before the choice: Debian's).
    #[serde(default = "KernelSource::legacy")]
    kernel: KernelSource,
    /// Kernel meta package as requested (before apt resolved it).
    kernel_package: String,
    /// Root modules, canonicalised.
    modules: Vec<String>,
    /// [`kernel_recipe_digest`] of the vmfactory that built a vmfactory-kernel image
    /// (empty for Debian's kernel, and in entries written before it was recorded).
    #[serde(default)]
    kernel_recipe: String,
    /// SHA-256 of the agent.
    agent_sha256: String,
    /// The agent file the image was built from, with its stamp.
    agent: Option<AgentFile>,
    /// Key of the image, the name of its directory under `images/`.
    key: String,
    /// Stamps of the image's files, by file name.
    files: BTreeMap<String, FileStamp>,
}

/// Contents of `current.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct CurrentImages {
    format_version: u32,
    images: Vec<CurrentEntry>,
}

/// The options part of an entry: what the caller asked for.
struct Wanted<'a> {
    kernel: KernelSource,
    kernel_package: &'a str,
    modules: Vec<String>,
    kernel_recipe: String,
}

impl<'a> Wanted<'a> {
    fn of(options: &'a BuildOptions) -> Self {
        Self {
            kernel: options.kernel,
            kernel_package: options
                .kernel_package
                .as_deref()
                .unwrap_or(DEFAULT_KERNEL_PACKAGE),
            modules: options.root_modules(),
            kernel_recipe: match options.kernel {
                KernelSource::Vmfactory => kernel_recipe_digest(),
                KernelSource::Debian => String::new(),
            },
        }
    }

    fn matches(&self, entry: &CurrentEntry) -> bool {
        entry.kernel == self.kernel
            && entry.kernel_package == self.kernel_package
            && entry.modules == self.modules
            && entry.kernel_recipe == self.kernel_recipe
    }
}

/// Files of an image that must keep their stamps: its manifest, kernels and initramfs.
fn image_files(manifest: &Manifest) -> Vec<&'static str> {
    let mut files = vec![MANIFEST_FILE, "vmlinuz", "initrd.img"];
    if manifest.image.vmlinux.is_some() {
        files.push("vmlinux");
    }
    files
}

fn current_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(CURRENT_FILE)
}

/// Reads `current.json`; a missing or unreadable file counts as empty.
fn read_current(cache_dir: &Path) -> CurrentImages {
    read_current_checked(cache_dir).unwrap_or_default()
}

/// Reads `current.json`; `None` (said in the log unless it is missing) when it is
/// missing, unreadable or of another version.
fn read_current_checked(cache_dir: &Path) -> Option<CurrentImages> {
    let path = current_path(cache_dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) => {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %err, "cannot read the current-image manifest");
            }
            return None;
        }
    };
    match serde_json::from_slice::<CurrentImages>(&bytes) {
        Ok(current) if current.format_version == CURRENT_FORMAT_VERSION => Some(current),
        Ok(_) => {
            tracing::info!(path = %path.display(), "ignoring a current-image manifest of another version");
            None
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "ignoring an unreadable current-image manifest");
            None
        }
    }
}

/// Keys of the images `current.json` names, one per remembered option set; `None` when
/// the file is missing or unreadable (then nothing can be told unused).
pub(crate) fn current_image_keys(cache_dir: &Path) -> Option<Vec<String>> {
    read_current_checked(cache_dir)
        .map(|current| current.images.into_iter().map(|entry| entry.key).collect())
}

/// The current image for `options`, if `current.json` names one whose files are unchanged
/// since it was recorded. The agent is matched by `options.agent_sha256` when given, else
/// by the stamp of `options.agent_binary`. Runs no program and hashes nothing: this is the
/// lookup of every `run`.
pub fn current(options: &BuildOptions) -> Option<GuestImage> {
    current_manifest(options).map(|(manifest, dir)| rebased(manifest.image, &dir))
}

/// [`current`], with the whole manifest and the image directory.
pub(crate) fn current_manifest(options: &BuildOptions) -> Option<(Manifest, PathBuf)> {
    let wanted = Wanted::of(options);
    let recorded = read_current(&options.cache_dir);
    let entry = recorded.images.iter().find(|entry| {
        wanted.matches(entry)
            && match &options.agent_sha256 {
                Some(digest) => entry.agent_sha256 == *digest,
                None => entry.agent.as_ref().is_some_and(|agent| {
                    agent.path == absolute(&options.agent_binary)
                        && agent.stamp.matches(&agent.path)
                }),
            }
    })?;
    let dir = options.cache_dir.join("images").join(&entry.key);
    if !stamps_match(entry, &dir) {
        tracing::info!(dir = %dir.display(), "the current guest image changed on disk; it will be checked");
        return None;
    }
    let manifest = match read_manifest(&dir) {
        Ok(manifest) => manifest,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot read the current guest image's manifest");
            return None;
        }
    };
    if manifest.format_version != FORMAT_VERSION || manifest.image.key != entry.key {
        return None;
    }
    let complete = image_files(&manifest)
        .iter()
        .all(|name| entry.files.contains_key(*name));
    complete.then_some((manifest, dir))
}

/// True when every recorded file of `entry` in `dir` still has its stamp.
fn stamps_match(entry: &CurrentEntry, dir: &Path) -> bool {
    !entry.files.is_empty()
        && entry
            .files
            .iter()
            .all(|(name, stamp)| stamp.matches(&dir.join(name)))
}

/// True when `current.json` records the image `key` with stamps its files still have:
/// the files are the ones that were built (or verified) then.
pub(crate) fn is_recorded_unchanged(cache_dir: &Path, key: &str) -> bool {
    let dir = cache_dir.join("images").join(key);
    read_current(cache_dir)
        .images
        .iter()
        .any(|entry| entry.key == key && stamps_match(entry, &dir))
}

/// Records `image` as current for `options` (built with an agent of `agent_sha256`),
/// replacing what was current for the same options. Updated under a lock and written
/// atomically.
pub(crate) fn record_current(
    options: &BuildOptions,
    agent_sha256: &str,
    manifest: &Manifest,
    dir: &Path,
) -> Result<(), GuestImageError> {
    let mut files = BTreeMap::new();
    for name in image_files(manifest) {
        let path = dir.join(name);
        files.insert(
            name.to_owned(),
            FileStamp::of(&path).map_err(io_error(&path))?,
        );
    }
    let agent_path = absolute(&options.agent_binary);
    let agent = FileStamp::of(&agent_path).ok().map(|stamp| AgentFile {
        path: agent_path,
        stamp,
    });
    let wanted = Wanted::of(options);
    let entry = CurrentEntry {
        kernel: wanted.kernel,
        kernel_package: wanted.kernel_package.to_owned(),
        modules: wanted.modules.clone(),
        kernel_recipe: wanted.kernel_recipe.clone(),
        agent_sha256: agent_sha256.to_owned(),
        agent,
        key: manifest.image.key.clone(),
        files,
    };

    // Concurrent builds (say, two test binaries) must not drop each other's entries.
    let _lock = lock_current(&options.cache_dir)?;
    let mut current = read_current(&options.cache_dir);
    current.format_version = CURRENT_FORMAT_VERSION;
    current.images.retain(|old| {
        let same_options = wanted.matches(old)
            && (old.agent_sha256 == entry.agent_sha256
                || (old.agent.is_some()
                    && old.agent.as_ref().map(|a| &a.path)
                        == entry.agent.as_ref().map(|a| &a.path)));
        !same_options
    });
    current.images.insert(0, entry);
    current.images.truncate(MAX_ENTRIES);
    write_current(&options.cache_dir, &current)
}

/// Takes an exclusive lock on `cache_dir/.current.lock` (released when the returned file
/// is closed), serialising read-modify-write cycles of `current.json`. Readers need no
/// lock: the file is replaced by a rename.
fn lock_current(cache_dir: &Path) -> Result<fs::File, GuestImageError> {
    let path = cache_dir.join(".current.lock");
    let file = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))?;
    loop {
        // SAFETY: flock takes a file descriptor that `file` owns and keeps open for the
        // duration of the call; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(io_error(&path)(err));
        }
    }
}

/// Writes `current.json` through a temporary file and a rename.
fn write_current(cache_dir: &Path, current: &CurrentImages) -> Result<(), GuestImageError> {
    let path = current_path(cache_dir);
    let mut json =
        serde_json::to_vec_pretty(current).map_err(|source| GuestImageError::Manifest {
            path: path.clone(),
            source,
        })?;
    json.push(b'\n');
    let mut file = tempfile::Builder::new()
        .prefix(".current-")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(cache_dir)
        .map_err(io_error(cache_dir))?;
    file.write_all(&json).map_err(io_error(&path))?;
    file.as_file().sync_all().map_err(io_error(&path))?;
    file.persist(&path).map_err(|err| GuestImageError::Io {
        path: path.clone(),
        source: err.error,
    })?;
    Ok(())
}

/// `path` made absolute against the current directory (no file system access).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::tests::inputs;
    use std::fs::File;
    use std::time::{Duration, SystemTime};

    /// Writes a fake image with a manifest under `cache/images/<key>/`.
    pub(crate) fn fake_image(cache: &Path, key: &str) -> Manifest {
        let dir = cache.join("images").join(key);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("vmlinuz"), b"bzImage").expect("write");
        fs::write(dir.join("initrd.img"), b"cpio").expect("write");
        let image = rebased(
            GuestImage {
                dir: dir.clone(),
                kernel: PathBuf::new(),
                bzimage: PathBuf::new(),
                vmlinux: None,
                initrd: PathBuf::new(),
                kernel_release: "6.1.0-99-cloud-amd64".into(),
                kernel_package: "linux-image-6.1.0-99-cloud-amd64".into(),
                kernel_version: "6.1.999-1".into(),
                key: key.into(),
                kernel_source: KernelSource::Debian,
            },
            &dir,
        );
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            image,
            busybox_package: "busybox-static".into(),
            busybox_version: "1".into(),
            inputs: inputs(),
            module_load_order: vec![],
            vmlinuz_sha256: String::new(),
            vmlinux_sha256: None,
            initrd_sha256: String::new(),
        };
        fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        manifest
    }

    fn options(cache: &Path, agent: &Path, digest: Option<&str>) -> BuildOptions {
        BuildOptions {
            cache_dir: cache.to_owned(),
            agent_binary: agent.to_owned(),
            agent_sha256: digest.map(str::to_owned),
            kernel: KernelSource::Debian,
            ..BuildOptions::default()
        }
    }

    #[test]
    fn stamps_change_with_size_mtime_and_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        fs::write(&path, b"abc").expect("write");
        let stamp = FileStamp::of(&path).expect("stamp");
        assert!(stamp.matches(&path), "unchanged file is current");

        // Same size, other modification time.
        let earlier = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(earlier))
            .expect("set mtime");
        assert!(!stamp.matches(&path), "a new mtime is stale");
        let stamp = FileStamp::of(&path).expect("stamp");

        // Other size, same modification time.
        fs::write(&path, b"abcd").expect("write");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(earlier))
            .expect("set mtime");
        assert!(!stamp.matches(&path), "a new size is stale");

        // Replaced by another file of the same size and mtime: the inode differs.
        let stamp = FileStamp::of(&path).expect("stamp");
        let other = dir.path().join("other");
        fs::write(&other, b"wxyz").expect("write");
        File::options()
            .write(true)
            .open(&other)
            .and_then(|f| f.set_modified(earlier))
            .expect("set mtime");
        fs::rename(&other, &path).expect("rename");
        assert!(!stamp.matches(&path), "a replaced file is stale");

        fs::remove_file(&path).expect("rm");
        assert!(!stamp.matches(&path), "a missing file is stale");
    }

    #[test]
    fn current_follows_the_recorded_stamps() {
        let cache = tempfile::tempdir().expect("tempdir");
        let agent = cache.path().join("agent");
        fs::write(&agent, b"agent").expect("write");
        let digest = "cc".repeat(32);
        let opts = options(cache.path(), &agent, Some(&digest));
        assert_eq!(current(&opts), None, "nothing recorded yet");

        let manifest = fake_image(cache.path(), "k1");
        let dir = cache.path().join("images/k1");
        record_current(&opts, &digest, &manifest, &dir).expect("record");
        let image = current(&opts).expect("current");
        assert_eq!(image, manifest.image);
        assert!(is_recorded_unchanged(cache.path(), "k1"));

        // Other options or another agent digest have no current image.
        let other_agent = options(cache.path(), &agent, Some(&"dd".repeat(32)));
        assert_eq!(current(&other_agent), None);
        let other_modules = BuildOptions {
            modules: vec!["virtio_blk".into()],
            ..opts.clone()
        };
        assert_eq!(current(&other_modules), None);
        // Module names are compared canonically.
        let dashed = BuildOptions {
            modules: crate::DEFAULT_MODULES
                .iter()
                .map(|m| m.replace('_', "-"))
                .collect(),
            ..opts.clone()
        };
        assert_eq!(current(&dashed), Some(image.clone()));
        // vmfactory's kernel is another image, even with the same agent.
        let ours = BuildOptions {
            kernel: KernelSource::Vmfactory,
            ..opts.clone()
        };
        assert_eq!(current(&ours), None);

        // An agent override without a digest is recognised by its stamp.
        let by_path = options(cache.path(), &agent, None);
        assert_eq!(current(&by_path), Some(image.clone()));
        fs::write(&agent, b"new agent").expect("write");
        assert_eq!(
            current(&by_path),
            None,
            "a changed agent file is not current"
        );
        assert_eq!(current(&opts), Some(image.clone()), "the digest still is");

        // A changed image file makes the image stale.
        fs::write(dir.join("initrd.img"), b"other cpio").expect("write");
        assert_eq!(current(&opts), None);
        assert!(!is_recorded_unchanged(cache.path(), "k1"));

        // Recording again (after a build verified the files) makes it current again, and
        // replaces the entry of the same options instead of adding one.
        record_current(&opts, &digest, &manifest, &dir).expect("record");
        assert_eq!(current(&opts), Some(image));
        let manifest2 = fake_image(cache.path(), "k2");
        record_current(&opts, &digest, &manifest2, &cache.path().join("images/k2"))
            .expect("record");
        assert_eq!(current(&opts).map(|i| i.key), Some("k2".to_owned()));
        assert_eq!(read_current(cache.path()).images.len(), 1);
    }

    #[test]
    fn a_vmfactory_kernel_of_another_recipe_is_not_current() {
        let cache = tempfile::tempdir().expect("tempdir");
        let digest = "cc".repeat(32);
        let ours = BuildOptions {
            kernel: KernelSource::Vmfactory,
            ..options(cache.path(), Path::new("/agent"), Some(&digest))
        };
        let manifest = fake_image(cache.path(), "k");
        record_current(&ours, &digest, &manifest, &cache.path().join("images/k")).expect("record");
        assert_eq!(current(&ours), Some(manifest.image.clone()));
        let recorded = read_current(cache.path());
        assert_eq!(recorded.images[0].kernel_recipe, kernel_recipe_digest());

        // The entry a vmfactory with other patches or another fragment wrote (or one from
        // before the recipe was recorded): this vmfactory builds its own kernel instead.
        for other in ["0".repeat(64), String::new()] {
            let mut changed = recorded.clone();
            changed.images[0].kernel_recipe = other;
            write_current(cache.path(), &changed).expect("write");
            assert_eq!(current(&ours), None);
        }
    }

    #[test]
    fn a_corrupt_current_file_means_no_current_image() {
        let cache = tempfile::tempdir().expect("tempdir");
        fs::write(cache.path().join(CURRENT_FILE), b"{not json").expect("write");
        let opts = options(cache.path(), Path::new("/agent"), Some("aa"));
        assert_eq!(current(&opts), None);
        // Recording over it works.
        let manifest = fake_image(cache.path(), "k");
        record_current(&opts, "aa", &manifest, &cache.path().join("images/k")).expect("record");
        assert!(current(&opts).is_some());
    }
}
