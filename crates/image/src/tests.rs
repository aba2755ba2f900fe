use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;

use crate::fixtures::{self, Compression, LayerBuilder};
use crate::{FsType, ImageConfig, ImageError, ImageStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<(), ImageError> {
    let flattener = crate::Flattener::new(root)?;
    for layer in layers {
        flattener.apply(layer.as_slice())?;
    }
    Ok(())
}

#[test]
fn whiteouts_delete_files_directories_and_make_directories_opaque() -> TestResult {
    let root = tempfile::tempdir()?;
    let lower = LayerBuilder::new()
        .file("a/file", b"1", 0o644)?
        .file("a/gone", b"2", 0o644)?
        .file("dir/sub/deep", b"3", 0o644)?
        .file("opaque/old1", b"4", 0o644)?
        .file("opaque/sub/old2", b"5", 0o644)?
        .finish()?;
    let upper = LayerBuilder::new()
        .whiteout("a/gone")?
        .whiteout("dir")?
        .file("opaque/new", b"6", 0o600)?
        .opaque("opaque")?
        .whiteout("a/never-existed")?
        .finish()?;
    apply(root.path(), &[lower, upper])?;
    let r = root.path();
    assert_eq!(fs::read(r.join("a/file"))?, b"1");
    assert!(!r.join("a/gone").exists());
    assert!(!r.join("a/.wh.gone").exists());
    assert!(!r.join("dir").exists());
    assert_eq!(fs::read(r.join("opaque/new"))?, b"6");
    assert_eq!(fs::metadata(r.join("opaque/new"))?.mode() & 0o7777, 0o600);
    let mut names: Vec<_> = fs::read_dir(r.join("opaque"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, vec!["new"]);
    Ok(())
}

#[test]
fn hard_links_symlinks_and_ownership_are_kept() -> TestResult {
    let root = tempfile::tempdir()?;
    let layer = LayerBuilder::new()
        .file_owned("bin/tool", b"binary", 0o4755, 1000, 1001)?
        .hardlink("bin/alias", "bin/tool")?
        .symlink("bin/link", "tool")?
        .finish()?;
    // A later layer replaces a file by a directory and a directory by a file.
    let replace = LayerBuilder::new()
        .file("bin/link/inside", b"x", 0o644)?
        .finish()?;
    apply(root.path(), &[layer])?;
    let r = root.path();
    let tool = fs::metadata(r.join("bin/tool"))?;
    let alias = fs::metadata(r.join("bin/alias"))?;
    assert_eq!(tool.ino(), alias.ino());
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        (tool.uid(), tool.gid(), tool.mode() & 0o7777),
        (1000, 1001, 0o4755)
    );
    assert_eq!(fs::read_link(r.join("bin/link"))?, Path::new("tool"));
    // bin/link resolves to the file bin/tool: a later path through it replaces the
    // symlink by a directory instead of writing through it.
    apply(root.path(), &[replace])?;
    assert!(fs::symlink_metadata(r.join("bin/link"))?.is_dir());
    assert_eq!(fs::read(r.join("bin/tool"))?, b"binary");
    Ok(())
}

#[test]
fn paths_leaving_the_root_are_refused() -> TestResult {
    let parent = tempfile::tempdir()?;
    let root = parent.path().join("root");
    let outside = parent.path().join("outside");
    fs::create_dir(&root)?;
    fs::create_dir(&outside)?;
    let dotdot = LayerBuilder::new()
        .raw(tar::EntryType::Regular, b"../outside/pwned", None, b"x")?
        .finish()?;
    assert!(matches!(
        apply(&root, &[dotdot]),
        Err(ImageError::PathEscape(_))
    ));
    let nested = LayerBuilder::new()
        .raw(
            tar::EntryType::Regular,
            b"a/../../outside/pwned",
            None,
            b"x",
        )?
        .finish()?;
    assert!(matches!(
        apply(&root, &[nested]),
        Err(ImageError::PathEscape(_))
    ));
    let hardlink = LayerBuilder::new()
        .raw(
            tar::EntryType::Link,
            b"stolen",
            Some(b"../outside/secret"),
            b"",
        )?
        .finish()?;
    fs::write(outside.join("secret"), b"secret")?;
    assert!(matches!(
        apply(&root, &[hardlink]),
        Err(ImageError::PathEscape(_))
    ));
    // Symlinks to the outside, absolute and relative, resolve inside the root: writing
    // through them never touches the outside (it fails where the target is missing inside).
    let outside_abs = outside.to_str().ok_or("path")?;
    for (link, target) in [("abs", outside_abs), ("rel", "../../../../../../outside")] {
        let layer = LayerBuilder::new()
            .symlink(link, target)?
            .file(&format!("{link}/pwned"), b"x", 0o644)?
            .finish()?;
        let _ = apply(&root, &[layer]);
        let stolen = LayerBuilder::new()
            .hardlink("stolen", &format!("{link}/secret"))?
            .finish()?;
        assert!(apply(&root, &[stolen]).is_err());
    }
    assert!(
        !outside.join("pwned").exists(),
        "a layer wrote outside the root"
    );
    assert_eq!(fs::metadata(outside.join("secret"))?.nlink(), 1);
    let inside = LayerBuilder::new()
        .dir("outside", 0o755)?
        .symlink("rel2", "../../../../outside")?
        .file("rel2/pwned", b"x", 0o644)?
        .finish()?;
    apply(&root, &[inside])?;
    assert!(root.join("outside/pwned").is_file());
    assert!(
        !outside.join("pwned").exists(),
        "a layer wrote outside the root"
    );
    // Absolute paths in the tar are relative to the root.
    let absolute = LayerBuilder::new()
        .raw(tar::EntryType::Regular, b"/etc/absolute", None, b"x")?
        .finish()?;
    apply(&root, &[absolute])?;
    assert!(root.join("etc/absolute").is_file());
    Ok(())
}

fn layout_with(
    layers: &[(Vec<u8>, Compression)],
    dir: &Path,
) -> Result<String, Box<dyn std::error::Error>> {
    let tars: Vec<Vec<u8>> = layers.iter().map(|(t, _)| t.clone()).collect();
    let config = fixtures::image_config(json!({"Cmd": ["/bin/true"]}), &tars);
    Ok(fixtures::oci_layout(dir, layers, &config, "latest")?)
}

#[test]
fn corrupt_blobs_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let layer = LayerBuilder::new()
        .file("hello", b"hello", 0o644)?
        .finish()?;
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let layout = tmp.path().join(format!("{compression:?}"));
        layout_with(&[(layer.clone(), compression)], &layout)?;
        // Flip a byte of the layer blob (the largest of the blobs): same size, other digest.
        let blob = fs::read_dir(layout.join("blobs/sha256"))?
            .filter_map(Result::ok)
            .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .ok_or("no blob")?
            .path();
        let mut data = fs::read(&blob)?;
        let last = data.len() - 1;
        data[last] ^= 0x01;
        fs::write(&blob, data)?;
        let store = ImageStore::new(&tmp.path().join("cache"));
        let err = store.prepare(layout.to_str().ok_or("path")?, &mut |_| {});
        assert!(
            matches!(err, Err(ImageError::DigestMismatch { .. })),
            "{compression:?}: {err:?}"
        );
    }
    // docker save: the layer must match the config's diff_id.
    let docker = tmp.path().join("docker");
    let config = fixtures::image_config(json!({}), std::slice::from_ref(&layer));
    fixtures::docker_dir(&docker, &[b"not the layer".to_vec()], &config, "x:latest")?;
    let store = ImageStore::new(&tmp.path().join("cache"));
    let err = store.prepare(docker.to_str().ok_or("path")?, &mut |_| {});
    assert!(
        matches!(
            err,
            Err(ImageError::DigestMismatch { .. }) | Err(ImageError::BadLayer(_))
        ),
        "{err:?}"
    );
    assert!(store.list()?.is_empty());
    Ok(())
}

