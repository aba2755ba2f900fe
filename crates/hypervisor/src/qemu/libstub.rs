//! Stand-ins for libraries QEMU links but vmfactory's VMs never call. The dynamic linker
//! maps, relocates and binds every library a QEMU binary names, in every QEMU process:
//! Debian's QEMU 7.2 loads 51. Some serve only features vmfactory never asks for (it writes
//! QEMU's command line and is its only QMP client): the disassembler (capstone, for
//! `-d in_asm` and the monitor's `x/i`), RDMA migration, persistent memory, VDE
//! networking, FUSE exports, virtio-net's eBPF steering, VNC and PNG screendumps. Their
//! relocated tables cost private memory in every VM (capstone's alone 1.3 MiB) and their
//! loading time at every start.
//!
//! vmfactory builds stand-ins for those QEMU links into its cache once: capstone's from
//! `capstone_stub.c` (its `cs_open` fails, so QEMU prints no disassembly), the others
//! generated from the installed library ([`super::stubgen`]: every export, as a trap). It
//! checks once per QEMU binary that QEMU starts with them, then runs QEMU with
//! `LD_LIBRARY_PATH` naming their directory.
//!
//! Hand-written because no crate does it: they are shared objects with the libraries'
//! file names, built with the host's `cc` (which the guest kernel's build needs too).
//! Without a compiler, or with a QEMU that does not start with them, QEMU keeps its own
//! libraries; nothing fails.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, info};

/// The capstone stand-in's C source.
const CAPSTONE_SOURCE: &str = include_str!("capstone_stub.c");
/// The start of capstone's file names (Debian 12's `libcapstone.so.4`, newer
/// distributions' `.so.5`: the stand-in answers to both).
const CAPSTONE: &str = "libcapstone.so.";

/// The starts of the file names of the libraries QEMU links for features vmfactory never
/// uses, each stood in for by a generated library.
const UNUSED: [&str; 9] = [
    // RDMA migration (`rdma:` URIs) and the pvrdma device.
    "librdmacm.so.",
    "libibverbs.so.",
    // Persistent-memory backends (`pmem=on`).
    "libpmem.so.",
    // VDE networking.
    "libvdeplug.so.",
    // FUSE block exports.
    "libfuse3.so.",
    // virtio-net's eBPF receive-side scaling.
    "libbpf.so.",
    // VNC: SASL authentication, JPEG encoding; PNG screendumps.
    "libsasl2.so.",
    "libjpeg.so.",
    "libpng16.so.",
];

/// The environment variable that points QEMU's dynamic linker at the stand-ins.
pub const LIBRARY_PATH_VAR: &str = "LD_LIBRARY_PATH";

/// How long a failed build of the stand-ins is remembered before the next command tries
/// again (a C compiler installed meanwhile is then used).
const COMPILE_RETRY: Duration = Duration::from_secs(24 * 60 * 60);
/// A `.build-*` directory older than this was left by a killed build (whatever its pid
/// says).
const BUILD_LEFTOVER: Duration = Duration::from_secs(60 * 60);

/// One stand-in to build.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StandIn {
    /// The file name QEMU asks for (`libibverbs.so.1`).
    soname: String,
    source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The capstone stand-in, in C.
    Capstone,
    /// Generated from the installed library.
    Generated(super::stubgen::Generated),
}

