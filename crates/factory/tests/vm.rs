//! Integration tests of `Vm` against real QEMU (TCG here) and the real guest image.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, image, runtime_dir, sh};
use vmfactory_factory::{ExecRequest, Vm, VmConfig, VmError};

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn details_clock_rng_and_bad_requests() {
    let runtime = runtime_dir();
    let config = config(runtime.path());
    let vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");

    let details = vm.details().await.expect("details");
    assert_eq!(details.kernel_release, image().kernel_release);
    assert_eq!(details.online_cpus, 1);
    assert!(
        (100 << 10..=256 << 10).contains(&details.mem_total_kib),
        "MemTotal {} KiB",
        details.mem_total_kib
    );
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));

    // Put the guest clock 20 years back, then sync it with the host.
    sh(&vm, "date -s @1000000000 >/dev/null").await;
    let before: u64 = sh(&vm, "date +%s").await.parse().expect("seconds");
    assert!(before < 1_100_000_000, "date -s did not take: {before}");
    vm.sync_time().await.expect("sync time");
    let guest: i64 = sh(&vm, "date +%s").await.parse().expect("seconds");
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((guest - host).abs() <= 2, "guest {guest} vs host {host}");

    vm.reseed_rng().await.expect("reseed");

    // Bad input gets an error, and the agent keeps serving.
    let err = vm
        .exec(ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..ExecRequest::default()
        })
        .await
        .expect_err("missing program");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    let err = vm
        .exec(ExecRequest::default())
        .await
        .expect_err("empty argv");
    assert!(err.to_string().contains("argv is empty"), "{err}");
    assert_eq!(sh(&vm, "echo still-here").await, "still-here");

    let pid = vm.pid().expect("pid");
    let dir = vm.hypervisor().vm_dir().to_path_buf();
    vm.stop().await.expect("stop");
    assert!(!dir.exists(), "VM directory {} remains", dir.display());
    assert!(!pid_alive(pid), "QEMU {pid} still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_does_not_run_until_resumed() {
    let runtime = runtime_dir();
    let config = config(runtime.path());
    let vm = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect("boot");
    vm.pause().await.expect("pause");
    {
        let echo = vm.exec(ExecRequest {
            argv: vec!["echo".into(), "resumed".into()],
            ..ExecRequest::default()
        });
        tokio::pin!(echo);
        let early = tokio::time::timeout(Duration::from_secs(2), &mut echo).await;
        assert!(early.is_err(), "a paused guest answered: {early:?}");
        vm.resume().await.expect("resume");
        let output = echo.await.expect("exec after resume");
        assert_eq!(output.stdout, b"resumed\n");
    }
    vm.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dying_at_start_reports_its_stderr() {
    let runtime = runtime_dir();
    let junk = runtime.path().join("not-a-kernel");
    std::fs::write(&junk, vec![0x5a; 4096]).expect("write junk kernel");
    let config = VmConfig {
        kernel: junk,
        ..config(runtime.path())
    };
    let err = Vm::boot(config.backend().as_ref(), &config)
        .await
        .expect_err("junk kernel must fail");
    let message = err.to_string();
    assert!(matches!(err, VmError::Hypervisor(_)), "{message}");
    assert!(message.contains("QEMU exited"), "{message}");
    assert!(message.contains("last lines of QEMU stderr"), "{message}");
    let leftovers: Vec<_> = std::fs::read_dir(runtime.path().join("vm"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
