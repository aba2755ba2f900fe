//! The template factory: boot one VM, pause it, save its device state, keep its memory in a
//! file on tmpfs; every clone maps that file copy-on-write and loads the state.

//!
//! - `metadata`: what a template was built from, and the comparison with the configuration;
//! - `tmpfs`: the tmpfs its memory lives on, and removing a template;
//! - this module: creating, opening and cloning templates, with an optional warm pool of
//!   clones restored ahead of demand.

mod metadata;
mod tmpfs;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tracing::{debug, info, warn};
use vmfactory_hypervisor::qemu::new_vm_id;
use vmfactory_hypervisor::{Backend, Hypervisor, HypervisorError, MemoryBackend};

use crate::agent_client::AgentClient;
use crate::agent_port::PortWatch;
use crate::base::{FactoryBase, FactoryError};
use crate::cache::REFILL_GRACE;
use crate::config::VmConfig;
use crate::lock::{LockError, LockKind, PathLock};
use crate::pool::{Maker, ReadyPool};
use crate::vm::{connect_agent, Vm, VmError};

use self::metadata::{expected_metadata, sha256_file};
pub use self::metadata::{read_metadata, FileStamp, TemplateMetadata, TemplateVmConfig};
pub use self::tmpfs::{destroy, is_mountpoint, Ownership, OWNER_MARKER};
use self::tmpfs::{prepare_tmpfs, remove_ours};

/// Version of the template layout and metadata. 2: VMs have a `vmgenid` device; 3: q35
/// VMs also have disk hot-plug ports; 4: no SATA, SMBus, PS/2 or vmport devices; 5: TCG
/// guests keep the local APIC timer (`lapic_timer_hz`, not `noapictimer`), so clones are
/// tickless when idle; 6: saved after the guest kernel refined its TSC frequency (see
/// [`wait_for_refined_clock`]); 7: TCG guests' CPU has no ERMS/FSRM
/// ([`vmfactory_hypervisor::qemu::cmdline::TCG_CPU`]), so the guest kernel picked its
/// `rep movsq` copies; 8: the agent's virtio-serial device has 2 ports, not 31, and TCG
/// VMs have no `kvmvapic` ([`vmfactory_hypervisor::qemu::cmdline::AGENT_SERIAL_MAX_PORTS`],
/// [`vmfactory_hypervisor::qemu::cmdline::TCG_NO_VAPIC`]). A state saved by an older
/// version no longer loads into today's command line, or (5, 6, 7) would keep an old
/// template's ticking guest, make every clone refine its clock on its hand-out path, or
/// keep the byte-at-a-time copies.
pub const TEMPLATE_FORMAT_VERSION: u32 = 8;
/// The clocksource a TCG guest kernel runs on until it has refined the TSC's frequency.
const UNREFINED_CLOCKSOURCE: &str = "tsc-early";
/// How long a new template waits for its kernel to refine the TSC before it is saved
/// anyway (the refinement is due a second after the kernel found the TSC).
const CLOCK_REFINE_TIMEOUT: Duration = Duration::from_secs(3);
/// Metadata file inside the template directory.
pub const METADATA_FILE: &str = "metadata.json";
/// Guest memory file inside the template directory.
pub const MEMORY_FILE: &str = "memory";
/// Device state file inside the template directory.
pub const STATE_FILE: &str = "state";
/// Head room of the template tmpfs beyond guest memory, MiB.
const TMPFS_HEADROOM_MIB: u32 = 8;
/// How long the template VM's agent may take to go back to waiting for a host.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the template factory.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template already exists where a new one should go.
    #[error("A template already exists at {0}: remove it with `vmfactory factory destroy` first")]
    Exists(PathBuf),
    /// No template where one should be.
    #[error("No template at {0}: create one with `vmfactory factory init`")]
    Missing(PathBuf),
    /// The template's files are damaged.
    #[error("Template at {path} is damaged ({problem}): destroy it with `vmfactory factory destroy` and create it again")]
    Corrupt {
        /// The template directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The template was built from something else than the current configuration.
    #[error("Template at {path} does not match the configuration: {differences}. Destroy it with `vmfactory factory destroy` and create it again")]
    Mismatch {
        /// The template directory.
        path: PathBuf,
        /// What differs, `; `-separated.
        differences: String,
    },
    /// `template_path` exists and is not a directory.
    #[error("template_path {0} exists and is not a directory: set template_path to a missing or empty directory, or move that file away")]
    NotADirectory(PathBuf),
    /// `template_path` is a directory with files vmfactory did not put there.
    #[error("template_path {0} is a directory holding files vmfactory did not make: set template_path to a missing or empty directory (vmfactory never deletes what it did not create), or empty it yourself")]
    NotOurs(PathBuf),
    /// The tmpfs at `template_path` has too little room for the guest memory.
    #[error("template_path {path} is on a tmpfs with {free_mib} MiB free, and the template needs {need_mib} MiB (guest memory + {TMPFS_HEADROOM_MIB} MiB): make that tmpfs bigger, lower default_memory, or set template_path to a missing directory so that vmfactory mounts a tmpfs of its own")]
    NoSpace {
        /// The template directory.
        path: PathBuf,
        /// Room left on its tmpfs, MiB.
        free_mib: u64,
        /// Room the template needs, MiB.
        need_mib: u32,
    },
    /// The tmpfs could not be mounted.
    #[error("Cannot mount a tmpfs at {path} ({reason}): run as root (CAP_SYS_ADMIN), or set template_path to a directory on an existing tmpfs such as /dev/shm/vmfactory-template")]
    Mount {
        /// Where.
        path: PathBuf,
        /// Why (in the message, before the advice, so not a `source` printed again after
        /// it).
        reason: std::io::Error,
    },
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process creates or destroys this template.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// Booting or talking to the template VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

pub(crate) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io {
        action,
        path,
        source,
    }
}

