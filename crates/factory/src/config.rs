//! What a VM is made of: the QEMU settings, guest kernel and initramfs, sizes.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmfactory_hypervisor::qemu::{QemuBackend, QemuConfig};
use vmfactory_hypervisor::{Backend, MemoryBackend, VmSpec};

/// Kernel command line every VM gets: serial console, quiet boot, no probing of hardware
/// the VM does not have, and hot-plugged memory onlined by the kernel. A panic or reboot
/// ends in a triple fault (`reboot=t`), which `-no-reboot` turns into QEMU's exit at once
/// (the VMs have no keyboard controller for `reboot=k`: its wait took 2 s).
pub const BASE_KERNEL_PARAMS: &str = "console=ttyS0 quiet panic=1 reboot=t \
    rdinit=/init pci=lastbus=0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
    8250.nr_uarts=1 tsc=reliable no_timer_check noreplace-smp cryptomgr.notests \
    rcupdate.rcu_expedited=1 random.trust_cpu=on memhp_default_state=online";

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// QEMU backend settings.
    pub qemu: QemuConfig,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (with the agent as `/init`).
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters appended to [`BASE_KERNEL_PARAMS`].
    pub kernel_params: String,
    /// vCPUs at boot.
    pub vcpus: u32,
    /// Most vCPUs a VM may have after hot-plug.
    pub max_vcpus: u32,
    /// Guest RAM at boot, MiB.
    pub memory_mib: u32,
    /// DIMM slots for memory hot-plug. Reserving hot-plug room costs ~0.2 s of boot
    /// under TCG, so only VMs that may grow (factory VMs) should have slots.
    pub memory_slots: u32,
    /// Most guest RAM after hot-plug, MiB.
    pub max_memory_mib: u32,
    /// How long a boot may take until the agent answers.
    pub boot_timeout: Duration,
    /// How long a VM handed out by a factory may take to answer after resume.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout: Duration,
}

fn default_agent_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            qemu: QemuConfig::default(),
            kernel: PathBuf::new(),
            initrd: None,
            kernel_params: String::new(),
            vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            memory_slots: 0,
            max_memory_mib: 2048,
            boot_timeout: Duration::from_secs(60),
            agent_timeout: default_agent_timeout(),
        }
    }
}

/// What a caller asks [`crate::Factory::get_vm`] for: a VM of the factory's kind, with
/// these sizes (`None`: the factory's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequest {
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Guest RAM, MiB.
    pub memory_mib: Option<u32>,
}

impl VmConfig {
    /// The backend that runs VMs of this config. This is where a new hypervisor backend
    /// plugs in: today every config names QEMU.
    pub fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(QemuBackend::new(self.qemu.clone()))
    }

    /// This config resized as `request` asks, for a VM booted directly at that size: it
    /// never grows, so it gets no memory hot-plug slots (they slow its boot).
    pub fn for_direct_boot(&self, request: &VmRequest) -> Self {
        let mut config = self.clone();
        config.vcpus = request.vcpus.unwrap_or(self.vcpus);
        config.memory_mib = request.memory_mib.unwrap_or(self.memory_mib);
        config.max_vcpus = config.max_vcpus.max(config.vcpus);
        config.max_memory_mib = config.max_memory_mib.max(config.memory_mib);
        config.memory_slots = 0;
        config
    }

    /// The full kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let extra = self.kernel_params.trim();
        if extra.is_empty() {
            BASE_KERNEL_PARAMS.to_string()
        } else {
            format!("{BASE_KERNEL_PARAMS} {extra}")
        }
    }

    /// The hypervisor's view of a VM with this config.
    pub fn spec(&self, id: String, memory: MemoryBackend) -> VmSpec {
        VmSpec {
            id,
            vcpus: self.vcpus,
            max_vcpus: self.max_vcpus.max(self.vcpus),
            memory_mib: self.memory_mib,
            memory_slots: self.memory_slots,
            max_memory_mib: self.max_memory_mib.max(self.memory_mib),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            kernel_params: self.kernel_cmdline(),
            memory,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_appends_extra_params() {
        let mut config = VmConfig::default();
        assert_eq!(config.kernel_cmdline(), BASE_KERNEL_PARAMS);
        config.kernel_params = " debug ".into();
        assert!(config.kernel_cmdline().ends_with(" debug"));
    }

    #[test]
    fn spec_never_has_max_below_boot_size() {
        let config = VmConfig {
            vcpus: 8,
            max_vcpus: 2,
            memory_mib: 4096,
            max_memory_mib: 1024,
            ..VmConfig::default()
        };
        let spec = config.spec("x".into(), MemoryBackend::Memfd);
        assert_eq!((spec.max_vcpus, spec.max_memory_mib), (8, 4096));
    }
}
