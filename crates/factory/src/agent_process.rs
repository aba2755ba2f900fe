//! Guest processes through the agent: start one (on pipes or on a pseudo-terminal),
//! stream its output as it is produced, feed its input, resize its terminal, signal it,
//! wait for it, list them (Kata's `ExecProcess`, `ReadStdout`, `WriteStdin`,
//! `CloseStdin`, `TtyWinResize`, `SignalProcess`, `WaitProcess`, `ListProcesses`), and
//! [`AgentClient::exec`], which does all of it for a command whose output fits in memory.

use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::Streaming;
use vmfactory_protocols::agent::run_process_response::Event;
use vmfactory_protocols::agent::{
    CloseStdinRequest, EnvVar, ExecProcessRequest, ListProcessesRequest, ReadStreamRequest,
    ReadStreamResponse, RunProcessResponse, SignalProcessRequest, TtyWinResizeRequest,
    WaitProcessRequest, WaitProcessResponse, WriteStreamRequest,
};

use crate::agent_client::{rpc_error, AgentClient, AgentError};

/// Output [`AgentClient::exec`] keeps per stream; the rest is read and dropped.
pub const MAX_EXEC_OUTPUT: usize = 128 << 20;

/// A process to start in the guest.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up in the guest's PATH.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest ("" = "/").
    pub workdir: String,
    /// Give it a standard input pipe (fed with [`AgentClient::write_stdin`]).
    pub stdin: bool,
    /// The agent kills it (and its process group) after this long.
    pub timeout: Option<Duration>,
    /// Run it on a new pseudo-terminal of this size: the terminal is its standard input,
    /// output and error, [`OutputPipe::Stderr`] is empty, [`AgentClient::write_stdin`]
    /// types into the terminal and [`AgentClient::close_stdin`] types end-of-file (VEOF).
    pub terminal: Option<TtySize>,
    /// Run it in this container ("" = in the VM itself); see `agent_container`.
    pub container_id: String,
    /// In a container: "uid[:gid]" or a user name of the image ("" = root).
    pub user: String,
}

/// The size of a terminal, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A process the agent tracks (running, or ended and not yet waited for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its exec id.
    pub exec_id: String,
    /// Its pid in the guest.
    pub pid: u32,
    /// Its argv (the first 4 KiB of it).
    pub argv: Vec<String>,
    /// It is still running.
    pub running: bool,
    /// It runs on a pseudo-terminal.
    pub terminal: bool,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout expired.
    pub timed_out: bool,
}

impl ProcessExit {
    /// The exit status a shell would report: the code, or 128 + the signal.
    pub fn shell_status(&self) -> u8 {
        match (self.exit_code, self.signal) {
            (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
            (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(1),
            (None, None) => 1,
        }
    }
}

/// Which output of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One output of a guest process, chunk by chunk as the guest produces it.
#[derive(Debug)]
pub struct OutputStream {
    inner: Streaming<ReadStreamResponse>,
}

impl OutputStream {
    /// The next chunk; `None` once the process closed the pipe.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        match self.inner.message().await {
            Ok(Some(chunk)) => Ok(Some(chunk.data)),
            Ok(None) => Ok(None),
            Err(status) => Err(AgentError::Rpc {
                rpc: "ReadStdout",
                status,
            }),
        }
    }
}

/// What a process followed with [`AgentClient::run_process`] does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// A chunk of its standard output (its terminal's output, for a terminal process).
    Stdout(Vec<u8>),
    /// A chunk of its standard error.
    Stderr(Vec<u8>),
    /// How it ended: the last event.
    Exit(ProcessExit),
}

/// A process started with [`AgentClient::run_process`], followed as it runs.
#[derive(Debug)]
pub struct RunningProcess {
    /// Its exec id (for input, signals and its terminal's size).
    pub exec_id: String,
    /// Its pid in the guest.
    pub pid: u32,
    events: Streaming<RunProcessResponse>,
    ended: bool,
}

impl RunningProcess {
    /// The next event; `None` after [`ProcessEvent::Exit`]. A stream that ends before the
    /// exit is an error.
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>, AgentError> {
        if self.ended {
            return Ok(None);
        }
        let message = self
            .events
            .message()
            .await
            .map_err(rpc_error("RunProcess"))?;
        let event = match message.and_then(|m| m.event) {
            Some(Event::Stdout(data)) => ProcessEvent::Stdout(data),
            Some(Event::Stderr(data)) => ProcessEvent::Stderr(data),
            Some(Event::Exit(exit)) => {
                self.ended = true;
                ProcessEvent::Exit(exit.into())
            }
            Some(Event::Started(_)) | None => return Err(no_exit()),
        };
        Ok(Some(event))
    }
}

