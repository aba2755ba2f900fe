//! End-to-end tests of `vmfactory factory init|status|destroy`, `config show`, and `run`
//! through a template, with a configuration file.

mod common;

use std::process::{Command, Output};

use common::{image, lock_files, mounted, qemu_processes_under, text, BIN};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(factory: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-cli-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let (kernel, initrd) = (&image().kernel, &image().initrd);
        let config = format!(
            "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nruntime_dir = {:?}\n\n[factory]\n{factory}\ntemplate_path = {:?}\n",
            dir.path().join("run"),
            dir.path().join("template"),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        Self { dir }
    }

    /// `vmfactory --config <this env's config> <args>`, to be run.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args);
        command
    }

    fn vmfactory(&self, args: &[&str]) -> Output {
        self.command(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn vmfactory")
    }

    fn template(&self) -> std::path::PathBuf {
        self.dir.path().join("template")
    }
}

impl Drop for Env {
    /// Cleans up after a failed test: no template mount may outlive it.
    fn drop(&mut self) {
        if mounted(&self.template()) {
            let _ = self.command(&["factory", "destroy"]).output();
        }
        if mounted(&self.template()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.template())
                .status();
        }
    }
}

/// Runs `sleep 2` in a VM and reports whether its QEMU was a template clone
/// (`-incoming`) rather than a direct boot.
fn run_is_clone(env: &Env, extra: &[&str]) -> bool {
    run_qemu_cmdline(env, extra).contains("-incoming")
}

