//! Tests of the process table: pipes, terminals, signals, timeouts.

use tokio_stream::StreamExt;
use vmfactory_protocols::agent::EnvVar;

use super::*;

fn request(argv: &[&str]) -> ExecProcessRequest {
    ExecProcessRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn read_all(processes: &Processes, id: &str, output: Output) -> Vec<u8> {
    let mut stream = processes.read(id, output).expect("read");
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend(chunk.expect("chunk").data);
    }
    data
}

#[tokio::test]
async fn streams_output_and_reports_exit() {
    let processes = Processes::default();
    let mut req = request(&[
        "sh",
        "-c",
        "echo out; echo err >&2; echo \"$G\"; pwd; exit 3",
    ]);
    req.env = vec![EnvVar {
        key: "G".into(),
        value: "hello".into(),
    }];
    req.workdir = "/tmp".into();
    let (id, pid) = processes.start(req).expect("start");
    assert!(pid > 0);
    assert_eq!(
        read_all(&processes, &id, Output::Stdout).await,
        b"out\nhello\n/tmp\n"
    );
    assert_eq!(read_all(&processes, &id, Output::Stderr).await, b"err\n");
    let exit = processes.wait(&id).await.expect("wait");
    assert_eq!((exit.status, exit.signal, exit.timed_out), (3, 0, false));
    assert_eq!(
        processes.wait(&id).await.expect_err("forgotten").code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn output_is_read_once_and_large_output_is_intact() {
    let processes = Processes::default();
    let (id, _) = processes
        .start(request(&[
            "sh",
            "-c",
            "head -c 16777216 /dev/zero | tr '\\0' 'x'",
        ]))
        .expect("start");
    let data = read_all(&processes, &id, Output::Stdout).await;
    assert_eq!(data.len(), 16 << 20);
    assert!(data.iter().all(|&b| b == b'x'));
    assert_eq!(
        processes
            .read(&id, Output::Stdout)
            .expect_err("twice")
            .code(),
        tonic::Code::FailedPrecondition
    );
    processes.wait(&id).await.expect("wait");
}

#[tokio::test]
async fn timeouts_signals_and_bad_requests() {
    let processes = Processes::default();
    let mut req = request(&["sleep", "10"]);
    req.timeout_ms = 100;
    let (id, _) = processes.start(req).expect("start");
    let exit = processes.wait(&id).await.expect("wait");
    assert!(exit.timed_out);
    assert_eq!((exit.status, exit.signal), (-1, libc::SIGKILL));

    let (id, _) = processes.start(request(&["sleep", "10"])).expect("start");
    processes.signal(&id, 15).expect("signal");
    assert_eq!(processes.wait(&id).await.expect("wait").signal, 15);

    // Many arguments fit (an `xargs`-sized list), too many are refused with the bound.
    let mut many = vec!["true".to_string()];
    many.extend((0..20_000).map(|i| i.to_string()));
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (id, _) = processes.start(request(&many)).expect("20001 arguments");
    assert_eq!(processes.wait(&id).await.expect("wait").status, 0);
    let too_many = vec!["x"; MAX_ARGS + 1];
    let err = processes.start(request(&too_many)).expect_err("too many");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("Too many arguments"), "{err:?}");
    let err = processes.start(request(&[])).expect_err("empty argv");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut bad = request(&["true"]);
    bad.exec_id = "../x".into();
    assert_eq!(
        processes.start(bad).expect_err("id").code(),
        tonic::Code::InvalidArgument
    );
    let err = processes
        .start(request(&["/nonexistent/program"]))
        .expect_err("missing program");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("/nonexistent/program"));
    // A script whose interpreter is missing is there: said so, not "command not found".
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("s");
    std::fs::write(&script, "#!/nonexistent/interp\n").expect("write");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let err = processes
        .start(request(&[&script.to_string_lossy()]))
        .expect_err("missing interpreter");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("#! line"), "{err:?}");
    let mut relative = request(&["./s"]);
    relative.workdir = dir.path().to_string_lossy().into_owned();
    let err = processes.start(relative).expect_err("missing interpreter");
    assert!(err.message().contains("#! line"), "{err:?}");
    // A missing working directory is not a missing program (127 on the host).
    let mut elsewhere = request(&["true"]);
    elsewhere.workdir = "/nonexistent/dir".into();
    let err = processes.start(elsewhere).expect_err("missing workdir");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("working directory"), "{err:?}");
    let mut named = request(&["true"]);
    named.exec_id = "mine".into();
    processes.start(named.clone()).expect("named");
    assert_eq!(
        processes.start(named).expect_err("dup").code(),
        tonic::Code::AlreadyExists
    );
    assert!(
        processes.signal("mine", 0).is_err(),
        "signal 0 is not a signal"
    );
}