/// A template on disk, ready to be cloned.
#[derive(Debug)]
pub struct TemplateFactory {
    config: VmConfig,
    backend: Arc<dyn Backend>,
    path: PathBuf,
    metadata: TemplateMetadata,
    pool: Option<ReadyPool<Vm>>,
}

impl TemplateFactory {
    /// Creates a template at `path` from `config` on `backend`: mounts a tmpfs, boots the
    /// template VM on a shared memory file there, waits for its agent, lets the agent go
    /// back to waiting for a host, saves the device state and stops the template VM.
    /// Holds the template's lock throughout: a concurrent creation or destroy is refused.
    pub async fn new(
        config: &VmConfig,
        path: &Path,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, TemplateError> {
        let _lock = PathLock::acquire(path, LockKind::Template)?;
        if path.join(METADATA_FILE).exists() {
            return Err(TemplateError::Exists(path.to_path_buf()));
        }
        let mut metadata = expected_metadata(config, backend.as_ref(), None)?;
        // Undoes what this creation made on an error, and also when this future is
        // dropped half-way (a signal, a caller's timeout). Declared after the lock, so it
        // runs while the lock is still held.
        let mut unfinished = UnfinishedTemplate { path, done: false };
        let ownership = prepare_tmpfs(path, config.memory_mib + TMPFS_HEADROOM_MIB)?;
        let mounted = ownership.mounted_tmpfs;
        Self::create(config, backend.as_ref(), path, &mut metadata, mounted).await?;
        unfinished.done = true;
        Ok(Self {
            config: config.clone(),
            backend,
            path: path.to_path_buf(),
            metadata,
            pool: None,
        })
    }

    async fn create(
        config: &VmConfig,
        backend: &dyn Backend,
        path: &Path,
        metadata: &mut TemplateMetadata,
        mounted: bool,
    ) -> Result<(), TemplateError> {
        let started = Instant::now();
        let memory = MemoryBackend::File {
            path: path.join(MEMORY_FILE),
            share: true,
        };
        let spec = config.spec(new_vm_id(), memory);
        let mut vm = backend.boot(&spec).await?;
        let saved = async {
            let agent = connect_agent(vm.as_ref(), config.boot_timeout).await?;
            let clocksource = wait_for_refined_clock(&agent).await?;
            // The agent sees the host leave, closes its port and opens it again to wait for
            // the next host: saved from then on, every clone resumes with it waiting.
            let watch = PortWatch::mark(vm.as_ref());
            agent.disconnect();
            watch.wait_reopened(vm.as_ref(), REOPEN_TIMEOUT).await?;
            let generation_id = vm.vm_generation_id().await?;
            vm.save_state(&path.join(STATE_FILE)).await?;
            Ok::<_, TemplateError>((generation_id, clocksource))
        }
        .await;
        let stopped = vm.stop().await;
        let (generation_id, clocksource) = saved?;
        metadata.vm_generation_id = generation_id;
        metadata.clocksource = Some(clocksource);
        stopped?;
        let state = path.join(STATE_FILE);
        metadata.state_sha256 = sha256_file(&state)?;
        metadata.memory_bytes = std::fs::metadata(path.join(MEMORY_FILE))
            .map_err(io_error("Cannot stat", &path.join(MEMORY_FILE)))?
            .len();
        metadata.mounted_tmpfs = mounted;
        metadata.created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let json = serde_json::to_vec_pretty(&metadata).map_err(|err| TemplateError::Corrupt {
            path: path.to_path_buf(),
            problem: err.to_string(),
        })?;
        let file = path.join(METADATA_FILE);
        std::fs::write(&file, json).map_err(io_error("Cannot write", &file))?;
        info!(path = %path.display(), elapsed = ?started.elapsed(), "Template created");
        Ok(())
    }

    /// Opens the template at `path` after checking that it is intact and was built from
    /// the same hypervisor version, kernel, initrd and VM settings as `config`.
    pub async fn fetch(
        config: &VmConfig,
        path: &Path,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, TemplateError> {
        let metadata = read_metadata(path)?;
        let corrupt = |problem: String| TemplateError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        if metadata.format_version != TEMPLATE_FORMAT_VERSION {
            return Err(TemplateError::Mismatch {
                path: path.to_path_buf(),
                differences: format!(
                    "format version was {} and is now {TEMPLATE_FORMAT_VERSION}",
                    metadata.format_version
                ),
            });
        }
        let state = path.join(STATE_FILE);
        if !state.is_file() {
            return Err(corrupt(format!("{STATE_FILE} is missing")));
        }
        if sha256_file(&state)? != metadata.state_sha256 {
            return Err(corrupt(format!(
                "{STATE_FILE} does not match its recorded digest"
            )));
        }
        match std::fs::metadata(path.join(MEMORY_FILE)) {
            Ok(memory) if memory.len() == metadata.memory_bytes => {}
            Ok(memory) => {
                return Err(corrupt(format!(
                    "{MEMORY_FILE} has {} bytes, expected {}",
                    memory.len(),
                    metadata.memory_bytes
                )))
            }
            Err(_) => return Err(corrupt(format!("{MEMORY_FILE} is missing"))),
        }
        let expected = expected_metadata(config, backend.as_ref(), Some(&metadata))?;
        let differences = metadata.differences(&expected);
        if !differences.is_empty() {
            return Err(TemplateError::Mismatch {
                path: path.to_path_buf(),
                differences: differences.join("; "),
            });
        }
        Ok(Self {
            config: config.clone(),
            backend,
            path: path.to_path_buf(),
            metadata,
            pool: None,
        })
    }

    /// Keeps `size` clones restored ahead of demand, so a clone skips start-up and state
    /// load. Each is warmed up ([`Vm::warm_up`]: resumed, handed out once and run `true`,
    /// then paused again), as the VMCache server's VMs are, before it waits in the pool:
    ///
    /// - a clone's QEMU starts with no translated code, and under TCG a hand-out costs
    ///   about as much as the guest code it runs for the first time (`docs/architecture.md`,
    ///   "The hand-out sequence"): the guest kernel's resume (timers, the scheduler, the
    ///   VMGenID notify through the ACPI interpreter, the CRNG reseed), the agent's
    ///   connection, HTTP/2 and gRPC, and the hand-out's own work. Warmed, a hand-out and
    ///   the first command take the translated path;
    /// - a clone whose agent does not answer is found here, not by the caller of
    ///   `get_vm`;
    /// - the clone has done nothing its real hand-out does not redo: that reseeds its CRNG
    ///   again (its own QEMU's VMGenID reseeded it at the resume), sets the clock and the
    ///   hostname, on a new agent connection.
    ///
    /// A taken clone's replacement waits [`REFILL_GRACE`], also when the pool is then
    /// empty: `get_vm` never waits for the pool (it restores a clone itself when the pool
    /// is empty), and a warm-up started at once would compete with the taken clone's
    /// hand-out. Must be called within a tokio runtime.
    pub fn with_warm_pool(mut self, size: usize) -> Self {
        if size > 0 {
            let (config, path, backend) =
                (self.config.clone(), self.path.clone(), self.backend.clone());
            let maker: Maker<Vm> = Arc::new(move || {
                let (config, path, backend) = (config.clone(), path.clone(), backend.clone());
                Box::pin(async move {
                    let clone = restore_clone(&config, &path, backend.as_ref())
                        .await
                        .map_err(|err| FactoryError::Vm(err.into()))?;
                    let mut vm = Vm::from_hypervisor(clone, config.vcpus, config.memory_mib);
                    if let Err(err) = vm.warm_up().await {
                        let _ = vm.stop().await;
                        return Err(err.into());
                    }
                    Ok(vm)
                })
            });
            self.pool = Some(
                ReadyPool::start_observed("warm pool", size, maker, None, REFILL_GRACE)
                    .grace_even_when_empty(),
            );
        }
        self
    }

    /// Clones waiting in the warm pool right now (0 without a pool).
    pub async fn warm_pool_ready(&self) -> usize {
        match &self.pool {
            Some(pool) => pool.ready_count().await,
            None => 0,
        }
    }

    /// The template's metadata.
    pub fn metadata(&self) -> &TemplateMetadata {
        &self.metadata
    }

    /// The template directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the template (what vmfactory made of it), after stopping the warm pool.
    pub async fn destroy(self) -> Result<(), TemplateError> {
        if let Some(pool) = &self.pool {
            pool.close().await;
        }
        destroy(&self.path).map(drop)
    }
}

/// A template being created; unless `done`, its drop removes what vmfactory made at
/// `path` (per the markers: its tmpfs, its files, a directory it created), never the
/// user's directory or files.
struct UnfinishedTemplate<'a> {
    path: &'a Path,
    done: bool,
}

impl Drop for UnfinishedTemplate<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match remove_ours(self.path) {
            Ok(_) => debug!(path = %self.path.display(), "Removed the unfinished template"),
            Err(err) => {
                warn!(path = %self.path.display(), %err, "Cannot clean up the unfinished template");
            }
        }
    }
}