/// Extracts an EROFS image with `fsck.erofs --extract` (no mount needed).
fn extract_erofs(disk: &Path, into: &Path) -> TestResult {
    let status = Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(disk)
        .output()?;
    assert!(status.status.success(), "{status:?}");
    Ok(())
}

#[test]
fn oci_tar_and_docker_archive_flatten_to_the_same_tree_and_hit_the_cache() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::new(tmp.path());
    let oci = tmp.path().join("oci.tar");
    let fixture = fixtures::write_oci_layout_tar(&oci, None)?;
    let reference = format!("{}:latest", oci.display());
    let mut messages = Vec::new();
    let first = store.prepare(&reference, &mut |m| messages.push(m.to_string()))?;
    assert!(!first.cached);
    assert_eq!(first.digest, fixture.digest);
    assert_eq!(first.fs_type, FsType::Erofs);
    assert!(
        messages.iter().any(|m| m.contains("layer 2/2")),
        "{messages:?}"
    );
    assert_eq!(first.config.env, vec!["PATH=/bin", "GREETING=hello"]);
    assert_eq!(first.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(
        first.config.command(&[]),
        vec!["/bin/sh", "-c", "echo $GREETING; cat added.txt"]
    );

    let started = Instant::now();
    let second = store.prepare(&reference, &mut |m| panic!("a cache hit reported {m}"))?;
    let hit = started.elapsed();
    eprintln!("cache hit took {hit:?}");
    assert!(second.cached);
    assert_eq!(second.disk, first.disk);
    assert!(hit.as_millis() < 500, "cache hit took {hit:?}");

    let tree = tmp.path().join("tree");
    extract_erofs(&first.disk, &tree)?;
    for (path, content) in &fixture.files {
        assert_eq!(fs::read(tree.join(path))?, *content, "{path}");
    }
    for path in &fixture.deleted {
        assert!(
            !tree.join(path).exists(),
            "{path} was deleted by a whiteout"
        );
    }
    assert_eq!(fs::read_link(tree.join("bin/sh"))?, Path::new("busybox"));
    assert_eq!(
        fs::metadata(tree.join("bin/cat"))?.len(),
        fs::metadata(tree.join("bin/busybox"))?.len()
    );

    // The docker save variant: its own digest (the config's), the same tree and config.
    let docker = tmp.path().join("docker.tar");
    let docker_fixture = fixtures::write_docker_archive(&docker, None)?;
    let from_docker = store.prepare(docker.to_str().ok_or("path")?, &mut |_| {})?;
    assert_eq!(from_docker.digest, docker_fixture.digest);
    assert_eq!(from_docker.config, first.config);
    let docker_tree = tmp.path().join("docker-tree");
    extract_erofs(&from_docker.disk, &docker_tree)?;
    assert_eq!(
        fs::read(docker_tree.join("work/added.txt"))?,
        fixtures::ADDED
    );
    assert!(!docker_tree.join("etc/removed.txt").exists());

    // ext4 of the same image goes into the same cache entry.
    let ext4 = store
        .clone()
        .with_fs_type(FsType::Ext4)
        .prepare(&reference, &mut |_| {})?;
    assert!(!ext4.cached);
    assert_eq!(ext4.disk.parent(), first.disk.parent());
    let out = Command::new("debugfs")
        .args(["-R", "cat /work/added.txt"])
        .arg(&ext4.disk)
        .output()?;
    assert_eq!(out.stdout, fixtures::ADDED);

    // ls and rm.
    let listed = store.list()?;
    assert_eq!(listed.len(), 2);
    let entry = listed
        .iter()
        .find(|e| e.digest == first.digest)
        .ok_or("not listed")?;
    assert_eq!(entry.fs_types, vec![FsType::Erofs, FsType::Ext4]);
    assert_eq!(
        entry.sources,
        vec![format!("{}:latest", fs::canonicalize(&oci)?.display())]
    );
    assert!(entry.size_bytes >= first.size_bytes + ext4.size_bytes);
    assert!(matches!(
        store.remove(""),
        Err(ImageError::BadReference(_))
            | Err(ImageError::NotCached(_))
            | Err(ImageError::Ambiguous(..))
    ));
    let removed = store.remove(&first.digest["sha256:".len()..][..12])?;
    assert_eq!(removed.digest, first.digest);
    assert!(!first.disk.exists());
    let removed = store.remove(docker.to_str().ok_or("path")?)?;
    assert_eq!(removed.digest, docker_fixture.digest);
    assert!(store.list()?.is_empty());
    assert!(matches!(
        store.remove(&first.digest),
        Err(ImageError::NotCached(_))
    ));
    // No staging or unpack directories are left behind.
    let leftovers = names_starting_with(store.root(), ".")?;
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[test]
fn a_rootfs_directory_is_rehashed_only_when_it_changes() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let rootfs = tmp.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/hostname"), b"one\n")?;
    let store = ImageStore::new(&tmp.path().join("cache"));
    let reference = rootfs.to_str().ok_or("path")?;
    let first = store.prepare(reference, &mut |_| {})?;
    assert_eq!(first.config, ImageConfig::rootfs_default());
    let mut hashed = false;
    let again = store.prepare(reference, &mut |m| hashed |= m.starts_with("hashing"))?;
    assert!(again.cached && !hashed);
    fs::write(rootfs.join("etc/hostname"), b"two\n")?;
    let changed = store.prepare(reference, &mut |_| {})?;
    assert!(!changed.cached);
    assert_ne!(changed.digest, first.digest);
    assert!(matches!(
        store.prepare(&format!("{reference}:tag"), &mut |_| {}),
        Err(ImageError::BadReference(_))
    ));
    assert!(matches!(
        store.prepare("/nonexistent/image", &mut |_| {}),
        Err(ImageError::BadReference(_))
    ));
    // An empty directory is no image (it would only fail later, in a VM).
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty)?;
    let err = store
        .prepare(empty.to_str().ok_or("path")?, &mut |_| {})
        .expect_err("an empty directory");
    assert!(err.to_string().contains("is empty"), "{err}");
    Ok(())
}