#[tokio::test]
async fn a_signal_reaches_what_the_process_started() {
    let processes = Processes::default();
    let (id, _) = processes
        .start(request(&["sh", "-c", "sleep 30 & echo $!; wait"]))
        .expect("start");
    let mut stdout = processes.read(&id, Output::Stdout).expect("read");
    let line = read_until(&mut stdout, "\n").await;
    let child: u32 = line.trim().parse().expect("the background child's pid");
    processes.signal(&id, 15).expect("signal");
    assert_eq!(processes.wait(&id).await.expect("wait").signal, 15);
    let started = std::time::Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if state.is_none_or(|state| state == "Z") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the background child {child} outlived the signal: {stat}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `stream` until its text so far contains `needle`; returns that text.
async fn read_until(
    stream: &mut ReceiverStream<Result<ReadStreamResponse, Status>>,
    needle: &str,
) -> String {
    let mut text = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while !text.contains(needle) {
            match stream.next().await {
                Some(chunk) => text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk").data)),
                None => break,
            }
        }
    })
    .await;
    assert!(
        found.is_ok() && text.contains(needle),
        "no {needle:?} in {text:?}"
    );
    text
}

async fn type_into(processes: &Processes, id: &str, text: &str) {
    let message = WriteStreamRequest {
        exec_id: id.to_string(),
        data: text.as_bytes().to_vec(),
    };
    let written = processes
        .write_stdin(tokio_stream::iter(vec![Ok(message)]))
        .await
        .expect("write");
    assert_eq!(written, text.len() as u64);
}

fn terminal(argv: &[&str], rows: u32, cols: u32) -> ExecProcessRequest {
    ExecProcessRequest {
        terminal: true,
        rows,
        cols,
        ..request(argv)
    }
}

#[tokio::test]
async fn terminal_process_has_a_tty_of_the_given_size_and_sees_a_resize() {
    let processes = Processes::default();
    let script = "tty; stty size; read line; stty size; echo \"got:$line\"; test -t 2";
    let (id, _) = processes
        .start(terminal(&["sh", "-c", script], 30, 100))
        .expect("start");
    let mut out = processes.read(&id, Output::Stdout).expect("read");
    let text = read_until(&mut out, "30 100").await;
    assert!(text.contains("/dev/pts/"), "{text:?}");
    processes.resize(&id, 40, 120).expect("resize");
    type_into(&processes, &id, "hello\n").await;
    let text = read_until(&mut out, "got:hello").await;
    assert!(text.contains("40 120"), "{text:?}");
    // Standard error is the terminal too: its stream is empty.
    let mut err = processes.read(&id, Output::Stderr).expect("stderr");
    assert!(err.next().await.is_none());
    // The output ends (EIO from the master) once the process is gone.
    while out.next().await.is_some() {}
    let exit = processes.wait(&id).await.expect("wait");
    assert_eq!((exit.status, exit.signal), (0, 0));
}

#[tokio::test]
async fn close_stdin_of_a_terminal_types_end_of_file() {
    let processes = Processes::default();
    let (id, _) = processes.start(terminal(&["cat"], 0, 0)).expect("start");
    let mut out = processes.read(&id, Output::Stdout).expect("read");
    type_into(&processes, &id, "abc\n").await;
    read_until(&mut out, "abc\r\nabc\r\n").await;
    processes.close_stdin(&id).await.expect("close");
    let exit = processes.wait(&id).await.expect("wait");
    assert_eq!((exit.status, exit.signal), (0, 0));
    let more = processes
        .write_stdin(tokio_stream::iter(vec![Ok(WriteStreamRequest {
            exec_id: id.clone(),
            data: b"late".to_vec(),
        })]))
        .await;
    assert!(more.is_err(), "the process is forgotten after its wait");
}

