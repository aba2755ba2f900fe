//! [`HypervisorHandle`]: what one process tells another so that it can take over a
//! running VM, tagged with the backend that runs it.

use serde::{Deserialize, Serialize};

use crate::mock::MockHandle;
use crate::qemu::QemuHandle;

/// Names of the backends whose handles this build understands.
pub const BACKEND_NAMES: [&str; 2] = ["qemu", "mock"];

/// A running VM's backend-specific description, as [`crate::Hypervisor::hand_over`]
/// returns it and [`crate::Backend::adopt`] takes it. Serialized with a `backend` tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum HypervisorHandle {
    /// A QEMU process.
    Qemu(QemuHandle),
    /// A mock VM of this process (unit tests).
    Mock(MockHandle),
}

impl HypervisorHandle {
    /// The backend's name (one of [`BACKEND_NAMES`]).
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Qemu(_) => BACKEND_NAMES[0],
            Self::Mock(_) => BACKEND_NAMES[1],
        }
    }

    /// The VM's id.
    pub fn id(&self) -> &str {
        match self {
            Self::Qemu(handle) => &handle.id,
            Self::Mock(handle) => &handle.id,
        }
    }
}
