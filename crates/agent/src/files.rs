//! Files for the host: `CopyFile` creates one file, directory or symbolic link from a
//! stream (a file under a temporary name, renamed once complete), `StatPath` describes a
//! path and lists a directory, `ReadFile` streams a regular file. Content is streamed in
//! chunks both ways and never held whole in the agent. Paths come from the host and are
//! checked: absolute, no NUL, no `.` or `..` component, bounded length.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD, UTIME_OMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::debug;
use vmfactory_protocols::agent::{CopyFileRequest, FileKind, ReadFileResponse, StatPathResponse};
use vmfactory_protocols::contract::{
    FILE_CHUNK_SIZE, MAX_DIR_ENTRIES, MAX_DIR_ENTRY_BYTES as MAX_ENTRY_BYTES, MAX_UNSIZED_FILE,
};

use crate::process::STREAM_DEPTH;

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Permission bits a copied entry may carry.
const MODE_BITS: u32 = 0o7777;

/// Temporary names of files being received are unique within the agent's life.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// A gRPC status for `err` while doing `action` on `path`, with the code that says why
/// and a hint of what to do.
fn io_status(action: &str, path: &Path, err: &io::Error) -> Status {
    let what = format!("Cannot {action} {}: {err}", path.display());
    match err.raw_os_error().unwrap_or(0) {
        libc::ENOENT => {
            Status::not_found(format!("{what}; check that the path exists in the guest"))
        }
        libc::ENOTDIR => Status::failed_precondition(format!(
            "{what}; a component of the path is not a directory"
        )),
        libc::EISDIR => Status::failed_precondition(format!(
            "{what}; remove the directory first or copy into it"
        )),
        libc::ENOSPC | libc::EDQUOT => Status::resource_exhausted(format!(
            "{what}; free space in the guest or give it more memory"
        )),
        libc::EACCES | libc::EPERM | libc::EROFS => {
            Status::permission_denied(format!("{what}; check the permissions"))
        }
        libc::EEXIST => Status::already_exists(what),
        libc::ENAMETOOLONG | libc::ELOOP => Status::invalid_argument(what),
        _ => Status::internal(what),
    }
}

/// Checks a path from the host and returns it normalized (no repeated or trailing '/').
fn guest_path(path: &str) -> Result<PathBuf, Status> {
    if !path.starts_with('/') {
        return Err(Status::invalid_argument(format!(
            "Path {path:?} is not absolute: give the full path in the guest"
        )));
    }
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "Invalid path {:?}: at most {MAX_PATH} bytes without NUL",
            path.chars().take(100).collect::<String>()
        )));
    }
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err(Status::invalid_argument(format!(
            "Path {path:?} has a '.' or '..' component: give it without them"
        )));
    }
    Ok(Path::new(path).components().collect())
}

/// Checks a mode and modification time from the host.
fn checked_times(request: &CopyFileRequest, path: &Path) -> Result<Timestamps, Status> {
    if request.mode & !MODE_BITS != 0 {
        return Err(Status::invalid_argument(format!(
            "Invalid mode {:o} for {}: give permission bits only (07777)",
            request.mode,
            path.display()
        )));
    }
    if request.mtime_nsec >= 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "Invalid mtime_nsec {} for {}: it must be below 1000000000",
            request.mtime_nsec,
            path.display()
        )));
    }
    Ok(Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: request.mtime_sec,
            tv_nsec: i64::from(request.mtime_nsec),
        },
    })
}

/// Where paths of a file operation are resolved: the VM's root, or a container's (the
/// mount namespace of its init).
#[derive(Debug, Clone, Default)]
pub enum Scope {
    /// The VM's own file systems.
    #[default]
    Vm,
    /// A container's: its mount namespace.
    Container(Arc<OwnedFd>),
}

/// Runs blocking file system work off the async runtime, with paths resolved in `scope`.
/// A container's work runs on a thread of its own that entered the container's mount
/// namespace (after unsharing its root and working directory from the agent's other
/// threads, as `setns` requires) and ends with the work, so no other work sees it.
async fn blocking<T: Send + 'static>(
    scope: &Scope,
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    // Unavailable, not Internal: the operation could not run at all, so a copy of a tree
    // stops instead of failing every entry the same way.
    let failed =
        |err: &dyn std::fmt::Display| Status::unavailable(format!("File operation failed: {err}"));
    match scope {
        Scope::Vm => tokio::task::spawn_blocking(work)
            .await
            .map_err(|err| failed(&err))?,
        Scope::Container(namespace) => {
            let namespace = namespace.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("container-files".into())
                .spawn(move || {
                    let result = match enter_mount_namespace(&namespace) {
                        Ok(()) => work(),
                        Err(err) => Err(Status::unavailable(format!(
                            "Cannot enter the container's mount namespace (has it stopped?): \
                             {err}"
                        ))),
                    };
                    let _ = tx.send(result);
                })
                .map_err(|err| failed(&err))?;
            rx.await.map_err(|err| failed(&err))?
        }
    }
}

