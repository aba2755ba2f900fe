//! Integration tests of the template factory with real QEMU clones.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, runtime_dir, sh};
use vmfactory_factory::template::{self, METADATA_FILE, STATE_FILE};
use vmfactory_factory::{Factory, TemplateError, TemplateFactory, Vm, VmRequest};
use vmfactory_guest_image::KernelSource;

/// Destroys the template when dropped, so a failing test leaves no mount behind.
struct TemplateGuard(std::path::PathBuf);

impl Drop for TemplateGuard {
    fn drop(&mut self) {
        let _ = template::destroy(&self.0);
    }
}

fn mounted(path: &Path) -> bool {
    template::is_mountpoint(path)
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

async fn stop_all(vms: Vec<Vm>) {
    for vm in vms {
        vm.stop().await.expect("stop clone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_the_template_but_not_files_randomness_or_stale_time() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let config = config(runtime.path());

    let created = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create");
    assert!(path.join(STATE_FILE).is_file());
    // Saved once the kernel had refined its TSC (TCG: `tsc-early` becomes `tsc` a second
    // after boot), so no clone switches clocksource on its hand-out path.
    let saved_clock = template::read_metadata(&path)
        .expect("metadata")
        .clocksource
        .expect("the template records its clocksource");
    assert!(
        !saved_clock.is_empty() && saved_clock != "tsc-early",
        "template saved on clocksource {saved_clock:?}"
    );
    let err = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect_err("second create over an existing template");
    assert!(matches!(err, TemplateError::Exists(_)), "{err}");
    assert!(
        err.to_string().contains("vmfactory factory destroy"),
        "{err}"
    );
    drop(created);

    // Let the template's clock go stale before cloning.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A second factory instance opens the same template.
    let fetched = TemplateFactory::fetch(&config, &path, config.backend())
        .await
        .expect("fetch");
    let factory = Factory::new(Arc::new(fetched));
    let mut clones = Vec::new();
    for _ in 0..5 {
        clones.push(factory.get_vm(&VmRequest::default()).await.expect("clone"));
    }

    let clock = clones[0].details().await.expect("details").clocksource;
    assert_eq!(clock, saved_clock, "a clone's clocksource");
    let first_guest_time: i64 = sh(&clones[0], "date +%s").await.parse().expect("time");
    let host = host_now();
    assert!(
        (first_guest_time - host).abs() <= 1,
        "clone clock {first_guest_time} vs host {host}"
    );

    let mut random = HashSet::new();
    for clone in &clones {
        assert_eq!(sh(clone, "echo alive").await, "alive");
        // The hand-out (one HandOut RPC) named each clone after its VM.
        assert_eq!(sh(clone, "hostname").await, format!("vm-{}", clone.id()));
        let bytes = sh(
            clone,
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        )
        .await;
        assert_eq!(bytes.len(), 64, "{bytes}");
        random.insert(bytes);
    }
    assert_eq!(
        random.len(),
        clones.len(),
        "clones produced the same random bytes"
    );

    sh(&clones[0], "echo secret > /root/only-in-clone-0").await;
    assert_eq!(sh(&clones[0], "cat /root/only-in-clone-0").await, "secret");
    for clone in &clones[1..] {
        assert_eq!(
            sh(
                clone,
                "test -e /root/only-in-clone-0 && echo seen || echo absent"
            )
            .await,
            "absent"
        );
    }
    // A clone made after the write starts from the untouched template.
    let late = factory
        .get_vm(&VmRequest::default())
        .await
        .expect("late clone");
    assert_eq!(
        sh(
            &late,
            "test -e /root/only-in-clone-0 && echo seen || echo absent"
        )
        .await,
        "absent"
    );
    clones.push(late);
    stop_all(clones).await;

    let err = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect_err("exists");
    assert!(matches!(err, TemplateError::Exists(_)));
    assert!(template::destroy(&path).expect("destroy"));
    assert!(!path.exists(), "template directory remains");
    assert!(!mounted(&path), "template tmpfs still mounted");
}

/// One `HandOut` round trip sets the clock, the hostname and reseeds the RNG of a clone
/// that has had nothing else (its clock and hostname are the template's until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hand_out_rpc_sets_clock_hostname_and_entropy() {
    use vmfactory_factory::FactoryBase;

    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let config = config(runtime.path());
    let factory = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create");
    let mut clones = Vec::new();
    for _ in 0..2 {
        let vm = factory.get_base_vm().await.expect("clone");
        vm.resume().await.expect("resume");
        vm.agent().check().await.expect("check");
        clones.push(vm);
    }
    let before = sh(&clones[0], "hostname").await;
    // A clock an hour ahead of the host's cannot come from anywhere but the hand-out.
    let ahead = SystemTime::now() + Duration::from_secs(3600);
    for (n, clone) in clones.iter().enumerate() {
        let guest = clone
            .agent()
            .hand_out(vec![n as u8 + 1; 512], ahead, format!("handed-{n}"))
            .await
            .expect("hand out");
        assert!(guest < Duration::from_secs(5), "guest took {guest:?}");
    }
    for (n, clone) in clones.iter().enumerate() {
        assert_eq!(
            sh(clone, "hostname").await,
            format!("handed-{n}"),
            "was {before}"
        );
        let guest: i64 = sh(clone, "date +%s").await.parse().expect("time");
        let expected = host_now() + 3600;
        assert!(
            (guest - expected).abs() <= 2,
            "guest clock {guest}, expected about {expected}"
        );
    }
    let bytes: HashSet<String> = random_bytes(&clones).await;
    assert_eq!(
        bytes.len(),
        2,
        "clones gave the same random bytes after hand-out"
    );

    // A bad request is refused and changes nothing.
    let err = clones[0]
        .agent()
        .hand_out(vec![1; 16], SystemTime::now(), "bad name!".into())
        .await
        .expect_err("bad hostname");
    assert!(err.to_string().contains("hostname"), "{err}");
    assert_eq!(sh(&clones[0], "hostname").await, "handed-0");
    stop_all(clones).await;
    drop(factory);
    assert!(template::destroy(&path).expect("destroy"));
}

async fn random_bytes(clones: &[Vm]) -> HashSet<String> {
    let mut set = HashSet::new();
    for clone in clones {
        set.insert(
            sh(
                clone,
                "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            )
            .await,
        );
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_a_corrupt_state_or_a_changed_kernel() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let config = config(runtime.path());
    TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create");

    // A different kernel file (same size, one byte changed).
    let other_kernel = runtime.path().join("other-kernel");
    let mut bytes = std::fs::read(&config.kernel).expect("read kernel");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&other_kernel, bytes).expect("write kernel");
    let changed = vmfactory_factory::VmConfig {
        kernel: other_kernel,
        ..config.clone()
    };
    let err = TemplateFactory::fetch(&changed, &path, changed.backend())
        .await
        .expect_err("changed kernel");
    assert!(matches!(err, TemplateError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("kernel digest was"), "{err}");

    let bigger = vmfactory_factory::VmConfig {
        memory_mib: config.memory_mib * 2,
        ..config.clone()
    };
    let err = TemplateFactory::fetch(&bigger, &path, bigger.backend())
        .await
        .expect_err("changed memory");
    assert!(
        err.to_string()
            .contains("memory (MiB) was 256 and is now 512"),
        "{err}"
    );

    // Flip a byte in the device state.
    let state = path.join(STATE_FILE);
    let mut bytes = std::fs::read(&state).expect("read state");
    bytes[100] ^= 0x01;
    std::fs::write(&state, bytes).expect("write state");
    let err = TemplateFactory::fetch(&config, &path, config.backend())
        .await
        .expect_err("corrupt state");
    assert!(matches!(err, TemplateError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not match its recorded digest"),
        "{err}"
    );

    std::fs::write(path.join(METADATA_FILE), b"{not json").expect("write metadata");
    let err = TemplateFactory::fetch(&config, &path, config.backend())
        .await
        .expect_err("corrupt metadata");
    assert!(matches!(err, TemplateError::Corrupt { .. }), "{err}");

    assert!(template::destroy(&path).expect("destroy"));
    assert!(!path.exists());
    assert!(!mounted(&path));
    let err = TemplateFactory::fetch(&config, &path, config.backend())
        .await
        .expect_err("missing");
    assert!(err.to_string().contains("vmfactory factory init"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_clones_work_and_a_dead_pool_process_is_never_used() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let config = config(runtime.path());
    let factory = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create")
        .with_warm_pool(2);
    // Wait until the pool is full (its clones warmed up), then kill one pooled QEMU
    // behind its back.
    let vm_dir = runtime.path().join("vm");
    let mut waited = 0;
    while factory.warm_pool_ready().await < 2 {
        assert!(waited < 600, "warm pool never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let victim = common::qemu_pids_under(&vm_dir)[0];
    // SAFETY: killing a QEMU process this test started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let factory = Factory::new(Arc::new(factory));
    let mut clones = Vec::new();
    for _ in 0..3 {
        let vm = factory
            .get_vm(&VmRequest::default())
            .await
            .expect("clone from the pool");
        assert_ne!(vm.pid(), Some(victim), "a dead pool process was handed out");
        clones.push(vm);
    }
    for vm in &clones {
        assert!(
            qemu_cmdline(vm).contains("-incoming"),
            "a clone, not a boot"
        );
    }
    assert_eq!(factory.last_fallback(), None, "no direct boot");
    // The first clone came from the pool warmed up: under TCG its QEMU had translated a
    // hand-out and a first process (`true`) before its own hand-out, far more code than
    // a clone restored on demand has by its hand-out.
    let plain = Factory::new(Arc::new(
        TemplateFactory::fetch(&config, &path, config.backend())
            .await
            .expect("fetch"),
    ));
    let fresh = plain
        .get_vm(&VmRequest::default())
        .await
        .expect("a clone restored on demand");
    if let (Some(warmed), Some(cold)) = (
        translated_blocks(&clones[0]).await,
        translated_blocks(&fresh).await,
    ) {
        assert!(
            warmed > cold + 5_000,
            "the pooled clone translated {warmed} blocks by its hand-out, a fresh one {cold}"
        );
    }
    for vm in clones.iter().chain([&fresh]) {
        assert_eq!(sh(vm, "echo pooled").await, "pooled");
    }
    clones.push(fresh);
    stop_all(clones).await;
    plain.close().await.expect("close");
    factory.close().await.expect("close");
    assert!(
        common::qemu_pids_under(&vm_dir).is_empty(),
        "pool QEMUs left after close"
    );
    assert!(template::destroy(&path).expect("destroy"));
}

/// Blocks `vm`'s QEMU has translated so far (`None` under KVM).
async fn translated_blocks(vm: &Vm) -> Option<u64> {
    vm.hypervisor()
        .translation_stats()
        .await
        .expect("x-query-jit")
        .map(|stats| stats.blocks)
}

/// The command line of `vm`'s QEMU.
fn qemu_cmdline(vm: &Vm) -> String {
    let cmdline =
        std::fs::read(format!("/proc/{}/cmdline", vm.pid().expect("pid"))).expect("cmdline");
    String::from_utf8_lossy(&cmdline).into_owned()
}

/// A template factory on `machine` whose clones can grow to 4 vCPUs and 2048 MiB.
async fn growable_template(runtime: &Path, path: &Path, machine: &str) -> Factory {
    let mut config = config(runtime);
    config.qemu.machine_type = machine.into();
    config.memory_slots = 4;
    config.max_memory_mib = 2048;
    config.max_vcpus = 4;
    Factory::new(Arc::new(
        TemplateFactory::new(&config, path, config.backend())
            .await
            .expect("create"),
    ))
}

/// Asks `factory` for 2 vCPUs and 512 MiB and checks that a clone serves it, grown by
/// hot-plug as seen from inside the guest.
async fn assert_a_clone_grows(factory: &Factory) -> Vm {
    let bigger = VmRequest {
        vcpus: Some(2),
        memory_mib: Some(512),
    };
    let vm = factory.get_vm(&bigger).await.expect("grown clone");
    assert!(
        qemu_cmdline(&vm).contains("-incoming"),
        "a size-only difference must be served by a clone (fallback: {:?})",
        factory.last_fallback()
    );
    let details = vm.details().await.expect("details");
    assert_eq!(details.online_cpus, 2, "{details:?}");
    assert!(
        details.mem_total_kib > 400 << 10,
        "MemTotal {} KiB did not grow",
        details.mem_total_kib
    );
    assert_eq!((vm.cpu, vm.memory_mib, vm.cpu_delta), (2, 512, 1));
    assert_eq!(sh(&vm, "nproc").await, "2");
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_vm_grows_a_clone_or_boots_directly_beyond_its_limits() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let factory = growable_template(runtime.path(), &path, "q35").await;
    let vm = assert_a_clone_grows(&factory).await;
    vm.stop().await.expect("stop");

    // More memory than the template's VMs can grow to: booted directly at that size.
    let beyond = VmRequest {
        vcpus: None,
        memory_mib: Some(2560),
    };
    let vm = factory.get_vm(&beyond).await.expect("direct VM");
    assert!(!qemu_cmdline(&vm).contains("-incoming"));
    let details = vm.details().await.expect("details");
    assert!(
        details.mem_total_kib > 2300 << 10,
        "MemTotal {} KiB of a 2560 MiB VM",
        details.mem_total_kib
    );
    vm.stop().await.expect("stop");
    assert!(template::destroy(&path).expect("destroy"));
}

/// The `pc` machine (i440FX) is the other supported type: its clones load the template's
/// state and grow by CPU and memory hot-plug like q35's (it has no disk hot-plug ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pc_machine_template_clones_and_grows() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let factory = growable_template(runtime.path(), &path, "pc").await;
    let vm = assert_a_clone_grows(&factory).await;
    let cmdline = qemu_cmdline(&vm);
    assert!(cmdline.contains("pc,memory-backend=mem0"), "{cmdline}");
    vm.stop().await.expect("stop");
    assert!(template::destroy(&path).expect("destroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_clone_gets_its_own_vm_generation_id_and_reseeds() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let mut config = config(runtime.path());
    // QEMU's default firmware (SeaBIOS): qboot VMs have no vmgenid device.
    config.qemu.firmware = None;

    let created = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create");
    let template_id = created
        .metadata()
        .vm_generation_id
        .clone()
        .expect("the template recorded its VM generation ID");
    let factory = Factory::new(Arc::new(created));
    let mut clones = Vec::new();
    for _ in 0..2 {
        clones.push(factory.get_vm(&VmRequest::default()).await.expect("clone"));
    }
    let mut ids = HashSet::from([template_id.clone()]);
    let mut random = HashSet::new();
    for clone in &clones {
        let id = clone
            .hypervisor()
            .vm_generation_id()
            .await
            .expect("query-vm-generation-id")
            .expect("a VM generation ID");
        assert_eq!(id.len(), 36, "{id}");
        assert!(
            ids.insert(id.clone()),
            "{id} repeats (template {template_id})"
        );
        // Debian's cloud kernel has no VMGenID driver; ours must reseed.
        if common::image().kernel_source == KernelSource::Vmfactory {
            let dmesg = sh(clone, "dmesg").await;
            assert!(
                dmesg.contains("crng reseeded due to virtual machine fork"),
                "no vmgenid reseed in the clone's kernel log:\n{dmesg}"
            );
            // The driver took QEMU's change event itself (patch 0004, `vmgenid.gpe=5`),
            // not through the ACPI method: it says so only when that fails.
            let gpe = sh(clone, "cat /sys/module/vmgenid/parameters/gpe").await;
            assert_eq!(gpe.trim(), "5", "vmgenid.gpe in the clone");
            assert!(
                !dmesg.contains("Taking GPE"),
                "the vmgenid driver could not take its GPE:\n{dmesg}"
            );
        }
        let bytes = sh(
            clone,
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        )
        .await;
        assert_eq!(bytes.len(), 64, "{bytes}");
        assert!(random.insert(bytes.clone()), "clones read the same {bytes}");
    }
    stop_all(clones).await;
}

/// Timer interrupts an idle guest takes per second: the legacy timer (IRQ 0: HPET or PIT)
/// plus every vCPU's local APIC timer, counted over 2 s of `sleep`.
async fn idle_timer_interrupts_per_second(vm: &Vm) -> f64 {
    let count = r#"awk '/^ *0:|^ *LOC:/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n }' /proc/interrupts"#;
    let script = format!("a=$({count}); sleep 2; b=$({count}); echo $((b - a))");
    let delta: f64 = sh(vm, &script).await.parse().expect("a count");
    delta / 2.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_clone_is_tickless() {
    let runtime = runtime_dir();
    let path = runtime.path().join("template");
    let _guard = TemplateGuard(path.clone());
    let config = config(runtime.path());
    let template = TemplateFactory::new(&config, &path, config.backend())
        .await
        .expect("create");
    let factory = Factory::new(Arc::new(template));
    let vm = factory
        .get_vm(&VmRequest::default())
        .await
        .expect("a handed-out clone");
    // The kernel keeps the local APIC timer as its one-shot clock event (TCG guests get
    // `lapic_timer_hz`), so an idle guest is woken only by what it waits for. A periodic
    // tick (`noapictimer`) was 250 interrupts a second, each costing the host CPU.
    let rate = idle_timer_interrupts_per_second(&vm).await;
    assert!(rate < 100.0, "{rate} timer interrupts a second while idle");
    let cmdline = sh(&vm, "cat /proc/cmdline").await;
    assert!(cmdline.contains("lapic_timer_hz="), "{cmdline}");
    assert!(!cmdline.contains("noapictimer"), "{cmdline}");
    stop_all(vec![vm]).await;
    drop(factory);
    assert!(template::destroy(&path).expect("destroy"));
}
