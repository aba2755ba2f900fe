//! `bench sandbox`: sandboxes as a user meets them. Creating one from a warm VMCache
//! server (whole `vmfactory sandbox create` processes), an `exec -- true` round trip on a
//! live sandbox (whole `vmfactory sandbox exec` processes, and the agent round trip
//! through the supervisor alone), and copy throughput into and out of it.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use vmfactory_factory::ExecRequest;
use vmfactory_hypervisor::qemu::new_vm_id;
use vmfactory_sandbox::{dir, SandboxClient};

use super::run::{vmfactory, wait_cached, write_config, Scratch};
use super::{round, Stats};
use crate::Resolved;

#[derive(Debug, Serialize)]
struct SandboxReport {
    what: &'static str,
    /// `vmfactory sandbox create` from a warm VMCache server, spawn to exit.
    create: Stats,
    /// `vmfactory sandbox exec ID -- true`, spawn to exit.
    exec_process: Stats,
    /// One `true` through the supervisor's agent API (start, output, wait), in-process.
    exec_round_trip: Stats,
    /// Bytes copied each way, MiB.
    copy_mib: u64,
    /// Copy into the sandbox, MiB/s.
    copy_in_mib_per_s: f64,
    /// Copy out of the sandbox, MiB/s.
    copy_out_mib_per_s: f64,
}

fn timed(mut command: std::process::Command) -> Result<(Duration, String)> {
    let started = Instant::now();
    let output = command
        .stderr(Stdio::piped())
        .output()
        .context("Cannot start vmfactory")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!(
            "vmfactory failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((
        elapsed,
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
    ))
}

/// Runs `bench sandbox`.
pub async fn bench_sandbox(
    n: usize,
    copy_mib: u64,
    cache_size: u32,
    json: bool,
    resolved: Resolved,
) -> Result<ExitCode> {
    // The copy lands in the guest's /tmp, a tmpfs of half its memory that the guest uses
    // too: refused now rather than after the sandboxes are made.
    let memory_mib = resolved.base.memory_mib;
    if copy_mib > u64::from(memory_mib / 4) {
        crate::usage!(
            "--copy-mib {copy_mib} does not fit the guest's /tmp (a tmpfs of half its \
             {memory_mib} MiB of memory): give at most {}, or more --memory",
            memory_mib / 4
        );
    }
    let mut settings = resolved.settings.clone();
    settings.hypervisor.qemu.kernel = resolved.base.kernel.clone();
    settings.hypervisor.qemu.initrd = resolved.base.initrd.clone().unwrap_or_default();
    let scratch_dir = resolved
        .base
        .qemu
        .runtime_dir
        .join(format!("bench-sandbox-{}", new_vm_id()));
    std::fs::create_dir_all(&scratch_dir)
        .with_context(|| format!("Cannot create {}", scratch_dir.display()))?;
    let cache_toml = scratch_dir.join("cache.toml");
    write_config(&cache_toml, &settings, &scratch_dir, |f| {
        f.enable_template = true;
        f.template_path = scratch_dir.join("template");
        f.vm_cache_number = cache_size;
        f.vm_cache_endpoint = scratch_dir.join("cache.sock");
    })?;
    let runtime = scratch_dir.join("run");
    let scratch = Scratch {
        dir: scratch_dir.clone(),
        configs: vec![cache_toml.clone()],
        sandboxes: Some(runtime.clone()),
    };
    let mut server = vmfactory(&cache_toml, &["factory", "init"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start the VMCache server")?;
    let measured = measure(n, copy_mib, cache_size, &cache_toml, &runtime, json).await;
    for (_, record) in dir::list(&runtime) {
        let _ = vmfactory(&cache_toml, &["sandbox", "rm", "-f", &record.id])
            .stdout(Stdio::null())
            .status();
    }
    let _ = vmfactory(&cache_toml, &["factory", "destroy"])
        .stdout(Stdio::null())
        .status();
    let _ = server.wait();
    // Also what does all of the above when a signal drops this benchmark half-way.
    drop(scratch);
    let report = measured?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "create: median {:.1} ms, p99 {:.1} ms\nexec -- true (process): median {:.1} ms\nexec round trip (agent via supervisor): median {:.1} ms, p99 {:.1} ms\ncopy {} MiB: in {:.1} MiB/s, out {:.1} MiB/s",
            report.create.median_ms,
            report.create.p99_ms,
            report.exec_process.median_ms,
            report.exec_round_trip.median_ms,
            report.exec_round_trip.p99_ms,
            report.copy_mib,
            report.copy_in_mib_per_s,
            report.copy_out_mib_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    n: usize,
    copy_mib: u64,
    cache_size: u32,
    config: &Path,
    runtime: &Path,
    json: bool,
) -> Result<SandboxReport> {
    let wait = |config: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || wait_cached(&config, cache_size as usize))
    };
    let (mut creates, mut ids) = (Vec::new(), Vec::new());
    for round in 0..n {
        wait(config.to_path_buf()).await??;
        let command = vmfactory(config, &["sandbox", "create"]);
        let (elapsed, id) = tokio::task::spawn_blocking(move || timed(command)).await??;
        creates.push(elapsed);
        ids.push(id);
        if !json {
            eprintln!(
                "create {}/{n}: {:.0} ms",
                round + 1,
                elapsed.as_secs_f64() * 1e3
            );
        }
    }
    let id = ids.first().context("No sandbox")?.clone();
    let mut processes = Vec::new();
    for _ in 0..n {
        let command = vmfactory(config, &["sandbox", "exec", &id, "--", "true"]);
        let (elapsed, _) = tokio::task::spawn_blocking(move || timed(command)).await??;
        processes.push(elapsed);
    }
    let (sandbox, record) = dir::find(runtime, &id)?;
    let client = SandboxClient::connect(&sandbox, &record.id).await?;
    let agent = client.agent();
    let mut round_trips = Vec::new();
    for _ in 0..n.max(10) {
        let started = Instant::now();
        let output = agent
            .exec(ExecRequest {
                argv: vec!["true".into()],
                ..ExecRequest::default()
            })
            .await?;
        round_trips.push(started.elapsed());
        if output.exit_code != Some(0) {
            bail!("`true` failed in the sandbox: {output:?}");
        }
    }

    let local = tempfile::tempdir().context("Cannot create a temporary directory")?;
    let source = local.path().join("payload");
    let mut data = vec![0u8; (copy_mib << 20) as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    std::fs::write(&source, &data).context("Cannot write the payload")?;
    let digest = Sha256::digest(&data);
    drop(data);
    let started = Instant::now();
    agent.copy_in(&source, "/tmp/payload").await?;
    let copy_in = started.elapsed();
    let back = local.path().join("back");
    let started = Instant::now();
    agent.copy_out("/tmp/payload", &back).await?;
    let copy_out = started.elapsed();
    if Sha256::digest(std::fs::read(&back).context("Cannot read the copy")?) != digest {
        bail!("The copy out differs from the copy in");
    }
    let rate = |d: Duration| round(copy_mib as f64 / d.as_secs_f64().max(1e-6));
    let (Some(create), Some(exec_process), Some(exec_round_trip)) = (
        Stats::from_samples(&creates),
        Stats::from_samples(&processes),
        Stats::from_samples(&round_trips),
    ) else {
        bail!("No samples");
    };
    Ok(SandboxReport {
        what: "sandbox",
        create,
        exec_process,
        exec_round_trip,
        copy_mib,
        copy_in_mib_per_s: rate(copy_in),
        copy_out_mib_per_s: rate(copy_out),
    })
}