/// Sets the permission bits and modification time of the open file or directory `fd`
/// (`path` names it in errors). Through the descriptor, not the path: a process that
/// swaps the path for a link meanwhile cannot turn this onto another file.
fn set_mode_and_times_of(
    fd: impl AsFd,
    path: &Path,
    mode: u32,
    times: &Timestamps,
) -> Result<(), Status> {
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(mode & MODE_BITS))
        .map_err(|err| io_status("set the mode of", path, &err.into()))?;
    rustix::fs::futimens(&fd, times)
        .map_err(|err| io_status("set the modification time of", path, &err.into()))
}

/// Removes a temporary file unless it was renamed into place.
struct TempFile {
    path: Option<PathBuf>,
    /// Where its path is resolved when it is dropped on an arbitrary thread.
    scope: Scope,
}

impl TempFile {
    /// A temporary name next to `path`, which resolves in `scope` (`Scope::Vm` when the
    /// caller's thread already is where `path` resolves).
    fn next_to(path: &Path, scope: &Scope) -> Self {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        Self {
            path: Some(parent.join(format!(".vmfactory-copy.{}.{n}", std::process::id()))),
            scope: scope.clone(),
        }
    }

    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames it to `path`; from then on it is no longer removed.
    fn persist(mut self, path: &Path) -> Result<(), Status> {
        refuse_special(path)?;
        let temp = self.path.take().unwrap_or_default();
        match std::fs::rename(&temp, path) {
            Ok(()) => Ok(()),
            Err(err) => {
                let _ = std::fs::remove_file(&temp);
                Err(io_status("replace", path, &err))
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let remove = move || {
                if let Err(err) = std::fs::remove_file(&path) {
                    debug!(path = %path.display(), %err, "Cannot remove a temporary file");
                }
            };
            match &self.scope {
                Scope::Vm => remove(),
                Scope::Container(namespace) => {
                    let namespace = namespace.clone();
                    let _ = std::thread::Builder::new()
                        .name("container-files".into())
                        .spawn(move || {
                            if enter_mount_namespace(&namespace).is_ok() {
                                remove();
                            }
                        });
                }
            }
        }
    }
}

/// Gives the calling thread its own root and working directory, then moves it into the
/// mount namespace `namespace` (whose root becomes its root). Only for threads that end
/// with the work they were made for.
fn enter_mount_namespace(namespace: &OwnedFd) -> rustix::io::Result<()> {
    // SAFETY: only FS (root and working directory) is unshared; file descriptors stay
    // shared with the agent's other threads.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS)? };
    rustix::thread::move_into_link_name_space(
        namespace.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Mount),
    )
}

/// Serves one `CopyFile` stream: creates the file, directory or symbolic link its first
/// message describes.
pub async fn copy_file<S>(
    first: CopyFileRequest,
    mut stream: S,
    scope: &Scope,
) -> Result<(), Status>
where
    S: Stream<Item = Result<CopyFileRequest, Status>> + Unpin + Send,
{
    let path = guest_path(&first.path)?;
    if path.file_name().is_none() {
        return Err(Status::invalid_argument(format!(
            "Cannot copy onto {}: name a file in a directory",
            path.display()
        )));
    }
    let times = checked_times(&first, &path)?;
    let kind = FileKind::try_from(first.kind).unwrap_or(FileKind::Unspecified);
    if kind != FileKind::File {
        // Nothing but the first message, and no data.
        let more = stream.next().await.transpose()?;
        if !first.data.is_empty() || more.is_some() {
            return Err(Status::invalid_argument(format!(
                "Data sent for {} of kind {kind:?}: only a file carries data",
                path.display()
            )));
        }
    }
    if first.parents {
        if let Some(parent) = path.parent().map(Path::to_path_buf) {
            blocking(scope, move || {
                std::fs::create_dir_all(&parent)
                    .map_err(|err| io_status("create the directory", &parent, &err))
            })
            .await?;
        }
    }
    match kind {
        FileKind::File => receive_file(path, first, times, stream, scope).await,
        FileKind::Directory => {
            let mode = first.mode;
            blocking(scope, move || make_directory(&path, mode, &times)).await
        }
        FileKind::Symlink => {
            let target = first.link_target;
            blocking(scope, move || make_symlink(&path, &target, &times)).await
        }
        FileKind::Unspecified | FileKind::Other => Err(Status::invalid_argument(format!(
            "Cannot copy {}: kind must be file, directory or symlink",
            path.display()
        ))),
    }
}

