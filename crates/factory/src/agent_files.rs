//! Copying files between the host and the guest through the agent (`CopyFile`,
//! `StatPath`, `ReadFile`), like `cp -a SRC DST`: a file, a symbolic link or a whole
//! directory tree, with permission bits and modification times kept (ownership and access
//! times are not). Content is streamed in chunks of [`FILE_CHUNK_SIZE`] both ways and
//! never held whole in memory (but a local file that reports no size, as `/proc`'s, read
//! first within [`MAX_UNSIZED_FILE`]). A file lands under a temporary name in its directory and is
//! renamed once complete, in the guest and on the host, so a broken copy leaves no partial
//! file. Devices, sockets and FIFOs are skipped (and counted).
//!
//! What the guest reports is untrusted: names it lists must be single path components,
//! and directories are created without following symbolic links.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD, UTIME_OMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};
use vmfactory_protocols::agent::{
    CopyFileRequest, FileKind, ReadFileRequest, StatPathRequest, StatPathResponse,
};
use vmfactory_protocols::contract::{FILE_CHUNK_SIZE, MAX_DIR_ENTRIES, MAX_UNSIZED_FILE};

use crate::agent_client::{rpc_error, AgentClient, AgentError};

/// Messages buffered between a local file and its `CopyFile` stream.
const SEND_DEPTH: usize = 4;
/// Permission bits that are copied into the guest.
const MODE_BITS: u32 = 0o7777;
/// Permission bits that are copied out of the guest: not setuid or setgid. The copy
/// belongs to the user running vmfactory (often root), so a guest's setuid file would
/// become a setuid program of that user on the host.
const MODE_BITS_OUT: u32 = 0o1777;

/// Temporary names of files being received are unique within this process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries inside the tree that could not be copied (the copy went on, as cp's does),
    /// each with why: the first [`MAX_FAILURES_KEPT`] of them.
    pub failures: Vec<String>,
    /// How many entries could not be copied in all.
    pub failed: u64,
    /// Regular files copied.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symbolic links copied.
    pub symlinks: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// Devices, sockets and FIFOs skipped.
    pub skipped: u64,
}

/// The most failure messages a copy keeps (it counts them all).
pub const MAX_FAILURES_KEPT: usize = 100;

/// What a copy's error says about the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFailure {
    /// One entry could not be copied (unreadable, gone, refused): inside a tree, the copy
    /// names it and goes on.
    Entry,
    /// The copy cannot go on (a full disk, a tree too wide), as cp's would not.
    Copy,
    /// The sandbox, its agent or vmfactory failed, not the copy (a lost connection, a
    /// guest that lists what an honest agent does not).
    Broken,
}

impl AgentError {
    /// What this error, met while copying, says about the copy.
    pub fn copy_failure(&self) -> CopyFailure {
        use tonic::Code;
        match self {
            AgentError::Local { source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS)
                ) =>
            {
                CopyFailure::Copy
            }
            AgentError::Local { .. } | AgentError::CopyEntry { .. } => CopyFailure::Entry,
            AgentError::Connect { .. }
            | AgentError::NotServing(_)
            | AgentError::Clock
            | AgentError::CopyBroken { .. } => CopyFailure::Broken,
            AgentError::Rpc { status, .. } => match status.code() {
                Code::NotFound
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::InvalidArgument
                | Code::AlreadyExists
                | Code::Internal => CopyFailure::Entry,
                Code::Unavailable
                | Code::Cancelled
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Aborted
                | Code::DataLoss => CopyFailure::Broken,
                _ => CopyFailure::Copy,
            },
            _ => CopyFailure::Copy,
        }
    }
}

impl CopyStats {
    /// Records `err` for an entry inside the tree and returns `Ok` to go on when it
    /// concerns that entry alone ([`CopyFailure::Entry`]); an error that ends the whole
    /// copy is returned.
    fn went_on(&mut self, err: AgentError) -> Result<(), AgentError> {
        if err.copy_failure() != CopyFailure::Entry {
            return Err(err);
        }
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES_KEPT {
            // With its cause: "Cannot read X: Permission denied", not "Cannot read X".
            let mut message = err.to_string();
            if let Some(source) = std::error::Error::source(&err) {
                message.push_str(&format!(": {source}"));
            }
            self.failures.push(message);
        }
        Ok(())
    }
}