/// A clone of the template at `path`: its memory file mapped copy-on-write, its device
/// state loaded; paused.
async fn restore_clone(
    config: &VmConfig,
    path: &Path,
    backend: &dyn Backend,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let memory = MemoryBackend::File {
        path: path.join(MEMORY_FILE),
        share: false,
    };
    let spec = config.spec(new_vm_id(), memory);
    backend.restore(&spec, &path.join(STATE_FILE)).await
}

#[async_trait]
impl FactoryBase for TemplateFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        let started = Instant::now();
        let pooled = match &self.pool {
            Some(pool) => pool.try_take().await,
            None => None,
        };
        if let Some(vm) = pooled {
            debug!(id = vm.id(), elapsed = ?started.elapsed(), "Warm clone taken");
            return Ok(vm);
        }
        let clone = restore_clone(&self.config, &self.path, self.backend.as_ref())
            .await
            .map_err(VmError::from)?;
        debug!(id = clone.id(), elapsed = ?started.elapsed(), "Clone restored");
        Ok(Vm::from_hypervisor(
            clone,
            self.config.vcpus,
            self.config.memory_mib,
        ))
    }

    async fn close(&self) -> Result<(), FactoryError> {
        if let Some(pool) = &self.pool {
            pool.close().await;
        }
        Ok(())
    }
}

