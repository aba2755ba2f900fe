//! Containers in a VM (Kata's `CreateContainer`, `StartContainer`, `RemoveContainer`,
//! and `ExecProcess` with a container id) and, on [`Vm`], disk hot-plug plus the two
//! conveniences that tie them together: [`Vm::run_container`] (attach the image, create,
//! start) and [`Vm::remove_container`] (remove, detach).
//!
//! A container's init process has the container id as exec id: stream its output, feed
//! it, signal it and wait for it with the process calls of [`AgentClient`].

use std::path::{Path, PathBuf};

use tracing::{debug, warn};
use vmfactory_hypervisor::{AttachedDisk, DiskSpec};
use vmfactory_protocols::agent::{
    ContainerStorage, CreateContainerRequest, ExecProcessRequest, RemoveContainerRequest,
    StartContainerRequest,
};

use crate::agent_client::{rpc_error, AgentClient, AgentError};
use crate::agent_process::{ExecOutput, ExecRequest, ProcessSpec};
use crate::vm::{Vm, VmError};

/// Errors of container calls.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The request is unusable.
    #[error("Invalid container request: {0}")]
    Invalid(String),
    /// The VM (hypervisor or agent) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The container was created but could not be started or removed, and cleaning up
    /// (or detaching its disk) failed too.
    #[error("{what} failed ({cause}); cleaning up failed too: {cleanup}")]
    Cleanup {
        /// What failed first.
        what: &'static str,
        /// Its error.
        cause: Box<ContainerError>,
        /// The cleanup's error.
        cleanup: Box<ContainerError>,
    },
}

impl From<AgentError> for ContainerError {
    fn from(err: AgentError) -> Self {
        Self::Vm(VmError::Agent(err))
    }
}

/// File system of a container image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFs {
    /// EROFS (what `vmfactory-image` builds).
    #[default]
    Erofs,
    /// ext4.
    Ext4,
}

impl ImageFs {
    fn name(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }
}

/// A container to create.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// 1 to 64 letters, digits, '_', '.', '-'; also its init's exec id.
    pub id: String,
    /// File system of the image.
    pub fs: ImageFs,
    /// Size of the writable upper layer (tmpfs), MiB; 0: the agent's default (256).
    pub upper_size_mib: u32,
    /// Host name; empty: the id.
    pub hostname: String,
    /// The init process (argv empty: a pause process). `container_id` is ignored;
    /// `user` is "uid[:gid]" or a name of the image's /etc/passwd.
    pub init: ProcessSpec,
}

/// Checks a container id as the agent does.
pub fn validate_container_id(id: &str) -> Result<(), ContainerError> {
    if id.is_empty()
        || id.len() > 64
        || id == "."
        || id == ".."
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(ContainerError::Invalid(format!(
            "container id {id:?}: use 1 to 64 letters, digits, '_', '.' or '-'"
        )));
    }
    Ok(())
}

/// The request of a container's init: `spec` without a container id (the init makes
/// the container).
fn process_request(spec: &ProcessSpec) -> ExecProcessRequest {
    ExecProcessRequest {
        container_id: String::new(),
        ..crate::agent_process::exec_request(spec.clone())
    }
}

impl AgentClient {
    /// Creates container `spec.id` on the disk the guest sees with `serial`; its init
    /// waits for [`AgentClient::start_container`].
    pub async fn create_container(
        &self,
        spec: &ContainerSpec,
        serial: &str,
    ) -> Result<(), ContainerError> {
        validate_container_id(&spec.id)?;
        let request = CreateContainerRequest {
            container_id: spec.id.clone(),
            rootfs: Some(ContainerStorage {
                serial: serial.to_string(),
                fstype: spec.fs.name().to_string(),
                read_only: true,
            }),
            upper_size_mib: spec.upper_size_mib,
            hostname: spec.hostname.clone(),
            init: Some(process_request(&spec.init)),
        };
        self.grpc()
            .create_container(request)
            .await
            .map_err(rpc_error("CreateContainer"))?;
        Ok(())
    }

    /// Lets container `id`'s init run.
    pub async fn start_container(&self, id: &str) -> Result<(), ContainerError> {
        validate_container_id(id)?;
        self.grpc()
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .map_err(rpc_error("StartContainer"))?;
        Ok(())
    }

    /// Kills container `id`'s processes, unmounts its file systems and forgets it.
    pub async fn remove_container(&self, id: &str) -> Result<(), ContainerError> {
        validate_container_id(id)?;
        self.grpc()
            .remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .map_err(rpc_error("RemoveContainer"))?;
        Ok(())
    }

