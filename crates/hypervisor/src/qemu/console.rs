//! What QEMU and the guest console said last, quoted in errors.

use std::path::Path;

use super::cmdline::VmPaths;

/// Lines of QEMU's stderr and of the console quoted when QEMU dies.
const REPORT_LINES: usize = 15;

/// The last `n` lines of a file, or an empty string.
fn tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
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
