//! Processes started by `ExecProcess`, by exec id: their pipes or pseudo-terminal,
//! streamed on demand, and their end. Output is never collected in the agent: a stream
//! reads a pipe only as fast as the host takes the chunks (the connection's flow control), so a
//! flooding process blocks on its pipe instead of filling guest memory.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::{debug, warn};
use vmfactory_protocols::agent::{
    ExecProcessRequest, ExecProcessResponse, ProcessInfo, ReadStreamResponse, RunProcessResponse,
    WaitProcessResponse, WriteStreamRequest,
};

use crate::pty;

/// Most processes the agent tracks at once (running, or ended and not yet waited for).
const MAX_PROCESSES: usize = 1024;
/// How long `RunProcess` follows output that stays open after a process's end
/// (something it started in the background holds it) once that output is idle.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long `RunProcess` follows such output at most after the end.
const OUTPUT_CAP: Duration = Duration::from_secs(10);
/// Bytes read from a pipe per streamed chunk.
const CHUNK: usize = 64 << 10;
/// Chunks buffered per stream between the pipe and the connection.
pub const STREAM_DEPTH: usize = 4;
/// Longest exec id accepted.
const MAX_EXEC_ID: usize = 128;
/// Most arguments plus environment variables of one process: with [`MAX_ARG_BYTES`] and
/// a pointer each, within what Linux's `execve` takes (a quarter of the default 8 MiB
/// stack). `xargs`-sized lists fit (4096 did not).
const MAX_ARGS: usize = 65_536;
/// Most bytes of arguments plus environment of one process.
const MAX_ARG_BYTES: usize = 1 << 20;
/// Bytes of argv kept for `ListProcesses`.
const LISTED_ARGV_BYTES: usize = 4096;

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

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Process {
    pid: u32,
    /// Start order, for evicting the oldest ended processes first.
    seq: u64,
    /// The first [`LISTED_ARGV_BYTES`] of its argv.
    argv: Vec<String>,
    stdin: tokio::sync::Mutex<Option<Writer>>,
    stdout: Mutex<Option<Reader>>,
    stderr: Mutex<Option<Reader>>,
    /// The pseudo-terminal's master of a terminal process (for its size and VEOF).
    tty: Option<OwnedFd>,
    exit: watch::Receiver<Option<Exit>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("argv", &self.argv)
            .field("terminal", &self.tty.is_some())
            .finish_non_exhaustive()
    }
}

/// The processes of this agent, shared by every host connection.
#[derive(Debug)]
pub struct Processes {
    table: Mutex<HashMap<String, Arc<Process>>>,
    next_id: AtomicU64,
    next_seq: AtomicU64,
    /// Most processes tracked ([`MAX_PROCESSES`]).
    capacity: usize,
}

impl Default for Processes {
    fn default() -> Self {
        Self::with_capacity(MAX_PROCESSES)
    }
}

/// Ended processes forgotten at once when the table is full.
const EVICT_BATCH: usize = 64;

