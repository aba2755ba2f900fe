//! Removing what the cache keeps but nothing uses any more: guest images no entry of
//! `current.json` names, kernel builds, embedded agents and downloaded `.deb` packages no
//! kept image was made from, vmfactory's QEMU builds other than the current one, and the
//! QEMU sources of builds not kept. Each is kept per key forever otherwise: every
//! vmfactory upgrade (a new agent), kernel update or QEMU recipe leaves the last one
//! behind (an image is about 36 MB, a kernel build 18 MB, a kernel source package 130 MB,
//! a QEMU build 9 MB).
//!
//! Conservative by design: an entry is removed only when nothing current refers to it
//! AND nobody read or wrote its files for [`PRUNE_IDLE`] (access times: with Linux's
//! default `relatime`, a file read once a day counts as used), and a QEMU build also
//! only when no running process executes it. Only directories named as the cache names
//! them (64 hex digits; `qemu-source-*`) are looked at, and symbolic links are never
//! followed. Without a readable `current.json`, no image, kernel, agent or package is
//! removed; without a readable `qemu/current.json`, no QEMU build or source. The
//! bookkeeping files the cache itself reads (`manifest.json`, `build.json`) do not count
//! as used.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::current::current_image_keys;
use crate::digest::{remembered_sha256, sidecar_path};
use crate::image::{read_manifest, MANIFEST_FILE};
use crate::qemu::{built_source, current_qemu_key, source_dir_name};

/// How long an entry nothing current refers to is kept after its files were last used.
pub const PRUNE_IDLE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What [`prune_cache`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// The directories and package files removed.
    pub removed: Vec<PathBuf>,
    /// Bytes their files took.
    pub bytes: u64,
}

/// Removes the cache entries of `cache_dir` that nothing current refers to and that were
/// not used for `idle` (see the module's documentation). Errors are skipped: an entry
/// that cannot be read or removed stays.
pub fn prune_cache(cache_dir: &Path, idle: Duration) -> Pruned {
    let cutoff = SystemTime::now().checked_sub(idle).unwrap_or(UNIX_EPOCH);
    let idle_since = |dir: &Path| last_used(dir) < cutoff;
    let mut pruned = Pruned::default();

    // What the kept images were made from; `None` without a readable current.json.
    let mut packages = None;
    if let Some(current) = current_image_keys(cache_dir) {
        let mut kernel_builds = HashSet::new();
        let mut agents = HashSet::new();
        let mut kept_packages = HashSet::new();
        for (key, dir) in keyed_dirs(&cache_dir.join("images")) {
            if current.contains(&key) || !idle_since(&dir) {
                if let Ok(manifest) = read_manifest(&dir) {
                    kernel_builds.extend(manifest.inputs.kernel_build);
                    agents.insert(manifest.inputs.agent_sha256);
                    kept_packages.insert(manifest.inputs.kernel_deb_sha256);
                    kept_packages.insert(manifest.inputs.busybox_deb_sha256);
                }
            } else {
                remove(&dir, &mut pruned);
            }
        }
        for (key, dir) in keyed_dirs(&cache_dir.join("kernels")) {
            if !kernel_builds.contains(&key) && idle_since(&dir) {
                remove(&dir, &mut pruned);
            }
        }
        for (digest, dir) in keyed_dirs(&cache_dir.join("agents")) {
            if !agents.contains(&digest) && idle_since(&dir) {
                remove(&dir, &mut pruned);
            }
        }
        packages = Some(kept_packages);
    }

    // The sources of the kept QEMU builds; `None` without a readable record of the
    // current QEMU (then none is judged unused).
    let mut sources = None;
    if let Some(current_qemu) = current_qemu_key(cache_dir) {
        let executed = executables_running();
        let mut kept_sources = HashSet::new();
        for (key, dir) in keyed_dirs(&cache_dir.join("qemu")) {
            let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            let running = executed.iter().any(|exe| exe.starts_with(&real));
            if current_qemu == key || running || !idle_since(&dir) {
                if let Some((package, version)) = built_source(&dir) {
                    kept_sources.insert(source_dir_name(&package, &version));
                }
            } else {
                remove(&dir, &mut pruned);
            }
        }
        sources = Some(kept_sources);
    }

    // Downloads: QEMU sources, and packages (a kernel source is 130 MB) known by the
    // digest their sidecar remembers (one without it is kept).
    let downloads = fs::read_dir(cache_dir.join("downloads"));
    for entry in downloads.into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let is_deb = path.extension().is_some_and(|ext| ext == "deb")
            && fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_file());
        let unused = if is_deb {
            packages.as_ref().is_some_and(|kept| {
                remembered_sha256(&path).is_some_and(|digest| !kept.contains(&digest))
            })
        } else if name.starts_with("qemu-source-") && is_real_dir(&path) {
            sources.as_ref().is_some_and(|kept| !kept.contains(&name))
        } else {
            false
        };
        if unused && idle_since(&path) {
            remove(&path, &mut pruned);
            if is_deb {
                let _ = fs::remove_file(sidecar_path(&path));
            }
        }
    }
    pruned
}

