//! The guest agent: checking that a binary can be `/init`, and building it with cargo.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{io_error, GuestImageError};
use crate::{elf, AGENT_TARGET};

/// Checks that `path` is an ELF executable without an interpreter (statically linked).
pub fn check_static_executable(path: &Path) -> Result<(), GuestImageError> {
    if path.as_os_str().is_empty() || !path.is_file() {
        return Err(GuestImageError::AgentMissing {
            path: path.to_owned(),
        });
    }
    let bytes = fs::read(path).map_err(io_error(path))?;
    let not_elf = |source| GuestImageError::AgentNotElf {
        path: path.to_owned(),
        source,
    };
    let elf = elf::Elf::parse(&bytes).map_err(not_elf)?;
    if elf.has_interpreter().map_err(not_elf)? {
        return Err(GuestImageError::AgentNotStatic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Builds the static agent with cargo (`--profile agent`, `+crt-static`) in
/// `workspace_root` and returns the path of the binary under `target_dir`.
pub fn build_agent(workspace_root: &Path, target_dir: &Path) -> Result<PathBuf, GuestImageError> {
    build_agent_with(workspace_root, target_dir, false)
}

/// [`build_agent`], with cargo's progress output suppressed when `quiet` (errors and
/// warnings still reach stderr).
pub fn build_agent_with(
    workspace_root: &Path,
    target_dir: &Path,
    quiet: bool,
) -> Result<PathBuf, GuestImageError> {
    tracing::info!(workspace = %workspace_root.display(), target_dir = %target_dir.display(), "building the agent");
    // Exists before the build, so its path is canonical from the first build on.
    fs::create_dir_all(target_dir).map_err(io_error(target_dir))?;
    let mut command = agent_build_command(workspace_root, target_dir);
    if quiet {
        command.arg("--quiet");
    }
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|err| GuestImageError::AgentBuild {
            detail: format!(
                "cannot run {}: {err}",
                Path::new(command.get_program()).display()
            ),
        })?;
    if !status.success() {
        return Err(GuestImageError::AgentBuild {
            detail: format!("cargo exited with {status}"),
        });
    }
    let binary = target_dir
        .join(AGENT_TARGET)
        .join("agent")
        .join("vmfactory-agent");
    if !binary.is_file() {
        return Err(GuestImageError::AgentBuild {
            detail: format!("cargo succeeded but {} does not exist", binary.display()),
        });
    }
    check_static_executable(&binary)?;
    Ok(binary)
}

/// The cargo invocation that builds the static agent.
///
/// It also runs inside vmfactory's build script, where cargo hands the script an
/// environment meant for the outer build: its flags, target dir, profile and wrappers
/// (`clippy-driver` under `cargo clippy`) would leak into the agent build, change its
/// fingerprint and rebuild it needlessly or wrongly. So every variable for which
/// [`leaks_into_nested_cargo`] holds is removed; `CARGO_MAKEFLAGS` stays, so the nested
/// cargo takes its jobs from the outer build's jobserver instead of adding its own.
pub(crate) fn agent_build_command(workspace_root: &Path, target_dir: &Path) -> Command {
    // Canonical paths, so that every caller passes the same flags (the remapped paths are
    // part of them) and cargo's fingerprint, hence the build, is shared.
    let canonical = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let (workspace_root, target_dir) = (canonical(workspace_root), canonical(target_dir));
    let (workspace_root, target_dir) = (workspace_root.as_path(), target_dir.as_path());
    // Under cargo (build scripts, tests, `cargo run`) use the same cargo; otherwise the
    // one on PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root).args([
        "build",
        "--locked",
        "--profile",
        "agent",
        "-p",
        "vmfactory-agent",
        "--target",
        AGENT_TARGET,
    ]);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(leaks_into_nested_cargo) {
            command.env_remove(&name);
        }
    }
    command
        .env("CARGO_TARGET_DIR", target_dir)
        // With an explicit --target these flags reach only the target crates, not build
        // scripts (which must stay dynamically linked).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            agent_rustflags(workspace_root, target_dir),
        );
    command
}

