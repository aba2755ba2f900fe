//! A VM: a hypervisor handle plus a connection to its guest agent.

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rand::RngCore;
use tracing::{debug, info};
use vmfactory_hypervisor::qemu::new_vm_id;
use vmfactory_hypervisor::{Backend, Hypervisor, HypervisorError, MemoryBackend};

use crate::agent_client::{AgentClient, AgentError, GuestDetails};
use crate::agent_port::PortWatch;
use crate::agent_process::{ExecOutput, ExecRequest};
use crate::config::VmConfig;
use crate::handover::{HandOverError, HandOverRecord, HANDOVER_FORMAT_VERSION};
use crate::pool::Poolable;

/// Bytes of host entropy sent to a guest on reseed.
pub const RESEED_BYTES: usize = 512;
/// How long a warm-up may wait for the agent.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// One hand-out attempt of [`Vm::make_ready`]; a connection that gets no answer is
/// replaced, since the guest may still have been serving a previous owner's connection
/// when it was paused.
const HAND_OUT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where [`Vm::make_ready`] spent its time, from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyTimes {
    /// QEMU answered `cont`.
    pub resumed: Duration,
    /// The guest answered the hand-out: the VM is ready.
    pub answered: Duration,
    /// Of that, the guest's own work on the hand-out.
    pub guest: Duration,
}

/// Errors of VM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A hand-over record could not be read.
    #[error(transparent)]
    HandOver(#[from] HandOverError),
    /// A remote factory failed.
    #[error("VMCache server: {0}")]
    Remote(String),
    /// The agent did not answer in time.
    #[error("Guest agent did not answer within {seconds:.1} s{report}")]
    AgentTimeout {
        /// How long we waited.
        seconds: f64,
        /// Last lines of the guest console.
        report: String,
    },
}

/// A running micro-VM with a connection to its guest agent.
#[derive(Debug)]
pub struct Vm {
    hypervisor: Box<dyn Hypervisor>,
    agent: AgentClient,
    /// vCPUs the VM has now.
    pub cpu: u32,
    /// Guest RAM the VM has now, MiB.
    pub memory_mib: u32,
    /// vCPUs hot-plugged beyond the factory's default.
    pub cpu_delta: u32,
    /// Adopted from a giver that resumed it ([`HandOverRecord::running`]): the next
    /// [`Vm::make_ready`] need not send `cont`.
    running_on_adoption: bool,
    /// Warmed up ([`Vm::warm_up`]) and not made ready since: a second warm-up would redo
    /// translated work for nothing.
    warmed: bool,
}

impl Vm {
    /// Boots a VM from `config` with `backend` and waits until its agent answers. The agent
    /// connection is opened as soon as the VM exists, while the guest kernel still boots,
    /// so the first `Check` is answered the moment the agent listens.
    pub async fn boot(backend: &dyn Backend, config: &VmConfig) -> Result<Self, VmError> {
        let started = Instant::now();
        let spec = config.spec(new_vm_id(), MemoryBackend::Memfd);
        let mut hypervisor = backend.boot(&spec).await?;
        debug!(id = %spec.id, elapsed = ?started.elapsed(), "Hypervisor is up");
        match connect_agent(hypervisor.as_ref(), config.boot_timeout).await {
            Ok(agent) => {
                info!(id = %spec.id, elapsed = ?started.elapsed(), "VM ready");
                Ok(Self {
                    hypervisor,
                    agent,
                    cpu: config.vcpus,
                    memory_mib: config.memory_mib,
                    cpu_delta: 0,
                    running_on_adoption: false,
                    warmed: false,
                })
            }
            Err(err) => {
                let _ = hypervisor.stop().await;
                Err(err)
            }
        }
    }

    /// A VM around a running (or paused) hypervisor; the agent connection is made on first
    /// use, so a paused VM that may change hands never has bytes in flight in its port.
    pub fn from_hypervisor(hypervisor: Box<dyn Hypervisor>, cpu: u32, memory_mib: u32) -> Self {
        let agent = AgentClient::connect_lazy(&hypervisor.channels().agent_socket);
        Self {
            hypervisor,
            agent,
            cpu,
            memory_mib,
            cpu_delta: 0,
            running_on_adoption: false,
            warmed: false,
        }
    }