/// A `RunProcess` stream that broke off before the process's exit.
fn no_exit() -> AgentError {
    AgentError::Rpc {
        rpc: "RunProcess",
        status: tonic::Status::internal(
            "The agent's process stream ended without the process's exit",
        ),
    }
}

impl From<WaitProcessResponse> for ProcessExit {
    fn from(response: WaitProcessResponse) -> Self {
        ProcessExit {
            exit_code: (response.signal == 0).then_some(response.status),
            signal: (response.signal != 0).then_some(response.signal),
            timed_out: response.timed_out,
        }
    }
}

/// A command run to completion with [`AgentClient::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest ("" = "/").
    pub workdir: String,
    /// Standard input bytes.
    pub stdin: Vec<u8>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
}

/// What a command run with [`AgentClient::exec`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the command, when it was killed.
    pub signal: Option<i32>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// The command was killed because its timeout expired.
    pub timed_out: bool,
    /// Output beyond [`MAX_EXEC_OUTPUT`] was dropped.
    pub truncated: bool,
}

impl AgentClient {
    /// Starts a process; returns its exec id. Its output waits in the guest's pipes until
    /// [`AgentClient::output`] streams it.
    pub async fn start_process(&self, spec: ProcessSpec) -> Result<String, AgentError> {
        let request = exec_request(spec);
        let response = self
            .inner
            .clone()
            .exec_process(request)
            .await
            .map_err(rpc_error("ExecProcess"))?;
        Ok(response.into_inner().exec_id)
    }

    /// Streams one output of process `id` (one reader per output).
    pub async fn output(&self, id: &str, pipe: OutputPipe) -> Result<OutputStream, AgentError> {
        let request = ReadStreamRequest {
            exec_id: id.to_string(),
        };
        let mut client = self.inner.clone();
        let inner = match pipe {
            OutputPipe::Stdout => client.read_stdout(request).await,
            OutputPipe::Stderr => client.read_stderr(request).await,
        }
        .map_err(rpc_error("ReadStdout"))?
        .into_inner();
        Ok(OutputStream { inner })
    }

