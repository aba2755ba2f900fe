//! The QEMU command line for a VM.

use std::path::{Path, PathBuf};

use super::accel::ResolvedAccel;
use super::QemuConfig;
use crate::{HypervisorError, MemoryBackend, Result, VmSpec};

pub use vmfactory_protocols::contract::AGENT_PORT_NAME;
/// QEMU device id of that port (named in QMP `VSERPORT_CHANGE` events).
pub const AGENT_PORT_ID: &str = "agent-port";
/// File descriptor number under which a clone's QEMU inherits the template state file.
pub const STATE_FD: i32 = 3;
/// PCIe root ports reserved on q35 for disk hot-plug (one disk each).
pub const HOTPLUG_PORTS: usize = 4;
/// QEMU id prefix of those ports (`vmfhp0`, `vmfhp1`, …).
pub const HOTPLUG_PORT_PREFIX: &str = "vmfhp";
/// Kernel parameters every TCG guest gets besides its own. TCG offers no TSC-deadline
/// timer, so the kernel would calibrate the local APIC timer against the HPET for 100 ms
/// of every boot. `lapic_timer_hz` (the guest kernel's patch 0002) gives it the timer's
/// clock instead: QEMU's emulated local APIC counts at 1 GHz. The timer stays the
/// one-shot clock event, so an idle guest is tickless (with `noapictimer`, used before,
/// the HPET ticked 250 times a second: an idle VM's QEMU used 8.4% of a core, now none).
/// A kernel without the patch ignores the parameter and calibrates. A boot (not a clone)
/// also gets `tsc_early_khz`, the host's TSC rate ([`super::tsc`]).
pub const TCG_KERNEL_PARAMS: &str = "lapic_timer_hz=1000000000";
/// Kernel parameter of VMs with a `vmgenid` device: the general-purpose event QEMU raises
/// when the VM generation ID changes (its `_E05` method only notifies the device). With
/// it, vmfactory's kernel (patch 0004) handles that event itself and reseeds its CRNG on
/// a worker the handler queues, instead of running the AML method and its notify (about
/// 1,000 guest blocks each TCG clone translated anew). Other kernels ignore it (Linux
/// drops an unknown `module.parameter` from the command line silently). It goes first,
/// so that a user's `vmgenid.gpe=-1` in `kernel_params` (the last value wins) turns it
/// off. Clones inherit it from the template's boot.
pub const VMGENID_KERNEL_PARAM: &str = "vmgenid.gpe=5";
/// Machine devices no vmfactory guest uses, left out (`-machine` properties of both `q35`
/// and `pc`): the SATA controller, SMBus, the PS/2 controller and VMware's I/O port. Fewer
/// devices for SeaBIOS and the kernel to probe (SeaBIOS's AHCI and keyboard set-up, the
/// kernel's PCI scan), and less emulated hardware exposed to the guest. Disks are
/// virtio-blk; a guest reboots by a triple fault (`reboot=t` in the factory's kernel
/// parameters), which `-no-reboot` turns into QEMU's exit.
pub const UNUSED_DEVICES_OFF: &str = "sata=off,smbus=off,i8042=off,vmport=off";
/// Ports of the agent's virtio-serial device: port 0, which QEMU keeps for a console, and
/// the agent's port 1. QEMU's default is 31 ports, each with two virtqueues that QEMU
/// allocates (about 14 KiB of heap each) and the guest driver sets up at boot; vmfactory
/// uses one.
pub const AGENT_SERIAL_MAX_PORTS: u32 = 2;
/// TCG guests go without QEMU's `kvmvapic` (`apic.vapic=off`): an option ROM SeaBIOS runs
/// at every boot (about 3 ms under TCG) and a TPR-patching helper for 32-bit Windows XP
/// guests, which a Linux guest does not use.
pub const TCG_NO_VAPIC: &str = "apic.vapic=off";
/// Longest path a Unix socket address can hold.
const MAX_SOCKET_PATH: usize = 107;

