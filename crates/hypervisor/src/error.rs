//! Errors of the hypervisor layer.

use std::path::PathBuf;

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The VM description is unusable.
    #[error("Invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// A file the VM needs does not exist.
    #[error("{what} {path} not found: {hint}")]
    MissingFile {
        /// What the file is ("Kernel", "QEMU binary", …).
        what: &'static str,
        /// The path that was looked up.
        path: PathBuf,
        /// What the user should do.
        hint: &'static str,
    },
    /// The hypervisor process could not be started.
    #[error("Cannot start {binary}")]
    Spawn {
        /// The binary that was executed.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor process exited on its own.
    #[error("QEMU exited ({status}) {when}{report}")]
    Exited {
        /// Exit status as text.
        status: String,
        /// What was happening ("during start-up", …).
        when: &'static str,
        /// Last lines of QEMU's stderr and of the guest console.
        report: String,
    },
    /// A QMP command failed or the QMP connection broke.
    #[error("QMP {command} failed: {message}")]
    Qmp {
        /// The QMP command.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("Timed out after {seconds:.1} s {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long we waited.
        seconds: f64,
    },
    /// A file system operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A handed-over VM belongs to another backend than the one asked to adopt it.
    #[error("A VM handed over by the {found} backend cannot be taken over by the {expected} backend: configure the same hypervisor on both sides")]
    ForeignHandle {
        /// The backend that handed the VM over.
        found: &'static str,
        /// The backend asked to adopt it.
        expected: &'static str,
    },
    /// The operation is not supported by this backend.
    #[error("{0} is not supported by this hypervisor")]
    Unsupported(&'static str),
}

/// Result type of the hypervisor layer.
pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;
