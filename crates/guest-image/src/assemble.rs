//! Assembling an image from unpacked packages: the kernel (bzImage and PVH `vmlinux`),
//! the modules the agent loads, busybox, and the agent as `/init`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::apt::PackageVersion;
use crate::digest::{sha256_file, write_synced};
use crate::error::{io_error, GuestImageError};
use crate::image::{install, rebased, GuestImage, ImageInputs, Manifest, MANIFEST_FILE};
use crate::initramfs::{self, InitramfsContents, ModuleFile};
use crate::kernel::{BuiltKernel, KernelSource};
use crate::{modules, vmlinux, FORMAT_VERSION};

/// Everything [`assemble`] needs, once the packages are unpacked.
pub(crate) struct Assembly<'a> {
    pub(crate) images_dir: &'a Path,
    pub(crate) key: &'a str,
    pub(crate) kernel_root: &'a Path,
    pub(crate) busybox_root: &'a Path,
    pub(crate) agent: &'a Path,
    pub(crate) kernel: &'a PackageVersion,
    pub(crate) busybox: &'a PackageVersion,
    pub(crate) inputs: &'a ImageInputs,
    pub(crate) force: bool,
    /// vmfactory's kernel, built from source: used instead of `kernel_root`'s, and no
    /// modules go into the initramfs (its drivers are built in).
    pub(crate) built_kernel: Option<&'a BuiltKernel>,
}

/// Writes the image from unpacked packages into a staging directory and moves it into
/// `images_dir/<key>` in one rename.
pub(crate) fn assemble(
    spec: &Assembly<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, GuestImageError> {
    let (release, vmlinuz_source) = match spec.built_kernel {
        Some(built) => (built.release.clone(), built.bzimage.clone()),
        None => find_kernel(spec.kernel_root, &spec.kernel.name)?,
    };
    let staging = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(spec.images_dir)
        .map_err(io_error(spec.images_dir))?;

    let bzimage_bytes = fs::read(&vmlinuz_source).map_err(io_error(&vmlinuz_source))?;
    write_synced(&staging.path().join("vmlinuz"), &bzimage_bytes)?;
    let extracted = match spec.built_kernel {
        Some(built) => Ok(fs::read(&built.vmlinux).map_err(io_error(&built.vmlinux))?),
        None => {
            progress("Extracting the uncompressed vmlinux from the bzImage");
            vmlinux::extract_vmlinux(&bzimage_bytes)
        }
    };
    let vmlinux_bytes = match extracted.and_then(|bytes| vmlinux::without_sections(&bytes)) {
        Ok(bytes) => {
            write_synced(&staging.path().join("vmlinux"), &bytes)?;
            Some(bytes)
        }
        Err(err) => {
            tracing::warn!(error = %err, kernel = %vmlinuz_source.display(), "no PVH vmlinux; VMs will boot the bzImage");
            None
        }
    };

    let module_files = if spec.built_kernel.is_some() {
        Vec::new()
    } else {
        package_modules(spec, &release, progress)?
    };

    let busybox = find_busybox(spec.busybox_root, &spec.busybox.name)?;
    let applets = list_applets(&busybox, &spec.busybox.name)?;

    progress("Writing initramfs");
    let initrd_path = staging.path().join("initrd.img");
    initramfs::write_initramfs(
        &initrd_path,
        &InitramfsContents {
            agent: spec.agent.to_owned(),
            busybox,
            applets,
            modules: module_files.clone(),
        },
    )?;

    let dir = spec.images_dir.join(spec.key);
    let image = rebased(
        GuestImage {
            dir: dir.clone(),
            kernel: PathBuf::new(),
            bzimage: PathBuf::new(),
            vmlinux: vmlinux_bytes.as_ref().map(|_| PathBuf::new()),
            initrd: PathBuf::new(),
            kernel_release: release,
            kernel_package: spec.kernel.name.clone(),
            kernel_version: spec.kernel.version.clone(),
            key: spec.key.to_owned(),
            kernel_source: if spec.built_kernel.is_some() {
                KernelSource::Vmfactory
            } else {
                KernelSource::Debian
            },
        },
        &dir,
    );
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        image: image.clone(),
        busybox_package: spec.busybox.name.clone(),
        busybox_version: spec.busybox.version.clone(),
        inputs: spec.inputs.clone(),
        module_load_order: module_files.iter().map(ModuleFile::file_name).collect(),
        vmlinuz_sha256: format!("{:x}", Sha256::digest(&bzimage_bytes)),
        vmlinux_sha256: vmlinux_bytes
            .as_deref()
            .map(|b| format!("{:x}", Sha256::digest(b))),
        initrd_sha256: sha256_file(&initrd_path)?,
    };
    let manifest_path = staging.path().join(MANIFEST_FILE);
    let mut json =
        serde_json::to_vec_pretty(&manifest).map_err(|source| GuestImageError::Manifest {
            path: dir.join(MANIFEST_FILE),
            source,
        })?;
    json.push(b'\n');
    write_synced(&manifest_path, &json)?;

    install(staging, &dir, spec.key, spec.force)
}