/// The directory holding the stand-ins for `binary` (a resolved QEMU path), built under
/// `cache_dir` the first time and checked once per QEMU binary (a decision file keyed by
/// its path, size, inode and modification time); `None` when QEMU should keep its own
/// libraries: it links none of them, no C compiler is there, QEMU does not start with
/// the stand-ins, or they are not safe to load (below).
///
/// QEMU loads the stand-ins as code, so on every use each of them and each directory from
/// `cache_dir` down to them must belong to this user and be writable by nobody else: a
/// root vmfactory pointed at a user's cache (`sudo -E`) must not run that user's code.
pub fn prepare(cache_dir: &Path, binary: &Path) -> Option<PathBuf> {
    // Nothing is read, written or loaded under a cache another user could change: not
    // the cache itself, nor a directory above it (which could be renamed away and
    // replaced, hours after any check), along the path as given (a link in it lives in
    // a directory checked there) and where it leads.
    let untrusted = untrusted_in_chain(cache_dir);
    // Then used where it leads (a cache directory may be a link).
    let cache_dir = &std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.to_path_buf());
    let root = cache_dir.join("qemu-stub");
    if let Some(untrusted) =
        untrusted.or_else(|| (root.exists() && !ours_alone(&root)).then(|| root.clone()))
    {
        info!(
            path = %untrusted.display(),
            "QEMU keeps all its libraries: another user may write to this directory of vmfactory's cache or above it"
        );
        return None;
    }
    sweep_dead_builds(&root);
    let key = binary_key(binary)?;
    let decision = root.join(format!("for-{key}"));
    match std::fs::read_to_string(&decision)
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("none") => {
            debug!("QEMU keeps all its libraries (decided before for this binary)");
            return None;
        }
        Some(name) if is_plain_name(name) && root.join(name).is_dir() => {
            let dir = root.join(name);
            // A stand-in cut short (a crash, a full disk) would fail every start: made
            // again below.
            let safe = safe_to_load(cache_dir, &root, &dir);
            if !safe || intact(&dir) {
                debug!(
                    dir = %dir.display(),
                    used = safe,
                    "QEMU's library stand-ins (decided before for this binary)"
                );
                return safe.then_some(dir);
            }
            info!(dir = %dir.display(), "Rebuilding vmfactory's damaged library stand-ins");
            let _ = std::fs::remove_dir_all(&dir);
        }
        // Not decided yet, or its stand-ins were removed since: made (again) below.
        _ => {}
    }
    let failed = root.join("compile-failed");
    if age(&failed).is_some_and(|age| age < COMPILE_RETRY) {
        return None;
    }
    // Only a dynamically linked program naming one of them is traced: the trace mode
    // would run a static one (and a script's interpreter is traced instead of it).
    let names_one = super::stubgen::needed(binary)
        .is_ok_and(|needed| needed.iter().any(|name| is_candidate(name)));
    if !names_one {
        record(&root, &decision, "none");
        return None;
    }
    // None: QEMU's libraries cannot be listed now; decide another time.
    let linked = linked_libraries(binary)?;
    let stand_ins = stand_ins_for(&linked)?;
    if stand_ins.is_empty() {
        record(&root, &decision, "none");
        return None;
    }
    let name = digest(&stand_ins);
    let dir = root.join(&name);
    if !dir.is_dir() {
        if let Err(err) = compile(&root, &dir, &stand_ins) {
            info!(%err, "QEMU keeps all its libraries: vmfactory's stand-ins cannot be built");
            if root_is_ours(&root).is_ok() {
                let _ = std::fs::write(&failed, err.to_string());
            }
            return None;
        }
        let _ = std::fs::remove_file(&failed);
    }
    if !safe_to_load(cache_dir, &root, &dir) {
        return None;
    }
    // None: QEMU did not start even without the stand-ins; decide another time.
    let usable = check(binary, &dir)?;
    record(&root, &decision, if usable { &name } else { "none" });
    let names: Vec<&str> = stand_ins.iter().map(|s| s.soname.as_str()).collect();
    if usable {
        info!(
            binary = %binary.display(),
            libraries = names.join(" "),
            "QEMU runs with vmfactory's stand-ins for libraries it never calls"
        );
        Some(dir)
    } else {
        info!(
            binary = %binary.display(),
            libraries = names.join(" "),
            "QEMU keeps all its libraries: it does not start with vmfactory's stand-ins"
        );
        None
    }
}

/// Writes `value` to the decision file `path` (whole, through a rename).
fn record(root: &Path, path: &Path, value: &str) {
    let temporary = root.join(format!(".decision-{}", std::process::id()));
    let written = ensure_root(root)
        .and_then(|()| root_is_ours(root))
        .and_then(|()| std::fs::write(&temporary, value))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        debug!(%err, path = %path.display(), "Cannot record the stand-ins' check");
    }
}

