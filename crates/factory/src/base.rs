//! Factories: [`FactoryBase`] makes base VMs (paused, as they come), [`Factory::get_vm`]
//! turns one into the VM a caller asked for.

use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;

use crate::config::VmConfig;
use crate::vm::{Vm, VmError};

/// One attempt of that check; a connection that gets no answer is replaced, since the
/// guest may still have been serving a previous owner's connection when it was paused.
const CHECK_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors of factories.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The factory is closed.
    #[error("The factory is closed")]
    Closed,
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
    /// A new base VM, paused.
    async fn get_base_vm(&self) -> Result<Vm, FactoryError>;
    /// The VMs it holds ready.
    async fn status(&self) -> Vec<VmStatus>;
    /// Stops what it runs.
    async fn close(&self) -> Result<(), FactoryError>;
}

/// Boots each VM directly; returns it paused, as Kata's direct factory does.
#[derive(Debug)]
pub struct DirectFactory {
    config: VmConfig,
}

impl DirectFactory {
    /// A direct factory for `config`.
    pub fn new(config: VmConfig) -> Self {
        Self { config }
    }
}

#[async_trait]
impl FactoryBase for DirectFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    async fn get_base_vm(&self) -> Result<Vm, FactoryError> {
        let vm = Vm::new(&self.config).await?;
        vm.pause().await?;
        Ok(vm)
    }

    async fn status(&self) -> Vec<VmStatus> {
        Vec::new()
    }

    async fn close(&self) -> Result<(), FactoryError> {
        Ok(())
    }
}

/// The factory callers use: hands out running VMs with a fresh identity.
#[derive(Debug)]
pub struct Factory {
    base: Box<dyn FactoryBase>,
}

impl Factory {
    /// A factory over `base`.
    pub fn new(base: Box<dyn FactoryBase>) -> Self {
        Self { base }
    }

    /// A running VM: taken from the base factory, resumed, its agent checked, its RNG
    /// reseeded with host entropy and its clock set to the host's, so no two VMs share
    /// randomness or stale time.
    pub async fn get_vm(&self) -> Result<Vm, FactoryError> {
        let mut vm = self.base.get_base_vm().await?;
        let timeout = self.base.config().agent_timeout;
        match Self::make_ready(&mut vm, timeout).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                let _ = vm.stop().await;
                Err(err)
            }
        }
    }

    async fn make_ready(vm: &mut Vm, timeout: Duration) -> Result<(), FactoryError> {
        vm.resume().await?;
        let started = std::time::Instant::now();
        loop {
            let attempt = tokio::select! {
                checked = vm.agent().check() => Some(checked.map_err(VmError::from)),
                err = vm.hypervisor().exited() => return Err(VmError::from(err).into()),
                () = tokio::time::sleep(CHECK_ATTEMPT_TIMEOUT) => None,
            };
            match attempt {
                Some(Ok(())) => break,
                Some(Err(err)) => debug!(%err, "Agent check failed; reconnecting"),
                None => debug!("Agent check timed out; reconnecting"),
            }
            if started.elapsed() > timeout {
                return Err(VmError::AgentTimeout {
                    seconds: timeout.as_secs_f64(),
                    report: String::new(),
                }
                .into());
            }
            vm.reconnect_agent();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        vm.reseed_rng().await?;
        vm.sync_time().await?;
        debug!(id = vm.id(), "VM ready for use");
        Ok(())
    }

    /// A running VM shaped like `request`. When `request` differs from the factory's VMs
    /// in anything but vCPUs and memory, or asks for more than they can grow to, it is
    /// booted directly (and checked, reseeded and clock-synced like any other). Otherwise a
    /// factory VM is grown to fit: vCPUs and memory are hot-plugged and onlined by the
    /// agent. VMs never shrink: a smaller request gets the factory's size.
    pub async fn get_vm_for(&self, request: &VmConfig) -> Result<Vm, FactoryError> {
        let base = self.base.config();
        if let Some(reason) = incompatibility(base, request) {
            debug!(reason, "Request does not fit the factory; booting directly");
            let vm = Vm::new(request).await?;
            return match Self::refresh_identity(&vm).await {
                Ok(()) => Ok(vm),
                Err(err) => {
                    let _ = vm.stop().await;
                    Err(err)
                }
            };
        }
        let mut vm = self.get_vm().await?;
        match Self::grow(&mut vm, request).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                let _ = vm.stop().await;
                Err(err)
            }
        }
    }

    async fn grow(vm: &mut Vm, request: &VmConfig) -> Result<(), FactoryError> {
        let cpus = request.vcpus.saturating_sub(vm.cpu);
        let memory = round_up_to_block(request.memory_mib.saturating_sub(vm.memory_mib));
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
            .online_cpu_mem(vm.cpu, memory == 0)
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

    async fn refresh_identity(vm: &Vm) -> Result<(), FactoryError> {
        vm.reseed_rng().await?;
        vm.sync_time().await?;
        Ok(())
    }

    /// Stops the base factory.
    pub async fn close(&self) -> Result<(), FactoryError> {
        self.base.close().await
    }
}

