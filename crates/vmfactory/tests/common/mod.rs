//! Helpers shared by the CLI integration tests: the binary, the guest image, and checks
//! that nothing (QEMU, mounts) is left behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub mod rootfs;

/// The vmfactory binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vmfactory");

/// Kernel, initrd and kernel release of the guest image.
#[derive(Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
    /// vmfactory's QEMU, built by `guest build` (the VMs' QEMU unless one is named).
    pub qemu: PathBuf,
}

/// The guest image, built (or found up to date) once per test binary.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let output = Command::new(BIN)
            .args(["guest", "build"])
            .stderr(Stdio::inherit())
            .output()
            .expect("run vmfactory guest build");
        assert!(output.status.success(), "guest build failed");
        let stdout = String::from_utf8(output.stdout).expect("utf8");
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {stdout}"))
        };
        Image {
            kernel: field("kernel:").into(),
            initrd: field("initrd:").into(),
            release: field("kernel release:"),
            qemu: field("qemu:").into(),
        }
    })
}

/// Standard output and error of a command, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// True when `path` is a mount point.
pub fn mounted(path: &Path) -> bool {
    vmfactory_factory::template::is_mountpoint(path)
}

/// PIDs and command lines of QEMU processes whose command line mentions `dir`.
pub fn qemu_processes_under(dir: &Path) -> Vec<(u32, String)> {
    vmfactory_hypervisor::qemu::processes_under(dir)
}

/// PIDs of QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    qemu_processes_under(dir)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Mount points at or under `dir` (per /proc/self/mountinfo, octal escapes decoded).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect()
}

/// Decodes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unix sockets under `dir` (recursively, not following links).
pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Everything a vmfactory command may leave under `dir` that it must not: QEMU processes,
/// VM directories (under `runtime/vm`), Unix sockets and mounts. Empty when clean.
pub fn leftovers(dir: &Path, runtime: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for (pid, cmdline) in qemu_processes_under(dir) {
        left.push(format!("QEMU {pid}: {cmdline}"));
    }
    if let Ok(entries) = std::fs::read_dir(runtime.join("vm")) {
        for entry in entries.flatten() {
            left.push(format!("VM directory {}", entry.path().display()));
        }
    }
    for socket in sockets_under(dir) {
        left.push(format!("socket {}", socket.display()));
    }
    for mount in mounts_under(dir) {
        left.push(format!("mount {}", mount.display()));
    }
    left
}

/// Lock files (`*.lock`) directly in `dir`: a template's and a VMCache endpoint's lie
/// beside what they guard, and their holders remove them when they let go.
pub fn lock_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "lock"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `limit` for `dir` to be clean (see [`leftovers`]); panics naming what is left.
pub fn assert_clean_within(dir: &Path, runtime: &Path, limit: std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        let left = leftovers(dir, runtime);
        if left.is_empty() {
            return;
        }
        assert!(started.elapsed() < limit, "left behind: {left:#?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// True while process `pid` exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rfind(')').map(|end| &stat[end + 1..])?;
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill(2) on a process the test started (or its QEMU); no memory is involved.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits up to `limit` for a QEMU under `dir` to appear; returns its pid.
pub fn wait_for_qemu(dir: &Path, limit: std::time::Duration) -> u32 {
    wait_for_qemu_where(dir, limit, |_| true)
}

/// Waits up to `limit` for a QEMU under `dir` whose command line `matches`; returns its
/// pid.
pub fn wait_for_qemu_where(
    dir: &Path,
    limit: std::time::Duration,
    matches: impl Fn(&str) -> bool,
) -> u32 {
    let started = std::time::Instant::now();
    loop {
        let found = qemu_processes_under(dir)
            .into_iter()
            .find(|(_, cmdline)| matches(cmdline));
        if let Some((pid, _)) = found {
            return pid;
        }
        assert!(
            started.elapsed() < limit,
            "no such QEMU started under {dir:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sets `command` up to boot the test guest image with its VMs in `runtime`, logging
/// only warnings.
pub fn with_image<'a>(command: &'a mut Command, runtime: &Path) -> &'a mut Command {
    let image = image();
    command
        .env("VMFACTORY_KERNEL", &image.kernel)
        .env("VMFACTORY_INITRD", &image.initrd)
        .env("VMFACTORY_RUNTIME_DIR", runtime)
        .env("RUST_LOG", "warn")
}