/// Stamping and hashing the Debian python3 rootfs, when the integrator's copy exists.
#[test]
fn stamp_of_a_debian_rootfs_is_fast() -> TestResult {
    let rootfs = Path::new("/var/cache/vmfactory-test/bookworm-python3");
    if !rootfs.join("usr/bin/python3").exists() {
        eprintln!("skipped: no {}", rootfs.display());
        return Ok(());
    }
    let started = Instant::now();
    let (stamp, _, _) = crate::store::dir_stamp(rootfs, &[])?;
    let took = started.elapsed();
    eprintln!("stamp of {} took {took:?}", rootfs.display());
    assert_eq!(stamp, crate::store::dir_stamp(rootfs, &[])?.0);
    Ok(())
}

#[test]
fn command_follows_docker_rules() {
    let config = ImageConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["default".into()],
        ..ImageConfig::default()
    };
    assert_eq!(config.command(&[]), vec!["/entry", "default"]);
    assert_eq!(config.command(&["mine".into()]), vec!["/entry", "mine"]);
    let no_entry = ImageConfig {
        cmd: vec!["sh".into()],
        ..ImageConfig::default()
    };
    assert_eq!(
        no_entry.command(&["ls".into(), "-l".into()]),
        vec!["ls", "-l"]
    );
    assert_eq!(no_entry.command(&[]), vec!["sh"]);
}