    /// Takes over the VM `record` describes with `backend`.
    pub async fn adopt(backend: &dyn Backend, record: HandOverRecord) -> Result<Self, VmError> {
        let hypervisor = backend.adopt(record.hypervisor).await?;
        let mut vm = Self::from_hypervisor(hypervisor, record.cpu, record.memory_mib);
        vm.cpu_delta = record.cpu_delta;
        vm.running_on_adoption = record.running;
        Ok(vm)
    }

    /// Gives the VM to another owner (VMCache `GetBaseVM`): closes our agent connection and
    /// the hypervisor's control session and returns the record to adopt it with; the VM
    /// keeps running.
    pub fn hand_over(self) -> Result<HandOverRecord, VmError> {
        self.hand_over_as(false)
    }

    /// Resumes the (paused) VM on our own QMP session and gives it away running
    /// ([`HandOverRecord::running`]): the new owner's first call, the hand-out, then
    /// finds the guest already running and needs no QMP session of its own to start it
    /// (a QMP connection costs QEMU's greeting and `qmp_capabilities`, milliseconds
    /// under TCG, before `cont` could even be sent). The VMCache server's `GetBaseVM`.
    pub async fn resume_and_hand_over(self) -> Result<HandOverRecord, VmError> {
        if let Err(err) = self.resume().await {
            let _ = self.discard().await;
            return Err(err);
        }
        self.hand_over_as(true)
    }

    fn hand_over_as(self, running: bool) -> Result<HandOverRecord, VmError> {
        self.agent.disconnect();
        let id = self.id().to_string();
        let (cpu, memory_mib, cpu_delta) = (self.cpu, self.memory_mib, self.cpu_delta);
        let hypervisor = self.hypervisor.hand_over()?;
        Ok(HandOverRecord {
            format_version: HANDOVER_FORMAT_VERSION,
            id,
            cpu,
            memory_mib,
            cpu_delta,
            hypervisor,
            running,
        })
    }

    /// The VM's id.
    pub fn id(&self) -> &str {
        self.hypervisor.id()
    }

    /// The hypervisor process id.
    pub fn pid(&self) -> Option<u32> {
        self.hypervisor.pid()
    }

    /// The hypervisor handle.
    pub fn hypervisor(&self) -> &dyn Hypervisor {
        self.hypervisor.as_ref()
    }

    /// The agent connection.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Drops the agent connection and prepares a new one (made on first use): the agent
    /// serves the next connection after it has seen the old one end.
    pub fn reconnect_agent(&mut self) {
        self.agent.disconnect();
        self.agent = AgentClient::connect_lazy(&self.hypervisor.channels().agent_socket);
    }

    /// Runs the (paused) VM through one agent connection (a hand-out and one trivial
    /// process) and pauses it again once the agent has let go of it: the code a later
    /// owner's first calls run is then already translated (TCG), so handing the VM out
    /// and running its first command cost milliseconds, not a cold start. Its
    /// RNG and clock are refreshed when it is handed out, as for any VM.
    pub async fn warm_up(&mut self) -> Result<(), VmError> {
        let started = Instant::now();
        self.resume().await?;
        // A hand-out (what a new owner's first call is) and one trivial process: the
        // guest code of both is then already translated, so handing out (its CRNG reseed,
        // clock and hostname calls, cold: 15-35 ms under TCG) and the first command take
        // the warm path. The real hand-out later overwrites all the hand-out set.
        let exercise = async {
            self.hand_out().await?;
            self.agent
                .exec(ExecRequest {
                    argv: vec!["true".into()],
                    ..ExecRequest::default()
                })
                .await
                .map_err(VmError::from)
        };
        tokio::select! {
            exercised = exercise => drop(exercised?),
            err = self.hypervisor.exited() => return Err(err.into()),
            () = tokio::time::sleep(WARM_UP_TIMEOUT) => {
                return Err(VmError::AgentTimeout {
                    seconds: WARM_UP_TIMEOUT.as_secs_f64(),
                    report: self.hypervisor.failure_report(),
                })
            }
        }
        let watch = PortWatch::mark(self.hypervisor.as_ref());
        self.agent.disconnect();
        watch
            .wait_reopened(self.hypervisor.as_ref(), Duration::from_secs(10))
            .await?;
        self.agent = AgentClient::connect_lazy(&self.hypervisor.channels().agent_socket);
        self.pause().await?;
        self.warmed = true;
        debug!(id = self.id(), elapsed = ?started.elapsed(), "VM warmed up");
        Ok(())
    }

