//! Integration tests of `Vm` against real QEMU (TCG here) and the real guest image.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, image, runtime_dir, sh};
use rand::RngCore;
use sha2::{Digest, Sha256};
use vmfactory_factory::{
    ExecRequest, OutputPipe, OutputStream, ProcessEvent, ProcessSpec, TtySize, Vm, VmConfig,
    VmError,
};

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn details_clock_rng_and_bad_requests() {
    let runtime = runtime_dir();
    let config = config(runtime.path());
    let vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");

    // Under TCG, QEMU runs without transparent huge pages (denser clones); the status
    // line exists since Linux 5.0.
    let pid = vm.pid().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    if cmdline
        .split(|&b| b == 0)
        .any(|arg| arg.starts_with(b"tcg"))
    {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        if status.contains("THP_enabled:") {
            assert!(status.contains("THP_enabled:\t0"), "{status}");
        }
    }

    let details = vm.details().await.expect("details");
    assert_eq!(details.kernel_release, image().kernel_release);
    assert_eq!(details.online_cpus, 1);
    assert!(
        (100 << 10..=256 << 10).contains(&details.mem_total_kib),
        "MemTotal {} KiB",
        details.mem_total_kib
    );
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        ["tsc-early", "tsc", "kvm-clock"].contains(&details.clocksource.as_str()),
        "clocksource {:?}",
        details.clocksource
    );

    // While a host is connected, the agent's port does not raise SIGIO for every message
    // (O_ASYNC is only set while it waits for a host). Our shell's parent is the agent.
    let flags = sh(
        &vm,
        r#"for fd in /proc/$PPID/fd/*; do case $(readlink $fd) in /dev/vport*) sed -n 's/^flags:[[:space:]]*//p' /proc/$PPID/fdinfo/${fd##*/};; esac; done"#,
    )
    .await;
    let flags: Vec<u32> = flags
        .lines()
        .map(|line| u32::from_str_radix(line.trim(), 8).expect("octal fd flags"))
        .collect();
    assert_eq!(flags.len(), 1, "the agent's port descriptors: {flags:?}");
    assert_eq!(flags[0] & 0o20000, 0, "O_ASYNC is set: {:o}", flags[0]);

    // Put the guest clock 20 years back, then sync it with the host.
    sh(&vm, "date -s @1000000000 >/dev/null").await;
    let before: u64 = sh(&vm, "date +%s").await.parse().expect("seconds");
    assert!(before < 1_100_000_000, "date -s did not take: {before}");
    vm.sync_time().await.expect("sync time");
    let guest: i64 = sh(&vm, "date +%s").await.parse().expect("seconds");
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((guest - host).abs() <= 2, "guest {guest} vs host {host}");

    vm.reseed_rng().await.expect("reseed");

    // Bad input gets an error, and the agent keeps serving.
    let err = vm
        .exec(ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..ExecRequest::default()
        })
        .await
        .expect_err("missing program");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    let err = vm
        .exec(ExecRequest::default())
        .await
        .expect_err("empty argv");
    assert!(err.to_string().contains("argv is empty"), "{err}");
    assert_eq!(sh(&vm, "echo still-here").await, "still-here");

    let pid = vm.pid().expect("pid");
    let dir = vm.hypervisor().vm_dir().to_path_buf();
    vm.stop().await.expect("stop");
    assert!(!dir.exists(), "VM directory {} remains", dir.display());
    assert!(!pid_alive(pid), "QEMU {pid} still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_does_not_run_until_resumed() {
    let runtime = runtime_dir();
    let config = config(runtime.path());
    let vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");
    vm.pause().await.expect("pause");
    {
        let echo = vm.exec(ExecRequest {
            argv: vec!["echo".into(), "resumed".into()],
            ..ExecRequest::default()
        });
        tokio::pin!(echo);
        let early = tokio::time::timeout(Duration::from_secs(2), &mut echo).await;
        assert!(early.is_err(), "a paused guest answered: {early:?}");
        vm.resume().await.expect("resume");
        let output = echo.await.expect("exec after resume");
        assert_eq!(output.stdout, b"resumed\n");
    }
    vm.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dying_at_start_reports_its_stderr() {
    let runtime = runtime_dir();
    let junk = runtime.path().join("not-a-kernel");
    std::fs::write(&junk, vec![0x5a; 4096]).expect("write junk kernel");
    let config = VmConfig {
        kernel: junk,
        ..config(runtime.path())
    };
    let err = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect_err("junk kernel must fail");
    let message = err.to_string();
    assert!(matches!(err, VmError::Hypervisor(_)), "{message}");
    assert!(message.contains("QEMU exited"), "{message}");
    assert!(message.contains("last lines of QEMU stderr"), "{message}");
    let leftovers: Vec<_> = std::fs::read_dir(runtime.path().join("vm"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Waits until the console log at `console` shows, after byte `mark`, each of `lines` in
/// order; returns the log's length then.
async fn console_shows(console: &Path, mark: usize, lines: &[&str]) -> usize {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read(console).unwrap_or_default();
        let after = String::from_utf8_lossy(&text[mark.min(text.len())..]).into_owned();
        let mut at = 0;
        let all = lines.iter().all(|line| match after[at..].find(line) {
            Some(found) => {
                at += found + line.len();
                true
            }
            None => false,
        });
        if all {
            return text.len();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the console did not show {lines:?} after byte {mark}: {after}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agent serves one host after another on its port, and a host speaking garbage
/// (its connection ends with an error while it is still there) does not spoil the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_host_after_host_and_survives_a_garbled_one() {
    use vmfactory_protocols::contract::{CONSOLE_HOST_LEFT, CONSOLE_PORT_OPENED};

    let runtime = runtime_dir();
    let config = config(runtime.path());
    let mut vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");
    let channels = vm.hypervisor().channels();
    let console = channels.console_log.clone().expect("console log");
    let len = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len() as usize);

    for round in 0..3 {
        let details = vm.details().await.expect("details");
        assert_eq!(details.online_cpus, 1, "round {round}");
        let mark = len(&console);
        vm.reconnect_agent();
        console_shows(&console, mark, &[CONSOLE_HOST_LEFT[0], CONSOLE_PORT_OPENED]).await;
    }

    // A host that opens a connection and then sends what is not the agent's protocol,
    // more than one read takes, and stays: its connection ends with an error, which the
    // agent tells it, and the rest of what it sends is dropped until it leaves; only then
    // is the next connection made.
    let mark = len(&console);
    let mut garbled = tokio::net::UnixStream::connect(&channels.agent_socket)
        .await
        .expect("connect to the agent socket");
    let mut junk = vmfactory_protocols::mux::PREFACE.to_vec();
    junk.extend_from_slice(b"GET / HTTP/1.1\r\nHost: vmfactory\r\n\r\n");
    junk.resize(256 << 10, b'x');
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncWriteExt::write_all(&mut garbled, &junk),
    )
    .await
    .expect("the agent reads (and drops) all of it")
    .expect("write the junk");
    let ended = console_shows(&console, mark, &[CONSOLE_HOST_LEFT[1]]).await;
    // `mux`'s connection error: a RESET frame (kind 4) on stream 0, no payload.
    let mut told = [0; 9];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(&mut garbled, &mut told),
    )
    .await
    .expect("the agent tells the host")
    .expect("read what the agent wrote");
    assert_eq!(told, [0, 0, 0, 0, 4, 0, 0, 0, 0]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read(&console).expect("console");
    assert!(
        !String::from_utf8_lossy(&text[ended..]).contains(CONSOLE_PORT_OPENED),
        "a new connection was made while the garbled host was still there"
    );
    drop(garbled);
    console_shows(&console, ended, &[CONSOLE_PORT_OPENED]).await;

    // The next host is served at once.
    vm.reconnect_agent();
    let output = vm
        .exec(ExecRequest {
            argv: vec!["echo".into(), "after garbage".into()],
            ..ExecRequest::default()
        })
        .await
        .expect("exec after the garbled host");
    assert_eq!(output.stdout, b"after garbage\n");

    // A host that leaves and the next at once, before the agent may have seen the first
    // go (the port only tells "a host is there"): the next host's preface, read where
    // the last host's next frame was due, starts the next connection.
    for round in 3..8 {
        let details = vm.details().await.expect("details after a quick reconnect");
        assert_eq!(details.online_cpus, 1, "round {round}");
        vm.reconnect_agent();
    }
    vm.stop().await.expect("stop");
}

/// A boot dropped half-way (`run` refusing an image while its VM starts, a signal) takes
/// its QEMU down before the drop returns: its owner may exit at once, and nothing may
/// outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_dropped_half_way_leaves_nothing_once_dropped() {
    let runtime = runtime_dir();
    let config = config(runtime.path());
    let backend = config.backend();
    for _ in 0..5 {
        let boot = Vm::boot(backend.as_ref(), &config);
        let started = async {
            // QEMU is up and building its machine, or further: the guest is booting.
            while common::qemu_pids_under(runtime.path()).is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        tokio::select! {
            booted = boot => panic!("booted before the drop: {:?}", booted.map(|_| ())),
            () = started => {}
        }
        // The boot future is gone: right now, no QEMU and no VM directory.
        let left = common::qemu_pids_under(runtime.path());
        assert!(left.is_empty(), "QEMU outlived its dropped boot: {left:?}");
        let dirs: Vec<_> = std::fs::read_dir(runtime.path().join("vm"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(dirs.is_empty(), "{dirs:?}");
    }
}

/// Reads `stream` until its text contains `needle`; returns the text so far.
async fn read_until(stream: &mut OutputStream, needle: &str) -> String {
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while !text.contains(needle) {
            match stream.next_chunk().await.expect("chunk") {
                Some(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
                None => break,
            }
        }
    })
    .await;
    assert!(
        read.is_ok() && text.contains(needle),
        "no {needle:?} in {text:?}"
    );
    text
}

async fn read_to_end(stream: &mut OutputStream) -> String {
    let mut data = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.expect("chunk") {
        data.extend(chunk);
    }
    String::from_utf8_lossy(&data).into_owned()
}

fn sha256_of(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hash");
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Mode bits and modification time of a local path (not following a link).
fn stamp(path: &Path) -> (u32, i64, i64) {
    let meta = std::fs::symlink_metadata(path).expect("stat");
    (meta.mode() & 0o7777, meta.mtime(), meta.mtime_nsec())
}

fn set_stamp(path: &Path, mode: u32, mtime: SystemTime) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::File::open(path)
        .expect("open")
        .set_modified(mtime)
        .expect("set mtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_terminals_and_concurrent_processes() {
    let runtime = runtime_dir();
    let config = VmConfig {
        memory_mib: 512,
        ..config(runtime.path())
    };
    let vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");
    let agent = vm.agent();
    let work = tempfile::tempdir().expect("tempdir");
    let mtime = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);

    // A 64 MiB random file in and back out: same content, mode and time.
    let big = work.path().join("big.bin");
    {
        let mut file = std::fs::File::create(&big).expect("create");
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            rand::thread_rng().fill_bytes(&mut chunk);
            file.write_all(&chunk).expect("write");
        }
    }
    set_stamp(&big, 0o640, mtime);
    // The bytes are counted as they go (what `sandbox cp` shows).
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stats = agent
        .counting_bytes(counter.clone())
        .copy_in(&big, "/tmp")
        .await
        .expect("copy in");
    assert_eq!((stats.files, stats.bytes), (1, 64 << 20));
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 64 << 20);
    let host_sum = sha256_of(&big);
    let guest = sh(&vm, "sha256sum /tmp/big.bin; stat -c '%a %Y' /tmp/big.bin").await;
    assert_eq!(guest, format!("{host_sum}  /tmp/big.bin\n640 1700000000"));
    let back = work.path().join("back.bin");
    let stats = agent
        .counting_bytes(counter.clone())
        .copy_out("/tmp/big.bin", &back)
        .await
        .expect("copy out");
    assert_eq!((stats.files, stats.bytes), (1, 64 << 20));
    assert_eq!(
        counter.load(std::sync::atomic::Ordering::Relaxed),
        128 << 20
    );
    assert_eq!(sha256_of(&back), host_sum);
    assert_eq!(stamp(&back), (0o640, 1_700_000_000, 123_456_789));
    sh(&vm, "rm /tmp/big.bin").await;
    // A sparse file of an exabyte costs the guest nothing: refused before a byte is
    // written here, and no partial file is left.
    sh(&vm, "truncate -s 1152921504606846976 /tmp/sparse.bin").await;
    let err = agent
        .copy_out("/tmp/sparse.bin", &work.path().join("sparse.bin"))
        .await
        .expect_err("an exabyte");
    assert!(err.to_string().contains("bytes free"), "{err}");
    assert!(!work.path().join("sparse.bin").exists());
    sh(&vm, "rm /tmp/sparse.bin").await;
    // `cp FILE DIR/` wants DIR: a missing one is an error, not a file named DIR; a
    // directory copied to a missing DIR/ is made there.
    let err = agent
        .copy_in(&big, "/tmp/nodir/")
        .await
        .expect_err("a file into a missing directory");
    assert!(err.to_string().contains("no such directory"), "{err}");
    assert_eq!(
        sh(&vm, "test -e /tmp/nodir && echo made || echo none").await,
        "none"
    );
    // A file that reports no size (/proc) is copied to its end.
    let cpuinfo = work.path().join("cpuinfo");
    let stats = agent
        .copy_out("/proc/cpuinfo", &cpuinfo)
        .await
        .expect("copy /proc/cpuinfo out");
    assert!(stats.bytes > 0, "{stats:?}");
    let text = std::fs::read_to_string(&cpuinfo).expect("read");
    assert!(text.contains("processor"), "{text}");

    // A small tree with a nested directory and a link round-trips.
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("a.txt"), b"alpha\n").expect("write");
    std::fs::write(tree.join("sub/b.txt"), b"beta\n").expect("write");
    std::os::unix::fs::symlink("a.txt", tree.join("link")).expect("symlink");
    set_stamp(&tree.join("a.txt"), 0o600, mtime);
    set_stamp(&tree.join("sub/b.txt"), 0o755, mtime);
    set_stamp(&tree.join("sub"), 0o750, mtime);
    set_stamp(&tree, 0o711, mtime);
    let stats = agent.copy_in(&tree, "/tmp").await.expect("copy tree in");
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (2, 2, 1));
    let listing = sh(
        &vm,
        "cd /tmp/tree && stat -c '%n %a %Y' . a.txt sub sub/b.txt",
    )
    .await;
    assert_eq!(
        listing,
        ". 711 1700000000\na.txt 600 1700000000\nsub 750 1700000000\nsub/b.txt 755 1700000000"
    );
    let out = work.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let stats = agent
        .copy_out("/tmp/tree", &out)
        .await
        .expect("copy tree out");
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (2, 2, 1));
    let copy = out.join("tree");
    for name in ["", "a.txt", "sub", "sub/b.txt"] {
        let (original, copied) = (tree.join(name), copy.join(name));
        assert_eq!(stamp(&copied), stamp(&original), "{name}");
        if original.is_file() {
            assert_eq!(std::fs::read(&copied).ok(), std::fs::read(&original).ok());
        }
    }
    assert_eq!(
        std::fs::read_link(copy.join("link")).expect("link"),
        Path::new("a.txt")
    );

    // A terminal process sees its size, and a resize.
    let id = agent
        .start_process(ProcessSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "tty; stty size; read line; stty size; echo \"got:$line\"".into(),
            ],
            terminal: Some(TtySize {
                rows: 33,
                cols: 101,
            }),
            ..ProcessSpec::default()
        })
        .await
        .expect("start terminal");
    let mut tty = agent.output(&id, OutputPipe::Stdout).await.expect("output");
    let text = read_until(&mut tty, "33 101").await;
    assert!(text.contains("/dev/pts/"), "{text:?}");
    let listed = agent.list_processes().await.expect("list");
    assert!(
        listed
            .iter()
            .any(|p| p.exec_id == id && p.terminal && p.running),
        "{listed:?}"
    );
    agent.resize_tty(&id, 44, 120).await.expect("resize");
    agent
        .write_stdin(&id, tokio_stream::iter(vec![b"go\n".to_vec()]))
        .await
        .expect("type");
    let text = read_until(&mut tty, "got:go").await;
    assert!(text.contains("44 120"), "{text:?}");
    assert_eq!(
        agent.wait_process(&id).await.expect("wait").exit_code,
        Some(0)
    );

    // Two processes at once, each with its own input and output.
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let id = agent
            .start_process(ProcessSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("read x; echo {name}-$x; echo {name}-err >&2"),
                ],
                stdin: true,
                ..ProcessSpec::default()
            })
            .await
            .expect("start");
        ids.push(id);
    }
    let listed = agent.list_processes().await.expect("list");
    for id in &ids {
        assert!(
            listed
                .iter()
                .any(|p| &p.exec_id == id && p.running && !p.terminal),
            "{listed:?}"
        );
    }
    let mut outputs = Vec::new();
    for id in &ids {
        outputs.push(agent.output(id, OutputPipe::Stdout).await.expect("stdout"));
    }
    for (id, input) in ids.iter().rev().zip(["2", "1"]) {
        agent
            .write_stdin(
                id,
                tokio_stream::iter(vec![format!("{input}\n").into_bytes()]),
            )
            .await
            .expect("stdin");
        agent.close_stdin(id).await.expect("close");
    }
    let (first_out, second_out) = outputs.split_at_mut(1);
    let (first, second) = tokio::join!(
        read_to_end(&mut first_out[0]),
        read_to_end(&mut second_out[0])
    );
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("first-1\n", "second-2\n")
    );
    for id in &ids {
        let mut err = agent.output(id, OutputPipe::Stderr).await.expect("stderr");
        assert!(read_to_end(&mut err).await.ends_with("-err\n"));
        assert_eq!(
            agent.wait_process(id).await.expect("wait").exit_code,
            Some(0)
        );
    }

    // RunProcess: started, then output and the exit on one stream; input and signals by
    // its exec id; a process whose follower goes away is killed and forgotten.
    let mut running = agent
        .run_process(ProcessSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "read x; echo out-$x; echo err-$x >&2; exit 7".into(),
            ],
            stdin: true,
            ..ProcessSpec::default()
        })
        .await
        .expect("run")
        .expect("this agent serves RunProcess");
    assert!(running.pid > 0);
    agent
        .write_stdin(&running.exec_id, tokio_stream::iter(vec![b"in\n".to_vec()]))
        .await
        .expect("stdin");
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(event) = running.next_event().await.expect("event") {
        assert!(exit.is_none(), "nothing after the exit: {event:?}");
        match event {
            ProcessEvent::Stdout(chunk) => out.extend(chunk),
            ProcessEvent::Stderr(chunk) => err.extend(chunk),
            ProcessEvent::Exit(end) => exit = Some(end),
        }
    }
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out-in\n"[..], &b"err-in\n"[..])
    );
    assert_eq!(exit.expect("exit").exit_code, Some(7));
    assert!(
        agent.wait_process(&running.exec_id).await.is_err(),
        "forgotten"
    );
    let sleeper = || async {
        agent
            .run_process(ProcessSpec {
                argv: vec!["sleep".into(), "60".into()],
                ..ProcessSpec::default()
            })
            .await
            .expect("run")
            .expect("RunProcess")
    };
    let mut running = sleeper().await;
    agent
        .signal_process(&running.exec_id, 15)
        .await
        .expect("signal");
    let mut signalled = None;
    while let Some(event) = running.next_event().await.expect("event") {
        if let ProcessEvent::Exit(end) = event {
            signalled = end.signal;
        }
    }
    assert_eq!(signalled, Some(15));
    let abandoned = sleeper().await;
    let abandoned_id = abandoned.exec_id.clone();
    drop(abandoned);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent
        .list_processes()
        .await
        .expect("list")
        .iter()
        .any(|p| p.exec_id == abandoned_id)
    {
        assert!(std::time::Instant::now() < deadline, "still tracked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing = agent
        .run_process(ProcessSpec {
            argv: vec!["no-such-program".into()],
            ..ProcessSpec::default()
        })
        .await
        .expect_err("missing program");
    assert!(
        matches!(&missing, vmfactory_factory::AgentError::Rpc { status, .. } if status.code() == tonic::Code::NotFound),
        "{missing:?}"
    );
    // exec() returns soon after the command's end even when something it left behind
    // holds its input and output without reading.
    let began = std::time::Instant::now();
    let left_behind = vm
        .exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "sleep 60 & exit 5".into()],
            stdin: vec![b'x'; 1 << 20],
            ..ExecRequest::default()
        })
        .await
        .expect("exec");
    assert_eq!(left_behind.exit_code, Some(5));
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    vm.stop().await.expect("stop");
}
