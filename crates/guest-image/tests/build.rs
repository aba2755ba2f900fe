//! Builds the real guest image from Debian's packages (needs apt and the Debian mirror),
//! then checks that a second build is served from the cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmfactory_guest_image::cpio::{read_entries, S_IFCHR, S_IFLNK, S_IFMT, S_IFREG};
use vmfactory_guest_image::{build, read_manifest, BuildOptions, KernelSource};

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Fetches busybox-static into `downloads` (where `build` will find it again) and
/// unpacks its static binary to stand in for the agent.
fn stand_in_agent(downloads: &Path, scratch: &Path) -> PathBuf {
    fs::create_dir_all(downloads).expect("create downloads dir");
    let status = Command::new("apt-get")
        .args(["download", "-q", "busybox-static"])
        .current_dir(downloads)
        .status()
        .expect("run apt-get download");
    assert!(status.success(), "apt-get download busybox-static failed");
    let deb = fs::read_dir(downloads)
        .expect("list downloads")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with(".deb"))
        })
        .expect("downloaded busybox-static deb");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(scratch)
        .status()
        .expect("run dpkg-deb");
    assert!(status.success(), "dpkg-deb -x failed");
    scratch.join("bin/busybox")
}

#[test]
fn builds_the_real_image_and_reuses_it() {
    if !on_path("apt-get") {
        eprintln!("note: apt-get is not installed, so the guest image cannot be built from Debian packages; skipping");
        return;
    }
    let cache = tempfile::tempdir().expect("cache dir");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let agent = stand_in_agent(&cache.path().join("downloads"), scratch.path());
    let opts = BuildOptions {
        cache_dir: cache.path().to_owned(),
        agent_binary: agent.clone(),
        // Debian's kernel: this test checks the package path (modules, extraction) in a
        // fresh cache; vmfactory's kernel is exercised by every VM test.
        kernel: KernelSource::Debian,
        ..BuildOptions::default()
    };

    let mut messages = Vec::new();
    let started = Instant::now();
    let image = build(&opts, &mut |m: &str| messages.push(m.to_owned())).expect("cold build");
    let cold = started.elapsed();
    eprintln!("cold build: {cold:?}; progress: {messages:#?}");

    assert!(
        image.kernel_release.starts_with("6."),
        "{}",
        image.kernel_release
    );
    assert!(
        image.kernel_release.ends_with("-cloud-amd64"),
        "{}",
        image.kernel_release
    );
    assert_eq!(
        image.kernel_package,
        format!("linux-image-{}", image.kernel_release)
    );
    assert!(!image.kernel_version.is_empty());
    assert_eq!(image.dir, cache.path().join("images").join(&image.key));
    assert!(messages.iter().any(|m| m.starts_with("Unpacking")));
    assert!(messages.iter().any(|m| m.starts_with("Writing initramfs")));

    let size = |path: &Path| fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "sizes: vmlinuz {} B, vmlinux {} B, initrd {} B",
        size(&image.bzimage),
        image.vmlinux.as_deref().map_or(0, size),
        size(&image.initrd)
    );
    assert!(size(&image.bzimage) > 1 << 20);
    if let Some(vmlinux) = &image.vmlinux {
        let bytes = fs::read(vmlinux).expect("read vmlinux");
        assert!(bytes.starts_with(b"\x7fELF"));
        assert_eq!(&image.kernel, vmlinux);
    } else {
        eprintln!("note: no PVH vmlinux was extracted; the bzImage is the kernel");
        assert_eq!(image.kernel, image.bzimage);
    }

    let entries =
        read_entries(&fs::read(&image.initrd).expect("read initrd")).expect("parse initrd");
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the initramfs"))
    };
    let init = find("init");
    assert_eq!(init.mode, S_IFREG | 0o755);
    assert_eq!(init.data, fs::read(&agent).expect("read agent"));
    assert_eq!(find("dev/console").mode & S_IFMT, S_IFCHR);
    assert_eq!(find("bin/busybox").mode, S_IFREG | 0o755);
    let sh = find("bin/sh");
    assert_eq!(sh.mode & S_IFMT, S_IFLNK);
    assert_eq!(sh.data, b"/bin/busybox");

    let load_order = String::from_utf8(find("lib/modules/load-order").data.clone()).expect("utf-8");
    let lines: Vec<&str> = load_order.lines().collect();
    let position = |name: &str| {
        lines
            .iter()
            .position(|l| *l == name)
            .unwrap_or_else(|| panic!("{name} not in load order {lines:?}"))
    };
    assert!(position("virtio_ring.ko") < position("virtio.ko"));
    assert!(position("virtio.ko") < position("virtio_console.ko"));
    assert!(position("virtio.ko") < position("virtio_pci.ko"));
    for line in &lines {
        assert!(
            entries
                .iter()
                .any(|e| e.name == format!("lib/modules/{line}")),
            "{line} listed but not shipped"
        );
    }

    let manifest = read_manifest(&image.dir).expect("manifest");
    assert_eq!(manifest.image, image);
    assert_eq!(manifest.module_load_order, lines);
    let manifest_path = image.dir.join("manifest.json");
    let mtime = fs::metadata(&manifest_path)
        .and_then(|m| m.modified())
        .expect("manifest mtime");

    let mut messages = Vec::new();
    let started = Instant::now();
    let again = build(&opts, &mut |m: &str| messages.push(m.to_owned())).expect("cached build");
    let cached = started.elapsed();
    eprintln!("cached build: {cached:?}; progress: {messages:#?}");
    assert_eq!(again, image);
    assert!(
        !messages
            .iter()
            .any(|m| m.starts_with("Unpacking") || m.starts_with("Downloading")),
        "{messages:?}"
    );
    assert_eq!(
        fs::metadata(&manifest_path)
            .and_then(|m| m.modified())
            .expect("manifest mtime"),
        mtime,
        "the cached build rewrote the manifest"
    );
    // Only the image itself is in images/: no staging leftovers.
    let images: Vec<_> = fs::read_dir(cache.path().join("images"))
        .expect("list images")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
}