#[test]
fn concurrent_prepares_build_once() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let oci = tmp.path().join("oci.tar");
    fixtures::write_oci_layout_tar(&oci, None)?;
    let reference = oci.to_str().ok_or("path")?.to_string();
    let store = ImageStore::new(&tmp.path().join("cache"));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| store.prepare(&reference, &mut |_| {})))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "panicked"))
            .collect()
    });
    let mut built = 0;
    for result in results {
        if !result??.cached {
            built += 1;
        }
    }
    assert_eq!(built, 1);
    assert_eq!(store.list()?.len(), 1);
    Ok(())
}

#[test]
fn the_fixture_can_carry_the_guest_busybox() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let cache = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/vmfactory"));
    let Some(busybox) = cache
        .map(|c| fixtures::static_busybox(&c, &tmp.path().join("busybox")))
        .transpose()?
        .flatten()
    else {
        eprintln!("skipped: no busybox-static .deb downloaded");
        return Ok(());
    };
    let out = Command::new(&busybox).arg("echo").arg("hi").output()?;
    assert_eq!(out.stdout, b"hi\n");
    let oci = tmp.path().join("oci.tar");
    fixtures::write_oci_layout_tar(&oci, Some(&busybox))?;
    let image = ImageStore::new(&tmp.path().join("cache"))
        .prepare(oci.to_str().ok_or("path")?, &mut |_| {})?;
    let tree = tmp.path().join("tree");
    extract_erofs(&image.disk, &tree)?;
    assert_eq!(fs::read(tree.join("bin/busybox"))?, fs::read(&busybox)?);
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(options: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()?;
        if !status.success() {
            return Err(format!("mount tmpfs on {}: {status}", dir.path().display()).into());
        }
        Ok(Self(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// The store's own directory (`rootfs` under the cache directory `store_root`) exists and
/// holds no staging directory.
fn assert_no_staging_left(store_root: &Path) -> TestResult {
    let images = store_root.join("rootfs");
    assert!(images.is_dir());
    let staging = names_starting_with(&images, ".staging-")?;
    assert!(staging.is_empty(), "left behind: {staging:?}");
    Ok(())
}

/// Names of the entries of `dir` that start with `prefix`.
fn names_starting_with(dir: &Path, prefix: &str) -> std::io::Result<Vec<std::ffi::OsString>> {
    Ok(fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|name| name.to_string_lossy().starts_with(prefix))
        .collect())
}

#[test]
fn flattening_stops_before_it_eats_into_the_free_space_reserve() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let small = SmallFs::mount("size=16m")?;
    let store_root = small.0.path().join("images");
    let store = ImageStore::new(&store_root);
    // 20 MiB of files do not fit at all; 9 MiB do, but their disk would not.
    for (size, what) in [
        (20 << 20, "write the image's files"),
        (9 << 20, "build the image's disk"),
    ] {
        let layer = LayerBuilder::new()
            .file("small", b"x", 0o644)?
            .file("big", &vec![7u8; size], 0o644)?
            .finish()?;
        let layout = tmp.path().join(format!("layout-{size}"));
        layout_with(&[(layer, Compression::Gzip)], &layout)?;
        let err = store
            .prepare(layout.to_str().ok_or("path")?, &mut |_| {})
            .expect_err("no room");
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(what), "{text}");
        assert!(
            text.contains(&format!("space in {}/", store_root.display())),
            "{text}"
        );
        assert!(store.list()?.is_empty());
        assert_no_staging_left(&store_root)?;
    }
    // A root filesystem directory (its disk is built straight from it): refused too.
    let rootfs = tmp.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/big"), vec![7u8; 20 << 20])?;
    let err = store
        .prepare(rootfs.to_str().ok_or("path")?, &mut |_| {})
        .expect_err("no room");
    assert!(matches!(err, ImageError::NoSpace { .. }), "{err:?}");
    assert!(err.to_string().contains("build the image's disk"), "{err}");
    assert!(store.list()?.is_empty());
    // An image that fits is built on the same filesystem.
    let layer = LayerBuilder::new()
        .file("etc/small", &vec![7u8; 1 << 20], 0o644)?
        .finish()?;
    let layout = tmp.path().join("layout-fits");
    layout_with(&[(layer, Compression::Gzip)], &layout)?;
    store.prepare(layout.to_str().ok_or("path")?, &mut |_| {})?;
    assert_eq!(store.list()?.len(), 1);
    Ok(())
}