/// The subdirectories of `dir` named by a 64-digit hex key (not links), with their keys.
fn keyed_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let keyed = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            (keyed && is_real_dir(&entry.path())).then(|| (name, entry.path()))
        })
        .collect()
}

fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir())
}

/// Files the cache reads for its own bookkeeping (this module included): their access
/// times say nothing of an entry's use.
const BOOKKEEPING: [&str; 2] = [MANIFEST_FILE, "build.json"];

/// The latest modification of `dir` and of the files in it (two levels deep), or access
/// to those files. Access times of directories (listing one, as this module does,
/// updates it) and of bookkeeping files (read by this module too) are not used.
fn last_used(dir: &Path) -> SystemTime {
    fn walk(path: &Path, depth: u32, latest: &mut i64) {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return;
        };
        *latest = (*latest).max(meta.mtime());
        let bookkeeping = path
            .file_name()
            .is_some_and(|name| BOOKKEEPING.iter().any(|file| name == *file));
        if !meta.is_dir() && !bookkeeping {
            *latest = (*latest).max(meta.atime());
        }
        if meta.is_dir() && depth > 0 {
            for entry in fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), depth - 1, latest);
            }
        }
    }
    let mut latest = 0;
    walk(dir, 2, &mut latest);
    UNIX_EPOCH + Duration::from_secs(u64::try_from(latest).unwrap_or(0))
}

/// Total size of the regular files under `dir` (links not followed).
fn size_of(dir: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| size_of(&entry.path()))
        .sum()
}

fn remove(dir: &Path, pruned: &mut Pruned) {
    let bytes = size_of(dir);
    let removed = if is_real_dir(dir) {
        fs::remove_dir_all(dir)
    } else {
        fs::remove_file(dir)
    };
    match removed {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), bytes, "removed an unused cache entry");
            pruned.removed.push(dir.to_owned());
            pruned.bytes += bytes;
        }
        Err(err) => {
            tracing::warn!(dir = %dir.display(), %err, "cannot remove an unused cache entry")
        }
    }
}

