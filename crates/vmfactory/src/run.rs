//! `vmfactory run`: one command in a fresh VM, its output streamed to ours as it is
//! produced, our standard input passed on, its exit status ours. Every way out (the
//! command's end, `--timeout`, SIGINT/SIGTERM/SIGHUP, a closed output pipe, an error)
//! throws the VM away.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;
use vmfactory_factory::{
    AgentClient, AgentError, FactoryChoice, OutputPipe, OutputStream, ProcessEvent, ProcessExit,
    ProcessSpec, RunningProcess, Settings, TtySize, Vm,
};
use vmfactory_hypervisor::HypervisorError;

use crate::{factory, parse_env, terminal, VmArgs};

/// Message of the `-v` log line with a run's phase timings.
pub const RUN_TIMING: &str = "Run timing";
/// Exit status when the guest command hit `--timeout`.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the command cannot be executed (permission denied), as shells.
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit status when the command does not exist, as shells and `docker run`.
const EXIT_NOT_FOUND: u8 = 127;
/// Exit status when our standard output or error was closed (128 + SIGPIPE).
pub(crate) const EXIT_BROKEN_PIPE: u8 = 141;
/// How long the host waits beyond `--timeout` for the guest to report the kill.
const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// How long a failed command waits for its VM's end to be noticed, so that the error names
/// the VM's end instead of the broken connection that announced it.
const DEATH_GRACE: Duration = Duration::from_secs(1);
/// How long output may keep flowing after the command exited (a background process it
/// left behind may hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// Bytes of our standard input sent per chunk.
const STDIN_CHUNK: usize = 64 << 10;

/// Options of `vmfactory run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Kill the command after this many seconds (whole seconds, at least 1; exit status
    /// 124).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<u64>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest, an absolute path (default: the image's
    /// WorkingDir, else /).
    #[arg(short, long, value_parser = parse_workdir)]
    workdir: Option<String>,
    /// Pass our standard input to the command even when it is a terminal (it always is
    /// passed when it is a pipe or a file).
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal (a pseudo-terminal in the guest; ours in raw mode,
    /// its size sent at start and on every resize). `-it` is an interactive shell. Our
    /// input must be a terminal (or /dev/null): to pipe input, leave out -t.
    #[arg(short, long)]
    tty: bool,
    /// Run the command in a container of this image: a root filesystem directory, an OCI
    /// image layout (directory or tar) or a `docker save` archive. Its disk is built once
    /// and cached (`vmfactory image ls`), hot-plugged read-only into the VM and mounted
    /// under a writable overlay. Without a command, runs the image's Entrypoint + Cmd.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Size of the container's writable layer (a tmpfs in the guest: what is written
    /// there takes guest memory): MiB, or e.g. 512M, 2G (default: 256 MiB).
    #[arg(long, value_parser = crate::container::parse_disk_size, requires = "image")]
    disk_size: Option<u32>,
    /// The command and its arguments (after `--`); optional with --image.
    #[arg(required_unless_present = "image", last = true)]
    command: Vec<String>,
}

/// Longest `--timeout`: a year. A command that may run longer needs none.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// `--timeout` of `run` and `sandbox exec`: whole seconds, 1 to [`MAX_TIMEOUT_SECS`].
pub(crate) fn parse_timeout(value: &str) -> Result<u64, String> {
    let seconds: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number of seconds (e.g. --timeout 30)"))?;
    match seconds {
        0 => Err("must be at least 1 second (leave out --timeout for no limit)".into()),
        seconds if seconds > MAX_TIMEOUT_SECS => Err(format!(
            "at most {MAX_TIMEOUT_SECS} seconds (a year; leave out --timeout for no limit)"
        )),
        seconds => Ok(seconds),
    }
}

/// `--workdir` of `run` and `sandbox exec`: an absolute guest path, as `docker run -w`
/// wants, so that a mistake is refused before a VM is started.
pub(crate) fn parse_workdir(value: &str) -> Result<String, String> {
    if value.starts_with('/') {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not an absolute path: the working directory in the guest starts \
             with / (e.g. /root)"
        ))
    }
}

