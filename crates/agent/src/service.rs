//! The agent API: every RPC validates its request and answers with a gRPC status on failure;
//! nothing a host sends can make the agent exit.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use vmfactory_protocols::agent::agent_service_server::AgentService;
use vmfactory_protocols::agent::health_check_response::ServingStatus;
use vmfactory_protocols::agent::{
    CheckRequest, CloseStdinRequest, CopyFileRequest, CreateContainerRequest, ExecProcessRequest,
    ExecProcessResponse, GuestDetailsRequest, GuestDetailsResponse, HandOutRequest,
    HandOutResponse, HealthCheckResponse, ListProcessesRequest, ListProcessesResponse,
    OnlineCpuMemRequest, OnlineCpuMemResponse, ReadFileRequest, ReadFileResponse,
    ReadStreamRequest, ReadStreamResponse, RemoveContainerRequest, ReseedRandomDevRequest,
    RunProcessResponse, SetGuestDateTimeRequest, SignalProcessRequest, StartContainerRequest,
    StatPathRequest, StatPathResponse, TtyWinResizeRequest, WaitProcessRequest,
    WaitProcessResponse, WriteStreamRequest, WriteStreamResponse,
};

use crate::container::Containers;
use crate::files;
use crate::handout;
use crate::process::{Output, Processes};
use crate::sys;

/// The agent service; clones share the process table, so a process started over one host
/// connection can be read, fed, signalled and waited for over another.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    processes: Arc<Processes>,
    containers: Arc<Containers>,
}

impl Agent {
    /// Where a file request's paths resolve: the VM's root, or container `id`'s.
    async fn file_scope(&self, id: &str) -> Result<files::Scope, Status> {
        if id.is_empty() {
            return Ok(files::Scope::Vm);
        }
        let namespace = self.containers.mount_namespace(&self.processes, id).await?;
        Ok(files::Scope::Container(Arc::new(namespace)))
    }
}

