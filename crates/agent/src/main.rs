//! The vmfactory guest agent. It runs as PID 1 of the guest initramfs: it mounts `/proc`,
//! `/sys` and `/dev`, loads the virtio modules listed in `/lib/modules/load-order`, then
//! forks the agent server and stays behind as a supervisor that reaps orphans and restarts
//! the server if it ever dies (PID 1 exiting would panic the guest kernel). The server finds
//! the virtio-serial port named `agent.0` and serves the agent API (gRPC over HTTP/2) on it,
//! one host connection after another.

mod container;
mod files;
mod handout;
mod init;
mod port;
mod process;
mod pty;
mod service;
mod sys;

use std::time::Duration;

use tracing::{error, info};

/// Name of the virtio-serial port the host connects to.
pub use vmfactory_protocols::contract::AGENT_PORT_NAME as PORT_NAME;

fn main() {
    // Re-executed as a container's init (see `container::init`).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(container::init::INIT_ARG) {
        container::init::run(&args);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    if std::process::id() == 1 {
        init::prepare_system();
        // Only returns in the forked child, which becomes the agent server.
        init::supervise();
    }
    serve_forever();
}

/// Runs the agent server; never returns.
fn serve_forever() -> ! {
    loop {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                error!(%err, "Cannot build the async runtime; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        info!(
            version = env!("CARGO_PKG_VERSION"),
            "vmfactory agent starting"
        );
        runtime.block_on(port::serve_port(PORT_NAME));
    }
}
