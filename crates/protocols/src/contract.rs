//! Contracts between the host and the guest agent that are not in a `.proto` file: the
//! name of the agent's port, the console lines the host waits for, and the sizes both
//! ends of the agent connection agree on. Both sides use these constants; changing one
//! changes the guest image (the agent is rebuilt) and the host in the same build.

/// Name of the virtio-serial port the guest agent serves its API on.
pub const AGENT_PORT_NAME: &str = "agent.0";

/// Console line the agent prints each time it is ready for the next host connection: it
/// waits for a host (or has just found one) on its port.
pub const CONSOLE_PORT_OPENED: &str = "Agent port opened";

/// Console lines the agent prints once a host connection has ended and it closed its
/// port (a clean end, and an end with an error).
pub const CONSOLE_HOST_LEFT: [&str; 2] = ["Host disconnected", "Host connection ended"];

/// Largest gRPC message either end of the agent connection accepts.
pub const AGENT_MAX_MESSAGE_SIZE: usize = 256 << 20;

/// Largest message the host decodes from the guest agent. The guest is not trusted, and a
/// message is decoded whole into memory; this is above the largest answer an honest agent
/// gives (a `StatPath` listing of [`MAX_DIR_ENTRY_BYTES`] of names).
pub const AGENT_MAX_RESPONSE_SIZE: usize = 32 << 20;

/// Flow-control window of each call on the agent connection: body bytes a side may send
/// beyond what the other has read ([`crate::mux`]).
pub const AGENT_STREAM_WINDOW: u32 = 8 << 20;

/// Flow-control window of the agent connection as a whole: body bytes all calls together
/// may send in one direction beyond what the other side has read ([`crate::mux`]).
pub const AGENT_CONNECTION_WINDOW: u32 = 16 << 20;

/// Largest frame either end of the agent connection accepts ([`crate::mux`]).
pub const AGENT_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Most entropy bytes one `ReseedRandomDev` may carry.
pub const MAX_RESEED_BYTES: usize = 64 << 10;

/// Bytes per chunk of file content in `CopyFile` and `ReadFile` streams.
pub const FILE_CHUNK_SIZE: usize = 64 << 10;

/// Most bytes `ReadFile` sends of a file that reports no size (`st_size` 0: the files of
/// `/proc` and `/sys`, whose content is made as it is read). A file with a size is sent
/// as it was when opened.
pub const MAX_UNSIZED_FILE: u64 = 16 << 20;

/// Most names `StatPath` lists for one directory.
pub const MAX_DIR_ENTRIES: usize = 100_000;

/// Most bytes of names one `StatPath` answer lists.
pub const MAX_DIR_ENTRY_BYTES: usize = 16 << 20;

// A full listing (each name with its protobuf tag and length) fits in one answer.
const _: () = assert!(MAX_DIR_ENTRY_BYTES + MAX_DIR_ENTRIES * 8 + 4096 < AGENT_MAX_RESPONSE_SIZE);

// ---- Hand-out ----

/// Most entropy bytes one `HandOut` carries.
pub const MAX_HANDOUT_ENTROPY: usize = 4096;

/// Longest hostname `HandOut` sets (Linux's `HOST_NAME_MAX`).
pub const MAX_HOSTNAME_BYTES: usize = 64;

/// Checks a hostname for `HandOut`: 1 to [`MAX_HOSTNAME_BYTES`] bytes of ASCII letters,
/// digits, `-` and `.`, not starting or ending with `-` or `.`. Says what is wrong.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOSTNAME_BYTES {
        return Err(format!(
            "a hostname must hold 1 to {MAX_HOSTNAME_BYTES} bytes, got {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "a hostname may hold only ASCII letters, digits, '-' and '.', not {bad:?}"
        ));
    }
    let edge = |c: char| c == '-' || c == '.';
    if name.starts_with(edge) || name.ends_with(edge) {
        return Err("a hostname may not start or end with '-' or '.'".into());
    }
    Ok(())
}

// ---- end of hand-out ----