#[tonic::async_trait]
impl AgentService for Agent {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let request = request.into_inner();
        let (exec_id, pid) = if request.container_id.is_empty() {
            if !request.user.is_empty() {
                return Err(Status::invalid_argument(
                    "user applies only to processes in a container",
                ));
            }
            self.processes.start(request)?
        } else {
            let launch = self.containers.join(&self.processes, &request).await?;
            self.processes.start_with(request, launch)?
        };
        Ok(Response::new(ExecProcessResponse { exec_id, pid }))
    }

    type ReadStdoutStream = ReceiverStream<Result<ReadStreamResponse, Status>>;

    async fn read_stdout(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStdoutStream>, Status> {
        let id = request.into_inner().exec_id;
        Ok(Response::new(self.processes.read(&id, Output::Stdout)?))
    }

    type ReadStderrStream = ReceiverStream<Result<ReadStreamResponse, Status>>;

    async fn read_stderr(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStderrStream>, Status> {
        let id = request.into_inner().exec_id;
        Ok(Response::new(self.processes.read(&id, Output::Stderr)?))
    }

    async fn write_stdin(
        &self,
        request: Request<Streaming<WriteStreamRequest>>,
    ) -> Result<Response<WriteStreamResponse>, Status> {
        let len = self.processes.write_stdin(request.into_inner()).await?;
        Ok(Response::new(WriteStreamResponse { len }))
    }

    async fn close_stdin(
        &self,
        request: Request<CloseStdinRequest>,
    ) -> Result<Response<()>, Status> {
        self.processes
            .close_stdin(&request.into_inner().exec_id)
            .await?;
        Ok(Response::new(()))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        self.processes.signal(&request.exec_id, request.signal)?;
        Ok(Response::new(()))
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let exit = self.processes.wait(&request.into_inner().exec_id).await?;
        Ok(Response::new(exit.into()))
    }

    type RunProcessStream = ReceiverStream<Result<RunProcessResponse, Status>>;

    async fn run_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<Self::RunProcessStream>, Status> {
        let started = self.exec_process(request).await?.into_inner();
        Ok(Response::new(self.processes.follow(started)?))
    }

    async fn tty_win_resize(
        &self,
        request: Request<TtyWinResizeRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        self.processes
            .resize(&request.exec_id, request.rows, request.cols)?;
        Ok(Response::new(()))
    }

    async fn list_processes(
        &self,
        _request: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let processes = self.processes.list()?;
        Ok(Response::new(ListProcessesResponse { processes }))
    }

    async fn copy_file(
        &self,
        request: Request<Streaming<CopyFileRequest>>,
    ) -> Result<Response<()>, Status> {
        let mut stream = request.into_inner();
        let Some(first) = stream.next().await.transpose()? else {
            return Err(Status::invalid_argument(
                "CopyFile stream is empty: its first message must describe the entry",
            ));
        };
        let scope = self.file_scope(&first.container_id).await?;
        files::copy_file(first, stream, &scope).await?;
        Ok(Response::new(()))
    }

    async fn stat_path(
        &self,
        request: Request<StatPathRequest>,
    ) -> Result<Response<StatPathResponse>, Status> {
        let request = request.into_inner();
        let scope = self.file_scope(&request.container_id).await?;
        let response = files::stat_path(&request.path, request.follow, &scope).await?;
        Ok(Response::new(response))
    }

    type ReadFileStream = ReceiverStream<Result<ReadFileResponse, Status>>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let request = request.into_inner();
        let scope = self.file_scope(&request.container_id).await?;
        let stream = files::read_file(&request.path, &scope).await?;
        Ok(Response::new(stream))
    }

    async fn guest_details(
        &self,
        _request: Request<GuestDetailsRequest>,
    ) -> Result<Response<GuestDetailsResponse>, Status> {
        let details = sys::guest_details().map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(details))
    }

    async fn set_guest_date_time(
        &self,
        request: Request<SetGuestDateTimeRequest>,
    ) -> Result<Response<()>, Status> {
        let request = request.into_inner();
        if request.sec < 0 || !(0..1_000_000).contains(&request.usec) {
            return Err(Status::invalid_argument(format!(
                "Invalid time: sec {} must be >= 0 and usec {} within 0..1000000",
                request.sec, request.usec
            )));
        }
        sys::set_clock(request.sec, request.usec)
            .map_err(|err| Status::internal(format!("Cannot set the clock: {err}")))?;
        Ok(Response::new(()))
    }

    async fn reseed_random_dev(
        &self,
        request: Request<ReseedRandomDevRequest>,
    ) -> Result<Response<()>, Status> {
        let data = request.into_inner().data;
        if data.is_empty() || data.len() > sys::MAX_RESEED_BYTES {
            return Err(Status::invalid_argument(format!(
                "Reseed data must hold 1 to {} bytes, got {}",
                sys::MAX_RESEED_BYTES,
                data.len()
            )));
        }
        sys::reseed_rng(&data)
            .map_err(|err| Status::internal(format!("Cannot reseed the RNG: {err}")))?;
        Ok(Response::new(()))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.containers
            .create(&self.processes, request.into_inner())
            .await?;
        Ok(Response::new(()))
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.containers
            .start(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(()))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.containers
            .remove(&self.processes, &request.into_inner().container_id)
            .await?;
        Ok(Response::new(()))
    }

    async fn online_cpu_mem(
        &self,
        request: Request<OnlineCpuMemRequest>,
    ) -> Result<Response<OnlineCpuMemResponse>, Status> {
        let request = request.into_inner();
        let response = sys::online_cpu_mem(request.nb_cpus, request.cpu_only, request.memory_mib)
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(response))
    }

    // ---- Hand-out ----
    async fn hand_out(
        &self,
        request: Request<HandOutRequest>,
    ) -> Result<Response<HandOutResponse>, Status> {
        let checked = handout::check(request.into_inner())?;
        Ok(Response::new(handout::apply(&checked)?))
    }
    // ---- end of hand-out ----
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reseed_rejects_empty_data() {
        let err = Agent::default()
            .reseed_random_dev(Request::new(ReseedRandomDevRequest { data: vec![] }))
            .await
            .expect_err("empty");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn set_time_rejects_bad_usec() {
        let err = Agent::default()
            .set_guest_date_time(Request::new(SetGuestDateTimeRequest {
                sec: 1,
                usec: 2_000_000,
            }))
            .await
            .expect_err("bad usec");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