/// The files of one VM inside its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM directory.
    pub dir: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Host end of the agent's virtio-serial port.
    pub agent: PathBuf,
    /// Guest serial console output.
    pub console: PathBuf,
    /// QEMU's own stderr.
    pub stderr: PathBuf,
}

impl VmPaths {
    /// The paths of the VM directory `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let paths = Self {
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            console: dir.join("console.log"),
            stderr: dir.join("qemu.stderr"),
        };
        for socket in [&paths.qmp, &paths.agent] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(HypervisorError::InvalidConfig(format!(
                    "Socket path {} is longer than {MAX_SOCKET_PATH} bytes: choose a shorter runtime directory",
                    socket.display()
                )));
            }
        }
        Ok(paths)
    }
}

/// How a QEMU process starts its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMode {
    /// Boot the kernel.
    #[default]
    Boot,
    /// Wait paused for a device state to load (`-incoming defer -S`, or with
    /// vmfactory's QEMU `-incoming fd:3 -S`); the state file is inherited as fd
    /// [`STATE_FD`].
    Incoming,
    /// As [`StartMode::Incoming`], with the whole command line of a boot (`-kernel`,
    /// `-initrd`, `-append`) as Kata's template factory starts its clones: the
    /// benchmark's Kata-method baseline.
    IncomingKata,
}

/// True when `firmware` is qboot, which hangs with a `vmgenid` device.
pub fn is_qboot(firmware: Option<&Path>) -> bool {
    firmware
        .and_then(|f| f.file_name())
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.contains("qboot"))
}

/// The CPU model of TCG guests: QEMU's `max`, without ERMS and FSRM ("enhanced" and "fast
/// short" `rep movsb`/`rep stosb`). With them the guest kernel copies and clears memory
/// with `rep movsb`/`rep stosb` (`copy_user_enhanced_fast_string`, `clear_page_erms`) and
/// glibc's `memcpy` uses `rep movsb` from a few KiB up, and TCG runs a `rep` string
/// instruction one element per iteration: a byte at a time. Without them the kernel uses
/// `rep movsq`/`rep stosq` (8 bytes an iteration) and glibc its vector loops. Measured
/// in one sandbox each (64 MiB, this machine): `dd if=/dev/zero of=/dev/null` in the guest
/// 0.24 s against 0.07 s; streaming it into `sandbox exec -i` 5.1-5.6 s against 1.6 s;
/// `sandbox cp` in 4.0-4.4 s against 1.6-1.8 s, out 3.0 s against 1.4-1.9 s.
/// ERMS is a speed hint: a kernel that chose `rep movsb` still runs on a CPU without it.
pub const TCG_CPU: &str = "max,erms=off,fsrm=off";