/// Waits until the template's kernel has left its early TSC clocksource, at most
/// [`CLOCK_REFINE_TIMEOUT`]; returns the clocksource it saves the template with.
///
/// Under TCG the kernel starts on `tsc-early` with the frequency the PIT (or the HPET)
/// gave it, and a second later refines the frequency against the HPET and switches to
/// `tsc` (a `stop_machine`, and a console message). The agent answers before that, so a
/// template saved at once hands the pending work to every clone, which does it a few
/// hundred ms after its resume, while its user's first commands run, as guest code its
/// QEMU translates anew. Saved after it, clones share the refined frequency and do none
/// of it.
/// Under KVM (`kvm-clock`) and with an agent that does not say (empty), there is nothing
/// to wait for.
async fn wait_for_refined_clock(agent: &AgentClient) -> Result<String, TemplateError> {
    let started = Instant::now();
    loop {
        let clocksource = agent.details().await.map_err(VmError::from)?.clocksource;
        if clocksource != UNREFINED_CLOCKSOURCE {
            debug!(clocksource, waited = ?started.elapsed(), "Template clock settled");
            return Ok(clocksource);
        }
        if started.elapsed() >= CLOCK_REFINE_TIMEOUT {
            warn!(
                clocksource,
                "The template kernel has not refined its TSC after {CLOCK_REFINE_TIMEOUT:?}; \
                 saving it anyway (each clone will try the refinement itself)"
            );
            return Ok(clocksource);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
