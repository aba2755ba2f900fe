//! VMs and the factories that make them. [`Vm`] is a running micro-VM with a connected
//! guest agent; [`VmConfig`] describes what to boot; [`agent_client::AgentClient`] speaks
//! the agent API over the VM's virtio-serial socket.

pub mod agent_client;
pub mod base;
pub mod cache;
pub mod config;
pub mod settings;
pub mod template;
pub mod vm;
pub mod vmcache;

pub use agent_client::{AgentClient, AgentError, ExecOutput, ExecRequest, GuestDetails};
pub use base::{DirectFactory, Factory, FactoryBase, FactoryError, VmStatus};
pub use cache::CacheFactory;
pub use config::VmConfig;
pub use settings::{Settings, SettingsError};
pub use template::{TemplateError, TemplateFactory, TemplateMetadata};
pub use vm::{HandOff, Vm, VmError};
pub use vmcache::{GrpcCacheFactory, VmCacheError};
