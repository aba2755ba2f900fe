//! The supervisor: one process per sandbox. It takes the sandbox's VM through
//! `Factory::get_vm`, owns the VM's hypervisor handle and agent connection, serves the
//! sandbox API and the forwarded agent API on its socket, and when told to stop (the
//! `Stop` RPC, SIGTERM, SIGINT, SIGHUP), stops the VM and removes the sandbox directory.
//! When the VM stops by itself it leaves the sandbox as `exited` (its record says why,
//! its log stays) until `sandbox rm`. VMs it boots or clones itself die with it (QEMU's
//! parent-death signal), so even a SIGKILL leaves at most a directory, which the next
//! listing sweeps.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vmfactory_factory::{ContainerSpec, Factory, RunningContainer, Vm, VmRequest};
use vmfactory_protocols::agent::agent_service_server::AgentServiceServer;
use vmfactory_protocols::contract::AGENT_MAX_MESSAGE_SIZE;
use vmfactory_protocols::mux;
use vmfactory_protocols::sandbox::sandbox_service_server::{SandboxService, SandboxServiceServer};
use vmfactory_protocols::sandbox::SandboxStatus;

use crate::dir::{ContainerRecord, SandboxDir, SandboxRecord, SandboxState};
use crate::proxy::AgentProxy;
use crate::SandboxError;

/// How long removing one container (in the guest, then its disk) may take at stop.
const CONTAINER_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor checks that its VM still runs.
const VM_WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// What a supervisor is asked to make.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Sandbox id.
    pub id: String,
    /// Sandbox name (may be empty).
    pub name: String,
    /// Runtime directory (sandboxes live under `<runtime_dir>/sandbox`).
    pub runtime_dir: PathBuf,
    /// The VM asked for.
    pub request: VmRequest,
    /// Containers to make in the VM, in order.
    pub containers: Vec<ContainerPlan>,
}

/// A container to make in a sandbox's VM: its image's disk on the host and what the
/// sandbox's record keeps of it.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    /// The image's read-only disk on the host.
    pub disk: PathBuf,
    /// The container (id = name; a pause init).
    pub spec: ContainerSpec,
    /// What the record keeps.
    pub record: ContainerRecord,
}

/// Runs one sandbox's supervisor.
#[derive(Debug)]
pub struct Supervisor;

#[derive(Debug)]
struct Shared {
    dir: SandboxDir,
    record: Mutex<SandboxRecord>,
    vm: Mutex<Option<Vm>>,
    containers: Mutex<Vec<RunningContainer>>,
    stop: Notify,
}

impl Shared {
    async fn set_state(&self, state: SandboxState) -> Result<(), Status> {
        let mut record = self.record.lock().await;
        if record.state == SandboxState::Exited {
            return Err(Status::failed_precondition("The sandbox's VM has stopped"));
        }
        record.state = state;
        self.dir
            .write(&record)
            .map_err(|err| Status::internal(err.to_string()))
    }
}

#[derive(Debug, Clone)]
struct Control {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl SandboxService for Control {
    async fn status(&self, _request: Request<()>) -> Result<Response<SandboxStatus>, Status> {
        let record = self.shared.record.lock().await.clone();
        Ok(Response::new(SandboxStatus {
            id: record.id,
            name: record.name,
            supervisor_pid: record.supervisor_pid,
            vm_pid: record.vm_pid,
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            created_unix: i64::try_from(record.created_unix).unwrap_or(0),
            state: record.state.as_str().to_string(),
        }))
    }

    async fn pause(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        if let Some(vm) = self.shared.vm.lock().await.as_ref() {
            vm.pause()
                .await
                .map_err(|err| Status::internal(err.to_string()))?;
        }
        self.shared.set_state(SandboxState::Paused).await?;
        Ok(Response::new(()))
    }

    async fn resume(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        if let Some(vm) = self.shared.vm.lock().await.as_ref() {
            vm.resume()
                .await
                .map_err(|err| Status::internal(err.to_string()))?;
        }
        self.shared.set_state(SandboxState::Running).await?;
        Ok(Response::new(()))
    }

    async fn stop(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        info!("Stop requested");
        self.shared.stop.notify_one();
        Ok(Response::new(()))
    }
}

/// Why the supervisor ends.
#[derive(Debug)]
enum End {
    Stopped,
    Signal(&'static str),
    VmDied,
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            Self::Stopped => "stop requested",
            Self::Signal(name) => name,
            Self::VmDied => "the VM died",
        }
    }
}

