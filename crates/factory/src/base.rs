//! Factories: [`FactoryBase`] makes base VMs (paused, as they come), [`Factory::get_vm`]
//! turns one into the VM a caller asked for.

use std::time::Duration;

use async_trait::async_trait;
use tracing::debug;

use crate::config::VmConfig;
use crate::vm::{Vm, VmError};

/// How long a handed-out VM's agent may take to answer after resume.
const RESUME_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// The base factory.
    pub fn base(&self) -> &dyn FactoryBase {
        self.base.as_ref()
    }

    /// A running VM: taken from the base factory, resumed, its agent checked, its RNG
    /// reseeded with host entropy and its clock set to the host's, so no two VMs share
    /// randomness or stale time.
    pub async fn get_vm(&self) -> Result<Vm, FactoryError> {
        let vm = self.base.get_base_vm().await?;
        match Self::make_ready(&vm).await {
            Ok(()) => Ok(vm),
            Err(err) => {
                let _ = vm.stop().await;
                Err(err)
            }
        }
    }

    async fn make_ready(vm: &Vm) -> Result<(), FactoryError> {
        vm.resume().await?;
        let checked = tokio::select! {
            checked = vm.agent().check() => checked.map_err(VmError::from),
            err = vm.hypervisor().exited() => Err(err.into()),
            () = tokio::time::sleep(RESUME_CHECK_TIMEOUT) => Err(VmError::AgentTimeout {
                seconds: RESUME_CHECK_TIMEOUT.as_secs_f64(),
                report: String::new(),
            }),
        };
        checked?;
        vm.reseed_rng().await?;
        vm.sync_time().await?;
        debug!(id = vm.id(), "VM ready for use");
        Ok(())
    }

    /// Stops the base factory.
    pub async fn close(&self) -> Result<(), FactoryError> {
        self.base.close().await
    }
}