#[test]
fn many_empty_files_stop_at_the_inode_reserve() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let small = SmallFs::mount("size=16m,nr_inodes=400")?;
    let store_root = small.0.path().join("images");
    let store = ImageStore::new(&store_root);
    // 500 empty files: no bytes to speak of, but more inodes than the filesystem has.
    let mut layer = LayerBuilder::new();
    for i in 0..500 {
        layer = layer.file(&format!("many/f{i}"), b"", 0o644)?;
    }
    let layout = tmp.path().join("layout-many");
    layout_with(&[(layer.finish()?, Compression::Gzip)], &layout)?;
    let err = store
        .prepare(layout.to_str().ok_or("path")?, &mut |_| {})
        .expect_err("no inodes");
    assert!(matches!(err, ImageError::NoInodes { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("inodes in {}/", store_root.display())),
        "{err}"
    );
    assert!(store.list()?.is_empty());
    assert_no_staging_left(&store_root)?;
    Ok(())
}

#[test]
fn temporary_directories_of_killed_builds_are_swept() -> TestResult {
    use crate::tempdirs::{self, OwnedTempDir};
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    // A process that has exited and been reaped: nothing runs with its pid and a start
    // time of 1 (nor, most likely, at all).
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let stale_staging = root.join(format!(".staging-{dead}-1-AbCdEf"));
    fs::create_dir_all(stale_staging.join("rootfs/etc"))?;
    fs::write(stale_staging.join("rootfs/etc/big"), b"half-flattened")?;
    let stale_unpack = root.join(format!(".unpack-{dead}-1-GhIjKl"));
    fs::create_dir_all(stale_unpack.join("blobs/sha256"))?;
    // Ours (this process's pid and start time), live: kept.
    let live = OwnedTempDir::new(root, tempdirs::STAGING)?;
    let ours = format!(".staging-{}-", std::process::id());
    assert!(
        live.path()
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&ours)),
        "{}",
        live.path().display()
    );
    fs::write(live.path().join("disk.erofs"), b"being written")?;
    // A dead owner by its name, but locked: a live build in another pid namespace.
    let locked = root.join(format!(".unpack-{dead}-1-MnOpQr"));
    fs::create_dir(&locked)?;
    let lock = fs::File::open(&locked)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    // An older vmfactory's (no owner in the name): removed only when a day old.
    let young_unowned = root.join(".unpack-StUvWx");
    fs::create_dir(&young_unowned)?;
    let old_unowned = root.join(".staging-YzAbCd");
    fs::create_dir(&old_unowned)?;
    fs::File::open(&old_unowned)?.set_modified(
        std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 60 * 60),
    )?;
    // Not ours at all.
    let other = root.join(".staging");
    fs::create_dir(&other)?;
    let entry = root.join("ab".repeat(32));
    fs::create_dir(&entry)?;

    tempdirs::sweep(root);
    assert!(!stale_staging.exists());
    assert!(!stale_unpack.exists());
    assert!(!old_unowned.exists());
    assert!(live.path().join("disk.erofs").is_file());
    assert!(locked.is_dir());
    assert!(young_unowned.is_dir());
    assert!(other.is_dir() && entry.is_dir());
    drop(lock);
    tempdirs::sweep(root);
    assert!(!locked.exists());
    assert!(live.path().is_dir());
    let live_path = live.path().to_path_buf();
    drop(live);
    assert!(!live_path.exists());

    // Every prepare sweeps its store first.
    let store = ImageStore::new(&root.join("cache"));
    fs::create_dir_all(store.root())?;
    let killed = store.root().join(format!(".unpack-{dead}-1-EfGhIj"));
    fs::create_dir(&killed)?;
    let rootfs = root.join("rootfs");
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/hostname"), b"swept\n")?;
    store.prepare(rootfs.to_str().ok_or("path")?, &mut |_| {})?;
    assert!(!killed.exists());
    Ok(())
}