/// Forgets up to [`EVICT_BATCH`] ended processes of `table`, oldest first. A host that
/// never waited for them (a client that went away) would otherwise fill the table for
/// good.
fn evict_ended(table: &mut HashMap<String, Arc<Process>>) -> usize {
    let mut ended: Vec<(u64, String)> = table
        .iter()
        .filter(|(_, process)| process.exit.borrow().is_some())
        .map(|(id, process)| (process.seq, id.clone()))
        .collect();
    ended.sort_unstable();
    ended.truncate(EVICT_BATCH);
    for (_, id) in &ended {
        table.remove(id);
    }
    ended.len()
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
    let count = request.argv.len() + request.env.len();
    let bytes: usize = request.argv.iter().map(String::len).sum::<usize>()
        + request
            .env
            .iter()
            .map(|var| var.key.len() + var.value.len())
            .sum::<usize>();
    if count > MAX_ARGS || bytes > MAX_ARG_BYTES {
        return Err(Status::invalid_argument(format!(
            "Too many arguments: {count} arguments and variables of {bytes} bytes; at most \
             {MAX_ARGS} of {MAX_ARG_BYTES} bytes fit (pass bulk data on standard input)"
        )));
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

/// A terminal size from a request: 0 means the default, above 65535 is refused.
fn tty_size(rows: u32, cols: u32) -> Result<(u16, u16), Status> {
    let pick = |value: u32, default: u16| match value {
        0 => Ok(default),
        _ => u16::try_from(value).map_err(|_| {
            Status::invalid_argument(format!(
                "Invalid terminal size {rows}x{cols}: rows and columns must be 1 to 65535"
            ))
        }),
    };
    Ok((
        pick(rows, pty::DEFAULT_ROWS)?,
        pick(cols, pty::DEFAULT_COLS)?,
    ))
}

/// The first [`LISTED_ARGV_BYTES`] bytes of `argv`, whole arguments where they fit.
fn listed_argv(argv: &[String]) -> Vec<String> {
    let mut room = LISTED_ARGV_BYTES;
    let mut listed = Vec::new();
    for arg in argv {
        if arg.len() <= room {
            room -= arg.len();
            listed.push(arg.clone());
            continue;
        }
        let mut end = room;
        while !arg.is_char_boundary(end) {
            end -= 1;
        }
        if end > 0 {
            listed.push(arg[..end].to_string());
        }
        break;
    }
    listed
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

/// A started process: cloned without copying the agent, or forked by `Command` (a
/// container's, whose hooks run between fork and exec).
enum Child {
    Cloned(spawn::Spawned),
    Forked(tokio::process::Child),
}

impl Child {
    fn id(&self) -> u32 {
        match self {
            Child::Cloned(child) => child.id(),
            Child::Forked(child) => child.id().unwrap_or(0),
        }
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Child::Cloned(child) => child.wait().await,
            Child::Forked(child) => child.wait().await,
        }
    }
}

/// The standard streams of a child, and the agent's ends of them.
struct Stdio3 {
    /// The child's fds 0, 1 and 2 (close-on-exec here; the child's copies are not).
    child: [OwnedFd; 3],
    tty: Option<OwnedFd>,
    stdin: Option<Writer>,
    stdout: Option<Reader>,
    stderr: Option<Reader>,
}

/// Pipes for a process without a terminal: its standard input one only if asked for
/// (else `/dev/null`).
fn pipe_stdio(stdin: bool) -> std::io::Result<Stdio3> {
    use rustix::pipe::{pipe_with, PipeFlags};
    let (child_in, writer) = if stdin {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
        (
            read,
            Some(Box::new(pipe::Sender::from_owned_fd(write)?) as Writer),
        )
    } else {
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        (null, None)
    };
    let (out_read, out_write) = pipe_with(PipeFlags::CLOEXEC)?;
    let (err_read, err_write) = pipe_with(PipeFlags::CLOEXEC)?;
    Ok(Stdio3 {
        child: [child_in, out_write, err_write],
        tty: None,
        stdin: writer,
        stdout: Some(Box::new(pipe::Receiver::from_owned_fd(out_read)?)),
        stderr: Some(Box::new(pipe::Receiver::from_owned_fd(err_read)?)),
    })
}

/// Opens a pseudo-terminal of the requested size for a terminal process.
fn terminal_stdio(rows: u16, cols: u16) -> Result<Stdio3, Status> {
    let internal = |err: &dyn std::fmt::Display| Status::internal(err.to_string());
    let pair = pty::open(rows, cols).map_err(|err| internal(&err))?;
    let slave = |fd: &OwnedFd| fd.try_clone();
    let child = [
        slave(&pair.slave).map_err(|err| internal(&err))?,
        slave(&pair.slave).map_err(|err| internal(&err))?,
        pair.slave,
    ];
    let reader = pty::nonblocking_dup(&pair.master).map_err(|err| internal(&err))?;
    let writer = pty::nonblocking_dup(&pair.master).map_err(|err| internal(&err))?;
    let reader = pipe::Receiver::from_owned_fd_unchecked(reader).map_err(|err| internal(&err))?;
    let writer = pipe::Sender::from_owned_fd_unchecked(writer).map_err(|err| internal(&err))?;
    Ok(Stdio3 {
        child,
        tty: Some(pair.master),
        stdin: Some(Box::new(writer)),
        stdout: Some(Box::new(reader)),
        stderr: None,
    })
}

/// The PID namespace a process is started in.
pub enum PidNamespace {
    /// A new one: the process is its PID 1 (a container's init).
    New,
    /// The one of this `/proc/<pid>/ns/pid` descriptor (a process joining a container).
    Join(OwnedFd),
}

/// A runs-before-exec step of a child (between `fork` and `exec`: async-signal-safe only).
pub type PreExec = Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>;

/// How a directory is opened to look it up or to pin it: `O_PATH`, no access to its
/// contents needed.
const DIR_LOOKUP: rustix::fs::OFlags = rustix::fs::OFlags::PATH
    .union(rustix::fs::OFlags::DIRECTORY)
    .union(rustix::fs::OFlags::CLOEXEC);

/// The root directory of process `pid` (`/proc/PID/root`), pinned: a [`Launch`]'s
/// `workdir_root`. `None` when the process is gone.
pub fn pin_root(pid: u32) -> Option<OwnedFd> {
    rustix::fs::open(
        format!("/proc/{pid}/root"),
        DIR_LOOKUP,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

/// True when `path` is certainly not a directory: in the agent's own tree, or in the
/// tree `root` (an `O_PATH` descriptor), resolved inside it. Other errors say nothing.
fn directory_missing(root: Option<&OwnedFd>, path: &str) -> bool {
    matches!(
        open_in(root, path, DIR_LOOKUP),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR)
    )
}

/// Opens `path` with `flags`: in `root` (a container's, the path resolved as if `root`
/// were `/`), or in the agent's own view.
fn open_in(
    root: Option<&OwnedFd>,
    path: &str,
    flags: rustix::fs::OFlags,
) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::{Mode, ResolveFlags};
    match root {
        None => rustix::fs::open(path, flags, Mode::empty()),
        Some(root) => {
            let inside = path.trim_start_matches('/');
            let inside = if inside.is_empty() { "." } else { inside };
            rustix::fs::openat2(root, inside, flags, Mode::empty(), ResolveFlags::IN_ROOT)
        }
    }
}

/// True when `path` is a regular file, in `root` (a container's, the path resolved as if
/// it were `/`) or in the agent's own view.
fn regular_file_at(root: Option<&OwnedFd>, path: &str) -> bool {
    use rustix::fs::OFlags;
    open_in(root, path, OFlags::PATH | OFlags::CLOEXEC)
        .and_then(|fd| rustix::fs::fstat(&fd))
        .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file())
}

/// How a process is launched beyond what its request says (containers).
#[derive(Default)]
pub struct Launch {
    /// Program and arguments run instead of the request's argv (which stays the listed
    /// one): the container init is the agent itself.
    pub program: Option<(String, Vec<String>)>,
    /// Start the process in another PID namespace.
    pub pid_ns: Option<PidNamespace>,
    /// Runs in the child after the agent's own steps, before `exec`; the request's workdir
    /// is then the hook's business (it is not applied in the agent's mount namespace).
    pub pre_exec: Option<PreExec>,
    /// With a hook: the root the hook resolves the request's workdir in, opened (`O_PATH`)
    /// before the start: a container init's `/proc/PID/root`, pinned so that it stays that
    /// tree. A failed start then looks there (`RESOLVE_IN_ROOT`, so the container's
    /// absolute symlinks stay in it) to tell a missing working directory from a missing
    /// program.
    pub workdir_root: Option<OwnedFd>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("program", &self.program)
            .field("pid_ns", &self.pid_ns.is_some())
            .field("pre_exec", &self.pre_exec.is_some())
            .field("workdir_root", &self.workdir_root.is_some())
            .finish()
    }
}

