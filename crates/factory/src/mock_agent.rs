//! A stand-in guest agent for unit tests with the mock hypervisor: it serves the agent API
//! on a mock VM's agent socket, one host connection after another, and prints the console
//! lines the real agent prints (port opened, host left), so factory code that watches the
//! agent's port runs unchanged.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tonic::{Request, Response, Status};
use vmfactory_hypervisor::mock::{GuestHook, MockControl};
use vmfactory_hypervisor::GuestChannels;
use vmfactory_protocols::agent::agent_service_server::{AgentService, AgentServiceServer};
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
use vmfactory_protocols::contract::{CONSOLE_HOST_LEFT, CONSOLE_PORT_OPENED};

/// Counts of what the stand-in agents were asked, across all mock VMs of a hook.
#[derive(Debug, Default)]
pub struct AgentCalls {
    /// `ReseedRandomDev` calls.
    pub reseeds: AtomicU32,
    /// `SetGuestDateTime` calls.
    pub clock_sets: AtomicU32,
    /// `HandOut` calls.
    pub hand_outs: AtomicU32,
    /// The hostname the last `HandOut` set.
    pub hostname: std::sync::Mutex<String>,
    /// `OnlineCPUMem` calls.
    pub onlines: AtomicU32,
    /// `ExecProcess` calls.
    pub execs: AtomicU32,
}

#[derive(Debug, Clone)]
struct MockAgent {
    calls: Arc<AgentCalls>,
    /// Output of started mock processes not read yet, by exec id.
    outputs: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

#[tonic::async_trait]
impl AgentService for MockAgent {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    /// A mock process prints its own command line and exits 0.
    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let exec_id = format!("mock{}", self.calls.execs.fetch_add(1, Ordering::SeqCst));
        let line = request.into_inner().argv.join(" ").into_bytes();
        if let Ok(mut outputs) = self.outputs.lock() {
            outputs.insert(exec_id.clone(), line);
        }
        Ok(Response::new(ExecProcessResponse { exec_id, pid: 1 }))
    }

    type ReadStdoutStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<ReadStreamResponse, Status>>>;

    async fn read_stdout(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStdoutStream>, Status> {
        let id = request.into_inner().exec_id;
        let data = self
            .outputs
            .lock()
            .ok()
            .and_then(|mut outputs| outputs.remove(&id))
            .ok_or_else(|| Status::not_found(id))?;
        Ok(Response::new(tokio_stream::iter(vec![Ok(
            ReadStreamResponse { data },
        )])))
    }

    type ReadStderrStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<ReadStreamResponse, Status>>>;

    async fn read_stderr(
        &self,
        _request: Request<ReadStreamRequest>,
    ) -> Result<Response<Self::ReadStderrStream>, Status> {
        Ok(Response::new(tokio_stream::iter(Vec::new())))
    }

    async fn write_stdin(
        &self,
        _request: Request<tonic::Streaming<WriteStreamRequest>>,
    ) -> Result<Response<WriteStreamResponse>, Status> {
        Ok(Response::new(WriteStreamResponse { len: 0 }))
    }

    async fn close_stdin(
        &self,
        _request: Request<CloseStdinRequest>,
    ) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn signal_process(
        &self,
        _request: Request<SignalProcessRequest>,
    ) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn wait_process(
        &self,
        _request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        Ok(Response::new(WaitProcessResponse::default()))
    }

    type RunProcessStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<RunProcessResponse, Status>>>;

    /// Not served: the mock is an agent from before `RunProcess`, so the hosts' fallback
    /// to `ExecProcess`, `ReadStdout`, `ReadStderr` and `WaitProcess` is what runs.
    async fn run_process(
        &self,
        _request: Request<ExecProcessRequest>,
    ) -> Result<Response<Self::RunProcessStream>, Status> {
        Err(Status::unimplemented("RunProcess"))
    }

    async fn guest_details(
        &self,
        _request: Request<GuestDetailsRequest>,
    ) -> Result<Response<GuestDetailsResponse>, Status> {
        Ok(Response::new(GuestDetailsResponse {
            kernel_release: "mock".into(),
            online_cpus: 1,
            mem_total_kib: 1,
            agent_version: "mock".into(),
            clocksource: "mock".into(),
        }))
    }

    async fn set_guest_date_time(
        &self,
        _request: Request<SetGuestDateTimeRequest>,
    ) -> Result<Response<()>, Status> {
        self.calls.clock_sets.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(()))
    }

