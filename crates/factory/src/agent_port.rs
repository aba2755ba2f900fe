//! The agent's port as the host sees it: when the guest agent has let go of a host
//! connection and when it waits for the next one. The agent says so on the serial console
//! (the lines are in [`vmfactory_protocols::contract`]); QMP's `VSERPORT_CHANGE` would be
//! backend-specific, and the agent keeps its port open between hosts, so it reports no
//! change there. Guest output is untrusted: a forged line only makes the
//! next connection early, which every caller tolerates by checking and reconnecting.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmfactory_hypervisor::{Hypervisor, HypervisorError};
use vmfactory_protocols::contract::{CONSOLE_HOST_LEFT, CONSOLE_PORT_OPENED};

use crate::vm::VmError;

/// Most console bytes read per look: a chatty guest cannot make the host read without end.
const MAX_CONSOLE_READ: u64 = 1 << 20;

/// A mark in a VM's console log; waits look only at what the guest printed after it.
#[derive(Debug, Clone)]
pub struct PortWatch {
    console: Option<PathBuf>,
    mark: u64,
}

impl PortWatch {
    /// Marks the end of `hypervisor`'s console now. Call it before closing the agent
    /// connection whose end you want to see.
    pub fn mark(hypervisor: &dyn Hypervisor) -> Self {
        let console = hypervisor.channels().console_log;
        let mark = console
            .as_deref()
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |meta| meta.len());
        Self { console, mark }
    }

    /// Waits until the agent has let go of its host and made its next connection, waiting
    /// for the next host: a VM saved from then on resumes with its agent waiting.
    pub async fn wait_reopened(
        &self,
        hypervisor: &dyn Hypervisor,
        timeout: Duration,
    ) -> Result<(), VmError> {
        self.wait(hypervisor, timeout).await
    }

    async fn wait(&self, hypervisor: &dyn Hypervisor, timeout: Duration) -> Result<(), VmError> {
        let what = "the agent to let go of its host and wait for a new one";
        let seen = |text: &str| {
            host_left_at(text).is_some_and(|at| text[at..].contains(CONSOLE_PORT_OPENED))
        };
        let Some(console) = &self.console else {
            return Err(
                HypervisorError::Unsupported("Watching the agent port without a console").into(),
            );
        };
        let started = Instant::now();
        loop {
            if seen(&read_after(console, self.mark)) {
                return Ok(());
            }
            if !hypervisor.is_running() {
                return Err(hypervisor.exited().await.into());
            }
            if started.elapsed() > timeout {
                return Err(HypervisorError::Timeout {
                    what: format!("waiting for {what}{}", hypervisor.failure_report()),
                    seconds: timeout.as_secs_f64(),
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Where the first "host left" line starts in `text`.
fn host_left_at(text: &str) -> Option<usize> {
    CONSOLE_HOST_LEFT
        .iter()
        .filter_map(|line| text.find(line))
        .min()
}

/// The console text after byte `offset` (at most [`MAX_CONSOLE_READ`] bytes). The
/// hypervisor may free the head of a flooded log (it reads as NUL bytes; offsets stay);
/// should a log ever be shorter than the mark (truncated, replaced), all of it is new.
fn read_after(console: &Path, offset: u64) -> String {
    let Ok(mut file) = std::fs::File::open(console) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |meta| meta.len());
    let offset = if len < offset { 0 } else { offset };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return String::new();
    }
    let mut text = Vec::new();
    if file.take(MAX_CONSOLE_READ).read_to_end(&mut text).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_counts_only_after_the_host_left() {
        let opened_first = format!("{CONSOLE_PORT_OPENED}\n{}\n", CONSOLE_HOST_LEFT[0]);
        let at = host_left_at(&opened_first).expect("left");
        assert!(!opened_first[at..].contains(CONSOLE_PORT_OPENED));
        let reopened = format!("{}\n{CONSOLE_PORT_OPENED}\n", CONSOLE_HOST_LEFT[1]);
        let at = host_left_at(&reopened).expect("left");
        assert!(reopened[at..].contains(CONSOLE_PORT_OPENED));
        assert_eq!(host_left_at("nothing yet"), None);
    }

    #[test]
    fn reads_only_after_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        std::fs::write(&console, "Host disconnected\n").expect("write");
        let mark = std::fs::metadata(&console).expect("meta").len();
        assert_eq!(read_after(&console, mark), "");
        std::fs::write(&console, "Host disconnected\nAgent port opened\n").expect("write");
        assert_eq!(read_after(&console, mark), "Agent port opened\n");
        assert_eq!(read_after(&dir.path().join("missing"), 0), "");
        // A log cut below the mark is read from its start.
        let mark = std::fs::metadata(&console).expect("meta").len();
        std::fs::write(&console, "Agent port opened\n").expect("truncate");
        assert_eq!(read_after(&console, mark), "Agent port opened\n");
    }
}