#[test]
fn a_docker_archive_with_a_symlinked_repeated_layer_is_read() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::new(&tmp.path().join("cache"));
    // Layer 3 repeats layer 1 (it brings back what layer 2 deleted): Docker before 25
    // saves it as a symlink to layer 1's copy.
    let motd = LayerBuilder::new()
        .file("etc/motd", b"hello\n", 0o644)?
        .finish()?;
    let delete = LayerBuilder::new().whiteout("etc/motd")?.finish()?;
    let layers = vec![motd.clone(), delete, motd];
    let config = fixtures::image_config(json!({"Cmd": ["/bin/true"]}), &layers);
    let saved = tmp.path().join("saved");
    let digest = fixtures::docker_dir(&saved, &layers, &config, "dup:latest")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(saved.join("manifest.json"))?)?;
    let repeated = manifest[0]["Layers"][2]
        .as_str()
        .ok_or("layers")?
        .to_string();
    let first = manifest[0]["Layers"][0]
        .as_str()
        .ok_or("layers")?
        .to_string();
    assert_eq!(
        fs::read_link(saved.join(&repeated))?,
        Path::new("..").join(&first)
    );
    let archive = tmp.path().join("dk-dup.tar");
    fixtures::tar_dir(&saved, &archive)?;
    let image = store.prepare(archive.to_str().ok_or("path")?, &mut |_| {})?;
    assert_eq!(image.digest, digest);
    let tree = tmp.path().join("tree");
    extract_erofs(&image.disk, &tree)?;
    assert_eq!(fs::read(tree.join("etc/motd"))?, b"hello\n");

    // A symlinked layer that leads out of the archive is refused, relative or absolute.
    let outside = tmp.path().join("outside.tar");
    fs::copy(saved.join(&first), &outside)?;
    for target in [
        "../../outside.tar".to_string(),
        format!("../x/../../{}", "../".repeat(8)),
        outside.display().to_string(),
    ] {
        fs::remove_file(saved.join(&repeated))?;
        std::os::unix::fs::symlink(&target, saved.join(&repeated))?;
        let hostile = tmp.path().join("hostile.tar");
        fixtures::tar_dir(&saved, &hostile)?;
        let err = ImageStore::new(&tmp.path().join("cache2"))
            .prepare(hostile.to_str().ok_or("path")?, &mut |_| {})
            .expect_err("a symlink out of the archive");
        assert!(
            matches!(err, ImageError::PathEscape(_)),
            "{target}: {err:?}"
        );
    }
    Ok(())
}

