//! Talking to a sandbox's supervisor: its control API, and the agent API it forwards.

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use tokio::net::UnixStream;
use vmfactory_factory::AgentClient;
use vmfactory_protocols::mux::{self, Channel, Connector};
use vmfactory_protocols::sandbox::sandbox_service_client::SandboxServiceClient;
use vmfactory_protocols::sandbox::SandboxStatus;

use crate::dir::SandboxDir;
use crate::SandboxError;

/// How long connecting to a supervisor may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one sandbox's supervisor.
#[derive(Debug, Clone)]
pub struct SandboxClient {
    id: String,
    control: SandboxServiceClient<Channel>,
    agent: AgentClient,
}

impl SandboxClient {
    /// Connects to the supervisor of sandbox `id` in `dir`.
    pub async fn connect(dir: &SandboxDir, id: &str) -> Result<Self, SandboxError> {
        let socket = dir.socket();
        let unreachable = |reason: String| SandboxError::Unreachable {
            id: id.to_string(),
            reason,
        };
        let path = socket.clone();
        let connector: Connector = Arc::new(move || {
            let path = path.clone();
            Box::pin(
                async move { Ok(Box::new(UnixStream::connect(path).await?) as Box<dyn mux::Io>) },
            )
        });
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, Channel::connect(connector))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|err| unreachable(err.to_string()))?;
        let agent = AgentClient::connect(Path::new(&socket))
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let client = Self {
            id: id.to_string(),
            control: SandboxServiceClient::new(channel),
            agent,
        };
        // The kernel accepts a connection on the socket's backlog even when the supervisor
        // is stopped or stuck: a status call tells, in bounded time, whether it answers
        // (before, `exec`, `rm` and `rm -f` waited on it for ever).
        match tokio::time::timeout(CONNECT_TIMEOUT, client.status()).await {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(unreachable(format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent API of the sandbox VM (through the supervisor).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn rpc_error(&self, status: tonic::Status) -> SandboxError {
        SandboxError::Rpc {
            id: self.id.clone(),
            message: status.message().to_string(),
        }
    }

    /// The supervisor's view of the sandbox.
    pub async fn status(&self) -> Result<SandboxStatus, SandboxError> {
        self.control
            .clone()
            .status(())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.rpc_error(status))
    }

    /// Pauses the sandbox VM.
    pub async fn pause(&self) -> Result<(), SandboxError> {
        self.control
            .clone()
            .pause(())
            .await
            .map(drop)
            .map_err(|status| self.rpc_error(status))
    }

    /// Resumes the sandbox VM.
    pub async fn resume(&self) -> Result<(), SandboxError> {
        self.control
            .clone()
            .resume(())
            .await
            .map(drop)
            .map_err(|status| self.rpc_error(status))
    }

    /// Asks the supervisor to stop the VM and remove the sandbox.
    pub async fn stop(&self) -> Result<(), SandboxError> {
        self.control
            .clone()
            .stop(())
            .await
            .map(drop)
            .map_err(|status| self.rpc_error(status))
    }
}
