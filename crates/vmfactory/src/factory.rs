//! `vmfactory factory init|status|destroy`, and how `run` gets its VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Serialize;
use vmfactory_factory::template::{self, TemplateMetadata};
use vmfactory_factory::{Factory, TemplateError, TemplateFactory, Vm, VmConfig};

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
    /// Remove the template: unmount its tmpfs and delete its files.
    Destroy {
        #[command(flatten)]
        vm: VmArgs,
    },
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
        FactoryCommand::Destroy { vm } => {
            // Destroying needs only the path: no guest image build, no validation of the rest.
            let settings = vmfactory_factory::Settings::load(config.as_deref())?;
            let _ = vm;
            let path = settings.factory.template_path;
            if template::destroy(&path)? {
                println!("Template at {} destroyed", path.display());
            } else {
                println!("No template at {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn init(resolved: Resolved) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    if factory.vm_cache_number > 0 {
        bail!("vm_cache_number > 0 asks for the VMCache server, which this version does not have yet: set vm_cache_number = 0");
    }
    if !factory.enable_template {
        bail!(
            "Nothing to initialize: set enable_template = true in the [factory] section of the configuration (see `vmfactory config show`)"
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

async fn status(resolved: Resolved, json: bool) -> Result<ExitCode> {
    let factory = &resolved.settings.factory;
    let path = factory.template_path.clone();
    let metadata = template::read_metadata(&path).ok();
    let problem = match TemplateFactory::fetch(&resolved.base, &path).await {
        Ok(_) => None,
        Err(TemplateError::Missing(_)) => None,
        Err(err) => Some(err.to_string()),
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
    if settings.factory.enable_template {
        match TemplateFactory::fetch(&resolved.base, &settings.factory.template_path).await {
            Ok(template) => {
                let wanted = VmConfig {
                    vcpus: resolved.request.vcpus,
                    memory_mib: resolved.request.memory_mib,
                    ..resolved.base.clone()
                };
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
