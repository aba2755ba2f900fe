//! The configuration file (TOML): `[hypervisor.qemu]`, `[agent]`, `[guest]` and Kata's
//! `[factory]` keys, with validation whose messages name the key and the fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmfactory_hypervisor::qemu::accel::Accelerator;
use vmfactory_hypervisor::qemu::{default_firmware, default_runtime_dir, QemuConfig};

use vmfactory_guest_image::{KernelSource, QemuSource};

use crate::config::VmConfig;
use crate::metrics::MetricsAddress;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmfactory/configuration.toml";
/// Largest configuration file read, bytes: anything bigger is not a configuration.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most VMs a VMCache server keeps ready, and most clones in a template's warm pool.
pub const MAX_READY_VMS: u32 = 64;
/// Longest boot or agent timeout, seconds.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// Debian's QEMU, by name in `PATH`: the binary when `path` is empty and no built QEMU
/// is used.
pub const DEBIAN_QEMU: &str = "qemu-system-x86_64";

/// Most vCPUs a QEMU guest can be grown to.
pub const MAX_VCPUS: u32 = 255;
/// Hot-plug limit of guest RAM when the host's memory is unknown or larger, MiB.
const DEFAULT_MAX_MEMORY_MIB: u32 = 2048;

/// Errors of loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("Cannot read the configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is too large to be a configuration.
    #[error("Configuration {} is larger than {} KiB: point --config at vmfactory's TOML configuration", .path.display(), MAX_CONFIG_BYTES >> 10)]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML for our schema (unknown keys included).
    #[error("Invalid configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("Invalid configuration{}: {key}: {message}", where_in(.path, *.line))]
    Invalid {
        /// The offending key, e.g. `hypervisor.qemu.default_memory`.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
        /// The file that set it, when one did.
        path: Option<PathBuf>,
        /// The key's line in that file, when it is there once.
        line: Option<usize>,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
        path: None,
        line: None,
    }
}

/// " PATH (line N)" for a message, or nothing without a file.
fn where_in(path: &Option<PathBuf>, line: Option<usize>) -> String {
    match (path, line) {
        (Some(path), Some(line)) => format!(" {} (line {line})", path.display()),
        (Some(path), None) => format!(" {}", path.display()),
        _ => String::new(),
    }
}

/// The line of `text` that sets `key` (`hypervisor.qemu.default_memory`), 1-based, as the
/// TOML parser's spans place it; `None` when the file does not set it.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let (path, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut table: &dyn toml_edit::TableLike = document.as_table();
    for part in path.split('.').filter(|part| !part.is_empty()) {
        table = table.get(part)?.as_table_like()?;
    }
    let span = table.key(name)?.span()?;
    Some(line_and_column(text, span.start).0)
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Hypervisor tables.
    pub hypervisor: HypervisorSettings,
    /// Agent settings.
    pub agent: AgentSettings,
    /// Factory settings (Kata's keys plus ours).
    pub factory: FactorySettings,
    /// The guest image.
    pub guest: GuestSettings,
}

/// `[guest]`: the guest image vmfactory builds when `hypervisor.qemu.kernel` is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestSettings {
    /// `"vmfactory"` (default: our kernel, built from Debian's kernel source) or
    /// `"debian"` (Debian's cloud kernel with its virtio modules).
    pub kernel: KernelSource,
    /// The QEMU of VMs when `hypervisor.qemu.path` is not set: `"vmfactory"` (default:
    /// built by `vmfactory guest build` from the source of the installed
    /// `qemu-system-x86`, with only the devices vmfactory's VMs use; starts in about half
    /// the time) or `"debian"` (the installed `qemu-system-x86_64`).
    pub qemu: QemuSource,
}

/// `[hypervisor]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorSettings {
    /// `[hypervisor.qemu]`
    pub qemu: QemuSettings,
}

