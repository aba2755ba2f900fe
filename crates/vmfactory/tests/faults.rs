//! Fault injection on real VMs (QEMU TCG): frozen and flooding guests, SIGKILL of `run`
//! and of the VMCache server, signals during template creation, a full tmpfs, hostile
//! paths and values in the configuration, and a soak of the VMCache server. Every test
//! ends by checking that no QEMU process, VM directory, socket or mount is left.
//!
//! The soak hands out `VMFACTORY_SOAK_HANDOUTS` VMs (default 200).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_clean_within, image, leftovers, mounts_under, process_alive, qemu_pids_under,
    send_signal, text, wait_for_qemu, BIN,
};
use vmfactory_factory::{Factory, FactoryBase, GrpcCacheFactory, VmRequest};

/// A directory with a configuration file (`config.toml`), a runtime directory (`run`) and
/// room for a template (`template`) and a VMCache socket (`cache.sock`). Its drop kills
/// QEMUs and unmounts what a failed test left.
struct Env {
    dir: tempfile::TempDir,
    runtime: PathBuf,
}

impl Env {
    /// An environment whose `[factory]` section holds `factory` (plus template_path).
    fn new(factory: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-fault-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let runtime = dir.path().join("run");
        let env = Self { dir, runtime };
        env.write_config(&format!(
            "template_path = {:?}\nvm_cache_endpoint = {:?}\n{factory}",
            env.template(),
            env.socket()
        ));
        env
    }

    /// Writes the configuration: the guest image, `runtime_dir`, and `factory` as the
    /// `[factory]` section.
    fn write_config(&self, factory: &str) {
        self.write_config_with(&format!("runtime_dir = {:?}\n", self.runtime), factory);
    }

    /// Writes the configuration with `qemu` lines in `[hypervisor.qemu]`.
    fn write_config_with(&self, qemu: &str, factory: &str) {
        let (kernel, initrd) = (&image().kernel, &image().initrd);
        let config = format!(
            "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\n{qemu}\n\
             [agent]\ndial_timeout = 20\n\n[factory]\n{factory}\n"
        );
        std::fs::write(self.config(), config).expect("config");
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn template(&self) -> PathBuf {
        self.dir.path().join("template")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cache.sock")
    }

    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "warn");
        command
    }

    fn vmfactory(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("spawn vmfactory")
    }

    /// Asserts that nothing is left (waiting a little for processes to finish dying).
    fn assert_clean(&self) {
        assert_clean_within(self.dir.path(), &self.runtime, Duration::from_secs(10));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in qemu_pids_under(self.dir.path()) {
            send_signal(pid, libc::SIGCONT);
            send_signal(pid, libc::SIGKILL);
        }
        let mut mounts = mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for mount in mounts {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }
}

/// Waits up to `limit` for `child` to exit; kills it and panics on a hang.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `child`'s stdout up to a line `started` (the guest command runs).
fn wait_for_line(child: &mut Child, expected: &str) -> BufReader<std::process::ChildStdout> {
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read a line");
    assert_eq!(line.trim_end(), expected, "unexpected first line");
    reader
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

// 1. A frozen guest.

#[test]
fn a_frozen_vm_is_killed_at_the_host_timeout() {
    let env = Env::new("");
    let mut child = env
        .command()
        .args([
            "run",
            "--timeout",
            "5",
            "--",
            "sh",
            "-c",
            "echo started; sleep 60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let _stdout = wait_for_line(&mut child, "started");
    let started = Instant::now();
    let qemu = wait_for_qemu(&env.runtime, Duration::from_secs(5));
    send_signal(qemu, libc::SIGSTOP);
    let status = wait_bounded(&mut child, Duration::from_secs(60), "run with a frozen VM");
    let elapsed = started.elapsed();
    let stderr = stderr_of(&mut child);
    println!("frozen guest: run returned {status} {elapsed:.1?} after the command started");
    assert_eq!(status.code(), Some(124), "{stderr}");
    assert!(stderr.contains("--timeout"), "{stderr}");
    assert!(
        elapsed < Duration::from_secs(30),
        "run took {elapsed:?} to give up on a frozen VM"
    );
    assert!(!process_alive(qemu), "the stopped QEMU {qemu} survived");
    env.assert_clean();
}

// 2. A flooding guest.

fn flood_times_out(read_stdout: bool) {
    let env = Env::new("");
    let stdout = if read_stdout {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let started = Instant::now();
    let mut child = env
        .command()
        .args(["run", "--timeout", "10", "--", "yes"])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()).unwrap_or(0))
    });
    let status = wait_bounded(&mut child, Duration::from_secs(90), "run -- yes");
    let bytes = reader.map(|reader| reader.join().expect("reader"));
    let stderr = stderr_of(&mut child);
    println!(
        "flood (stdout {}): {status} after {:.1?}, {} bytes read",
        if read_stdout { "read" } else { "/dev/null" },
        started.elapsed(),
        bytes.map_or("no".into(), |b| b.to_string())
    );
    assert_eq!(status.code(), Some(124), "{stderr}");
    if let Some(bytes) = bytes {
        assert!(bytes > 1 << 20, "only {bytes} bytes of `yes` arrived");
    }
    env.assert_clean();
}

