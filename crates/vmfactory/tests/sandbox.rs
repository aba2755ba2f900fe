//! End-to-end tests of sandboxes: `vmfactory sandbox create|ls|exec|pause|resume|rm` on
//! real VMs, and what SIGKILL of the supervisor or of the creating command leaves.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{image, qemu_pids_under, text, with_image, BIN};
use sha2::{Digest, Sha256};

/// A private runtime directory for sandboxes, checked clean (and cleaned) on drop.
struct Env {
    runtime: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            runtime: tempfile::Builder::new()
                .prefix("vmf-sbx-")
                .tempdir_in("/tmp")
                .expect("tempdir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        with_image(&mut command, self.runtime.path()).args(args);
        command
    }

    fn sandbox(&self, args: &[&str]) -> Output {
        let mut all = vec!["sandbox"];
        all.extend_from_slice(args);
        self.command(&all).output().expect("spawn vmfactory")
    }

    fn create(&self, name: &str) -> String {
        let output = self.sandbox(&["create", "--name", name]);
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn exec(&self, id: &str, script: &str) -> String {
        let output = self.sandbox(&["exec", id, "--", "sh", "-c", script]);
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn listed(&self) -> Vec<serde_json::Value> {
        let output = self.sandbox(&["ls", "--json"]);
        assert!(output.status.success(), "{}", text(&output));
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("json")
    }

    fn assert_nothing_left(&self) {
        let sandboxes = self.runtime.path().join("sandbox");
        let left: Vec<_> = std::fs::read_dir(&sandboxes)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox directories left: {left:?}");
        let vms: Vec<_> = std::fs::read_dir(self.runtime.path().join("vm"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(vms.is_empty(), "VM directories left: {vms:?}");
        let qemus = qemu_pids_under(self.runtime.path());
        assert!(qemus.is_empty(), "QEMU processes left: {qemus:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for sandbox in self.listed_quietly() {
            let _ = self.sandbox(&["rm", "-f", &sandbox]);
        }
    }
}

impl Env {
    fn listed_quietly(&self) -> Vec<String> {
        self.command(&["sandbox", "ls", "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["id"].as_str().map(str::to_string))
            .collect()
    }
}

fn wait_gone(pid: u32) {
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pid {pid} lives on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_sandbox_keeps_state_between_execs_and_rm_leaves_nothing() {
    let env = Env::new();
    let id = env.create("state");
    assert_eq!(id.len(), 12, "{id}");
    env.exec(&id, "echo kept > /root/file");
    assert_eq!(env.exec("state", "cat /root/file"), "kept\n", "by name");
    assert_eq!(
        env.exec(&id[..6], "cat /root/file"),
        "kept\n",
        "by id prefix"
    );

    let listed = env.listed();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["name"], "state");
    assert_eq!(listed[0]["state"], "running");
    assert_eq!(listed[0]["vcpus"], 1);
    assert_eq!(listed[0]["memory_mib"], 256);

    // Two processes at once, each with its own output.
    let slow = env
        .command(&[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "sleep 2; echo slow",
        ])
        .output();
    let fast = env.exec(&id, "echo fast");
    assert_eq!(fast, "fast\n");
    assert_eq!(
        String::from_utf8_lossy(&slow.expect("slow").stdout),
        "slow\n"
    );

    let output = env.sandbox(&["pause", &id]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    assert_eq!(env.listed()[0]["state"], "paused");
    // A paused sandbox's agent cannot answer: exec and cp are refused at once, and the
    // command does not run later.
    let started = Instant::now();
    let output = env.sandbox(&["exec", &id, "--", "sh", "-c", "echo ran > /root/late"]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(text(&output).contains("is paused"), "{}", text(&output));
    let output = env.sandbox(&["cp", "/etc/hostname", &format!("{id}:/root/")]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains("sandbox resume state"),
        "{}",
        text(&output)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let output = env.sandbox(&["resume", &id]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    assert_eq!(env.exec(&id, "echo awake"), "awake\n");
    assert_eq!(
        env.exec(&id, "ls /root/late 2>&1 || echo none"),
        "ls: /root/late: No such file or directory\nnone\n"
    );

    let output = env.sandbox(&["rm", &id]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(env.listed().is_empty());
    env.assert_nothing_left();
    let output = env.sandbox(&["exec", &id, "--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(text(&output).contains("sandbox ls"), "{}", text(&output));
    // Removing it again fails as every vmfactory failure does.
    let output = env.sandbox(&["rm", &id]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
}

#[test]
fn a_guest_reboot_ends_the_exec_clearly_and_the_sandbox_is_kept_as_exited() {
    let env = Env::new();
    let id = env.create("reboots");
    let output = env.sandbox(&["exec", &id, "--", "/bin/busybox", "reboot", "-f"]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    let message = text(&output);
    assert!(
        message.contains(&format!(
            "The VM of sandbox {id} stopped while running the command"
        )),
        "{message}"
    );
    // Its supervisor notices, stops what is left and exits, keeping the record (with
    // why) and its log for the user.
    let started = Instant::now();
    let exited = loop {
        let listed = env.listed();
        assert_eq!(listed.len(), 1, "{listed:?}");
        if listed[0]["state"] == "exited" {
            break listed[0].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the sandbox of a dead VM is not listed as exited: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let reason = exited["exit_reason"].as_str().unwrap_or_default();
    assert_eq!(
        reason, "the guest rebooted (QEMU exit status: 0)",
        "{exited}"
    );
    wait_gone(exited["supervisor_pid"].as_u64().expect("supervisor pid") as u32);
    let qemus = qemu_pids_under(env.runtime.path());
    assert!(qemus.is_empty(), "QEMU processes left: {qemus:?}");
    // Commands that need its VM say so, with the log to read.
    let output = env.sandbox(&["exec", "reboots", "--", "true"]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains("Sandbox reboots has exited: ")
            && text(&output).contains(reason)
            && text(&output).contains("supervisor.log"),
        "{}",
        text(&output)
    );
    let output = env.sandbox(&["logs", "reboots"]);
    assert!(output.status.success(), "{}", text(&output));
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("stopped by itself"), "{log}");
    // Its name stays taken until it is removed, and the refusal says why.
    let output = env.sandbox(&["create", "--name", "reboots"]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains("has exited but is kept"),
        "{}",
        text(&output)
    );
    let output = env.sandbox(&["rm", "reboots"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    assert!(env.listed().is_empty());
    env.assert_nothing_left();
}

#[test]
fn exec_streams_passes_stdin_and_forwards_signals() {
    let env = Env::new();
    let id = env.create("io");

    // Output arrives while the command still runs.
    let mut child = env
        .command(&[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo a; sleep 3; echo b",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a").expect("read"), "a");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "`a` came after the end"
    );
    assert_eq!(lines.next().expect("b").expect("read"), "b");
    assert!(child.wait().expect("wait").success());

    // 10 MiB through `cat`, byte for byte, with -i.
    let input: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut child = env
        .command(&["sandbox", "exec", "-i", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let expected = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write");
    assert!(output.status.success());
    assert_eq!(output.stdout.len(), expected.len());
    assert_eq!(Sha256::digest(&output.stdout), Sha256::digest(&expected));

    // SIGTERM to `exec` reaches the guest process: exit 143.
    let child = env
        .command(&["sandbox", "exec", &id, "--", "sleep", "100"])
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(143));
    assert_eq!(env.exec(&id, "echo still-there"), "still-there\n");
    let output = env.sandbox(&["rm", &id]);
    assert!(output.status.success(), "{}", text(&output));
    env.assert_nothing_left();
}

#[test]
fn ls_quiet_lists_ids_and_rm_all_removes_every_sandbox() {
    let env = Env::new();
    // A size no VM can have is refused before anything starts.
    let output = env.sandbox(&["create", "--memory", "10"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("at least 64 MiB"),
        "{}",
        text(&output)
    );
    // A VM that cannot start (its "QEMU" exits at once): create says why, and leaves
    // nothing.
    let output = env.sandbox(&["create", "--qemu", "/bin/false"]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains("The sandbox could not be created"),
        "{}",
        text(&output)
    );
    env.assert_nothing_left();
    let mut created = vec![env.create("first"), env.create("second")];
    // A name that is the start of an id would hide that sandbox from its id's prefix.
    let output = env.sandbox(&["create", "--name", &created[0][..4]]);
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains("which it would hide"),
        "{}",
        text(&output)
    );
    created.sort();

    let output = env.sandbox(&["ls", "-q"]);
    assert!(output.status.success(), "{}", text(&output));
    let mut listed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    listed.sort();
    assert_eq!(listed, created);

    // --all with ids, and neither: usage errors, nothing removed.
    let output = env.sandbox(&["rm", "--all", &created[0]]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let output = env.sandbox(&["rm"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert_eq!(env.listed().len(), 2);

    let output = env.sandbox(&["rm", "--all"]);
    assert!(output.status.success(), "{}", text(&output));
    let mut removed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    removed.sort();
    assert_eq!(removed, created);
    assert!(env.listed().is_empty());
    env.assert_nothing_left();

    // Nothing to remove is not an error.
    let output = env.sandbox(&["rm", "--all"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(output.stdout.is_empty(), "{}", text(&output));
    let output = env.sandbox(&["ls", "-q"]);
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "{}",
        text(&output)
    );
}

#[test]
fn an_interrupted_copy_out_removes_its_partial_file() {
    let env = Env::new();
    let output = env.sandbox(&["create", "--name", "big", "--memory", "768"]);
    assert!(output.status.success(), "{}", text(&output));
    env.exec("big", "head -c 250000000 /dev/zero > /root/big");
    let local = tempfile::tempdir().expect("tempdir");
    let target = local.path().join("big.bin");
    let copy = env
        .command(&["sandbox", "cp", "big:/root/big", &target.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cp");
    // SIGINT once the file being received exists.
    let started = Instant::now();
    let partial = loop {
        let found = std::fs::read_dir(local.path())
            .expect("read dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p != &target);
        if let Some(found) = found {
            break found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no partial file appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: signalling the copy this test started.
    unsafe {
        libc::kill(copy.id() as i32, libc::SIGINT);
    }
    let output = copy.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(130), "{}", text(&output));
    assert!(text(&output).contains("interrupted"), "{}", text(&output));
    assert!(!partial.exists(), "{} left behind", partial.display());
    assert!(!target.exists(), "an incomplete copy was put in place");
    let output = env.sandbox(&["rm", "big"]);
    assert!(output.status.success(), "{}", text(&output));
    env.assert_nothing_left();
}

#[test]
fn sigkill_of_the_supervisor_or_the_creator_leaves_no_half_sandbox() {
    let env = Env::new();
    // The creating command killed while the supervisor boots the VM: the sandbox is
    // still made, and usable.
    // With Debian's QEMU (the VMs' QEMU when `[guest] qemu = "debian"`).
    let mut creator = env
        .command(&["sandbox", "create", "--name", "orphaned"])
        .env("VMFACTORY_GUEST_QEMU", "debian")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn create");
    std::thread::sleep(Duration::from_millis(500));
    creator.kill().expect("kill the creator");
    let _ = creator.wait();
    let started = Instant::now();
    loop {
        let listed = env.listed();
        if listed
            .iter()
            .any(|s| s["name"] == "orphaned" && s["state"] == "running")
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{listed:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(env.exec("orphaned", "echo usable"), "usable\n");

    // The supervisor killed: its VM dies with it, and the next listing leaves the
    // sandbox exited, saying so, until `rm`.
    let record = env.listed().remove(0);
    let supervisor = record["supervisor_pid"].as_u64().expect("pid") as u32;
    let vm = record["vm_pid"].as_u64().expect("pid") as u32;
    // Its QEMU is Debian's, and runs with vmfactory's stand-ins for the libraries it never
    // calls (Debian's QEMU links capstone and RDMA's), not the system's, and without what
    // only those needed (RDMA's netlink libraries).
    assert_eq!(
        std::fs::read_link(format!("/proc/{vm}/exe")).expect("exe"),
        std::path::Path::new("/usr/bin/qemu-system-x86_64")
    );
    let maps = std::fs::read_to_string(format!("/proc/{vm}/maps")).expect("maps");
    for library in ["libcapstone", "libibverbs"] {
        let mapped: Vec<&str> = maps.lines().filter(|l| l.contains(library)).collect();
        assert!(
            !mapped.is_empty() && mapped.iter().all(|l| l.contains("/qemu-stub/")),
            "{mapped:?}"
        );
    }
    assert!(!maps.contains("libnl-route-3"), "{maps}");
    // And with one malloc arena (unless the user chose a number).
    let environ = std::fs::read(format!("/proc/{vm}/environ")).expect("environ");
    let arenas = format!(
        "MALLOC_ARENA_MAX={}",
        std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".into())
    );
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|var| var == arenas.as_bytes()),
        "{arenas} not in QEMU's environment"
    );
    // SAFETY: killing the supervisor this test created.
    unsafe {
        libc::kill(supervisor as i32, libc::SIGKILL);
    }
    wait_gone(supervisor);
    wait_gone(vm);
    let listed = env.listed();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "exited", "{listed:?}");
    let reason = listed[0]["exit_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("supervisor (pid {supervisor})")),
        "{reason}"
    );
    let output = env.sandbox(&["exec", "orphaned", "--", "true"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("has exited: its supervisor"),
        "{}",
        text(&output)
    );
    let output = env.sandbox(&["logs", "orphaned"]);
    assert!(text(&output).contains(reason), "{}", text(&output));
    let output = env.sandbox(&["rm", "orphaned"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(env.listed().is_empty());
    env.assert_nothing_left();
}

#[test]
fn sandboxes_run_vmfactorys_own_qemu() {
    let env = Env::new();
    let id = env.create("own-qemu");
    let record = env.listed().remove(0);
    let vm = record["vm_pid"].as_u64().expect("pid") as u32;
    // The QEMU `guest build` built from Debian's source with vmfactory's devices, not
    // the system's: none of the libraries Debian's links for features VMs never use.
    assert_eq!(
        std::fs::read_link(format!("/proc/{vm}/exe")).expect("exe"),
        image().qemu
    );
    let maps = std::fs::read_to_string(format!("/proc/{vm}/maps")).expect("maps");
    for library in [
        "libcapstone",
        "libibverbs",
        "libgnutls",
        "libspice",
        "/qemu-stub/",
    ] {
        assert!(!maps.contains(library), "{library} in {maps}");
    }
    // The agent answers through its virtio-serial port, and the PCIe root ports that
    // containers' disks are hot-plugged into are there (the container tests plug them).
    let devices = env.exec(
        &id,
        "for d in /sys/bus/pci/devices/*; do echo $(cat $d/vendor $d/device); done",
    );
    // virtio-serial (1af4:1003), the PCIe root ports (1b36:000c).
    assert!(devices.contains("0x1af4 0x1003"), "{devices}");
    assert!(devices.contains("0x1b36 0x000c"), "{devices}");
    let output = env.sandbox(&["rm", "-f", &id]);
    assert!(output.status.success(), "{}", text(&output));
    env.assert_nothing_left();
}

/// Runs `vmfactory ARGS` on a new pseudo-terminal of 33x101 (its controlling terminal);
/// once `marker` appears in the output, resizes the terminal to 44x120. Returns what the
/// terminal showed.
fn on_a_terminal(env: &Env, args: &[&str], marker: &str) -> String {
    let script = r#"
import fcntl, os, pty, struct, subprocess, sys, termios, time
master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
child = subprocess.Popen(sys.argv[2:], stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
os.close(slave)
marker, seen, resized = sys.argv[1].encode(), b"", False
deadline = time.time() + 120
while time.time() < deadline:
    try:
        chunk = os.read(master, 65536)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
    if not resized and marker in seen:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 120, 0, 0))
        resized = True
child.wait()
sys.stdout.write(seen.decode(errors="replace"))
sys.stdout.write("\nEXIT %d\n" % child.returncode)
"#;
    let mut python = Command::new("python3");
    python.arg("-c").arg(script).arg(marker).arg(BIN).args(args);
    let output = with_image(&mut python, env.runtime.path())
        .output()
        .expect("python3");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn terminals_have_our_size_and_follow_a_resize_and_files_round_trip() {
    let env = Env::new();
    let id = env.create("tty");
    let shown = on_a_terminal(
        &env,
        &[
            "sandbox",
            "exec",
            "-t",
            &id,
            "--",
            "sh",
            "-c",
            "tty; stty size; echo resize-now; sleep 5; stty size",
        ],
        "resize-now",
    );
    assert!(shown.contains("/dev/pts/"), "{shown}");
    assert!(shown.contains("33 101"), "{shown}");
    assert!(shown.contains("44 120"), "{shown}");
    assert!(shown.contains("EXIT 0"), "{shown}");

    // `run -t` too, in a fresh VM.
    let shown = on_a_terminal(&env, &["run", "-t", "--", "stty", "size"], "never");
    assert!(shown.contains("33 101"), "{shown}");
    assert!(shown.contains("EXIT 0"), "{shown}");

    // Copy a 64 MiB random file and a tree in and back out.
    let local = tempfile::tempdir().expect("tempdir");
    let payload: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 9) as u8)
        .collect();
    let file = local.path().join("payload.bin");
    std::fs::write(&file, &payload).expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
    std::fs::write(tree.join("a/b/leaf.txt"), "leaf").expect("write");
    std::fs::write(tree.join("top.txt"), "top").expect("write");
    for (src, dst) in [
        (file.to_string_lossy().into_owned(), format!("{id}:/root/")),
        (tree.to_string_lossy().into_owned(), format!("{id}:/root/")),
    ] {
        let output = env.sandbox(&["cp", &src, &dst]);
        assert!(output.status.success(), "{}", text(&output));
    }
    assert_eq!(
        env.exec(
            &id,
            "stat -c %a /root/payload.bin; cat /root/tree/a/b/leaf.txt"
        ),
        "640\nleaf"
    );
    // A setuid file of the guest is not a setuid file of the host user.
    env.exec(
        &id,
        "cp /bin/busybox /root/tree/suid; chmod 4755 /root/tree/suid",
    );
    let back = local.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    for src in ["/root/payload.bin", "/root/tree"] {
        let output = env.sandbox(&["cp", &format!("{id}:{src}"), &back.to_string_lossy()]);
        assert!(output.status.success(), "{}", text(&output));
    }
    let copied = std::fs::read(back.join("payload.bin")).expect("read");
    assert_eq!(Sha256::digest(&copied), Sha256::digest(&payload));
    let mode = std::fs::metadata(back.join("payload.bin")).expect("meta");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o640
    );
    let suid = std::fs::metadata(back.join("tree/suid")).expect("suid meta");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&suid.permissions()) & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::read_to_string(back.join("tree/a/b/leaf.txt")).expect("leaf"),
        "leaf"
    );
    assert_eq!(
        std::fs::read_to_string(back.join("tree/top.txt")).expect("top"),
        "top"
    );
    let output = env.sandbox(&[
        "cp",
        &format!("{id}:/no/such/file"),
        &back.to_string_lossy(),
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("/no/such/file"), "{}", text(&output));
    // A local directory that is not there is named as such; both sides in one sandbox
    // get the command that does it.
    let missing = back.join("no/such/dir/file");
    let output = env.sandbox(&[
        "cp",
        &format!("{id}:/root/tree/top.txt"),
        &missing.to_string_lossy(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("no/such/dir: no such directory here"),
        "{}",
        text(&output)
    );
    let output = env.sandbox(&["cp", &format!("{id}:/a"), &format!("{id}:/b")]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(
        text(&output).contains("-- cp -a /a /b"),
        "{}",
        text(&output)
    );
    cp_follows_links_and_never_replaces_special_files(&env, &id, local.path());

    let output = env.sandbox(&["rm", &id]);
    assert!(output.status.success(), "{}", text(&output));
    env.assert_nothing_left();
}

/// What `sandbox cp` does at links and special files, both ways, as cp does (and never
/// replacing a device or FIFO, which a copy that replaces files whole would destroy).
fn cp_follows_links_and_never_replaces_special_files(env: &Env, id: &str, local: &std::path::Path) {
    let cp = |src: &str, dst: &str| env.sandbox(&["cp", src, dst]);
    let file = local.join("note.txt");
    std::fs::write(&file, "note").expect("write");
    let file = file.to_string_lossy().into_owned();
    // Out, onto a FIFO and a device: refused, both left as they were.
    let fifo = local.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let device = local.join("null");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &device,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod (the suite runs as root)");
    for special in [&fifo, &device] {
        let output = cp(
            &format!("{id}:/root/tree/top.txt"),
            &special.to_string_lossy(),
        );
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains("device, FIFO or socket"),
            "{}",
            text(&output)
        );
        let kind = std::fs::symlink_metadata(special)
            .expect("still there")
            .file_type();
        assert!(
            std::os::unix::fs::FileTypeExt::is_fifo(&kind)
                || std::os::unix::fs::FileTypeExt::is_char_device(&kind),
            "{special:?} was replaced"
        );
    }
    // Named as what to copy, a special file is an error, not "0 files copied".
    let output = cp(&fifo.to_string_lossy(), &format!("{id}:/root/"));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let output = cp(
        &format!("{id}:/dev/null"),
        &local.join("devnull").to_string_lossy(),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(!local.join("devnull").exists());
    // Out, onto a link to a file: the file gets it, the link stays.
    std::fs::write(local.join("real.txt"), "old").expect("write");
    std::os::unix::fs::symlink("real.txt", local.join("link.txt")).expect("link");
    let output = cp(
        &format!("{id}:/root/tree/top.txt"),
        &local.join("link.txt").to_string_lossy(),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        std::fs::read_to_string(local.join("real.txt")).expect("read"),
        "top"
    );
    assert!(std::fs::symlink_metadata(local.join("link.txt"))
        .expect("link")
        .file_type()
        .is_symlink());
    // In, onto a link to a directory (with and without a trailing slash): into it; onto a
    // link to a file: the file gets it; onto a FIFO: refused.
    env.exec(
        id,
        "mkdir -p /root/real && ln -s real /root/ln && echo old > /root/f && ln -s f /root/fl \
         && mkfifo /root/fifo",
    );
    for dst in ["/root/ln", "/root/ln/"] {
        let output = cp(&file, &format!("{id}:{dst}"));
        assert!(output.status.success(), "{}", text(&output));
    }
    let output = cp(&file, &format!("{id}:/root/fl"));
    assert!(output.status.success(), "{}", text(&output));
    let output = cp(&file, &format!("{id}:/root/fifo"));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert_eq!(
        env.exec(
            id,
            "cat /root/real/note.txt; cat /root/f; test -L /root/ln && test -L /root/fl \
             && test -p /root/fifo && echo kept"
        ),
        "notenotekept\n"
    );
    // A link copied onto a link replaces the link, as `cp -a` does; what it pointed at
    // is left alone, both ways.
    std::fs::write(local.join("real2.txt"), "mine").expect("write");
    std::os::unix::fs::symlink("real2.txt", local.join("link2.txt")).expect("link");
    let output = cp(
        &format!("{id}:/root/fl"),
        &local.join("link2.txt").to_string_lossy(),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        std::fs::read_link(local.join("link2.txt")).expect("link"),
        std::path::Path::new("f")
    );
    assert_eq!(
        std::fs::read_to_string(local.join("real2.txt")).expect("read"),
        "mine"
    );
    std::os::unix::fs::symlink("elsewhere", local.join("l3")).expect("link");
    let output = cp(
        &local.join("l3").to_string_lossy(),
        &format!("{id}:/root/fl"),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        env.exec(id, "readlink /root/fl; cat /root/f"),
        "elsewhere\nnote"
    );
    // A file that reports no size (/proc's) is copied in whole.
    let output = cp("/proc/self/status", &format!("{id}:/root/status"));
    assert!(output.status.success(), "{}", text(&output));
    assert!(env.exec(id, "cat /root/status").contains("Name:"));
    // A missing local directory named with a trailing slash is said to be missing.
    let output = cp(
        &format!("{id}:/root/tree/top.txt"),
        &format!("{}/newdir/", local.display()),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("create it first"),
        "{}",
        text(&output)
    );
    // An entry inside a tree that cannot be read is named and skipped, the rest copied,
    // and the status is 1, as cp's (a bind mount of a /proc file no read can succeed on).
    env.exec(
        id,
        "mkdir -p /root/t && echo a > /root/t/a && touch /root/t/b && echo c > /root/t/c \
         && mount -o bind /proc/1/clear_refs /root/t/b",
    );
    let output = cp(&format!("{id}:/root/t"), &local.to_string_lossy());
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("/root/t/b"), "{}", text(&output));
    assert!(
        text(&output).contains("1 entry could not be copied"),
        "{}",
        text(&output)
    );
    assert_eq!(
        std::fs::read_to_string(local.join("t/a")).expect("a"),
        "a\n"
    );
    assert_eq!(
        std::fs::read_to_string(local.join("t/c")).expect("c"),
        "c\n"
    );
    assert!(!local.join("t/b").exists());
    env.exec(id, "umount /root/t/b");
    // A local name with a colon is the side that names no sandbox.
    let colon = local.join("my:file");
    std::fs::write(&colon, "colon").expect("write");
    let output = cp(&colon.to_string_lossy(), &format!("{id}:/root/"));
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(env.exec(id, "cat /root/my:file"), "colon");
}

#[test]
fn a_forged_record_is_left_exited_with_a_plain_warning_and_its_outside_directory_kept() {
    let env = Env::new();
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let sandboxes = env.runtime.path().join("sandbox");
    let forged = sandboxes.join("aaaaaaaaaaaa");
    std::fs::create_dir_all(&forged).expect("mkdir");
    // A supervisor pid that no process has, and a VM directory outside the runtime's.
    let record = serde_json::json!({
        "id": "aaaaaaaaaaaa", "name": "forged", "created_unix": 1,
        "supervisor_pid": u32::MAX - 1, "vm_pid": 0, "vm_dir": elsewhere.path(),
        "vcpus": 1, "memory_mib": 256, "state": "running",
    });
    std::fs::write(forged.join("sandbox.json"), record.to_string()).expect("record");
    let output = env.sandbox(&["ls"]);
    assert!(output.status.success(), "{}", text(&output));
    // Warnings read as vmfactory's other lines: no time stamp, no level column.
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.starts_with(
            "vmfactory: warning: Not removing a VM directory outside the runtime directory"
        ),
        "{said}"
    );
    assert!(elsewhere.path().exists(), "a directory outside was removed");
    // A running sandbox whose supervisor is gone is left exited, and `rm` removes it, not
    // the directory outside.
    assert_eq!(env.listed()[0]["state"], "exited");
    let output = env.sandbox(&["rm", "forged"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(elsewhere.path().exists(), "a directory outside was removed");
    assert!(!forged.exists(), "the forged sandbox was not removed");
}

#[test]
fn a_stuck_supervisor_is_reported_in_bounded_time_and_rm_f_removes_it() {
    let env = Env::new();
    let id = env.create("stuck");
    let listed = env.listed();
    let supervisor = listed[0]["supervisor_pid"].as_u64().expect("pid") as u32;
    let vm = listed[0]["vm_pid"].as_u64().expect("pid") as u32;
    // Stopped: the kernel still accepts connections on its socket's backlog.
    // SAFETY: signalling the supervisor this test created.
    unsafe {
        libc::kill(supervisor as i32, libc::SIGSTOP);
    }
    for args in [&["exec", "stuck", "--", "true"][..], &["rm", "stuck"][..]] {
        let started = Instant::now();
        let output = env.sandbox(args);
        assert_eq!(
            output.status.code(),
            Some(125),
            "{args:?}: {}",
            text(&output)
        );
        assert!(
            text(&output).contains("does not answer")
                && text(&output).contains(&format!("sandbox rm -f {id}")),
            "{args:?}: {}",
            text(&output)
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    let output = env.sandbox(&["rm", "-f", "stuck"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    wait_gone(supervisor);
    wait_gone(vm);
    assert!(env.listed().is_empty());
    env.assert_nothing_left();
}

#[test]
fn a_size_beyond_the_limits_is_a_usage_error_before_anything_starts() {
    let env = Env::new();
    let output = env.sandbox(&["create", "--name", "big", "--vcpus", "99"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("--vcpus 99 exceeds"),
        "{}",
        text(&output)
    );
    assert!(env.listed().is_empty());
    env.assert_nothing_left();
}