/// `[hypervisor.qemu]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuSettings {
    /// QEMU binary (path or name in PATH); empty (the default): the one `[guest] qemu`
    /// chooses, vmfactory's built QEMU or Debian's `qemu-system-x86_64`.
    pub path: PathBuf,
    /// Guest kernel; empty: the built guest image's.
    pub kernel: PathBuf,
    /// Guest initramfs; empty: the built guest image's.
    pub initrd: PathBuf,
    /// `q35` or `pc`.
    pub machine_type: String,
    /// Extra kernel parameters.
    pub kernel_params: String,
    /// Firmware image; empty: QEMU's default (SeaBIOS), which the `vmgenid` device needs
    /// (qboot boots no VM with it).
    pub firmware: PathBuf,
    /// vCPUs per VM.
    pub default_vcpus: u32,
    /// Most vCPUs a VM can be grown to.
    pub default_maxvcpus: u32,
    /// Guest RAM per VM, MiB.
    pub default_memory: u32,
    /// DIMM slots for memory hot-plug.
    pub memory_slots: u32,
    /// Most guest RAM a VM can be grown to, MiB.
    pub default_maxmemory: u32,
    /// `auto`, `kvm` or `tcg`.
    pub accelerator: Accelerator,
    /// The kernel is a PVM guest kernel (runs on kvm_pvm).
    pub kernel_is_pvm: bool,
    /// TCG translation buffer, MiB (0: QEMU's default).
    pub tcg_tb_size: u32,
    /// QEMU runs with vmfactory's stand-ins for libraries it links but vmfactory's VMs
    /// never call (the disassembler capstone, RDMA, persistent memory, VDE, FUSE, eBPF,
    /// VNC's and screendumps' libraries): about 2.2 MiB less memory per VM and a faster
    /// start. `false` keeps QEMU's own (to read disassembly in QEMU's debug output, or
    /// to drive QEMU by hand with one of those features). `stub_disassembler`, its name
    /// before, is read too.
    #[serde(alias = "stub_disassembler")]
    pub stub_unused_libraries: bool,
    /// Seconds a boot may take until the agent answers.
    pub boot_timeout: u64,
    /// Directory of per-VM sockets and logs.
    pub runtime_dir: PathBuf,
}

impl Default for QemuSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            machine_type: "q35".into(),
            kernel_params: String::new(),
            firmware: default_firmware().unwrap_or_default(),
            default_vcpus: 1,
            default_maxvcpus: 4,
            default_memory: 256,
            memory_slots: 4,
            default_maxmemory: host_memory_mib().map_or(DEFAULT_MAX_MEMORY_MIB, |host| {
                host.min(DEFAULT_MAX_MEMORY_MIB)
            }),
            accelerator: Accelerator::Auto,
            kernel_is_pvm: false,
            tcg_tb_size: 0,
            stub_unused_libraries: true,
            boot_timeout: 60,
            runtime_dir: default_runtime_dir(),
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// Seconds a VM handed out by a factory may take to answer after resume.
    pub dial_timeout: u64,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self { dial_timeout: 30 }
    }
}

/// `[factory]`: Kata's keys, plus `template_warm_pool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactorySettings {
    /// Clone VMs from a template.
    pub enable_template: bool,
    /// Where the template lives (a tmpfs is mounted there).
    pub template_path: PathBuf,
    /// VMs the VMCache server keeps ready (0: no VMCache).
    pub vm_cache_number: u32,
    /// Unix socket of the VMCache server.
    pub vm_cache_endpoint: PathBuf,
    /// Template clones kept restored and paused ahead of demand (0: none); each is warmed
    /// up first (handed out once and run `true`, as the VMCache server's VMs are), so its
    /// QEMU has translated the guest's resume, the agent's connection and a first command.
    pub template_warm_pool: u32,
    /// Where the VMCache server serves Prometheus metrics: `127.0.0.1:PORT` or a Unix
    /// socket path; empty: nowhere.
    pub metrics_address: String,
}