#[tokio::test]
async fn lists_processes_and_refuses_bad_terminal_requests() {
    let processes = Processes::default();
    let (plain, _) = processes.start(request(&["sleep", "10"])).expect("plain");
    let (tty, tty_pid) = processes
        .start(terminal(&["sleep", "10"], 5, 5))
        .expect("terminal");
    let list = processes.list().expect("list");
    assert_eq!(list.len(), 2);
    let info = list.iter().find(|p| p.exec_id == tty).expect("listed");
    assert_eq!(
        (info.pid, info.running, info.terminal),
        (tty_pid, true, true)
    );
    assert_eq!(info.argv, ["sleep", "10"]);
    let info = list.iter().find(|p| p.exec_id == plain).expect("listed");
    assert!(info.running && !info.terminal);

    let err = processes.resize(&plain, 10, 10).expect_err("no tty");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = processes.resize(&tty, 0, 10).expect_err("zero rows");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = processes.resize(&tty, 10, 70_000).expect_err("too wide");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = processes
        .start(terminal(&["true"], 70_000, 1))
        .expect_err("too tall");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let huge = vec!["x".repeat(1024); 2048];
    let mut big = request(&["true"]);
    big.argv.extend(huge);
    assert_eq!(
        processes.start(big).expect_err("huge argv").code(),
        tonic::Code::InvalidArgument
    );

    for id in [&plain, &tty] {
        processes.signal(id, 9).expect("kill");
        processes.wait(id).await.expect("wait");
    }
    assert!(processes.list().expect("list").is_empty());
}

#[test]
fn listed_argv_keeps_4_kib() {
    let long = "é".repeat(3000); // 6000 bytes
    let listed = listed_argv(&["a".into(), long]);
    assert_eq!(listed[0], "a");
    assert_eq!(listed[1].len(), LISTED_ARGV_BYTES - 2); // whole characters only
    assert!(listed.iter().map(String::len).sum::<usize>() <= LISTED_ARGV_BYTES);
}

#[tokio::test]
async fn started_processes_do_not_inherit_the_oom_exemption() {
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").expect("own score");
    crate::init::protect_from_oom();
    let protected = std::fs::read_to_string("/proc/self/oom_score_adj").expect("score");
    let child = async {
        let processes = Processes::default();
        let (id, _) = processes
            .start(request(&["cat", "/proc/self/oom_score_adj"]))
            .expect("start");
        read_all(&processes, &id, Output::Stdout).await
    }
    .await;
    std::fs::write("/proc/self/oom_score_adj", own.trim()).expect("restore the score");
    if protected.trim() != crate::init::AGENT_OOM_SCORE_ADJ {
        return; // lowering the score needs CAP_SYS_RESOURCE, which this test run lacks
    }
    assert_eq!(child, b"0\n");
}

#[tokio::test]
async fn a_full_table_forgets_the_oldest_ended_processes_not_running_ones() {
    let processes = Processes::with_capacity(3);
    let (first, _) = processes.start(request(&["true"])).expect("first");
    let (second, _) = processes.start(request(&["true"])).expect("second");
    let (running, _) = processes.start(request(&["sleep", "30"])).expect("running");
    // Both `true`s ended, and nobody waited for them.
    for id in [&first, &second] {
        assert!(processes.ended_within(id, Duration::from_secs(10)).await);
    }
    let (fourth, _) = processes
        .start(request(&["sleep", "30"]))
        .expect("room made");
    assert_eq!(
        processes.wait(&first).await.expect_err("evicted").code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        processes.wait(&second).await.expect_err("evicted").code(),
        tonic::Code::NotFound
    );
    // Only running processes left, and the table is full: refused, nothing evicted.
    let (third, _) = processes
        .start(request(&["sleep", "30"]))
        .expect("a third place");
    let err = processes
        .start(request(&["true"]))
        .expect_err("all places taken by running processes");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    for id in [&running, &fourth, &third] {
        processes.signal(id, 9).expect("kill");
        processes.wait(id).await.expect("wait");
    }
}

