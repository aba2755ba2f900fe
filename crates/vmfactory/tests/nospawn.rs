//! Once the guest image exists, booting a VM must spawn nothing but QEMU: no apt, no
//! dpkg, no cargo. Recording stand-ins for those tools come first on `PATH`; the tests
//! run `vmfactory` directly and through a template and assert that nothing called them.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{image, mounted, text, BIN};

/// Tools the hot path must not run.
const FORBIDDEN: [&str; 4] = ["apt-cache", "apt-get", "dpkg-deb", "cargo"];

/// A scratch directory with recording stand-ins for [`FORBIDDEN`] first on `PATH`, a
/// private runtime directory and a template path. Use [`StubbedEnv::vmfactory`] to run
/// commands (add a `[factory]` section with [`StubbedEnv::with_factory`]), then
/// [`StubbedEnv::assert_nothing_spawned`].
struct StubbedEnv {
    dir: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl StubbedEnv {
    /// Stand-ins in place, no configuration file.
    fn new() -> Self {
        // The image is built (with the real tools) before the stand-ins go in place.
        let _ = image();
        let dir = tempfile::Builder::new()
            .prefix("vmf-nospawn-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let stubs = dir.path().join("stubs");
        std::fs::create_dir(&stubs).expect("mkdir");
        let log = dir.path().join("spawned.log");
        for tool in FORBIDDEN {
            let script = stubs.join(tool);
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nexit 1\n",
                    log.display()
                ),
            )
            .expect("write stand-in");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        Self { dir, config: None }
    }

    /// Adds a configuration file with this `[factory]` section (plus a private
    /// `template_path`); the kernel stays unset, so the guest image is looked up.
    fn with_factory(mut self, factory: &str) -> Self {
        let config = self.dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[hypervisor.qemu]\nruntime_dir = {:?}\n\n[factory]\n{factory}\ntemplate_path = {:?}\n",
                self.runtime(),
                self.template()
            ),
        )
        .expect("config");
        self.config = Some(config);
        self
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The template path of the configuration.
    fn template(&self) -> PathBuf {
        self.dir.path().join("template")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("spawned.log")
    }

    /// `PATH` with the stand-ins first.
    fn path(&self) -> OsString {
        let mut dirs = vec![self.dir.path().join("stubs")];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).expect("PATH")
    }

    /// A `vmfactory` command with the stand-ins on `PATH` and no kernel preset.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
            .args(args)
            .env("PATH", self.path())
            .env("VMFACTORY_RUNTIME_DIR", self.runtime())
            .env_remove("VMFACTORY_KERNEL")
            .env_remove("VMFACTORY_INITRD")
            .env_remove("VMFACTORY_AGENT")
            .env("RUST_LOG", "warn");
        command
    }

    /// Runs `vmfactory args…` and returns its output.
    fn vmfactory(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("spawn vmfactory")
    }

    /// Asserts that no stand-in was called.
    fn assert_nothing_spawned(&self) {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        assert!(log.is_empty(), "the hot path ran:\n{log}");
    }
}

impl Drop for StubbedEnv {
    /// No template mount may outlive a failed test.
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            if mounted(&self.template()) {
                let _ = Command::new(BIN)
                    .arg("--config")
                    .arg(config)
                    .args(["factory", "destroy"])
                    .output();
            }
        }
        if mounted(&self.template()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.template())
                .status();
        }
    }
}

fn assert_success(output: &Output) {
    assert!(output.status.success(), "{}", text(output));
}

#[test]
fn stand_ins_record_what_runs() {
    // The check itself works: a stand-in called through PATH leaves a line in the log.
    let env = StubbedEnv::new();
    let status = Command::new("sh")
        .args(["-c", "apt-cache policy x"])
        .env("PATH", env.path())
        .status()
        .expect("sh");
    assert!(!status.success());
    let log = std::fs::read_to_string(env.log()).expect("log");
    assert_eq!(log, "apt-cache policy x\n");
}

#[test]
fn run_with_a_built_image_spawns_only_qemu() {
    let env = StubbedEnv::new();
    let output = env.vmfactory(&["run", "--", "uname", "-r"]);
    assert_success(&output);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        image().release
    );
    env.assert_nothing_spawned();
}

#[test]
fn template_commands_with_a_built_image_spawn_only_qemu() {
    let env = StubbedEnv::new().with_factory("enable_template = true");
    assert_success(&env.vmfactory(&["factory", "init"]));
    assert!(mounted(&env.template()), "template tmpfs not mounted");
    assert_success(&env.vmfactory(&["factory", "status"]));
    let output = env.vmfactory(&["run", "--", "true"]);
    assert_success(&output);
    assert_success(&env.vmfactory(&["factory", "destroy"]));
    assert!(!mounted(&env.template()));
    env.assert_nothing_spawned();
}

#[test]
fn run_through_a_vmcache_server_spawns_nothing_at_all() {
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_dir.path().join("cache.sock");
    let env = StubbedEnv::new().with_factory(&format!(
        "vm_cache_number = 1\nvm_cache_endpoint = {socket:?}"
    ));
    let mut server = env
        .command(&["factory", "init"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the server");
    let started = std::time::Instant::now();
    loop {
        let status = env.vmfactory(&["factory", "status", "--json"]);
        let cached = serde_json::from_slice::<serde_json::Value>(&status.stdout)
            .ok()
            .and_then(|report| report["vms"].as_array().map(Vec::len))
            .unwrap_or(0);
        if cached == 1 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(180),
            "the server never cached a VM"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // For the client alone, QEMU is a recording stand-in too: `run` must start nothing.
    let qemu_stub = env.dir.path().join("stubs-qemu");
    std::fs::create_dir(&qemu_stub).expect("mkdir");
    let script = qemu_stub.join("qemu-system-x86_64");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"qemu-system-x86_64 $*\" >> '{}'\nexit 1\n",
            env.log().display()
        ),
    )
    .expect("write stand-in");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut path = vec![qemu_stub];
    path.extend(std::env::split_paths(&env.path()));
    let output = env
        .command(&["run", "--", "echo", "served"])
        .env("PATH", std::env::join_paths(path).expect("PATH"))
        .output()
        .expect("run");
    assert_success(&output);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "served\n");
    env.assert_nothing_spawned();
    assert_success(&env.vmfactory(&["factory", "destroy"]));
    let _ = server.wait();
}