/// Mode and modification time of an entry.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    mode: u32,
    mtime_sec: i64,
    mtime_nsec: u32,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            mode: meta.mode() & MODE_BITS,
            mtime_sec: meta.mtime(),
            mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }
    }

    fn of_guest(stat: &StatPathResponse) -> Self {
        Self {
            mode: stat.mode & MODE_BITS_OUT,
            mtime_sec: stat.mtime_sec,
            mtime_nsec: stat.mtime_nsec.min(999_999_999),
        }
    }

    fn request(&self, path: &str, kind: FileKind, container: &str) -> CopyFileRequest {
        CopyFileRequest {
            path: path.to_string(),
            container_id: container.to_string(),
            kind: kind as i32,
            mode: self.mode,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
            ..CopyFileRequest::default()
        }
    }
}

fn local_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::Local {
        action,
        path,
        source,
    }
}

/// As [`copy_error`], for a refusal that concerns that entry alone: inside a tree, the
/// copy names it and goes on.
fn entry_error(path: impl std::fmt::Display, reason: impl Into<String>) -> AgentError {
    AgentError::CopyEntry {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// As [`copy_error`], for a copy that cannot go on because the guest misbehaves or
/// vmfactory itself failed (not because of what was to be copied).
fn broken_error(path: impl std::fmt::Display, reason: impl Into<String>) -> AgentError {
    AgentError::CopyBroken {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn copy_error(path: impl std::fmt::Display, reason: impl Into<String>) -> AgentError {
    AgentError::Copy {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// `dir/name` for guest paths.
fn guest_join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// The last component of a guest path, if it has one.
fn guest_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty() && *name != "." && *name != "..")
}

/// Checks a name the guest listed in directory `dir`: one path component, after the
/// previous one (the agent lists a directory's names sorted, so a name listed twice,
/// anywhere in the listing, is refused).
fn checked_entry<'a>(
    dir: &str,
    name: &'a str,
    previous: Option<&str>,
) -> Result<&'a str, AgentError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
        || previous.is_some_and(|previous| previous >= name);
    if bad {
        return Err(broken_error(
            dir,
            format!("the guest listed the entry {name:?}, which is not a name in a directory; the guest may be compromised"),
        ));
    }
    Ok(name)
}

/// Refuses a guest directory listing longer than an honest agent sends.
fn checked_entry_count(dir: &str, count: usize) -> Result<(), AgentError> {
    if count > MAX_DIR_ENTRIES {
        return Err(broken_error(
            dir,
            format!("the guest listed {count} entries, more than the {MAX_DIR_ENTRIES} its agent may list; the guest may be compromised"),
        ));
    }
    Ok(())
}

/// A UTF-8 name of a local path (the agent API carries paths as strings).
fn local_name(path: &Path) -> Result<String, AgentError> {
    let name = match path.file_name() {
        Some(name) => name.to_os_string(),
        None => std::fs::canonicalize(path)
            .map_err(local_error("resolve", path))?
            .file_name()
            .map(ToOwned::to_owned)
            .ok_or_else(|| copy_error(path.display(), "name a file or directory, not /"))?,
    };
    name.into_string().map_err(|name| {
        entry_error(
            path.display(),
            format!("the name {name:?} is not UTF-8; rename it to copy it"),
        )
    })
}

/// Sets the mode (unless `None`, as for links) and modification time of local `path`,
/// without following a final symbolic link.
fn stamp_local(path: &Path, mode: Option<u32>, stamp: &Stamp) -> Result<(), AgentError> {
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(local_error("set the mode of", path))?;
    }
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: stamp.mtime_sec,
            tv_nsec: i64::from(stamp.mtime_nsec),
        },
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| local_error("set the modification time of", path)(err.into()))
}

/// Why a device, socket or FIFO named as what to copy is not copied.
const NOT_COPIED: &str = "a device, socket or FIFO: only files, directories and symbolic \
                          links are copied";