#[test]
fn a_flooding_guest_read_by_us_times_out() {
    flood_times_out(true);
}

#[test]
fn a_flooding_guest_into_dev_null_times_out() {
    flood_times_out(false);
}

#[test]
fn two_hundred_megabytes_through_a_guest_pipe_keep_the_agent_alive() {
    let env = Env::new("");
    let output = env.vmfactory(&["run", "--", "sh", "-c", "yes | head -c 200000000 | wc -c"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "200000000");
    env.assert_clean();
}

// 3. SIGKILL of `run`.

#[test]
fn sigkill_of_run_kills_its_vm_and_the_next_run_sweeps_it() {
    let env = Env::new("");
    let mut child = env
        .command()
        .args(["run", "--", "sh", "-c", "echo started; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let _stdout = wait_for_line(&mut child, "started");
    let qemu = wait_for_qemu(&env.runtime, Duration::from_secs(5));
    child.kill().expect("SIGKILL run");
    let _ = child.wait();
    let started = Instant::now();
    while process_alive(qemu) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "QEMU {qemu} outlived the killed run (parent-death signal)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "after SIGKILL of run: {:?}",
        leftovers(env.dir.path(), &env.runtime)
    );
    let output = env.vmfactory(&["run", "--", "true"]);
    assert!(output.status.success(), "{}", text(&output));
    env.assert_clean();
}

// 4. Signals during `factory init`.

fn a_signal_during_template_creation_leaves_nothing(signal: i32) {
    let env = Env::new("enable_template = true");
    let mut child = env
        .command()
        .args(["factory", "init"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The template VM boots: its QEMU exists and the template's tmpfs is mounted.
    let qemu = wait_for_qemu(&env.runtime, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !mounts_under(env.dir.path()).is_empty(),
        "the template tmpfs is not mounted while the template VM boots"
    );
    send_signal(child.id(), signal);
    let status = wait_bounded(&mut child, Duration::from_secs(30), "factory init");
    let stderr = stderr_of(&mut child);
    println!("factory init after signal {signal}: {status}: {stderr}");
    assert_eq!(status.code(), Some(128 + signal), "{stderr}");
    assert!(!process_alive(qemu), "the template VM survived");
    env.assert_clean();
    assert!(!env.template().exists(), "the template directory is left");
}

#[test]
fn sigint_during_template_creation_leaves_nothing() {
    a_signal_during_template_creation_leaves_nothing(libc::SIGINT);
}

#[test]
fn sigterm_during_template_creation_leaves_nothing() {
    a_signal_during_template_creation_leaves_nothing(libc::SIGTERM);
}

// 5. SIGKILL of the VMCache server.

/// A VMCache server (`factory init` in the foreground) of `env`.
fn start_server(env: &Env) -> Child {
    let child = env
        .command()
        .args(["factory", "init"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    child
}

/// Cached VM pids per `factory status --json` (empty when the server does not answer).
fn cached_pids(env: &Env) -> Vec<u64> {
    let output = env.vmfactory(&["factory", "status", "--json"]);
    if !output.status.success() {
        return Vec::new();
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    report["vms"]
        .as_array()
        .map(|vms| vms.iter().filter_map(|vm| vm["pid"].as_u64()).collect())
        .unwrap_or_default()
}

fn wait_for_cached(env: &Env, count: usize) -> Vec<u64> {
    let started = Instant::now();
    loop {
        let pids = cached_pids(env);
        if pids.len() >= count {
            return pids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the cache never held {count} VMs: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `factory destroy`, then the server's exit and a clean directory.
fn destroy_server(env: &Env, mut server: Child) {
    let output = env.vmfactory(&["factory", "destroy"]);
    assert!(output.status.success(), "{}", text(&output));
    let status = wait_bounded(&mut server, Duration::from_secs(60), "the server");
    assert!(status.success(), "server exited with {status}");
    env.assert_clean();
    assert!(!env.template().exists(), "template left behind");
}

#[test]
fn clients_of_a_killed_server_fail_clearly_and_a_restart_reaps_its_vms() {
    let env = Env::new("enable_template = true\nvm_cache_number = 2");
    let mut server = start_server(&env);
    wait_for_cached(&env, 2);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let socket = env.socket();
    let server_pid = server.id();
    let outcomes = runtime.block_on(async {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let socket = socket.clone();
                tokio::spawn(async move {
                    let client = GrpcCacheFactory::connect(&socket)
                        .await
                        .map_err(|err| format!("connect: {err}"))?;
                    let mut taken = 0u32;
                    loop {
                        match tokio::time::timeout(Duration::from_secs(60), client.get_base_vm())
                            .await
                        {
                            Err(_) => return Err(format!("GetBaseVM hung after {taken} VMs")),
                            Ok(Ok(vm)) => {
                                taken += 1;
                                vm.stop().await.map_err(|err| format!("stop: {err}"))?;
                            }
                            Ok(Err(err)) => return Ok((taken, err.to_string())),
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        send_signal(server_pid, libc::SIGKILL);
        let mut outcomes = Vec::new();
        for client in clients {
            outcomes.push(client.await.expect("client task"));
        }
        outcomes
    });
    let _ = server.wait();
    let orphans = qemu_pids_under(env.dir.path());
    println!("clients after SIGKILL of the server: {outcomes:#?}; orphans {orphans:?}");
    for outcome in &outcomes {
        let (_, message) = outcome.as_ref().expect("a clear error, not a hang");
        assert!(
            message.contains("VMCache server") && message.contains("factory init"),
            "unclear error: {message}"
        );
    }
    // A restarted server reaps what the killed one left, then serves.
    let restarted = start_server(&env);
    wait_for_cached(&env, 2);
    for pid in &orphans {
        assert!(!process_alive(*pid), "orphan QEMU {pid} was not reaped");
    }
    let output = env.vmfactory(&["run", "--", "echo", "served"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "served\n");
    destroy_server(&env, restarted);
}

// 6. A full tmpfs.

#[test]
fn a_tmpfs_too_small_for_the_template_is_refused_and_left_as_it_was() {
    let env = Env::new("enable_template = true");
    let small = env.template();
    std::fs::create_dir(&small).expect("mkdir");
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&small)
        .output()
        .expect("spawn mount");
    if !mount.status.success() {
        println!(
            "SKIPPED a_tmpfs_too_small_for_the_template_is_refused: cannot mount a tmpfs here ({}); run as root",
            text(&mount).trim()
        );
        return;
    }
    let output = env.vmfactory(&["factory", "init"]);
    let message = text(&output);
    println!("factory init on a 64 MiB tmpfs: {message}");
    assert_eq!(output.status.code(), Some(125), "{message}");
    assert!(message.contains("template_path"), "{message}");
    assert!(message.contains("MiB"), "{message}");
    assert_eq!(
        mounts_under(env.dir.path()),
        vec![small.clone()],
        "only the user's tmpfs may be mounted, once"
    );
    let entries: Vec<_> = std::fs::read_dir(&small)
        .expect("read")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(entries.is_empty(), "left in the user's tmpfs: {entries:?}");
    let umount = Command::new("umount").arg(&small).status().expect("umount");
    assert!(umount.success());
    env.assert_clean();
}

// 7. Hostile paths and huge values.

#[test]
fn paths_with_spaces_commas_and_quotes_work_and_leave_nothing() {
    let env = Env::new("");
    let hostile = env.dir.path().join("a b,c\"d'e");
    let runtime = hostile.join("run time");
    let template = hostile.join("tem,plate \"x\"");
    let socket = hostile.join("cache, \"sock\"");
    env.write_config_with(
        &format!("runtime_dir = {runtime:?}\n"),
        &format!(
            "enable_template = true\nvm_cache_number = 1\ntemplate_path = {template:?}\nvm_cache_endpoint = {socket:?}\n"
        ),
    );
    let server = start_server(&env);
    wait_for_cached(&env, 1);
    assert!(
        mounts_under(env.dir.path()).contains(&template),
        "the template tmpfs is not mounted at {template:?}"
    );
    let output = env.vmfactory(&["run", "--", "echo", "hostile"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hostile\n");
    let output = env.vmfactory(&["factory", "destroy"]);
    assert!(output.status.success(), "{}", text(&output));
    let mut server = server;
    let status = wait_bounded(&mut server, Duration::from_secs(60), "the server");
    assert!(status.success(), "server exited with {status}");
    assert_clean_within(env.dir.path(), &runtime, Duration::from_secs(10));
    assert!(!template.exists(), "template left behind");
}

/// Asserts that `args` with the configuration `qemu` / `factory` fails with 125 and a
/// message naming `key`, and that nothing was created in the environment.
fn refused(env: &Env, qemu: &str, factory: &str, args: &[&str], key: &str) {
    env.write_config_with(qemu, factory);
    let before: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("read")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let output = env.vmfactory(args);
    let message = text(&output);
    println!("{key}: {}", message.trim());
    assert_eq!(output.status.code(), Some(125), "{message}");
    assert!(
        message.contains(key),
        "the message does not name {key}: {message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    let after: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("read")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "files were created");
    env.assert_clean();
}

#[test]
fn long_paths_and_huge_values_are_refused_naming_the_key() {
    let env = Env::new("");
    let long = env.dir.path().join("l".repeat(100));
    let runtime = format!("runtime_dir = {:?}\n", env.runtime);
    refused(
        &env,
        &format!("runtime_dir = {long:?}\n"),
        "",
        &["run", "--", "true"],
        "hypervisor.qemu.runtime_dir",
    );
    refused(
        &env,
        &runtime,
        &format!("vm_cache_number = 1\nvm_cache_endpoint = {long:?}\n"),
        &["factory", "init"],
        "factory.vm_cache_endpoint",
    );
    let too_long = env.dir.path().join("t".repeat(300));
    refused(
        &env,
        &runtime,
        &format!("enable_template = true\ntemplate_path = {too_long:?}\n"),
        &["factory", "init"],
        "factory.template_path",
    );
    refused(
        &env,
        &format!("{runtime}default_memory = 99999999\n"),
        "",
        &["run", "--", "true"],
        "hypervisor.qemu.default_memory",
    );
}

// 8. Soak.

/// Resident set (KiB) and open file descriptors of process `pid`.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    (rss, fds)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

#[test]
fn soak_sixteen_clients_take_vms_without_errors_or_leaks() {
    const CLIENTS: usize = 16;
    let handouts: usize = std::env::var("VMFACTORY_SOAK_HANDOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let env = Env::new("enable_template = true\nvm_cache_number = 8\ntemplate_warm_pool = 2");
    let server = start_server(&env);
    wait_for_cached(&env, 8);
    let server_pid = server.id();
    let (rss_start, fds_start) = rss_and_fds(server_pid);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let socket = env.socket();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let results = runtime.block_on(async {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (socket, next) = (socket.clone(), next.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = Vec::new();
                    let client = match GrpcCacheFactory::connect(&socket).await {
                        Ok(client) => client,
                        Err(err) => return (latencies, vec![format!("connect: {err}")]),
                    };
                    let factory = Factory::new(Arc::new(client));
                    while next.fetch_add(1, Ordering::Relaxed) < handouts {
                        let asked = Instant::now();
                        let got = tokio::time::timeout(
                            Duration::from_secs(120),
                            factory.get_vm(&VmRequest::default()),
                        )
                        .await;
                        match got {
                            Err(_) => errors.push("get_vm hung for 120 s".to_string()),
                            Ok(Err(err)) => errors.push(err.to_string()),
                            Ok(Ok(vm)) => {
                                latencies.push(asked.elapsed());
                                if let Some(reason) = factory.last_fallback() {
                                    errors.push(format!("booted directly: {reason}"));
                                }
                                if let Err(err) = vm.stop().await {
                                    errors.push(format!("stop: {err}"));
                                }
                            }
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut results = Vec::new();
        for client in clients {
            results.push(client.await.expect("client task"));
        }
        results
    });
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = results.iter().flat_map(|(l, _)| l.clone()).collect();
    let errors: Vec<String> = results.into_iter().flat_map(|(_, e)| e).collect();
    latencies.sort();
    // Compare like with like: the cache full again.
    wait_for_cached(&env, 8);
    std::thread::sleep(Duration::from_secs(1));
    let (rss_end, fds_end) = rss_and_fds(server_pid);
    println!(
        "soak: {} hand-outs to {CLIENTS} clients in {:.1} s ({:.1}/s), {} errors; \
         get_vm p50 {} ms p99 {} ms; server RSS {} -> {} MiB, fds {fds_start} -> {fds_end}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        errors.len(),
        percentile(&latencies, 0.5).as_millis(),
        percentile(&latencies, 0.99).as_millis(),
        rss_start >> 10,
        rss_end >> 10,
    );
    assert!(
        errors.is_empty(),
        "errors: {:#?}",
        &errors[..errors.len().min(10)]
    );
    assert_eq!(latencies.len(), handouts);
    assert!(
        fds_end <= fds_start + 16,
        "the server's fds grew from {fds_start} to {fds_end}"
    );
    assert!(
        rss_end < rss_start + (64 << 10),
        "the server's RSS grew from {rss_start} to {rss_end} KiB"
    );
    destroy_server(&env, server);
}