/// One line on why a VM stopped by itself, for its record: what the guest console said
/// last (a power-off, a reboot, a panic), else QEMU's exit status and what it usually
/// means.
fn exit_reason(exited: &vmfactory_hypervisor::HypervisorError) -> String {
    let vmfactory_hypervisor::HypervisorError::Exited { status, report, .. } = exited else {
        return format!(
            "the VM stopped ({})",
            exited.to_string().lines().next().unwrap_or_default()
        );
    };
    // The kernel's last words, when the console shows them.
    let said = report.lines().rev().find_map(|line| {
        if let Some(at) = line.find("Kernel panic - not syncing:") {
            Some(format!("the guest kernel panicked ({})", line[at..].trim()))
        } else if line.contains("reboot: Power down") {
            Some("the guest powered off".to_string())
        } else if line.contains("reboot: Restarting system") {
            Some("the guest rebooted".to_string())
        } else {
            None
        }
    });
    let adopted = status == vmfactory_hypervisor::qemu::ADOPTED_EXIT_STATUS;
    if let Some(said) = said {
        return if adopted {
            format!("{said} (QEMU exited)")
        } else {
            format!("{said} (QEMU {status})")
        };
    }
    if adopted {
        // Not our child (a VMCache server started it): its status is not ours to read.
        return "QEMU exited (a VM from a VMCache server: its exit status is not known here): \
                the guest shut down, rebooted or panicked, or QEMU was stopped"
            .to_string();
    }
    let meaning = if status == "exit status: 0" {
        "the guest shut down, rebooted or panicked, or QEMU was stopped (SIGTERM)"
    } else if status.contains("SIGKILL") {
        "QEMU was killed (SIGKILL; the kernel's out-of-memory killer sends it too)"
    } else if status.contains("signal") {
        "QEMU was stopped by a signal or crashed"
    } else {
        "QEMU failed"
    };
    format!("QEMU exited ({status}): {meaning}")
}

impl Supervisor {
    /// Makes the sandbox and serves it until it is stopped; `ready` is told once the
    /// sandbox answers on its socket, with its record (or the error that prevented it).
    /// The sandbox directory is gone when this returns, unless the VM stopped by itself:
    /// then its record says `exited` and why, and stays with the log until `sandbox rm`.
    pub async fn run(
        options: SupervisorOptions,
        factory: Factory,
        ready: impl FnOnce(Result<&SandboxRecord, &SandboxError>),
    ) -> Result<(), SandboxError> {
        let dir = SandboxDir::new(&options.runtime_dir, &options.id);
        let (term, int, hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
            _ => {
                let err = SandboxError::Serve("Cannot handle signals".into());
                ready(Err(&err));
                return Err(err);
            }
        };
        let started = Self::start(&options, &dir, &factory).await;
        let (shared, listener) = match started {
            Ok(started) => started,
            Err(err) => {
                ready(Err(&err));
                let _ = dir.remove();
                return Err(err);
            }
        };
        let record = shared.record.lock().await.clone();
        ready(Ok(&record));
        let end = Self::serve(shared.clone(), listener, (term, int, hup)).await;
        info!(
            reason = end.reason(),
            id = options.id,
            "Supervisor stopping"
        );
        match (end, shared.vm.lock().await.take()) {
            (End::VmDied, Some(vm)) => {
                // Kept for its user: the record says why, the log has the guest's last
                // lines. Written under the record's lock, which pause and resume take
                // too (they refuse an exited sandbox).
                let exited = vm.hypervisor().exited().await;
                warn!("The sandbox's VM stopped by itself: {exited}");
                let mut record = shared.record.lock().await;
                record.state = SandboxState::Exited;
                record.exit_reason = Some(exit_reason(&exited));
                record.vm_pid = 0;
                record.vm_dir = PathBuf::new();
                let _ = vm.stop().await;
                let _ = std::fs::remove_file(dir.path.join(crate::dir::VM_LINK));
                return dir.write(&record);
            }
            (_, Some(vm)) => {
                Self::remove_containers(&vm, &shared.containers).await;
                if let Err(err) = vm.stop().await {
                    warn!(%err, "Stopping the sandbox VM failed");
                }
            }
            (_, None) => {}
        }
        dir.remove()
    }

    /// Removes the containers (in the guest) and detaches their disks, newest first, so
    /// the VM holds no image when it stops. A failure is logged: stopping the VM frees
    /// whatever is left.
    async fn remove_containers(vm: &Vm, containers: &Mutex<Vec<RunningContainer>>) {
        let mut containers = containers.lock().await;
        while let Some(container) = containers.pop() {
            let id = container.id.clone();
            match tokio::time::timeout(CONTAINER_REMOVE_TIMEOUT, vm.remove_container(container))
                .await
            {
                Ok(Ok(())) => info!(
                    container = id,
                    "Removed the container and detached its disk"
                ),
                Ok(Err(err)) => warn!(container = id, %err, "Removing the container failed"),
                Err(_) => warn!(container = id, "Removing the container timed out"),
            }
        }
    }

