//! Factories: [`FactoryBase`] makes base VMs (paused, as they come), [`Factory::get_vm`]
//! turns one into the VM a caller asked for.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, info};
use vmfactory_hypervisor::{Backend, MEMORY_BLOCK_MIB};

use crate::config::{VmConfig, VmRequest};
use crate::template::TemplateError;
use crate::vm::{Vm, VmError};
use crate::vmcache::VmCacheError;

/// Errors of factories.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The template factory failed.
    #[error(transparent)]
    Template(#[from] Box<TemplateError>),
    /// The VMCache server or client failed.
    #[error(transparent)]
    VmCache(#[from] Box<VmCacheError>),
    /// The factory is closed.
    #[error("The factory is closed")]
    Closed,
    /// The factory cannot make VMs: its last attempts all failed and none is ready.
    #[error(
        "No VM is ready and the last {failures} attempts to make one failed: {reason}; \
         fix the cause (its log says more) or restart the factory"
    )]
    Failing {
        /// Attempts failed in a row.
        failures: u32,
        /// The last attempt's error.
        reason: String,
    },
    /// A factory that boots or clones VMs was opened without a VM config.
    #[error(
        "No VM configuration to boot or clone VMs with: resolve the guest image and settings first"
    )]
    MissingConfig,
}

/// One ready VM, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU pid.
    pub pid: u32,
    /// vCPUs.
    pub cpu: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
}

/// Something that makes base VMs: direct boot, template clone, cache, remote cache.
#[async_trait]
pub trait FactoryBase: Send + Sync + std::fmt::Debug {
    /// The VM config its VMs have.
    fn config(&self) -> &VmConfig;
    /// The backend its VMs run on (also boots VMs the factory cannot serve).
    fn backend(&self) -> &Arc<dyn Backend>;
    /// True when every base VM is booted on demand anyway: [`Factory::get_vm`] then boots
    /// it at the requested size instead of growing it.
    fn boots_each_vm(&self) -> bool {
        false
    }
    /// A new base VM, paused.
    async fn get_base_vm(&self) -> Result<Vm, FactoryError>;
    /// The VMs it holds ready (none, unless it keeps a cache).
    async fn status(&self) -> Vec<VmStatus> {
        Vec::new()
    }
    /// What is told about its VMs and their hand-outs (metrics), if anything.
    fn observer(&self) -> Option<Arc<dyn crate::pool::PoolObserver>> {
        None
    }
    /// Stops what it runs.
    async fn close(&self) -> Result<(), FactoryError>;
}

/// Boots each VM directly; returns it paused, as Kata's direct factory does.
#[derive(Debug)]
pub struct DirectFactory {
    config: VmConfig,
    backend: Arc<dyn Backend>,
}

impl DirectFactory {
    /// A direct factory for `config` on `backend`.
    pub fn new(config: VmConfig, backend: Arc<dyn Backend>) -> Self {
        Self { config, backend }
    }
}

#[async_trait]
impl FactoryBase for DirectFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn boots_each_vm(&self) -> bool {
        true
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        let vm = Vm::boot(self.backend.as_ref(), &self.config).await?;
        vm.pause().await?;
        Ok(vm)
    }

    async fn close(&self) -> Result<(), FactoryError> {
        Ok(())
    }
}

/// The factory callers use: hands out running VMs with a fresh identity. Built by
/// [`Factory::open`] from the configuration, or over any [`FactoryBase`].
#[derive(Debug)]
pub struct Factory {
    base: Arc<dyn FactoryBase>,
    notice: Option<String>,
    fallback: std::sync::Mutex<Option<String>>,
}

impl Factory {
    /// A factory over `base`.
    pub fn new(base: Arc<dyn FactoryBase>) -> Self {
        Self {
            base,
            notice: None,
            fallback: std::sync::Mutex::new(None),
        }
    }

    /// A factory over `base` that had to fall back to it, saying why.
    pub(crate) fn degraded(base: Arc<dyn FactoryBase>, notice: String) -> Self {
        Self {
            base,
            notice: Some(notice),
            fallback: std::sync::Mutex::new(None),
        }
    }

    /// Why this factory is not the one the configuration asked for, if it is not.
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    /// The base factory.
    pub fn base(&self) -> &Arc<dyn FactoryBase> {
        &self.base
    }

    /// A running VM shaped like `request`: taken from the base factory, resumed, its agent
    /// checked, its RNG reseeded with host entropy and its clock set to the host's, so no
    /// two VMs share randomness or stale time. A factory VM is grown to fit by hot-plugged
    /// vCPUs and memory that the agent onlines; VMs never shrink (a smaller request gets
    /// the factory's size). A request the factory's VMs cannot grow to is booted directly
    /// (and checked, reseeded and clock-synced like any other).
    pub async fn get_vm(&self, request: &VmRequest) -> Result<Vm, FactoryError> {
        let base = self.base.config();
        let direct = if self.base.boots_each_vm() {
            Some("the factory boots every VM")
        } else {
            incompatibility(base, request)
        };
        if let Some(reason) = direct {
            debug!(reason, "Booting the VM directly at the requested size");
            return self.boot_directly(request).await;
        }
        match self.take_ready(request).await {
            Ok(vm) => Ok(vm),
            // A factory that cannot deliver (a damaged template, a failing server) does
            // not strand the caller: the VM is booted instead, and the failure recorded.
            Err(err) if !matches!(err, FactoryError::Closed) => {
                // Callers say so in their own words (`run` prints it, from
                // `last_fallback`); a warning here would say it twice.
                info!(%err, "The factory failed; booting the VM directly");
                if let Ok(mut last) = self.fallback.lock() {
                    *last = Some(err.to_string());
                }
                self.boot_directly(request).await
            }
            Err(err) => Err(err),
        }
    }