/// The modules of Debian's kernel package to include: the root modules and their
/// dependencies, in load order.
fn package_modules(
    spec: &Assembly<'_>,
    release: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ModuleFile>, GuestImageError> {
    progress("Resolving kernel module dependencies");
    let modules_root = find_modules_root(spec.kernel_root, release).ok_or_else(|| {
        GuestImageError::KernelLayout {
            package: spec.kernel.name.clone(),
            what: format!("lib/modules/{release}/kernel directory"),
        }
    })?;
    let index = modules::ModuleIndex::scan(&modules_root)?;
    tracing::debug!(count = index.len(), "indexed kernel modules");
    let resolved = modules::resolve(&index, &spec.inputs.modules)?;
    Ok(resolved
        .into_iter()
        .map(|module| ModuleFile {
            name: module.name,
            source: module.path,
        })
        .collect())
}

/// Finds `boot/vmlinuz-<release>` in the unpacked kernel package; the release is the
/// package name without `linux-image-`, or the only vmlinuz present.
fn find_kernel(root: &Path, package: &str) -> Result<(String, PathBuf), GuestImageError> {
    let boot = root.join("boot");
    if let Some(release) = package.strip_prefix("linux-image-") {
        let candidate = boot.join(format!("vmlinuz-{release}"));
        if candidate.is_file() {
            return Ok((release.to_owned(), candidate));
        }
    }
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(&boot) {
        for entry in entries.flatten() {
            if let Some(release) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
            {
                found.push((release.to_owned(), entry.path()));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(GuestImageError::KernelLayout {
            package: package.to_owned(),
            what: "boot/vmlinuz-* file".to_owned(),
        }),
        _ => Err(GuestImageError::KernelLayout {
            package: package.to_owned(),
            what: "single boot/vmlinuz-* file (it has several)".to_owned(),
        }),
    }
}

/// The `kernel` directory of the modules of `release` (under `lib` or `usr/lib`).
fn find_modules_root(root: &Path, release: &str) -> Option<PathBuf> {
    ["lib", "usr/lib"]
        .iter()
        .map(|prefix| {
            root.join(prefix)
                .join("modules")
                .join(release)
                .join("kernel")
        })
        .find(|dir| dir.is_dir())
}

/// The busybox binary in the unpacked busybox package.
fn find_busybox(root: &Path, package: &str) -> Result<PathBuf, GuestImageError> {
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|rel| root.join(rel))
        .find(|path| path.is_file())
        .ok_or_else(|| GuestImageError::Busybox {
            package: package.to_owned(),
            detail: "it contains no bin/busybox".to_owned(),
        })
}

/// Runs `busybox --list-full` on the host and returns the applet paths to link.
fn list_applets(busybox: &Path, package: &str) -> Result<Vec<String>, GuestImageError> {
    let failed = |detail: String| GuestImageError::Busybox {
        package: package.to_owned(),
        detail,
    };
    let output = Command::new(busybox)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| failed(format!("cannot run {}: {err}", busybox.display())))?;
    if !output.status.success() {
        return Err(failed(format!(
            "`busybox --list-full` failed with {}",
            output.status
        )));
    }
    let applets = initramfs::applet_paths(&String::from_utf8_lossy(&output.stdout));
    if applets.is_empty() {
        return Err(failed("`busybox --list-full` listed no applets".to_owned()));
    }
    Ok(applets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apt::PackageVersion;
    use crate::cpio::read_entries;
    use crate::digest::sha256_file;
    use crate::elf::tests::{build_elf, note};
    use crate::elf::PT_NOTE;
    use crate::image::tests::inputs;
    use crate::image::{load_cached, read_manifest};
    use crate::BUSYBOX_PACKAGE;
    use std::os::unix::fs::PermissionsExt;

    /// Lays out a fake unpacked kernel and busybox package under `root`.
    fn fake_packages(root: &Path, release: &str, with_pvh: bool) {
        let kernel = root.join("kernel");
        let boot = kernel.join("boot");
        fs::create_dir_all(&boot).expect("mkdir");
        let notes = if with_pvh {
            note("Xen", vmlinux::XEN_ELFNOTE_PHYS32_ENTRY, &[0, 0, 0, 1])
        } else {
            note("GNU", 3, b"id")
        };
        let vmlinux = build_elf(&[(PT_NOTE, &notes)], &[(".text", &[0x90; 3000])]);
        let mut payload = 0x184C_2102u32.to_le_bytes().to_vec();
        let block = lz4_flex::block::compress(&vmlinux);
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        let mut bzimage = b"bzImage stub ".to_vec();
        bzimage.extend_from_slice(&payload);
        fs::write(boot.join(format!("vmlinuz-{release}")), bzimage).expect("write");

        let mods = kernel.join(format!("lib/modules/{release}/kernel/drivers/virtio"));
        fs::create_dir_all(&mods).expect("mkdir");
        for (name, modinfo) in [
            ("virtio_ring", &b"depends=\0name=virtio_ring\0"[..]),
            ("virtio", b"depends=virtio_ring\0name=virtio\0"),
            (
                "virtio_console",
                b"depends=virtio,virtio_ring\0name=virtio_console\0",
            ),
        ] {
            fs::write(
                mods.join(format!("{name}.ko")),
                build_elf(&[], &[(".modinfo", modinfo)]),
            )
            .expect("write");
        }

        let bin = root.join("busybox/bin");
        fs::create_dir_all(&bin).expect("mkdir");
        let busybox = bin.join("busybox");
        fs::write(
            &busybox,
            "#!/bin/sh\nprintf 'bin/busybox\\nbin/sh\\nsbin/init\\nlinuxrc\\nusr/bin/env\\n'\n",
        )
        .expect("write");
        fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn assembles_installs_and_reuses_an_image_offline() {
        let cache = tempfile::tempdir().expect("tempdir");
        let images = cache.path().join("images");
        fs::create_dir_all(&images).expect("mkdir");
        let release = "6.1.0-99-cloud-amd64";
        fake_packages(cache.path(), release, true);
        let agent = cache.path().join("agent");
        fs::write(&agent, build_elf(&[], &[])).expect("write");
        let kernel = PackageVersion {
            name: format!("linux-image-{release}"),
            version: "6.1.999-1".into(),
        };
        let busybox = PackageVersion {
            name: BUSYBOX_PACKAGE.into(),
            version: "1:1.35.0-4".into(),
        };
        let inputs = ImageInputs {
            modules: vec!["virtio_console".into()],
            ..inputs()
        };
        let key = inputs.key();
        let assembly = Assembly {
            images_dir: &images,
            key: &key,
            kernel_root: &cache.path().join("kernel"),
            busybox_root: &cache.path().join("busybox"),
            agent: &agent,
            kernel: &kernel,
            busybox: &busybox,
            inputs: &inputs,
            force: false,
            built_kernel: None,
        };
        let mut messages = Vec::new();
        let image =
            assemble(&assembly, &mut |m: &str| messages.push(m.to_owned())).expect("assemble");
        assert!(messages.iter().any(|m| m.starts_with("Writing initramfs")));
        assert_eq!(image.dir, images.join(&key));
        assert_eq!(image.kernel_release, release);
        assert_eq!(image.kernel_version, "6.1.999-1");
        assert_eq!(
            image.vmlinux.as_deref(),
            Some(image.dir.join("vmlinux").as_path())
        );
        assert_eq!(image.kernel, image.dir.join("vmlinux"));
        assert!(fs::read(image.dir.join("vmlinux"))
            .expect("vmlinux")
            .starts_with(b"\x7fELF"));

        let entries = read_entries(&fs::read(&image.initrd).expect("initrd")).expect("parse");
        let find = |name: &str| entries.iter().find(|e| e.name == name);
        assert_eq!(
            find("lib/modules/load-order").expect("load-order").data,
            b"virtio_ring.ko\nvirtio.ko\nvirtio_console.ko\n"
        );
        assert!(find("init").is_some());
        assert!(find("usr/bin/env").is_some());
        assert!(find("sbin/init").is_none());

        let manifest = read_manifest(&image.dir).expect("manifest");
        assert_eq!(manifest.image, image);
        assert_eq!(manifest.inputs, inputs);
        assert_eq!(
            manifest.module_load_order,
            ["virtio_ring.ko", "virtio.ko", "virtio_console.ko"]
        );
        assert!(manifest.vmlinux_sha256.is_some());
        assert_eq!(
            manifest.initrd_sha256,
            sha256_file(&image.initrd).expect("hash")
        );

        // No staging directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(&images)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        assert_eq!(load_cached(&image.dir, &key), Some(image.clone()));
        assert_eq!(load_cached(&image.dir, "other"), None);

        // A forced rebuild replaces the image in place.
        let forced = assemble(
            &Assembly {
                force: true,
                ..assembly
            },
            &mut |_: &str| {},
        )
        .expect("forced");
        assert_eq!(forced, image);
        assert_eq!(fs::read_dir(&images).expect("list").count(), 1);
    }

    #[test]
    fn falls_back_to_the_bzimage_without_pvh_note() {
        let cache = tempfile::tempdir().expect("tempdir");
        let images = cache.path().join("images");
        fs::create_dir_all(&images).expect("mkdir");
        let release = "6.1.0-98-cloud-amd64";
        fake_packages(cache.path(), release, false);
        let agent = cache.path().join("agent");
        fs::write(&agent, build_elf(&[], &[])).expect("write");
        let kernel = PackageVersion {
            name: format!("linux-image-{release}"),
            version: "1".into(),
        };
        let busybox = PackageVersion {
            name: BUSYBOX_PACKAGE.into(),
            version: "1".into(),
        };
        let inputs = inputs();
        let image = assemble(
            &Assembly {
                images_dir: &images,
                key: "k",
                kernel_root: &cache.path().join("kernel"),
                busybox_root: &cache.path().join("busybox"),
                agent: &agent,
                kernel: &kernel,
                busybox: &busybox,
                inputs: &ImageInputs {
                    modules: vec!["virtio-pci".into()],
                    ..inputs
                },
                force: false,
                built_kernel: None,
            },
            &mut |_: &str| {},
        );
        // virtio_pci is not in the fake package: the error names it.
        let err = image.expect_err("missing module");
        assert!(
            err.to_string().contains("virtio-pci") || err.to_string().contains("virtio_pci"),
            "{err}"
        );

        let image = assemble(
            &Assembly {
                images_dir: &images,
                key: "k",
                kernel_root: &cache.path().join("kernel"),
                busybox_root: &cache.path().join("busybox"),
                agent: &agent,
                kernel: &kernel,
                busybox: &busybox,
                inputs: &ImageInputs {
                    modules: vec!["virtio".into()],
                    ..self::inputs()
                },
                force: false,
                built_kernel: None,
            },
            &mut |_: &str| {},
        )
        .expect("assemble");
        assert_eq!(image.vmlinux, None);
        assert_eq!(image.kernel, image.bzimage);
        assert!(!image.dir.join("vmlinux").exists());
    }
}
