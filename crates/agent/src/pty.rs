//! Pseudo-terminals for terminal processes: a master/slave pair from `/dev/ptmx` (devpts
//! must be mounted on `/dev/pts`), its window size, and its end-of-file character.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{SpecialCodeIndex, Winsize};

/// Rows of a terminal whose request gave 0.
pub const DEFAULT_ROWS: u16 = 24;
/// Columns of a terminal whose request gave 0.
pub const DEFAULT_COLS: u16 = 80;
/// The usual VEOF character (Ctrl-D), used when the terminal's own cannot be read.
const CTRL_D: u8 = 0x04;

/// Errors of pseudo-terminal operations.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// No pseudo-terminal pair could be opened.
    #[error("Cannot open a pseudo-terminal (is devpts mounted on /dev/pts?)")]
    Open(#[source] std::io::Error),
    /// The window size could not be set.
    #[error("Cannot set the terminal size to {rows}x{cols}")]
    Size {
        /// Rows asked for.
        rows: u16,
        /// Columns asked for.
        cols: u16,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The pseudo-terminal could not be made non-blocking.
    #[error("Cannot make the pseudo-terminal non-blocking")]
    NonBlocking(#[source] std::io::Error),
}

/// A pseudo-terminal pair: the master stays in the agent, the slave goes to the child.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end: reads the terminal's output, writes its input.
    pub master: OwnedFd,
    /// The child's end: its standard input, output, error and controlling terminal.
    pub slave: OwnedFd,
}

/// Opens a new pseudo-terminal of `rows` x `cols`. Neither end becomes the agent's
/// controlling terminal, and neither is inherited by other children.
pub fn open(rows: u16, cols: u16) -> Result<Pty, PtyError> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags).map_err(|err| PtyError::Open(err.into()))?;
    rustix::pty::grantpt(&master).map_err(|err| PtyError::Open(err.into()))?;
    rustix::pty::unlockpt(&master).map_err(|err| PtyError::Open(err.into()))?;
    // TIOCGPTPEER (Linux 4.13+) opens the slave without a path lookup; the name is the
    // fallback.
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(slave) => slave,
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())
                .map_err(|err| PtyError::Open(err.into()))?;
            let oflags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC;
            rustix::fs::open(name.as_c_str(), oflags, Mode::empty())
                .map_err(|err| PtyError::Open(err.into()))?
        }
    };
    resize(&master, rows, cols)?;
    Ok(Pty { master, slave })
}

/// Sets the window size; the kernel sends SIGWINCH to the terminal's foreground group.
pub fn resize(master: impl AsFd, rows: u16, cols: u16) -> Result<(), PtyError> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, size).map_err(|err| PtyError::Size {
        rows,
        cols,
        source: err.into(),
    })
}

/// The terminal's end-of-file character (VEOF, normally Ctrl-D).
pub fn eof_char(master: impl AsFd) -> u8 {
    rustix::termios::tcgetattr(master)
        .map(|termios| termios.special_codes[SpecialCodeIndex::VEOF])
        .ok()
        .filter(|&c| c != 0)
        .unwrap_or(CTRL_D)
}

/// A duplicate of `fd` in non-blocking mode, for the async runtime. Duplicates share the
/// open file, so the mode applies to every one of them.
pub fn nonblocking_dup(fd: &OwnedFd) -> Result<OwnedFd, PtyError> {
    let dup = fd.try_clone().map_err(PtyError::NonBlocking)?;
    rustix::io::ioctl_fionbio(&dup, true).map_err(|err| PtyError::NonBlocking(err.into()))?;
    Ok(dup)
}