/// Receives a file's content under a temporary name and renames it to `path` once
/// exactly `size` bytes arrived.
async fn receive_file<S>(
    path: PathBuf,
    first: CopyFileRequest,
    times: Timestamps,
    mut stream: S,
    scope: &Scope,
) -> Result<(), Status>
where
    S: Stream<Item = Result<CopyFileRequest, Status>> + Unpin + Send,
{
    let temp = TempFile::next_to(&path, scope);
    let opened = {
        let (temp_path, path) = (temp.path().to_path_buf(), path.clone());
        blocking(scope, move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp_path)
                .map_err(|err| io_status("create", &path, &err))
        })
        .await?
    };
    let mut file = tokio::fs::File::from_std(opened);
    let size = first.size;
    let mut received = 0u64;
    let mut data = first.data;
    loop {
        received = received.saturating_add(data.len() as u64);
        if received > size {
            return Err(Status::invalid_argument(format!(
                "More than the announced {size} bytes arrived for {}; nothing was written \
                 (announce the file's real size)",
                path.display()
            )));
        }
        file.write_all(&data)
            .await
            .map_err(|err| io_status("write", &path, &err))?;
        match stream.next().await.transpose()? {
            Some(next) => data = next.data,
            None => break,
        }
    }
    if received != size {
        return Err(Status::invalid_argument(format!(
            "Only {received} of the announced {size} bytes arrived for {}; nothing was \
             written (send the whole file)",
            path.display()
        )));
    }
    // Errors of buffered writes show here.
    file.flush()
        .await
        .map_err(|err| io_status("write", &path, &err))?;
    let file = file.into_std().await;
    let mode = first.mode;
    blocking(&scope.clone(), move || {
        set_mode_and_times_of(&file, &path, mode, &times)?;
        drop(file);
        temp.persist(&path)
    })
    .await
}

/// Creates directory `path` (or keeps it if it exists) and sets its mode and time.
fn make_directory(path: &Path, mode: u32, times: &Timestamps) -> Result<(), Status> {
    if let Err(err) = std::fs::create_dir(path) {
        let is_dir = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir());
        if err.kind() != io::ErrorKind::AlreadyExists || !is_dir {
            if err.kind() == io::ErrorKind::AlreadyExists {
                return Err(Status::failed_precondition(format!(
                    "Cannot create the directory {}: something else exists there; remove it \
                     first",
                    path.display()
                )));
            }
            return Err(io_status("create the directory", path, &err));
        }
    }
    // Opened without following a link: a directory swapped for a link since it was
    // made or looked at is refused, not followed.
    let flags = rustix::fs::OFlags::RDONLY
        | rustix::fs::OFlags::DIRECTORY
        | rustix::fs::OFlags::NOFOLLOW
        | rustix::fs::OFlags::CLOEXEC;
    let dir = rustix::fs::open(path, flags, rustix::fs::Mode::empty())
        .map_err(|err| io_status("open the directory", path, &err.into()))?;
    set_mode_and_times_of(&dir, path, mode, times)
}

/// Creates (or replaces) symbolic link `path` pointing at `target`.
fn make_symlink(path: &Path, target: &str, times: &Timestamps) -> Result<(), Status> {
    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "Invalid link target for {}: 1 to {MAX_PATH} bytes without NUL",
            path.display()
        )));
    }
    let temp = TempFile::next_to(path, &Scope::Vm);
    std::os::unix::fs::symlink(target, temp.path())
        .map_err(|err| io_status("create the link", path, &err))?;
    // A link has no permission bits of its own; its time is set without following it.
    rustix::fs::utimensat(CWD, temp.path(), times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| io_status("set the modification time of", path, &err.into()))?;
    temp.persist(path)
}

/// A copy replaces files whole (a temporary file renamed into place), so it refuses to
/// replace a device, FIFO or socket at `path`: that is not a file to replace.
fn refuse_special(path: &Path) -> Result<(), Status> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let file_type = meta.file_type();
    if file_type.is_file() || file_type.is_dir() || file_type.is_symlink() {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "{} is a device, FIFO or socket, which a copy does not replace: remove it first, \
         or name another path",
        path.display()
    )))
}