    /// True when the VM was warmed up ([`Vm::warm_up`]) and not made ready since.
    pub fn is_warmed(&self) -> bool {
        self.warmed
    }

    /// Resumes a paused base VM and hands it out (`HandOut`: entropy, clock, hostname),
    /// which is also the check that its agent answers. `cont` and the hand-out go out
    /// together: the request waits in the agent socket and the guest reads it as soon as
    /// it runs, so the hand-out costs no round trip after QEMU's answer. A failed or
    /// silent attempt (a previous owner's connection may still be in the guest) reconnects
    /// and tries again until `timeout`; applying the hand-out twice is harmless. A VM
    /// adopted running (its VMCache server resumed it) gets the hand-out alone, and a
    /// `cont` only should that fail.
    pub async fn make_ready(&mut self, timeout: Duration) -> Result<ReadyTimes, VmError> {
        let started = Instant::now();
        self.warmed = false;
        let mut resumed = None;
        // A VM its giver resumed needs no `cont` (and no QMP session): the hand-out alone.
        let skipped_resume = std::mem::take(&mut self.running_on_adoption);
        let mut attempt = if skipped_resume {
            resumed = Some(Duration::ZERO);
            self.hand_out_attempt().await
        } else {
            let resume = self.resume();
            let first = self.hand_out_attempt();
            tokio::pin!(resume, first);
            let mut answer = None;
            while resumed.is_none() || answer.is_none() {
                tokio::select! {
                    done = &mut resume, if resumed.is_none() => {
                        done?;
                        resumed = Some(started.elapsed());
                    }
                    handed = &mut first, if answer.is_none() => answer = Some(handed),
                }
            }
            answer.and_then(|handed| handed)
        };
        let mut resume_before_retry = skipped_resume;
        loop {
            match attempt {
                Some(Ok(guest)) => {
                    let times = ReadyTimes {
                        resumed: resumed.unwrap_or_default(),
                        answered: started.elapsed(),
                        guest,
                    };
                    debug!(id = self.id(), ?times, "VM ready for use");
                    return Ok(times);
                }
                Some(Err(err)) => {
                    if let VmError::Hypervisor(_) = err {
                        return Err(err);
                    }
                    debug!(%err, "Hand-out failed; reconnecting");
                }
                None => debug!("Hand-out timed out; reconnecting"),
            }
            if started.elapsed() > timeout {
                return Err(VmError::AgentTimeout {
                    seconds: timeout.as_secs_f64(),
                    report: self.hypervisor.failure_report(),
                });
            }
            if std::mem::take(&mut resume_before_retry) {
                // The record said running; make sure it is (`cont` on a running VM is a
                // no-op).
                self.resume().await?;
            }
            self.reconnect_agent();
            tokio::time::sleep(Duration::from_millis(20)).await;
            attempt = self.hand_out_attempt().await;
        }
    }

    /// One hand-out: `None` when the guest did not answer within
    /// [`HAND_OUT_ATTEMPT_TIMEOUT`]; a hypervisor error when the VM died.
    async fn hand_out_attempt(&self) -> Option<Result<Duration, VmError>> {
        tokio::select! {
            handed = self.hand_out() => Some(handed),
            err = self.hypervisor.exited() => Some(Err(err.into())),
            () = tokio::time::sleep(HAND_OUT_ATTEMPT_TIMEOUT) => None,
        }
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<(), VmError> {
        Ok(self.hypervisor.pause().await?)
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self) -> Result<(), VmError> {
        Ok(self.hypervisor.resume().await?)
    }

    /// Stops the VM and removes its directory.
    pub async fn stop(mut self) -> Result<(), VmError> {
        Ok(self.hypervisor.stop().await?)
    }

    /// Throws the VM away at once (no graceful shutdown) and removes its directory.
    pub async fn discard(mut self) -> Result<(), VmError> {
        self.agent.disconnect();
        Ok(Hypervisor::discard(self.hypervisor.as_mut()).await?)
    }

    /// Runs a command in the guest; fails fast if the VM dies meanwhile.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, VmError> {
        tokio::select! {
            result = self.agent.exec(request) => Ok(result?),
            err = self.hypervisor.exited() => Err(err.into()),
        }
    }