/// The executables of the processes running now (those this user may look at).
fn executables_running() -> Vec<PathBuf> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|entry| fs::read_link(entry.path().join("exe")).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::current::tests::fake_image;
    use crate::image::MANIFEST_FILE;
    use std::fs::{File, FileTimes};

    fn key(c: char) -> String {
        std::iter::repeat(c).take(64).collect()
    }

    /// Sets every time of `path` and what is under it to `when` (atime included).
    fn age(path: &Path, when: SystemTime) {
        if fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir()) {
            for entry in fs::read_dir(path).expect("read_dir").flatten() {
                age(&entry.path(), when);
            }
        }
        let times = FileTimes::new().set_accessed(when).set_modified(when);
        File::open(path)
            .and_then(|file| file.set_times(times))
            .expect("set times");
    }

    fn dir_with_file(dir: &Path, file: &str) -> PathBuf {
        fs::create_dir_all(dir.join(file).parent().expect("parent")).expect("mkdir");
        fs::write(dir.join(file), b"x").expect("write");
        dir.to_owned()
    }

    #[test]
    fn only_what_nothing_current_uses_and_nobody_used_for_a_while_goes() {
        let cache = tempfile::tempdir().expect("tempdir");
        let cache = cache.path();
        let old = SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
        let (current_image, stale_image, recent_image) = (key('a'), key('b'), key('c'));
        let (kernel_used, kernel_stale) = (key('d'), key('e'));
        let (agent_used, agent_stale) = (key('1'), key('2'));
        let (qemu_current, qemu_stale, qemu_recent) = (key('7'), key('8'), key('9'));

        for image in [&current_image, &stale_image, &recent_image] {
            let mut manifest = fake_image(cache, image);
            if *image == current_image {
                manifest.inputs.kernel_build = Some(kernel_used.clone());
                manifest.inputs.agent_sha256 = agent_used.clone();
            }
            let dir = cache.join("images").join(image);
            fs::write(
                dir.join(MANIFEST_FILE),
                serde_json::to_vec(&manifest).expect("json"),
            )
            .expect("write");
        }
        let current = serde_json::json!({
            "format_version": 1,
            "images": [{
                "kernel": "debian", "kernel_package": "linux-image-cloud-amd64",
                "modules": [], "agent_sha256": agent_used, "agent": null,
                "key": current_image, "files": {}
            }]
        });
        fs::write(cache.join("current.json"), current.to_string()).expect("write");
        for kernel in [&kernel_used, &kernel_stale] {
            dir_with_file(&cache.join("kernels").join(kernel), "vmlinux");
        }
        for agent in [&agent_used, &agent_stale] {
            dir_with_file(&cache.join("agents").join(agent), "vmfactory-agent");
        }
        for (qemu, version) in [
            (&qemu_current, "1:7.2+dfsg-7"),
            (&qemu_stale, "1:7.2+dfsg-6"),
            (&qemu_recent, "1:7.2+dfsg-5"),
        ] {
            let dir = dir_with_file(&cache.join("qemu").join(qemu), "bin/qemu-system-x86_64");
            let record = serde_json::json!({
                "key": qemu, "source_package": "qemu", "source_version": version,
                "compiler": "gcc", "configure": [], "seconds": 1
            });
            fs::write(dir.join("build.json"), record.to_string()).expect("write");
        }
        let record =
            serde_json::json!({ "key": qemu_current, "recipe": "r", "debian_binary": null });
        fs::write(cache.join("qemu/current.json"), record.to_string()).expect("write");
        for version in ["7.2+dfsg-7", "7.2+dfsg-6", "7.2+dfsg-5", "7.2+dfsg-4"] {
            dir_with_file(
                &cache
                    .join("downloads")
                    .join(format!("qemu-source-{version}")),
                "qemu.dsc",
            );
        }
        // Not the cache's names, or links: never touched.
        let other = dir_with_file(&cache.join("images/not-a-key"), "file");
        let target = dir_with_file(&cache.join("elsewhere"), "file");
        std::os::unix::fs::symlink(&target, cache.join("kernels").join(key('f'))).expect("symlink");

        let debs = ["linux-source_1.deb", "linux-source_0.deb", "busybox_0.deb"];
        for deb in debs {
            dir_with_file(&cache.join("downloads"), deb);
        }
        age(cache, old);
        // Packages known by their sidecars: the kept images' kernel package ("aa..."), one
        // no image was made from; and one without a sidecar (unknown: kept).
        for (deb, digest) in [(debs[0], "aa".repeat(32)), (debs[1], "dd".repeat(32))] {
            let path = cache.join("downloads").join(deb);
            let stamp = crate::digest::sidecar_stamp(&fs::metadata(&path).expect("stat"));
            fs::write(sidecar_path(&path), format!("{stamp} {digest}\n")).expect("sidecar");
        }
        // Used lately: its initramfs was read (its access time), and a QEMU built lately.
        let times = FileTimes::new().set_accessed(SystemTime::now());
        File::open(cache.join("images").join(&recent_image).join("initrd.img"))
            .and_then(|file| file.set_times(times))
            .expect("set atime");
        age(&cache.join("qemu").join(&qemu_recent), SystemTime::now());

        let pruned = prune_cache(cache, PRUNE_IDLE);
        let mut removed = pruned.removed.clone();
        removed.sort();
        let mut expected = vec![
            cache.join("images").join(&stale_image),
            cache.join("kernels").join(&kernel_stale),
            cache.join("agents").join(&agent_stale),
            cache.join("qemu").join(&qemu_stale),
            cache.join("downloads/qemu-source-7.2+dfsg-6"),
            cache.join("downloads/qemu-source-7.2+dfsg-4"),
            cache.join("downloads").join(debs[1]),
        ];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(pruned.bytes > 0);
        for gone in &expected {
            assert!(!gone.exists(), "{}", gone.display());
        }
        assert!(!sidecar_path(&cache.join("downloads").join(debs[1])).exists());
        for kept in [
            cache.join("images").join(&current_image),
            cache.join("images").join(&recent_image),
            cache.join("kernels").join(&kernel_used),
            cache.join("agents").join(&agent_used),
            cache.join("qemu").join(&qemu_current),
            cache.join("qemu").join(&qemu_recent),
            cache.join("downloads/qemu-source-7.2+dfsg-7"),
            cache.join("downloads/qemu-source-7.2+dfsg-5"),
            cache.join("downloads").join(debs[0]),
            sidecar_path(&cache.join("downloads").join(debs[0])),
            cache.join("downloads").join(debs[2]),
            other,
            target.join("file"),
            cache.join("kernels").join(key('f')),
        ] {
            assert!(kept.exists(), "{}", kept.display());
        }

        // A prune reads the manifests of what it keeps; that is not a use. Kept above as
        // recently used, an image goes once its files are idle too.
        let recent = cache.join("images").join(&recent_image);
        age(&recent.join("initrd.img"), old);
        age(&recent.join("vmlinuz"), old);
        let pruned = prune_cache(cache, PRUNE_IDLE);
        assert_eq!(pruned.removed, vec![recent]);

        // Without a readable current.json, no image, kernel or agent is judged unused.
        fs::write(cache.join("current.json"), b"{not json").expect("write");
        let before = fs::read_dir(cache.join("images")).expect("images").count();
        age(cache, old);
        prune_cache(cache, PRUNE_IDLE);
        assert_eq!(
            fs::read_dir(cache.join("images")).expect("images").count(),
            before
        );
        assert!(cache.join("kernels").join(&kernel_used).exists());
        // Nor, without a readable qemu/current.json, a QEMU build (the current one would
        // go otherwise, idle as it now is).
        fs::write(cache.join("qemu/current.json"), b"").expect("write");
        age(cache, old);
        assert!(prune_cache(cache, PRUNE_IDLE).removed.is_empty());
        assert!(cache.join("qemu").join(&qemu_current).exists());
    }

    #[test]
    fn a_qemu_a_process_runs_is_kept() {
        let cache = tempfile::tempdir().expect("tempdir");
        let dir = cache.path().join("qemu").join(key('5'));
        fs::create_dir_all(dir.join("bin")).expect("mkdir");
        let record = serde_json::json!({ "key": key('6'), "recipe": "r", "debian_binary": null });
        fs::write(cache.path().join("qemu/current.json"), record.to_string()).expect("write");
        // A copy of a real program, run from the build's place while the prune looks.
        fs::copy("/bin/sleep", dir.join("bin/qemu-system-x86_64")).expect("copy sleep");
        let mut child = std::process::Command::new(dir.join("bin/qemu-system-x86_64"))
            .arg("30")
            .spawn()
            .expect("run it");
        // Aged once it sleeps: until its loader has mapped it, the start itself marks the
        // file used (an access time), which is right but not what this test is about.
        let stat = format!("/proc/{}/stat", child.id());
        let started = std::time::Instant::now();
        while !fs::read_to_string(&stat).is_ok_and(|text| text.contains(") S ")) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "it never slept"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        age(
            &dir,
            SystemTime::now() - Duration::from_secs(30 * 24 * 3600),
        );
        let pruned = prune_cache(cache.path(), PRUNE_IDLE);
        let _ = child.kill();
        let _ = child.wait();
        assert!(pruned.removed.is_empty(), "{pruned:?}");
        assert!(dir.exists());
        // Once it exits, the build goes.
        let pruned = prune_cache(cache.path(), PRUNE_IDLE);
        assert_eq!(pruned.removed, vec![dir]);
    }
}
