//! The guest agent: checking that a binary can be `/init`, and building it with cargo.

use std::fs;
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
pub(crate) fn agent_build_command(workspace_root: &Path, target_dir: &Path) -> Command {
    // Under cargo (tests, `cargo run`) use the same cargo; otherwise the one on PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace_root)
        .args([
            "build",
            "--profile",
            "agent",
            "-p",
            "vmfactory-agent",
            "--target",
            AGENT_TARGET,
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        // With an explicit --target these flags reach only the target crates, not build
        // scripts; CARGO_ENCODED_RUSTFLAGS would take precedence, so drop it.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
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
        assert!(envs.contains(&(
            std::ffi::OsStr::new("RUSTFLAGS"),
            Some(std::ffi::OsStr::new("-C target-feature=+crt-static"))
        )));
        assert!(envs.contains(&(
            std::ffi::OsStr::new("CARGO_TARGET_DIR"),
            Some(std::ffi::OsStr::new("/ws/target/agent"))
        )));
        assert!(envs.contains(&(std::ffi::OsStr::new("CARGO_ENCODED_RUSTFLAGS"), None)));
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