    /// Starts a process in container `id` (streams, signals, waits: by the returned exec
    /// id, as for any process).
    pub async fn start_in_container(
        &self,
        id: &str,
        mut spec: ProcessSpec,
    ) -> Result<String, ContainerError> {
        validate_container_id(id)?;
        spec.container_id = id.to_string();
        Ok(self.start_process(spec).await?)
    }

    /// Runs a command in container `id` as `user` ("" = root) and collects its output.
    pub async fn exec_in_container(
        &self,
        id: &str,
        user: &str,
        request: ExecRequest,
    ) -> Result<ExecOutput, ContainerError> {
        validate_container_id(id)?;
        Ok(self
            .exec_in(request, id.to_string(), user.to_string())
            .await?)
    }
}

/// A container [`Vm::run_container`] started: give it back to
/// [`Vm::remove_container`]. A VM stopped or discarded with it takes it (and its disk)
/// along.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "remove the container with Vm::remove_container (or stop the VM)"]
pub struct RunningContainer {
    /// Container id (and exec id of its init).
    pub id: String,
    /// The image disk.
    pub disk: AttachedDisk,
    /// The image file on the host.
    pub image: PathBuf,
}

impl Vm {
    /// Hot-plugs the image file `path` as a virtio-blk disk.
    pub async fn attach_disk(&self, path: &Path, read_only: bool) -> Result<AttachedDisk, VmError> {
        let spec = DiskSpec {
            path: path.to_path_buf(),
            read_only,
            serial: String::new(),
        };
        Ok(self.hypervisor().attach_disk(&spec).await?)
    }

    /// Unplugs disk `disk` (the guest must have released it).
    pub async fn detach_disk(&self, disk: &AttachedDisk) -> Result<(), VmError> {
        Ok(self.hypervisor().detach_disk(&disk.id).await?)
    }

    /// Attaches `image` read-only, creates container `spec` on it and starts it.
    /// Anything half-done is undone on failure.
    pub async fn run_container(
        &self,
        image: &Path,
        spec: &ContainerSpec,
    ) -> Result<RunningContainer, ContainerError> {
        validate_container_id(&spec.id)?;
        let began = std::time::Instant::now();
        let disk = self.attach_disk(image, true).await?;
        let attached = began.elapsed();
        let created = self.agent().create_container(spec, &disk.serial).await;
        let created_at = began.elapsed();
        if let Err(err) = created {
            return Err(match self.detach_disk(&disk).await {
                Ok(()) => err,
                Err(cleanup) => ContainerError::Cleanup {
                    what: "CreateContainer",
                    cause: Box::new(err),
                    cleanup: Box::new(cleanup.into()),
                },
            });
        }
        let running = RunningContainer {
            id: spec.id.clone(),
            disk,
            image: image.to_path_buf(),
        };
        if let Err(err) = self.agent().start_container(&spec.id).await {
            return Err(match self.remove_container(running).await {
                Ok(()) => err,
                Err(cleanup) => ContainerError::Cleanup {
                    what: "StartContainer",
                    cause: Box::new(err),
                    cleanup: Box::new(cleanup),
                },
            });
        }
        debug!(
            id = %spec.id,
            attach_ms = attached.as_secs_f64() * 1e3,
            create_ms = (created_at - attached).as_secs_f64() * 1e3,
            start_ms = (began.elapsed() - created_at).as_secs_f64() * 1e3,
            "Container running"
        );
        Ok(running)
    }

    /// Removes `container` in the guest, then detaches its disk: always, also when the
    /// removal failed (the disk and its hot-plug port would stay taken for the VM's life)
    /// or the guest no longer knows the container (an earlier try removed it, or its
    /// agent restarted).
    pub async fn remove_container(
        &self,
        container: RunningContainer,
    ) -> Result<(), ContainerError> {
        let removed = match self.agent().remove_container(&container.id).await {
            Err(ContainerError::Vm(VmError::Agent(AgentError::Rpc { status, .. })))
                if status.code() == tonic::Code::NotFound =>
            {
                warn!(id = %container.id, "The guest no longer knows the container; detaching its disk");
                Ok(())
            }
            removed => removed,
        };
        let detached = self
            .detach_disk(&container.disk)
            .await
            .map_err(ContainerError::from);
        match (removed, detached) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
            (Err(err), Err(cleanup)) => Err(ContainerError::Cleanup {
                what: "RemoveContainer",
                cause: Box::new(err),
                cleanup: Box::new(cleanup),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        validate_container_id("web-1.a_b").expect("ok");
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_container_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn init_request_carries_the_user_and_no_container_id() {
        let spec = ProcessSpec {
            argv: vec!["sh".into()],
            user: "1000:100".into(),
            container_id: "ignored".into(),
            ..ProcessSpec::default()
        };
        let request = process_request(&spec);
        assert_eq!(request.user, "1000:100");
        assert!(request.container_id.is_empty());
    }
}