    /// Writes `chunks` to the standard input of process `id`; returns the bytes written.
    pub async fn write_stdin(
        &self,
        id: &str,
        chunks: impl Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<u64, AgentError> {
        let id = id.to_string();
        let mut first = true;
        let requests = chunks.map(move |data| WriteStreamRequest {
            exec_id: if std::mem::take(&mut first) {
                id.clone()
            } else {
                String::new()
            },
            data,
        });
        let response = self
            .inner
            .clone()
            .write_stdin(requests)
            .await
            .map_err(rpc_error("WriteStdin"))?;
        Ok(response.into_inner().len)
    }

    /// Closes the standard input of process `id`.
    pub async fn close_stdin(&self, id: &str) -> Result<(), AgentError> {
        let request = CloseStdinRequest {
            exec_id: id.to_string(),
        };
        self.inner
            .clone()
            .close_stdin(request)
            .await
            .map_err(rpc_error("CloseStdin"))?;
        Ok(())
    }

    /// Sets the terminal size of process `id` (started with [`ProcessSpec::terminal`]); the
    /// guest kernel sends SIGWINCH to its foreground process group.
    pub async fn resize_tty(&self, id: &str, rows: u16, cols: u16) -> Result<(), AgentError> {
        let request = TtyWinResizeRequest {
            exec_id: id.to_string(),
            rows: u32::from(rows),
            cols: u32::from(cols),
        };
        self.inner
            .clone()
            .tty_win_resize(request)
            .await
            .map_err(rpc_error("TtyWinResize"))?;
        Ok(())
    }

    /// The processes the agent tracks, sorted by exec id.
    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, AgentError> {
        let response = self
            .inner
            .clone()
            .list_processes(ListProcessesRequest {})
            .await
            .map_err(rpc_error("ListProcesses"))?
            .into_inner();
        Ok(response
            .processes
            .into_iter()
            .map(|info| ProcessInfo {
                exec_id: info.exec_id,
                pid: info.pid,
                argv: info.argv,
                running: info.running,
                terminal: info.terminal,
            })
            .collect())
    }

    /// Sends `signal` to process `id`.
    pub async fn signal_process(&self, id: &str, signal: i32) -> Result<(), AgentError> {
        let request = SignalProcessRequest {
            exec_id: id.to_string(),
            signal: u32::try_from(signal).unwrap_or(0),
        };
        self.inner
            .clone()
            .signal_process(request)
            .await
            .map_err(rpc_error("SignalProcess"))?;
        Ok(())
    }

    /// Waits until process `id` has ended.
    pub async fn wait_process(&self, id: &str) -> Result<ProcessExit, AgentError> {
        let request = WaitProcessRequest {
            exec_id: id.to_string(),
        };
        let response = self
            .inner
            .clone()
            .wait_process(request)
            .await
            .map_err(rpc_error("WaitProcess"))?
            .into_inner();
        Ok(response.into())
    }

    /// Starts a process and follows it in one call (`RunProcess`): one round trip to the
    /// guest instead of four calls, two of them after the start. Its input, signals and
    /// terminal size go through [`AgentClient::write_stdin`] and the others with
    /// [`RunningProcess::exec_id`]; dropping the [`RunningProcess`] before its exit kills
    /// it. `None` when the agent (or the supervisor in front of it) predates
    /// `RunProcess`: then [`AgentClient::start_process`], [`AgentClient::output`] and
    /// [`AgentClient::wait_process`] do the same.
    pub async fn run_process(
        &self,
        spec: ProcessSpec,
    ) -> Result<Option<RunningProcess>, AgentError> {
        let mut events = match self.inner.clone().run_process(exec_request(spec)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(status) => return Err(rpc_error("RunProcess")(status)),
        };
        let first = events.message().await.map_err(rpc_error("RunProcess"))?;
        match first.and_then(|m| m.event) {
            Some(Event::Started(started)) => Ok(Some(RunningProcess {
                exec_id: started.exec_id,
                pid: started.pid,
                events,
                ended: false,
            })),
            _ => Err(AgentError::Rpc {
                rpc: "RunProcess",
                status: tonic::Status::internal(
                    "The agent's process stream did not begin with the process's start",
                ),
            }),
        }
    }

    /// Runs a command to completion and collects its output (up to [`MAX_EXEC_OUTPUT`]
    /// per stream).
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, AgentError> {
        self.exec_in(request, String::new(), String::new()).await
    }

    /// [`AgentClient::exec`] in container `container_id` ("" = the VM) as `user`.
    pub(crate) async fn exec_in(
        &self,
        request: ExecRequest,
        container_id: String,
        user: String,
    ) -> Result<ExecOutput, AgentError> {
        let spec = ProcessSpec {
            argv: request.argv,
            env: request.env,
            workdir: request.workdir,
            stdin: !request.stdin.is_empty(),
            timeout: request.timeout,
            terminal: None,
            container_id,
            user,
        };
        let Some(mut running) = self.run_process(spec.clone()).await? else {
            return self.exec_in_steps(spec, request.stdin).await;
        };
        let id = running.exec_id.clone();
        // Owns the stream: once this ends, with an error too, the stream is gone.
        let follow = async move {
            let (mut stdout, mut stderr) = (Kept::default(), Kept::default());
            loop {
                match running.next_event().await? {
                    Some(ProcessEvent::Stdout(chunk)) => stdout.keep(&chunk),
                    Some(ProcessEvent::Stderr(chunk)) => stderr.keep(&chunk),
                    Some(ProcessEvent::Exit(exit)) => {
                        return Ok::<_, AgentError>((stdout, stderr, exit))
                    }
                    // Not before the exit, which returned above.
                    None => return Err(no_exit()),
                }
            }
        };
        let feed = self.feed(&id, &request.stdin);
        tokio::pin!(follow, feed);
        let mut fed = false;
        let followed = loop {
            tokio::select! {
                followed = &mut follow => break followed,
                () = &mut feed, if !fed => fed = true,
            }
        };
        // After the end, input still being written (something the command left behind
        // holds its input without reading) gets a moment, then is dropped.
        if !fed {
            let _ = tokio::time::timeout(FEED_AFTER_EXIT, feed).await;
        }
        match followed {
            Ok((stdout, stderr, exit)) => Ok(exec_output(stdout, stderr, exit)),
            Err(err) => {
                self.abandon(&id).await;
                Err(err)
            }
        }
    }

    /// Writes `stdin` (if any) to process `id` and closes its input. A command that does
    /// not read its input may exit before taking it all: that is only logged.
    async fn feed(&self, id: &str, stdin: &[u8]) {
        if stdin.is_empty() {
            return;
        }
        let chunks: Vec<Vec<u8>> = stdin.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        let fed = match self.write_stdin(id, tokio_stream::iter(chunks)).await {
            Ok(_) => self.close_stdin(id).await,
            Err(err) => Err(err),
        };
        if let Err(err) = fed {
            tracing::debug!(%err, "Standard input not fully written");
        }
    }

    /// [`AgentClient::exec_in`] for an agent without `RunProcess`: start, read both
    /// outputs, wait.
    async fn exec_in_steps(
        &self,
        spec: ProcessSpec,
        stdin: Vec<u8>,
    ) -> Result<ExecOutput, AgentError> {
        let id = self.start_process(spec).await?;
        let collected = async {
            let mut stdout = self.output(&id, OutputPipe::Stdout).await?;
            let mut stderr = self.output(&id, OutputPipe::Stderr).await?;
            let ((), out, err) = tokio::join!(
                self.feed(&id, &stdin),
                collect(&mut stdout),
                collect(&mut stderr)
            );
            Ok::<_, AgentError>((out?, err?))
        }
        .await;
        let (stdout, stderr) = match collected {
            Ok(collected) => collected,
            Err(err) => {
                self.abandon(&id).await;
                return Err(err);
            }
        };
        let exit = self.wait_process(&id).await?;
        Ok(exec_output(stdout, stderr, exit))
    }
}

impl AgentClient {
    /// Kills process `id` and waits for it (best effort, bounded), so the agent forgets
    /// it: an exec whose output could not be read must not keep its place in the agent's
    /// process table (1024 places).
    async fn abandon(&self, id: &str) {
        let _ = self.signal_process(id, libc::SIGKILL).await;
        if tokio::time::timeout(ABANDON_WAIT, self.wait_process(id))
            .await
            .is_err()
        {
            tracing::debug!(id, "An abandoned process was not reaped in time");
        }
    }
}

/// What [`AgentClient::exec`] returns for a command that ended as `exit`.
fn exec_output(stdout: Kept, stderr: Kept, exit: ProcessExit) -> ExecOutput {
    ExecOutput {
        exit_code: exit.exit_code,
        signal: exit.signal,
        truncated: stdout.truncated || stderr.truncated,
        stdout: stdout.data,
        stderr: stderr.data,
        timed_out: exit.timed_out,
    }
}

/// The agent's request for `spec`.
pub(crate) fn exec_request(spec: ProcessSpec) -> ExecProcessRequest {
    ExecProcessRequest {
        argv: spec.argv,
        env: spec
            .env
            .into_iter()
            .map(|(key, value)| EnvVar { key, value })
            .collect(),
        workdir: spec.workdir,
        timeout_ms: spec
            .timeout
            .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        exec_id: String::new(),
        stdin: spec.stdin,
        terminal: spec.terminal.is_some(),
        rows: spec.terminal.map_or(0, |size| u32::from(size.rows)),
        cols: spec.terminal.map_or(0, |size| u32::from(size.cols)),
        container_id: spec.container_id,
        user: spec.user,
    }
}

/// How long [`AgentClient::exec`] goes on writing input after the command's end.
const FEED_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How long [`AgentClient::abandon`] waits for a killed process.
const ABANDON_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Output kept by [`AgentClient::exec`]: up to [`MAX_EXEC_OUTPUT`] bytes.
#[derive(Debug, Default)]
struct Kept {
    data: Vec<u8>,
    truncated: bool,
}

impl Kept {
    fn keep(&mut self, chunk: &[u8]) {
        let room = MAX_EXEC_OUTPUT.saturating_sub(self.data.len());
        self.truncated |= chunk.len() > room;
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// Reads `stream` to its end, keeping up to [`MAX_EXEC_OUTPUT`] bytes.
async fn collect(stream: &mut OutputStream) -> Result<Kept, AgentError> {
    let mut kept = Kept::default();
    while let Some(chunk) = stream.next_chunk().await? {
        kept.keep(&chunk);
    }
    Ok(kept)
}