/// Memory is hot-plugged in whole Linux memory blocks.
fn round_up_to_block(mib: u32) -> u32 {
    let block = vmfactory_hypervisor::qemu::MEMORY_BLOCK_MIB;
    mib.div_ceil(block).saturating_mul(block)
}

/// Why `request` cannot be served by growing a VM made from `base`, if it cannot.
pub fn incompatibility(base: &VmConfig, request: &VmConfig) -> Option<&'static str> {
    if base.qemu != request.qemu {
        return Some("hypervisor settings differ");
    }
    if base.kernel != request.kernel || base.initrd != request.initrd {
        return Some("kernel or initrd differ");
    }
    if base.kernel_cmdline() != request.kernel_cmdline() {
        return Some("kernel parameters differ");
    }
    if request.vcpus > base.max_vcpus.max(base.vcpus) {
        return Some("more vCPUs than the factory's VMs can grow to");
    }
    let wanted_memory = round_up_to_block(request.memory_mib.saturating_sub(base.memory_mib));
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

    #[test]
    fn only_cpu_and_memory_may_differ() {
        let base = base();
        let mut request = base.clone();
        assert_eq!(incompatibility(&base, &request), None);
        request.vcpus = 3;
        request.memory_mib = 1024;
        assert_eq!(incompatibility(&base, &request), None);
        let smaller = VmConfig {
            memory_mib: 128,
            ..base.clone()
        };
        assert_eq!(
            incompatibility(&base, &smaller),
            None,
            "never shrink, but serve"
        );

        let mut other = base.clone();
        other.kernel_params = "debug".into();
        assert_eq!(
            incompatibility(&base, &other),
            Some("kernel parameters differ")
        );
        let mut other = base.clone();
        other.kernel = "/other".into();
        assert_eq!(
            incompatibility(&base, &other),
            Some("kernel or initrd differ")
        );
        let mut other = base.clone();
        other.qemu.machine_type = "pc".into();
        assert_eq!(
            incompatibility(&base, &other),
            Some("hypervisor settings differ")
        );
    }

    #[test]
    fn growth_limits_fall_back_to_direct_boot() {
        let base = base();
        let too_many = VmConfig {
            vcpus: 5,
            ..base.clone()
        };
        assert!(incompatibility(&base, &too_many).is_some());
        let too_much = VmConfig {
            memory_mib: 4096,
            ..base.clone()
        };
        assert!(incompatibility(&base, &too_much).is_some());
        let no_slots = VmConfig {
            memory_slots: 0,
            ..base.clone()
        };
        let request = VmConfig {
            memory_mib: 512,
            ..no_slots.clone()
        };
        assert!(incompatibility(&no_slots, &request).is_some());
    }

    #[test]
    fn memory_grows_in_whole_blocks() {
        assert_eq!(round_up_to_block(0), 0);
        assert_eq!(round_up_to_block(1), 128);
        assert_eq!(round_up_to_block(256), 256);
        assert_eq!(round_up_to_block(300), 384);
    }
}