    /// Makes the planned containers in `vm`; on failure removes those already made.
    async fn make_containers(
        vm: &Vm,
        plans: &[ContainerPlan],
    ) -> Result<Vec<RunningContainer>, SandboxError> {
        let made = Mutex::new(Vec::new());
        for plan in plans {
            match vm.run_container(&plan.disk, &plan.spec).await {
                Ok(container) => made.lock().await.push(container),
                Err(err) => {
                    Self::remove_containers(vm, &made).await;
                    return Err(SandboxError::Container {
                        name: plan.record.name.clone(),
                        source: err,
                    });
                }
            }
        }
        Ok(made.into_inner())
    }

    /// Creates the directory, gets the VM and binds the socket.
    async fn start(
        options: &SupervisorOptions,
        dir: &SandboxDir,
        factory: &Factory,
    ) -> Result<(Arc<Shared>, UnixListener), SandboxError> {
        dir.create()?;
        let mut record = SandboxRecord::creating(&options.id, &options.name);
        dir.write(&record)?;
        let vm = factory.get_vm(&options.request).await?;
        record.vm_pid = vm.pid().unwrap_or(0);
        record.vm_dir = vm.hypervisor().vm_dir().to_path_buf();
        record.vcpus = vm.cpu;
        record.memory_mib = vm.memory_mib;
        dir.link_vm(&record.vm_dir)?;
        let containers = match Self::make_containers(&vm, &options.containers).await {
            Ok(containers) => containers,
            Err(err) => {
                let _ = vm.stop().await;
                return Err(err);
            }
        };
        record.containers = options
            .containers
            .iter()
            .map(|plan| plan.record.clone())
            .collect();
        record.state = SandboxState::Running;
        let socket = dir.socket();
        let _ = std::fs::remove_file(&socket);
        let io = |action: &'static str| {
            let socket = socket.clone();
            move |source| SandboxError::Io {
                action,
                path: socket,
                source,
            }
        };
        let listener = UnixListener::bind(&socket).map_err(io("Cannot listen on"))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io("Cannot restrict the permissions of"))?;
        dir.write(&record)?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            record: Mutex::new(record),
            vm: Mutex::new(Some(vm)),
            containers: Mutex::new(containers),
            stop: Notify::new(),
        });
        Ok((shared, listener))
    }

    async fn serve(
        shared: Arc<Shared>,
        listener: UnixListener,
        signals: (
            tokio::signal::unix::Signal,
            tokio::signal::unix::Signal,
            tokio::signal::unix::Signal,
        ),
    ) -> End {
        let (mut term, mut int, mut hup) = signals;
        let agent = match shared.vm.lock().await.as_ref() {
            Some(vm) => vm.agent().grpc(),
            None => return End::VmDied,
        };
        let proxy = AgentServiceServer::new(AgentProxy::new(agent))
            .max_decoding_message_size(AGENT_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(AGENT_MAX_MESSAGE_SIZE);
        let control = SandboxServiceServer::new(Control {
            shared: shared.clone(),
        });
        // Both APIs on one socket, over the agent connection's transport (`mux`): the
        // sandbox's control calls and the agent API forwarded to the VM.
        let api = tower::ServiceExt::map_request(
            tonic::service::Routes::new(control).add_service(proxy),
            |request: http::Request<mux::RecvBody>| request.map(tonic::body::boxed),
        );
        let (shut_down, shutdown) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        let mut server = Box::pin(async {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => return err,
                };
                let api = api.clone();
                let mut shutdown = shutdown.clone();
                connections.spawn(async move {
                    let shutdown = async move {
                        let _ = shutdown.wait_for(|&down| down).await;
                    };
                    // A client that breaks the protocol only loses its own connection.
                    let _ = mux::serve(stream, api, shutdown).await;
                });
                // Forget the connections already over.
                while connections.try_join_next().is_some() {}
            }
        });
        let watch_vm = async {
            loop {
                tokio::time::sleep(VM_WATCH_INTERVAL).await;
                let alive = shared
                    .vm
                    .lock()
                    .await
                    .as_ref()
                    .is_some_and(|vm| vm.hypervisor().is_running());
                if !alive {
                    return;
                }
            }
        };
        let end = tokio::select! {
            // A stop asked for wins over a VM found dead at the same moment: `rm` then
            // gets what it asked for.
            biased;
            () = shared.stop.notified() => End::Stopped,
            _ = term.recv() => End::Signal("SIGTERM"),
            _ = int.recv() => End::Signal("SIGINT"),
            _ = hup.recv() => End::Signal("SIGHUP"),
            () = watch_vm => End::VmDied,
            served = &mut server => {
                warn!(err = %served, "Sandbox API server failed");
                End::Stopped
            }
        };
        // No new connection or call; let the calls under way (a Stop call's answer)
        // finish, for at most 2 s; then end every connection and remove the socket.
        drop(server);
        let _ = shut_down.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.abort_all();
        let _ = std::fs::remove_file(shared.dir.socket());
        end
    }
}
