//! A stand-in for QEMU's disassembler library. QEMU links capstone, which it calls only to
//! print code (`-d in_asm`, the monitor's `x/i`), but the dynamic linker relocates the
//! library's pointer tables in every QEMU process at start: about 1.3 MiB of private
//! memory per VM, a twentieth of an idle clone. vmfactory compiles a stub with the five
//! functions QEMU imports (`capstone_stub.c`, whose `cs_open` fails, so QEMU prints no
//! disassembly) into its cache once, checks that the QEMU binary starts with it, and
//! then runs QEMU with `LD_LIBRARY_PATH` naming the stub's directory.
//!
//! Hand-written because no crate does it: it is a C shared object with the library's
//! file name, compiled with the host's `cc` (which the guest kernel's build needs too).
//! Without a compiler, or with a QEMU that does not start with the stub (another
//! capstone ABI), QEMU keeps its own library; nothing fails.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, info};

/// The stub's C source.
const SOURCE: &str = include_str!("capstone_stub.c");
/// The file names QEMU's builds ask for (Debian 12's capstone 4, newer distributions' 5):
/// the stub answers to both.
const NAMES: [&str; 2] = ["libcapstone.so.4", "libcapstone.so.5"];

/// The environment variable that points QEMU's dynamic linker at the stub.
pub const LIBRARY_PATH_VAR: &str = "LD_LIBRARY_PATH";

/// How long a failed compile of the stub is remembered before the next command tries
/// again (a C compiler installed meanwhile is then used).
const COMPILE_RETRY: Duration = Duration::from_secs(24 * 60 * 60);
/// A `.build-*` directory older than this was left by a killed compile.
const BUILD_LEFTOVER: Duration = Duration::from_secs(60 * 60);

/// The directory holding the stub for `binary` (a resolved QEMU path), compiled under
/// `cache_dir` the first time and checked once per QEMU binary (a marker keyed by its
/// path, size, inode and modification time); `None` when QEMU should keep its own
/// library: it does not link capstone, no C compiler is there, QEMU does not start with
/// the stub, or the stub is not safe to load (below).
///
/// QEMU loads the stub as code, so on every use the library and each directory from
/// `cache_dir` down to it must belong to this user and be writable by nobody else: a
/// root vmfactory pointed at a user's cache (`sudo -E`) must not run that user's code.
pub fn prepare(cache_dir: &Path, binary: &Path) -> Option<PathBuf> {
    let root = cache_dir.join("qemu-stub");
    let dir = root.join(&format!("{:x}", Sha256::digest(SOURCE))[..16]);
    let library = dir.join(NAMES[0]);
    let key = binary_key(binary)?;
    let (good, bad) = (dir.join(format!("ok-{key}")), dir.join(format!("no-{key}")));
    if bad.exists() {
        return None;
    }
    if !library.exists() {
        let failed = root.join("compile-failed");
        if age(&failed).is_some_and(|age| age < COMPILE_RETRY) {
            return None;
        }
        if let Err(err) = compile(&root, &dir) {
            info!(%err, "QEMU keeps its disassembler library: the stand-in cannot be built");
            let _ = std::fs::write(&failed, err.to_string());
            return None;
        }
        let _ = std::fs::remove_file(&failed);
    }
    if let Some(unsafe_path) = [cache_dir, &root, &dir, &library]
        .into_iter()
        .find(|path| !ours_alone(path))
    {
        info!(
            path = %unsafe_path.display(),
            "QEMU keeps its disassembler library: the stand-in's files are not this user's alone"
        );
        return None;
    }
    if good.exists() {
        return Some(dir);
    }
    // None: QEMU did not start even without the stub; decide another time.
    let usable = check(binary, &dir)?;
    let marker = if usable { &good } else { &bad };
    if let Err(err) = std::fs::write(marker, b"") {
        debug!(%err, path = %marker.display(), "Cannot record the stand-in's check");
    }
    if usable {
        info!(
            binary = %binary.display(),
            "QEMU runs with vmfactory's stand-in for its disassembler library (capstone)"
        );
        Some(dir)
    } else {
        info!(binary = %binary.display(), "QEMU keeps its disassembler library: it does not start with the stand-in");
        None
    }
}

/// True when `path` (not a link) belongs to this process's user and no one else may write
/// to it.
fn ours_alone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| {
        !meta.file_type().is_symlink()
            && meta.uid() == rustix::process::geteuid().as_raw()
            && meta.mode() & 0o022 == 0
    })
}

/// How long ago `path` was last modified, if it exists.
fn age(path: &Path) -> Option<Duration> {
    std::fs::metadata(path)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()
}

