//! Finding or building the guest image for the CLI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use std::sync::mpsc;
use std::time::Duration;

use vmfactory_guest_image::{
    build, build_agent_with, default_cache_dir, BuildOptions, GuestImage, AGENT_TARGET,
};

/// Where the guest image and the agent come from.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Cache directory of guest images (default: $VMFACTORY_CACHE_DIR, else ~/.cache/vmfactory).
    #[arg(long, env = "VMFACTORY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Prebuilt static agent binary; default: build it from this source tree with cargo.
    #[arg(long, env = "VMFACTORY_AGENT")]
    pub agent: Option<PathBuf>,
}

/// The source tree this binary was built from, if it is still there.
fn workspace_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("crates/agent/Cargo.toml")
        .is_file()
        .then(|| root.canonicalize().unwrap_or(root))
}

/// Returns the cached guest image, building the agent and the image when missing or stale.
pub fn ensure_image(args: &ImageArgs, force: bool) -> Result<GuestImage> {
    let agent = match &args.agent {
        Some(agent) => {
            if !agent.is_file() {
                bail!(
                    "Agent binary {} not found: pass the path of a static vmfactory-agent",
                    agent.display()
                );
            }
            agent.clone()
        }
        None => {
            let Some(root) = workspace_root() else {
                bail!(
                    "No agent binary: pass --agent PATH (or set VMFACTORY_AGENT) to a static \
                     vmfactory-agent, or run vmfactory from its source tree"
                );
            };
            build_agent_from_source(&root)?
        }
    };
    let options = BuildOptions {
        cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
        agent_binary: agent,
        force,
        ..BuildOptions::default()
    };
    let mut progress = |message: &str| eprintln!("vmfactory: {message}");
    build(&options, &mut progress).context("Cannot build the guest image")
}

/// Builds the agent from the source tree. The first build shows cargo's progress; later
/// (usually no-op) builds are quiet and only announce themselves when they take a while.
fn build_agent_from_source(root: &Path) -> Result<PathBuf> {
    let target_dir = root.join("target/agent");
    let built_before = target_dir
        .join(AGENT_TARGET)
        .join("agent/vmfactory-agent")
        .is_file();
    if !built_before {
        eprintln!("vmfactory: building the guest agent (the first build takes a minute)");
        return build_agent_with(root, &target_dir, false).context("Cannot build the guest agent");
    }
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let notice = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_secs(2)) {
            eprintln!("vmfactory: rebuilding the guest agent (its sources changed)");
        }
    });
    let result = build_agent_with(root, &target_dir, true);
    drop(done_tx);
    let _ = notice.join();
    result.context("Cannot build the guest agent")
}