impl Default for FactorySettings {
    fn default() -> Self {
        let runtime = default_runtime_dir();
        Self {
            enable_template: false,
            template_path: runtime.join("template"),
            vm_cache_number: 0,
            vm_cache_endpoint: runtime.join("cache.sock"),
            template_warm_pool: 0,
            metrics_address: String::new(),
        }
    }
}

/// The host's memory (`MemTotal` of /proc/meminfo), MiB; `None` when unknown.
pub fn host_memory_mib() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(u32::try_from(kib >> 10).unwrap_or(u32::MAX))
}

/// Longest path a Unix socket address holds, bytes.
const MAX_SOCKET_PATH: usize = 107;
/// Longest socket path below the runtime directory: `/sandbox/<12 hex>/sandbox.sock`
/// (a VM's `/vm/<16 hex>/agent.sock` is shorter).
const RUNTIME_SOCKET_SUFFIX: usize = 34;
/// Longest path (`PATH_MAX` less its NUL) and path component (`NAME_MAX`), bytes.
const MAX_PATH: usize = 4095;
const MAX_NAME: usize = 255;

/// Refuses a path the system cannot use: a NUL byte, a component or the whole too long,
/// or (with `socket_suffix`) a Unix socket at `path` + that many bytes that would not fit.
fn check_path(
    key: &'static str,
    path: &Path,
    socket_suffix: Option<usize>,
) -> Result<(), SettingsError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.contains(&0) {
        return Err(invalid(key, "contains a NUL byte: remove it"));
    }
    if bytes.len() > MAX_PATH {
        return Err(invalid(
            key,
            format!(
                "is {} bytes long, more than {MAX_PATH}: use a shorter path",
                bytes.len()
            ),
        ));
    }
    if let Some(component) = path.components().find(|c| c.as_os_str().len() > MAX_NAME) {
        let name = component.as_os_str().to_string_lossy();
        return Err(invalid(
            key,
            format!(
                "has a component of {} bytes ({}…), more than {MAX_NAME}: use shorter names",
                name.len(),
                name.chars().take(16).collect::<String>()
            ),
        ));
    }
    if let Some(suffix) = socket_suffix {
        if bytes.len() + suffix > MAX_SOCKET_PATH {
            return Err(invalid(
                key,
                format!(
                    "is {} bytes long: Unix socket paths{} are limited to {MAX_SOCKET_PATH} bytes; use a path of at most {} bytes",
                    bytes.len(),
                    if suffix > 0 { " below it" } else { "" },
                    MAX_SOCKET_PATH - suffix
                ),
            ));
        }
    }
    Ok(())
}

fn check_timeout(key: &'static str, seconds: u64) -> Result<(), SettingsError> {
    if seconds == 0 || seconds > MAX_TIMEOUT_SECS {
        return Err(invalid(
            key,
            format!("{seconds} s is out of range: give 1 to {MAX_TIMEOUT_SECS} seconds"),
        ));
    }
    Ok(())
}

/// Most vCPUs the host offers.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

