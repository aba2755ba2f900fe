//! The error type of building the guest image or the agent.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::elf::ElfError;
use crate::initramfs::InitramfsError;
use crate::modules::ModuleError;

/// Errors of building the guest image or the agent.
#[derive(Debug, Error)]
pub enum GuestImageError {
    /// A required Debian tool is not installed.
    #[error("Command {tool} not found: vmfactory builds its guest image from Debian packages; run it on Debian/Ubuntu or pass a prebuilt kernel and initrd")]
    ToolMissing {
        /// The missing program.
        tool: String,
    },
    /// Tools or headers a kernel build needs are missing.
    #[error("Building the guest kernel needs {missing}: run `apt-get install bc bison flex libelf-dev libssl-dev make gcc xz-utils` (as root), or use Debian's kernel ([guest] kernel = \"debian\" or --guest-kernel debian)")]
    KernelBuildTools {
        /// The missing programs and packages.
        missing: String,
    },
    /// A step of the kernel build failed.
    #[error("The guest kernel build failed at {step}: {detail}")]
    KernelBuild {
        /// The step, e.g. `make vmlinux bzImage`.
        step: String,
        /// The tail of its output.
        detail: String,
    },
    /// Tools or headers a QEMU build needs are missing.
    #[error("Building vmfactory's QEMU needs {missing}: run `apt-get install meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev dpkg-dev gcc` (as root), or use Debian's QEMU ([guest] qemu = \"debian\" or --guest-qemu debian)")]
    QemuBuildTools {
        /// The missing programs and packages.
        missing: String,
    },
    /// A step of the QEMU build failed.
    #[error("The QEMU build failed at {step}: {detail}; or use Debian's QEMU ([guest] qemu = \"debian\" or --guest-qemu debian)")]
    QemuBuild {
        /// The step, e.g. `configure`.
        step: String,
        /// The tail of its output.
        detail: String,
    },
    /// Debian's QEMU, whose source and firmware vmfactory's QEMU uses, is not installed.
    #[error("vmfactory's QEMU is built from the source of the installed qemu-system-x86 and uses its firmware, but qemu-system-x86 is not installed (or dpkg-query is missing: not a Debian system): run `apt-get install qemu-system-x86` (as root), or name a QEMU with [hypervisor.qemu] path or --qemu")]
    QemuNotInstalled,
    /// The resulting kernel config lacks options we asked for.
    #[error("The guest kernel config lacks options vmfactory.config asks for: {options}; their dependencies are not met in this kernel version: fix crates/guest-image/kernel/vmfactory.config")]
    KernelConfig {
        /// The options, with wanted and actual values.
        options: String,
    },
    /// A tool exists but could not be started.
    #[error("Could not run {tool}; check that it is executable")]
    ToolFailed {
        /// The program.
        tool: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `apt-cache` could not resolve a package.
    #[error("Could not resolve package {package} with apt-cache ({detail}); check the package name and run `apt-get update`")]
    AptResolve {
        /// The package being resolved.
        package: String,
        /// What apt said.
        detail: String,
    },
    /// A package has no installable version.
    #[error(
        "Package {package} has no candidate version; run `apt-get update` (as root) and try again"
    )]
    NoCandidate {
        /// The package.
        package: String,
    },
    /// `apt-get download` failed.
    #[error("apt-get could not download {package}: {stderr}; check access to the Debian mirror and run `apt-get update`")]
    AptDownload {
        /// `name=version` of the package.
        package: String,
        /// apt's error output.
        stderr: String,
    },
    /// `dpkg-deb` could not read or unpack a package.
    #[error("Could not unpack {} with dpkg-deb ({detail}); delete the file and build again to download it afresh", path.display())]
    Unpack {
        /// The `.deb` file.
        path: PathBuf,
        /// What dpkg-deb said.
        detail: String,
    },
    /// The kernel package lacks an expected file.
    #[error("Kernel package {package} has no {what}; pick another kernel package (it must ship boot/vmlinuz-* and lib/modules)")]
    KernelLayout {
        /// The kernel package.
        package: String,
        /// What is missing.
        what: String,
    },
    /// The busybox package lacks its binary or the binary does not list its applets.
    #[error("Busybox from {package} is unusable ({detail}); check that the host can run x86-64 binaries and that the package is not corrupt")]
    Busybox {
        /// The busybox package.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// Kernel module lookup or ordering failed.
    #[error(transparent)]
    Modules(#[from] ModuleError),
    /// Writing the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// A file or directory operation failed.
    #[error("Could not access {}; check that the directory is writable and the disk is not full", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The manifest could not be encoded or decoded.
    #[error("Image manifest {} is not valid JSON of this version; delete the image directory and build again", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The agent binary was not given or does not exist.
    #[error("Agent binary {} does not exist; build it first (`cargo build --profile agent -p vmfactory-agent --target x86_64-unknown-linux-gnu` with RUSTFLAGS='-C target-feature=+crt-static') and pass its path", path.display())]
    AgentMissing {
        /// The configured path.
        path: PathBuf,
    },
    /// The digest given with an embedded agent is not a SHA-256.
    #[error("The agent embedded in this program has an invalid digest {digest:?}; rebuild the program with cargo")]
    EmbeddedAgentDigest {
        /// The digest given.
        digest: String,
    },
    /// Building the agent with cargo failed.
    #[error(
        "Building the agent failed ({detail}); fix the errors cargo printed above and try again"
    )]
    AgentBuild {
        /// What failed.
        detail: String,
    },
    /// The agent is not an ELF executable.
    #[error("Agent binary {} is not an ELF executable; pass the built vmfactory-agent binary", path.display())]
    AgentNotElf {
        /// The agent path.
        path: PathBuf,
        /// Why it is not readable as ELF.
        #[source]
        source: ElfError,
    },
    /// The agent is dynamically linked and cannot run as `/init`.
    #[error("Agent binary {} is dynamically linked (it has an ELF interpreter) and cannot run as /init; build it with RUSTFLAGS='-C target-feature=+crt-static' and --target x86_64-unknown-linux-gnu", path.display())]
    AgentNotStatic {
        /// The agent path.
        path: PathBuf,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> GuestImageError + '_ {
    move |source| GuestImageError::Io {
        path: path.to_owned(),
        source,
    }
}
