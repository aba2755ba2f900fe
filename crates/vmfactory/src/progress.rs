//! Progress of long steps on stderr: a spinner or bar (indicatif) when stderr is a
//! terminal, plain `vmfactory: …` lines otherwise (logs, CI, pipes). Plain lines of one
//! stage (the same text before a `:`, or counts of one bar) come at most every
//! [`PLAIN_INTERVAL`], so a kernel build logs a few dozen lines, not hundreds.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Least time between two plain lines of the same stage.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// The stage a message belongs to: its text before the first `:`.
fn stage(message: &str) -> &str {
    message.split(':').next().unwrap_or(message)
}

/// Whether a plain line for `message` is due, after `last` (the last line's stage and
/// time).
fn plain_due(last: Option<(&str, Instant)>, message: &str, now: Instant) -> bool {
    match last {
        Some((shown, at)) => stage(shown) != stage(message) || now - at >= PLAIN_INTERVAL,
        None => true,
    }
}

use indicatif::{ProgressBar, ProgressStyle};

/// One long step being shown.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    message: String,
    total: u64,
    shown: u64,
    /// The last plain line and when it was printed.
    last_line: Option<(String, Instant)>,
}

impl Progress {
    /// A step of unknown length, shown with a spinner and the time spent.
    pub fn spinner(message: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.set_message(message.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if bar.is_none() {
            eprintln!("vmfactory: {message}");
        }
        Self {
            bar,
            message: message.to_string(),
            total: 0,
            shown: 0,
            last_line: Some((message.to_string(), Instant::now())),
        }
    }

    /// A step of `total` units, shown with a bar.
    pub fn bar(message: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(message.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if bar.is_none() {
            eprintln!("vmfactory: {message}: 0/{total}");
        }
        Self {
            bar,
            message: message.to_string(),
            total,
            shown: 0,
            last_line: Some((message.to_string(), Instant::now())),
        }
    }

    /// Sets how many units are done.
    pub fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if done != self.shown => {
                let line = format!("{}: {done}/{}", self.message, self.total);
                if done >= self.total || self.plain_due(&line) {
                    self.plain(line);
                }
            }
            None => {}
        }
        self.shown = done;
    }

    /// Says what the step is doing now.
    pub fn set_message(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None if self.plain_due(message) => self.plain(message.to_string()),
            None => {}
        }
        self.message = message.to_string();
    }

    fn plain_due(&self, message: &str) -> bool {
        let last = self.last_line.as_ref().map(|(m, at)| (m.as_str(), *at));
        plain_due(last, message, Instant::now())
    }

    fn plain(&mut self, line: String) {
        eprintln!("vmfactory: {line}");
        self.last_line = Some((line, Instant::now()));
    }

    /// Ends the step with `message`.
    pub fn finish(self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None => eprintln!("vmfactory: {message}"),
        }
    }

    /// Ends the step and removes its line from the terminal.
    pub fn clear(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Ends the step without a message (it failed or was interrupted).
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_of_one_stage_are_spaced_and_new_stages_shown_at_once() {
        let start = Instant::now();
        let soon = start + Duration::from_secs(1);
        let later = start + PLAIN_INTERVAL;
        let last = Some(("Compiling the kernel: 10 objects", start));
        assert!(!plain_due(last, "Compiling the kernel: 20 objects", soon));
        assert!(plain_due(last, "Compiling the kernel: 900 objects", later));
        assert!(plain_due(last, "Linking vmlinux", soon));
        assert!(plain_due(None, "Compiling the kernel: 10 objects", soon));
        assert!(!plain_due(Some(("Files: 1/9", start)), "Files: 2/9", soon));
    }
}