impl RunArgs {
    /// The options describing the VM.
    #[cfg(test)]
    pub(crate) fn vm_args(&self) -> &VmArgs {
        &self.vm
    }
}

/// Name of the container `run --image` makes in its VM.
const RUN_CONTAINER: &str = "run";

/// Why `run` ends early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// A signal arrived (its number).
    Signal(i32),
}

/// SIGINT, SIGTERM and SIGHUP, each ending the run with 128 + its number.
pub(crate) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("Cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("Cannot handle SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("Cannot handle SIGHUP")?,
        })
    }

    pub(crate) async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.int.recv() => Stop::Signal(libc::SIGINT),
            _ = self.term.recv() => Stop::Signal(libc::SIGTERM),
            _ = self.hup.recv() => Stop::Signal(libc::SIGHUP),
        }
    }
}

pub(crate) fn signal_exit(stop: Stop) -> ExitCode {
    let Stop::Signal(number) = stop;
    eprintln!("vmfactory: interrupted");
    ExitCode::from(u8::try_from(128 + number).unwrap_or(1))
}

/// Runs `vmfactory run`.
pub async fn run(args: RunArgs, config_file: Option<PathBuf>) -> Result<ExitCode> {
    if args.image.is_none() {
        check_command(&args.command)?;
    }
    check_terminal_input(args.tty)?;
    let started = Instant::now();
    let mut signals = Signals::install()?;
    let vm_args = args.vm.clone();
    let resolved = tokio::task::spawn_blocking(move || {
        let settings = Settings::load(config_file.as_deref())?;
        let choice = FactoryChoice::from_settings(&settings.factory);
        vm_args.resolve(config_file.as_deref(), choice.needs_local_config())
    })
    .await
    .context("Preparing the VM failed")??;
    let resolved_at = started.elapsed();
    let mut opened = None;
    reap_orphans(&resolved.base.qemu.runtime_dir);

    // The image's disk is found (or built) while the VM is being got, and its process
    // (its command, environment, user) worked out as soon as the image is there: a
    // missing image or command is refused without waiting for the VM.
    let prepare_process = async {
        let Some(reference) = args.image.clone() else {
            return Ok(None);
        };
        let cache_dir = args.vm.image.cache_dir.clone();
        let image =
            tokio::task::spawn_blocking(move || crate::container::prepare(cache_dir, &reference))
                .await
                .context("Preparing the image failed")??;
        let process = crate::container::ContainerProcess::new(
            &image.config,
            &args.command,
            &args.env,
            args.workdir.as_deref(),
        )?;
        Ok(Some((image, process)))
    };
    // Dropping a VM that is still starting kills it and removes its directory.
    let (vm, prepared) = tokio::select! {
        got = vm_and_image(factory::get_vm(&resolved, &mut opened), prepare_process) => got?,
        stop = signals.recv() => return Ok(signal_exit(stop)),
    };
    let got_vm_at = started.elapsed();
    let (process, container) = match prepared {
        Some((image, process)) => {
            let spec = crate::container::pause_container(
                RUN_CONTAINER,
                &image,
                args.disk_size.unwrap_or(0),
            );
            // The container and its disk go with the VM, which `run` discards at the end.
            let container = tokio::select! {
                container = vm.run_container(&image.disk, &spec) => container,
                stop = signals.recv() => {
                    let _ = vm.discard().await;
                    return Ok(signal_exit(stop));
                }
            };
            if let Err(err) = container {
                let _ = vm.discard().await;
                return Err(err).context("Cannot start the image's container in the VM");
            }
            (process, RUN_CONTAINER.to_string())
        }
        None => (
            crate::container::ContainerProcess::in_vm(
                args.command.clone(),
                args.env.clone(),
                args.workdir.clone(),
            ),
            String::new(),
        ),
    };
    let options = ExecOptions::new(process, container, args.interactive, args.timeout, args.tty);
    let container_at = started.elapsed();
    let host_deadline = args
        .timeout
        .map(|seconds| Duration::from_secs(seconds) + HOST_TIMEOUT_GRACE);
    let outcome = tokio::select! {
        outcome = attach(&vm, &options, host_deadline) => Ok(outcome),
        stop = signals.recv() => Err(stop),
    };
    let ran_at = started.elapsed();
    // The VM served this one command: throw it away, no graceful shutdown.
    if let Err(err) = vm.discard().await {
        tracing::warn!(%err, "Stopping the VM failed");
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    // `bench run` reads this line (with -v) to say where a run's time goes.
    let opened = opened.unwrap_or_default();
    tracing::info!(
        config_ms = ms(resolved_at),
        open_factory_ms = ms(opened),
        get_vm_ms = ms(got_vm_at.saturating_sub(resolved_at + opened)),
        container_ms = ms(container_at - got_vm_at),
        exec_ms = ms(ran_at - container_at),
        teardown_ms = ms(started.elapsed() - ran_at),
        "{RUN_TIMING}"
    );
    match outcome {
        Ok(outcome) => outcome,
        Err(stop) => Ok(signal_exit(stop)),
    }
}

/// Gets the VM and the image at once. The first error ends both: an image that fails
/// first drops the VM still starting (which kills it); one that fails after the VM came
/// discards the VM.
async fn vm_and_image<T>(
    vm: impl std::future::Future<Output = Result<Vm>>,
    image: impl std::future::Future<Output = Result<T>>,
) -> Result<(Vm, T)> {
    tokio::pin!(vm, image);
    tokio::select! {
        image = &mut image => {
            let image = image?;
            Ok((vm.await?, image))
        }
        vm = &mut vm => {
            let vm = vm?;
            match image.await {
                Ok(image) => Ok((vm, image)),
                Err(err) => {
                    let _ = vm.discard().await;
                    Err(err)
                }
            }
        }
    }
}

/// Stops the VMs under `runtime_dir` whose owner is gone (a `run` killed with SIGKILL
/// leaves its VM directory; its QEMU died with it) and removes their directories.
pub(crate) fn reap_orphans(runtime_dir: &std::path::Path) {
    let reaped = vmfactory_hypervisor::qemu::reap_orphans(runtime_dir);
    if !reaped.is_empty() {
        debug!(count = reaped.len(), ids = ?reaped, "Reaped VMs whose owner is gone");
    }
}

/// What to run in a guest and how to connect it to us.
#[derive(Debug, Clone)]
pub(crate) struct ExecOptions {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub workdir: String,
    /// Pass our stdin even when it is a terminal.
    pub interactive: bool,
    /// Guest-side timeout.
    pub timeout: Option<Duration>,
    /// Run on a terminal in the guest.
    pub tty: bool,
    /// Run in this container of the VM ("" = in the VM itself).
    pub container: String,
    /// In a container: "uid[:gid]" or a user name of its image ("" = root).
    pub user: String,
}

impl ExecOptions {
    /// `process` run in `container` ("" = in the VM itself), with our stdin passed
    /// (`interactive`), on a guest terminal (`tty`) and a guest-side timeout in seconds.
    pub fn new(
        process: crate::container::ContainerProcess,
        container: String,
        interactive: bool,
        timeout_secs: Option<u64>,
        tty: bool,
    ) -> Self {
        Self {
            command: process.argv,
            env: process.env,
            workdir: process.workdir,
            interactive,
            timeout: timeout_secs.map(Duration::from_secs),
            tty,
            container,
            user: process.user,
        }
    }
}

async fn attach(
    vm: &Vm,
    options: &ExecOptions,
    host_deadline: Option<Duration>,
) -> Result<ExitCode> {
    let died = || async { vm_stopped(vm.hypervisor().exited().await) };
    let execution = exec_attached(vm.agent(), options, died, None);
    match host_deadline {
        Some(deadline) => match tokio::time::timeout(deadline, execution).await {
            Ok(result) => result,
            Err(_) => {
                eprintln!(
                    "vmfactory: the command did not end within --timeout; the VM was stopped"
                );
                Ok(ExitCode::from(EXIT_TIMEOUT))
            }
        },
        None => execution.await,
    }
}

/// The error of a VM that ended while a command ran in it.
fn vm_stopped(exit: HypervisorError) -> anyhow::Error {
    anyhow::Error::new(exit).context(
        "The VM stopped while running the command (the guest rebooted, shut down or panicked, or QEMU was killed)",
    )
}

/// Starts a process through `agent`, streams its output to ours and our input to it, and
/// waits for its end; returns our exit code. Fails early when the future made by `died`
/// resolves (the VM or the connection to it is gone). The agent's connection failing is
/// how a VM's end usually shows first (a guest reboot, shutdown or panic): after any
/// failure a fresh `died` future gets [`DEATH_GRACE`] to resolve, and then its error is
/// the one returned, naming the VM's end instead of the broken connection. With
/// `signals`, SIGINT/SIGTERM/SIGHUP are forwarded to the process instead of ending us.
pub(crate) async fn exec_attached<D>(
    agent: &AgentClient,
    options: &ExecOptions,
    died: impl Fn() -> D,
    signals: Option<&mut Signals>,
) -> Result<ExitCode>
where
    D: std::future::Future<Output = anyhow::Error>,
{
    match exec_until_died(agent, options, died(), signals).await {
        Err(err) => match tokio::time::timeout(DEATH_GRACE, died()).await {
            Ok(death) => Err(death),
            Err(_) => Err(err),
        },
        ok => ok,
    }
}

/// [`exec_attached`] with one `died` future.
async fn exec_until_died(
    agent: &AgentClient,
    options: &ExecOptions,
    died: impl std::future::Future<Output = anyhow::Error>,
    signals: Option<&mut Signals>,
) -> Result<ExitCode> {
    let pass_stdin =
        options.interactive || !(std::io::stdin().is_terminal() || stdin_is_dev_null());
    let terminal = options.tty.then(|| {
        let (rows, cols) = terminal::window_size().unwrap_or((24, 80));
        TtySize { rows, cols }
    });
    let spec = ProcessSpec {
        argv: options.command.clone(),
        env: options.env.clone(),
        workdir: options.workdir.clone(),
        stdin: pass_stdin,
        timeout: options.timeout,
        terminal,
        container_id: options.container.clone(),
        user: options.user.clone(),
    };
    // One call that starts the process and streams its output and end; an agent from
    // before it gets the four calls it replaced (started here: `Err(exec id)`).
    let started = match agent.run_process(spec.clone()).await {
        Ok(Some(running)) => Ok(Ok(running)),
        Ok(None) => agent.start_process(spec).await.map(Err),
        Err(err) => Err(err),
    };
    let started = match started {
        Ok(started) => started,
        Err(AgentError::Rpc { status, .. })
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::PermissionDenied
            ) =>
        {
            eprintln!("vmfactory: {}", status.message());
            return Ok(ExitCode::from(if status.code() == tonic::Code::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            }));
        }
        Err(err) => return Err(err).context("Cannot run the command in the VM"),
    };
    let (id, following) = match started {
        Ok(running) => (
            running.exec_id.clone(),
            Following::Events(Box::new(running)),
        ),
        Err(id) => {
            // Both streams are opened at once: one round trip to the guest, not two.
            let (stdout, stderr) = tokio::join!(
                agent.output(&id, OutputPipe::Stdout),
                agent.output(&id, OutputPipe::Stderr)
            );
            (id, Following::Outputs(Box::new((stdout?, stderr?))))
        }
    };
    // Our keys go to the guest's terminal as typed (Ctrl-C included) until we return.
    let _raw = if options.tty && pass_stdin {
        terminal::RawMode::enable()?
    } else {
        None
    };
    // Listening for SIGWINCH starts here, before any output is shown, so a resize that
    // follows what the user sees is never missed.
    let resizer = match options.tty.then(|| signal(SignalKind::window_change())) {
        Some(Ok(changes)) => Some(tokio::spawn(follow_window_size(
            agent.clone(),
            id.clone(),
            changes,
        ))),
        Some(Err(err)) => {
            debug!(%err, "Cannot watch window size changes");
            None
        }
        None => None,
    };
    let feeder = pass_stdin.then(|| tokio::spawn(feed_stdin(agent.clone(), id.clone())));
    let forward = async {
        match signals {
            Some(signals) => loop {
                let Stop::Signal(number) = signals.recv().await;
                if let Err(err) = agent.signal_process(&id, number).await {
                    debug!(%err, "Cannot forward a signal");
                }
            },
            None => std::future::pending::<()>().await,
        }
    };
    let result = tokio::select! {
        result = follow(agent, &id, following) => result,
        err = died => Err(err),
        () = forward => unreachable_forward(),
    };
    if let Some(feeder) = feeder {
        feeder.abort();
    }
    if let Some(resizer) = resizer {
        resizer.abort();
    }
    result
}