/// Fails unless `root` and the cache directory holding it are ours alone: checked again
/// after they may have been made, before anything is written there (another user could
/// have made them first in a sticky directory such as /tmp).
fn root_is_ours(root: &Path) -> std::io::Result<()> {
    if ours_alone(root) && root.parent().is_some_and(ours_alone) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} is not this user's alone",
            root.display()
        )))
    }
}

/// Makes `root` (0755) if it is missing.
fn ensure_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(root)
}

/// True for a directory name a decision file may hold: hexadecimal digits only.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The libraries QEMU's dynamic linker loads for `binary`, as (file name asked for, path
/// found), from its trace mode (`LD_TRACE_LOADED_OBJECTS`: the binary itself does not run).
fn linked_libraries(binary: &Path) -> Option<Vec<(String, PathBuf)>> {
    let output = Command::new(binary)
        // Should a dynamic linker without the trace mode (not glibc's) run QEMU, this
        // makes it print its version and exit.
        .arg("--version")
        .env("LD_TRACE_LOADED_OBJECTS", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(
        text.lines()
            .filter_map(|line| {
                let (name, rest) = line.trim().split_once(" => ")?;
                let path = rest.rsplit_once(" (0x").map_or(rest, |(path, _)| path);
                path.starts_with('/')
                    .then(|| (name.to_string(), PathBuf::from(path)))
            })
            .collect(),
    )
}

/// The stand-ins to build for QEMU's `linked` libraries: capstone's and those of the
/// unused ones, but none another (kept) library needs, which might call it. `None` when a
/// library cannot be read.
fn stand_ins_for(linked: &[(String, PathBuf)]) -> Option<Vec<StandIn>> {
    let mut chosen: Vec<&(String, PathBuf)> = linked
        .iter()
        .filter(|(name, _)| is_candidate(name))
        .collect();
    // The libraries every kept library needs; removing a candidate keeps it, so repeat.
    let mut needs: Vec<(&str, Vec<String>)> = Vec::new();
    for (name, path) in linked {
        match super::stubgen::needed(path) {
            Ok(needed) => needs.push((name, needed)),
            Err(err) => {
                debug!(%err, "Cannot read a library QEMU links");
                return None;
            }
        }
    }
    loop {
        let kept_needs = needs
            .iter()
            .filter(|(name, _)| !chosen.iter().any(|(chosen, _)| chosen == name))
            .flat_map(|(_, needed)| needed)
            .collect::<Vec<_>>();
        let before = chosen.len();
        chosen.retain(|(name, _)| !kept_needs.contains(&name));
        if chosen.len() == before {
            break;
        }
    }
    let mut stand_ins = Vec::new();
    for (soname, path) in chosen {
        let source = if soname.starts_with(CAPSTONE) {
            Source::Capstone
        } else {
            match super::stubgen::generate(path) {
                Ok(generated) => Source::Generated(generated),
                Err(err) => {
                    debug!(%err, "QEMU keeps this library: no stand-in can be generated");
                    continue;
                }
            }
        };
        stand_ins.push(StandIn {
            soname: soname.clone(),
            source,
        });
    }
    Some(stand_ins)
}

/// True for the file name of a library vmfactory stands in for.
fn is_candidate(name: &str) -> bool {
    name.starts_with(CAPSTONE) || UNUSED.iter().any(|prefix| name.starts_with(prefix))
}

/// The name of the directory holding `stand_ins`: a digest of their names and sources.
fn digest(stand_ins: &[StandIn]) -> String {
    let mut hasher = Sha256::new();
    for stand_in in stand_ins {
        hasher.update(stand_in.soname.as_bytes());
        hasher.update([0]);
        match &stand_in.source {
            Source::Capstone => hasher.update(CAPSTONE_SOURCE),
            Source::Generated(generated) => {
                hasher.update(&generated.assembly);
                hasher.update([0]);
                hasher.update(generated.version_script.as_deref().unwrap_or_default());
            }
        }
        hasher.update([0]);
    }
    format!("{:x}", hasher.finalize())[..16].to_string()
}

/// True when the stand-ins in `dir` are safe to load: `dir`, every file in it, and each
/// directory from `cache_dir` down to it are this user's and writable by nobody else.
fn safe_to_load(cache_dir: &Path, root: &Path, dir: &Path) -> bool {
    let files = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|entry| entry.path()).collect(),
        Err(_) => Vec::new(),
    };
    let unsafe_path = [cache_dir, root, dir]
        .into_iter()
        .chain(files.iter().map(PathBuf::as_path))
        .find(|path| !ours_alone(path));
    if let Some(path) = unsafe_path {
        info!(
            path = %path.display(),
            "QEMU keeps all its libraries: vmfactory's stand-ins are not this user's alone"
        );
        return false;
    }
    true
}