/// Spawns `command` on a short-lived thread that first enters `pid_ns` (unshare or
/// setns of `CLONE_NEWPID` applies to the calling thread's next children only, which is
/// allowed in a multithreaded process).
fn spawn_in(
    command: &mut Command,
    pid_ns: Option<PidNamespace>,
) -> std::io::Result<tokio::process::Child> {
    let Some(pid_ns) = pid_ns else {
        return command.spawn();
    };
    let runtime = tokio::runtime::Handle::current();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: unshare/setns with valid flags and an open descriptor affect only
                // this thread's future children.
                let rc = unsafe {
                    match &pid_ns {
                        PidNamespace::New => libc::unshare(libc::CLONE_NEWPID),
                        PidNamespace::Join(fd) => {
                            use std::os::fd::AsRawFd;
                            libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID)
                        }
                    }
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let _entered = runtime.enter();
                command.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("spawn thread panicked")))
    })
}

impl Processes {
    /// A table that tracks at most `capacity` processes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: Mutex::default(),
            next_id: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            capacity,
        }
    }

    /// Starts the process `request` describes; returns its exec id and pid.
    pub fn start(&self, request: ExecProcessRequest) -> Result<(String, u32), Status> {
        self.start_with(request, Launch::default())
    }

    /// Starts the process `request` describes, launched as `launch` says.
    pub fn start_with(
        &self,
        request: ExecProcessRequest,
        mut launch: Launch,
    ) -> Result<(String, u32), Status> {
        validate(&request)?;
        let id = if request.exec_id.is_empty() {
            format!("p{}", self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            request.exec_id.clone()
        };
        {
            let mut table = self.lock()?;
            if table.contains_key(&id) {
                return Err(Status::already_exists(format!("Process {id} exists")));
            }
            if table.len() >= self.capacity {
                let evicted = evict_ended(&mut table);
                if evicted > 0 {
                    warn!(evicted, "The process table was full: forgot the oldest ended processes nobody waited for");
                }
            }
            if table.len() >= self.capacity {
                return Err(Status::resource_exhausted(format!(
                    "{} processes are running: wait for some first",
                    self.capacity
                )));
            }
        }
        let workdir = if request.workdir.is_empty() {
            "/"
        } else {
            &request.workdir
        };
        let stdio = if request.terminal {
            let (rows, cols) = tty_size(request.rows, request.cols)?;
            terminal_stdio(rows, cols)?
        } else {
            pipe_stdio(request.stdin).map_err(|err| Status::internal(err.to_string()))?
        };
        let Stdio3 {
            child: child_fds,
            tty,
            stdin,
            stdout,
            stderr,
        } = stdio;
        let (program, args) = match &launch.program {
            Some((program, args)) => (program.as_str(), args.as_slice()),
            None => (request.argv[0].as_str(), &request.argv[1..]),
        };
        // Without a hook the working directory is entered here, in the VM's mount
        // namespace; with one, the hook enters it. Either way a failed start looks for it
        // where it was entered, to tell a missing directory from a missing program.
        let workdir_here = launch.pre_exec.is_none();
        let workdir_root = launch.workdir_root.take();
        let scope = if workdir_here {
            "the VM"
        } else {
            "the container"
        };
        let requested_workdir = workdir;
        let workdir = if workdir_here { workdir } else { "/" };
        let env = [("PATH", "/bin:/sbin:/usr/bin:/usr/sbin"), ("HOME", "/root")]
            .into_iter()
            .chain(request.terminal.then_some(("TERM", "xterm")))
            .chain(
                request
                    .env
                    .iter()
                    .map(|v| (v.key.as_str(), v.value.as_str())),
            );
        let terminal = request.terminal;
        let spawned = if launch.pre_exec.is_none() && launch.pid_ns.is_none() {
            // A VM's process: cloned without copying the agent (see `spawn`).
            let spawned = spawn::Plan::new(program, args, env, workdir, terminal)
                .and_then(|plan| {
                    let [stdin, stdout, stderr] = &child_fds;
                    plan.spawn([stdin.as_fd(), stdout.as_fd(), stderr.as_fd()])
                })
                .map(Child::Cloned);
            // The agent's copies of the child's ends go now, or reading a pipe or the
            // terminal's master would never end.
            drop(child_fds);
            spawned
        } else {
            let [child_in, child_out, child_err] = child_fds;
            let mut command = Command::new(program);
            command
                .args(args)
                .env_clear()
                .envs(env)
                .current_dir(workdir)
                .stdin(child_in)
                .stdout(child_out)
                .stderr(child_err)
                .kill_on_drop(false);
            // SAFETY: `lead_own_session` makes async-signal-safe system calls only.
            unsafe {
                command.pre_exec(move || lead_own_session(terminal));
            }
            if let Some(hook) = launch.pre_exec {
                // SAFETY: the launch's hook promises async-signal-safe work only.
                unsafe {
                    command.pre_exec(hook);
                }
            }
            // The command, holding the agent's copies of the child's ends, goes at the
            // end of this block.
            spawn_in(&mut command, launch.pid_ns).map(Child::Forked)
        };
        let mut child = spawned.map_err(|err| {
            let missing = if workdir_here {
                directory_missing(None, requested_workdir)
            } else {
                // No pinned root (the init was gone): nothing to say about the directory.
                workdir_root
                    .as_ref()
                    .is_some_and(|root| directory_missing(Some(root), requested_workdir))
            };
            if missing {
                return Status::failed_precondition(format!(
                    "The working directory {requested_workdir:?} does not exist in {scope} (or is not a directory): create it or choose another"
                ));
            }
            let message = format!(
                "Cannot start {:?} in {requested_workdir:?}: {err}",
                request.argv[0]
            );
            let program = &request.argv[0];
            // A program that is there but whose `#!` interpreter or dynamic loader is not
            // fails with the same ENOENT as a missing one.
            let there = program.contains('/') && {
                let path = if program.starts_with('/') {
                    program.clone()
                } else {
                    format!("{}/{program}", requested_workdir.trim_end_matches('/'))
                };
                let root = if workdir_here { None } else { workdir_root.as_ref() };
                (workdir_here || root.is_some()) && regular_file_at(root, &path)
            };
            match err.kind() {
                std::io::ErrorKind::NotFound if there => Status::not_found(format!(
                    "{program:?} is in {scope}, but the interpreter its #! line names (or its \
                     dynamic loader) is not: install it or fix the #! line"
                )),
                std::io::ErrorKind::NotFound => Status::not_found(format!(
                    "{program:?}: command not found in {scope} (looked up in PATH when it has no '/')"
                )),
                std::io::ErrorKind::PermissionDenied => Status::permission_denied(message),
                _ => Status::failed_precondition(message),
            }
        })?;
        let pid = child.id();
        let (exit_tx, exit_rx) = watch::channel(None);
        let process = Arc::new(Process {
            pid,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            argv: listed_argv(&request.argv),
            stdin: tokio::sync::Mutex::new(stdin),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(stderr),
            tty,
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

    /// A stream of `output`'s chunks until the pipe closes. One reader per pipe. The
    /// standard error of a terminal process is its terminal: that stream ends at once.
    pub fn read(
        &self,
        id: &str,
        output: Output,
    ) -> Result<ReceiverStream<Result<ReadStreamResponse, Status>>, Status> {
        let process = self.get(id)?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        if process.tty.is_some() && matches!(output, Output::Stderr) {
            return Ok(ReceiverStream::new(rx));
        }
        let pipe = match output {
            Output::Stdout => take(&process.stdout),
            Output::Stderr => take(&process.stderr),
        };
        let mut pipe = pipe.ok_or_else(|| {
            Status::failed_precondition(format!("The {output:?} of process {id} is already read"))
        })?;
        tokio::spawn(async move {
            loop {
                let mut chunk = vec![0u8; CHUNK];
                // A reader that went away ends this at once, also while the pipe is
                // silent (something in the background holds it open).
                let read = tokio::select! {
                    read = pipe.read(&mut chunk) => read,
                    () = tx.closed() => return,
                };
                let n = match read {
                    Ok(0) => return,
                    // A terminal's master reads EIO once the last slave is closed: the end.
                    Err(err) => {
                        debug!(%err, "Output stream ends");
                        return;
                    }
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

    /// Everything about process `started` as one stream (`RunProcess`): `started`, its
    /// output chunks as read from both pipes, then its exit once it has ended and both
    /// pipes are closed; then it is forgotten. Output still open after the end (something
    /// it started in the background) is followed until it has been idle for
    /// [`OUTPUT_GRACE`], at most [`OUTPUT_CAP`] after the end. When the reader goes away
    /// first, the process's group is killed (nobody could read its output or learn its
    /// end) and it is forgotten all the same.
    pub fn follow(
        self: &Arc<Self>,
        started: ExecProcessResponse,
    ) -> Result<ReceiverStream<Result<RunProcessResponse, Status>>, Status> {
        use vmfactory_protocols::agent::run_process_response::Event;
        let id = started.exec_id.clone();
        let pid = started.pid;
        let opened = self
            .get(&id)
            .and_then(|process| Ok((process, self.read(&id, Output::Stdout)?)))
            .and_then(|(process, out)| Ok((process, out, self.read(&id, Output::Stderr)?)));
        let (process, stdout, stderr) = match opened {
            Ok(opened) => opened,
            Err(status) => {
                kill_group(pid, libc::SIGKILL);
                let processes = Arc::clone(self);
                tokio::spawn(async move { processes.wait(&id).await });
                return Err(status);
            }
        };
        let event = |event| Ok(RunProcessResponse { event: Some(event) });
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        // The channel is empty: there is room for the first message.
        let _ = tx.try_send(event(Event::Started(started)));
        let outputs = stdout
            .map(|chunk| chunk.map(|c| Event::Stdout(c.data)))
            .merge(stderr.map(|chunk| chunk.map(|c| Event::Stderr(c.data))));
        let processes = Arc::clone(self);
        tokio::spawn(async move {
            tokio::pin!(outputs);
            let mut exit = process.exit.clone();
            // After the end: when the output has been idle too long, and when following
            // it must stop anyway.
            let mut after_end: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
            let reader_gone = loop {
                let until_grace_ends = async {
                    match after_end {
                        Some((idle, cap)) => tokio::time::sleep_until(idle.min(cap)).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // Output first: what is ready is sent before any grace is looked at.
                    biased;
                    chunk = outputs.next() => match chunk {
                        Some(Ok(chunk)) => {
                            // Waits while the reader is slow.
                            if tx.send(event(chunk)).await.is_err() {
                                break true;
                            }
                            if let Some((idle, cap)) = &mut after_end {
                                let now = tokio::time::Instant::now();
                                // Output that never stops is ready at every turn: the
                                // cap is looked at here too.
                                if now >= *cap {
                                    break false;
                                }
                                *idle = now + OUTPUT_GRACE;
                            }
                        }
                        Some(Err(_)) | None => break false,
                    },
                    () = async { drop(exit.wait_for(Option::is_some).await) }, if after_end.is_none() => {
                        let now = tokio::time::Instant::now();
                        after_end = Some((now + OUTPUT_GRACE, now + OUTPUT_CAP));
                    }
                    () = until_grace_ends => break false,
                    () = tx.closed() => break true,
                }
            };
            // Both pipes closed (or given up on): the end, unless the reader goes first.
            let ended = if reader_gone {
                None
            } else {
                tokio::select! {
                    ended = exit.wait_for(Option::is_some) => ended.ok().and_then(|e| *e),
                    () = tx.closed() => None,
                }
            };
            if ended.is_none() && exit.borrow().is_none() {
                // Still running with nobody to follow it.
                kill_group(pid, libc::SIGKILL);
            }
            let ended = match ended {
                Some(ended) => Some(ended),
                None => exit.wait_for(Option::is_some).await.ok().and_then(|e| *e),
            };
            processes.forget_this(&id, &process);
            let message = match ended {
                Some(ended) => event(Event::Exit(ended.into())),
                None => Err(Status::internal("Lost the process's exit status")),
            };
            let _ = tx.send(message).await;
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Writes every chunk of `stream` to the standard input of the process its first
    /// message names (a terminal process: types it into the terminal); returns the bytes
    /// written.
    pub async fn write_stdin<S>(&self, mut stream: S) -> Result<u64, Status>
    where
        S: Stream<Item = Result<WriteStreamRequest, Status>> + Unpin + Send,
    {
        let Some(first) = stream.next().await.transpose()? else {
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
            match stream.next().await.transpose()? {
                Some(next) => data = next.data,
                None => return Ok(written),
            }
        }
    }

    /// Closes the standard input of process `id`. A terminal stays open (closing it would
    /// hang up the process): the agent types its end-of-file character (VEOF, normally
    /// Ctrl-D), which a program reading lines sees as end of file, and refuses further
    /// input.
    pub async fn close_stdin(&self, id: &str) -> Result<(), Status> {
        let process = self.get(id)?;
        let mut stdin = process.stdin.lock().await;
        if let (Some(master), Some(writer)) = (&process.tty, stdin.as_mut()) {
            let eof = pty::eof_char(master);
            if let Err(err) = writer.write_all(&[eof]).await {
                debug!(%err, "Cannot type end-of-file into the terminal");
            }
        }
        stdin.take();
        Ok(())
    }

    /// Sets the window size of terminal process `id`.
    pub fn resize(&self, id: &str, rows: u32, cols: u32) -> Result<(), Status> {
        let process = self.get(id)?;
        let Some(master) = &process.tty else {
            return Err(Status::failed_precondition(format!(
                "Process {id} has no terminal: start it with terminal set"
            )));
        };
        if rows == 0 || cols == 0 {
            return Err(Status::invalid_argument(format!(
                "Invalid terminal size {rows}x{cols}: rows and columns must be 1 to 65535"
            )));
        }
        let (rows, cols) = tty_size(rows, cols)?;
        pty::resize(master, rows, cols).map_err(|err| Status::internal(err.to_string()))
    }

    /// The processes tracked now, by exec id.
    pub fn list(&self) -> Result<Vec<ProcessInfo>, Status> {
        let mut list: Vec<ProcessInfo> = self
            .lock()?
            .iter()
            .map(|(id, process)| ProcessInfo {
                exec_id: id.clone(),
                pid: process.pid,
                argv: process.argv.clone(),
                running: process.exit.borrow().is_none(),
                terminal: process.tty.is_some(),
            })
            .collect();
        list.sort_by(|a, b| a.exec_id.cmp(&b.exec_id));
        Ok(list)
    }

    /// Sends `signal` to process `id`.
    pub fn signal(&self, id: &str, signal: u32) -> Result<(), Status> {
        let process = self.get(id)?;
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Status::invalid_argument(format!("Invalid signal {signal}")))?;
        if process.exit.borrow().is_none() {
            // To the group the process leads, so that what it started (`sh -c 'sleep
            // 20; …'`, a pipeline) gets it too; the group exists: the process leads it
            // and is not reaped while `exit` is None. For a terminal process, a keyboard
            // signal goes to the terminal's foreground group instead (a shell's job), as
            // a ^C would; any other (SIGHUP, SIGTERM) to both, as a hang-up reaches the
            // shell and its job.
            let foreground = process
                .tty
                .as_ref()
                .and_then(|tty| rustix::termios::tcgetpgrp(tty).ok())
                .and_then(|pgrp| u32::try_from(pgrp.as_raw_nonzero().get()).ok());
            let keyboard = matches!(signal, libc::SIGINT | libc::SIGQUIT | libc::SIGTSTP);
            match foreground {
                Some(group) if keyboard => kill_group(group, signal),
                Some(group) if group != process.pid => {
                    kill_group(process.pid, signal);
                    kill_group(group, signal);
                }
                _ => kill_group(process.pid, signal),
            }
        }
        Ok(())
    }

    /// The pid of process `id` while it runs.
    pub fn running_pid(&self, id: &str) -> Option<u32> {
        let process = self.get(id).ok()?;
        let running = process.exit.borrow().is_none();
        running.then_some(process.pid)
    }

    /// Waits up to `limit` for process `id` to end (it stays in the table); true if it
    /// has ended or is not tracked.
    pub async fn ended_within(&self, id: &str, limit: Duration) -> bool {
        let Ok(process) = self.get(id) else {
            return true;
        };
        let mut exit = process.exit.clone();
        let ended = tokio::time::timeout(limit, exit.wait_for(Option::is_some))
            .await
            .is_ok();
        ended
    }

    /// Forgets `id` if it is still `process` (another client may have reused the id
    /// once `process` was waited for).
    fn forget_this(&self, id: &str, process: &Arc<Process>) {
        if let Ok(mut table) = self.lock() {
            if table.get(id).is_some_and(|held| Arc::ptr_eq(held, process)) {
                table.remove(id);
            }
        }
    }

    /// Forgets process `id` (ended or not).
    pub fn forget(&self, id: &str) {
        if let Ok(mut table) = self.lock() {
            table.remove(id);
        }
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

/// A new child's own steps before `exec`, however it was made: it leads a new session
/// and process group, so a timeout or a signal reaches everything it starts; a terminal
/// process takes its terminal (already its fd 0) as controlling terminal; and its
/// `oom_score_adj` goes back to 0 (the agent runs at -1000). Only raw system calls on
/// static data: no libc wrapper that looks at the thread a `CLONE_VM` child shares with
/// its parent, nothing that allocates.
fn lead_own_session(terminal: bool) -> std::io::Result<()> {
    // SAFETY: plain system calls with constant arguments, a NUL-terminated static path
    // and a static buffer; the descriptor is closed before returning.
    unsafe {
        if libc::syscall(libc::SYS_setsid) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if terminal && libc::syscall(libc::SYS_ioctl, 0, libc::TIOCSCTTY, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let _ = libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1usize);
            let _ = libc::syscall(libc::SYS_close, fd);
        }
    }
    Ok(())
}

mod spawn;

#[cfg(test)]
mod tests;
