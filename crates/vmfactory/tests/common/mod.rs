//! Helpers shared by the CLI integration tests: the binary, the guest image, and checks
//! that nothing (QEMU, mounts) is left behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The vmfactory binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vmfactory");

/// Kernel, initrd and kernel release of the guest image.
#[derive(Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
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
