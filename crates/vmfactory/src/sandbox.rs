//! `vmfactory sandbox …`: long-lived VMs. `create` starts a supervisor process (the hidden
//! `sandbox supervise`), which takes a VM through the configured factory and serves the
//! sandbox on a socket in its directory; the other commands talk to that supervisor.

use std::io::{BufRead, BufReader, IsTerminal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use vmfactory_factory::{Factory, FactoryChoice, Settings};
use vmfactory_hypervisor::qemu::accel::Accelerator;
use vmfactory_sandbox::dir::{self, SandboxDir};
use vmfactory_sandbox::{
    ContainerPlan, ContainerRecord, SandboxClient, SandboxRecord, SandboxState, Supervisor,
    SupervisorOptions,
};

use crate::run::{exec_attached, ExecOptions, Signals};
use crate::{parse_env, VmArgs};

/// What the supervisor prints on its stdout once the sandbox answers.
const READY_LINE: &str = "ready";
/// What the supervisor prints on its stdout, before the reason, when the sandbox could
/// not be made (its directory, log included, is gone then).
const FAILED_PREFIX: &str = "failed: ";
/// What the supervisor prints on its stdout, before it, for something `create` should
/// tell the user (the factory could not be used and the VM is booted directly, say).
const NOTICE_PREFIX: &str = "notice: ";
/// How long `rm` waits for a supervisor to remove its sandbox.
const RM_TIMEOUT: Duration = Duration::from_secs(15);

/// `vmfactory sandbox …`
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox: a VM from the configured factory (VMCache server, template, or a
    /// direct boot), owned by a supervisor process; prints the sandbox id.
    Create {
        /// A name to refer to the sandbox by (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: Option<String>,
        /// A container in the sandbox, from an image: `[NAME=]REF` where REF is a root
        /// filesystem directory, an OCI image layout (directory or tar) or a `docker save`
        /// archive (repeatable, one container per image; the first unnamed one is
        /// `main`). Run processes in it with `sandbox exec --container NAME`.
        #[arg(long = "image", value_name = "[NAME=]REF")]
        images: Vec<String>,
        /// Size of each container's writable layer (a tmpfs in the guest: what is written
        /// there takes guest memory): MiB, or e.g. 512M, 2G (default: 256 MiB). Needs --image.
        #[arg(long, value_parser = crate::container::parse_disk_size, requires = "images")]
        disk_size: Option<u32>,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// List the sandboxes: id, name, PID (of the VM's QEMU process), vCPUs, memory, age,
    /// state (creating, running, paused, or exited: its VM stopped by itself or its
    /// supervisor was killed; `--json` says why, `sandbox logs` shows its supervisor's
    /// log) and containers.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print only the ids, one per line (for scripts: `sandbox rm $(sandbox ls -q)`).
        #[arg(short, long, conflicts_with = "json")]
        quiet: bool,
    },
    /// Stop and remove sandboxes (by id, id prefix or name, or all of them), all at once;
    /// prints each removed sandbox's id.
    Rm {
        /// Kill a supervisor that does not answer, and its VM.
        #[arg(short, long)]
        force: bool,
        /// Remove every sandbox of this runtime directory.
        #[arg(short, long, conflicts_with = "ids")]
        all: bool,
        /// Sandboxes.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
    },
    /// Print a sandbox's supervisor log: what it did, and for an exited sandbox QEMU's
    /// and the guest console's last lines.
    Logs {
        /// The sandbox (id, id prefix or name).
        id: String,
    },
    /// Stop a sandbox's vCPUs.
    Pause {
        /// The sandbox (id, id prefix or name).
        id: String,
    },
    /// Continue a paused sandbox's vCPUs.
    Resume {
        /// The sandbox (id, id prefix or name).
        id: String,
    },
    /// Run a command in a sandbox: output streamed, stdin passed with -i (or when it is
    /// not a terminal), SIGINT/SIGTERM/SIGHUP forwarded, its exit status ours.
    Exec(ExecArgs),
    /// Copy files or directory trees in or out, keeping mode and modification time:
    /// `sandbox cp SRC ID:DST` or `sandbox cp ID:SRC DST` (guest paths are absolute; into
    /// DST/<name> when DST is a directory, as `cp -a`).
    Cp {
        /// Copy into or out of this container of the sandbox (paths in its root).
        #[arg(short, long)]
        container: Option<String>,
        /// Source: a local path, or ID:/guest/path.
        src: String,
        /// Destination: a local path, or ID:/guest/path.
        dst: String,
    },
    /// Serve one sandbox (started by `create`; not for direct use).
    #[command(hide = true)]
    Supervise {
        /// Sandbox id.
        #[arg(long)]
        id: String,
        /// Sandbox name.
        #[arg(long, default_value = "")]
        name: String,
        /// Container to make: NAME=REF (repeatable).
        #[arg(long = "container")]
        containers: Vec<String>,
        /// Size of each container's writable layer, MiB.
        #[arg(long)]
        disk_size: Option<u32>,
        #[command(flatten)]
        vm: VmArgs,
    },
}

/// Options of `sandbox exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Pass our standard input even when it is a terminal (EOF closes it).
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal (ours in raw mode, its size followed). Our input must
    /// be a terminal (or /dev/null): to pipe input, leave out -t.
    #[arg(short, long)]
    tty: bool,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory, an absolute path (default: /, or the image's WorkingDir in a
    /// container).
    #[arg(short, long, value_parser = crate::run::parse_workdir)]
    workdir: Option<String>,
    /// Run the command in this container of the sandbox (made with `create --image`),
    /// with its image's environment, working directory and user.
    #[arg(short, long)]
    container: Option<String>,
    /// Kill the command after this many seconds (whole seconds, at least 1; exit status
    /// 124).
    #[arg(long, value_parser = crate::run::parse_timeout)]
    timeout: Option<u64>,
    /// The sandbox (id, id prefix or name).
    id: String,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// Runs a `sandbox` command.
pub async fn run(command: SandboxCommand, config: Option<PathBuf>) -> Result<ExitCode> {
    let settings = Settings::load(config.as_deref())?;
    let runtime = settings.hypervisor.qemu.runtime_dir.clone();
    match command {
        SandboxCommand::Create {
            name,
            images,
            disk_size,
            vm,
        } => create(name, &images, disk_size, vm, config, &runtime).await,
        SandboxCommand::Ls { json, quiet } => ls(&runtime, json, quiet),
        SandboxCommand::Logs { id } => logs(&runtime, &id),
        SandboxCommand::Rm { force, all, ids } => rm(&runtime, all, &ids, force).await,
        // Each prints the sandbox's id, as `rm` does: a script sees what was done.
        SandboxCommand::Pause { id } => {
            let client = connect(&runtime, &id).await?;
            client.pause().await?;
            tracing::info!(sandbox = %id, "Paused");
            println!("{}", client.id());
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Resume { id } => {
            let client = connect(&runtime, &id).await?;
            client.resume().await?;
            tracing::info!(sandbox = %id, "Resumed");
            println!("{}", client.id());
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Exec(args) => exec(&runtime, args).await,
        SandboxCommand::Cp {
            container,
            src,
            dst,
        } => cp(&runtime, container.as_deref(), &src, &dst).await,
        SandboxCommand::Supervise {
            id,
            name,
            containers,
            disk_size,
            vm,
        } => supervise(id, name, &runtime, &containers, disk_size, vm, config).await,
    }
}

/// Refuses to reach into a paused sandbox: its agent cannot answer until it is resumed,
/// so the call would wait (and run later) instead of failing.
fn require_running(sandbox: &SandboxDir, record: &SandboxRecord) -> Result<()> {
    require_created(sandbox, record)?;
    if record.state == SandboxState::Paused {
        let who = record_name(record);
        bail!("Sandbox {who} is paused: resume it first with `vmfactory sandbox resume {who}`");
    }
    Ok(())
}

/// Refuses a sandbox whose `create` is still getting its VM (its supervisor does not
/// serve yet, and the call would fail as if the sandbox were broken), and one that has
/// exited, saying why.
fn require_created(sandbox: &SandboxDir, record: &SandboxRecord) -> Result<()> {
    let who = record_name(record);
    match record.state {
        SandboxState::Creating => bail!(
            "Sandbox {who} is still being created: try again once `vmfactory sandbox create` \
             has printed its id"
        ),
        SandboxState::Exited => bail!(
            "Sandbox {who} has exited: {}. See its log with `vmfactory sandbox logs {who}` \
             ({}); remove it with `vmfactory sandbox rm {who}`",
            record.exit_reason.as_deref().unwrap_or("its VM stopped"),
            sandbox.log().display()
        ),
        SandboxState::Running | SandboxState::Paused => Ok(()),
    }
}

/// How the user knows a sandbox: its name, else its id.
fn record_name(record: &SandboxRecord) -> &str {
    if record.name.is_empty() {
        &record.id
    } else {
        &record.name
    }
}

async fn connect(runtime: &Path, key: &str) -> Result<SandboxClient> {
    let (dir, record) = dir::find(runtime, key)?;
    require_created(&dir, &record)?;
    Ok(SandboxClient::connect(&dir, &record.id).await?)
}

/// The command-line options that reproduce `vm` for the supervisor.
fn vm_args(vm: &VmArgs) -> Vec<String> {
    let mut args = Vec::new();
    let mut push = |flag: &str, value: Option<String>| {
        if let Some(value) = value {
            args.push(flag.to_string());
            args.push(value);
        }
    };
    push("--vcpus", vm.vcpus.map(|v| v.to_string()));
    push("--memory", vm.memory.map(|v| v.to_string()));
    push(
        "--accel",
        vm.accel.map(|a| {
            match a {
                Accelerator::Auto => "auto",
                Accelerator::Kvm => "kvm",
                Accelerator::Tcg => "tcg",
            }
            .to_string()
        }),
    );
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    push("--qemu", path(&vm.qemu));
    push("--kernel", path(&vm.kernel));
    push("--initrd", path(&vm.initrd));
    push("--kernel-params", vm.kernel_params.clone());
    push("--boot-timeout", vm.boot_timeout.map(|v| v.to_string()));
    push("--cache-dir", path(&vm.image.cache_dir));
    push("--agent", path(&vm.image.agent));
    push(
        "--guest-kernel",
        vm.image.guest_kernel.map(|k| k.as_str().to_string()),
    );
    push(
        "--guest-qemu",
        vm.image.guest_qemu.map(|q| q.as_str().to_string()),
    );
    args
}

/// Name of the first container given without one.
const DEFAULT_CONTAINER: &str = "main";

/// Splits `--image` values into (container name, image reference): `NAME=REF` when the
/// part before `=` is a valid container name, else REF named `main` (once).
fn container_images(values: &[String]) -> Result<Vec<(String, String)>> {
    let mut containers: Vec<(String, String)> = Vec::new();
    for value in values {
        let (name, reference) = match value.split_once('=') {
            Some((name, reference))
                if !reference.is_empty()
                    && vmfactory_factory::agent_container::validate_container_id(name).is_ok() =>
            {
                (name.to_string(), reference.to_string())
            }
            _ => (DEFAULT_CONTAINER.to_string(), value.clone()),
        };
        if reference.is_empty() {
            bail!("--image needs an image reference: --image [NAME=]REF");
        }
        if containers.iter().any(|(existing, _)| *existing == name) {
            bail!("Two containers are named {name:?}: name each one, --image NAME=REF");
        }
        containers.push((name, reference));
    }
    Ok(containers)
}

async fn create(
    name: Option<String>,
    images: &[String],
    disk_size: Option<u32>,
    vm: VmArgs,
    config: Option<PathBuf>,
    runtime: &Path,
) -> Result<ExitCode> {
    // `--name ''` is a name that breaks the rules, not "no name".
    let named = name.is_some();
    let name = name.unwrap_or_default();
    if named {
        // Checked here to fail before images are built; checked again, under a lock,
        // when the name is claimed.
        dir::check_name(runtime, &name)?;
    }
    // A size beyond the limits is a usage error now, not the supervisor's failure later.
    vm.check_size(config.as_deref())?;
    let containers = container_images(images)?;
    // Images are built here, with progress; the supervisor finds them cached.
    for (_, reference) in &containers {
        let reference = reference.clone();
        let cache_dir = vm.image.cache_dir.clone();
        tokio::task::spawn_blocking(move || crate::container::prepare(cache_dir, &reference))
            .await
            .context("Preparing the image failed")??;
    }
    let id = dir::new_id();
    let sandbox = dir::reserve(runtime, &id, &name)?;
    // Until the supervisor answers, a failure here leaves no directory (nor its name
    // claim) behind.
    let mut claimed = RemoveOnDrop(Some(sandbox.clone()));
    let log = std::fs::File::create(sandbox.log())
        .with_context(|| format!("Cannot create {}", sandbox.log().display()))?;
    let exe = std::env::current_exe().context("Cannot find the vmfactory binary")?;
    let mut command = std::process::Command::new(exe);
    if let Some(config) = &config {
        command.arg("--config").arg(config);
    }
    command
        .args(["-v", "sandbox", "supervise", "--id", &id, "--name", &name])
        .args(containers.iter().flat_map(|(name, reference)| {
            ["--container".to_string(), format!("{name}={reference}")]
        }))
        .args(
            disk_size
                .map(|mib| ["--disk-size".to_string(), mib.to_string()])
                .into_iter()
                .flatten(),
        )
        .args(vm_args(&vm))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe. The supervisor leads its own session: our
    // terminal's signals (Ctrl-C, hang-up) do not reach it, and it outlives us.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .context("Cannot start the sandbox supervisor")?;
    let supervisor_pid = child.id();
    let stdout = child.stdout.take().context("No supervisor stdout")?;
    let mut signals = Signals::install()?;
    // A spinner while the VM comes, on a terminal only (scripts read the id on stdout).
    let waiting = std::io::stderr()
        .is_terminal()
        .then(|| crate::progress::Progress::spinner("Creating the sandbox"));
    let ready = tokio::task::spawn_blocking(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            match line.trim_end().strip_prefix(NOTICE_PREFIX) {
                Some(notice) => eprintln!("vmfactory: {}", crate::hints(notice)),
                None => return line,
            }
        }
    });
    let line = tokio::select! {
        line = ready => {
            if let Some(waiting) = waiting {
                waiting.clear();
            }
            line.unwrap_or_default()
        }
        _ = signals.recv() => {
            // Interrupted: the supervisor undoes what it made.
            // SAFETY: signalling the supervisor we just started.
            unsafe { libc::kill(supervisor_pid as i32, libc::SIGTERM); }
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            // The supervisor removed it, unless it was killed before it could.
            drop(claimed);
            eprintln!("vmfactory: interrupted; the sandbox was not created");
            return Ok(ExitCode::from(130));
        }
    };
    if let Some(reason) = line.trim().strip_prefix(FAILED_PREFIX) {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let _ = sandbox.remove();
        bail!("The sandbox could not be created: {reason}");
    }
    if line.trim() != READY_LINE {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let log = std::fs::read_to_string(sandbox.log()).unwrap_or_default();
        let _ = sandbox.remove();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("The sandbox could not be created:\n{}", tail.join("\n"));
    }
    claimed.0 = None;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

async fn supervise(
    id: String,
    name: String,
    runtime: &Path,
    containers: &[String],
    disk_size: Option<u32>,
    vm: VmArgs,
    config: Option<PathBuf>,
) -> Result<ExitCode> {
    // The record first, with our pid: from here on the sandbox is one being created, whose
    // supervisor runs, however long images and the guest image take to prepare (a
    // directory without a record is taken for abandoned after a minute, and swept).
    SandboxDir::new(runtime, &id).write(&SandboxRecord::creating(&id, &name))?;
    let mut plans = Vec::new();
    for (container, reference) in container_images(containers)? {
        let cache_dir = vm.image.cache_dir.clone();
        let image = {
            let reference = reference.clone();
            tokio::task::spawn_blocking(move || crate::container::prepare(cache_dir, &reference))
                .await
                .context("Preparing the image failed")??
        };
        plans.push(ContainerPlan {
            disk: image.disk.clone(),
            spec: crate::container::pause_container(&container, &image, disk_size.unwrap_or(0)),
            record: ContainerRecord {
                name: container,
                image: reference,
                digest: image.digest.clone(),
                env: image.config.env.clone(),
                workdir: image.config.working_dir.clone().unwrap_or_default(),
                user: image.config.user.clone().unwrap_or_default(),
            },
        });
    }
    let resolved = tokio::task::spawn_blocking(move || {
        let settings = Settings::load(config.as_deref())?;
        let choice = FactoryChoice::from_settings(&settings.factory);
        vm.resolve(config.as_deref(), choice.needs_local_config())
    })
    .await
    .context("Preparing the VM failed")??;
    let choice = FactoryChoice::from_settings(&resolved.settings.factory);
    let local = choice.needs_local_config().then_some(&resolved.base);
    let factory = Factory::open(&choice, local).await?;
    if let Some(notice) = factory.notice() {
        tracing::warn!(notice, "Factory degraded");
        // `create` says it to the user, who would otherwise not know why this sandbox
        // took a direct boot's time.
        tell_creator(NOTICE_PREFIX, notice);
    }
    let options = SupervisorOptions {
        id,
        name,
        runtime_dir: resolved.base.qemu.runtime_dir.clone(),
        request: resolved.request,
        containers: plans,
    };
    let ready = |result: Result<&SandboxRecord, &vmfactory_sandbox::SandboxError>| {
        match result {
            Ok(_) => tell_creator(READY_LINE, ""),
            Err(err) => {
                tracing::error!(%err, "The sandbox could not be created");
                // The reason, with its causes, on one line for `create`.
                let reason = anyhow::Chain::new(err)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ");
                tell_creator(FAILED_PREFIX, &reason);
            }
        }
    };
    Supervisor::run(options, factory, ready).await?;
    Ok(ExitCode::SUCCESS)
}

/// Removes a sandbox directory when dropped, unless emptied first.
struct RemoveOnDrop(Option<SandboxDir>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(sandbox) = self.0.take() {
            let _ = sandbox.remove();
        }
    }
}

/// One line to `create` on the supervisor's stdout: `prefix` and `text` on one line,
/// flushed at once (`create` waits for it).
fn tell_creator(prefix: &str, text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{prefix}{}", text.replace('\n', " "));
    let _ = stdout.flush();
}

#[derive(Debug, Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    record: &'a SandboxRecord,
    age_seconds: u64,
}

fn ls(runtime: &Path, json: bool, quiet: bool) -> Result<ExitCode> {
    let live = dir::list(runtime);
    if quiet {
        for (_, record) in &live {
            println!("{}", record.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        let listed: Vec<Listed<'_>> = live
            .iter()
            .map(|(_, record)| Listed {
                record,
                age_seconds: record.age_seconds(),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12}  {:<16}  {:>8}  {:>5}  {:>7}  {:>8}  {:<8}  CONTAINERS",
        "ID", "NAME", "PID", "VCPUS", "MEMORY", "AGE", "STATE"
    );
    for (_, record) in &live {
        let containers: Vec<&str> = record.containers.iter().map(|c| c.name.as_str()).collect();
        println!(
            "{:<12}  {:<16}  {:>8}  {:>5}  {:>5}Mi  {:>7}s  {:<8}  {}",
            record.id,
            record.name,
            if record.vm_pid == 0 {
                "-".to_string()
            } else {
                record.vm_pid.to_string()
            },
            record.vcpus,
            record.memory_mib,
            record.age_seconds(),
            record.state.as_str(),
            containers.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the supervisor log of the sandbox `key` to stdout.
fn logs(runtime: &Path, key: &str) -> Result<ExitCode> {
    let (sandbox, _) = dir::find(runtime, key)?;
    let path = sandbox.log();
    let mut log = std::fs::File::open(&path)
        .with_context(|| format!("Cannot read the sandbox's log {}", path.display()))?;
    match std::io::copy(&mut log, &mut std::io::stdout().lock()) {
        // The reader had enough (`sandbox logs x | head`): as every command, quietly.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::from(crate::run::EXIT_BROKEN_PIPE))
        }
        Err(err) => Err(err).with_context(|| format!("Cannot print {}", path.display())),
        Ok(_) => Ok(ExitCode::SUCCESS),
    }
}

async fn rm(runtime: &Path, all: bool, keys: &[String], force: bool) -> Result<ExitCode> {
    let mut failed = false;
    let mut chosen: Vec<(SandboxDir, SandboxRecord)> = Vec::new();
    if all {
        chosen = dir::list(runtime);
    }
    for key in keys {
        match dir::find(runtime, key) {
            // Named twice (by id and by name, say): removed once.
            Ok(found) if chosen.iter().any(|(_, r)| r.id == found.1.id) => {}
            Ok(found) => chosen.push(found),
            Err(err) => {
                eprintln!("vmfactory: {}", crate::hints(&err.to_string()));
                failed = true;
            }
        }
    }
    // Each removal mostly waits for its supervisor to stop its VM: all at once.
    let mut removals = tokio::task::JoinSet::new();
    for (sandbox, record) in chosen {
        removals.spawn(rm_one(sandbox, record, force));
    }
    while let Some(done) = removals.join_next().await {
        match done {
            Ok(Ok(id)) => println!("{id}"),
            Ok(Err(err)) => {
                eprintln!("vmfactory: {}", crate::hints(&format!("{err:#}")));
                failed = true;
            }
            Err(err) => {
                eprintln!("vmfactory: a removal failed: {err}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(crate::EXIT_VMFACTORY_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// Stops one sandbox and waits until its directory is gone; returns its id.
async fn rm_one(sandbox: SandboxDir, record: SandboxRecord, force: bool) -> Result<String> {
    // Nothing runs any more in an exited sandbox: its record and log go. One whose VM
    // died meanwhile was left exited by its supervisor, which is gone then.
    let exited_now = || {
        !dir::supervisor_alive(&record)
            && sandbox
                .read()
                .is_ok_and(|record| record.state == SandboxState::Exited)
    };
    if record.state == SandboxState::Exited {
        dir::sweep(&sandbox, Some(&record))?;
        return Ok(record.id);
    }
    // Bounded: a supervisor that is stuck must not hold `rm` (nor `rm -f`) for ever.
    let stopped = tokio::time::timeout(RM_TIMEOUT, async {
        SandboxClient::connect(&sandbox, &record.id)
            .await?
            .stop()
            .await
    })
    .await
    .unwrap_or_else(|_| {
        Err(vmfactory_sandbox::SandboxError::Unreachable {
            id: record.id.clone(),
            reason: format!("no answer to Stop within {} s", RM_TIMEOUT.as_secs()),
        })
    });
    if let Err(err) = stopped {
        // Its VM may have died just now: the supervisor then leaves it exited, and goes.
        let waited = Instant::now();
        while dir::supervisor_alive(&record) && waited.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if exited_now() {
            dir::sweep(&sandbox, Some(&record))?;
            return Ok(record.id);
        }
        if !force {
            return Err(err.into());
        }
        // Forced: the supervisor that does not answer is killed at once, with its VM.
        kill_supervisor(&record);
        dir::sweep(&sandbox, Some(&record))?;
        return Ok(record.id);
    }
    let started = Instant::now();
    while sandbox.path.exists() {
        if exited_now() {
            dir::sweep(&sandbox, Some(&record))?;
            return Ok(record.id);
        }
        if started.elapsed() > RM_TIMEOUT {
            if !force {
                bail!(
                    "Sandbox {} did not stop within {} s: remove it with `vmfactory sandbox rm -f {}`",
                    record.id,
                    RM_TIMEOUT.as_secs(),
                    record.id
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if sandbox.path.exists() && force {
        kill_supervisor(&record);
        dir::sweep(&sandbox, Some(&record))?;
    }
    Ok(record.id)
}

/// SIGKILLs the supervisor of `record` if it still runs (its VM dies with it, or is
/// killed by the sweep that follows).
fn kill_supervisor(record: &SandboxRecord) {
    if dir::supervisor_alive(record) {
        // SAFETY: the pid's command line names this sandbox's id: it is its supervisor.
        unsafe {
            libc::kill(record.supervisor_pid as i32, libc::SIGKILL);
        }
    }
}

async fn exec(runtime: &Path, args: ExecArgs) -> Result<ExitCode> {
    crate::run::check_command(&args.command)?;
    crate::run::check_terminal_input(args.tty)?;
    let (sandbox, record) = dir::find(runtime, &args.id)?;
    require_running(&sandbox, &record)?;
    let client = SandboxClient::connect(&sandbox, &record.id).await?;
    let (process, container) = match &args.container {
        Some(name) => {
            let Some(container) = record.containers.iter().find(|c| c.name == *name) else {
                let names: Vec<&str> = record.containers.iter().map(|c| c.name.as_str()).collect();
                crate::usage!(
                    "Sandbox {} has no container {name:?}{}",
                    record.id,
                    if names.is_empty() {
                        " (it was created without --image)".to_string()
                    } else {
                        format!(": it has {}", names.join(", "))
                    }
                );
            };
            let config = vmfactory_image::ImageConfig {
                env: container.env.clone(),
                working_dir: Some(container.workdir.clone()),
                user: Some(container.user.clone()),
                ..Default::default()
            };
            let process = crate::container::ContainerProcess::new(
                &config,
                &args.command,
                &args.env,
                args.workdir.as_deref(),
            )?;
            (process, container.name.clone())
        }
        None => (
            crate::container::ContainerProcess::in_vm(args.command, args.env, args.workdir),
            String::new(),
        ),
    };
    let options = ExecOptions::new(process, container, args.interactive, args.timeout, args.tty);
    let died = || async {
        loop {
            // The VM first: its supervisor ends soon after it.
            if !dir::vm_alive(&record) {
                // `sandbox rm` stops the VM, then removes the directory; a VM that
                // stopped by itself leaves its record, marked exited.
                let since = Instant::now();
                while since.elapsed() < Duration::from_secs(3) {
                    match sandbox.read() {
                        Err(_) => {
                            return anyhow::anyhow!(
                                "Sandbox {} was removed while running the command",
                                record.id
                            )
                        }
                        Ok(now) if now.state == dir::SandboxState::Exited => break,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                return anyhow::anyhow!(
                    "The VM of sandbox {} stopped while running the command (the guest rebooted, shut down or panicked, or QEMU was killed); `vmfactory sandbox ls` lists it as exited",
                    record.id
                );
            }
            if !dir::supervisor_alive(&record) {
                return anyhow::anyhow!("The supervisor of sandbox {} is gone", record.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut signals = Signals::install()?;
    let started = Instant::now();
    let code = exec_attached(client.agent(), &options, died, Some(&mut signals)).await?;
    tracing::info!(
        sandbox = %record.id,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "Command ended"
    );
    Ok(code)
}

/// `bytes` over `elapsed`, per second (0 before any time has passed).
fn per_second(bytes: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (bytes as f64 / seconds) as u64
    } else {
        0
    }
}

/// `ID:/path` → (ID, /path), when the part before the colon names no local directory.
fn sandbox_path(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

async fn cp(runtime: &Path, container: Option<&str>, src: &str, dst: &str) -> Result<ExitCode> {
    // Both sides look like ID:/path: a local name with a colon (`my:file`) is the side
    // that names no sandbox.
    let is_sandbox =
        |spec: &str| sandbox_path(spec).is_some_and(|(id, _)| dir::find(runtime, id).is_ok());
    let (src_side, dst_side) = match (sandbox_path(src), sandbox_path(dst)) {
        (Some(from), Some(to)) if from.0 != to.0 => match (is_sandbox(src), is_sandbox(dst)) {
            (true, false) => (Some(from), None),
            (false, true) => (None, Some(to)),
            (false, false) => crate::usage!(
                "Neither {:?} nor {:?} names a sandbox (`vmfactory sandbox ls` lists them); \
                 write a local path with a colon as ./{src}",
                from.0,
                to.0
            ),
            (true, true) => (Some(from), Some(to)),
        },
        sides => sides,
    };
    let (key, guest, local, inward) = match (src_side, dst_side) {
        (None, Some((id, guest))) => (id, guest, src, true),
        (Some((id, guest)), None) => (id, guest, dst, false),
        (Some((from, source)), Some((to, target))) if from == to => {
            crate::usage!(
                "Both sides are in sandbox {from}: copy there with \
                 `vmfactory sandbox exec {from} -- cp -a {source} {target}`"
            )
        }
        (Some(_), Some(_)) => {
            crate::usage!("Copy between two sandboxes is not supported: copy out, then in")
        }
        (None, None) => {
            crate::usage!(
                "Name the sandbox side as ID:/path (e.g. `sandbox cp file.txt web:/tmp/`)"
            )
        }
    };
    if !guest.starts_with('/') {
        crate::usage!("The path in the sandbox must be absolute, not {guest:?}");
    }
    if !inward {
        // Said here rather than as a file that cannot be made "next to" it.
        let destination = Path::new(local);
        if let Some(parent) = destination.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !destination.exists() && !parent.is_dir() {
                // Nothing could be copied: cp's status.
                eprintln!(
                    "vmfactory: {}",
                    crate::printable(&format!(
                        "{}: no such directory here; create it first",
                        parent.display()
                    ))
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
    let (sandbox, record) = dir::find(runtime, key)?;
    require_running(&sandbox, &record)?;
    if let Some(name) = container {
        if !record.containers.iter().any(|c| c.name == name) {
            crate::usage!(
                "Sandbox {} has no container {name:?} (see `vmfactory sandbox ls`)",
                record.id
            );
        }
    }
    let client = SandboxClient::connect(&sandbox, &record.id).await?;
    let copied = Arc::new(AtomicU64::new(0));
    let agent = client
        .agent()
        .files_in(container.unwrap_or_default())
        .counting_bytes(copied.clone());
    let mut signals = Signals::install()?;
    let mut counted = vmfactory_factory::CopyStats::default();
    // Boxed, so that dropping it ends its borrow of `counted`.
    let mut copy = Box::pin(async {
        if inward {
            agent
                .copy_in_counting(Path::new(local), guest, &mut counted)
                .await
        } else {
            agent
                .copy_out_counting(guest, Path::new(local), &mut counted)
                .await
        }
    });
    let started = Instant::now();
    // On a terminal, the bytes moved so far and the rate, as they go.
    let mut progress = std::io::stderr()
        .is_terminal()
        .then(|| crate::progress::Progress::spinner(&format!("Copying {src} to {dst}")));
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    // Interrupted, the copy is dropped: the file being received (a temporary name on
    // either side) is removed; what was complete stays.
    let copied_so_far = || {
        let bytes = copied.load(Ordering::Relaxed);
        format!(
            "{} ({}/s)",
            indicatif::HumanBytes(bytes),
            indicatif::HumanBytes(per_second(bytes, started.elapsed()))
        )
    };
    let copied_or_not = loop {
        tokio::select! {
            done = &mut copy => break done,
            stop = signals.recv() => {
                if let Some(progress) = progress.take() {
                    progress.abandon();
                }
                let crate::run::Stop::Signal(number) = stop;
                eprintln!(
                    "vmfactory: interrupted after {}; the copy stopped (the file in progress was removed)",
                    copied_so_far()
                );
                return Ok(ExitCode::from(128 + u8::try_from(number).unwrap_or(0)));
            }
            _ = ticks.tick() => {
                if let Some(progress) = &mut progress {
                    progress.set_message(&format!("Copying {src} to {dst}: {}", copied_so_far()));
                }
            }
        }
    };
    if let Some(progress) = progress.take() {
        progress.clear();
    }
    drop(copy);
    let stats = counted;
    if let Err(err) = copied_or_not {
        // What failed inside the tree before the copy had to stop.
        for failure in &stats.failures {
            eprintln!("vmfactory: {}", crate::printable(failure));
        }
        // As cp: what could not be copied (missing, refused, unreadable) is status 1;
        // the sandbox or its agent failing is vmfactory's failure (125).
        let broken = err.copy_failure() == vmfactory_factory::CopyFailure::Broken;
        let err = anyhow::Error::new(err).context("Copy failed");
        if broken {
            return Err(err);
        }
        eprintln!(
            "vmfactory: {}",
            crate::printable(&crate::hints(&format!("{err:#}")))
        );
        return Ok(ExitCode::from(1));
    }
    let count = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let elapsed = started.elapsed();
    // A rate over a few milliseconds says nothing.
    let rate = if elapsed >= Duration::from_millis(500) {
        format!(
            " ({}/s)",
            indicatif::HumanBytes(per_second(stats.bytes, elapsed))
        )
    } else {
        String::new()
    };
    eprintln!(
        "vmfactory: copied {}, {}, {}, {}{} in {:.1} s{rate}",
        count(stats.files, "file", "files"),
        count(stats.dirs, "directory", "directories"),
        count(stats.symlinks, "link", "links"),
        count(stats.bytes, "byte", "bytes"),
        if stats.skipped > 0 {
            format!(
                " ({} skipped: devices, sockets and FIFOs are not copied; -v names them)",
                count(stats.skipped, "special file", "special files")
            )
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
    );
    // As cp: what could not be copied is named, the rest copied, and the status is 1.
    if stats.failed > 0 {
        for failure in &stats.failures {
            eprintln!("vmfactory: {}", crate::printable(failure));
        }
        let unnamed = stats.failed.saturating_sub(stats.failures.len() as u64);
        eprintln!(
            "vmfactory: {} could not be copied{}",
            count(stats.failed, "entry", "entries"),
            if unnamed > 0 {
                format!(" ({unnamed} more than named above)")
            } else {
                String::new()
            }
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The `VmArgs` of a parsed `sandbox create` or `sandbox supervise` command line.
    fn parsed(args: &[String]) -> VmArgs {
        match crate::Cli::try_parse_from(args).expect("parses").command {
            crate::Command::Sandbox(SandboxCommand::Create { vm, .. })
            | crate::Command::Sandbox(SandboxCommand::Supervise { vm, .. }) => vm,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_supervisor_gets_every_vm_option_of_create() {
        let create: Vec<String> = [
            "vmfactory",
            "sandbox",
            "create",
            "--vcpus",
            "2",
            "--memory",
            "512",
            "--accel",
            "tcg",
            "--qemu",
            "/usr/bin/qemu-system-x86_64",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--kernel-params",
            "quiet loglevel=3",
            "--boot-timeout",
            "30",
            "--cache-dir",
            "/c",
            "--agent",
            "/a",
            "--guest-kernel",
            "debian",
            "--guest-qemu",
            "debian",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        let given = parsed(&create);
        let mut supervise: Vec<String> = ["vmfactory", "sandbox", "supervise", "--id", "x"]
            .iter()
            .map(|arg| arg.to_string())
            .collect();
        supervise.extend(vm_args(&given));
        assert_eq!(format!("{:?}", parsed(&supervise)), format!("{given:?}"));
    }
}
