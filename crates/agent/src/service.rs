//! The agent API: every RPC validates its request and answers with a gRPC status on failure;
//! nothing a host sends can make the agent exit.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::{Request, Response, Status};
use vmfactory_protocols::agent::agent_service_server::AgentService;
use vmfactory_protocols::agent::health_check_response::ServingStatus;
use vmfactory_protocols::agent::{
    CheckRequest, ExecProcessRequest, ExecProcessResponse, GuestDetailsRequest,
    GuestDetailsResponse, HealthCheckResponse, OnlineCpuMemRequest, OnlineCpuMemResponse,
    ReseedRandomDevRequest, SetGuestDateTimeRequest,
};

use crate::sys;

/// Output kept per stream of a command; the rest is read and dropped.
pub const MAX_OUTPUT: usize = 128 << 20;
/// How long output readers may run on after the command exited (background children
/// holding the pipes open must not hold the answer back forever).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// The agent service.
#[derive(Debug, Clone, Default)]
pub struct Agent;

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
        exec(request.into_inner()).await.map(Response::new)
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

    async fn online_cpu_mem(
        &self,
        request: Request<OnlineCpuMemRequest>,
    ) -> Result<Response<OnlineCpuMemResponse>, Status> {
        let request = request.into_inner();
        let response = sys::online_cpu_mem(request.nb_cpus, request.cpu_only)
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(response))
    }
}

/// Output collected from one stream, with a limit.
#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

async fn capture(mut reader: impl AsyncRead + Unpin, sink: Arc<Mutex<Captured>>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(mut captured) = sink.lock() else {
            return;
        };
        let room = MAX_OUTPUT.saturating_sub(captured.data.len());
        let keep = n.min(room);
        captured.data.extend_from_slice(&buf[..keep]);
        if keep < n {
            captured.truncated = true;
        }
    }
}

fn take(sink: &Arc<Mutex<Captured>>) -> Captured {
    sink.lock()
        .map(|mut captured| std::mem::take(&mut *captured))
        .unwrap_or_default()
}

fn validate(request: &ExecProcessRequest) -> Result<(), Status> {
    let Some(program) = request.argv.first() else {
        return Err(Status::invalid_argument(
            "argv is empty: give a command to run",
        ));
    };
    if program.is_empty() {
        return Err(Status::invalid_argument("argv[0] is empty"));
    }
    if request.argv.iter().any(|arg| arg.contains('\0')) {
        return Err(Status::invalid_argument("An argument contains a NUL byte"));
    }
    for var in &request.env {
        if var.key.is_empty() || var.key.contains(['=', '\0']) || var.value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "Invalid environment variable {:?}: the name must be non-empty without '=' or NUL",
                var.key
            )));
        }
    }
    if request.workdir.contains('\0') {
        return Err(Status::invalid_argument("workdir contains a NUL byte"));
    }
    Ok(())
}

