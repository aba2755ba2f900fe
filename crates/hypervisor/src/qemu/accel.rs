//! Accelerator choice: KVM where it can run our guest, TCG otherwise.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Result};

/// The accelerator asked for in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM when usable and able to run the guest kernel, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization; an error when `/dev/kvm` is unusable.
    Kvm,
    /// QEMU's software CPU.
    Tcg,
}

impl std::str::FromStr for Accelerator {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(HypervisorError::InvalidConfig(format!(
                "Unknown accelerator {other:?}: use auto, kvm or tcg"
            ))),
        }
    }
}

/// The accelerator QEMU actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    /// `-accel kvm`
    Kvm,
    /// `-accel tcg`
    Tcg,
}

/// What the host offers, as far as the choice is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProbe {
    /// `/dev/kvm` opens read-write.
    pub kvm_usable: bool,
    /// `/sys/module/kvm_pvm` exists: KVM can run only PVM guest kernels.
    pub kvm_pvm: bool,
}

impl HostProbe {
    /// Probes this host.
    pub fn detect() -> Self {
        let kvm_usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Self {
            kvm_usable,
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// Chooses the accelerator; returns it with the reason for the choice.
pub fn choose(
    requested: Accelerator,
    probe: HostProbe,
    kernel_is_pvm: bool,
) -> Result<(ResolvedAccel, &'static str)> {
    match requested {
        Accelerator::Tcg => Ok((ResolvedAccel::Tcg, "TCG was configured")),
        Accelerator::Kvm if probe.kvm_usable && probe.kvm_pvm && !kernel_is_pvm => {
            Err(HypervisorError::InvalidConfig(
                "accelerator = \"kvm\" but /dev/kvm is kvm_pvm, which runs only PVM guest kernels (QEMU aborts with this one): use \"auto\" or \"tcg\", or set kernel_is_pvm = true with a PVM guest kernel".into(),
            ))
        }
        Accelerator::Kvm if probe.kvm_usable => Ok((ResolvedAccel::Kvm, "KVM was configured")),
        Accelerator::Kvm => Err(HypervisorError::InvalidConfig(
            "accelerator = \"kvm\" but /dev/kvm cannot be opened read-write: use \"auto\" or \"tcg\", or fix /dev/kvm's permissions".into(),
        )),
        Accelerator::Auto if !probe.kvm_usable => Ok((
            ResolvedAccel::Tcg,
            "/dev/kvm is missing or not accessible; using TCG (software CPU)",
        )),
        Accelerator::Auto if probe.kvm_pvm && !kernel_is_pvm => Ok((
            ResolvedAccel::Tcg,
            "/dev/kvm is kvm_pvm, which runs only PVM guest kernels; using TCG (software CPU)",
        )),
        Accelerator::Auto => Ok((ResolvedAccel::Kvm, "/dev/kvm is usable; using KVM")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM: HostProbe = HostProbe {
        kvm_usable: true,
        kvm_pvm: false,
    };
    const PVM: HostProbe = HostProbe {
        kvm_usable: true,
        kvm_pvm: true,
    };
    const NONE: HostProbe = HostProbe {
        kvm_usable: false,
        kvm_pvm: false,
    };

    fn pick(requested: Accelerator, probe: HostProbe, pvm_kernel: bool) -> ResolvedAccel {
        choose(requested, probe, pvm_kernel).expect("choice").0
    }

    #[test]
    fn auto_uses_kvm_only_when_it_can_run_the_kernel() {
        assert_eq!(pick(Accelerator::Auto, KVM, false), ResolvedAccel::Kvm);
        assert_eq!(pick(Accelerator::Auto, NONE, false), ResolvedAccel::Tcg);
        assert_eq!(pick(Accelerator::Auto, PVM, false), ResolvedAccel::Tcg);
        assert_eq!(pick(Accelerator::Auto, PVM, true), ResolvedAccel::Kvm);
        let (_, reason) = choose(Accelerator::Auto, PVM, false).expect("choice");
        assert!(reason.contains("kvm_pvm"));
    }

    #[test]
    fn explicit_choices_are_honoured() {
        assert_eq!(pick(Accelerator::Tcg, KVM, false), ResolvedAccel::Tcg);
        assert_eq!(pick(Accelerator::Kvm, KVM, false), ResolvedAccel::Kvm);
        assert_eq!(pick(Accelerator::Kvm, PVM, true), ResolvedAccel::Kvm);
        // Our kernel on kvm_pvm: QEMU would abort; refused, saying what to do.
        let err = choose(Accelerator::Kvm, PVM, false).expect_err("not a PVM kernel");
        assert!(err.to_string().contains("kvm_pvm"), "{err}");
        assert!(err.to_string().contains("tcg"), "{err}");
        let err = choose(Accelerator::Kvm, NONE, false).expect_err("no kvm");
        assert!(err.to_string().contains("/dev/kvm"));
    }

    #[test]
    fn parses_names() {
        assert_eq!("tcg".parse::<Accelerator>().expect("tcg"), Accelerator::Tcg);
        assert!("xen".parse::<Accelerator>().is_err());
    }
}