/// Runs `sleep 2` in a VM and returns its QEMU's command line.
fn run_qemu_cmdline(env: &Env, extra: &[&str]) -> String {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(env.dir.path().join("config.toml"))
        .arg("run")
        .args(extra)
        .args(["--", "sh", "-c", "sleep 2; echo slept"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().expect("spawn");
    let runtime = env.dir.path().join("run");
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    while seen.is_empty() && started.elapsed() < std::time::Duration::from_secs(60) {
        seen = qemu_processes_under(&runtime)
            .into_iter()
            .map(|(_, cmdline)| cmdline)
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "slept\n");
    assert_eq!(seen.len(), 1, "expected one QEMU: {seen:?}");
    seen.remove(0)
}

#[test]
fn template_lifecycle_through_the_cli() {
    let env = Env::new("enable_template = true");

    // Not ready: exit status 1.
    let status = env.vmfactory(&["factory", "status"]);
    assert_eq!(status.status.code(), Some(1), "{}", text(&status));
    assert!(text(&status).contains("No template"), "{}", text(&status));
    // A sandbox made without the template says why it took a direct boot.
    let created = env.vmfactory(&["sandbox", "create"]);
    assert!(created.status.success(), "{}", text(&created));
    assert!(
        String::from_utf8_lossy(&created.stderr).contains("The template is not usable"),
        "{}",
        text(&created)
    );
    let id = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let removed = env.vmfactory(&["sandbox", "rm", &id]);
    assert!(removed.status.success(), "{}", text(&removed));

    let init = env.vmfactory(&["factory", "init"]);
    assert!(init.status.success(), "{}", text(&init));
    assert!(text(&init).contains("Template created"), "{}", text(&init));
    assert!(mounted(&env.template()), "template tmpfs not mounted");

    let again = env.vmfactory(&["factory", "init"]);
    assert_eq!(again.status.code(), Some(125));
    // The hint names this configuration: without it, the command would act on the
    // default configuration's template.
    let destroy_hint = format!(
        "vmfactory --config {} factory destroy",
        env.dir.path().join("config.toml").display()
    );
    assert!(text(&again).contains(&destroy_hint), "{}", text(&again));
    assert!(
        !text(&again).contains("Creating the template"),
        "it said it was creating one: {}",
        text(&again)
    );

    let status = env.vmfactory(&["factory", "status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(report["factory"], "template", "{report}");
    assert_eq!(report["usable"], true, "{report}");
    assert_eq!(report["metadata"]["vm"]["memory_mib"], 256);

    // With a template, run clones it, growing the clone for a bigger request; a request
    // that differs in anything else boots directly.
    let clone = run_qemu_cmdline(&env, &[]);
    assert!(
        clone.contains("-incoming"),
        "run did not clone the template: {clone}"
    );
    // vmfactory's own QEMU loads the state from its command line (its patch 0005);
    // Debian's, where that build is not possible, through QMP.
    let ours =
        clone.starts_with(&*image().qemu.to_string_lossy()) && !image().qemu.starts_with("/usr");
    assert_eq!(
        clone.contains("-global migration.x-ignore-shared=on -incoming fd:3 -S"),
        ours,
        "{clone} (vmfactory's QEMU: {})",
        image().qemu.display()
    );
    assert!(
        run_is_clone(&env, &["--vcpus", "2", "--memory", "512"]),
        "a bigger request must get a grown clone"
    );
    let grown = env.vmfactory(&["run", "--vcpus", "2", "--memory", "512", "--", "nproc"]);
    assert!(grown.status.success(), "{}", text(&grown));
    assert_eq!(String::from_utf8_lossy(&grown.stdout).trim(), "2");
    assert!(
        !run_is_clone(&env, &["--kernel-params", "vmfactory.test=1"]),
        "other kernel parameters must boot directly"
    );

    let destroy = env.vmfactory(&["factory", "destroy"]);
    assert!(destroy.status.success(), "{}", text(&destroy));
    assert!(text(&destroy).contains("destroyed"), "{}", text(&destroy));
    assert!(!env.template().exists(), "template directory remains");
    assert!(!mounted(&env.template()), "template tmpfs still mounted");
    let locks = lock_files(env.dir.path());
    assert!(locks.is_empty(), "lock files left: {locks:?}");
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path().join("run/vm"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let destroy = env.vmfactory(&["factory", "destroy"]);
    assert!(text(&destroy).contains("No template"), "{}", text(&destroy));
}

#[test]
fn init_without_a_factory_says_what_to_enable() {
    let env = Env::new("enable_template = false");
    let output = env.vmfactory(&["factory", "init"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output).contains("enable_template = true"),
        "{}",
        text(&output)
    );
    // Its status and destroy say the same instead of pointing at `factory init`.
    let status = env.vmfactory(&["factory", "status"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains("set enable_template = true"),
        "{}",
        text(&status)
    );
    let destroy = env.vmfactory(&["factory", "destroy"]);
    assert!(destroy.status.success(), "{}", text(&destroy));
    assert!(
        text(&destroy).contains("Nothing to destroy"),
        "{}",
        text(&destroy)
    );
    // A factory's size is the configuration's: --vcpus and --memory are refused.
    let env = Env::new("enable_template = true");
    let sized = env.vmfactory(&["factory", "init", "--vcpus", "2", "--memory", "512"]);
    assert_eq!(sized.status.code(), Some(125));
    assert!(text(&sized).contains("default_vcpus"), "{}", text(&sized));
    assert!(!env.template().exists(), "a template was made");
}

#[test]
fn config_show_prints_the_effective_configuration() {
    let env = Env::new("enable_template = true");
    let output = env.vmfactory(&["config", "show"]);
    assert!(output.status.success(), "{}", text(&output));
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("enable_template = true"), "{shown}");
    assert!(shown.contains("default_memory = 256"), "{shown}");
    assert!(shown.contains("[hypervisor.qemu]"), "{shown}");
    // The variables that override keys for every command are shown applied, and named.
    let output = env
        .command(&["config", "show"])
        .env("VMFACTORY_INITRD", "/elsewhere/initrd.img")
        .env("VMFACTORY_GUEST_KERNEL", "debian")
        .output()
        .expect("spawn vmfactory");
    assert!(output.status.success(), "{}", text(&output));
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        shown.contains("initrd = \"/elsewhere/initrd.img\""),
        "{shown}"
    );
    assert!(shown.contains("kernel = \"debian\""), "{shown}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("VMFACTORY_INITRD overrides hypervisor.qemu.initrd"),
        "{said}"
    );
    // The configuration names a kernel: the kind of guest image has no effect, and says so.
    assert!(
        said.contains("VMFACTORY_GUEST_KERNEL has no effect"),
        "{said}"
    );
    // Which QEMU VMs run, as no path names one.
    assert!(said.contains("VMs run vmfactory's QEMU"), "{said}");
    let output = env
        .command(&["config", "show"])
        .env("VMFACTORY_GUEST_QEMU", "debian")
        .output()
        .expect("spawn vmfactory");
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("qemu = \"debian\""),
        "{}",
        text(&output)
    );
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("VMFACTORY_GUEST_QEMU overrides guest.qemu"),
        "{said}"
    );
    assert!(
        said.contains("VMs run Debian's qemu-system-x86_64"),
        "{said}"
    );
}

#[test]
fn a_closed_or_full_output_ends_vmfactory_without_a_panic() {
    let env = Env::new("enable_template = true");
    let config_show_to = |stdout: std::process::Stdio| {
        let mut command = env.command(&["config", "show"]);
        // No override notices from the caller's environment: nothing else is said.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("VMFACTORY_") {
                command.env_remove(name);
            }
        }
        command.stdout(stdout).output().expect("spawn vmfactory")
    };
    // A reader that went away (`vmfactory config show | true`): exit 141, nothing said.
    let (reader, writer) = rustix::pipe::pipe().expect("pipe");
    drop(reader);
    let output = config_show_to(writer.into());
    assert_eq!(output.status.code(), Some(141), "{}", text(&output));
    assert!(output.stderr.is_empty(), "{}", text(&output));
    // A full disk: the reason, exit 125, no panic.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let output = config_show_to(full.into());
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.starts_with("vmfactory: cannot write to standard output: No space left"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn an_invalid_configuration_names_the_key() {
    let env = Env::new("enable_template = true\nvm_cache_numbr = 3");
    let output = env.vmfactory(&["config", "show"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output).contains("vm_cache_numbr"),
        "{}",
        text(&output)
    );
}

#[test]
fn a_damaged_template_is_reported_broken_and_run_boots_directly() {
    let env = Env::new("enable_template = true");
    let config = env.dir.path().join("config.toml");
    let mut text_config = std::fs::read_to_string(&config).expect("config");
    text_config.push_str("\n[agent]\ndial_timeout = 5\n");
    std::fs::write(&config, text_config).expect("config");
    let init = env.vmfactory(&["factory", "init"]);
    assert!(init.status.success(), "{}", text(&init));

    // Damage the guest memory in a way the metadata cannot see: same size, all zeros.
    let memory = env.template().join("memory");
    let size = std::fs::metadata(&memory).expect("memory").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .expect("open memory");
    file.set_len(0).expect("truncate");
    file.set_len(size).expect("extend");
    drop(file);

    let status = env.vmfactory(&["factory", "status", "--json"]);
    assert_eq!(status.status.code(), Some(1), "{}", text(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(report["usable"], false, "{report}");
    assert!(
        report["problem"]
            .as_str()
            .is_some_and(|p| p.contains("broken")),
        "{report}"
    );

    let run = env.vmfactory(&["run", "--", "echo", "served"]);
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(String::from_utf8_lossy(&run.stdout), "served\n");
    assert!(text(&run).contains("booted directly"), "{}", text(&run));

    let destroy = env.vmfactory(&["factory", "destroy"]);
    assert!(destroy.status.success(), "{}", text(&destroy));
    assert!(!mounted(&env.template()));
}
