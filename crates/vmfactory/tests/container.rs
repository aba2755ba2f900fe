//! End-to-end tests of containers from images: `run --image` with a real Debian 12 root
//! filesystem (python3) through a direct boot, a template clone and a VMCache VM; an OCI
//! layout tar and a `docker save` archive with two layers and a whiteout; sandboxes with
//! several containers (isolation, PID namespaces, `cp --container`); nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::rootfs::python_rootfs;
use common::{image, leftovers, mounted, qemu_pids_under, text, with_image, BIN};
use sha2::{Digest, Sha256};

/// A private directory with a configuration file for one factory mode.
struct Env {
    dir: tempfile::TempDir,
    server: Option<Child>,
}

impl Env {
    /// `factory` is the `[factory]` section's body.
    fn new(factory: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-ctr-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let (kernel, initrd) = (&image().kernel, &image().initrd);
        let config = format!(
            "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nruntime_dir = {:?}\n\n\
             [factory]\n{factory}\ntemplate_path = {:?}\nvm_cache_endpoint = {:?}\n",
            dir.path().join("run"),
            dir.path().join("template"),
            dir.path().join("cache.sock"),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        Self { dir, server: None }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .env("RUST_LOG", "warn");
        command
    }

    fn vmfactory(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("spawn vmfactory")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.vmfactory(args);
        assert!(output.status.success(), "{args:?}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a VMCache server holding `cached` VMs and waits until they are ready.
    fn start_server(&mut self, cached: u32) {
        let child = self
            .command(&["factory", "init"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the VMCache server");
        self.server = Some(child);
        let started = Instant::now();
        loop {
            let output = self.vmfactory(&["factory", "status", "--json"]);
            let report: serde_json::Value =
                serde_json::from_slice(&output.stdout).unwrap_or_default();
            let ready = report["vms"].as_array().map_or(0, Vec::len);
            if output.status.success() && ready >= cached as usize {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "the VMCache server never held {cached} VMs: {}",
                text(&output)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn assert_clean(&self) {
        common::assert_clean_within(self.dir.path(), &self.runtime(), Duration::from_secs(20));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.server.is_some() {
            let _ = self.vmfactory(&["factory", "destroy"]);
        }
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.dir.path().join("template").exists() {
            let _ = self.vmfactory(&["factory", "destroy"]);
        }
        for pid in qemu_pids_under(self.dir.path()) {
            common::send_signal(pid, libc::SIGKILL);
        }
        let template = self.dir.path().join("template");
        if mounted(&template) {
            let _ = Command::new("umount").arg("-l").arg(&template).status();
        }
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// SHA-256 of a file, hex.
fn sha256(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hash");
    format!("{:x}", hasher.finalize())
}

/// The disk file of the cached image built from `source` (per `image ls --json`).
fn image_disk(env: &Env, source: &Path) -> PathBuf {
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["image", "ls", "--json"])).expect("image ls json");
    let entry = listed
        .iter()
        .find(|entry| {
            entry["sources"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s.as_str() == source.to_str()))
        })
        .unwrap_or_else(|| panic!("no cached image from {source:?} in {listed:?}"));
    let dir = PathBuf::from(entry["dir"].as_str().expect("dir"));
    std::fs::read_dir(&dir)
        .expect("image dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("disk."))
        })
        .expect("a disk file")
}

/// Loop devices backed by files under `dir` (there must never be any: disks go to QEMU).
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let Ok(output) = Command::new("losetup").arg("-a").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// `run --image ROOTFS` through one factory mode: python3 answers, and the root is the
/// image's (Debian 12's os-release; the VM's own root has none).
fn python_and_os_release(env: &Env, mode: &str) {
    let rootfs = python_rootfs().to_string_lossy().into_owned();
    let output = env.vmfactory(&[
        "-v",
        "run",
        "--image",
        &rootfs,
        "--",
        "sh",
        "-c",
        "python3 -c 'print(6*7)' && cat /etc/os-release",
    ]);
    assert!(output.status.success(), "{mode}: {}", text(&output));
    let out = stdout(&output);
    assert!(out.starts_with("42\n"), "{mode}: {out}");
    assert!(
        out.contains("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\""),
        "{mode}: {out}"
    );
    // A template's mount and a VMCache server's VMs stay until `factory destroy`.
    if mode == "direct" {
        env.assert_clean();
    }
}

#[test]
fn python_from_an_image_directory_through_direct_template_and_vmcache() {
    let rootfs = python_rootfs().clone();
    let home = dirs_home();
    let cache_root = home.join(".cache/vmfactory");
    // Direct boot.
    let direct = Env::new("enable_template = false");
    python_and_os_release(&direct, "direct");
    let bare = direct.vmfactory(&["run", "--", "cat", "/etc/os-release"]);
    assert!(
        !stdout(&bare).contains("bookworm"),
        "the VM's own root must not be the image's: {}",
        text(&bare)
    );
    let disk = image_disk(&direct, &rootfs);
    let digest = sha256(&disk);

    // A template clone: the run's QEMU is started with -incoming.
    let template = Env::new("enable_template = true");
    template.ok(&["factory", "init"]);
    let child = template
        .command(&[
            "run",
            "--image",
            &rootfs.to_string_lossy(),
            "--",
            "sh",
            "-c",
            "sleep 1; python3 -c 'print(6*7)'",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = common::wait_for_qemu(&template.runtime(), Duration::from_secs(60));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("-incoming"),
        "run did not use a template clone"
    );
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success(), "template: {}", text(&output));
    assert_eq!(stdout(&output), "42\n");
    python_and_os_release(&template, "template");
    template.ok(&["factory", "destroy"]);
    template.assert_clean();

    // A VMCache VM: the client spawns no QEMU of its own.
    let mut cache = Env::new("enable_template = true\nvm_cache_number = 1");
    cache.start_server(1);
    python_and_os_release(&cache, "vmcache");
    cache.ok(&["factory", "destroy"]);
    if let Some(mut child) = cache.server.take() {
        let _ = child.wait();
    }
    cache.assert_clean();

    assert_eq!(sha256(&disk), digest, "the image's disk changed");
    assert!(loop_devices_under(&cache_root).is_empty());
}

fn dirs_home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

/// A static busybox for the OCI fixtures (from the guest image's busybox .deb).
fn busybox(dir: &Path) -> PathBuf {
    let cache = std::env::var("VMFACTORY_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dirs_home().join(".cache/vmfactory"));
    image();
    vmfactory_image::fixtures::static_busybox(&cache, &dir.join("busybox"))
        .expect("extract busybox")
        .expect("a busybox-static .deb in the cache (guest build downloads it)")
}

#[test]
fn oci_and_docker_archives_run_their_cmd_with_env_workdir_and_whiteouts() {
    let work = tempfile::tempdir().expect("tempdir");
    let busybox = busybox(work.path());
    let oci = work.path().join("fixture-oci.tar");
    let docker = work.path().join("fixture-docker.tar");
    let fixture =
        vmfactory_image::fixtures::write_oci_layout_tar(&oci, Some(&busybox)).expect("oci tar");
    vmfactory_image::fixtures::write_docker_archive(&docker, Some(&busybox)).expect("docker");
    let runtime = tempfile::Builder::new()
        .prefix("vmf-ctr-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    for archive in [&oci, &docker] {
        let reference = archive.to_string_lossy().into_owned();
        let run = |args: &[&str]| {
            let mut command = Command::new(BIN);
            with_image(&mut command, runtime.path())
                .arg("run")
                .args(args)
                .output()
                .expect("spawn")
        };
        // No command: the image's Cmd, in its WorkingDir, with its Env.
        let output = run(&["--image", &reference]);
        assert!(output.status.success(), "{reference}: {}", text(&output));
        assert_eq!(
            stdout(&output),
            "hello\nadded by layer 2\n",
            "{reference}: {}",
            text(&output)
        );
        // A command of ours: the whiteout's file is gone, the first layer's other is kept.
        let output = run(&[
            "--image",
            &reference,
            "--",
            "sh",
            "-c",
            "test ! -e /etc/removed.txt && cat /etc/kept.txt && pwd && echo $GREETING",
        ]);
        assert!(output.status.success(), "{reference}: {}", text(&output));
        assert_eq!(stdout(&output), "kept\n/work\nhello\n");
        if archive == &oci {
            // A missing working directory in the container is not a missing command
            // (125, naming it); a missing command still exits 127.
            let output = run(&["--image", &reference, "-w", "/no/such/dir", "--", "pwd"]);
            assert_eq!(output.status.code(), Some(125), "{}", text(&output));
            assert!(
                text(&output)
                    .contains("working directory \"/no/such/dir\" does not exist in the container"),
                "{}",
                text(&output)
            );
            let output = run(&["--image", &reference, "--", "no-such-command"]);
            assert_eq!(output.status.code(), Some(127), "{}", text(&output));
        }
        let left = leftovers(runtime.path(), runtime.path());
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    assert!(fixture.digest.starts_with("sha256:"), "{}", fixture.digest);
    // A bad reference fails clearly and leaves nothing.
    let mut command = Command::new(BIN);
    let output = with_image(&mut command, runtime.path())
        .args(["run", "--image", "/nonexistent/image", "--", "true"])
        .output()
        .expect("spawn");
    assert!(!output.status.success());
    assert!(
        text(&output).contains("/nonexistent/image"),
        "{}",
        text(&output)
    );
    let left = leftovers(runtime.path(), runtime.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn containers_of_a_sandbox_are_isolated_and_rm_leaves_nothing() {
    let rootfs = python_rootfs().to_string_lossy().into_owned();
    let env = Env::new("enable_template = false");
    // Without RUST_LOG, so the supervisor (`-v`) logs what it removes at stop.
    let create = |args: &[&str]| -> String {
        let mut all = vec!["sandbox", "create"];
        all.extend_from_slice(args);
        let output = env
            .command(&all)
            .env_remove("RUST_LOG")
            .output()
            .expect("spawn");
        assert!(output.status.success(), "{all:?}: {}", text(&output));
        stdout(&output).trim().to_string()
    };
    let a_image = format!("a={rootfs}");
    let b_image = format!("b={rootfs}");
    let first = create(&["--name", "pod", "--image", &a_image, "--image", &b_image]);
    let disk = image_disk(&env, Path::new(&rootfs));
    let digest = sha256(&disk);
    let exec = |id: &str, container: &str, script: &str| -> Output {
        env.vmfactory(&[
            "sandbox",
            "exec",
            "--container",
            container,
            id,
            "--",
            "sh",
            "-c",
            script,
        ])
    };
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["sandbox", "ls", "--json"])).expect("ls json");
    let names: Vec<&str> = listed[0]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);

    // A file written in a is invisible in b, in the VM's root, and in another sandbox.
    let wrote = exec(
        &first,
        "a",
        "echo secret > /root/written && cat /root/written",
    );
    assert_eq!(stdout(&wrote), "secret\n", "{}", text(&wrote));
    let in_b = exec(&first, "b", "test ! -e /root/written && echo absent");
    assert_eq!(stdout(&in_b), "absent\n", "{}", text(&in_b));
    let in_vm = env.vmfactory(&[
        "sandbox",
        "exec",
        &first,
        "--",
        "sh",
        "-c",
        "test ! -e /root/written && echo absent",
    ]);
    assert_eq!(stdout(&in_vm), "absent\n", "{}", text(&in_vm));
    let second = create(&["--image", &rootfs]);
    let other = exec(
        &second,
        "main",
        "test ! -e /root/written && python3 -c 'print(1+1)'",
    );
    assert_eq!(stdout(&other), "2\n", "{}", text(&other));

    // Separate PID namespaces: a's sleeper is not among b's processes; PID 1 is each
    // container's own init, not the VM's agent.
    let started = exec(
        &first,
        "a",
        "setsid sleep 4242 </dev/null >/dev/null 2>&1 & echo started",
    );
    assert_eq!(stdout(&started), "started\n", "{}", text(&started));
    let procs = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";
    let seen_in = |container: &str| stdout(&exec(&first, container, procs));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen_in("a").contains("sleep 4242") {
        assert!(Instant::now() < deadline, "a's sleeper never showed in a");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!seen_in("b").contains("sleep 4242"), "{}", seen_in("b"));
    let init = stdout(&exec(&first, "b", "tr '\\0' ' ' < /proc/1/cmdline"));
    assert!(!init.starts_with("/init"), "PID 1 of b: {init}");

    // cp --container: in, visible there (and only there), and out again.
    let work = tempfile::tempdir().expect("tempdir");
    let local = work.path().join("notes.txt");
    std::fs::write(&local, b"copied into a\n").expect("write");
    env.ok(&[
        "sandbox",
        "cp",
        "--container",
        "a",
        &local.to_string_lossy(),
        &format!("{first}:/tmp/"),
    ]);
    let there = exec(&first, "a", "cat /tmp/notes.txt");
    assert_eq!(stdout(&there), "copied into a\n", "{}", text(&there));
    let not_b = exec(&first, "b", "test ! -e /tmp/notes.txt && echo absent");
    assert_eq!(stdout(&not_b), "absent\n");
    let back = work.path().join("back.txt");
    env.ok(&[
        "sandbox",
        "cp",
        "--container",
        "a",
        &format!("{first}:/root/written"),
        &back.to_string_lossy(),
    ]);
    assert_eq!(std::fs::read(&back).expect("read"), b"secret\n");
    let unknown = env.vmfactory(&["sandbox", "exec", "--container", "zz", &first, "--", "true"]);
    assert_eq!(
        unknown.status.code(),
        Some(2),
        "a usage error: {}",
        text(&unknown)
    );
    assert!(
        text(&unknown).contains("no container \"zz\""),
        "{}",
        text(&unknown)
    );

    // rm removes the containers and detaches their disks, then stops the VM.
    let log = std::fs::read_dir(env.runtime().join("sandbox"))
        .expect("sandboxes")
        .flatten()
        .map(|e| e.path().join("supervisor.log"))
        .find(|log| {
            std::fs::read_to_string(log.with_file_name("sandbox.json"))
                .is_ok_and(|record| record.contains(&first))
        })
        .expect("the first sandbox's log");
    let log_copy = work.path().join("supervisor.log");
    let mut tail = std::process::Command::new("tail")
        .args(["-F", "-n", "+1"])
        .arg(&log)
        .stdout(std::fs::File::create(&log_copy).expect("log copy"))
        .stderr(Stdio::null())
        .spawn()
        .expect("tail");
    env.ok(&["sandbox", "rm", &first, &second]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = tail.kill();
    let _ = tail.wait();
    let log = std::fs::read_to_string(&log_copy).unwrap_or_default();
    assert_eq!(
        log.matches("Removed the container and detached its disk")
            .count(),
        2,
        "{log}"
    );
    env.assert_clean();
    assert!(!env
        .runtime()
        .join("sandbox")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
    assert_eq!(sha256(&disk), digest, "the image's disk changed");
    assert!(loop_devices_under(disk.parent().expect("dir")).is_empty());
}