/// Sends our terminal's size to the guest's on every SIGWINCH.
async fn follow_window_size(
    agent: AgentClient,
    id: String,
    mut changes: tokio::signal::unix::Signal,
) {
    while changes.recv().await.is_some() {
        if let Some((rows, cols)) = terminal::window_size() {
            if let Err(err) = agent.resize_tty(&id, rows, cols).await {
                tracing::warn!(%err, "Cannot resize the guest terminal");
            }
        }
    }
}

/// Refuses an empty program name (`run -- ''`, an unset `"$CMD"`) before a VM is had for
/// it: no guest could run it. Not for `run --image`, whose words follow the image's
/// Entrypoint (`sh -c ''` is a command).
pub fn check_command(command: &[String]) -> Result<()> {
    if command.first().is_some_and(String::is_empty) {
        crate::usage!("The command after `--` is an empty word: give the program to run");
    }
    Ok(())
}

/// Refuses `-t` when our input is passed to the command but is not a terminal (a pipe or
/// a file), as Docker does: the guest terminal would take the input as typed keys, and
/// its end (typed as Ctrl-D) may be lost if it arrives before the command reads, which
/// leaves the command waiting forever.
pub fn check_terminal_input(tty: bool) -> Result<()> {
    let stdin = std::io::stdin();
    if tty && !stdin.is_terminal() && !stdin_is_dev_null() {
        crate::usage!(
            "The input is not a terminal: -t needs one (drop -t to pipe input into the command)"
        );
    }
    Ok(())
}