    async fn reseed_random_dev(
        &self,
        _request: Request<ReseedRandomDevRequest>,
    ) -> Result<Response<()>, Status> {
        self.calls.reseeds.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(()))
    }

    async fn hand_out(
        &self,
        request: Request<HandOutRequest>,
    ) -> Result<Response<HandOutResponse>, Status> {
        let request = request.into_inner();
        self.calls.hand_outs.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut hostname) = self.calls.hostname.lock() {
            *hostname = request.hostname;
        }
        Ok(Response::new(HandOutResponse::default()))
    }

    async fn online_cpu_mem(
        &self,
        _request: Request<OnlineCpuMemRequest>,
    ) -> Result<Response<OnlineCpuMemResponse>, Status> {
        self.calls.onlines.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(OnlineCpuMemResponse::default()))
    }

    async fn create_container(
        &self,
        _request: Request<CreateContainerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("The mock agent has no containers"))
    }

    async fn start_container(
        &self,
        _request: Request<StartContainerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("The mock agent has no containers"))
    }

    async fn remove_container(
        &self,
        _request: Request<RemoveContainerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("The mock agent has no containers"))
    }

    async fn tty_win_resize(
        &self,
        _request: Request<TtyWinResizeRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("The mock agent has no terminals"))
    }

    async fn list_processes(
        &self,
        _request: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        Ok(Response::new(ListProcessesResponse::default()))
    }

    async fn copy_file(
        &self,
        _request: Request<tonic::Streaming<CopyFileRequest>>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("The mock agent has no files"))
    }

    async fn stat_path(
        &self,
        _request: Request<StatPathRequest>,
    ) -> Result<Response<StatPathResponse>, Status> {
        Err(Status::unimplemented("The mock agent has no files"))
    }

    type ReadFileStream = tokio_stream::Iter<std::vec::IntoIter<Result<ReadFileResponse, Status>>>;

    async fn read_file(
        &self,
        _request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(Status::unimplemented("The mock agent has no files"))
    }
}

fn console_line(console: &Path, line: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
    {
        let _ = writeln!(file, "{line}");
    }
}

/// A guest hook that runs a stand-in agent in every mock VM; `calls` counts its calls.
pub fn hook(calls: Arc<AgentCalls>) -> GuestHook {
    Arc::new(move |channels: GuestChannels, control: Arc<MockControl>| {
        let agent = MockAgent {
            calls: calls.clone(),
            outputs: Arc::default(),
        };
        // Bound now, so a host may connect as soon as the VM exists (as QEMU's socket).
        let _ = std::fs::remove_file(&channels.agent_socket);
        let Ok(listener) = UnixListener::bind(&channels.agent_socket) else {
            return;
        };
        let console = channels.console_log.clone().unwrap_or_default();
        tokio::spawn(async move {
            while control.is_alive() {
                console_line(&console, CONSOLE_PORT_OPENED);
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = async {
                        while control.is_alive() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    } => return,
                };
                let Ok((stream, _)) = accepted else { return };
                let served = vmfactory_protocols::mux::serve(
                    stream,
                    AgentServiceServer::new(agent.clone()),
                    std::future::pending(),
                )
                .await;
                if control.is_alive() {
                    console_line(&console, CONSOLE_HOST_LEFT[usize::from(served.is_err())]);
                }
            }
        });
    })
}
