//! The agent API on the supervisor's socket, forwarded over the supervisor's one
//! connection to the sandbox VM's agent (`vmfactory_protocols::mux` multiplexes the calls of
//! every client).
//! Streams are forwarded as streams, so back-pressure reaches the guest.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use vmfactory_factory::agent_client::AgentChannel as Channel;
use vmfactory_protocols::agent::agent_service_client::AgentServiceClient;
use vmfactory_protocols::agent::agent_service_server::AgentService;
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

/// Forwards every agent RPC to one agent connection.
#[derive(Debug, Clone)]
pub struct AgentProxy {
    agent: AgentServiceClient<Channel>,
}

impl AgentProxy {
    /// A proxy over `agent`.
    pub fn new(agent: AgentServiceClient<Channel>) -> Self {
        Self { agent }
    }

    fn agent(&self) -> AgentServiceClient<Channel> {
        self.agent.clone()
    }
}

#[tonic::async_trait]
impl AgentService for AgentProxy {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.agent().check(request.into_inner()).await
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        self.agent().exec_process(request.into_inner()).await
    }

    type ReadStdoutStream = Streaming<ReadStreamResponse>;

    async fn read_stdout(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStdoutStream>, Status> {
        self.agent().read_stdout(request.into_inner()).await
    }

    type ReadStderrStream = Streaming<ReadStreamResponse>;

    async fn read_stderr(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStderrStream>, Status> {
        self.agent().read_stderr(request.into_inner()).await
    }

    async fn write_stdin(
        &self,
        request: Request<Streaming<WriteStreamRequest>>,
    ) -> Result<Response<WriteStreamResponse>, Status> {
        // A client that fails mid-stream ends the stream; what came before is written.
        let chunks = request
            .into_inner()
            .take_while(Result::is_ok)
            .filter_map(Result::ok);
        self.agent().write_stdin(chunks).await
    }

    async fn close_stdin(
        &self,
        request: Request<CloseStdinRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().close_stdin(request.into_inner()).await
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().signal_process(request.into_inner()).await
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        self.agent().wait_process(request.into_inner()).await
    }

    type RunProcessStream = Streaming<RunProcessResponse>;

    async fn run_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<Self::RunProcessStream>, Status> {
        self.agent().run_process(request.into_inner()).await
    }

    async fn guest_details(
        &self,
        request: Request<GuestDetailsRequest>,
    ) -> Result<Response<GuestDetailsResponse>, Status> {
        self.agent().guest_details(request.into_inner()).await
    }

    async fn set_guest_date_time(
        &self,
        request: Request<SetGuestDateTimeRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().set_guest_date_time(request.into_inner()).await
    }

    async fn reseed_random_dev(
        &self,
        request: Request<ReseedRandomDevRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().reseed_random_dev(request.into_inner()).await
    }

    async fn hand_out(
        &self,
        request: Request<HandOutRequest>,
    ) -> Result<Response<HandOutResponse>, Status> {
        self.agent().hand_out(request.into_inner()).await
    }

    async fn online_cpu_mem(
        &self,
        request: Request<OnlineCpuMemRequest>,
    ) -> Result<Response<OnlineCpuMemResponse>, Status> {
        self.agent().online_cpu_mem(request.into_inner()).await
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().create_container(request.into_inner()).await
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().start_container(request.into_inner()).await
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().remove_container(request.into_inner()).await
    }

    async fn tty_win_resize(
        &self,
        request: Request<TtyWinResizeRequest>,
    ) -> Result<Response<()>, Status> {
        self.agent().tty_win_resize(request.into_inner()).await
    }

    async fn list_processes(
        &self,
        request: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        self.agent().list_processes(request.into_inner()).await
    }

    async fn copy_file(
        &self,
        request: Request<Streaming<CopyFileRequest>>,
    ) -> Result<Response<()>, Status> {
        // A client that fails mid-stream ends the stream short: the agent then keeps
        // nothing of the file (its size does not match).
        let chunks = request
            .into_inner()
            .take_while(Result::is_ok)
            .filter_map(Result::ok);
        self.agent().copy_file(chunks).await
    }

    async fn stat_path(
        &self,
        request: Request<StatPathRequest>,
    ) -> Result<Response<StatPathResponse>, Status> {
        self.agent().stat_path(request.into_inner()).await
    }

    type ReadFileStream = Streaming<ReadFileResponse>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        self.agent().read_file(request.into_inner()).await
    }
}
