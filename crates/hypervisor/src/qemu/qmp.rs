//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket.

use std::collections::VecDeque;
use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tracing::debug;

use crate::{HypervisorError, Result};

/// Longest QMP line we accept from QEMU.
const MAX_LINE: usize = 16 << 20;
/// Events kept for `take_events`/`wait_event`; beyond this the oldest are dropped. A guest
/// can make QEMU emit some events (ACPI `_OST` reports) as often as it likes.
const MAX_EVENTS: usize = 256;

/// An open QMP session, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
}

fn qmp_error(command: &str, message: impl Into<String>) -> HypervisorError {
    HypervisorError::Qmp {
        command: command.to_string(),
        message: message.into(),
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|err| qmp_error("connect", format!("{}: {err}", path.display())))?;
        let (read, write) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer: write,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_error(
                "greeting",
                format!("Unexpected greeting {greeting}"),
            ));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, command: &str) -> Result<Value> {
        let mut line = String::new();
        // At most MAX_LINE + 1 bytes are read into memory, however long the line.
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await
            .map_err(|err| qmp_error(command, format!("Read failed: {err}")))?;
        if n == 0 {
            return Err(qmp_error(command, "QEMU closed the QMP connection"));
        }
        if line.len() > MAX_LINE {
            return Err(qmp_error(command, "QMP message too long"));
        }
        serde_json::from_str(&line)
            .map_err(|err| qmp_error(command, format!("Malformed QMP message: {err}")))
    }

    /// Runs `command` with optional `arguments`; returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|err| qmp_error(command, format!("Write failed: {err}")))?;
        loop {
            let message = self.read_message(command).await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(qmp_error(command, desc));
            }
            if message.get("event").is_some() {
                debug!(event = %message, "QMP event");
                self.keep_event(message);
                continue;
            }
            return Err(qmp_error(command, format!("Unexpected message {message}")));
        }
    }

    /// Events received so far, at most the last [`MAX_EVENTS`] (and clears them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events).into()
    }

    /// Keeps `event`; beyond [`MAX_EVENTS`] the oldest event of the same name goes (else
    /// the oldest), so a flood of one event cannot push out the one a caller waits for.
    fn keep_event(&mut self, event: Value) {
        if self.events.len() >= MAX_EVENTS {
            let name = event.get("event");
            match self
                .events
                .iter()
                .position(|kept| kept.get("event") == name)
            {
                Some(index) => {
                    self.events.remove(index);
                }
                None => {
                    self.events.pop_front();
                }
            }
        }
        self.events.push_back(event);
    }

    /// Waits for an event named `name` whose `data` satisfies `matches`, looking first at
    /// events already received. Not cancel-safe: a caller that times out must drop the
    /// session.
    pub async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let is_match = |event: &Value| {
            event.get("event").and_then(Value::as_str) == Some(name)
                && matches(event.get("data").unwrap_or(&Value::Null))
        };
        if let Some(event) = self
            .events
            .iter()
            .position(is_match)
            .and_then(|index| self.events.remove(index))
        {
            return Ok(event);
        }
        loop {
            let message = self.read_message(name).await?;
            debug!(%message, "QMP message while waiting for an event");
            if is_match(&message) {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.keep_event(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// The fake QEMU's side of a session on `listener`, past the greeting and
    /// `qmp_capabilities`.
    async fn negotiated(
        listener: UnixListener,
    ) -> (tokio::io::Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greet");
        let caps = lines.next_line().await.expect("read").expect("line");
        assert!(caps.contains("qmp_capabilities"));
        write.write_all(b"{\"return\": {}}\n").await.expect("ret");
        (lines, write)
    }

    /// A fake QEMU that greets, accepts capabilities, emits an event, then answers.
    #[tokio::test]
    async fn negotiates_and_executes_skipping_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (mut lines, mut write) = negotiated(listener).await;
            let stop = lines.next_line().await.expect("read").expect("line");
            assert!(stop.contains("\"stop\""));
            write
                .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {}}\n")
                .await
                .expect("ret");
            let bad = lines.next_line().await.expect("read").expect("line");
            assert!(bad.contains("nonsense"));
            write
                .write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nonsense has not been found\"}}\n")
                .await
                .expect("err");
        });
        let mut qmp = Qmp::connect(&path).await.expect("connect");
        qmp.execute("stop", None).await.expect("stop");
        assert_eq!(qmp.take_events().len(), 1);
        let err = qmp.execute("nonsense", None).await.expect_err("error");
        assert!(err.to_string().contains("has not been found"), "{err}");
        server.await.expect("server");
    }

    /// A QEMU flooded with events by its guest, then sending a line longer than MAX_LINE.
    #[tokio::test]
    async fn events_are_capped_and_long_lines_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (mut lines, mut write) = negotiated(listener).await;
            lines.next_line().await.expect("read").expect("stop");
            let mut flood =
                String::from("{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d0\"}}\n");
            for n in 0..(MAX_EVENTS * 4) {
                flood.push_str(&format!(
                    "{{\"event\": \"ACPI_DEVICE_OST\", \"data\": {{\"n\": {n}}}}}\n"
                ));
            }
            flood.push_str("{\"return\": {}}\n");
            write.write_all(flood.as_bytes()).await.expect("flood");
            lines.next_line().await.expect("read").expect("cont");
            let long = vec![b' '; MAX_LINE + 10];
            // The client stops reading once it has refused the line.
            let _ = write.write_all(&long).await;
        });
        let mut qmp = Qmp::connect(&path).await.expect("connect");
        qmp.execute("stop", None).await.expect("stop");
        let events = qmp.take_events();
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(
            events.last().expect("last")["data"]["n"],
            MAX_EVENTS * 4 - 1,
            "the newest events are kept"
        );
        assert_eq!(
            events[0]["event"], "DEVICE_DELETED",
            "a flood of another event does not push it out"
        );
        let err = qmp.execute("cont", None).await.expect_err("too long");
        assert!(err.to_string().contains("too long"), "{err}");
        drop(qmp);
        server.await.expect("server");
    }
}
