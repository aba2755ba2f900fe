//! VMs and the factories that make them, as Kata's VM factory, on any
//! [`vmfactory_hypervisor::Backend`]:
//! - [`VmConfig`] describes what to boot, [`VmRequest`] what a caller asks for;
//! - [`Vm`] is a running micro-VM plus its guest agent connection ([`AgentClient`]:
//!   processes in [`agent_process`], file copies in [`agent_files`]);
//!   [`agent_port`] knows when the agent lets go of a host and waits for the next;
//! - [`FactoryBase`] makes base VMs: [`DirectFactory`], [`TemplateFactory`] (clones of a
//!   saved VM), [`CacheFactory`] (a [`pool::ReadyPool`] of ready VMs) and
//!   [`GrpcCacheFactory`] (VMs taken over from a [`vmcache`] server by a
//!   [`HandOverRecord`]);
//! - [`Factory::get_vm`] turns a base VM into the VM asked for, and [`Factory::open`] /
//!   [`CacheServerFactory`] ([`select`]) choose the factory from [`Settings`].

pub mod agent_client;
pub mod agent_container;
pub mod agent_files;
pub mod agent_port;
pub mod agent_process;
pub mod base;
pub mod cache;
pub mod config;
pub mod handover;
pub mod lock;
pub mod metrics;
pub mod pool;
pub mod select;
pub mod settings;
pub mod socket;
pub mod template;
pub mod vm;
pub mod vmcache;

#[cfg(test)]
mod mock_agent;

pub use agent_client::{AgentClient, AgentError, GuestDetails};
pub use agent_container::{ContainerError, ContainerSpec, ImageFs, RunningContainer};
pub use agent_files::{CopyFailure, CopyStats};
pub use agent_process::{
    ExecOutput, ExecRequest, OutputPipe, OutputStream, ProcessEvent, ProcessExit, ProcessInfo,
    ProcessSpec, RunningProcess, TtySize,
};
pub use base::{DirectFactory, Factory, FactoryBase, FactoryError, VmStatus};
pub use cache::CacheFactory;
pub use config::{VmConfig, VmRequest};
pub use handover::{HandOverError, HandOverRecord};
pub use select::{CacheServerFactory, FactoryChoice};
pub use settings::{Settings, SettingsError};
pub use template::{TemplateError, TemplateFactory, TemplateMetadata};
pub use vm::{ReadyTimes, Vm, VmError};
pub use vmcache::{GrpcCacheFactory, VmCacheError};
