//! Builds the static guest agent (`vmfactory-agent`, the `agent` profile, `+crt-static`,
//! `x86_64-unknown-linux-gnu`) with a nested cargo and leaves it in `OUT_DIR` for
//! `include_bytes!`, with its SHA-256 in `VMFACTORY_AGENT_SHA256`. So an installed
//! vmfactory carries its agent and needs neither cargo nor this source tree at run time.
//!
//! The nested cargo uses its own target directory, because the outer build holds the lock
//! of its own: `<outer target dir>/agent`, which survives rebuilds (and is the one the
//! factory crate's tests build into, so both share one agent build), or
//! `$VMFACTORY_AGENT_TARGET_DIR`. Artifact dependencies would do this in cargo itself but
//! are unstable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    match embed_agent() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn embed_agent() -> Result<(), String> {
    let manifest_dir = env_path("CARGO_MANIFEST_DIR")?;
    let out_dir = env_path("OUT_DIR")?;
    let workspace = manifest_dir.join("../..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    if !workspace.join("crates/agent/Cargo.toml").is_file() {
        return Err(format!(
            "Cannot find the agent's sources in {}; build vmfactory from its source tree",
            workspace.display()
        ));
    }
    for input in [
        "crates/agent",
        "crates/protocols",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    println!("cargo:rerun-if-env-changed=VMFACTORY_AGENT_TARGET_DIR");

    let target_dir = match std::env::var_os("VMFACTORY_AGENT_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => outer_target_dir(&out_dir)
            .map(|dir| dir.join("agent"))
            .unwrap_or_else(|| out_dir.join("agent-target")),
    };
    let agent = vmfactory_guest_image::build_agent_with(&workspace, &target_dir, false)
        .map_err(|err| format!("{err}"))?;
    let embedded = out_dir.join("vmfactory-agent");
    std::fs::copy(&agent, &embedded).map_err(|err| {
        format!(
            "Cannot copy {} to {}: {err}",
            agent.display(),
            embedded.display()
        )
    })?;
    let digest = vmfactory_guest_image::file_sha256(&embedded).map_err(|err| format!("{err}"))?;
    println!("cargo:rustc-env=VMFACTORY_AGENT_SHA256={digest}");
    Ok(())
}

fn env_path(name: &str) -> Result<PathBuf, String> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("Cargo did not set {name}; build vmfactory with cargo"))
}

/// The outer build's target directory: the ancestor of `OUT_DIR`
/// (`<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`) holding cargo's
/// `CACHEDIR.TAG`.
fn outer_target_dir(out_dir: &Path) -> Option<PathBuf> {
    out_dir
        .ancestors()
        .skip(4)
        .take(2)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}
