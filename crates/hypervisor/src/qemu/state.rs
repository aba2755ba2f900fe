//! Saving and loading a VM's device state (QEMU migration to and from a file). Guest RAM
//! lives in a shared memory file and is skipped with `x-ignore-shared`, so the state holds
//! only device state: a few hundred KB.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cmdline::STATE_FD;
use super::Qemu;
use crate::{HypervisorError, Result};

/// How long a state load or save may take.
pub(super) const STATE_TIMEOUT: Duration = Duration::from_secs(30);

impl Qemu {
    async fn set_ignore_shared(&self) -> Result<()> {
        // QEMU 7.2 needs the capability on both the saving and the loading side.
        let capabilities = serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        });
        self.qmp("migrate-set-capabilities", Some(capabilities))
            .await
            .map(drop)
    }

    /// Pauses the VM and saves its device state to `path`.
    pub(super) async fn save_device_state(&self, path: &Path) -> Result<()> {
        let text = utf8_state_path(path)?;
        self.qmp("stop", None).await?;
        self.set_ignore_shared().await?;
        // QEMU runs `exec:` URIs with `/bin/sh -c`: quote the path for the shell.
        let uri = format!("exec:cat > {}", shell_quote(text));
        self.qmp("migrate", Some(serde_json::json!({ "uri": uri })))
            .await?;
        self.wait_for_migration(
            "migrate",
            "saving the device state",
            "Saving the device state failed",
            Duration::from_millis(1),
        )
        .await
    }

    /// Polls `query-migrate` every `poll` until the migration `command` started
    /// completed; fails when it failed or was cancelled (`failure`, with QEMU's reason),
    /// or after [`STATE_TIMEOUT`] (`what` names the work).
    async fn wait_for_migration(
        &self,
        command: &str,
        what: &str,
        failure: &str,
        poll: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        loop {
            let info = self.qmp("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let reason = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(HypervisorError::Qmp {
                        command: command.into(),
                        message: format!("{failure}: {reason}"),
                    });
                }
                _ => {}
            }
            if started.elapsed() > STATE_TIMEOUT {
                return Err(HypervisorError::Timeout {
                    what: what.into(),
                    seconds: STATE_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Loads the device state at `path` the way Kata does (see
    /// [`Qemu::start_incoming_kata_method`]).
    pub(super) async fn load_device_state_kata_method(&self, path: &Path) -> Result<()> {
        let text = utf8_state_path(path)?;
        self.set_ignore_shared().await?;
        let uri = format!("exec:cat {}", shell_quote(text));
        self.qmp("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await?;
        // Kata's `waitMigration` polls every 100 ms.
        self.wait_for_migration(
            "migrate-incoming",
            "loading the device state",
            "Loading the device state failed",
            Duration::from_millis(100),
        )
        .await
    }

    /// Loads the device state inherited as fd [`STATE_FD`] (see [`Qemu::start_incoming`]),
    /// or with `from_command_line` waits for the load QEMU started itself (vmfactory's
    /// QEMU, `-incoming fd:3`); the VM stays paused afterwards.
    pub(super) async fn load_device_state(&self, from_command_line: bool) -> Result<()> {
        if !from_command_line {
            self.set_ignore_shared().await?;
            let uri = format!("fd:{STATE_FD}");
            self.qmp("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
                .await?;
        }
        let started = Instant::now();
        loop {
            let status = self.qmp("query-status", None).await?;
            match status.get("status").and_then(Value::as_str) {
                Some("inmigrate") | None => {}
                Some(_) => return Ok(()),
            }
            if started.elapsed() > STATE_TIMEOUT {
                return Err(HypervisorError::Timeout {
                    what: "loading the device state".into(),
                    seconds: STATE_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

/// `path` as text for an `exec:` URI (QEMU takes URIs as UTF-8 strings).
fn utf8_state_path(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        HypervisorError::InvalidConfig(format!(
            "State path {} is not UTF-8: use a UTF-8 template_path",
            path.display()
        ))
    })
}

/// `text` as one POSIX shell word: single-quoted, each `'` written as `'\''`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("/it's"), r"'/it'\''s'");
        let quoted = shell_quote("/tmp/x\"y'z $HOME `id`\nw");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {quoted}"))
            .output()
            .expect("sh");
        assert_eq!(output.stdout, b"/tmp/x\"y'z $HOME `id`\nw");
    }
}