/// Describes `path`: without following a final symbolic link, or, with `follow`, what
/// it points at, saying where that is (`resolved_path`).
pub async fn stat_path(
    path: &str,
    follow: bool,
    scope: &Scope,
) -> Result<StatPathResponse, Status> {
    let path = guest_path(path)?;
    blocking(scope, move || stat_blocking(&path, follow)).await
}

fn stat_blocking(path: &Path, follow: bool) -> Result<StatPathResponse, Status> {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .map_err(|err| io_status("stat", path, &err))?;
    let file_type = meta.file_type();
    let kind = if file_type.is_file() {
        FileKind::File
    } else if file_type.is_dir() {
        FileKind::Directory
    } else if file_type.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let mut response = StatPathResponse {
        kind: kind as i32,
        mode: meta.mode() & MODE_BITS,
        mtime_sec: meta.mtime(),
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        size: meta.len(),
        ..StatPathResponse::default()
    };
    match kind {
        FileKind::Symlink => {
            let target =
                std::fs::read_link(path).map_err(|err| io_status("read the link", path, &err))?;
            response.link_target = target
                .into_os_string()
                .into_string()
                .map_err(|target| not_utf8(path, "points at", &target.to_string_lossy()))?;
        }
        FileKind::Directory => response.entries = list_directory(path)?,
        _ => {}
    }
    if follow {
        let resolved =
            std::fs::canonicalize(path).map_err(|err| io_status("resolve", path, &err))?;
        response.resolved_path = resolved
            .into_os_string()
            .into_string()
            .map_err(|resolved| not_utf8(path, "resolves to", &resolved.to_string_lossy()))?;
    }
    Ok(response)
}

fn not_utf8(path: &Path, what: &str, name: &str) -> Status {
    Status::failed_precondition(format!(
        "{} {what} {name:?}, which is not UTF-8; rename it to copy it",
        path.display()
    ))
}

/// The sorted names in directory `path`, within [`MAX_DIR_ENTRIES`] and
/// [`MAX_ENTRY_BYTES`].
fn list_directory(path: &Path) -> Result<Vec<String>, Status> {
    let entries = std::fs::read_dir(path).map_err(|err| io_status("list", path, &err))?;
    let mut names = Vec::new();
    let mut bytes = 0usize;
    for entry in entries {
        let entry = entry.map_err(|err| io_status("list", path, &err))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| not_utf8(path, "holds", &name.to_string_lossy()))?;
        bytes += name.len();
        if names.len() >= MAX_DIR_ENTRIES || bytes > MAX_ENTRY_BYTES {
            return Err(Status::resource_exhausted(format!(
                "{} holds more than {MAX_DIR_ENTRIES} entries or {MAX_ENTRY_BYTES} bytes of \
                 names; copy its subdirectories separately or archive it first",
                path.display()
            )));
        }
        names.push(name);
    }
    names.sort_unstable();
    Ok(names)
}

/// A stream of regular file `path`'s content in chunks of [`FILE_CHUNK_SIZE`], read only
/// as fast as the host takes them.
pub async fn read_file(
    path: &str,
    scope: &Scope,
) -> Result<ReceiverStream<Result<ReadFileResponse, Status>>, Status> {
    let path = guest_path(path)?;
    // Non-blocking, so opening a FIFO cannot hang; it is refused below.
    let opened = {
        let path = path.clone();
        blocking(scope, move || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|err| io_status("open", &path, &err))
        })
        .await?
    };
    let mut file = tokio::fs::File::from_std(opened);
    let meta = file
        .metadata()
        .await
        .map_err(|err| io_status("stat", &path, &err))?;
    if !meta.is_file() {
        return Err(Status::failed_precondition(format!(
            "{} is not a regular file: only files can be read (StatPath tells what it is)",
            path.display()
        )));
    }
    // The file as it was when opened: what is appended meanwhile (a log being written,
    // a process feeding it without end) is not sent. A file without a size (in /proc,
    // /sys) is read to its end, within MAX_UNSIZED_FILE.
    let mut left = if meta.len() > 0 {
        meta.len()
    } else {
        MAX_UNSIZED_FILE
    };
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    tokio::spawn(async move {
        while left > 0 {
            let want =
                usize::try_from(left).map_or(FILE_CHUNK_SIZE, |left| left.min(FILE_CHUNK_SIZE));
            let mut chunk = vec![0u8; want];
            let n = match file.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(err) => {
                    let _ = tx.send(Err(io_status("read", &path, &err))).await;
                    return;
                }
            };
            chunk.truncate(n);
            left -= n as u64;
            // Waits while the host is slow; ends when it hung up.
            if tx.send(Ok(ReadFileResponse { data: chunk })).await.is_err() {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests;