    /// Why the last [`Factory::get_vm`] had to boot directly instead, if it had to.
    pub fn last_fallback(&self) -> Option<String> {
        self.fallback.lock().ok().and_then(|last| last.clone())
    }

    /// A factory VM made ready and grown, without falling back.
    async fn take_ready(&self, request: &VmRequest) -> Result<Vm, FactoryError> {
        let mut vm = self.base.get_base_vm().await?;
        let timeout = self.base.config().agent_timeout;
        let ready = async {
            vm.make_ready(timeout).await?;
            grow(&mut vm, request).await
        };
        match ready.await {
            Ok(()) => Ok(vm),
            Err(err) => {
                let _ = vm.stop().await;
                Err(err)
            }
        }
    }

    async fn boot_directly(&self, request: &VmRequest) -> Result<Vm, FactoryError> {
        let config = self.base.config().for_direct_boot(request);
        let vm = Vm::boot(self.base.backend().as_ref(), &config).await?;
        match refresh_identity(&vm).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                let _ = vm.stop().await;
                Err(err)
            }
        }
    }

    /// Checks that the factory really delivers: takes one VM, makes it ready, stops it;
    /// returns how long that took. Never falls back.
    pub async fn probe(&self) -> Result<Duration, FactoryError> {
        let started = std::time::Instant::now();
        let vm = self.take_ready(&VmRequest::default()).await?;
        let elapsed = started.elapsed();
        vm.stop().await?;
        Ok(elapsed)
    }

    /// Stops the base factory.
    pub async fn close(&self) -> Result<(), FactoryError> {
        self.base.close().await
    }
}

async fn refresh_identity(vm: &Vm) -> Result<(), FactoryError> {
    // One round trip: entropy, clock and hostname (`HandOut`).
    Ok(vm.refresh_identity().await?)
}

async fn grow(vm: &mut Vm, request: &VmRequest) -> Result<(), FactoryError> {
    let cpus = request.vcpus.unwrap_or(0).saturating_sub(vm.cpu);
    let memory = round_up_to_block(
        request
            .memory_mib
            .unwrap_or(0)
            .saturating_sub(vm.memory_mib),
    );
    if cpus == 0 && memory == 0 {
        return Ok(());
    }
    if cpus > 0 {
        vm.hypervisor()
            .add_vcpus(cpus)
            .await
            .map_err(VmError::from)?;
        vm.cpu += cpus;
        vm.cpu_delta += cpus;
    }
    if memory > 0 {
        vm.hypervisor()
            .add_memory(memory)
            .await
            .map_err(VmError::from)?;
        vm.memory_mib += memory;
    }
    vm.agent()
        .online_cpu_mem(vm.cpu, (memory > 0).then_some(vm.memory_mib))
        .await
        .map_err(VmError::from)?;
    debug!(
        id = vm.id(),
        cpu = vm.cpu,
        memory_mib = vm.memory_mib,
        "VM grown"
    );
    Ok(())
}

/// Memory is hot-plugged in whole Linux memory blocks.
fn round_up_to_block(mib: u32) -> u32 {
    mib.div_ceil(MEMORY_BLOCK_MIB)
        .saturating_mul(MEMORY_BLOCK_MIB)
}

/// Why `request` cannot be served by growing a VM made from `base`, if it cannot.
pub fn incompatibility(base: &VmConfig, request: &VmRequest) -> Option<&'static str> {
    if request.vcpus.unwrap_or(0) > base.max_vcpus.max(base.vcpus) {
        return Some("more vCPUs than the factory's VMs can grow to");
    }
    let wanted_memory = round_up_to_block(
        request
            .memory_mib
            .unwrap_or(0)
            .saturating_sub(base.memory_mib),
    );
    if wanted_memory > 0 {
        if base.memory_slots == 0 {
            return Some("more memory, but the factory's VMs have no memory slots");
        }
        if base.memory_mib + wanted_memory > base.max_memory_mib {
            return Some("more memory than the factory's VMs can grow to");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            memory_slots: 4,
            max_memory_mib: 2048,
            ..VmConfig::default()
        }
    }

    fn request(vcpus: u32, memory_mib: u32) -> VmRequest {
        VmRequest {
            vcpus: Some(vcpus),
            memory_mib: Some(memory_mib),
        }
    }

    #[test]
    fn growth_within_limits_is_served() {
        let base = base();
        assert_eq!(incompatibility(&base, &VmRequest::default()), None);
        assert_eq!(incompatibility(&base, &request(3, 1024)), None);
        assert_eq!(
            incompatibility(&base, &request(1, 128)),
            None,
            "never shrink, but serve"
        );
    }

    #[test]
    fn growth_limits_fall_back_to_direct_boot() {
        let base = base();
        assert!(incompatibility(&base, &request(5, 256)).is_some());
        assert!(incompatibility(&base, &request(1, 4096)).is_some());
        let no_slots = VmConfig {
            memory_slots: 0,
            ..base.clone()
        };
        assert!(incompatibility(&no_slots, &request(1, 512)).is_some());
        let direct = base.for_direct_boot(&request(8, 4096));
        assert_eq!((direct.vcpus, direct.max_vcpus), (8, 8));
        assert_eq!((direct.memory_mib, direct.max_memory_mib), (4096, 4096));
        assert_eq!(direct.memory_slots, 0, "direct boots never grow");
    }

    #[test]
    fn memory_grows_in_whole_blocks() {
        assert_eq!(round_up_to_block(0), 0);
        assert_eq!(round_up_to_block(1), 128);
        assert_eq!(round_up_to_block(256), 256);
        assert_eq!(round_up_to_block(300), 384);
    }
}