/// Flags of the agent build, separated by 0x1f as `CARGO_ENCODED_RUSTFLAGS` wants (paths
/// may hold spaces): static linking, and the workspace and target directory paths
/// remapped so that the agent's bytes (and so its digest and the image key) do not
/// depend on where the tree or the target directory lie.
pub(crate) fn agent_rustflags(workspace_root: &Path, target_dir: &Path) -> OsString {
    let mut flags = OsString::from("-Ctarget-feature=+crt-static");
    // rustc applies the last matching prefix: the target directory may lie inside the
    // workspace, so it comes last.
    for (from, to) in [(workspace_root, "/vmfactory"), (target_dir, "/target")] {
        flags.push("\u{1f}--remap-path-prefix=");
        flags.push(from);
        flags.push("=");
        flags.push(to);
    }
    flags
}

/// True for an environment variable that cargo sets for (or a user sets around) an outer
/// build and that must not reach the nested cargo building the agent.
pub(crate) fn leaks_into_nested_cargo(name: &str) -> bool {
    // Cargo settings that only say how to reach registries and where its home is.
    const KEEP: [&str; 2] = ["CARGO_HOME", "CARGO_MAKEFLAGS"];
    const KEEP_PREFIXES: [&str; 5] = [
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    // What cargo gives build scripts and rustc, and compiler wrappers and flags.
    const REMOVE: [&str; 16] = [
        "CARGO",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
    ];
    if KEEP.contains(&name) || KEEP_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    REMOVE.contains(&name)
        || name.starts_with("CARGO_")
        || name.starts_with("__CARGO")
        || name.starts_with("DEP_")
}

/// Where [`install_embedded_agent`] puts the agent of digest `sha256`:
/// `cache_dir/agents/<sha256>/vmfactory-agent`.
pub fn embedded_agent_path(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir
        .join("agents")
        .join(sha256)
        .join("vmfactory-agent")
}

/// Writes an agent binary carried inside the calling program (of SHA-256 `sha256`) to
/// [`embedded_agent_path`], once: an existing file of the right size is reused. The file
/// appears atomically (written under a temporary name, then renamed), so a concurrent or
/// killed writer never leaves a partial agent behind.
pub fn install_embedded_agent(
    cache_dir: &Path,
    bytes: &[u8],
    sha256: &str,
) -> Result<PathBuf, GuestImageError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(GuestImageError::EmbeddedAgentDigest {
            digest: sha256.to_owned(),
        });
    }
    let path = embedded_agent_path(cache_dir, sha256);
    if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    // Often the first thing made in a new cache: the cache itself 0755 whatever the umask.
    crate::make_cache_dir(cache_dir)?;
    let dir = path.parent().unwrap_or(cache_dir);
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut file = tempfile::Builder::new()
        .prefix(".agent-")
        .permissions(fs::Permissions::from_mode(0o755))
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    file.write_all(bytes).map_err(io_error(&path))?;
    file.as_file().sync_all().map_err(io_error(&path))?;
    file.persist(&path).map_err(|err| GuestImageError::Io {
        path: path.clone(),
        source: err.error,
    })?;
    tracing::info!(path = %path.display(), "installed the embedded agent");
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::build_elf;

    #[test]
    fn agent_is_built_static_with_the_agent_profile() {
        let command = agent_build_command(Path::new("/ws"), Path::new("/ws/target/agent"));
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--locked",
                "--profile",
                "agent",
                "-p",
                "vmfactory-agent",
                "--target",
                "x86_64-unknown-linux-gnu"
            ]
        );
        assert_eq!(command.get_current_dir(), Some(Path::new("/ws")));
        let envs: Vec<_> = command.get_envs().collect();
        let flags = "-Ctarget-feature=+crt-static\u{1f}--remap-path-prefix=/ws=/vmfactory\u{1f}--remap-path-prefix=/ws/target/agent=/target";
        assert!(envs.contains(&(
            std::ffi::OsStr::new("CARGO_ENCODED_RUSTFLAGS"),
            Some(std::ffi::OsStr::new(flags))
        )));
        assert!(envs.contains(&(
            std::ffi::OsStr::new("CARGO_TARGET_DIR"),
            Some(std::ffi::OsStr::new("/ws/target/agent"))
        )));
        // This test runs under cargo, which sets CARGO_PKG_NAME: it must be removed.
        if std::env::var_os("CARGO_PKG_NAME").is_some() {
            assert!(envs.contains(&(std::ffi::OsStr::new("CARGO_PKG_NAME"), None)));
        }
    }

    #[test]
    fn outer_build_variables_do_not_reach_the_agent_build() {
        for leaking in [
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_LTO",
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "CARGO_CFG_TARGET_FEATURE",
            "CARGO_FEATURE_STD",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_INCREMENTAL",
            "CARGO",
            "RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CLIPPY_ARGS",
            "OUT_DIR",
            "TARGET",
            "PROFILE",
            "OPT_LEVEL",
            "DEBUG",
            "NUM_JOBS",
            "DEP_Z_INCLUDE",
            "__CARGO_DEFAULT_LIB_METADATA",
        ] {
            assert!(
                leaks_into_nested_cargo(leaking),
                "{leaking} must be removed"
            );
        }
        for kept in [
            "CARGO_HOME",
            "CARGO_MAKEFLAGS",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_PROXY",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "RUSTC",
            "RUSTUP_TOOLCHAIN",
            "PATH",
            "HOME",
        ] {
            assert!(!leaks_into_nested_cargo(kept), "{kept} must be kept");
        }
    }

    #[test]
    fn embedded_agent_is_written_once_by_digest() {
        let cache = tempfile::tempdir().expect("tempdir");
        let digest = "ab".repeat(32);
        let path =
            install_embedded_agent(cache.path(), b"\x7fELF agent", &digest).expect("install");
        assert_eq!(path, embedded_agent_path(cache.path(), &digest));
        assert_eq!(fs::read(&path).expect("read"), b"\x7fELF agent");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).expect("stat"));
        // A second call keeps the file as it is.
        install_embedded_agent(cache.path(), b"\x7fELF agent", &digest).expect("again");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).expect("stat")),
            inode
        );
        // A truncated file (size differs) is replaced.
        fs::write(&path, b"\x7fE").expect("truncate");
        install_embedded_agent(cache.path(), b"\x7fELF agent", &digest).expect("repair");
        assert_eq!(fs::read(&path).expect("read"), b"\x7fELF agent");
        // No temporary files remain.
        let names: Vec<_> = fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["vmfactory-agent"]);
        assert!(install_embedded_agent(cache.path(), b"x", "not-a-digest").is_err());
    }

    #[test]
    fn agent_must_be_a_static_elf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let static_bin = dir.path().join("static");
        fs::write(&static_bin, build_elf(&[], &[])).expect("write");
        check_static_executable(&static_bin).expect("static is fine");
        let dynamic = dir.path().join("dynamic");
        fs::write(
            &dynamic,
            build_elf(&[(elf::PT_INTERP, b"/lib64/ld.so\0")], &[]),
        )
        .expect("write");
        assert!(matches!(
            check_static_executable(&dynamic),
            Err(GuestImageError::AgentNotStatic { .. })
        ));
        let script = dir.path().join("script");
        fs::write(&script, b"#!/bin/sh\n").expect("write");
        assert!(matches!(
            check_static_executable(&script),
            Err(GuestImageError::AgentNotElf { .. })
        ));
        assert!(matches!(
            check_static_executable(Path::new("")),
            Err(GuestImageError::AgentMissing { .. })
        ));
    }
}
