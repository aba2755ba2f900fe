//! End-to-end tests of `vmfactory run`: real QEMU (TCG here), the real Debian cloud kernel,
//! our agent as PID 1.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{image, qemu_pids_under, with_image, BIN};
use sha2::{Digest, Sha256};

/// A `vmfactory` command with the image preset and a private runtime directory.
struct Env {
    runtime: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            runtime: tempfile::Builder::new()
                .prefix("vmf-test-")
                .tempdir_in("/tmp")
                .expect("tempdir"),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        with_image(&mut command, self.runtime.path());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command()
            .arg("run")
            .args(args)
            .output()
            .expect("spawn vmfactory")
    }

    /// Asserts that no VM directory and no QEMU process of this environment remain.
    fn assert_nothing_left(&self) {
        let vm_dir = self.runtime.path().join("vm");
        let leftovers: Vec<_> = std::fs::read_dir(&vm_dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "VM directories left: {leftovers:?}");
        let qemus = qemu_pids_under(self.runtime.path());
        assert!(qemus.is_empty(), "QEMU processes left: {qemus:?}");
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn uname_reports_the_packaged_kernel_not_the_hosts() {
    let env = Env::new();
    let output = env.run(&["--", "uname", "-r"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let guest = stdout(&output).trim().to_string();
    assert_eq!(guest, image().release);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host release");
    assert_ne!(guest, host.trim(), "the guest must not run the host kernel");
    env.assert_nothing_left();
}

#[test]
fn exit_code_and_stderr_propagate() {
    let env = Env::new();
    let output = env.run(&["--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"]);
    assert_eq!(output.status.code(), Some(7), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "to-out\n");
    assert!(stderr(&output).contains("to-err"), "{}", stderr(&output));
    env.assert_nothing_left();
}

#[test]
fn sixteen_mib_of_output_arrive_byte_for_byte() {
    let env = Env::new();
    let script =
        "head -c 16777216 /dev/urandom > /tmp/out && sha256sum /tmp/out >&2 && cat /tmp/out";
    let output = env.run(&["--", "sh", "-c", script]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(output.stdout.len(), 16 << 20);
    let host_digest = format!("{:x}", Sha256::digest(&output.stdout));
    let guest_digest = stderr(&output)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(host_digest, guest_digest);
    env.assert_nothing_left();
}

#[test]
fn vcpus_option_sets_the_guest_cpu_count() {
    let env = Env::new();
    let output = env.run(&["--vcpus", "2", "--", "nproc"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "2");
    env.assert_nothing_left();
}

#[test]
fn timeout_kills_the_command() {
    let env = Env::new();
    let output = env.run(&["--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(
        output.status.code(),
        Some(124),
        "stderr: {}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("timed out"), "{}", stderr(&output));
    env.assert_nothing_left();
}

/// Starts `run -- sleep 600`, waits until the command runs, sends `signal` to vmfactory
/// and checks the exit status (128 + signal) and that nothing is left.
fn signal_stops_the_vm_and_cleans_up(signal: i32) {
    let env = Env::new();
    let child = env
        .command()
        .args(["run", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the VM is up (its QEMU exists), then give the guest time to start the command.
    let started = Instant::now();
    while qemu_pids_under(env.runtime.path()).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(4));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(pid, signal);
    }
    let output = child.wait_with_output().expect("wait");
    assert_eq!(
        output.status.code(),
        Some(128 + signal),
        "stderr: {}",
        stderr(&output)
    );
    env.assert_nothing_left();
}

#[test]
fn ctrl_c_stops_the_vm_and_cleans_up() {
    signal_stops_the_vm_and_cleans_up(libc::SIGINT);
}

#[test]
fn sigterm_and_sighup_stop_the_vm_and_clean_up() {
    signal_stops_the_vm_and_cleans_up(libc::SIGTERM);
    signal_stops_the_vm_and_cleans_up(libc::SIGHUP);
}

#[test]
fn output_arrives_while_the_command_runs() {
    use std::io::BufRead;
    let env = Env::new();
    let mut child = env
        .command()
        .args(["run", "--", "sh", "-c", "echo a; sleep 3; echo b"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert_eq!(first, "a");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "`a` arrived only after the command ended"
    );
    assert_eq!(lines.next().expect("b").expect("read"), "b");
    assert!(child.wait().expect("wait").success());
    env.assert_nothing_left();
}

#[test]
fn stdin_is_passed_to_the_command() {
    use std::io::Write;
    let env = Env::new();
    let run_with_input = |input: Vec<u8>, args: &[&str]| {
        let mut child = env
            .command()
            .arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let output = child.wait_with_output().expect("wait");
        writer.join().expect("writer");
        output
    };
    let output = run_with_input(b"hi\n".to_vec(), &["--", "cat"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "hi\n");

    // 4 MiB of random bytes through the guest and back, byte for byte.
    let input: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = format!("{:x}", Sha256::digest(&input));
    let output = run_with_input(input, &["--", "sha256sum"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output).split_whitespace().next(), Some(&*expected));

    // Piped input and -t: refused before any VM starts (the guest terminal could lose
    // the input's end and wait forever), as a command line that cannot work: exit 2.
    let output = run_with_input(b"echo hi\n".to_vec(), &["-it", "--", "sh"]);
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("not a terminal"),
        "{}",
        stderr(&output)
    );
    env.assert_nothing_left();
}

#[test]
fn a_missing_command_exits_127() {
    let env = Env::new();
    let output = env.run(&["--", "no-such-command"]);
    assert_eq!(
        output.status.code(),
        Some(127),
        "stderr: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("\"no-such-command\": command not found in the VM"),
        "{}",
        stderr(&output)
    );
    // A missing working directory is not a missing command.
    let output = env.run(&["-w", "/no/such/dir", "--", "pwd"]);
    assert_eq!(
        output.status.code(),
        Some(125),
        "stderr: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("working directory \"/no/such/dir\" does not exist"),
        "{}",
        stderr(&output)
    );
    env.assert_nothing_left();
}

#[test]
fn a_kernel_given_alone_boots_with_the_guest_images_initramfs() {
    let env = Env::new();
    let kernel = image().kernel.to_string_lossy().into_owned();
    let output = env
        .command()
        .env_remove("VMFACTORY_KERNEL")
        .env_remove("VMFACTORY_INITRD")
        .args(["run", "--kernel", &kernel, "--", "echo", "booted"])
        .output()
        .expect("spawn vmfactory");
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "booted\n");
    env.assert_nothing_left();
}

#[test]
fn a_guest_reboot_ends_the_run_with_a_clear_error_and_leaves_nothing() {
    let env = Env::new();
    let output = env.run(&["--", "/bin/busybox", "reboot", "-f"]);
    assert_eq!(output.status.code(), Some(125), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("The VM stopped while running the command"),
        "{message}"
    );
    assert!(message.contains("reboot: Restarting system"), "{message}");
    assert!(!message.contains("panicked at"), "{message}");
    env.assert_nothing_left();
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let env = Env::new();
    let output = env.run(&["--kernel", "/nonexistent/vmlinux", "--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    let message = stderr(&output);
    assert!(
        message.contains("--kernel /nonexistent/vmlinux: no such file"),
        "{message}"
    );
    assert!(message.contains("leave out --kernel"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    env.assert_nothing_left();
}

#[test]
fn missing_qemu_binary_is_a_clear_error() {
    let env = Env::new();
    let output = env.run(&["--qemu", "/nonexistent/qemu-system-x86_64", "--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    let message = stderr(&output);
    assert!(
        message.contains("--qemu /nonexistent/qemu-system-x86_64: no such file"),
        "{message}"
    );
    assert!(message.contains("leave out --qemu"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn zero_memory_is_a_clear_error() {
    let env = Env::new();
    let output = env.run(&["--memory", "0", "--", "true"]);
    // A usage error, refused before anything starts.
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("a VM needs at least 64 MiB"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn an_empty_program_name_is_refused_before_a_vm_is_had() {
    let env = Env::new();
    let output = env.run(&["--", "", "arg"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("empty word: give the program to run"),
        "{}",
        stderr(&output)
    );
    env.assert_nothing_left();
}
