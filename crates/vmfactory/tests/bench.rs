//! The benchmarks run on real VMs and report what they claim to: every series has its
//! samples, the hand-out phases are consistent, and nothing is left behind. No speed is
//! asserted (speed is measured by `bench`, never by tests).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_clean_within, send_signal, text, wait_for_qemu_where, with_image, BIN};
use serde_json::Value;

fn bench(dir: &std::path::Path, args: &[&str]) -> Value {
    let runtime = dir.join("run");
    let mut command = Command::new(BIN);
    with_image(&mut command, &runtime);
    let output = command
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run vmfactory bench");
    assert!(output.status.success(), "bench {args:?}: {}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("bench {args:?} printed no JSON ({err}): {}", text(&output)));
    assert_clean_within(dir, &runtime, Duration::from_secs(10));
    report
}

fn ms(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing from {report:#}"))
}

/// `taken ≤ answered`, the guest's handler inside the answer, all positive.
fn assert_phases(report: &Value, phases: &str) {
    let taken = ms(report, &format!("{phases}/taken_ms"));
    let resumed = ms(report, &format!("{phases}/resumed_ms"));
    let answered = ms(report, &format!("{phases}/answered_ms"));
    let guest = ms(report, &format!("{phases}/guest_handler_ms"));
    assert!(
        taken > 0.0 && resumed >= taken && answered >= taken,
        "{phases}: {report:#}"
    );
    assert!(guest > 0.0 && guest < answered, "{phases}: {report:#}");
}

fn blocks(report: &Value, pointer: &str) -> u64 {
    report
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing from {report:#}"))
}

#[test]
fn the_boot_benchmark_reports_times_and_translation_per_kernel() {
    let dir = tempfile::Builder::new()
        .prefix("vmf-bench-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let boot = bench(dir.path(), &["boot", "-n", "1"]);
    assert_eq!(boot["what"], "boot");
    assert_eq!(boot["accelerator"], "tcg", "{boot:#}");
    let results = boot["results"].as_array().expect("results");
    assert!(!results.is_empty(), "{boot:#}");
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["n"], 1, "{boot:#}");
        assert!(ms(result, "/median_ms") > 0.0, "{boot:#}");
        // Firmware, kernel start-up and the agent: tens of thousands of blocks under TCG.
        let blocks = blocks(&boot, &format!("/results/{index}/translated_blocks"));
        assert!(blocks > 10_000, "{boot:#}");
        // QEMU's CPU by the answer is reported: some, and no more than the host's CPUs
        // had in the time the boot took (a check of the field, not of a speed).
        let cpu = ms(result, "/qemu_cpu_ms");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!(
            cpu > 0.0 && cpu <= ms(result, "/median_ms") * cores,
            "{boot:#}"
        );
    }
}

#[test]
fn getvm_and_clone_benchmarks_report_every_series_and_leave_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("vmf-bench-")
        .tempdir_in("/tmp")
        .expect("tempdir");

    let getvm = bench(
        dir.path(),
        &["getvm", "-n", "2", "--cache", "1", "--pool", "1"],
    );
    assert_eq!(getvm["what"], "getvm");
    assert_eq!(getvm["ready"]["n"], 2, "{getvm:#}");
    assert_phases(&getvm, "/phases");
    assert!(
        getvm.pointer("/phases/translated_blocks").is_none(),
        "a cached VM was warmed up before the hand-out: its count would not be the hand-out's"
    );
    assert_eq!(
        ms(&getvm, "/ready/median_ms"),
        ms(&getvm, "/phases/answered_ms"),
        "the ready time is the hand-out's answer"
    );

    let clone = bench(
        dir.path(),
        &["clone", "-n", "1", "--direct", "1", "--pool", "1"],
    );
    assert_eq!(clone["what"], "clone");
    for series in ["clone", "clone_warm_pool", "kata_method", "direct"] {
        assert_eq!(clone[series]["n"], 1, "{series}: {clone:#}");
    }
    assert_phases(&clone, "/clone_phases");
    assert_phases(&clone, "/clone_warm_pool_phases");
    // Tests run under TCG: a clone's hand-out translates thousands of guest blocks. A
    // warm-pool clone was warmed up before it waited, so its count is not reported.
    let blocks = blocks(&clone, "/clone_phases/translated_blocks");
    assert!(blocks > 1_000, "{clone:#}");
    // The clone's QEMU CPU, from its start to the answer: some, and no more than the
    // host's CPUs had in that time; not reported for a warmed-up clone.
    let cpu = ms(&clone, "/clone_phases/qemu_cpu_ms");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!(
        cpu > 0.0 && cpu <= ms(&clone, "/clone_phases/answered_ms") * cores,
        "{clone:#}"
    );
    assert!(
        clone
            .pointer("/clone_warm_pool_phases/qemu_cpu_ms")
            .is_none(),
        "{clone:#}"
    );
    assert!(
        clone
            .pointer("/clone_warm_pool_phases/translated_blocks")
            .is_none(),
        "{clone:#}"
    );
    let ratio = ms(&clone, "/kata_over_clone");
    let expected = ms(&clone, "/kata_method/median_ms") / ms(&clone, "/clone/median_ms");
    assert!(
        (ratio - expected).abs() < 0.01 + expected * 0.01,
        "{clone:#}"
    );
}

/// Starts `vmfactory bench ARGS --json`, waits until a clone whose command line names
/// `clone_of` runs (then `settle` more), sends SIGTERM, and checks that the benchmark
/// ends with 128 + SIGTERM and leaves nothing: no QEMU, VM directory, socket or mount
/// under the test's directory, and none of its `bench-*` scratch directories or
/// templates in the runtime directory.
fn interrupt_bench(args: &[&str], clone_of: &str, settle: Duration) {
    let dir = tempfile::Builder::new()
        .prefix("vmf-bench-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let runtime = dir.path().join("run");
    let mut command = Command::new(BIN);
    with_image(&mut command, &runtime);
    let child = command
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vmfactory bench");

    wait_for_qemu_where(dir.path(), Duration::from_secs(180), |cmdline| {
        cmdline.contains(clone_of) && cmdline.contains("-incoming")
    });
    std::thread::sleep(settle);
    send_signal(child.id(), libc::SIGTERM);
    let output = child.wait_with_output().expect("wait for bench");
    assert_eq!(
        output.status.code(),
        Some(128 + libc::SIGTERM),
        "bench {args:?}: {}",
        text(&output)
    );
    assert_clean_within(dir.path(), &runtime, Duration::from_secs(10));
    let scratch: Vec<_> = std::fs::read_dir(&runtime)
        .expect("runtime dir")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("bench-"))
        })
        .collect();
    assert!(scratch.is_empty(), "bench {args:?} left: {scratch:?}");
}

#[test]
fn an_interrupted_benchmark_removes_its_template_and_vms() {
    // Interrupted while it clones its template.
    interrupt_bench(
        &["clone", "-n", "50", "--direct", "1"],
        "bench-template-",
        Duration::ZERO,
    );
}

#[test]
fn an_interrupted_run_benchmark_stops_its_server_and_removes_its_factories() {
    // Interrupted once it runs VMs from its VMCache server and template.
    interrupt_bench(
        &["run", "-n", "50", "--direct", "1", "--cache", "1"],
        "cache-template",
        Duration::from_secs(2),
    );
}

#[test]
fn counts_out_of_range_are_usage_errors_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["boot", "-n", "0"][..],
        &["getvm", "--clients", "0"],
        &["density", "--count", "65"],
        &["sandbox", "--copy-mib", "100"],
    ] {
        let output = Command::new(BIN)
            .arg("bench")
            .args(args)
            .env("VMFACTORY_RUNTIME_DIR", dir.path())
            .output()
            .expect("spawn vmfactory");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
        assert!(
            text(&output).contains(args[args.len() - 2]),
            "{args:?}: {}",
            text(&output)
        );
    }
    // Nothing was started: no VM directory.
    assert!(!dir.path().join("vm").exists());
}
