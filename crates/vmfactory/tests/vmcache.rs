//! End-to-end tests of the VMCache server (`vmfactory factory init` with
//! vm_cache_number > 0) and its clients: `vmfactory run`, the library client, and
//! Python (grpcio, gRPC C-core) and Node (@grpc/grpc-js) clients generated from Kata's
//! cache.proto.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{image, lock_files, mounted, qemu_pids_under, text, BIN};
use vmfactory_factory::{ExecRequest, Factory, GrpcCacheFactory};

/// A VMCache server in its own directory, stopped (and checked clean) on drop.
struct Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    fn start(cached: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-cache-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Self::start_in(dir, cached)
    }

    fn start_in(dir: tempfile::TempDir, cached: u32) -> Self {
        let server = Self::spawn_in(dir, cached);
        server.wait_for_cached(cached as usize, &[]);
        server
    }

    /// Starts the server without waiting for anything.
    fn spawn_in(dir: tempfile::TempDir, cached: u32) -> Self {
        let (kernel, initrd) = (&image().kernel, &image().initrd);
        let config = format!(
            "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nruntime_dir = {:?}\n\n\
             [factory]\nenable_template = true\ntemplate_path = {:?}\n\
             vm_cache_number = {cached}\nvm_cache_endpoint = {:?}\nmetrics_address = {:?}\n",
            dir.path().join("run"),
            dir.path().join("template"),
            dir.path().join("cache.sock"),
            dir.path().join("metrics.sock"),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .args(["factory", "init"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        Self {
            dir,
            child: Some(child),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cache.sock")
    }

    /// `GET /metrics` from the server's metrics socket.
    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(self.dir.path().join("metrics.sock"))
                .expect("connect to the metrics socket");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// The value of metric `name` in a scrape.
    fn metric(&self, name: &str) -> f64 {
        let scrape = self.scrape();
        scrape
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {scrape}"))
    }

    fn vmfactory(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn vmfactory")
    }

    /// Cached VM pids per `factory status --json`.
    fn cached_pids(&self) -> Vec<u64> {
        let output = self.vmfactory(&["factory", "status", "--json"]);
        if !output.status.success() {
            return Vec::new();
        }
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        report["vms"]
            .as_array()
            .map(|vms| vms.iter().filter_map(|vm| vm["pid"].as_u64()).collect())
            .unwrap_or_default()
    }

    /// Waits until `count` VMs are cached, none of them in `excluded`.
    fn wait_for_cached(&self, count: usize, excluded: &[u64]) -> Vec<u64> {
        let started = Instant::now();
        loop {
            let pids = self.cached_pids();
            if pids.len() == count && pids.iter().all(|pid| !excluded.contains(pid)) {
                return pids;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the cache never held {count} fresh VMs: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `factory destroy`, then checks that server, socket, mount and QEMUs are gone.
    fn destroy(&mut self) {
        let output = self.vmfactory(&["factory", "destroy"]);
        assert!(output.status.success(), "{}", text(&output));
        if let Some(mut child) = self.child.take() {
            let status = child.wait().expect("wait for the server");
            assert!(status.success(), "server exited with {status}");
        }
        self.assert_clean();
    }

    fn assert_clean(&self) {
        assert!(!self.socket().exists(), "socket left behind");
        assert!(
            !mounted(&self.dir.path().join("template")),
            "template still mounted"
        );
        assert!(
            !self.dir.path().join("template").exists(),
            "template left behind"
        );
        let qemus = qemu_pids_under(self.dir.path());
        assert!(qemus.is_empty(), "QEMUs left: {qemus:?}");
        let locks = lock_files(self.dir.path());
        assert!(locks.is_empty(), "lock files left: {locks:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in qemu_pids_under(self.dir.path()) {
            // SAFETY: killing QEMUs this test's server started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let template = self.dir.path().join("template");
        if mounted(&template) {
            let _ = Command::new("umount").arg("-l").arg(&template).status();
        }
    }
}

#[test]
fn serves_sequential_and_concurrent_runs_and_replaces_a_killed_vm() {
    let mut server = Server::start(3);
    let status = server.vmfactory(&["factory", "status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(report["factory"], "vm_cache", "{report}");
    assert_eq!(report["running"], true, "{report}");
    assert!(report["pid"].as_u64().is_some(), "{report}");

    for i in 0..10 {
        let output = server.vmfactory(&["run", "--", "echo", &format!("sequential-{i}")]);
        assert!(output.status.success(), "{}", text(&output));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("sequential-{i}\n")
        );
    }
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let config = server.config();
            std::thread::spawn(move || {
                let output = Command::new(BIN)
                    .arg("--config")
                    .arg(config)
                    .args(["run", "--", "echo", &format!("concurrent-{i}")])
                    .env("RUST_LOG", "warn")
                    .output()
                    .expect("spawn");
                (i, output)
            })
        })
        .collect();
    for handle in handles {
        let (i, output) = handle.join().expect("thread");
        assert!(output.status.success(), "{}", text(&output));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("concurrent-{i}\n")
        );
    }

    // Kill one cached VM behind the server's back: it is noticed and replaced.
    let pids = server.wait_for_cached(3, &[]);
    let victim = pids[0];
    // SAFETY: killing a QEMU this test's server started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let replaced = server.wait_for_cached(3, &[victim]);
    assert!(!replaced.contains(&victim));
    let output = server.vmfactory(&["run", "--", "echo", "after-kill"]);
    assert!(output.status.success(), "{}", text(&output));

    server.destroy();
}

#[test]
fn a_handed_out_vm_outlives_the_server() {
    let mut server = Server::start(1);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let vm = runtime.block_on(async {
        let client = GrpcCacheFactory::connect(&server.socket())
            .await
            .expect("connect");
        Factory::new(std::sync::Arc::new(client))
            .get_vm(&vmfactory_factory::VmRequest::default())
            .await
            .expect("get_vm")
    });
    let pid = vm.pid().expect("pid");
    // Stop the server; the VM it handed out must keep running and answering.
    let output = server.vmfactory(&["factory", "destroy"]);
    assert!(output.status.success(), "{}", text(&output));
    if let Some(mut child) = server.child.take() {
        assert!(child.wait().expect("wait").success());
    }
    assert!(!server.socket().exists());
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the handed-out VM died"
    );
    let output = runtime
        .block_on(vm.exec(ExecRequest {
            argv: vec!["echo".into(), "still-mine".into()],
            ..ExecRequest::default()
        }))
        .expect("exec after the server stopped");
    assert_eq!(output.stdout, b"still-mine\n");
    runtime.block_on(vm.stop()).expect("stop");
    server.assert_clean();
}

#[test]
fn a_handed_out_vm_nobody_adopts_is_stopped_after_the_grace() {
    let mut server = Server::start(1);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // A client that takes a VM and goes away without adopting it.
    let record = runtime.block_on(async {
        let message = vmfactory_factory::vmcache::connect(&server.socket())
            .await
            .expect("connect")
            .get_base_vm(())
            .await
            .expect("GetBaseVM")
            .into_inner();
        vmfactory_factory::vmcache::record_of(&message).expect("record")
    });
    let vmfactory_hypervisor::HypervisorHandle::Qemu(handle) = &record.hypervisor else {
        panic!("not a QEMU: {record:?}");
    };
    let taken = Instant::now();
    assert!(Path::new(&format!("/proc/{}", handle.pid)).exists());
    let limit = vmfactory_factory::vmcache::HANDOVER_GRACE + Duration::from_secs(30);
    while Path::new(&format!("/proc/{}", handle.pid)).exists() || handle.dir.exists() {
        assert!(
            taken.elapsed() < limit,
            "the unadopted VM {} still runs",
            record.id
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        taken.elapsed() >= vmfactory_factory::vmcache::HANDOVER_GRACE - Duration::from_secs(1),
        "stopped before the grace: {:?}",
        taken.elapsed()
    );
    // The server goes on serving.
    server.wait_for_cached(1, &[u64::from(handle.pid)]);
    let output = server.vmfactory(&["run", "--", "echo", "after-reclaim"]);
    assert!(output.status.success(), "{}", text(&output));
    server.destroy();
}

#[test]
fn run_without_a_server_says_to_start_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[factory]\nvm_cache_number = 2\nvm_cache_endpoint = {:?}\n",
            dir.path().join("none.sock")
        ),
    )
    .expect("config");
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .arg("--kernel")
        .arg(&image().kernel)
        .arg("--initrd")
        .arg(&image().initrd)
        .args(["--", "true"])
        .output()
        .expect("spawn");
    assert_eq!(output.status.code(), Some(125));
    // The hint names the configuration this run used.
    let hint = format!("vmfactory --config {} factory init", config.display());
    assert!(text(&output).contains(&hint), "{}", text(&output));
    // `factory status --json` says so in its JSON as well, and exits 1 (not ready).
    let status = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["factory", "status", "--json"])
        .output()
        .expect("spawn");
    assert_eq!(status.status.code(), Some(1), "{}", text(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(report["factory"], "vm_cache", "{report}");
    assert_eq!(report["running"], false, "{report}");
    assert!(
        report["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains(&hint)),
        "{report}"
    );
}

/// Runs a client generated from Kata's cache.proto in another gRPC stack, with default
/// channel options, against a server with one cached VM; checks its JSON report, and stops
/// the VM it was handed (a foreign client does not manage VMs).
fn a_foreign_client_calls_all_four_rpcs(client: impl FnOnce(&Path, &Path) -> Command) {
    let mut server = Server::start(1);
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocols/proto");
    let output = client(&proto_dir, &server.socket())
        .output()
        .expect("spawn the client");
    assert!(output.status.success(), "{}", text(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    // The hand-over record's QEMU handle names the VM's process.
    let handed_pid = report["vm"]["hypervisor"]["hypervisor"]["pid"]
        .as_u64()
        .and_then(|pid| i32::try_from(pid).ok())
        .unwrap_or_else(|| panic!("no QEMU pid in {report}"));
    assert_eq!(report["config"]["memory_mib"], 256, "{report}");
    assert_eq!(report["agent_config"], serde_json::json!({}), "{report}");
    assert_eq!(
        report["cached"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert!(report["server_pid"].as_u64().is_some_and(|pid| pid > 0));
    assert!(report["vm"]["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(report["vm"]["cpu"], 1);
    assert_eq!(report["vm"]["memory"], 256);
    // The hand-over record travels in GrpcVM.hypervisor: versioned, tagged by backend.
    let record = &report["vm"]["hypervisor"];
    assert_eq!(record["format_version"], 1, "{report}");
    assert_eq!(record["hypervisor"]["backend"], "qemu", "{report}");
    // The server resumed the VM before handing it over, and says so.
    assert_eq!(record["running"], true, "{report}");
    let vm_dir = record["hypervisor"]["dir"].as_str().expect("VM directory");
    assert_eq!(
        qmp_run_state(&Path::new(vm_dir).join("qmp.sock")),
        "running"
    );
    // Quit was called: the server exits on its own.
    if let Some(mut child) = server.child.take() {
        assert!(child.wait().expect("wait").success());
    }
    // The handed-out VM outlived the server; stop it.
    let proc_dir = format!("/proc/{handed_pid}");
    assert!(Path::new(&proc_dir).exists(), "the handed-out VM died");
    // SAFETY: killing the QEMU handed to the client, which this test's server started.
    unsafe {
        libc::kill(handed_pid, libc::SIGKILL);
    }
    let started = Instant::now();
    while !qemu_pids_under(server.dir.path()).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the handed-out VM survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!server.socket().exists());
    assert!(!mounted(&server.dir.path().join("template")));
}

/// The run state (`query-status`) of the QEMU whose QMP socket is `socket`.
fn qmp_run_state(socket: &Path) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("QMP socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut lines = BufReader::new(stream).lines();
    let mut answer = |command: &str| -> serde_json::Value {
        writeln!(writer, "{{\"execute\":\"{command}\"}}").expect("QMP write");
        loop {
            let line = lines.next().expect("QMP answer").expect("QMP read");
            let message: serde_json::Value = serde_json::from_str(&line).expect("QMP JSON");
            if let Some(value) = message.get("return") {
                return value.clone();
            }
            assert!(message.get("error").is_none(), "{command}: {message}");
        }
    };
    answer("qmp_capabilities");
    answer("query-status")["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_grpcio_client_with_default_options_calls_all_four_rpcs() {
    a_foreign_client_calls_all_four_rpcs(|proto_dir, socket| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/kata_cache_client.py");
        let mut command = Command::new("python3");
        command.arg(script).arg(proto_dir).arg(socket);
        command
    });
}

#[test]
fn a_grpc_js_client_with_default_options_calls_all_four_rpcs() {
    // scripts/test installs them (scripts/common.sh: ensure_node_grpc).
    let modules = vmfactory_guest_image::default_cache_dir().join("node-grpc/node_modules");
    assert!(
        modules.join("@grpc/grpc-js").is_dir() && modules.join("@grpc/proto-loader").is_dir(),
        "no @grpc/grpc-js in {}: run `bash -c 'source scripts/common.sh && ensure_node_grpc'`",
        modules.display()
    );
    a_foreign_client_calls_all_four_rpcs(|proto_dir, socket| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/kata_cache_client.js");
        let mut command = Command::new("node");
        command
            .arg(script)
            .arg(proto_dir)
            .arg(socket)
            .env("NODE_PATH", &modules);
        command
    });
}

#[test]
fn a_second_server_is_refused_a_stale_socket_is_replaced_and_sigterm_stops_cleanly() {
    // A socket file left by a dead server.
    let dir = tempfile::Builder::new()
        .prefix("vmf-cache-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("cache.sock")).expect("bind"));
    assert!(dir.path().join("cache.sock").exists());
    let mut server = Server::start_in(dir, 1);

    // Refused at once by the endpoint lock, naming the running server.
    let second = server.vmfactory(&["factory", "init"]);
    assert_eq!(second.status.code(), Some(125), "{}", text(&second));
    let pid = server.child.as_ref().map(Child::id).expect("server");
    assert!(
        text(&second).contains(&format!("in use by vmfactory process {pid}")),
        "{}",
        text(&second)
    );
    let mode = std::fs::metadata(server.socket())
        .expect("socket")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let mut child = server.child.take().expect("server");
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling the server this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "server exited with {status}");
    server.assert_clean();
}

#[test]
fn metrics_count_handouts_and_ready_vms() {
    let dir = tempfile::Builder::new()
        .prefix("vmf-cache-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut server = Server::spawn_in(dir, 1);
    // Served from the start: a scrape while the template is created answers at once
    // (it used to wait, connected, until the template was made).
    let started = Instant::now();
    while !server.dir.path().join("metrics.sock").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no metrics socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.metric("vmfactory_vms_ready"), 0.0);
    assert!(
        !server.dir.path().join("template/metadata.json").exists(),
        "the metrics were answered only once the template was made"
    );
    // Meanwhile `factory status` says the server is starting (not "start one").
    let status = server.vmfactory(&["factory", "status"]);
    if !server.dir.path().join("template/metadata.json").exists() {
        assert_eq!(status.status.code(), Some(1), "{}", text(&status));
        assert!(text(&status).contains("is starting"), "{}", text(&status));
    }
    server.wait_for_cached(1, &[]);
    assert_eq!(server.metric("vmfactory_vms_ready"), 1.0);
    let before = server.metric("vmfactory_handouts_total");
    let output = server.vmfactory(&["run", "--", "true"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(server.metric("vmfactory_handouts_total"), before + 1.0);
    assert!(server.metric("vmfactory_handout_seconds_count") >= 1.0);
    assert!(server.metric("vmfactory_template_age_seconds") > 0.0);
    server.wait_for_cached(1, &[]);
    server.destroy();
    assert!(!server.dir.path().join("metrics.sock").exists());
}

/// A server that cached two VMs, killed with SIGKILL; the pids of those VMs.
fn killed_server_with_two_cached() -> (Server, Vec<u64>) {
    let mut server = Server::start(2);
    let orphans = server.cached_pids();
    assert_eq!(orphans.len(), 2);
    if let Some(mut child) = server.child.take() {
        child.kill().expect("SIGKILL the server");
        let _ = child.wait();
    }
    (server, orphans)
}

#[test]
fn a_restarted_server_reaps_the_vms_a_killed_one_left() {
    let (mut server, orphans) = killed_server_with_two_cached();
    std::thread::sleep(Duration::from_millis(500));
    for pid in &orphans {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "cached VM {pid} died with the server: it would not outlive it after hand-over"
        );
    }
    let replacement = tempfile::tempdir().expect("tempdir");
    let dir = std::mem::replace(&mut server.dir, replacement);
    drop(server);
    let mut restarted = Server::start_in(dir, 2);
    let started = Instant::now();
    while orphans
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "orphans {orphans:?} were not reaped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fresh = restarted.cached_pids();
    assert!(fresh.iter().all(|pid| !orphans.contains(pid)));
    restarted.destroy();
}

/// The VM directory of the QEMU `pid` (named on its command line).
fn vm_dir_of(pid: u64, runtime_dir: &Path) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let vms = runtime_dir.join("vm");
    String::from_utf8_lossy(&cmdline)
        .split(['\0', '=', ','])
        .filter_map(|word| Path::new(word).strip_prefix(&vms).ok())
        .find_map(|rest| rest.components().next())
        .map(|id| vms.join(id))
        .unwrap_or_else(|| panic!("QEMU {pid} names no VM directory under {}", vms.display()))
}

#[test]
fn destroy_after_a_killed_server_stops_its_vms_and_removes_its_sockets() {
    let (server, orphans) = killed_server_with_two_cached();
    // The server handed one of them out just before it was killed: its client may still
    // adopt it, so destroy waits for that (here: until its grace is over) before
    // stopping it, and stops the other at once.
    let handed = vm_dir_of(orphans[0], &server.dir.path().join("run"));
    std::fs::write(handed.join("handed-over"), b"").expect("mark as handed over");
    let out_path = server.dir.path().join("destroy.out");
    let mut destroy = Command::new(BIN)
        .arg("--config")
        .arg(server.config())
        .args(["factory", "destroy"])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&out_path).expect("output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn destroy");
    let started = Instant::now();
    while !std::fs::read_to_string(&out_path)
        .unwrap_or_default()
        .contains("Waiting up to")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "destroy did not wait for the VM handed out: {}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        Path::new(&format!("/proc/{}", orphans[0])).exists(),
        "destroy stopped a VM its client may be adopting"
    );
    assert!(
        destroy.try_wait().expect("try_wait").is_none(),
        "destroy ended without the VM handed out"
    );
    // Its grace over, unadopted: an orphan.
    std::fs::File::options()
        .write(true)
        .open(handed.join("handed-over"))
        .and_then(|file| file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
        .expect("age the mark");
    let status = destroy.wait().expect("wait for destroy");
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "{output}");
    assert!(
        output.contains("Stopped 2 VMs whose owner is gone"),
        "{output}"
    );
    for pid in &orphans {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z "),
            "cached VM {pid} outlived destroy"
        );
    }
    for file in ["cache.sock", "cache.sock.lock", "metrics.sock"] {
        assert!(
            !server.dir.path().join(file).exists(),
            "{file} is left: {output}"
        );
    }
}