/// True when our standard input is `/dev/null`: nothing to pass on, so the guest process
/// gets its own `/dev/null` and no input stream is opened.
fn stdin_is_dev_null() -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(ours), Ok(null)) = (
        std::fs::metadata("/proc/self/fd/0"),
        std::fs::metadata("/dev/null"),
    ) else {
        return false;
    };
    ours.rdev() == null.rdev() && ours.dev() == null.dev() && ours.ino() == null.ino()
}

/// The signal forwarder never ends on its own.
fn unreachable_forward() -> Result<ExitCode> {
    Err(anyhow::anyhow!("Signal forwarding ended"))
}

/// How a started process is followed.
enum Following {
    /// Through `RunProcess`'s one stream.
    Events(Box<RunningProcess>),
    /// Its two output streams, opened with `ReadStdout` and `ReadStderr` (an agent
    /// without `RunProcess`).
    Outputs(Box<(OutputStream, OutputStream)>),
}

/// Copies the command's output to ours until its end; returns our exit code.
async fn follow(agent: &AgentClient, id: &str, following: Following) -> Result<ExitCode> {
    let ended = match following {
        Following::Events(running) => copy_events(*running).await?,
        Following::Outputs(outputs) => {
            let (stdout, stderr) = *outputs;
            follow_outputs(agent, id, stdout, stderr).await?
        }
    };
    let exit = match ended {
        Ok(exit) => exit,
        Err(code) => return Ok(code),
    };
    if exit.timed_out {
        eprintln!("vmfactory: the command timed out and was killed");
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    Ok(ExitCode::from(exit.shell_status()))
}

/// Writes the events' output chunks to ours as they come; the process's end, or the
/// exit code to return at once (our output was closed: the process is killed as its
/// stream is dropped).
async fn copy_events(mut running: RunningProcess) -> Result<Result<ProcessExit, ExitCode>> {
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    loop {
        let event = running
            .next_event()
            .await
            .context("Cannot follow the command")?;
        let written = match event {
            Some(ProcessEvent::Stdout(chunk)) => write_flushed(&mut stdout, &chunk).await,
            Some(ProcessEvent::Stderr(chunk)) => write_flushed(&mut stderr, &chunk).await,
            Some(ProcessEvent::Exit(exit)) => return Ok(Ok(exit)),
            None => bail!("The command's output ended without its exit"),
        };
        if let Err(err) = written {
            return output_failed(err).map(Err);
        }
    }
}

/// Our exit code when copying the command's output to ours failed: a closed output (a
/// reader such as `head` that went away) is [`EXIT_BROKEN_PIPE`], anything else an error.
fn output_failed(err: std::io::Error) -> Result<ExitCode> {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        return Ok(ExitCode::from(EXIT_BROKEN_PIPE));
    }
    Err(err).context("Cannot copy the command's output")
}

