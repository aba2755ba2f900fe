//! Processes started by `ExecProcess`, by exec id: their pipes, streamed on demand, and
//! their end. Output is never collected in the agent: a stream reads a pipe only as fast
//! as the host takes the chunks (HTTP/2 flow control), so a flooding process blocks on
//! its pipe instead of filling guest memory.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use vmfactory_protocols::agent::{
    ExecProcessRequest, ReadStreamResponse, WaitProcessResponse, WriteStreamRequest,
};

/// Most processes the agent tracks at once (running, or ended and not yet waited for).
const MAX_PROCESSES: usize = 1024;
/// Bytes read from a pipe per streamed chunk.
const CHUNK: usize = 64 << 10;
/// Chunks buffered per stream between the pipe and the connection.
const STREAM_DEPTH: usize = 4;
/// Longest exec id accepted.
const MAX_EXEC_ID: usize = 128;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code; -1 when killed by a signal.
    pub status: i32,
    /// The signal that killed it; 0 when it exited.
    pub signal: i32,
    /// Killed because its timeout expired.
    pub timed_out: bool,
}

impl From<Exit> for WaitProcessResponse {
    fn from(exit: Exit) -> Self {
        Self {
            status: exit.status,
            signal: exit.signal,
            timed_out: exit.timed_out,
        }
    }
}

/// Which output pipe.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

#[derive(Debug)]
struct Process {
    pid: u32,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    stdout: Mutex<Option<ChildStdout>>,
    stderr: Mutex<Option<ChildStderr>>,
    exit: watch::Receiver<Option<Exit>>,
}

/// The processes of this agent, shared by every host connection.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<HashMap<String, Arc<Process>>>,
    next_id: AtomicU64,
}