/// Runs one command to completion.
pub async fn exec(request: ExecProcessRequest) -> Result<ExecProcessResponse, Status> {
    validate(&request)?;
    let workdir = if request.workdir.is_empty() {
        "/"
    } else {
        &request.workdir
    };
    let mut command = Command::new(&request.argv[0]);
    command
        .args(&request.argv[1..])
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/root")
        .envs(request.env.iter().map(|v| (&v.key, &v.value)))
        .current_dir(workdir)
        .stdin(if request.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: setsid is async-signal-safe; the child becomes a process-group leader so a
    // timeout can kill the whole group.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|err| {
        Status::failed_precondition(format!(
            "Cannot start {:?} in {workdir:?}: {err}",
            request.argv[0]
        ))
    })?;
    let pgid = child.id();

    let stdout = Arc::new(Mutex::new(Captured::default()));
    let stderr = Arc::new(Mutex::new(Captured::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(capture(out, stdout.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(capture(err, stderr.clone())));
    }
    if let Some(mut stdin) = child.stdin.take() {
        let data = request.stdin;
        tokio::spawn(async move {
            // A command that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(&data).await;
        });
    }

    let limit = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
    let mut timed_out = false;
    let status = match limit {
        Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                timed_out = true;
                kill_group(pgid);
                child.wait().await
            }
        },
        None => child.wait().await,
    }
    .map_err(|err| Status::internal(format!("Cannot wait for the command: {err}")))?;

    let all_readers = futures_join(readers);
    if tokio::time::timeout(OUTPUT_GRACE, all_readers)
        .await
        .is_err()
    {
        // Something the command left behind still holds its output open.
        kill_group(pgid);
    }
    let (stdout, stderr) = (take(&stdout), take(&stderr));
    Ok(ExecProcessResponse {
        exit_code: status.code().unwrap_or(-1),
        signal: status.signal().unwrap_or(0),
        stdout: stdout.data,
        stderr: stderr.data,
        timed_out,
        stdout_truncated: stdout.truncated,
        stderr_truncated: stderr.truncated,
    })
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_protocols::agent::EnvVar;

    fn request(argv: &[&str]) -> ExecProcessRequest {
        ExecProcessRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn exec_returns_output_and_exit_code() {
        let response = exec(request(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
            .await
            .expect("exec");
        assert_eq!(response.stdout, b"out\n");
        assert_eq!(response.stderr, b"err\n");
        assert_eq!(response.exit_code, 3);
        assert_eq!(response.signal, 0);
        assert!(!response.timed_out);
    }

    #[tokio::test]
    async fn exec_passes_stdin_env_and_workdir() {
        let mut req = request(&["sh", "-c", "cat; echo \"$GREETING\"; pwd"]);
        req.stdin = b"input\n".to_vec();
        req.env = vec![EnvVar {
            key: "GREETING".into(),
            value: "hello".into(),
        }];
        req.workdir = "/tmp".into();
        let response = exec(req).await.expect("exec");
        assert_eq!(response.stdout, b"input\nhello\n/tmp\n");
    }

    #[tokio::test]
    async fn exec_times_out_and_reports_signal() {
        let mut req = request(&["sleep", "10"]);
        req.timeout_ms = 100;
        let response = exec(req).await.expect("exec");
        assert!(response.timed_out);
        assert_eq!(response.signal, libc::SIGKILL);
        assert_eq!(response.exit_code, -1);
    }

    #[tokio::test]
    async fn exec_does_not_wait_for_background_children() {
        let started = std::time::Instant::now();
        let response = exec(request(&["sh", "-c", "sleep 30 & echo done"]))
            .await
            .expect("exec");
        assert_eq!(response.stdout, b"done\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn exec_rejects_bad_requests() {
        let err = exec(request(&[])).await.expect_err("empty argv");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let mut req = request(&["true"]);
        req.env = vec![EnvVar {
            key: "A=B".into(),
            value: "x".into(),
        }];
        let err = exec(req).await.expect_err("bad env");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = exec(request(&["/nonexistent/program"]))
            .await
            .expect_err("missing program");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("/nonexistent/program"));
    }

    #[tokio::test]
    async fn exec_keeps_large_output_intact() {
        let response = exec(request(&[
            "sh",
            "-c",
            "head -c 16777216 /dev/zero | tr '\\0' 'x'",
        ]))
        .await
        .expect("exec");
        assert_eq!(response.stdout.len(), 16 << 20);
        assert!(response.stdout.iter().all(|&b| b == b'x'));
        assert!(!response.stdout_truncated);
    }

    #[tokio::test]
    async fn reseed_rejects_empty_data() {
        let err = Agent
            .reseed_random_dev(Request::new(ReseedRandomDevRequest { data: vec![] }))
            .await
            .expect_err("empty");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn set_time_rejects_bad_usec() {
        let err = Agent
            .set_guest_date_time(Request::new(SetGuestDateTimeRequest {
                sec: 1,
                usec: 2_000_000,
            }))
            .await
            .expect_err("bad usec");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