/// Writes `chunk` to `sink` and flushes it, so output shows as it comes.
async fn write_flushed(
    sink: &mut (impl tokio::io::AsyncWrite + Unpin),
    chunk: &[u8],
) -> std::io::Result<()> {
    sink.write_all(chunk).await?;
    sink.flush().await
}

/// Copies both outputs to ours while waiting for the command's end (an agent without
/// `RunProcess`); the end, or the exit code to return at once.
async fn follow_outputs(
    agent: &AgentClient,
    id: &str,
    stdout: OutputStream,
    stderr: OutputStream,
) -> Result<Result<ProcessExit, ExitCode>> {
    let copies = async {
        let (out, err) = tokio::join!(
            copy(stdout, tokio::io::stdout()),
            copy(stderr, tokio::io::stderr())
        );
        out.and(err)
    };
    let wait = agent.wait_process(id);
    tokio::pin!(copies, wait);
    let mut copied = None;
    let exit = loop {
        tokio::select! {
            exit = &mut wait => break exit.context("Cannot wait for the command")?,
            result = &mut copies, if copied.is_none() => copied = Some(result),
        }
    };
    let copied = match copied {
        Some(result) => result,
        None => tokio::time::timeout(OUTPUT_GRACE, &mut copies)
            .await
            .unwrap_or_else(|_| {
                debug!("Output still open after the command ended; not waiting for it");
                Ok(())
            }),
    };
    if let Err(err) = copied {
        return output_failed(err).map(Err);
    }
    Ok(Ok(exit))
}

