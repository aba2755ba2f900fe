//! Helpers shared by the integration tests: the guest image, VM configs, shell commands.

#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use vmfactory_factory::{ExecRequest, Vm, VmConfig};
use vmfactory_guest_image::{build, build_agent, BuildOptions, GuestImage};

pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let agent = build_agent(&root, &root.join("target/agent")).expect("build the agent");
        // VMFACTORY_GUEST_KERNEL=debian runs these tests on Debian's cloud kernel.
        let kernel = std::env::var("VMFACTORY_GUEST_KERNEL")
            .ok()
            .map(|name| name.parse().expect("VMFACTORY_GUEST_KERNEL"))
            .unwrap_or_default();
        let options = BuildOptions {
            agent_binary: agent,
            kernel,
            ..BuildOptions::default()
        };
        build(&options, &mut |message| eprintln!("{message}")).expect("build the guest image")
    })
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub fn config(runtime: &Path) -> VmConfig {
    init_logging();
    let image = image();
    let mut config = VmConfig {
        kernel: image.kernel.clone(),
        initrd: Some(image.initrd.clone()),
        ..VmConfig::default()
    };
    config.qemu.runtime_dir = runtime.to_path_buf();
    config
}

pub fn runtime_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmf-vm-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

pub async fn sh(vm: &Vm, script: &str) -> String {
    let output = vm
        .exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..ExecRequest::default()
        })
        .await
        .expect("exec");
    assert_eq!(
        output.exit_code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// PIDs of QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    vmfactory_hypervisor::qemu::processes_under(dir)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}