/// What identifies one QEMU binary on this host: a digest of its path, size, inode and
/// modification time (an upgrade changes them).
fn binary_key(binary: &Path) -> Option<String> {
    let meta = std::fs::metadata(binary).ok()?;
    let identity = format!(
        "{}\0{}\0{}\0{}.{}",
        binary.display(),
        meta.len(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    Some(format!("{:x}", Sha256::digest(identity))[..16].to_string())
}

/// Compiles the stub into `dir` under `root` (made whole in a temporary directory and
/// renamed, so a racing compile or a reader never sees half of it; modes 0755, writable
/// by us alone). `.build-*` directories a killed compile left are removed first.
fn compile(root: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(root)?;
    for entry in std::fs::read_dir(root)?.flatten() {
        let leftover = entry.file_name().to_string_lossy().starts_with(".build-")
            && age(&entry.path()).is_some_and(|age| age > BUILD_LEFTOVER);
        if leftover {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let work = tempfile_dir(root)?;
    let result = (|| {
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
        let source = work.join("capstone_stub.c");
        std::fs::write(&source, SOURCE)?;
        let output = Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-nostdlib", "-ffreestanding"])
            .arg(format!("-Wl,-soname,{}", NAMES[0]))
            .arg("-o")
            .arg(work.join(NAMES[0]))
            .arg(&source)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "cc failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        std::fs::set_permissions(work.join(NAMES[0]), std::fs::Permissions::from_mode(0o755))?;
        for name in &NAMES[1..] {
            std::os::unix::fs::symlink(NAMES[0], work.join(name))?;
        }
        match std::fs::rename(&work, dir) {
            // Another process made it meanwhile: theirs is the same.
            Err(_) if dir.join(NAMES[0]).exists() => Ok(()),
            other => other,
        }
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A new empty directory under `parent`.
fn tempfile_dir(parent: &Path) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!(
        ".build-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// True when the binary names capstone among its libraries (its dynamic string table
/// holds the file name).
fn links_capstone(binary: &Path) -> bool {
    std::fs::read(binary).is_ok_and(|bytes| {
        bytes
            .windows(b"libcapstone.so.".len())
            .any(|window| window == b"libcapstone.so.")
    })
}

/// Whether `binary` is to run with the stub in `dir`: it names capstone among its
/// libraries, and `binary --version` prints with the stub first in its library path what
/// it prints without (every symbol QEMU imports from capstone resolves: Debian builds
/// QEMU with immediate binding, so a missing one fails the start). `None` when QEMU does
/// not even start without the stub (nothing to conclude).
fn check(binary: &Path, dir: &Path) -> Option<bool> {
    let version = |stub: Option<&Path>| {
        let mut command = Command::new(binary);
        command.arg("--version").stdin(Stdio::null());
        if let Some(stub) = stub {
            command.env(LIBRARY_PATH_VAR, library_path(stub));
        }
        command
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| output.stdout)
    };
    let without = version(None)?;
    if !links_capstone(binary) {
        return Some(false);
    }
    Some(version(Some(dir)).is_some_and(|with| with == without && with.starts_with(b"QEMU")))
}

/// `LD_LIBRARY_PATH` for a QEMU run with the stub in `dir`: the stub first, then whatever
/// the caller's environment names.
pub fn library_path(dir: &Path) -> std::ffi::OsString {
    let mut value = dir.as_os_str().to_os_string();
    if let Some(existing) = std::env::var_os(LIBRARY_PATH_VAR).filter(|v| !v.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The QEMU the test suite installs.
    const QEMU: &str = "/usr/bin/qemu-system-x86_64";

    #[test]
    fn the_stub_is_built_once_and_checked_against_the_qemu_binary() {
        let cache = tempfile::tempdir().expect("tempdir");
        let dir = prepare(cache.path(), Path::new(QEMU)).expect("the stub is usable");
        assert!(dir.join(NAMES[0]).is_file());
        assert!(dir.join(NAMES[1]).exists());
        // What QEMU's dynamic linker would load: the stub, with the five functions.
        let output = Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(dir.join(NAMES[0]))
            .output()
            .expect("nm");
        let symbols = String::from_utf8_lossy(&output.stdout);
        for name in [
            "cs_open",
            "cs_close",
            "cs_option",
            "cs_malloc",
            "cs_disasm_iter",
        ] {
            assert!(symbols.contains(name), "{symbols}");
        }
        let ldd = Command::new("ldd")
            .arg(QEMU)
            .env(LIBRARY_PATH_VAR, library_path(&dir))
            .output()
            .expect("ldd");
        let ldd = String::from_utf8_lossy(&ldd.stdout);
        assert!(
            ldd.lines()
                .any(|l| l.contains("libcapstone") && l.contains(&*dir.to_string_lossy())),
            "{ldd}"
        );
        // Checked once: the marker answers next time. A stub removed since is built again.
        let marker = std::fs::read_dir(&dir)
            .expect("read")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("ok-"))
            .expect("marker");
        std::fs::remove_dir_all(&dir).expect("rm");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), Some(dir.clone()));
        assert!(dir.join(NAMES[0]).is_file() && dir.join(marker.file_name()).exists());

        // A stub another user could have written is not loaded: here, a library that
        // others may write to.
        use std::os::unix::fs::PermissionsExt;
        let library = dir.join(NAMES[0]);
        std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o757)).expect("chmod");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), None);
        std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), Some(dir.clone()));

        // A "QEMU" that links no capstone (a script) keeps its own libraries.
        let fake = cache.path().join("qemu-system-x86_64");
        std::fs::write(&fake, "#!/bin/sh\necho 'QEMU emulator version 0'\n").expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        assert_eq!(prepare(cache.path(), &fake), None);
        assert!(std::fs::read_dir(&dir)
            .expect("read")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("no-")));
    }
}