impl Settings {
    /// Parses TOML text (from `path`, for messages) and validates it.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SettingsError> {
        let mut settings: Settings = toml::from_str(text).map_err(|err| SettingsError::Parse {
            path: path.to_path_buf(),
            message: err.message().to_string()
                + &err
                    .span()
                    .map(|span| {
                        let (line, column) = line_and_column(text, span.start);
                        format!(" (line {line}, column {column})")
                    })
                    .unwrap_or_default(),
        })?;
        settings.place_in_runtime_dir(text);
        // A value's error names the file and, when it is there, the key's line.
        settings.validate().map_err(|err| match err {
            SettingsError::Invalid { key, message, .. } => SettingsError::Invalid {
                key,
                message,
                path: Some(path.to_path_buf()),
                line: line_of_key(text, key),
            },
            other => other,
        })?;
        Ok(settings)
    }

    /// The template and the VMCache socket lie in the runtime directory unless the file
    /// names them: a `runtime_dir` of the file moves them along (their defaults were made
    /// from the default runtime directory).
    fn place_in_runtime_dir(&mut self, text: &str) {
        let Ok(table) = toml::from_str::<toml::Table>(text) else {
            return;
        };
        let given = |section: &[&str], key: &str| {
            let mut value = Some(&table);
            for name in section {
                value = value
                    .and_then(|t| t.get(*name))
                    .and_then(toml::Value::as_table);
            }
            value.is_some_and(|t| t.contains_key(key))
        };
        if !given(&["hypervisor", "qemu"], "runtime_dir") {
            return;
        }
        let runtime = self.hypervisor.qemu.runtime_dir.clone();
        if !given(&["factory"], "template_path") {
            self.factory.template_path = runtime.join("template");
        }
        if !given(&["factory"], "vm_cache_endpoint") {
            self.factory.vm_cache_endpoint = runtime.join("cache.sock");
        }
    }

    /// `--config` if given, else [`DEFAULT_CONFIG_PATH`] if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => DEFAULT_CONFIG_PATH.into(),
            None => return Ok(Self::default()),
        };
        let read_error = |source| SettingsError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read_error)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_CONFIG_BYTES + 1),
            &mut bytes,
        )
        .map_err(read_error)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(SettingsError::TooLarge { path });
        }
        let text = String::from_utf8(bytes).map_err(|_| SettingsError::Parse {
            path: path.clone(),
            message: "not UTF-8 text".into(),
        })?;
        Self::parse(&text, &path)
    }

    /// Checks values and their combinations.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let qemu = &self.hypervisor.qemu;
        if qemu.default_memory == 0 {
            return Err(invalid(
                "hypervisor.qemu.default_memory",
                "is 0: give the guest memory in MiB, at least 64",
            ));
        }
        if qemu.default_memory < vmfactory_hypervisor::MIN_MEMORY_MIB {
            return Err(invalid(
                "hypervisor.qemu.default_memory",
                format!(
                    "{} MiB is too small: give at least {} MiB",
                    qemu.default_memory,
                    vmfactory_hypervisor::MIN_MEMORY_MIB
                ),
            ));
        }
        // Before the relations between keys: a value beyond the host is the real problem.
        self.validate_against_host(host_memory_mib())?;
        if qemu.default_vcpus == 0 {
            return Err(invalid(
                "hypervisor.qemu.default_vcpus",
                "is 0: a VM needs at least 1 vCPU",
            ));
        }
        let host = host_cpus();
        if qemu.default_vcpus > host {
            return Err(invalid(
                "hypervisor.qemu.default_vcpus",
                format!(
                    "{} exceeds the host's {host} CPUs: lower it",
                    qemu.default_vcpus
                ),
            ));
        }
        if qemu.default_maxvcpus < qemu.default_vcpus {
            return Err(invalid(
                "hypervisor.qemu.default_maxvcpus",
                format!(
                    "{} is below default_vcpus ({}): raise it",
                    qemu.default_maxvcpus, qemu.default_vcpus
                ),
            ));
        }
        if qemu.default_maxvcpus > MAX_VCPUS {
            return Err(invalid(
                "hypervisor.qemu.default_maxvcpus",
                format!("{} exceeds {MAX_VCPUS}: lower it", qemu.default_maxvcpus),
            ));
        }
        if qemu.default_maxmemory < qemu.default_memory {
            return Err(invalid(
                "hypervisor.qemu.default_maxmemory",
                format!(
                    "{} MiB is below default_memory ({} MiB): raise it",
                    qemu.default_maxmemory, qemu.default_memory
                ),
            ));
        }
        if qemu.memory_slots > 256 {
            return Err(invalid(
                "hypervisor.qemu.memory_slots",
                format!("{} exceeds 256: lower it", qemu.memory_slots),
            ));
        }
        if !matches!(qemu.machine_type.as_str(), "q35" | "pc") {
            return Err(invalid(
                "hypervisor.qemu.machine_type",
                format!(
                    "{:?} is not supported: use \"q35\" or \"pc\"",
                    qemu.machine_type
                ),
            ));
        }
        if !qemu.kernel.as_os_str().is_empty() && !qemu.kernel.is_file() {
            return Err(invalid(
                "hypervisor.qemu.kernel",
                format!(
                    "{} does not exist: fix the path, or leave it empty to use the built guest image",
                    qemu.kernel.display()
                ),
            ));
        }
        if !qemu.initrd.as_os_str().is_empty() {
            let size = std::fs::metadata(&qemu.initrd).map(|m| m.len()).map_err(|_| {
                invalid(
                    "hypervisor.qemu.initrd",
                    format!(
                        "{} does not exist: fix the path, or leave it empty to use the built guest image",
                        qemu.initrd.display()
                    ),
                )
            })?;
            if size >= u64::from(qemu.default_memory) << 20 {
                return Err(invalid(
                    "hypervisor.qemu.initrd",
                    format!(
                        "{} is {} MiB, larger than guest memory ({} MiB): raise default_memory",
                        qemu.initrd.display(),
                        size >> 20,
                        qemu.default_memory
                    ),
                ));
            }
        }
        if qemu.kernel.as_os_str().is_empty() != qemu.initrd.as_os_str().is_empty() {
            return Err(invalid(
                "hypervisor.qemu.kernel",
                "kernel and initrd must be set together (or both left empty for the built guest image)",
            ));
        }
        if qemu.accelerator == Accelerator::Tcg && qemu.kernel_is_pvm {
            return Err(invalid(
                "hypervisor.qemu.kernel_is_pvm",
                "is set but accelerator = \"tcg\": PVM kernels matter only with KVM; use accelerator = \"auto\" or \"kvm\"",
            ));
        }
        check_timeout("hypervisor.qemu.boot_timeout", qemu.boot_timeout)?;
        check_timeout("agent.dial_timeout", self.agent.dial_timeout)?;
        if qemu.runtime_dir.as_os_str().is_empty() || qemu.runtime_dir.is_relative() {
            return Err(invalid(
                "hypervisor.qemu.runtime_dir",
                format!(
                    "{:?} is not an absolute path: give a directory for VM sockets and logs, e.g. \"/run/vmfactory\"",
                    qemu.runtime_dir
                ),
            ));
        }
        let factory = &self.factory;
        check_path(
            "hypervisor.qemu.runtime_dir",
            &qemu.runtime_dir,
            Some(RUNTIME_SOCKET_SUFFIX),
        )?;
        check_path("factory.template_path", &factory.template_path, None)?;
        check_path(
            "factory.vm_cache_endpoint",
            &factory.vm_cache_endpoint,
            Some(0),
        )?;
        // Relative paths would name another place from every working directory.
        for (key, path, example) in [
            (
                "factory.template_path",
                &factory.template_path,
                "/run/vmfactory/template",
            ),
            (
                "factory.vm_cache_endpoint",
                &factory.vm_cache_endpoint,
                "/run/vmfactory/cache.sock",
            ),
        ] {
            if path.is_relative() && !path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    format!("{path:?} is not an absolute path: give one, e.g. \"{example}\""),
                ));
            }
        }
        if factory.enable_template && factory.template_path.as_os_str().is_empty() {
            return Err(invalid(
                "factory.template_path",
                "is empty but enable_template = true: give a directory for the template",
            ));
        }
        for (key, value) in [
            ("factory.vm_cache_number", factory.vm_cache_number),
            ("factory.template_warm_pool", factory.template_warm_pool),
        ] {
            if value > MAX_READY_VMS {
                return Err(invalid(
                    key,
                    format!("{value} exceeds {MAX_READY_VMS}: lower it (each is a running VM)"),
                ));
            }
        }
        if factory.template_warm_pool > 0 && !factory.enable_template {
            return Err(invalid(
                "factory.template_warm_pool",
                "needs enable_template = true: enable templates or set the pool to 0",
            ));
        }
        if !factory.metrics_address.is_empty() {
            if let Err(err) = factory.metrics_address.parse::<MetricsAddress>() {
                return Err(invalid("factory.metrics_address", err.to_string()));
            }
            if factory.vm_cache_number == 0 {
                return Err(invalid(
                    "factory.metrics_address",
                    "needs vm_cache_number > 0: metrics are served by the VMCache server",
                ));
            }
        }
        if factory.vm_cache_number > 0 && factory.vm_cache_endpoint.as_os_str().is_empty() {
            return Err(invalid(
                "factory.vm_cache_endpoint",
                "is empty but vm_cache_number > 0: give the server's Unix socket path",
            ));
        }
        Ok(())
    }

    /// Checks the memory keys against the host's memory (`host_mib`; skipped when unknown).
    fn validate_against_host(&self, host_mib: Option<u32>) -> Result<(), SettingsError> {
        let qemu = &self.hypervisor.qemu;
        let Some(host) = host_mib else {
            return Ok(());
        };
        for (key, value) in [
            ("hypervisor.qemu.default_memory", qemu.default_memory),
            ("hypervisor.qemu.default_maxmemory", qemu.default_maxmemory),
            ("hypervisor.qemu.tcg_tb_size", qemu.tcg_tb_size),
        ] {
            if value > host {
                return Err(invalid(
                    key,
                    format!("{value} MiB exceeds the host's memory ({host} MiB): lower it"),
                ));
            }
        }
        Ok(())
    }

    /// The VM config these settings describe, with `kernel`/`initrd` filling in empty
    /// settings (the built guest image).
    pub fn vm_config(&self, image: Option<(PathBuf, PathBuf)>) -> VmConfig {
        let qemu = &self.hypervisor.qemu;
        let (kernel, initrd) = if qemu.kernel.as_os_str().is_empty() {
            image.unwrap_or_default()
        } else {
            (qemu.kernel.clone(), qemu.initrd.clone())
        };
        VmConfig {
            qemu: QemuConfig {
                binary: if qemu.path.as_os_str().is_empty() {
                    DEBIAN_QEMU.into()
                } else {
                    qemu.path.clone()
                },
                machine_type: qemu.machine_type.clone(),
                accelerator: qemu.accelerator,
                kernel_is_pvm: qemu.kernel_is_pvm,
                tb_size_mib: (qemu.tcg_tb_size > 0).then_some(qemu.tcg_tb_size),
                runtime_dir: qemu.runtime_dir.clone(),
                start_timeout: Duration::from_secs(30),
                firmware: (!qemu.firmware.as_os_str().is_empty()).then(|| qemu.firmware.clone()),
                die_with_parent: false,
                library_dir: None,
                // Set by the CLI when the QEMU is the build of its own recipe.
                vmfactory_build: false,
            },
            kernel,
            initrd: (!initrd.as_os_str().is_empty()).then_some(initrd),
            kernel_params: qemu.kernel_params.clone(),
            vcpus: qemu.default_vcpus,
            max_vcpus: qemu.default_maxvcpus,
            memory_mib: qemu.default_memory,
            memory_slots: qemu.memory_slots,
            max_memory_mib: qemu.default_maxmemory,
            boot_timeout: Duration::from_secs(qemu.boot_timeout),
            agent_timeout: Duration::from_secs(self.agent.dial_timeout),
        }
    }

    /// Whether the kernel and initrd come from the built guest image.
    pub fn uses_guest_image(&self) -> bool {
        self.hypervisor.qemu.kernel.as_os_str().is_empty()
    }
}

#[cfg(test)]
mod tests;