#[test]
fn a_rootfs_directory_holding_the_cache_leaves_it_out() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("root2");
    fs::create_dir_all(tree.join("etc"))?;
    fs::write(tree.join("etc/hostname"), b"root2\n")?;
    // `image build root2 --cache-dir root2/var/cache/vmfactory`, or `image build ~`.
    let cache = tree.join("var/cache/vmfactory");
    let store = ImageStore::new(&cache);
    let reference = tree.to_str().ok_or("path")?;
    let first = store.prepare(reference, &mut |_| {})?;
    assert!(!first.cached);
    // A rebuild is a cache hit, though the cache (inside the tree) has grown.
    let again = store.prepare(reference, &mut |m| panic!("a cache hit reported {m}"))?;
    assert!(again.cached);
    assert_eq!(again.digest, first.digest);
    // The same tree without a cache in it has the same digest.
    let copy = tmp.path().join("copy");
    fs::create_dir_all(copy.join("etc"))?;
    fs::create_dir_all(copy.join("var/cache"))?;
    fs::write(copy.join("etc/hostname"), b"root2\n")?;
    let elsewhere = ImageStore::new(&tmp.path().join("cache"))
        .prepare(copy.to_str().ok_or("path")?, &mut |_| {})?;
    assert_eq!(elsewhere.digest, first.digest);
    let extracted = tmp.path().join("extracted");
    extract_erofs(&first.disk, &extracted)?;
    assert_eq!(fs::read(extracted.join("etc/hostname"))?, b"root2\n");
    assert!(extracted.join("var/cache").is_dir());
    assert!(!extracted.join("var/cache/vmfactory").exists());
    // mkfs.ext4 cannot leave it out: refused, saying what to do.
    let err = store
        .clone()
        .with_fs_type(FsType::Ext4)
        .prepare(reference, &mut |_| {})
        .expect_err("ext4 of a tree holding the cache");
    assert!(matches!(err, ImageError::BadReference(_)), "{err:?}");
    assert!(err.to_string().contains("build an EROFS disk"), "{err}");
    // A tree inside the store (a cache entry, say) is refused.
    let inside = first.disk.parent().ok_or("entry")?;
    let err = store
        .prepare(inside.to_str().ok_or("path")?, &mut |_| {})
        .expect_err("a tree inside the cache");
    assert!(
        err.to_string().contains("inside vmfactory's image cache"),
        "{err}"
    );
    Ok(())
}

#[test]
fn rm_finds_a_relative_reference_whose_file_is_gone() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::new(&tmp.path().join("cache"));
    let oci = tmp.path().join("tmp1.tar");
    fixtures::write_oci_layout_tar(&oci, None)?;
    let docker = tmp.path().join("tmp2.tar");
    fixtures::write_docker_archive(&docker, None)?;
    // Relative to the current directory (tests share it: it is not changed).
    let cwd = std::env::current_dir()?;
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = |path: &Path| -> Result<String, Box<dyn std::error::Error>> {
        let path = path.strip_prefix("/")?.to_str().ok_or("path")?;
        Ok(format!("{up}{path}"))
    };
    let tagged = format!("{}:latest", relative(&oci)?);
    let from_oci = store.prepare(&tagged, &mut |_| {})?;
    let untagged = format!("./{}", relative(&docker)?);
    let from_docker = store.prepare(&untagged, &mut |_| {})?;
    // Recorded by their canonical paths.
    let mut sources: Vec<String> = store.list()?.into_iter().flat_map(|e| e.sources).collect();
    sources.sort();
    assert_eq!(
        sources,
        vec![
            format!("{}:latest", fs::canonicalize(&oci)?.display()),
            fs::canonicalize(&docker)?.display().to_string(),
        ]
    );
    fs::remove_file(&oci)?;
    fs::remove_file(&docker)?;
    assert_eq!(store.remove(&tagged)?.digest, from_oci.digest);
    assert_eq!(store.remove(&untagged)?.digest, from_docker.digest);
    assert!(store.list()?.is_empty());
    // Also once its directory is gone.
    let gone = tmp.path().join("gone");
    fs::create_dir(&gone)?;
    let oci = gone.join("tmp3.tar");
    fixtures::write_oci_layout_tar(&oci, None)?;
    let reference = relative(&oci)?;
    store.prepare(&reference, &mut |_| {})?;
    fs::remove_dir_all(&gone)?;
    store.remove(&reference)?;
    assert!(store.list()?.is_empty());
    Ok(())
}