/// True when every stand-in in `dir` is a whole ELF shared object.
fn intact(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut any = false;
    for entry in entries.flatten() {
        any = true;
        let whole = std::fs::read(entry.path()).is_ok_and(|data| {
            object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).is_ok()
        });
        if !whole {
            return false;
        }
    }
    any
}

/// Removes the `.build-*` directories under `root` whose builder is gone (killed in the
/// middle of a build) and that are a minute old.
fn sweep_dead_builds(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".build-")) else {
            continue;
        };
        let builder_gone = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        // A minute at least: a builder in another PID namespace is not in our /proc.
        let age = age(&entry.path()).unwrap_or_default();
        if (builder_gone && age > Duration::from_secs(60)) || age > BUILD_LEFTOVER {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Where another user could change code vmfactory would run from `path`, a file or
/// directory under `cache_dir` (vmfactory's own QEMU): `cache_dir` and the directories
/// above it by [`untrusted_in_chain`]'s rule, then `path` and every directory between
/// them that exists, each this user's alone and not a link. `None`: safe to run or
/// build there. A root vmfactory pointed at a user's cache runs Debian's QEMU instead of
/// a binary that user could have replaced.
pub fn untrusted_code_path(cache_dir: &Path, path: &Path) -> Option<PathBuf> {
    if let Some(untrusted) = untrusted_in_chain(cache_dir) {
        return Some(untrusted);
    }
    let Ok(below) = path.strip_prefix(cache_dir) else {
        return Some(path.to_path_buf());
    };
    let mut at = std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.to_path_buf());
    for component in below.components() {
        at.push(component);
        if at.symlink_metadata().is_err() {
            break;
        }
        if !ours_alone(&at) {
            return Some(at);
        }
    }
    None
}

/// The first directory, from `dir` (or, if it does not exist yet, its nearest existing
/// ancestor) up, that fails the rule: `dir` is this user's alone, and every directory
/// above it belongs to root or this user and is writable by no one else, or is sticky
/// (as `/tmp`: others cannot rename what is ours there).
fn untrusted_in_chain(dir: &Path) -> Option<PathBuf> {
    let uid = rustix::process::geteuid().as_raw();
    let trusted_above = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|meta| {
            (meta.uid() == 0 || meta.uid() == uid)
                && (meta.mode() & 0o022 == 0 || meta.mode() & 0o1000 != 0)
        })
    };
    let mut existing = dir.to_path_buf();
    let mut made = false;
    while !existing.exists() {
        made = true;
        if !existing.pop() {
            return Some(dir.to_path_buf());
        }
    }
    let Ok(canonical) = std::fs::canonicalize(&existing) else {
        return Some(existing);
    };
    if !made && !ours_alone(&canonical) {
        return Some(canonical);
    }
    let skip = usize::from(!made);
    // Both the path as given (a link in it lives in a directory checked here) and where
    // it leads.
    canonical
        .ancestors()
        .skip(skip)
        .chain(existing.ancestors().skip(skip))
        .filter(|ancestor| !ancestor.as_os_str().is_empty())
        .find(|ancestor| !trusted_above(ancestor))
        .map(Path::to_path_buf)
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

/// Changed whenever what a stand-in is made of changes ([`super::stubgen`]'s output).
const GENERATOR_REVISION: &str = "1";