/// Builds QEMU's arguments (without the binary) for `spec`.
pub fn build_args(
    config: &QemuConfig,
    spec: &VmSpec,
    accel: ResolvedAccel,
    paths: &VmPaths,
    mode: StartMode,
) -> Result<Vec<String>> {
    let machine = config.machine_type.as_str();
    if !matches!(machine, "q35" | "pc") {
        return Err(HypervisorError::InvalidConfig(format!(
            "Machine type {machine:?} is not supported: use \"q35\" or \"pc\""
        )));
    }
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("vmfactory-{}", spec.id)]);
    push(&[
        "-machine",
        &format!("{machine},memory-backend=mem0,{UNUSED_DEVICES_OFF}"),
    ]);
    match accel {
        ResolvedAccel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        ResolvedAccel::Tcg => {
            let tcg = match config.tb_size_mib {
                Some(mib) => format!("tcg,tb-size={mib}"),
                None => "tcg".to_string(),
            };
            push(&["-accel", &tcg, "-cpu", TCG_CPU]);
            push(&["-global", TCG_NO_VAPIC]);
        }
    }
    push(&[
        "-smp",
        &format!("{},maxcpus={}", spec.vcpus, spec.max_vcpus),
    ]);
    let memory = if spec.memory_slots > 0 && spec.max_memory_mib > spec.memory_mib {
        format!(
            "{}M,slots={},maxmem={}M",
            spec.memory_mib, spec.memory_slots, spec.max_memory_mib
        )
    } else {
        format!("{}M", spec.memory_mib)
    };
    push(&["-m", &memory]);
    let backend = match &spec.memory {
        MemoryBackend::Memfd => format!(
            "memory-backend-memfd,id=mem0,size={}M,share=on",
            spec.memory_mib
        ),
        MemoryBackend::File { path, share } => format!(
            "memory-backend-file,id=mem0,size={}M,mem-path={},share={}",
            spec.memory_mib,
            escape_option(path),
            if *share { "on" } else { "off" }
        ),
    };
    push(&["-object", &backend]);
    if let Some(firmware) = &config.firmware {
        push(&["-bios", &firmware.to_string_lossy()]);
    }
    // VM generation ID: every QEMU process gets a random GUID (`guid=auto`); after a
    // clone loads a template's state QEMU writes its own GUID into guest memory and
    // notifies the guest, whose vmgenid driver reseeds the kernel's CRNG. qboot cannot
    // run the ACPI linker-loader commands of the device: with it the VM hangs before the
    // kernel prints anything (QEMU 7.2, checked), so qboot VMs go without.
    let vmgenid = !is_qboot(config.firmware.as_deref());
    // Only a boot gets the kernel, its initramfs and its command line. A clone resumes a
    // guest that booted long ago: the kernel's ELF segments, the initrd and the command
    // line are fw_cfg data and start-up ROMs, not migrated RAM, and QEMU would read them
    // for nothing (loading `-kernel` alone took about 6 ms of a clone's QEMU start here,
    // and kept the kernel's symbol table, 1.4 MiB, in its heap).
    if mode != StartMode::Incoming {
        push(&["-kernel", &escape_option(&spec.kernel)]);
        if let Some(initrd) = &spec.initrd {
            push(&["-initrd", &escape_option(initrd)]);
        }
        let mut append = Vec::new();
        if vmgenid {
            append.push(VMGENID_KERNEL_PARAM.to_string());
        }
        append.push(spec.kernel_params.clone());
        if accel == ResolvedAccel::Tcg {
            append.push(TCG_KERNEL_PARAMS.to_string());
            // Only a boot calibrates the TSC.
            if let (StartMode::Boot, Some(khz)) = (mode, super::tsc::host_tsc_khz()) {
                append.push(format!("tsc_early_khz={khz}"));
            }
        }
        append.retain(|part| !part.is_empty());
        push(&["-append", &append.join(" ")]);
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-chardev",
        &format!("file,id=console0,path={}", escape_option(&paths.console)),
        "-serial",
        "chardev:console0",
    ]);
    if vmgenid {
        push(&["-device", "vmgenid,guid=auto"]);
    }
    push(&[
        "-device",
        &format!("virtio-serial-pci,id=vser0,max_ports={AGENT_SERIAL_MAX_PORTS}"),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=agent0,path={},server=on,wait=off",
            escape_option(&paths.agent)
        ),
        "-device",
        &format!(
            "virtserialport,bus=vser0.0,chardev=agent0,id={AGENT_PORT_ID},name={AGENT_PORT_NAME}"
        ),
    ]);
    // Disk hot-plug: empty PCIe root ports a virtio-blk disk can be plugged into later.
    // Templates and their clones share the devices (a clone's command line only leaves
    // out the kernel, its initramfs and parameters), so clones have them too.
    if machine == "q35" {
        for index in 0..HOTPLUG_PORTS {
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={HOTPLUG_PORT_PREFIX}{index},bus=pcie.0,chassis={},slot={index}",
                    index + 1
                ),
            ]);
        }
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape_option(&paths.qmp)),
    ]);
    match mode {
        StartMode::Boot => {}
        // vmfactory's QEMU starts loading the state as its main loop starts, while the
        // QMP connection is made (about 1.3 ms sooner than the two QMP commands
        // `migrate-set-capabilities` and `migrate-incoming`: QEMU reads QMP input one
        // byte per main-loop turn).
        StartMode::Incoming if config.vmfactory_build => push(&[
            "-global",
            "migration.x-ignore-shared=on",
            "-incoming",
            &format!("fd:{STATE_FD}"),
            "-S",
        ]),
        StartMode::Incoming | StartMode::IncomingKata => push(&["-incoming", "defer", "-S"]),
    }
    Ok(args)
}