fn validate(request: &ExecProcessRequest) -> Result<(), Status> {
    let Some(program) = request.argv.first() else {
        return Err(Status::invalid_argument(
            "argv is empty: give a command to run",
        ));
    };
    if program.is_empty() {
        return Err(Status::invalid_argument("argv[0] is empty"));
    }
    if request.argv.iter().any(|arg| arg.contains('\0')) {
        return Err(Status::invalid_argument("An argument contains a NUL byte"));
    }
    for var in &request.env {
        if var.key.is_empty() || var.key.contains(['=', '\0']) || var.value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "Invalid environment variable {:?}: the name must be non-empty without '=' or NUL",
                var.key
            )));
        }
    }
    if request.workdir.contains('\0') {
        return Err(Status::invalid_argument("workdir contains a NUL byte"));
    }
    let id = &request.exec_id;
    if id.len() > MAX_EXEC_ID
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Status::invalid_argument(format!(
            "Invalid exec_id: at most {MAX_EXEC_ID} letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Takes what `slot` holds.
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().ok().and_then(|mut held| held.take())
}

/// Kills the process group `pgid` (every process started by `ExecProcess` leads one).
fn kill_group(pgid: u32, signal: i32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        // SAFETY: kill with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

impl Processes {
    /// Starts the process `request` describes; returns its exec id and pid.
    pub fn start(&self, request: ExecProcessRequest) -> Result<(String, u32), Status> {
        validate(&request)?;
        let id = if request.exec_id.is_empty() {
            format!("p{}", self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            request.exec_id.clone()
        };
        {
            let table = self.lock()?;
            if table.contains_key(&id) {
                return Err(Status::already_exists(format!("Process {id} exists")));
            }
            if table.len() >= MAX_PROCESSES {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_PROCESSES} processes are tracked: wait for some first"
                )));
            }
        }
        let workdir = if request.workdir.is_empty() {
            "/"
        } else {
            &request.workdir
        };
        let mut command = Command::new(&request.argv[0]);
        command
            .args(&request.argv[1..])
            .env_clear()
            .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
            .env("HOME", "/root")
            .envs(request.env.iter().map(|v| (&v.key, &v.value)))
            .current_dir(workdir)
            .stdin(if request.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: setsid, open, write and close are async-signal-safe; the child leads a
        // new process group, so a timeout or a signal can reach everything it started, and
        // does not inherit the agent's exemption from the OOM killer.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                reset_oom_score_adj();
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|err| {
            let message = format!("Cannot start {:?} in {workdir:?}: {err}", request.argv[0]);
            match err.kind() {
                std::io::ErrorKind::NotFound => Status::not_found(message),
                std::io::ErrorKind::PermissionDenied => Status::permission_denied(message),
                _ => Status::failed_precondition(message),
            }
        })?;
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit_rx) = watch::channel(None);
        let process = Arc::new(Process {
            pid,
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            stdout: Mutex::new(child.stdout.take()),
            stderr: Mutex::new(child.stderr.take()),
            exit: exit_rx,
        });
        let limit = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
        tokio::spawn(async move {
            let mut timed_out = false;
            let status = match limit {
                Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        timed_out = true;
                        kill_group(pid, libc::SIGKILL);
                        child.wait().await
                    }
                },
                None => child.wait().await,
            };
            let exit = match status {
                Ok(status) => Exit {
                    status: status.code().unwrap_or(-1),
                    signal: status.signal().unwrap_or(0),
                    timed_out,
                },
                Err(_) => Exit {
                    status: -1,
                    signal: 0,
                    timed_out,
                },
            };
            let _ = exit_tx.send(Some(exit));
        });
        self.lock()?.insert(id.clone(), process);
        Ok((id, pid))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>>, Status> {
        self.table
            .lock()
            .map_err(|_| Status::internal("Process table poisoned"))
    }

    fn get(&self, id: &str) -> Result<Arc<Process>, Status> {
        self.lock()?
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("No process {id:?}")))
    }

    /// A stream of `output`'s chunks until the pipe closes. One reader per pipe.
    pub fn read(
        &self,
        id: &str,
        output: Output,
    ) -> Result<ReceiverStream<Result<ReadStreamResponse, Status>>, Status> {
        let process = self.get(id)?;
        let pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> = match output {
            Output::Stdout => take(&process.stdout).map(|p| Box::new(p) as _),
            Output::Stderr => take(&process.stderr).map(|p| Box::new(p) as _),
        };
        let pipe = pipe.ok_or_else(|| {
            Status::failed_precondition(format!("The {output:?} of process {id} is already read"))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        tokio::spawn(async move {
            let mut pipe = pipe;
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let n = match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                chunk.truncate(n);
                // Waits while the host is slow; ends when it hung up.
                if tx
                    .send(Ok(ReadStreamResponse { data: chunk }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Writes every chunk of `stream` to the standard input of the process its first
    /// message names; returns the bytes written.
    pub async fn write_stdin(
        &self,
        mut stream: Streaming<WriteStreamRequest>,
    ) -> Result<u64, Status> {
        let Some(first) = stream.message().await? else {
            return Ok(0);
        };
        let process = self.get(&first.exec_id)?;
        let mut stdin = process.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(Status::failed_precondition(format!(
                "Process {} has no open standard input",
                first.exec_id
            )));
        };
        let mut written = 0u64;
        let mut data = first.data;
        loop {
            // A process that stopped reading closed the pipe: report what got through.
            if pipe.write_all(&data).await.is_err() {
                return Ok(written);
            }
            written += data.len() as u64;
            match stream.message().await? {
                Some(next) => data = next.data,
                None => return Ok(written),
            }
        }
    }

    /// Closes the standard input of process `id`.
    pub async fn close_stdin(&self, id: &str) -> Result<(), Status> {
        let process = self.get(id)?;
        process.stdin.lock().await.take();
        Ok(())
    }

    /// Sends `signal` to process `id`.
    pub fn signal(&self, id: &str, signal: u32) -> Result<(), Status> {
        let process = self.get(id)?;
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Status::invalid_argument(format!("Invalid signal {signal}")))?;
        if process.exit.borrow().is_none() {
            let pid = i32::try_from(process.pid)
                .map_err(|_| Status::internal("Process id out of range"))?;
            // SAFETY: signals the child we started; it is not reaped while `exit` is None,
            // so its pid cannot have been reused.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        Ok(())
    }

    /// Waits until process `id` has ended, then forgets it.
    pub async fn wait(&self, id: &str) -> Result<Exit, Status> {
        let process = self.get(id)?;
        let mut exit = process.exit.clone();
        let ended = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("Lost the process's exit status"))?
            .unwrap_or(Exit {
                status: -1,
                signal: 0,
                timed_out: false,
            });
        self.lock()?.remove(id);
        Ok(ended)
    }
}

/// Sets this process's `oom_score_adj` back to 0 (the agent runs at -1000): for a child
/// between `fork` and `exec`, so only async-signal-safe calls on static data.
fn reset_oom_score_adj() {
    // SAFETY: a NUL-terminated static path; the descriptor is closed before returning;
    // open, write and close are async-signal-safe.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
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

    /// The agent runs at `oom_score_adj` -1000; what it starts for users runs at 0.
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
}
