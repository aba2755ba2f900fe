//! The guest console log: what QEMU and the guest said last (quoted in errors), and the
//! bound on what a guest can make the host store.
//!
//! QEMU writes the serial console to `console.log` through a `file` chardev, which it
//! cannot cap. The owner of the VM runs [`ConsoleBound`]: past [`CONSOLE_CAP_BYTES`] it
//! punches a hole over the head of the file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), keeping
//! the last [`CONSOLE_KEEP_BYTES`]. The file's length and every offset in it stay as they
//! were (QEMU keeps writing at its own offset, readers' marks stay valid: the head just
//! reads as zero bytes), while the storage it takes stays bounded.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::cmdline::VmPaths;

/// Lines of QEMU's stderr and of the console quoted when QEMU dies.
const REPORT_LINES: usize = 15;
/// Most bytes read from the end of a log for a failure report.
const REPORT_BYTES: u64 = 64 << 10;
/// Console bytes stored per VM beyond which the head is freed.
pub const CONSOLE_CAP_BYTES: u64 = 8 << 20;
/// Console bytes kept (the tail) when the head is freed.
pub const CONSOLE_KEEP_BYTES: u64 = 4 << 20;
/// How often the owner looks at the console's size.
const CONSOLE_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Holes are punched in whole pages.
const PAGE: u64 = 4096;

/// The last `n` lines of a file (read from its last [`REPORT_BYTES`]), or "".
fn tail(path: &Path, n: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |meta| meta.len());
    let mut bytes = Vec::new();
    let read = file
        .seek(SeekFrom::Start(len.saturating_sub(REPORT_BYTES)))
        .and_then(|_| file.take(REPORT_BYTES).read_to_end(&mut bytes));
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .is_empty()
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What QEMU and the guest said last: quoted in errors when QEMU dies.
pub fn failure_report(paths: &VmPaths) -> String {
    let mut report = String::new();
    for (label, path) in [
        ("QEMU stderr", &paths.stderr),
        ("guest console", &paths.console),
    ] {
        let text = tail(path, REPORT_LINES);
        if !text.is_empty() {
            report.push_str(&format!("\n--- last lines of {label} ---\n{text}"));
        }
    }
    report
}

/// Frees the head of the console log at `path` when more than [`CONSOLE_CAP_BYTES`] lie
/// after `freed_to` (where the last hole ends), keeping the last [`CONSOLE_KEEP_BYTES`].
/// Returns where the freed head now ends.
pub fn bound_console(path: &Path, freed_to: u64) -> std::io::Result<u64> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    if len.saturating_sub(freed_to) <= CONSOLE_CAP_BYTES {
        return Ok(freed_to);
    }
    let end = (len - CONSOLE_KEEP_BYTES) / PAGE * PAGE;
    let (offset, length) = (freed_to, end.saturating_sub(freed_to));
    let too_big = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let (offset, length) = (
        libc::off_t::try_from(offset).map_err(too_big)?,
        libc::off_t::try_from(length).map_err(too_big)?,
    );
    // SAFETY: fallocate on a descriptor owned by `file`; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end)
}

/// Keeps a VM's console log bounded while its owner holds it (see the module's doc);
/// stops when the VM exits, the VM is handed over, or this is dropped.
#[derive(Debug)]
pub struct ConsoleBound(Option<tokio::task::AbortHandle>);

impl ConsoleBound {
    /// Starts bounding `console` until `exit` reports the VM's end. Within a tokio runtime.
    pub fn start(console: PathBuf, mut exit: watch::Receiver<Option<String>>) -> Self {
        let task = tokio::spawn(async move {
            let mut freed_to = 0;
            loop {
                tokio::select! {
                    _ = exit.wait_for(Option::is_some) => return,
                    () = tokio::time::sleep(CONSOLE_CHECK_INTERVAL) => {}
                }
                match bound_console(&console, freed_to) {
                    Ok(end) => freed_to = end,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        warn!(console = %console.display(), %err, "Cannot bound the guest console log; it may grow without limit");
                        return;
                    }
                }
            }
        });
        Self(Some(task.abort_handle()))
    }

    /// Stops bounding (the VM has a new owner, who bounds it).
    pub fn stop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Drop for ConsoleBound {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_flooded_console_keeps_its_offsets_and_tail_in_bounded_storage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        let mut file = std::fs::File::create(&console).expect("console");
        let chunk = vec![b'x'; 1 << 20];
        let mut freed_to = 0;
        for _ in 0..40 {
            file.write_all(&chunk).expect("flood");
            freed_to = bound_console(&console, freed_to).expect("bound");
        }
        file.write_all(b"\nAgent port opened\n").expect("last line");
        let meta = std::fs::metadata(&console).expect("meta");
        assert_eq!(
            meta.len(),
            (40 << 20) + 19,
            "the length (and so every offset) stays"
        );
        let stored = meta.blocks() * 512;
        assert!(
            stored <= CONSOLE_CAP_BYTES + (1 << 20) + 2 * PAGE,
            "{stored} bytes stored"
        );
        assert!(freed_to >= (40 << 20) - CONSOLE_CAP_BYTES - (1 << 20));
        assert_eq!(tail(&console, 1), "Agent port opened");
        // A reader's mark inside the kept tail reads exactly what followed it.
        let mut reader = std::fs::File::open(&console).expect("open");
        reader.seek(SeekFrom::Start(40 << 20)).expect("seek");
        let mut text = String::new();
        reader.read_to_string(&mut text).expect("read");
        assert_eq!(text, "\nAgent port opened\n");
        // Under the cap nothing happens.
        let small = dir.path().join("small.log");
        std::fs::write(&small, b"boot\n").expect("small");
        assert_eq!(bound_console(&small, 0).expect("bound"), 0);
    }
}