/// Escapes a path for a QEMU option value (a comma is written as two commas).
fn escape_option(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// True when a QEMU command line (arguments joined) names `path`, as it is written in an
/// option value (commas doubled) or as a plain argument.
pub fn cmdline_names(cmdline: &str, path: &Path) -> bool {
    cmdline.contains(&*path.to_string_lossy()) || cmdline.contains(&escape_option(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::accel::Accelerator;

    fn spec() -> VmSpec {
        VmSpec {
            id: "abc".into(),
            vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            memory_slots: 4,
            max_memory_mib: 2048,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd.img".into()),
            kernel_params: "console=ttyS0 quiet".into(),
            memory: MemoryBackend::Memfd,
        }
    }

    fn config() -> QemuConfig {
        QemuConfig {
            accelerator: Accelerator::Tcg,
            firmware: None,
            ..QemuConfig::default()
        }
    }

    fn args_of(config: &QemuConfig, spec: &VmSpec, accel: ResolvedAccel) -> Vec<String> {
        let paths = VmPaths::new(Path::new("/run/vmf/vm/abc")).expect("paths");
        build_args(config, spec, accel, &paths, StartMode::Boot).expect("args")
    }

    /// The command line of the test VM (`spec()`, TCG) started in `mode`.
    fn started(config: &QemuConfig, mode: StartMode) -> Vec<String> {
        let paths = VmPaths::new(Path::new("/run/vmf/vm/abc")).expect("paths");
        build_args(config, &spec(), ResolvedAccel::Tcg, &paths, mode).expect("args")
    }

    /// The value following `flag`, for every occurrence of it.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_q35_with_hotplug_room() {
        let args = args_of(&config(), &spec(), ResolvedAccel::Tcg);
        assert_eq!(
            values(&args, "-machine"),
            ["q35,memory-backend=mem0,sata=off,smbus=off,i8042=off,vmport=off"]
        );
        assert_eq!(values(&args, "-accel"), ["tcg"]);
        assert_eq!(values(&args, "-cpu"), ["max,erms=off,fsrm=off"]);
        assert_eq!(values(&args, "-smp"), ["1,maxcpus=4"]);
        assert_eq!(values(&args, "-m"), ["256M,slots=4,maxmem=2048M"]);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-memfd,id=mem0,size=256M,share=on"]
        );
        assert_eq!(values(&args, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(values(&args, "-initrd"), ["/k/initrd.img"]);
        let khz = super::super::tsc::host_tsc_khz().expect("this host's TSC rate");
        assert_eq!(
            values(&args, "-append"),
            [format!(
                "vmgenid.gpe=5 console=ttyS0 quiet lapic_timer_hz=1000000000 tsc_early_khz={khz}"
            )]
        );
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/run/vmf/vm/abc/qmp.sock,server=on,wait=off"]
        );
        assert!(values(&args, "-chardev")
            .contains(&"socket,id=agent0,path=/run/vmf/vm/abc/agent.sock,server=on,wait=off"));
        assert!(values(&args, "-device")
            .contains(&"virtserialport,bus=vser0.0,chardev=agent0,id=agent-port,name=agent.0"));
        assert!(values(&args, "-device").contains(&"vmgenid,guid=auto"));
        assert!(values(&args, "-device").contains(&"virtio-serial-pci,id=vser0,max_ports=2"));
        assert_eq!(values(&args, "-global"), ["apic.vapic=off"]);
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(values(&args, "-incoming").is_empty());
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(values(&args, "-bios").is_empty());
        let ports: Vec<&str> = values(&args, "-device")
            .into_iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(ports.len(), HOTPLUG_PORTS);
        assert_eq!(
            ports[0],
            "pcie-root-port,id=vmfhp0,bus=pcie.0,chassis=1,slot=0"
        );
    }

    #[test]
    fn pc_has_no_hotplug_ports() {
        let mut config = config();
        config.machine_type = "pc".into();
        let args = args_of(&config, &spec(), ResolvedAccel::Tcg);
        assert!(!values(&args, "-device")
            .iter()
            .any(|d| d.starts_with("pcie-root-port")));
    }

    #[test]
    fn incoming_mode_waits_paused_for_the_state() {
        let args = started(&config(), StartMode::Incoming);
        assert_eq!(values(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"));
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(
                values(&args, flag).is_empty(),
                "a clone resumes a booted guest: no {flag}"
            );
        }
        let boot = args_of(&config(), &spec(), ResolvedAccel::Tcg);
        assert_eq!(
            boot.len() + 3 - 6,
            args.len(),
            "-incoming defer -S; no -kernel, -initrd or -append"
        );
        // Everything else is the boot's command line: the devices a state loads into.
        let rest: Vec<&String> = args.iter().take_while(|a| *a != "-incoming").collect();
        let mut boot_rest: Vec<&String> = Vec::new();
        let mut boot_args = boot.iter();
        while let Some(arg) = boot_args.next() {
            if ["-kernel", "-initrd", "-append"].contains(&arg.as_str()) {
                boot_args.next(); // its value
            } else {
                boot_rest.push(arg);
            }
        }
        assert_eq!(rest, boot_rest);

        // Kata's clones keep the whole command line (the benchmark's baseline).
        let kata = started(&config(), StartMode::IncomingKata);
        assert_eq!(values(&kata, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(values(&kata, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(
            values(&kata, "-append"),
            ["vmgenid.gpe=5 console=ttyS0 quiet lapic_timer_hz=1000000000"],
            "a clone calibrates no TSC"
        );
        assert_eq!(values(&kata, "-incoming"), ["defer"]);
    }

    #[test]
    fn vmfactory_qemu_loads_the_state_from_its_command_line() {
        let mut ours = config();
        ours.vmfactory_build = true;
        let args = started(&ours, StartMode::Incoming);
        assert_eq!(values(&args, "-incoming"), [format!("fd:{STATE_FD}")]);
        assert!(values(&args, "-global").contains(&"migration.x-ignore-shared=on"));
        assert!(args.iter().any(|a| a == "-S"));
        // The same devices as a QMP-loaded clone's.
        let deferred = started(&config(), StartMode::Incoming);
        let before = |args: &[String]| -> Vec<String> {
            args.iter()
                .take_while(|a| *a != "-incoming" && *a != "migration.x-ignore-shared=on")
                .cloned()
                .collect()
        };
        let mut start = before(&args);
        assert_eq!(start.pop().as_deref(), Some("-global"));
        assert_eq!(start, before(&deferred));
        // Boots and Kata's clones are started as before.
        let kata = started(&ours, StartMode::IncomingKata);
        assert_eq!(values(&kata, "-incoming"), ["defer"]);
        let boot = started(&ours, StartMode::Boot);
        assert!(values(&boot, "-incoming").is_empty());
        assert!(!boot.iter().any(|a| a == "migration.x-ignore-shared=on"));
    }

    #[test]
    fn firmware_is_passed_as_bios() {
        let mut config = config();
        config.firmware = Some("/usr/share/qemu/qboot.rom".into());
        let args = args_of(&config, &spec(), ResolvedAccel::Tcg);
        assert!(!values(&args, "-device").contains(&"vmgenid,guid=auto"));
        assert!(!values(&args, "-append")[0].contains("vmgenid"));
        assert_eq!(values(&args, "-bios"), ["/usr/share/qemu/qboot.rom"]);
    }

    #[test]
    fn kvm_uses_host_cpu_and_tb_size_only_applies_to_tcg() {
        let mut config = config();
        config.tb_size_mib = Some(32);
        let kvm = args_of(&config, &spec(), ResolvedAccel::Kvm);
        assert_eq!(values(&kvm, "-accel"), ["kvm"]);
        assert_eq!(values(&kvm, "-cpu"), ["host"]);
        let tcg = args_of(&config, &spec(), ResolvedAccel::Tcg);
        assert_eq!(values(&tcg, "-accel"), ["tcg,tb-size=32"]);
        // The APIC timer's clock is only given where it would be calibrated (TCG).
        assert_eq!(
            values(&kvm, "-append"),
            ["vmgenid.gpe=5 console=ttyS0 quiet"]
        );
        // A user's own value comes after vmfactory's, and the last one counts.
        let mut off = spec();
        off.kernel_params = "console=ttyS0 vmgenid.gpe=-1".into();
        let kvm = args_of(&config, &off, ResolvedAccel::Kvm);
        assert_eq!(
            values(&kvm, "-append"),
            ["vmgenid.gpe=5 console=ttyS0 vmgenid.gpe=-1"]
        );
        // No parameters of the user's: single spaces, none at the ends.
        off.kernel_params = String::new();
        let tcg = args_of(&config, &off, ResolvedAccel::Tcg);
        let append = &values(&tcg, "-append")[0];
        assert!(
            append.starts_with("vmgenid.gpe=5 lapic_timer_hz=1000000000"),
            "{append}"
        );
        assert!(
            !append.contains("  ") && append.trim() == *append,
            "{append}"
        );
        assert!(
            values(&kvm, "-global").is_empty(),
            "KVM keeps its APIC as it is"
        );
        assert!(values(&tcg, "-append")[0].contains(" lapic_timer_hz=1000000000"));
    }

    #[test]
    fn file_backend_and_escaping() {
        let mut spec = spec();
        spec.memory = MemoryBackend::File {
            path: "/tmpl,x/memory".into(),
            share: false,
        };
        spec.memory_slots = 0;
        let args = args_of(&config(), &spec, ResolvedAccel::Tcg);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=mem0,size=256M,mem-path=/tmpl,,x/memory,share=off"]
        );
        assert_eq!(values(&args, "-m"), ["256M"]);
    }

    #[test]
    fn rejects_unknown_machine_and_long_socket_paths() {
        let mut config = config();
        config.machine_type = "virt".into();
        let paths = VmPaths::new(Path::new("/run/x")).expect("paths");
        let err = build_args(
            &config,
            &spec(),
            ResolvedAccel::Tcg,
            &paths,
            StartMode::Boot,
        )
        .expect_err("machine");
        assert!(err.to_string().contains("q35"), "{err}");
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(VmPaths::new(&long).is_err());
    }

    #[test]
    fn a_path_with_commas_is_found_in_the_command_line() {
        let dir = Path::new("/run/a b,c/vm");
        let paths = VmPaths::new(dir).expect("paths");
        let qmp = format!("unix:{},server=on,wait=off", escape_option(&paths.qmp));
        assert!(cmdline_names(&format!("qemu -qmp {qmp}"), &paths.qmp));
        assert!(cmdline_names(&format!("qemu -qmp {qmp}"), dir));
        assert!(!cmdline_names("qemu -qmp unix:/run/a b,c/other", dir));
    }
}
