//! The guest kernel seen from inside real VMs (QEMU, TCG here): vmfactory's own kernel has
//! every option its config fragment asks for and the devices we rely on; Debian's cloud
//! kernel (`[guest] kernel = "debian"`) still boots and runs a command.

mod common;

use std::process::{Command, Output, Stdio};

use common::{image, BIN};
use vmfactory_guest_image::{requested_options, KERNEL_CONFIG_FRAGMENT};

fn runtime() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmf-kernel-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// `vmfactory run -- sh -c script` with our kernel's image.
fn run_in_guest(runtime: &std::path::Path, script: &str) -> Output {
    let mut command = Command::new(BIN);
    common::with_image(&mut command, runtime);
    command
        .args(["run", "--vcpus", "1", "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("spawn vmfactory")
}

/// True when a line of the script's output is `line` (surrounding blanks aside).
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

#[test]
fn the_guest_kernel_has_every_option_we_ask_for() {
    let dir = runtime();
    let output = run_in_guest(dir.path(), "zcat /proc/config.gz");
    assert!(output.status.success(), "{}", common::text(&output));
    let config = String::from_utf8_lossy(&output.stdout);
    assert!(config.contains("CONFIG_VMGENID=y"), "{config}");
    let missing = vmfactory_guest_image::missing_options(KERNEL_CONFIG_FRAGMENT, &config);
    assert!(missing.is_empty(), "the guest kernel lacks {missing:?}");
    assert!(requested_options(KERNEL_CONFIG_FRAGMENT).len() > 100);
    // The image's vmlinux, which that VM booted, has no section header table: QEMU would
    // copy the symbol table it names into every VM's heap.
    let kernel = std::fs::read(&image().kernel).expect("read the image's kernel");
    assert!(
        kernel.starts_with(b"\x7fELF"),
        "{}",
        image().kernel.display()
    );
    assert_eq!(kernel.get(40..48), Some(&[0u8; 8][..]), "e_shoff");
    assert_eq!(kernel.get(60..62), Some(&[0u8; 2][..]), "e_shnum");
    assert!(
        image().release.ends_with("-vmfactory"),
        "{}",
        image().release
    );
}

#[test]
fn drivers_and_filesystems_are_there_without_modules() {
    let dir = runtime();
    let script = r#"
set -e
echo modules=$(find /lib/modules -name "*.ko*" 2>/dev/null | wc -l)
echo vmgenid=$(ls /sys/bus/acpi/devices | grep -c QEMUVGID || true)
echo virtio=$(cat /sys/bus/virtio/devices/*/device | sort -u | tr '\n' ' ')
for d in virtio_console virtio_blk virtio_net 9pnet_virtio vmw_vsock_virtio_transport; do
  [ -d /sys/bus/virtio/drivers/$d ] && echo driver=$d
done
grep -E 'overlay|erofs|9p|ext4|tmpfs|devpts' /proc/filesystems | awk '{print "fs=" $NF}'
grep -q vsock /proc/net/protocols 2>/dev/null || true
[ -d /sys/devices/system/memory ] && echo memory-hotplug=yes
[ -e /sys/devices/system/cpu/probe ] || [ -d /sys/devices/system/cpu/cpu0 ] && echo cpus=yes
grep -c . /sys/devices/system/cpu/possible >/dev/null && echo possible=$(cat /sys/devices/system/cpu/possible)
echo hotplug-slots=$(ls /sys/bus/pci/slots 2>/dev/null | wc -l)
echo tcg=$(grep -c "QEMU TCG" /proc/cpuinfo || true)
echo rep-string-flags=$(grep -cw -e erms -e fsrm /proc/cpuinfo || true)
echo tsc-early-khz=$(tr ' ' '\n' < /proc/cmdline | grep -c '^tsc_early_khz=[1-9]' || true)
echo tsc-late-calibration=$(dmesg | grep -c 'HPET reference calibration' || true)
echo tsc-quick-calibration=$(dmesg | grep -c 'Fast TSC calibration' || true)
"#;
    let output = run_in_guest(dir.path(), script);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", common::text(&output));
    for line in [
        "modules=0",
        "vmgenid=1",
        "driver=virtio_console",
        "driver=virtio_blk",
        "driver=virtio_net",
        "driver=9pnet_virtio",
        "driver=vmw_vsock_virtio_transport",
        "fs=overlay",
        "fs=erofs",
        "fs=9p",
        "fs=ext4",
        "fs=tmpfs",
        "fs=devpts",
        "memory-hotplug=yes",
        "cpus=yes",
        "possible=0-3",
    ] {
        assert!(has_line(&text, line), "no {line:?} in\n{text}");
    }
    // Under TCG the CPU has no ERMS/FSRM, so the guest's copies are not byte-at-a-time
    // `rep movsb` (cmdline::TCG_CPU). Under KVM the guest has the host's CPU.
    // A booting TCG guest is told the TSC's rate (cmdline's `tsc_early_khz`), so its
    // kernel runs neither the 70 ms PIT/HPET calibration nor (our patch 0003) the quick
    // PIT one, both with interrupts off.
    if !has_line(&text, "tcg=0") {
        for line in [
            "rep-string-flags=0",
            "tsc-early-khz=1",
            "tsc-late-calibration=0",
            "tsc-quick-calibration=0",
        ] {
            assert!(has_line(&text, line), "no {line:?} in\n{text}");
        }
    }
}

#[test]
fn debians_cloud_kernel_is_still_available() {
    let dir = runtime();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[guest]\nkernel = \"debian\"\n").expect("write config");
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["run", "--", "sh", "-c", "uname -r; ls /lib/modules"])
        .env("VMFACTORY_RUNTIME_DIR", dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("spawn vmfactory");
    assert!(output.status.success(), "{}", common::text(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("-cloud-amd64"), "{text}");
    assert!(text.contains("load-order"), "{text}");
    assert!(common::qemu_pids_under(dir.path()).is_empty());
}
