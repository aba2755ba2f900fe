//! `cargo install --path crates/vmfactory` gives a vmfactory that carries its agent: it
//! boots a VM from any directory, with no cargo on `PATH` and (where a private mount
//! namespace is possible) with the source tree hidden.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::text;

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The workspace's target directory (the parent of cargo's per-test scratch directory).
fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_owned()
}

/// Runs `cargo install` for the vmfactory crate into `root`, offline when the registry
/// cache has everything, else online. The dev profile and the workspace's target
/// directory make it reuse what `cargo test` just compiled, dependencies and agent alike.
fn cargo_install(root: &Path) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let attempt = |offline: bool| {
        let mut command = Command::new(&cargo);
        command
            .args(["install", "--locked", "--debug", "--quiet", "--path"])
            .arg(workspace().join("crates/vmfactory"))
            .arg("--root")
            .arg(root)
            .env("CARGO_TARGET_DIR", workspace_target())
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .stdin(Stdio::null());
        if offline {
            command.arg("--offline");
        }
        command.output().expect("run cargo install")
    };
    let offline = attempt(true);
    if offline.status.success() {
        return offline;
    }
    eprintln!(
        "offline install failed, trying online:\n{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    attempt(false)
}

/// A `PATH` without cargo: the system directories and whatever else has no `cargo`,
/// behind a stand-in `cargo` in `stubs` that fails (and shadows a system cargo).
fn path_without_cargo(stubs: &Path) -> OsString {
    std::fs::create_dir_all(stubs).expect("mkdir");
    let stand_in = stubs.join("cargo");
    std::fs::write(
        &stand_in,
        "#!/bin/sh\necho \"cargo must not run: $*\" >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut dirs = vec![stubs.to_owned()];
    let current = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&current).filter(|dir| {
        let system = dir.starts_with("/usr") || dir.starts_with("/bin") || dir.starts_with("/sbin");
        system || !dir.join("cargo").exists()
    }));
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        dirs.push(PathBuf::from(dir));
    }
    std::env::join_paths(dirs).expect("PATH")
}

/// True when this process may create a private mount namespace to hide the sources.
fn can_hide_sources() -> bool {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn installed_binary_boots_without_cargo_or_sources() {
    let root = tempfile::Builder::new()
        .prefix("vmf-install-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let started = Instant::now();
    let install = cargo_install(root.path());
    eprintln!("cargo install took {:?}", started.elapsed());
    assert!(install.status.success(), "{}", text(&install));
    let installed = root.path().join("bin/vmfactory");
    assert!(installed.is_file(), "{} missing", installed.display());

    let cwd = tempfile::tempdir().expect("cwd");
    let path = path_without_cargo(&root.path().join("stubs"));
    let cache = vmfactory_cache_dir();
    let vmfactory = |args: &[&str]| {
        let mut command = Command::new(&installed);
        command
            .args(args)
            .current_dir(cwd.path())
            .env("PATH", &path)
            .env("VMFACTORY_CACHE_DIR", &cache)
            .env("VMFACTORY_RUNTIME_DIR", cwd.path().join("run"))
            .env_remove("VMFACTORY_AGENT")
            .env_remove("VMFACTORY_KERNEL")
            .env_remove("VMFACTORY_INITRD")
            .env_remove("CARGO")
            .env("RUST_LOG", "warn");
        command
    };

    // The image of the installed binary's agent (built now with apt if it differs from
    // the one of the tests' binary).
    let built = vmfactory(&["guest", "build", "--json"])
        .output()
        .expect("guest build");
    assert!(built.status.success(), "{}", text(&built));
    let image: serde_json::Value = serde_json::from_slice(&built.stdout).expect("json");
    let release = image["kernel_release"]
        .as_str()
        .expect("kernel_release")
        .to_owned();
    // With vmfactory's QEMU, built for the installed qemu-system-x86 (the check says
    // so, and says nothing of it when Debian's QEMU is chosen).
    let qemu = image["qemu"]["binary"].as_str().expect("qemu binary");
    assert!(std::path::Path::new(qemu).is_file(), "{qemu}");
    // Compiled with a profile, trained on a guest kernel's boot.
    let trained_on = image["qemu"]["trained_on"].as_str().unwrap_or_default();
    assert!(!trained_on.is_empty(), "{}", image["qemu"]);
    // The build then prunes what nothing current uses (reported), never what it named.
    assert!(image["pruned"]["removed"].is_array(), "{image}");
    assert!(image["pruned"]["bytes"].is_u64(), "{image}");
    for file in ["kernel", "initrd"] {
        let path = image[file].as_str().expect(file);
        assert!(std::path::Path::new(path).is_file(), "{path}");
    }
    let checked = vmfactory(&["guest", "build", "--check", "--json"])
        .output()
        .expect("guest build --check");
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).expect("json");
    assert_eq!(report["qemu_current"], true, "{report}");
    let checked = vmfactory(&["guest", "build", "--check", "--json"])
        .env("VMFACTORY_GUEST_QEMU", "debian")
        .output()
        .expect("guest build --check");
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).expect("json");
    assert!(report["qemu_current"].is_null(), "{report}");

    let output = if can_hide_sources() {
        // Run with an empty tmpfs over the workspace, visible only to this process.
        let command = vmfactory(&[]);
        let script = format!(
            "mount -t tmpfs none '{}' && exec \"$0\" run -- uname -r",
            workspace().display()
        );
        let mut hidden = Command::new("unshare");
        hidden
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(&installed)
            .current_dir(cwd.path());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => hidden.env(key, value),
                None => hidden.env_remove(key),
            };
        }
        hidden.output().expect("run hidden")
    } else {
        eprintln!("note: cannot unshare the mount namespace; the sources stay visible");
        vmfactory(&["run", "--", "uname", "-r"])
            .output()
            .expect("run")
    };
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), release);
}

/// The cache the other tests use, so that the image need not be built again.
fn vmfactory_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("VMFACTORY_CACHE_DIR") {
        return dir.into();
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("vmfactory");
    }
    PathBuf::from(var("HOME").unwrap_or_else(|| "/root".into())).join(".cache/vmfactory")
}
