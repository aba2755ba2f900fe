//! The vmfactory guest agent. It runs as PID 1 of the guest initramfs: it mounts `/proc`,
//! `/sys` and `/dev`, loads the virtio modules listed in `/lib/modules/load-order`, then
//! forks the agent server and stays behind as a supervisor that reaps orphans and restarts
//! the server if it ever dies (PID 1 exiting would panic the guest kernel). The server finds
//! the virtio-serial port named `agent.0` and serves the agent API (gRPC over `vmfactory_protocols::mux`) on it,
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

use tracing::{error, info, warn};

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
    keep_freed_heap();
    if let Err(err) = sys::random_device() {
        warn!(%err, "Cannot open the random device; reseeds will try again");
    }
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

/// Heap memory the server keeps after freeing it, instead of giving it back to the kernel.
const HEAP_TRIM_THRESHOLD: libc::c_int = 4 << 20;
/// Allocations at least this big get their own mapping (and give it back when freed).
const HEAP_MMAP_THRESHOLD: libc::c_int = 1 << 20;
/// Extra room the heap takes whenever it grows.
const HEAP_TOP_PAD: libc::c_int = 1 << 20;

/// Tells glibc's malloc to keep up to [`HEAP_TRIM_THRESHOLD`] of freed heap, and to grow
/// the heap [`HEAP_TOP_PAD`] at a time. By default it shrinks the heap whenever 128 KiB
/// at its top are free, and grows it by what it needs, so every RPC that allocates a
/// little more than the one before grows the heap (`brk`) and shrinks it after (`brk`,
/// unmapping). In a template's clone all of that is guest code its QEMU translates for
/// the first time, on the hand-out's path: a clone's hand-out translated 6% fewer blocks
/// with the heap kept (and no SIGIO for every message, `port.rs`).
/// The cost: up to [`HEAP_TRIM_THRESHOLD`] of freed memory stays with the agent (the
/// padding is address space until used).
fn keep_freed_heap() {
    // SAFETY: mallopt only changes malloc's tunables; it is called before any other
    // thread of this process exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, HEAP_TOP_PAD);
    }
}
