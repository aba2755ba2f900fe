//! `vmfactory factory init|status|destroy`, and how `run` gets its VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use vmfactory_factory::metrics::{self, FactoryMetrics, MetricsAddress};
use vmfactory_factory::template::{self, TemplateMetadata};
use vmfactory_factory::vmcache;
use vmfactory_factory::{
    CacheFactory, CacheServerFactory, Factory, FactoryChoice, TemplateError, TemplateFactory, Vm,
};

use crate::progress::Progress;
use crate::run::{signal_exit, Signals};
use crate::{Resolved, VmArgs};

#[derive(Debug, Subcommand)]
pub enum FactoryCommand {
    /// Create the template (enable_template = true in [factory]): boot a template VM, save
    /// its state and memory on a tmpfs at template_path, and stop it. With
    /// vm_cache_number > 0 it then runs the VMCache server in the foreground, serving
    /// that many ready VMs on vm_cache_endpoint, until `factory destroy` or a signal.
    Init {
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Say whether the factory is ready: the template (whether it exists, what it was
    /// built from, whether a trial clone comes up) or the VMCache server (its cached VMs).
    /// Exit status 0 when it is ready (or no template is enabled: runs boot directly), 1
    /// when it is not (no template or an unusable one while `enable_template = true`, a
    /// VMCache server that does not answer), 125 when vmfactory fails.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Stop the VMCache server (Quit) and remove the template: unmount its tmpfs and
    /// delete its files.
    Destroy,
}

async fn resolve(vm: VmArgs, config: Option<PathBuf>, local: bool) -> Result<Resolved> {
    tokio::task::spawn_blocking(move || vm.resolve(config.as_deref(), local))
        .await
        .context("Loading the configuration failed")?
}

/// Refuses `--vcpus` / `--memory` on a factory command: a factory's VMs have the
/// configuration's size (`run` and `sandbox create` grow them by hot-plug).
fn refuse_size(command: &str, vm: &VmArgs) -> Result<()> {
    if vm.vcpus.is_some() || vm.memory.is_some() {
        bail!(
            "`factory {command}` does not take --vcpus or --memory: the factory's VMs have the \
             configuration's size, so set default_vcpus and default_memory in \
             [hypervisor.qemu] instead (`run` and `sandbox create` grow a VM by hot-plug \
             when they ask for more)"
        );
    }
    Ok(())
}

pub async fn run(command: FactoryCommand, config: Option<PathBuf>) -> Result<ExitCode> {
    match command {
        FactoryCommand::Init { vm } => {
            refuse_size("init", &vm)?;
            init(resolve(vm, config, true).await?).await
        }
        FactoryCommand::Status { json, vm } => {
            refuse_size("status", &vm)?;
            // A VMCache server's status needs no guest image.
            let settings = vmfactory_factory::Settings::load(config.as_deref())?;
            let local = FactoryChoice::from_settings(&settings.factory).needs_local_config();
            status(resolve(vm, config, local).await?, json).await
        }
        FactoryCommand::Destroy => {
            // Destroying needs only the paths: no guest image build.
            let settings = vmfactory_factory::Settings::load(config.as_deref())?;
            let factory = settings.factory;
            if factory.vm_cache_number > 0 {
                stop_server(&factory.vm_cache_endpoint).await?;
                clean_after_server(
                    &factory.vm_cache_endpoint,
                    &factory.metrics_address,
                    &settings.hypervisor.qemu.runtime_dir,
                )
                .await?;
            }
            let path = factory.template_path;
            if template::destroy(&path)? {
                println!("Template at {} destroyed", path.display());
            } else if factory.enable_template {
                println!("No template at {}", path.display());
            } else if factory.vm_cache_number == 0 {
                println!(
                    "Nothing to destroy: the configuration has no factory (enable_template = \
                     false, vm_cache_number = 0) and there is no template at {}",
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the VMCache server to quit and waits until its socket is gone and its process
/// has exited: it removes the socket first and holds the template's lock (and stops its
/// VMs) until it exits, so the template can be destroyed only then.
async fn stop_server(endpoint: &std::path::Path) -> Result<()> {
    let pid = vmcache::status(endpoint)
        .await
        .ok()
        .map(|(pid, _)| pid)
        .filter(|pid| *pid != 0);
    let running = || {
        endpoint.exists()
            || pid.is_some_and(|pid| vmfactory_hypervisor::qemu::process_cmdline(pid).is_some())
    };
    match vmcache::quit(endpoint).await {
        Ok(()) => {
            let started = Instant::now();
            while running() && started.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if running() {
                bail!(
                    "The VMCache server on {} did not stop within 60 s",
                    endpoint.display()
                );
            }
            println!("VMCache server on {} stopped", endpoint.display());
        }
        Err(vmfactory_factory::VmCacheError::NotRunning { .. }) => {
            println!("No VMCache server on {}", endpoint.display());
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

/// Removes what a VMCache server killed without a chance to clean up (SIGKILL, the OOM
/// killer) left: its VMs (cached, or handed out and not adopted: their owner is gone; a
/// hand-over younger than the server's grace is waited for until its client adopts it or
/// the grace is over), its endpoint and metrics sockets that refuse connections, and its
/// lock file. Only with the endpoint's lock taken (waited for while a server stops), so
/// never beside a live server; nothing to do where the endpoint's directory is missing or
/// not ours.
async fn clean_after_server(
    endpoint: &std::path::Path,
    metrics_address: &str,
    runtime_dir: &std::path::Path,
) -> Result<()> {
    use vmfactory_factory::lock::{LockError, LockKind, PathLock};
    if !endpoint.parent().is_some_and(std::path::Path::is_dir) {
        return Ok(());
    }
    let started = Instant::now();
    let lock = loop {
        match PathLock::acquire(endpoint, LockKind::Endpoint) {
            Ok(lock) => break lock,
            // A server holds it: one stopping (its VMs first) lets go soon.
            Err(LockError::Busy { pid, .. }) if started.elapsed() < Duration::from_secs(60) => {
                if started.elapsed() < Duration::from_millis(100) {
                    tracing::debug!(
                        ?pid,
                        "Waiting for the VMCache server to let go of its endpoint"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(LockError::Busy { pid, .. }) => bail!(
                "A VMCache server{} holds {} (starting or stopping) and did not let go within \
                 60 s: stop it with SIGTERM, then run `vmfactory factory destroy` again",
                pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
                endpoint.display()
            ),
            // Not ours to lock (another user's directory): nothing of ours to clean.
            Err(err) => {
                tracing::debug!(%err, "Not cleaning after a VMCache server");
                return Ok(());
            }
        }
    };
    // A VM the server handed out just before it died may still be adopted by its
    // client: waited for until adopted (its client then owns it) or until its grace is
    // over (an orphan then, reaped), so that none is left running with nobody to stop it.
    let mut reaped = Vec::new();
    let mut told = false;
    loop {
        let runtime_dir = runtime_dir.to_path_buf();
        let (now_reaped, awaiting) = tokio::task::spawn_blocking(move || {
            let reaped = vmfactory_hypervisor::qemu::reap_orphans_but_hand_overs(&runtime_dir);
            (
                reaped,
                vmfactory_hypervisor::qemu::orphans_awaiting_adoption(&runtime_dir),
            )
        })
        .await
        .context("Reaping VMs failed")?;
        reaped.extend(now_reaped);
        let Some(longest) = awaiting.iter().map(|(_, left)| *left).max() else {
            break;
        };
        if !std::mem::replace(&mut told, true) {
            println!(
                "Waiting up to {} s for clients to adopt {} the killed server handed out ({}); \
                 any not adopted by then is stopped",
                longest.as_secs_f64().ceil(),
                vms(awaiting.len()),
                awaiting
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !reaped.is_empty() {
        println!(
            "Stopped {} whose owner is gone (a killed server's): {}",
            vms(reaped.len()),
            reaped.join(", ")
        );
    }
    let metrics_socket = match metrics_address.parse() {
        Ok(vmfactory_factory::metrics::MetricsAddress::Unix(path)) => Some(path),
        _ => None,
    };
    for socket in std::iter::once(endpoint.to_path_buf()).chain(metrics_socket) {
        // Only one that refuses connections: a busy live one may answer EAGAIN.
        if let vmfactory_factory::socket::SocketAt::Refused =
            vmfactory_factory::socket::probe(&socket).await
        {
            std::fs::remove_file(&socket)
                .with_context(|| format!("Cannot remove the stale socket {}", socket.display()))?;
            println!("Removed the stale socket {}", socket.display());
        }
    }
    drop(lock);
    Ok(())
}

/// Runs the VMCache server in the foreground until SIGTERM/SIGINT or `Quit`.
async fn serve(resolved: Resolved) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    // Held for the server's life; a second server is refused before it boots anything.
    let endpoint_lock = vmcache::lock_endpoint(&factory.vm_cache_endpoint)?;
    // Before anything is made, so that every way out after it goes through the clean-up
    // below (the metrics socket removed).
    let mut signals = Signals::install()?;
    let metrics_address: Option<MetricsAddress> = (!factory.metrics_address.is_empty())
        .then(|| factory.metrics_address.parse())
        .transpose()?;
    let metrics = metrics_address.as_ref().map(|_| {
        let metrics = FactoryMetrics::default();
        metrics.set_target(factory.vm_cache_number);
        Arc::new(metrics)
    });
    // Bound before anything is made: a port in use is an error now, not a line saying
    // the metrics are served while nothing serves them.
    let metrics_listener = match &metrics_address {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    // VMs a killed server left behind (no owner any more) are reaped before we start.
    let reaped = vmfactory_hypervisor::qemu::reap_orphans(&resolved.base.qemu.runtime_dir);
    if !reaped.is_empty() {
        eprintln!(
            "vmfactory: stopped {} whose owner is gone: {}",
            vms(reaped.len()),
            reaped.join(", ")
        );
    }
    // Served from the start: a scrape while the template is created sees 0 VMs ready,
    // not a connection that hangs.
    let metrics_task = match (&metrics, metrics_listener, &metrics_address) {
        (Some(metrics), Some(listener), Some(address)) => {
            eprintln!(
                "vmfactory: metrics served: {}",
                match address {
                    MetricsAddress::Tcp(socket) => format!("http://{socket}/metrics"),
                    MetricsAddress::Unix(path) => format!(
                        "curl --unix-socket {} http://localhost/metrics",
                        path.display()
                    ),
                }
            );
            let stop = Arc::new(Notify::new());
            let task = tokio::spawn(listener.serve(metrics.clone(), stop.clone()));
            Some((stop, task))
        }
        _ => None,
    };
    // Stops serving the metrics (a Unix socket is removed).
    let end_metrics = |task: Option<(Arc<Notify>, tokio::task::JoinHandle<()>)>| async move {
        if let Some((stop, task)) = task {
            stop.notify_one();
            let _ = task.await;
        }
    };
    let creating = (factory.enable_template
        && !factory.template_path.join(template::METADATA_FILE).exists())
    .then(|| {
        Progress::spinner(&format!(
            "Creating the template at {}",
            factory.template_path.display()
        ))
    });
    // Cached VMs are handed over to clients and outlive this server.
    let mut base = resolved.base.clone();
    base.qemu.die_with_parent = false;
    // A signal while the template is created drops the creation, which cleans up.
    let started = tokio::select! {
        started = CacheServerFactory::start(factory, &base, metrics.clone()) => started,
        stop = signals.recv() => {
            if let Some(progress) = creating {
                progress.abandon();
            }
            end_metrics(metrics_task).await;
            return Ok(signal_exit(stop));
        }
    };
    let server = match started {
        Ok(server) => {
            if let Some(progress) = creating {
                progress.finish("Template created");
            }
            server
        }
        Err(err) => {
            if let Some(progress) = creating {
                progress.abandon();
            }
            end_metrics(metrics_task).await;
            return Err(err.into());
        }
    };
    let shutdown = Arc::new(Notify::new());
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals.notify_one();
    });
    eprintln!(
        "vmfactory: {}",
        crate::hints(&format!(
            "VMCache server on {} (pid {}) keeping {} ready; stop it with `vmfactory factory destroy`",
            factory.vm_cache_endpoint.display(),
            std::process::id(),
            vms(factory.vm_cache_number as usize)
        ))
    );
    let warming = tokio::spawn(show_warm_up(server.cache(), factory.vm_cache_number));
    let served = vmcache::serve_locked(
        server.cache(),
        &factory.vm_cache_endpoint,
        &endpoint_lock,
        shutdown,
    )
    .await;
    warming.abort();
    eprintln!("vmfactory: VMCache server stopping");
    end_metrics(metrics_task).await;
    server.close().await?;
    served?;
    Ok(ExitCode::SUCCESS)
}

/// "1 VM", "3 VMs".
fn vms(count: usize) -> String {
    format!("{count} VM{}", if count == 1 { "" } else { "s" })
}

/// Shows the cache filling with warmed-up VMs until it is full the first time.
async fn show_warm_up(cache: Arc<CacheFactory>, size: u32) {
    let mut progress = Progress::bar("Warming up VMs", u64::from(size));
    loop {
        let ready = cache.ready_count().await;
        progress.set(ready as u64);
        if ready >= size as usize {
            progress.finish(&format!("{} ready", vms(size as usize)));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn init(resolved: Resolved) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    if factory.vm_cache_number > 0 {
        return serve(resolved).await;
    }
    if !factory.enable_template {
        bail!(
            "Nothing to initialize: set enable_template = true or vm_cache_number > 0 in the [factory] section of the configuration (see `vmfactory config show`)"
        );
    }
    let path = &factory.template_path;
    // Said before anything starts (creation checks again, under the template's lock).
    if path.join(template::METADATA_FILE).exists() {
        return Err(TemplateError::Exists(path.clone()).into());
    }
    let progress = Progress::spinner(&format!(
        "Creating the template at {} (boots one VM)",
        path.display()
    ));
    let started = Instant::now();
    let mut signals = Signals::install()?;
    crate::run::reap_orphans(&resolved.base.qemu.runtime_dir);
    // On a signal the creation is dropped: its VM is killed and what it made is removed.
    let created = tokio::select! {
        created = TemplateFactory::new(&resolved.base, path, resolved.base.backend()) => created,
        stop = signals.recv() => {
            progress.abandon();
            return Ok(signal_exit(stop));
        }
    };
    let template = match created {
        Ok(template) => {
            progress.finish("Template created");
            template
        }
        Err(err) => {
            progress.abandon();
            return Err(err.into());
        }
    };
    println!(
        "Template created at {} in {:.1} s",
        template.path().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `factory status`'s exit status when the configured factory cannot serve.
const EXIT_NOT_READY: u8 = 1;

#[derive(Debug, Serialize)]
struct StatusReport {
    template_path: PathBuf,
    enabled: bool,
    exists: bool,
    usable: bool,
    problem: Option<String>,
    /// How long a trial clone took to answer, ms.
    probe_ms: Option<f64>,
    metadata: Option<TemplateMetadata>,
}

/// What `factory status --json` prints: one object, its `factory` field saying which
/// kind of factory the configuration makes.
#[derive(Debug, Serialize)]
#[serde(tag = "factory", rename_all = "snake_case")]
enum Report<'a> {
    /// A template factory (and direct boots without one).
    Template(&'a StatusReport),
    /// A VMCache server.
    VmCache(&'a ServerReport),
}

#[derive(Debug, Serialize)]
struct ServerReport {
    endpoint: PathBuf,
    /// Whether the server answered.
    running: bool,
    /// Why it did not.
    problem: Option<String>,
    pid: Option<u32>,
    vms: Vec<ServerVm>,
}

#[derive(Debug, Serialize)]
struct ServerVm {
    pid: u32,
    cpu: u32,
    memory_mib: u32,
}

async fn status(resolved: Resolved, json: bool) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    if factory.vm_cache_number > 0 {
        let endpoint = &factory.vm_cache_endpoint;
        let (pid, vms) = match vmcache::status(endpoint).await {
            Ok(answer) => answer,
            Err(err) => {
                // A script reading the JSON learns that the server is down from it too
                // (and from the exit status, as a reader of the text does).
                let err = match vmcache::starting_server(endpoint) {
                    // Not "start one": it is starting, and a second would be refused.
                    Some(pid) => anyhow::anyhow!(
                        "The VMCache server (pid {pid}) is starting on {}: it answers once its \
                         template is made; try again in a moment",
                        endpoint.display()
                    ),
                    None => anyhow::Error::from(err),
                };
                let problem = crate::hints(&format!("{err:#}"));
                if json {
                    let report = Report::VmCache(&ServerReport {
                        endpoint: endpoint.clone(),
                        running: false,
                        problem: Some(problem.clone()),
                        pid: None,
                        vms: Vec::new(),
                    });
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
                eprintln!("vmfactory: {}", crate::printable(&problem));
                return Ok(ExitCode::from(EXIT_NOT_READY));
            }
        };
        let report = ServerReport {
            endpoint: endpoint.clone(),
            running: true,
            problem: None,
            pid: Some(pid),
            vms: vms
                .into_iter()
                .map(|vm| ServerVm {
                    pid: vm.pid,
                    cpu: vm.cpu,
                    memory_mib: vm.memory_mib,
                })
                .collect(),
        };
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&Report::VmCache(&report))?
            );
        } else {
            println!("VM cache server pid = {pid}");
            for vm in &report.vms {
                println!(
                    "VM pid = {} Cpu = {} Memory = {}MiB",
                    vm.pid, vm.cpu, vm.memory_mib
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let path = factory.template_path.clone();
    let fetched = TemplateFactory::fetch(&resolved.base, &path, resolved.base.backend()).await;
    let mut probe_ms = None;
    let (metadata, problem) = match fetched {
        Ok(template) => {
            let metadata = template.metadata().clone();
            // The files look right; check that a clone really comes up.
            match Factory::new(Arc::new(template)).probe().await {
                Ok(elapsed) => {
                    probe_ms = Some((elapsed.as_secs_f64() * 1e4).round() / 10.0);
                    (Some(metadata), None)
                }
                Err(err) => (
                    Some(metadata),
                    Some(crate::hints(&format!(
                        "broken: a clone does not come up ({err}); destroy it with `vmfactory factory destroy` and create it again"
                    ))),
                ),
            }
        }
        Err(TemplateError::Missing(_)) => (None, None),
        // Unusable: still say what it was built from, when that is readable.
        Err(err) => (
            template::read_metadata(&path).ok(),
            Some(crate::hints(&err.to_string())),
        ),
    };
    let report = StatusReport {
        template_path: path.clone(),
        enabled: factory.enable_template,
        exists: metadata.is_some(),
        usable: metadata.is_some() && problem.is_none(),
        problem,
        probe_ms,
        metadata,
    };
    // Not ready: the configuration asks for the template and it cannot serve.
    let code = if report.enabled && !report.usable {
        ExitCode::from(EXIT_NOT_READY)
    } else {
        ExitCode::SUCCESS
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Report::Template(&report))?
        );
        return Ok(code);
    }
    println!(
        "Template: {} ({})",
        path.display(),
        if report.enabled {
            "enable_template = true"
        } else {
            "enable_template = false"
        }
    );
    match &report.metadata {
        None if report.enabled => println!(
            "{}",
            crate::hints("No template: create one with `vmfactory factory init`")
        ),
        None => println!(
            "{}",
            crate::hints(
                "No factory is configured: every run boots its VM directly. To clone VMs \
                 from a template instead, set enable_template = true in the [factory] \
                 section of the configuration, then create one with `vmfactory factory init`"
            )
        ),
        Some(meta) => {
            println!(
                "Built from: kernel {} (sha256 {}), initrd {}, {}",
                meta.kernel.display(),
                meta.kernel_sha256.get(..12).unwrap_or(""),
                meta.initrd
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string()),
                meta.qemu_version
            );
            println!(
                "VM: {} vCPU{} (max {}), {} MiB (max {} MiB, {} slots), machine {}{}",
                meta.vm.vcpus,
                if meta.vm.vcpus == 1 { "" } else { "s" },
                meta.vm.max_vcpus,
                meta.vm.memory_mib,
                meta.vm.max_memory_mib,
                meta.vm.memory_slots,
                meta.vm.machine_type,
                meta.clocksource
                    .as_deref()
                    .filter(|name| !name.is_empty())
                    .map(|name| format!(", guest clocksource {name}"))
                    .unwrap_or_default()
            );
            match &report.problem {
                None => println!(
                    "Status: ready (a trial clone answered in {:.0} ms)",
                    report.probe_ms.unwrap_or_default()
                ),
                Some(problem) => println!("Status: unusable: {}", crate::printable(problem)),
            }
        }
    }
    Ok(code)
}

/// The VM for `run`, from the factory the configuration chooses (`opened` is set to how
/// long opening the factory took: for VMCache, connecting and its `Config` call): the VMCache server's,
/// the template's (grown by hot-plug when the request asks for more vCPUs or memory), or
/// a direct boot.
pub async fn get_vm(resolved: &Resolved, opened: &mut Option<Duration>) -> Result<Vm> {
    let started = Instant::now();
    let choice = FactoryChoice::from_settings(&resolved.settings.factory);
    let local = choice.needs_local_config().then_some(&resolved.base);
    let factory = Factory::open(&choice, local).await?;
    *opened = Some(started.elapsed());
    if let Some(notice) = factory.notice() {
        eprintln!("vmfactory: {}", crate::hints(notice));
    }
    let vm = factory.get_vm(&resolved.request).await;
    if let Some(reason) = factory.last_fallback() {
        eprintln!(
            "vmfactory: {}",
            crate::hints(&format!(
                "the factory failed ({reason}); the VM was booted directly"
            ))
        );
    }
    let context = match choice {
        FactoryChoice::VmCache(_) => "Cannot get a VM from the VMCache server",
        FactoryChoice::Template(_) if factory.notice().is_none() => {
            "Cannot get a VM from the template"
        }
        _ => "Cannot boot the VM",
    };
    vm.context(context)
}
