//! Settings of the QEMU backend and facts about the QEMU binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::accel::Accelerator;
use crate::{HypervisorError, Result};

/// Settings of the QEMU backend shared by all VMs of a factory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuConfig {
    /// QEMU binary: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
    /// Machine type (`q35` or `pc`).
    pub machine_type: String,
    /// Accelerator choice.
    pub accelerator: Accelerator,
    /// The guest kernel is built with `CONFIG_PVM_GUEST` (runs on kvm_pvm).
    pub kernel_is_pvm: bool,
    /// TCG translation buffer size, MiB (bounds QEMU's memory per VM under TCG).
    pub tb_size_mib: Option<u32>,
    /// Directory holding one sub-directory per VM.
    pub runtime_dir: PathBuf,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
    /// Firmware image (`-bios`); `None` keeps QEMU's default (SeaBIOS).
    pub firmware: Option<PathBuf>,
    /// QEMU gets SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`): set
    /// for VMs one process owns (`run`, a sandbox supervisor), so even a SIGKILL of that
    /// process leaves no VM; never for VMs that are handed over (VMCache).
    #[serde(default)]
    pub die_with_parent: bool,
    /// A directory QEMU's dynamic linker searches first (`LD_LIBRARY_PATH`): vmfactory's
    /// stand-ins for libraries QEMU never calls ([`super::libstub`]), when usable.
    #[serde(default)]
    pub library_dir: Option<PathBuf>,
    /// `binary` is vmfactory's own QEMU build (with its patches): a clone's QEMU then
    /// loads the device state from its command line (`-global
    /// migration.x-ignore-shared=on -incoming fd:3`, patch 0005) as soon as it runs,
    /// instead of waiting for two QMP commands first. Any other QEMU loads through QMP.
    #[serde(default)]
    pub vmfactory_build: bool,
}

/// QEMU's minimal firmware. It boots Linux straight from fw_cfg but cannot run the ACPI
/// linker-loader commands of a `vmgenid` device (the VM hangs before the kernel starts,
/// QEMU 7.2), so it is not the default; a VM booted with it has no VM generation ID.
pub const QBOOT_PATH: &str = "/usr/share/qemu/qboot.rom";

/// The default firmware: QEMU's own (SeaBIOS), which every VM needs for its `vmgenid`
/// device. Measured here under TCG, a whole `run -- true` took the same time with SeaBIOS
/// as with qboot (2.3–2.5 s vs 2.2–2.5 s, direct boots); clones run no firmware at all.
pub fn default_firmware() -> Option<PathBuf> {
    None
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            machine_type: "q35".into(),
            accelerator: Accelerator::Auto,
            kernel_is_pvm: false,
            tb_size_mib: None,
            runtime_dir: default_runtime_dir(),
            start_timeout: Duration::from_secs(30),
            firmware: default_firmware(),
            die_with_parent: false,
            library_dir: None,
            vmfactory_build: false,
        }
    }
}

/// `$VMFACTORY_RUNTIME_DIR`, else `/run/vmfactory` for root, else
/// `$XDG_RUNTIME_DIR/vmfactory`, else `/tmp/vmfactory-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMFACTORY_RUNTIME_DIR") {
        return dir.into();
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return "/run/vmfactory".into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("vmfactory");
    }
    format!("/tmp/vmfactory-{uid}").into()
}

/// Creates the runtime directory `dir` (mode 0700) if it is missing, and refuses one that
/// another user owns or that every user may write to: VM sockets, sandboxes and their
/// records live there, and a directory someone else prepared (`/tmp/vmfactory-<uid>` can
/// be made by anyone) would let them take over the VMs or have records point at files
/// of ours. A group-writable one is accepted: with a umask of 002 (each user their own
/// group) the directories vmfactory makes are.
pub fn ensure_runtime_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let io = |source| HypervisorError::Io {
        action: "Cannot create the runtime directory",
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let meta = std::fs::metadata(dir).map_err(io)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(HypervisorError::InvalidConfig(format!(
            "The runtime directory {} belongs to uid {}, not to you (uid {uid}): remove it, \
             or set runtime_dir in [hypervisor.qemu] (or VMFACTORY_RUNTIME_DIR) to a \
             directory of yours",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(HypervisorError::InvalidConfig(format!(
            "The runtime directory {} may be written by every user (mode {:o}): run \
             `chmod o-w {}`, or choose another runtime_dir",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// Finds the QEMU binary: a path is checked, a bare name is searched in `PATH`.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf> {
    let missing = || HypervisorError::MissingFile {
        what: "QEMU binary",
        path: binary.to_path_buf(),
        hint: "install it with `apt-get install qemu-system-x86` or set the QEMU path",
    };
    if binary.components().count() > 1 {
        return if binary.is_file() {
            Ok(binary.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(missing)
}

/// The first line of `<binary> --version`, e.g. `QEMU emulator version 7.2.22 (Debian …)`.
pub fn qemu_version(binary: &Path) -> Result<String> {
    let binary = resolve_binary(binary)?;
    let output = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|source| HypervisorError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .map(|line| line.trim().to_string())
        .filter(|line| output.status.success() && !line.is_empty())
        .ok_or_else(|| {
            HypervisorError::InvalidConfig(format!(
                "{} --version printed no version: is it a QEMU binary?",
                binary.display()
            ))
        })
}

/// A new random VM id (16 hex digits).
pub fn new_vm_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/run");
        ensure_runtime_dir(&dir).expect("made");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        ensure_runtime_dir(&dir).expect("kept");
        // Group-writable, as a umask of 002 makes it: accepted.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        ensure_runtime_dir(&dir).expect("group-writable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = ensure_runtime_dir(&dir).expect_err("world-writable");
        assert!(err.to_string().contains("chmod o-w"), "{err}");
    }
}
