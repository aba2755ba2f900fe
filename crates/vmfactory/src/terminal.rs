//! Our terminal while a guest process has one (`-t`): raw mode (restored however we
//! leave) and the window size, sent at start and on every SIGWINCH.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

/// Raw mode on standard input until dropped.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: file descriptor 0 is open for the life of the process; we never close it.
    unsafe { BorrowedFd::borrow_raw(0) }
}

impl RawMode {
    /// Puts our terminal (standard input) in raw mode, if it is a terminal.
    pub fn enable() -> Result<Option<Self>> {
        if !std::io::stdin().is_terminal() {
            return Ok(None);
        }
        let fd = stdin_fd();
        let saved = tcgetattr(fd).context("Cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(fd, OptionalActions::Now, &raw).context("Cannot set the terminal to raw mode")?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(stdin_fd(), OptionalActions::Now, &self.saved);
    }
}

/// Rows and columns of our terminal (standard output, else standard input), if any.
pub fn window_size() -> Option<(u16, u16)> {
    for fd in [std::io::stdout().as_fd(), std::io::stdin().as_fd()] {
        if let Ok(size) = tcgetwinsize(fd) {
            if size.ws_row > 0 && size.ws_col > 0 {
                return Some((size.ws_row, size.ws_col));
            }
        }
    }
    None
}