/// A copy replaces files whole (a temporary file renamed into place), so it refuses to
/// replace a local device, FIFO or socket at `path` (`/dev/null`, a terminal): that is not
/// a file to replace.
fn refuse_special(path: &Path) -> Result<(), AgentError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let file_type = meta.file_type();
    if file_type.is_file() || file_type.is_dir() || file_type.is_symlink() {
        return Ok(());
    }
    Err(entry_error(
        path.display(),
        "a device, FIFO or socket, which a copy does not replace: remove it first, or name \
         another path (to print a guest file, `sandbox exec ID -- cat PATH`)",
    ))
}

/// Where `copy_out` of `guest` (of kind `source`) to `local` writes, as cp: into
/// `local/<name of guest>` when `local` is a directory (or a link to one); for a file,
/// onto the file a link at `local` points at (replaced whole there, the link kept; a link
/// to nothing is refused); else `local` itself (a link copied onto a link replaces it, as
/// `cp -a` does). A device, FIFO or socket is refused.
fn local_target(local: &Path, guest: &str, source: FileKind) -> Result<PathBuf, AgentError> {
    let linked = std::fs::symlink_metadata(local).is_ok_and(|meta| meta.file_type().is_symlink());
    let (file, directory) = (source == FileKind::File, source == FileKind::Directory);
    match std::fs::metadata(local) {
        Ok(meta) if meta.is_dir() => {
            let name = guest_name(guest)
                .ok_or_else(|| copy_error(guest, "name a file or directory in the guest"))?;
            Ok(local.join(name))
        }
        Ok(_) if linked && file => {
            let resolved =
                std::fs::canonicalize(local).map_err(local_error("resolve the link", local))?;
            refuse_special(&resolved)?;
            Ok(resolved)
        }
        Ok(_) => {
            refuse_special(local)?;
            Ok(local.to_path_buf())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && linked && file => {
            Err(copy_error(
                local.display(),
                "a symbolic link to nothing: not copying through it; remove it first, or name \
             another path",
            ))
        }
        // `cp FILE DIR/` wants DIR to be there, as cp does (a directory copied there is
        // made).
        Err(err)
            if err.kind() == std::io::ErrorKind::NotFound
                && local.as_os_str().as_encoded_bytes().ends_with(b"/")
                && !directory =>
        {
            Err(copy_error(
                local.display(),
                "no such directory here; create it first, or leave out the trailing / to \
                 name the file to make",
            ))
        }
        Err(_) => Ok(local.to_path_buf()),
    }
}

/// A local temporary file next to its final path, removed unless renamed into place.
#[derive(Debug)]
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn next_to(path: &Path) -> Self {
        let parent = path.parent().unwrap_or(Path::new("."));
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let name = format!(".vmfactory-copy.{}.{n}", std::process::id());
        Self {
            path: Some(parent.join(name)),
        }
    }

    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    fn persist(mut self, path: &Path) -> Result<(), AgentError> {
        refuse_special(path)?;
        let temp = self.path.take().unwrap_or_default();
        std::fs::rename(&temp, path).map_err(|err| {
            let _ = std::fs::remove_file(&temp);
            local_error("replace", path)(err)
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One step of a depth-first copy: enter an entry, or stamp a finished directory (its
/// time is set after its content, which changes it).
#[derive(Debug)]
enum Step {
    Enter {
        local: PathBuf,
        guest: String,
    },
    Leave {
        local: PathBuf,
        guest: String,
        stamp: Stamp,
    },
}

impl Step {
    /// Bytes of the paths the step holds.
    fn path_bytes(&self) -> usize {
        match self {
            Step::Enter { local, guest } | Step::Leave { local, guest, .. } => {
                local.as_os_str().len() + guest.len()
            }
        }
    }
}

/// Most bytes of paths `copy_out` keeps for the steps still to take. An honest tree
/// stays far below: a walk holds the siblings still to copy along its current path.
const MAX_PENDING_PATH_BYTES: usize = 256 << 20;

impl AgentClient {
    /// Copies local `local` (a file, symbolic link or directory tree) into the guest, like
    /// `cp -a local guest`: into `guest/<name of local>` when `guest` is a directory, else
    /// to `guest` (whose parent must exist).
    pub async fn copy_in(&self, local: &Path, guest: &str) -> Result<CopyStats, AgentError> {
        let mut stats = CopyStats::default();
        self.copy_in_counting(local, guest, &mut stats).await?;
        Ok(stats)
    }

    /// [`Self::copy_in`], counting into `stats`, which keeps what was done (and what
    /// failed inside the tree) when the copy ends with an error.
    pub async fn copy_in_counting(
        &self,
        local: &Path,
        guest: &str,
        stats: &mut CopyStats,
    ) -> Result<(), AgentError> {
        // Inside a tree such an entry is skipped and counted; named, it is an error.
        if std::fs::symlink_metadata(local).is_ok_and(|meta| {
            let kind = meta.file_type();
            !(kind.is_file() || kind.is_dir() || kind.is_symlink())
        }) {
            return Err(copy_error(local.display(), NOT_COPIED));
        }
        // A final symbolic link is followed, as cp does: into the directory it points at,
        // or, for a file, onto the file (replaced whole there, the link kept). A link
        // copied onto a link replaces it, as `cp -a` does.
        let file = std::fs::symlink_metadata(local).is_ok_and(|meta| meta.is_file());
        let target = match self.stat_if_exists(guest, true).await? {
            Some(stat) if stat.kind == FileKind::Directory as i32 => {
                guest_join(guest, &local_name(local)?)
            }
            Some(stat) if stat.kind == FileKind::Other as i32 => {
                return Err(copy_error(
                    guest,
                    "a device, FIFO or socket in the guest, which a copy does not replace: \
                     remove it first, or name another path",
                ))
            }
            Some(stat) if file && !stat.resolved_path.is_empty() => stat.resolved_path,
            None if file
                && self
                    .stat_if_exists(guest, false)
                    .await?
                    .is_some_and(|stat| stat.kind == FileKind::Symlink as i32) =>
            {
                return Err(copy_error(
                    guest,
                    "a symbolic link to nothing in the guest: not copying through it; remove \
                     it first, or name another path",
                ))
            }
            // `cp FILE DIR/` wants DIR to be there, as cp does: a trailing slash names a
            // directory, never the file to make (a directory copied there is made).
            None if guest.ends_with('/') && !guest.trim_end_matches('/').is_empty() => {
                let is_dir = std::fs::symlink_metadata(local).is_ok_and(|meta| meta.is_dir());
                if !is_dir {
                    return Err(copy_error(
                        guest,
                        "no such directory in the guest; create it first, or leave out the \
                         trailing / to name the file to make",
                    ));
                }
                guest.to_string()
            }
            _ => guest.to_string(),
        };
        let mut steps = vec![Step::Enter {
            local: local.to_path_buf(),
            guest: target,
        }];
        // The entry named fails the copy; one inside its tree is reported and skipped.
        let mut top = true;
        while let Some(step) = steps.pop() {
            let done = match step {
                Step::Enter { local, guest } => {
                    self.send_entry(&local, &guest, &mut steps, stats).await
                }
                Step::Leave { guest, stamp, .. } => {
                    self.send_whole(stamp.request(
                        &guest,
                        FileKind::Directory,
                        self.files_container(),
                    ))
                    .await
                }
            };
            match done {
                Err(err) if !std::mem::take(&mut top) => stats.went_on(err)?,
                other => {
                    top = false;
                    other?;
                }
            }
        }
        info!(local = %local.display(), guest, ?stats, "Copied into the guest");
        Ok(())
    }

    /// Sends one local entry; a directory's children become new steps.
    async fn send_entry(
        &self,
        local: &Path,
        guest: &str,
        steps: &mut Vec<Step>,
        stats: &mut CopyStats,
    ) -> Result<(), AgentError> {
        let meta = tokio::fs::symlink_metadata(local)
            .await
            .map_err(local_error("read", local))?;
        let stamp = Stamp::of(&meta);
        let file_type = meta.file_type();
        if file_type.is_file() {
            stats.bytes += self.send_file(local, guest, stamp).await?;
            stats.files += 1;
        } else if file_type.is_symlink() {
            let target = tokio::fs::read_link(local)
                .await
                .map_err(local_error("read the link", local))?;
            let target = target.into_os_string().into_string().map_err(|target| {
                entry_error(
                    local.display(),
                    format!("the link target {target:?} is not UTF-8"),
                )
            })?;
            let mut request = stamp.request(guest, FileKind::Symlink, self.files_container());
            request.link_target = target;
            self.send_whole(request).await?;
            stats.symlinks += 1;
        } else if file_type.is_dir() {
            // Writable by us until its own turn comes after its content.
            let mut request = stamp.request(guest, FileKind::Directory, self.files_container());
            request.mode |= 0o700;
            self.send_whole(request).await?;
            stats.dirs += 1;
            steps.push(Step::Leave {
                local: local.to_path_buf(),
                guest: guest.to_string(),
                stamp,
            });
            let mut names = Vec::new();
            let mut entries = tokio::fs::read_dir(local)
                .await
                .map_err(local_error("list", local))?;
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(local_error("list", local))?
            {
                names.push(local_name(&entry.path())?);
            }
            names.sort_unstable();
            // Popped from the end: push in reverse for name order.
            for name in names.into_iter().rev() {
                steps.push(Step::Enter {
                    local: local.join(&name),
                    guest: guest_join(guest, &name),
                });
            }
        } else {
            // Counted and said at the end; named with -v (a warning line would cut
            // through a progress line).
            info!(path = %local.display(), "Skipping a device, socket or FIFO");
            stats.skipped += 1;
        }
        Ok(())
    }

    /// Streams local file `local` to `guest`; returns its size.
    async fn send_file(&self, local: &Path, guest: &str, stamp: Stamp) -> Result<u64, AgentError> {
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(local)
            .await
            .map_err(local_error("open", local))?;
        let size = file
            .metadata()
            .await
            .map_err(local_error("read", local))?
            .len();
        // A file that reports no size may still hold something (`/proc/cpuinfo`): it is
        // read to its end first, within MAX_UNSIZED_FILE, as a copy out takes it.
        let (size, mut file): (u64, Box<dyn tokio::io::AsyncRead + Unpin + Send>) = if size == 0 {
            let mut content = Vec::new();
            (&mut file)
                .take(MAX_UNSIZED_FILE + 1)
                .read_to_end(&mut content)
                .await
                .map_err(local_error("read", local))?;
            if content.len() as u64 > MAX_UNSIZED_FILE {
                return Err(entry_error(
                    local.display(),
                    format!(
                        "it reports no size but holds more than {} MiB; copy a regular file",
                        MAX_UNSIZED_FILE >> 20
                    ),
                ));
            }
            (
                content.len() as u64,
                Box::new(std::io::Cursor::new(content)),
            )
        } else {
            (size, Box::new(file))
        };
        let mut first = stamp.request(guest, FileKind::File, self.files_container());
        first.size = size;
        let (tx, rx) = mpsc::channel(SEND_DEPTH);
        let counting = self.clone();
        // Reads as fast as the agent takes the chunks; stops at `size` bytes.
        let feeder = tokio::spawn(async move {
            let mut message = first;
            let mut left = size;
            loop {
                let mut chunk =
                    vec![0u8; FILE_CHUNK_SIZE.min(usize::try_from(left).unwrap_or(usize::MAX))];
                let mut filled = 0;
                while filled < chunk.len() {
                    match file.read(&mut chunk[filled..]).await? {
                        0 => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the file shrank while it was copied; copy it again",
                            ))
                        }
                        n => filled += n,
                    }
                }
                left -= filled as u64;
                message.data = chunk;
                if tx.send(message).await.is_err() {
                    return Ok(()); // The call ended; its status says why.
                }
                counting.count_copied(filled as u64);
                if left == 0 {
                    return Ok(());
                }
                message = CopyFileRequest::default();
            }
        });
        let sent = self.inner.clone().copy_file(ReceiverStream::new(rx)).await;
        match feeder.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(local_error("read", local)(err)),
            Err(err) => {
                return Err(broken_error(
                    local.display(),
                    format!("the reader failed: {err}"),
                ))
            }
        }
        sent.map_err(rpc_error("CopyFile"))?;
        debug!(local = %local.display(), guest, size, "Copied a file into the guest");
        Ok(size)
    }

    /// Sends a `CopyFile` stream of one message.
    async fn send_whole(&self, request: CopyFileRequest) -> Result<(), AgentError> {
        self.inner
            .clone()
            .copy_file(tokio_stream::iter(vec![request]))
            .await
            .map_err(rpc_error("CopyFile"))?;
        Ok(())
    }

    /// Describes guest path `path` (a final symbolic link is not followed unless
    /// `follow`); for a directory, lists its names.
    async fn stat_guest(&self, path: &str, follow: bool) -> Result<StatPathResponse, AgentError> {
        let request = StatPathRequest {
            path: path.to_string(),
            container_id: self.files_container().to_string(),
            follow,
        };
        Ok(self
            .inner
            .clone()
            .stat_path(request)
            .await
            .map_err(rpc_error("StatPath"))?
            .into_inner())
    }

    /// As [`Self::stat_guest`], `None` when nothing is there.
    async fn stat_if_exists(
        &self,
        path: &str,
        follow: bool,
    ) -> Result<Option<StatPathResponse>, AgentError> {
        match self.stat_guest(path, follow).await {
            Ok(stat) => Ok(Some(stat)),
            Err(AgentError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Copies guest path `guest` (a file, symbolic link or directory tree) to the host,
    /// like `cp -a guest local`: into `local/<name of guest>` when `local` is a directory,
    /// else to `local` (whose parent must exist).
    pub async fn copy_out(&self, guest: &str, local: &Path) -> Result<CopyStats, AgentError> {
        let mut stats = CopyStats::default();
        self.copy_out_counting(guest, local, &mut stats).await?;
        Ok(stats)
    }

    /// [`Self::copy_out`], counting into `stats`, which keeps what was done (and what
    /// failed inside the tree) when the copy ends with an error.
    pub async fn copy_out_counting(
        &self,
        guest: &str,
        local: &Path,
        stats: &mut CopyStats,
    ) -> Result<(), AgentError> {
        let stat = self.stat_guest(guest, false).await?;
        // Inside a tree such an entry is skipped and counted; named, it is an error.
        if stat.kind == FileKind::Other as i32 {
            return Err(copy_error(guest, NOT_COPIED));
        }
        let kind = FileKind::try_from(stat.kind).unwrap_or(FileKind::Unspecified);
        let target = local_target(local, guest, kind)?;
        let mut steps = Vec::new();
        self.receive_entry(guest, &target, stat, &mut steps, stats)
            .await?;
        // The paths of the steps still to take: a guest listing wide directories at every
        // level (each listing within bounds) must not make the host's pending walk grow
        // without end.
        let mut pending_bytes: usize = steps.iter().map(Step::path_bytes).sum();
        while let Some(step) = steps.pop() {
            pending_bytes = pending_bytes.saturating_sub(step.path_bytes());
            match step {
                Step::Enter { local, guest } => {
                    // One inside the tree that fails is reported and skipped, as by cp.
                    let before = steps.len();
                    let received = match self.stat_guest(&guest, false).await {
                        Ok(stat) => {
                            self.receive_entry(&guest, &local, stat, &mut steps, stats)
                                .await
                        }
                        Err(err) => Err(err),
                    };
                    if let Err(err) = received {
                        stats.went_on(err)?;
                    }
                    pending_bytes += steps[before..].iter().map(Step::path_bytes).sum::<usize>();
                    if pending_bytes > MAX_PENDING_PATH_BYTES {
                        return Err(copy_error(
                            &guest,
                            format!(
                                "the tree is too wide to copy in one go (over {} MiB of paths \
                                 waiting to be copied); copy its subdirectories one by one, or \
                                 archive it in the guest first",
                                MAX_PENDING_PATH_BYTES >> 20
                            ),
                        ));
                    }
                }
                Step::Leave { local, stamp, .. } => {
                    if let Err(err) = stamp_local(&local, Some(stamp.mode), &stamp) {
                        stats.went_on(err)?;
                    }
                }
            }
        }
        info!(guest, local = %local.display(), ?stats, "Copied out of the guest");
        Ok(())
    }

    /// Receives one guest entry described by `stat`; a directory's children become steps.
    async fn receive_entry(
        &self,
        guest: &str,
        local: &Path,
        stat: StatPathResponse,
        steps: &mut Vec<Step>,
        stats: &mut CopyStats,
    ) -> Result<(), AgentError> {
        let stamp = Stamp::of_guest(&stat);
        match FileKind::try_from(stat.kind).unwrap_or(FileKind::Unspecified) {
            FileKind::File => {
                stats.bytes += self.receive_file(guest, local, &stamp, stat.size).await?;
                stats.files += 1;
            }
            FileKind::Symlink => {
                if stat.link_target.is_empty() || stat.link_target.contains('\0') {
                    return Err(broken_error(
                        guest,
                        "the guest reported an invalid link target",
                    ));
                }
                let temp = TempFile::next_to(local);
                std::os::unix::fs::symlink(&stat.link_target, temp.path())
                    .map_err(local_error("create a link next to", local))?;
                stamp_local(temp.path(), None, &stamp)?;
                temp.persist(local)?;
                stats.symlinks += 1;
            }
            FileKind::Directory => {
                make_local_dir(local, stamp.mode | 0o700)?;
                stats.dirs += 1;
                steps.push(Step::Leave {
                    local: local.to_path_buf(),
                    guest: guest.to_string(),
                    stamp,
                });
                checked_entry_count(guest, stat.entries.len())?;
                let mut previous: Option<&str> = None;
                let mut children = Vec::with_capacity(stat.entries.len());
                for name in &stat.entries {
                    previous = Some(checked_entry(guest, name, previous)?);
                    children.push(Step::Enter {
                        local: local.join(name),
                        guest: guest_join(guest, name),
                    });
                }
                steps.extend(children.into_iter().rev());
            }
            FileKind::Other | FileKind::Unspecified => {
                info!(
                    path = guest,
                    "Skipping a device, socket or FIFO in the guest"
                );
                stats.skipped += 1;
            }
        }
        Ok(())
    }

    /// Streams guest file `guest` into local `local`; returns the bytes received.
    async fn receive_file(
        &self,
        guest: &str,
        local: &Path,
        stamp: &Stamp,
        size: u64,
    ) -> Result<u64, AgentError> {
        refuse_beyond_free_space(guest, local, size)?;
        let mut stream = self
            .inner
            .clone()
            .read_file(ReadFileRequest {
                path: guest.to_string(),
                container_id: self.files_container().to_string(),
            })
            .await
            .map_err(rpc_error("ReadFile"))?
            .into_inner();
        let temp = TempFile::next_to(local);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp.path())
            .await
            .map_err(local_error("create a file next to", local))?;
        // The file as it was when it was listed: what a guest sends beyond that size (a
        // file still being written, or a guest that never stops) is not taken. A file
        // without a size (in /proc, /sys) is taken to its end, within MAX_UNSIZED_FILE.
        let size = if size > 0 { size } else { MAX_UNSIZED_FILE };
        let mut received = 0u64;
        while received < size {
            let Some(chunk) = stream.message().await.map_err(rpc_error("ReadFile"))? else {
                break;
            };
            let take = usize::try_from(size - received)
                .map_or(chunk.data.len(), |left| left.min(chunk.data.len()));
            file.write_all(&chunk.data[..take])
                .await
                .map_err(local_error("write", local))?;
            received += take as u64;
            self.count_copied(take as u64);
        }
        drop(stream);
        file.flush().await.map_err(local_error("write", local))?;
        drop(file);
        stamp_local(temp.path(), Some(stamp.mode), stamp)?;
        temp.persist(local)?;
        debug!(guest, local = %local.display(), received, "Copied a file out of the guest");
        Ok(received)
    }
}

/// Refuses a guest file of `size` bytes bigger than the room left where `local` goes: a
/// sparse file of exabytes costs the guest nothing, and is refused before a byte is
/// written.
fn refuse_beyond_free_space(guest: &str, local: &Path, size: u64) -> Result<(), AgentError> {
    let parent = match local.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let Ok(fs) = rustix::fs::statvfs(parent) else {
        return Ok(());
    };
    // Root may also fill the blocks kept for it.
    let blocks = if rustix::process::geteuid().is_root() {
        fs.f_bfree
    } else {
        fs.f_bavail
    };
    let room = blocks.saturating_mul(fs.f_frsize);
    if size > room {
        return Err(copy_error(
            guest,
            format!(
                "it is {size} bytes, more than the {room} bytes free in {}; free space or \
                 copy it elsewhere",
                parent.display()
            ),
        ));
    }
    Ok(())
}

/// Creates local directory `path`, or keeps it if it is one (not a link to one).
fn make_local_dir(path: &Path, mode: u32) -> Result<(), AgentError> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let is_dir = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir());
            if !is_dir {
                return Err(entry_error(
                    path.display(),
                    "something other than a directory is in the way; remove it first",
                ));
            }
        }
        Err(err) => return Err(local_error("create the directory", path)(err)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(local_error("set the mode of", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_files_lose_setuid_and_setgid_on_the_host() {
        let stamp = |mode| {
            Stamp::of_guest(&StatPathResponse {
                mode,
                ..StatPathResponse::default()
            })
            .mode
        };
        assert_eq!(stamp(0o104755), 0o755);
        assert_eq!(stamp(0o2750), 0o750);
        assert_eq!(stamp(0o41777), 0o1777);
        assert_eq!(stamp(0o640), 0o640);
    }

    #[test]
    fn guest_paths_join_and_name() {
        assert_eq!(guest_join("/", "a"), "/a");
        assert_eq!(guest_join("/tmp/", "a"), "/tmp/a");
        assert_eq!(guest_name("/tmp/dir/"), Some("dir"));
        assert_eq!(guest_name("/"), None);
        assert_eq!(guest_name("/a/.."), None);
    }

    #[test]
    fn guest_entries_must_be_plain_names() {
        assert!(checked_entry("/d", "ok.txt", None).is_ok());
        for bad in ["", ".", "..", "a/b", "../etc", "a\0b"] {
            let err = checked_entry("/d", bad, None).expect_err(bad);
            assert!(err.to_string().contains("Cannot copy /d"), "{err}");
        }
        assert!(checked_entry("/d", "x", Some("x")).is_err(), "duplicate");
        // Names come sorted: one out of order (a name listed again further on, say "a",
        // "b", "a") is refused.
        assert!(checked_entry("/d", "b", Some("a")).is_ok());
        assert!(checked_entry("/d", "a", Some("b")).is_err(), "out of order");
        assert!(checked_entry_count("/d", MAX_DIR_ENTRIES).is_ok());
        let err = checked_entry_count("/d", MAX_DIR_ENTRIES + 1).expect_err("too many");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn local_names_and_stamps() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(local_name(Path::new("/")).is_err());
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        let stamp = Stamp {
            mode: 0o604,
            mtime_sec: 1_234_567_890,
            mtime_nsec: 5,
        };
        stamp_local(&file, Some(stamp.mode), &stamp).expect("stamp");
        let meta = std::fs::metadata(&file).expect("stat");
        assert_eq!(meta.mode() & MODE_BITS, 0o604);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_234_567_890, 5));
        assert_eq!(local_name(&file).expect("name"), "f");
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).expect("link");
        assert!(
            make_local_dir(&link, 0o755).is_err(),
            "a link is not a directory"
        );
        make_local_dir(&dir.path().join("d"), 0o755).expect("mkdir");
        make_local_dir(&dir.path().join("d"), 0o750).expect("existing");
    }

    #[test]
    fn copy_errors_are_an_entry_s_the_copy_s_or_the_sandbox_s() {
        let rpc = |code| AgentError::Rpc {
            rpc: "ReadFile",
            status: tonic::Status::new(code, "x"),
        };
        let local = |errno| AgentError::Local {
            action: "read",
            path: "f".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        for (err, failure) in [
            (local(libc::EACCES), CopyFailure::Entry),
            (local(libc::ENOSPC), CopyFailure::Copy),
            (entry_error("f", "in the way"), CopyFailure::Entry),
            (copy_error("f", "too wide"), CopyFailure::Copy),
            (broken_error("d", "compromised"), CopyFailure::Broken),
            (rpc(tonic::Code::NotFound), CopyFailure::Entry),
            (rpc(tonic::Code::Internal), CopyFailure::Entry),
            (rpc(tonic::Code::ResourceExhausted), CopyFailure::Copy),
            (rpc(tonic::Code::Unavailable), CopyFailure::Broken),
            (rpc(tonic::Code::Unimplemented), CopyFailure::Broken),
            (AgentError::NotServing(2), CopyFailure::Broken),
        ] {
            assert_eq!(err.copy_failure(), failure, "{err}");
        }
    }
}