    /// Sends [`RESEED_BYTES`] of host entropy to the guest RNG and reseeds it.
    pub async fn reseed_rng(&self) -> Result<(), VmError> {
        let mut entropy = vec![0u8; RESEED_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut entropy);
        Ok(self.agent.reseed(entropy).await?)
    }

    /// The hostname a VM gets at hand-out: `vm-<id>`, or none (left as it is) when the
    /// id does not make a valid hostname.
    pub fn hostname(&self) -> Option<String> {
        let name = format!("vm-{}", self.id());
        vmfactory_protocols::contract::check_hostname(&name)
            .is_ok()
            .then_some(name)
    }

    /// Gives the VM its own identity in one agent round trip (`HandOut`): fresh host
    /// entropy ([`RESEED_BYTES`]) with a CRNG reseed, the host's clock, and
    /// [`Vm::hostname`]. An agent without `HandOut` gets the separate `ReseedRandomDev`
    /// and `SetGuestDateTime` calls instead.
    pub async fn refresh_identity(&self) -> Result<(), VmError> {
        self.hand_out().await.map(drop)
    }

    /// [`Vm::refresh_identity`], returning the guest's own time on it (zero when the
    /// agent has no `HandOut` and separate calls were made).
    async fn hand_out(&self) -> Result<Duration, VmError> {
        let mut entropy = vec![0u8; RESEED_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut entropy);
        let hostname = self.hostname().unwrap_or_default();
        match self
            .agent
            .hand_out(entropy, SystemTime::now(), hostname)
            .await
        {
            Ok(guest) => {
                debug!(id = self.id(), ?guest, "Handed out");
                Ok(guest)
            }
            Err(err) if err.is_unimplemented() => {
                debug!(id = self.id(), "The agent has no HandOut; separate calls");
                let (reseeded, synced) = tokio::join!(self.reseed_rng(), self.sync_time());
                reseeded?;
                synced.map(|()| Duration::ZERO)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Sets the guest clock to the host's.
    pub async fn sync_time(&self) -> Result<(), VmError> {
        Ok(self.agent.set_time(SystemTime::now()).await?)
    }

    /// Kernel release, online CPUs, memory and agent version of the guest.
    pub async fn details(&self) -> Result<GuestDetails, VmError> {
        Ok(self.agent.details().await?)
    }
}

#[async_trait]
impl Poolable for Vm {
    fn pool_id(&self) -> String {
        self.id().to_string()
    }

    fn is_alive(&self) -> bool {
        self.hypervisor.is_running()
    }

    async fn discard(self) {
        let _ = self.stop().await;
    }
}

/// Connects to the agent of `hypervisor` and waits for a successful `Check`, unless the
/// VM dies or `timeout` passes first.
pub async fn connect_agent(
    hypervisor: &dyn Hypervisor,
    timeout: Duration,
) -> Result<AgentClient, VmError> {
    let socket = hypervisor.channels().agent_socket;
    let attempt = async {
        loop {
            match AgentClient::connect(&socket).await {
                Ok(agent) => match agent.check().await {
                    Ok(()) => return agent,
                    Err(err) => debug!(%err, "Agent check failed; retrying"),
                },
                Err(err) => debug!(%err, "Agent socket not ready; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        agent = attempt => Ok(agent),
        err = hypervisor.exited() => Err(err.into()),
        () = tokio::time::sleep(timeout) => Err(VmError::AgentTimeout {
            seconds: timeout.as_secs_f64(),
            report: hypervisor.failure_report(),
        }),
    }
}
