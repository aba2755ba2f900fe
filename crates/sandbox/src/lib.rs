//! Sandboxes: factory VMs that outlive the command that made them. Each sandbox is owned
//! by one supervisor process (as Kata's shim owns one sandbox), which takes its VM through
//! `Factory::get_vm`, holds the VM's hypervisor and agent connections, and serves a local
//! API on a Unix socket in the sandbox's directory: the sandbox control service
//! (`vmfactory.sandbox`: status, pause, resume, stop) and the agent API, forwarded over
//! its one agent connection, so several commands can use one sandbox at once.
//!
//! - [`dir`]: the sandbox directory, its record (`sandbox.json`), name claims, listing,
//!   and the sweep that removes sandboxes whose supervisor was killed (an exited one stays
//!   until `sandbox rm`);
//! - [`supervisor`]: the supervisor's life: get the VM, serve, stop;
//! - [`proxy`]: the agent API forwarded to the VM's agent;
//! - [`client`]: talking to a supervisor.

pub mod client;
pub mod dir;
pub mod proxy;
pub mod supervisor;

use std::path::PathBuf;

pub use client::SandboxClient;
pub use dir::{ContainerRecord, SandboxDir, SandboxRecord, SandboxState};
pub use supervisor::{ContainerPlan, Supervisor, SupervisorOptions};

/// Errors of sandboxes.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No live sandbox has that id or name.
    #[error("No sandbox {0:?}: list them with `vmfactory sandbox ls`")]
    NotFound(String),
    /// An id prefix matches several sandboxes.
    #[error("{0:?} matches several sandboxes: give more of the id")]
    Ambiguous(String),
    /// A name is taken or malformed.
    #[error("Invalid sandbox name {name:?}: {why}")]
    Name {
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A live or starting sandbox has the name.
    #[error("A sandbox named {0:?} exists: choose another name or remove it first")]
    NameTaken(String),
    /// An exited sandbox, kept until removed, has the name.
    #[error("Sandbox {0:?} has exited but is kept (`vmfactory sandbox logs {0}` says why): remove it with `vmfactory sandbox rm {0}`, or choose another name")]
    NameTakenByExited(String),
    /// The name is the start of a live sandbox's id.
    #[error("The name {name:?} is the start of sandbox {id}'s id, which it would hide: choose another name")]
    NameHidesId {
        /// The name.
        name: String,
        /// The sandbox whose id it starts.
        id: String,
    },
    /// The supervisor does not answer.
    #[error("The supervisor of sandbox {id} does not answer ({reason}): remove the sandbox with `vmfactory sandbox rm -f {id}`")]
    Unreachable {
        /// The sandbox.
        id: String,
        /// What happened.
        reason: String,
    },
    /// The supervisor refused or failed a request.
    #[error("Sandbox {id}: {message}")]
    Rpc {
        /// The sandbox.
        id: String,
        /// What the supervisor said.
        message: String,
    },
    /// A container of the sandbox could not be made.
    #[error("Cannot make container {name:?} in the sandbox's VM")]
    Container {
        /// The container's name.
        name: String,
        /// Why.
        #[source]
        source: vmfactory_factory::ContainerError,
    },
    /// The runtime directory is not ours alone.
    #[error(transparent)]
    RuntimeDir(vmfactory_hypervisor::HypervisorError),
    /// A sandbox file is unreadable.
    #[error("Sandbox record {path} is damaged: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
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
    /// Getting or driving the VM failed.
    #[error(transparent)]
    Factory(#[from] vmfactory_factory::FactoryError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] vmfactory_factory::VmError),
    /// Serving the local API failed.
    #[error("Cannot serve the sandbox API: {0}")]
    Serve(String),
}
