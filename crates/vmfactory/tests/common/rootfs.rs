//! A real Debian 12 root filesystem with `python3`, made once with `debootstrap` and kept
//! between test runs (it takes minutes and about 200 MB), for the container tests.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Where the root filesystem is kept, unless `VMFACTORY_TEST_ROOTFS` names another.
const DEFAULT_DIR: &str = "/var/cache/vmfactory-test/bookworm-python3";
/// The Debian mirror, unless `VMFACTORY_TEST_MIRROR` names another.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The mirror apt already uses (first `URIs:` of a deb822 source ending in `/debian`).
fn apt_mirror() -> String {
    if let Ok(mirror) = std::env::var("VMFACTORY_TEST_MIRROR") {
        return mirror;
    }
    let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") else {
        return DEFAULT_MIRROR.to_string();
    };
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(uris) = line.strip_prefix("URIs:") {
                if let Some(uri) = uris.split_whitespace().find(|u| u.ends_with("/debian")) {
                    return uri.to_string();
                }
            }
        }
    }
    DEFAULT_MIRROR.to_string()
}

/// The Debian 12 (minbase + python3-minimal) root filesystem, made on first use. Test
/// binaries running at once wait for one another on a lock file beside it.
pub fn python_rootfs() -> &'static PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = PathBuf::from(
            std::env::var("VMFACTORY_TEST_ROOTFS").unwrap_or_else(|_| DEFAULT_DIR.to_string()),
        );
        let done = dir.with_extension("done");
        if done.exists() {
            return dir;
        }
        let parent = dir.parent().expect("rootfs dir has a parent");
        fs::create_dir_all(parent).expect("create the rootfs cache dir");
        let lock = File::create(dir.with_extension("lock")).expect("create the rootfs lock");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .expect("lock the rootfs");
        if done.exists() {
            return dir;
        }
        let staging = dir.with_extension("tmp");
        let _ = fs::remove_dir_all(&staging);
        let mirror = apt_mirror();
        eprintln!(
            "making a Debian 12 root filesystem with python3 in {} (debootstrap from {mirror}; a few minutes, once)",
            dir.display()
        );
        let status = Command::new("debootstrap")
            .args(["--variant=minbase", "--include=python3-minimal", "bookworm"])
            .arg(&staging)
            .arg(&mirror)
            .status()
            .expect("run debootstrap (apt-get install debootstrap)");
        assert!(status.success(), "debootstrap failed: {status}");
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&staging, &dir).expect("move the rootfs into place");
        File::create(&done).expect("mark the rootfs done");
        dir
    })
}
