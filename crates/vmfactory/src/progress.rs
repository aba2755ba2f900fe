//! Progress of long steps on stderr: a spinner or bar (indicatif) when stderr is a
//! terminal, plain `vmfactory: …` lines otherwise (logs, CI, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// One long step being shown.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    message: String,
    total: u64,
    shown: u64,
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
        }
    }

    /// Sets how many units are done.
    pub fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if done != self.shown => {
                eprintln!("vmfactory: {}: {done}/{}", self.message, self.total);
            }
            None => {}
        }
        self.shown = done;
    }

    /// Says what the step is doing now.
    pub fn set_message(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => eprintln!("vmfactory: {message}"),
        }
        self.message = message.to_string();
    }

    /// Ends the step with `message`.
    pub fn finish(self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None => eprintln!("vmfactory: {message}"),
        }
    }

    /// Ends the step without a message (it failed or was interrupted).
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