/// Writes every chunk of `stream` to `sink` as it arrives.
async fn copy(
    mut stream: OutputStream,
    mut sink: impl tokio::io::AsyncWrite + Unpin,
) -> std::io::Result<()> {
    loop {
        match stream.next_chunk().await {
            Ok(Some(chunk)) => write_flushed(&mut sink, &chunk).await?,
            Ok(None) => return Ok(()),
            Err(err) => {
                debug!(%err, "Output stream ended with an error");
                return Ok(());
            }
        }
    }
}

/// Sends our standard input to the command until EOF, then closes its input.
async fn feed_stdin(agent: AgentClient, id: String) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        loop {
            let mut chunk = vec![0u8; STDIN_CHUNK];
            match stdin.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    if let Err(err) = agent.write_stdin(&id, ReceiverStream::new(rx)).await {
        debug!(%err, "Standard input not fully passed on");
    }
    reader.abort();
    if let Err(err) = agent.close_stdin(&id).await {
        debug!(%err, "Cannot close the command's standard input");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_whole_seconds_from_one_to_a_year() {
        assert_eq!(parse_timeout("30"), Ok(30));
        assert_eq!(parse_timeout(" 1 "), Ok(1));
        assert!(parse_timeout("0")
            .expect_err("0")
            .contains("at least 1 second"));
        assert!(parse_timeout("1.5")
            .expect_err("1.5")
            .contains("whole number"));
        assert!(parse_timeout("-3").is_err());
        assert_eq!(
            parse_timeout(&MAX_TIMEOUT_SECS.to_string()),
            Ok(MAX_TIMEOUT_SECS)
        );
        // Beyond it (once a panic: the host's deadline overflowed).
        assert!(parse_timeout(&u64::MAX.to_string()).is_err());
        assert!(parse_timeout(&(MAX_TIMEOUT_SECS + 1).to_string()).is_err());
    }

    #[test]
    fn working_directories_are_absolute() {
        assert_eq!(parse_workdir("/srv/app"), Ok("/srv/app".to_string()));
        assert!(parse_workdir("relative")
            .expect_err("relative")
            .contains("not an absolute path"));
        assert!(parse_workdir("").is_err());
    }
}