/// What a decision holds for: a digest of the QEMU binary's path, size, inode and
/// modification time (an upgrade changes them), of what vmfactory stands in for and how,
/// and of the dynamic linker's cache (`ldconfig` rewrites it when libraries are installed
/// or upgraded, which may change what QEMU loads).
fn binary_key(binary: &Path) -> Option<String> {
    let identity = |path: &Path| {
        std::fs::metadata(path).ok().map(|meta| {
            format!(
                "{}\0{}\0{}\0{}.{}",
                path.display(),
                meta.len(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec()
            )
        })
    };
    let mut hasher = Sha256::new();
    hasher.update(identity(binary)?);
    hasher.update(identity(Path::new("/etc/ld.so.cache")).unwrap_or_default());
    hasher.update(GENERATOR_REVISION);
    hasher.update(UNUSED.join("\0"));
    hasher.update(CAPSTONE_SOURCE);
    Some(format!("{:x}", hasher.finalize())[..16].to_string())
}

/// Builds `stand_ins` into `dir` under `root` (made whole in a temporary directory and
/// renamed, so a racing build or a reader never sees half of it; modes 0755, writable by
/// us alone). `.build-*` directories a killed build left are removed first.
fn compile(root: &Path, dir: &Path, stand_ins: &[StandIn]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    ensure_root(root)?;
    root_is_ours(root)?;
    sweep_dead_builds(root);
    let work = tempfile_dir(root)?;
    let result = (|| {
        let sources = work.join(".sources");
        std::fs::create_dir(&sources)?;
        for stand_in in stand_ins {
            build(&sources, &work, stand_in)?;
            std::fs::set_permissions(
                work.join(&stand_in.soname),
                std::fs::Permissions::from_mode(0o755),
            )?;
        }
        std::fs::remove_dir_all(&sources)?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
        match std::fs::rename(&work, dir) {
            // Another process made it meanwhile: theirs is the same.
            Err(_) if dir.is_dir() => Ok(()),
            other => other,
        }
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Builds one stand-in as `out/<soname>`, its sources written to `sources`.
fn build(sources: &Path, out: &Path, stand_in: &StandIn) -> std::io::Result<()> {
    let mut command = Command::new("cc");
    command.args(["-O2", "-shared", "-fPIC", "-nostdlib", "-ffreestanding"]);
    match &stand_in.source {
        Source::Capstone => {
            let source = sources.join(format!("{}.c", stand_in.soname));
            std::fs::write(&source, CAPSTONE_SOURCE)?;
            command.arg(source);
        }
        Source::Generated(generated) => {
            let source = sources.join(format!("{}.s", stand_in.soname));
            std::fs::write(&source, &generated.assembly)?;
            command.arg(source);
            if let Some(script) = &generated.version_script {
                let path = sources.join(format!("{}.map", stand_in.soname));
                std::fs::write(&path, script)?;
                let mut option = std::ffi::OsString::from("-Wl,--version-script=");
                option.push(path);
                command.arg(option);
            }
        }
    }
    let output = command
        .arg(format!("-Wl,-soname,{}", stand_in.soname))
        .arg("-o")
        .arg(out.join(&stand_in.soname))
        .stdin(Stdio::null())
        .output()
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => std::io::Error::new(
                err.kind(),
                "no C compiler (cc) is installed: install gcc to have them",
            ),
            _ => err,
        })?;
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "cc failed on {} ({}): {}",
            stand_in.soname,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// A new empty directory under `parent`, 0700 (nobody else may open what is built in it
/// before its modes are set).
fn tempfile_dir(parent: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = parent.join(format!(
        ".build-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Whether `binary` is to run with the stand-ins in `dir`: `binary --version` prints with
/// them first in its library path what it prints without (every symbol QEMU imports from
/// them resolves, under the versions it asks for: Debian builds QEMU with immediate
/// binding, so a missing one fails the start). `None` when QEMU does not even start
/// without them (nothing to conclude).
fn check(binary: &Path, dir: &Path) -> Option<bool> {
    let version = |stand_ins: Option<&Path>| {
        let mut command = Command::new(binary);
        command.arg("--version").stdin(Stdio::null());
        if let Some(dir) = stand_ins {
            command.env(LIBRARY_PATH_VAR, library_path(dir));
        }
        command
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| output.stdout)
    };
    let without = version(None)?;
    Some(version(Some(dir)).is_some_and(|with| with == without && with.starts_with(b"QEMU")))
}

/// `LD_LIBRARY_PATH` for a QEMU run with the stand-ins in `dir`: they first, then
/// whatever the caller's environment names.
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

    /// The QEMU the test suite installs (Debian's, which links capstone and the unused
    /// libraries above).
    const QEMU: &str = "/usr/bin/qemu-system-x86_64";

    /// What the dynamic linker loads for QEMU with `LD_LIBRARY_PATH` set to `dir`, if any.
    fn loaded(dir: Option<&Path>) -> Vec<(String, PathBuf)> {
        let saved = std::env::var_os(LIBRARY_PATH_VAR);
        let mut command = Command::new(QEMU);
        command.env("LD_TRACE_LOADED_OBJECTS", "1");
        if let Some(dir) = dir {
            command.env(LIBRARY_PATH_VAR, dir);
        } else if saved.is_some() {
            command.env_remove(LIBRARY_PATH_VAR);
        }
        let output = command.output().expect("trace");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, rest) = line.trim().split_once(" => ")?;
                let path = rest.rsplit_once(" (0x").map_or(rest, |(path, _)| path);
                Some((name.to_string(), PathBuf::from(path)))
            })
            .collect()
    }

    /// The first bytes of the exported function `name` in the library at `path`.
    fn code_of(path: &Path, name: &str) -> Vec<u8> {
        use object::{Object, ObjectSection, ObjectSymbol};
        let data = std::fs::read(path).expect("read");
        let file = object::File::parse(&*data).expect("parse");
        let symbol = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("{name} not in {}", path.display()));
        let section = file
            .section_by_index(symbol.section_index().expect("section"))
            .expect("section");
        let offset = usize::try_from(symbol.address() - section.address()).expect("offset");
        section.data().expect("data")[offset..offset + 2].to_vec()
    }

    #[test]
    fn the_stand_ins_are_built_once_and_checked_against_the_qemu_binary() {
        let cache = tempfile::tempdir().expect("tempdir");
        let dir = prepare(cache.path(), Path::new(QEMU)).expect("the stand-ins are usable");
        let before = loaded(None);
        let after = loaded(Some(&dir));
        // Every library QEMU links that vmfactory stands in for is loaded from `dir`.
        for (name, path) in &after {
            assert_eq!(
                is_candidate(name),
                path.starts_with(&dir),
                "{name} {path:?}"
            );
        }
        let stood_in: Vec<&str> = after
            .iter()
            .filter(|(_, path)| path.starts_with(&dir))
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            stood_in.iter().any(|n| n.starts_with(CAPSTONE)),
            "{stood_in:?}"
        );
        assert!(stood_in.contains(&"libibverbs.so.1"), "{stood_in:?}");
        // ... and what only they needed is not loaded at all (RDMA's netlink libraries).
        assert!(before.iter().any(|(n, _)| n.starts_with("libnl-route-3")));
        assert!(!after.iter().any(|(n, _)| n.starts_with("libnl-route-3")));
        assert!(after.len() < before.len(), "{before:?} {after:?}");

        // Capstone's: the five functions QEMU imports.
        let capstone = after
            .iter()
            .find(|(n, _)| n.starts_with(CAPSTONE))
            .map(|(_, path)| path.clone())
            .expect("capstone");
        let output = Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&capstone)
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
        // A generated one: the library's functions, each a trap, under its versions.
        let ibverbs = dir.join("libibverbs.so.1");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(code_of(&ibverbs, "ibv_open_device"), [0x0f, 0x0b], "ud2");
        let versions = Command::new("objdump")
            .arg("-T")
            .arg(&ibverbs)
            .output()
            .expect("objdump");
        let versions = String::from_utf8_lossy(&versions.stdout);
        assert!(versions.contains("IBVERBS_1.1"), "{versions}");
        // Their stacks are not executable (no GNU_STACK note would make QEMU's so).
        let headers = Command::new("readelf")
            .args(["-lW"])
            .arg(&ibverbs)
            .output()
            .expect("readelf");
        let headers = String::from_utf8_lossy(&headers.stdout);
        let stack = headers.lines().find(|l| l.contains("GNU_STACK"));
        assert!(stack.is_some_and(|l| !l.contains("RWE")), "{headers}");

        // Checked once: the decision answers next time. Stand-ins removed since are built
        // again, the same.
        let decision = std::fs::read_dir(cache.path().join("qemu-stub"))
            .expect("read")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("for-"))
            .expect("decision");
        assert_eq!(
            std::fs::read_to_string(decision.path()).expect("read"),
            dir.file_name().expect("name").to_string_lossy()
        );
        std::fs::remove_dir_all(&dir).expect("rm");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), Some(dir.clone()));
        assert!(capstone.is_file());

        // A stand-in cut short (a crash) is rebuilt, not loaded (QEMU would not start).
        std::fs::write(&ibverbs, b"").expect("truncate");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), Some(dir.clone()));
        assert!(std::fs::metadata(&ibverbs).expect("rebuilt").len() > 0);
        // A killed build's directory is swept; a cache reached through a link is used.
        let leftover = cache.path().join("qemu-stub/.build-4294967294-0000abcd");
        std::fs::create_dir(&leftover).expect("mkdir");
        std::fs::File::open(&leftover)
            .and_then(|dir| {
                dir.set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
            })
            .expect("age it");
        let link = cache.path().join("link");
        std::os::unix::fs::symlink(cache.path(), &link).expect("link");
        assert_eq!(
            prepare(&link, Path::new(QEMU)),
            Some(std::fs::canonicalize(&dir).expect("canonical"))
        );
        assert!(!leftover.exists(), "the dead build's directory is left");
        // Stand-ins another user could have written are not loaded: here, a library that
        // others may write to.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ibverbs, std::fs::Permissions::from_mode(0o757)).expect("chmod");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), None);
        std::fs::set_permissions(&ibverbs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(prepare(cache.path(), Path::new(QEMU)), Some(dir.clone()));

        // Nothing under a directory others may write to (they could swap the cache out
        // from under it), but a sticky one (as /tmp) is fine.
        let open = cache.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let inner = open.join("cache");
        assert_eq!(prepare(&inner, Path::new(QEMU)), None);
        assert!(!inner.exists(), "nothing was written there");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        assert!(prepare(&inner, Path::new(QEMU)).is_some());

        // A "QEMU" that is a script keeps its own libraries (and is not run).
        let fake = cache.path().join("qemu-system-x86_64");
        let ran = cache.path().join("ran");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\ntouch {}\necho 'QEMU emulator version 0'\n",
                ran.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(prepare(cache.path(), &fake), None);
        assert!(!ran.exists(), "the script was run");
        let decisions = std::fs::read_dir(cache.path().join("qemu-stub"))
            .expect("read")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("for-"))
            .map(|e| std::fs::read_to_string(e.path()).expect("read"))
            .collect::<Vec<_>>();
        assert!(decisions.iter().any(|d| d == "none"), "{decisions:?}");
    }

    #[test]
    fn code_in_the_cache_is_run_only_when_no_one_else_can_change_it() {
        use std::os::unix::fs::PermissionsExt;
        let cache = tempfile::tempdir().expect("tempdir");
        let bin = cache.path().join("qemu/key/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        let binary = bin.join("qemu-system-x86_64");
        std::fs::write(&binary, b"\x7fELF").expect("write");
        for dir in ["qemu", "qemu/key", "qemu/key/bin"] {
            let dir = cache.path().join(dir);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(untrusted_code_path(cache.path(), &binary), None);
        // A directory on the way that its group may write to (a umask of 002).
        let key = cache.path().join("qemu/key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let canonical = std::fs::canonicalize(&key).expect("canonical");
        assert_eq!(untrusted_code_path(cache.path(), &binary), Some(canonical));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // The binary replaced by a link.
        std::fs::remove_file(&binary).expect("rm");
        std::os::unix::fs::symlink("/bin/true", &binary).expect("symlink");
        assert!(untrusted_code_path(cache.path(), &binary).is_some());
        // What does not exist yet (a build to come) is judged by what is above it.
        let later = cache.path().join("qemu/other/bin/qemu-system-x86_64");
        assert_eq!(untrusted_code_path(cache.path(), &later), None);
        // Nothing outside the cache is vouched for.
        assert!(untrusted_code_path(cache.path(), Path::new("/bin/true")).is_some());
    }
}