/// Collects a `RunProcess` stream: the events' kinds in order, both outputs, the exit.
async fn run_events(
    mut stream: ReceiverStream<Result<RunProcessResponse, Status>>,
) -> (
    Vec<&'static str>,
    Vec<u8>,
    Vec<u8>,
    Option<WaitProcessResponse>,
) {
    use vmfactory_protocols::agent::run_process_response::Event;
    let (mut kinds, mut out, mut err, mut exit) = (Vec::new(), Vec::new(), Vec::new(), None);
    while let Some(message) = stream.next().await {
        match message.expect("event").event.expect("an event") {
            Event::Started(_) => kinds.push("started"),
            Event::Stdout(data) => {
                kinds.push("stdout");
                out.extend(data);
            }
            Event::Stderr(data) => {
                kinds.push("stderr");
                err.extend(data);
            }
            Event::Exit(end) => {
                kinds.push("exit");
                exit = Some(end);
            }
        }
    }
    (kinds, out, err, exit)
}

/// Starts `argv` and follows it (`RunProcess`): its exec id, its pid and the stream.
fn start_followed(
    processes: &Arc<Processes>,
    argv: &[&str],
) -> (
    String,
    u32,
    ReceiverStream<Result<RunProcessResponse, Status>>,
) {
    let (exec_id, pid) = processes.start(request(argv)).expect("start");
    let started = ExecProcessResponse {
        exec_id: exec_id.clone(),
        pid,
    };
    (exec_id, pid, processes.follow(started).expect("follow"))
}

#[tokio::test]
async fn a_followed_process_streams_started_output_and_exit_then_is_forgotten() {
    let processes = Arc::new(Processes::default());
    let (exec_id, _, stream) =
        start_followed(&processes, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let (kinds, out, err, exit) = run_events(stream).await;
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"exit"));
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(exit.expect("exit").status, 3);
    assert_eq!(
        processes
            .wait(&exec_id)
            .await
            .expect_err("forgotten")
            .code(),
        tonic::Code::NotFound
    );

    // Something left running in the background keeps the output open: the exit comes
    // after the grace, not when the background process ends.
    let began = std::time::Instant::now();
    let (_, pid, stream) = start_followed(&processes, &["sh", "-c", "sleep 30 & echo hi"]);
    let (kinds, out, _, exit) = run_events(stream).await;
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(out, b"hi\n");
    assert_eq!(kinds.last(), Some(&"exit"));
    assert_eq!(exit.expect("exit").status, 0);
    kill_group(pid, libc::SIGKILL);
}

#[tokio::test]
async fn a_followed_process_whose_reader_goes_away_is_killed_and_forgotten() {
    let processes = Arc::new(Processes::default());
    let (exec_id, pid, mut stream) = start_followed(&processes, &["sleep", "30"]);
    stream.next().await.expect("started").expect("ok");
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while processes.get(&exec_id).is_ok() {
        assert!(std::time::Instant::now() < deadline, "still tracked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reaped: no such process any more.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn a_slow_follower_gets_all_the_output_written_before_the_end() {
    use vmfactory_protocols::agent::run_process_response::Event;
    let processes = Arc::new(Processes::default());
    let (_, _, mut stream) = start_followed(&processes, &["sh", "-c", "head -c 1048576 /dev/zero"]);
    // Up to a pipe, two channels and the chunk in hand wait here after the end: read
    // them more slowly than the grace.
    let (mut bytes, mut exit) = (0, None);
    while let Some(message) = stream.next().await {
        match message.expect("event").event.expect("an event") {
            Event::Stdout(data) => {
                bytes += data.len();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Event::Exit(end) => exit = Some(end.status),
            Event::Started(_) | Event::Stderr(_) => {}
        }
    }
    assert_eq!(bytes, 1 << 20);
    assert_eq!(exit, Some(0));
}

#[tokio::test]
async fn output_that_never_stops_after_the_end_is_followed_for_a_bounded_time() {
    use vmfactory_protocols::agent::run_process_response::Event;
    let processes = Arc::new(Processes::default());
    let (_, pid, mut stream) = start_followed(&processes, &["sh", "-c", "yes & exit 0"]);
    let began = std::time::Instant::now();
    let follow = async {
        let mut exit = None;
        while let Some(message) = stream.next().await {
            if let Event::Exit(end) = message.expect("event").event.expect("an event") {
                exit = Some(end.status);
            }
            // Slower than `yes`: output is waiting at every turn.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        exit
    };
    let exit = tokio::time::timeout(Duration::from_secs(60), follow).await;
    kill_group(pid, libc::SIGKILL);
    let exit = exit.expect("the stream ended");
    assert_eq!(exit, Some(0));
    let took = began.elapsed();
    assert!(took < OUTPUT_CAP + Duration::from_secs(10), "{took:?}");
}
