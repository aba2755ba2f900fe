//! `vmfactory factory init|status|destroy`, and how `run` gets its VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use vmfactory_factory::template::{self, TemplateMetadata};
use vmfactory_factory::vmcache;
use vmfactory_factory::{
    CacheFactory, DirectFactory, Factory, FactoryBase, GrpcCacheFactory, TemplateError,
    TemplateFactory, Vm, VmConfig,
};

use crate::{Resolved, VmArgs};

#[derive(Debug, Subcommand)]
pub enum FactoryCommand {
    /// Create the template (enable_template = true in [factory]): boot a template VM, save
    /// its state and memory on a tmpfs at template_path, and stop it.
    Init {
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Say whether the template exists, what it was built from, and whether it matches
    /// the configuration.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Stop the VMCache server (Quit) and remove the template: unmount its tmpfs and
    /// delete its files.
    Destroy,
}

async fn resolve(vm: VmArgs, config: Option<PathBuf>) -> Result<Resolved> {
    tokio::task::spawn_blocking(move || vm.resolve(config.as_deref()))
        .await
        .context("Loading the configuration failed")?
}

pub async fn run(command: FactoryCommand, config: Option<PathBuf>) -> Result<ExitCode> {
    match command {
        FactoryCommand::Init { vm } => init(resolve(vm, config).await?).await,
        FactoryCommand::Status { json, vm } => status(resolve(vm, config).await?, json).await,
        FactoryCommand::Destroy => {
            // Destroying needs only the paths: no guest image build.
            let settings = vmfactory_factory::Settings::load(config.as_deref())?;
            let factory = settings.factory;
            if factory.vm_cache_number > 0 {
                stop_server(&factory.vm_cache_endpoint).await?;
            }
            let path = factory.template_path;
            if template::destroy(&path)? {
                println!("Template at {} destroyed", path.display());
            } else if factory.enable_template {
                println!("No template at {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the VMCache server to quit and waits until its socket is gone.
async fn stop_server(endpoint: &std::path::Path) -> Result<()> {
    match vmcache::quit(endpoint).await {
        Ok(()) => {
            let started = Instant::now();
            while endpoint.exists() && started.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if endpoint.exists() {
                bail!(
                    "The VMCache server on {} did not stop within 60 s",
                    endpoint.display()
                );
            }
            println!("VMCache server on {} stopped", endpoint.display());
        }
        Err(vmfactory_factory::VmCacheError::NotRunning { .. }) => {
            println!("No VMCache server on {}", endpoint.display());
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

/// Runs the VMCache server in the foreground until SIGTERM/SIGINT or `Quit`.
async fn serve(resolved: Resolved) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    let mut created_template = false;
    let base: Arc<dyn FactoryBase> = if factory.enable_template {
        let path = &factory.template_path;
        let template = match TemplateFactory::fetch(&resolved.base, path).await {
            Ok(template) => template,
            Err(TemplateError::Missing(_)) => {
                eprintln!("vmfactory: creating the template at {}", path.display());
                created_template = true;
                TemplateFactory::new(&resolved.base, path).await?
            }
            Err(err) => return Err(err.into()),
        };
        Arc::new(template.with_warm_pool(factory.template_warm_pool as usize))
    } else {
        Arc::new(DirectFactory::new(resolved.base.clone()))
    };
    // Cached VMs are warmed up: handing one out then takes milliseconds.
    let cache = Arc::new(CacheFactory::with_warm_up(
        base,
        factory.vm_cache_number as usize,
        true,
    ));
    let shutdown = Arc::new(Notify::new());
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals.notify_one();
    });
    eprintln!(
        "vmfactory: VMCache server on {} (pid {}) keeping {} VMs ready; stop it with `vmfactory factory destroy`",
        factory.vm_cache_endpoint.display(),
        std::process::id(),
        factory.vm_cache_number
    );
    let served = vmcache::serve(cache.clone(), &factory.vm_cache_endpoint, shutdown).await;
    eprintln!("vmfactory: VMCache server stopping");
    cache.close().await?;
    if created_template {
        template::destroy(&factory.template_path)?;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

async fn init(resolved: Resolved) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    if factory.vm_cache_number > 0 {
        return serve(resolved).await;
    }
    if !factory.enable_template {
        bail!(
            "Nothing to initialize: set enable_template = true or vm_cache_number > 0 in the [factory] section of the configuration (see `vmfactory config show`)"
        );
    }
    let path = &factory.template_path;
    eprintln!(
        "vmfactory: creating the template at {} (boots one VM; takes a few seconds)",
        path.display()
    );
    let started = Instant::now();
    let template = TemplateFactory::new(&resolved.base, path).await?;
    println!(
        "Template created at {} in {:.1} s",
        template.path().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct StatusReport {
    template_path: PathBuf,
    enabled: bool,
    exists: bool,
    usable: bool,
    problem: Option<String>,
    metadata: Option<TemplateMetadata>,
}

#[derive(Debug, Serialize)]
struct ServerReport {
    endpoint: PathBuf,
    pid: u32,
    vms: Vec<ServerVm>,
}

#[derive(Debug, Serialize)]
struct ServerVm {
    pid: u32,
    cpu: u32,
    memory_mib: u32,
}

async fn status(resolved: Resolved, json: bool) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    if factory.vm_cache_number > 0 {
        let endpoint = &factory.vm_cache_endpoint;
        let (pid, vms) = vmcache::status(endpoint).await?;
        let report = ServerReport {
            endpoint: endpoint.clone(),
            pid,
            vms: vms
                .into_iter()
                .map(|vm| ServerVm {
                    pid: vm.pid,
                    cpu: vm.cpu,
                    memory_mib: vm.memory_mib,
                })
                .collect(),
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("VM cache server pid = {}", report.pid);
            for vm in &report.vms {
                println!(
                    "VM pid = {} Cpu = {} Memory = {}MiB",
                    vm.pid, vm.cpu, vm.memory_mib
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let path = factory.template_path.clone();
    let (metadata, problem) = match TemplateFactory::fetch(&resolved.base, &path).await {
        Ok(template) => (Some(template.metadata().clone()), None),
        Err(TemplateError::Missing(_)) => (None, None),
        // Unusable: still say what it was built from, when that is readable.
        Err(err) => (template::read_metadata(&path).ok(), Some(err.to_string())),
    };
    let report = StatusReport {
        template_path: path.clone(),
        enabled: factory.enable_template,
        exists: metadata.is_some(),
        usable: metadata.is_some() && problem.is_none(),
        problem,
        metadata,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Template: {} ({})",
        path.display(),
        if report.enabled {
            "enable_template = true"
        } else {
            "enable_template = false"
        }
    );
    match &report.metadata {
        None => println!("No template: create one with `vmfactory factory init`"),
        Some(meta) => {
            println!(
                "Built from: kernel {} (sha256 {}), initrd {}, {}",
                meta.kernel.display(),
                meta.kernel_sha256.get(..12).unwrap_or(""),
                meta.initrd
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string()),
                meta.qemu_version
            );
            println!(
                "VM: {} vCPUs (max {}), {} MiB (max {} MiB, {} slots), machine {}",
                meta.vm.vcpus,
                meta.vm.max_vcpus,
                meta.vm.memory_mib,
                meta.vm.max_memory_mib,
                meta.vm.memory_slots,
                meta.vm.machine_type
            );
            match &report.problem {
                None => println!("Status: ready"),
                Some(problem) => println!("Status: unusable: {problem}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The VM for `run`: from the template when templates are enabled (grown by hot-plug when
/// the request asks for more vCPUs or memory), else a direct boot.
pub async fn get_vm(resolved: &Resolved) -> Result<Vm> {
    let settings = &resolved.settings;
    let wanted = VmConfig {
        vcpus: resolved.request.vcpus,
        memory_mib: resolved.request.memory_mib,
        ..resolved.base.clone()
    };
    if settings.factory.vm_cache_number > 0 {
        let client = GrpcCacheFactory::connect(&settings.factory.vm_cache_endpoint).await?;
        return Factory::new(Box::new(client))
            .get_vm_for(&wanted)
            .await
            .context("Cannot get a VM from the VMCache server");
    }
    if settings.factory.enable_template {
        match TemplateFactory::fetch(&resolved.base, &settings.factory.template_path).await {
            Ok(template) => {
                let factory = Factory::new(Box::new(template));
                return factory
                    .get_vm_for(&wanted)
                    .await
                    .context("Cannot get a VM from the template");
            }
            Err(err) => {
                eprintln!("vmfactory: the template is not usable ({err}); booting directly");
            }
        }
    }
    Vm::new(&resolved.request)
        .await
        .context("Cannot boot the VM")
}
