//! Containers in the VM (`CreateContainer`, `StartContainer`, `RemoveContainer`, and
//! `ExecProcess` with a container id).
//!
//! A container's root is an overlay whose lower layer is a read-only disk the host
//! hot-plugged (found by its virtio serial) and whose upper layer lives on a tmpfs of its
//! own, all under `/run/vmf-containers/<id>/` in the agent's mount namespace:
//! `lower/` (the disk), `upper/` (tmpfs holding `upper/data` and `upper/work`), `rootfs/`
//! (the overlay) and `pivot/`. Its init is the agent binary re-executed as PID 1 of a new
//! PID namespace (see [`init`]), which enters new mount, UTS and IPC namespaces, mounts
//! `/proc`, `/dev`, `/sys` (read-only) and `/tmp` and `pivot_root`s into the overlay.
//! Processes joining it are started on a thread that entered the init's PID namespace,
//! and enter its mount, UTS and IPC namespaces between `fork` and `exec`. Every process
//! is a process of the agent's process table: streams, signals, terminals and waits work
//! by exec id as for any other process.

pub mod init;
mod storage;
mod sys;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;
use tonic::Status;
use tracing::{info, warn};
use vmfactory_protocols::agent::{CreateContainerRequest, ExecProcessRequest};

use crate::process::{Launch, PidNamespace, Processes};

/// Where containers' mounts live in the agent's mount namespace.
pub const CONTAINERS_DIR: &str = "/run/vmf-containers";
/// Most containers at once.
const MAX_CONTAINERS: usize = 32;
/// Longest container id.
const MAX_ID: usize = 64;
/// Longest host name.
const MAX_HOSTNAME: usize = 64;
/// Upper layer size when the request gives none, MiB.
const DEFAULT_UPPER_MIB: u32 = 256;
/// Largest upper layer, MiB (tmpfs takes memory only as it is written).
const MAX_UPPER_MIB: u32 = 1 << 20;
/// How long the init may take to set the container up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed container's init may take to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a container's creation spent its time (logged with "Container created").
#[derive(Debug, Default)]
struct Phases {
    /// Waiting for its disk to appear (the guest's hot-plug of it).
    disk: Duration,
    /// Mounting its disk, the writable layer and the overlay; preparing the root.
    mounts: Duration,
    /// Starting its init, which enters its namespaces and root and reports ready.
    init: Duration,
}

/// One container.
#[derive(Debug)]
struct Container {
    dir: PathBuf,
    stage: Stage,
}

/// Where a container is in its life.
#[derive(Debug)]
enum Stage {
    /// Its `CreateContainer` is still at work: the id is taken, nothing else is there.
    Creating,
    /// Created; its init waits for a byte on this start pipe.
    Created(OwnedFd),
    /// Started.
    Started,
}

/// The containers of this agent.
#[derive(Debug, Default)]
pub struct Containers {
    /// Locked only for the table's own changes: a create that waits for its disk and
    /// init holds its id (`Stage::Creating`), not the lock, so the other containers'
    /// calls go on.
    table: std::sync::Arc<Mutex<HashMap<String, Container>>>,
}

/// A container id taken by a create in progress; let go (the entry removed) if the
/// create ends without filling it, also when its call is dropped half-way.
struct Reservation {
    table: std::sync::Arc<Mutex<HashMap<String, Container>>>,
    id: Option<String>,
}

impl Reservation {
    /// The create filled the entry: nothing to let go.
    fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let release = move |table: &mut HashMap<String, Container>| {
            if table
                .get(&id)
                .is_some_and(|container| matches!(container.stage, Stage::Creating))
            {
                table.remove(&id);
            }
        };
        match self.table.try_lock() {
            Ok(mut table) => release(&mut table),
            Err(_) => {
                let table = self.table.clone();
                tokio::spawn(async move { release(&mut *table.lock().await) });
            }
        }
    }
}

/// Checks a container id: 1 to 64 of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), Status> {
    if id.is_empty()
        || id.len() > MAX_ID
        || id == "."
        || id == ".."
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(Status::invalid_argument(format!(
            "Invalid container id {id:?}: use 1 to {MAX_ID} letters, digits, '_', '.' or '-'"
        )));
    }
    Ok(())
}

fn validate_hostname(name: &str) -> Result<(), Status> {
    if name.is_empty()
        || name.len() > MAX_HOSTNAME
        || name.starts_with('-')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    {
        return Err(Status::invalid_argument(format!(
            "Invalid hostname {name:?}: use 1 to {MAX_HOSTNAME} letters, digits, '-' or '.'"
        )));
    }
    Ok(())
}

fn internal(what: &str, err: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {err}"))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> Result<(OwnedFd, OwnedFd), Status> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors this function then owns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(internal("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Unmounts what a container mounted under `dir` and removes the directory.
fn teardown(dir: &Path) {
    for part in ["pivot", "rootfs", "upper", "lower"] {
        let path = dir.join(part);
        if let Err(err) = sys::umount_quietly(&path) {
            warn!(path = %path.display(), %err, "Cannot unmount");
        }
    }
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), %err, "Cannot remove the container directory");
        }
    }
}

/// Refuses to act on a container whose `CreateContainer` is still at work.
fn refuse_creating(id: &str, container: &Container) -> Result<(), Status> {
    if matches!(container.stage, Stage::Creating) {
        return Err(Status::failed_precondition(format!(
            "Container {id} is being created: wait until CreateContainer returns"
        )));
    }
    Ok(())
}

/// Kills process `pid` (a container's init: the whole PID namespace goes with it).
fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: signals a child of ours still in the process table (not reaped).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

impl Containers {
    /// Creates container `request.container_id`; its init waits for [`Containers::start`].
    pub async fn create(
        &self,
        processes: &Processes,
        request: CreateContainerRequest,
    ) -> Result<(), Status> {
        let id = request.container_id.clone();
        validate_id(&id)?;
        let storage = request.rootfs.clone().ok_or_else(|| {
            Status::invalid_argument("rootfs is missing: give the disk's serial and fstype")
        })?;
        storage::validate(&storage)?;
        let hostname = if request.hostname.is_empty() {
            id.clone()
        } else {
            request.hostname.clone()
        };
        validate_hostname(&hostname)?;
        let upper_mib = match request.upper_size_mib {
            0 => DEFAULT_UPPER_MIB,
            mib if mib <= MAX_UPPER_MIB => mib,
            mib => {
                return Err(Status::invalid_argument(format!(
                    "Upper layer of {mib} MiB is too large: at most {MAX_UPPER_MIB} MiB"
                )))
            }
        };
        let mut spec = request.init.clone().unwrap_or_default();
        let argv = std::mem::take(&mut spec.argv);
        // Validated as a process like any other; a pause init is listed as "pause".
        spec.argv = if argv.is_empty() {
            vec!["pause".into()]
        } else {
            argv.clone()
        };
        spec.exec_id = id.clone();
        spec.container_id.clear();
        let dir = Path::new(CONTAINERS_DIR).join(&id);
        let mut table = self.table.lock().await;
        if table.contains_key(&id) {
            return Err(Status::already_exists(format!("Container {id} exists")));
        }
        if table.len() >= MAX_CONTAINERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_CONTAINERS} containers exist: remove one first"
            )));
        }
        if processes.running_pid(&id).is_some() {
            return Err(Status::already_exists(format!(
                "A process with exec id {id} runs: pick another container id"
            )));
        }
        table.insert(
            id.clone(),
            Container {
                dir: dir.clone(),
                stage: Stage::Creating,
            },
        );
        drop(table);
        let reservation = Reservation {
            table: self.table.clone(),
            id: Some(id.clone()),
        };
        // The pid of the init this create started, if it got that far: only that process
        // is ours to kill on failure (another client may have started a process with
        // this exec id meanwhile).
        let mut started = None;
        let mut phases = Phases::default();
        let created = self
            .create_in(
                processes,
                &dir,
                &storage,
                upper_mib,
                &hostname,
                spec,
                argv,
                &mut started,
                &mut phases,
            )
            .await;
        match created {
            Ok(start) => {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                info!(
                    %id,
                    disk_ms = ms(phases.disk),
                    mounts_ms = ms(phases.mounts),
                    init_ms = ms(phases.init),
                    "Container created"
                );
                if let Some(container) = self.table.lock().await.get_mut(&id) {
                    container.stage = Stage::Created(start);
                }
                reservation.keep();
                Ok(())
            }
            Err(err) => {
                if let Some(pid) = started {
                    if processes.running_pid(&id) == Some(pid) {
                        kill(pid);
                        processes.ended_within(&id, KILL_TIMEOUT).await;
                    }
                    processes.forget(&id);
                }
                teardown(&dir);
                Err(err)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in(
        &self,
        processes: &Processes,
        dir: &Path,
        storage: &vmfactory_protocols::agent::ContainerStorage,
        upper_mib: u32,
        hostname: &str,
        spec: ExecProcessRequest,
        argv: Vec<String>,
        started: &mut Option<u32>,
        phases: &mut Phases,
    ) -> Result<OwnedFd, Status> {
        let began = Instant::now();
        if dir.exists() {
            // Left by a container whose removal failed half-way.
            teardown(dir);
        }
        let (lower, upper, rootfs, pivot) = (
            dir.join("lower"),
            dir.join("upper"),
            dir.join("rootfs"),
            dir.join("pivot"),
        );
        for path in [&lower, &upper, &rootfs, &pivot] {
            std::fs::create_dir_all(path).map_err(|err| internal("mkdir", err))?;
        }
        let device = storage::find_disk(&storage.serial).await?;
        phases.disk = began.elapsed();
        sys::mount(
            &device.to_string_lossy(),
            &lower,
            Some(&storage.fstype),
            libc::MS_RDONLY | libc::MS_NODEV,
            None,
        )
        .map_err(|err| {
            Status::failed_precondition(format!(
                "Cannot mount disk {} as {}: {err} (is the image an {} file system?)",
                storage.serial, storage.fstype, storage.fstype
            ))
        })?;
        sys::mount(
            "tmpfs",
            &upper,
            Some("tmpfs"),
            libc::MS_NODEV,
            Some(&format!("size={upper_mib}m,mode=755")),
        )
        .map_err(|err| internal("upper tmpfs", err))?;
        for part in ["data", "work"] {
            std::fs::create_dir(upper.join(part)).map_err(|err| internal("mkdir", err))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.join("data").display(),
            upper.join("work").display()
        );
        sys::mount(
            "overlay",
            &rootfs,
            Some("overlay"),
            libc::MS_NODEV,
            Some(&options),
        )
        .map_err(|err| internal("overlay", err))?;
        storage::prepare_root(&rootfs, hostname)?;
        let user = storage::resolve_user(&rootfs, &spec.user)?;
        phases.mounts = began.elapsed() - phases.disk;
        let (status_read, status_write) = pipe()?;
        let (start_read, start_write) = pipe()?;
        let init = init::InitArgs {
            rootfs,
            pivot,
            hostname: hostname.to_string(),
            status_fd: status_write.as_raw_fd(),
            start_fd: start_read.as_raw_fd(),
            uid: user.uid,
            gid: user.gid,
            groups: user.groups,
            cwd: spec.workdir.clone(),
            argv,
        };
        let inherit = [status_write.as_raw_fd(), start_read.as_raw_fd()];
        let launch = Launch {
            program: Some(("/proc/self/exe".into(), init.to_args())),
            pid_ns: Some(PidNamespace::New),
            pre_exec: Some(Box::new(move || {
                for fd in inherit {
                    // SAFETY: clears close-on-exec of a descriptor the child holds.
                    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })),
            // The init enters the workdir itself and reports a missing one.
            workdir_root: None,
        };
        let (_, pid) = processes.start_with(spec, launch)?;
        *started = Some(pid);
        drop(status_write);
        drop(start_read);
        let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_read)
            .map_err(|err| internal("status pipe", err))?;
        let mut report = Vec::new();
        let read = tokio::time::timeout(
            SETUP_TIMEOUT,
            (&mut status).take(4096).read_to_end(&mut report),
        )
        .await;
        phases.init = began.elapsed() - phases.disk - phases.mounts;
        match read {
            Ok(Ok(_)) if report == b"OK" => Ok(start_write),
            Ok(Ok(_)) if report.is_empty() => Err(Status::internal(
                "The container init ended without a word (see the guest console)",
            )),
            Ok(Ok(_)) => Err(Status::failed_precondition(format!(
                "Cannot set the container up: {}",
                String::from_utf8_lossy(&report)
            ))),
            Ok(Err(err)) => Err(internal("status pipe", err)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "The container init did not finish its setup within {} s",
                SETUP_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Lets container `id`'s init run its program.
    pub async fn start(&self, id: &str) -> Result<(), Status> {
        validate_id(id)?;
        let mut table = self.table.lock().await;
        let container = table
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("No container {id:?}")))?;
        refuse_creating(id, container)?;
        let Stage::Created(start) = std::mem::replace(&mut container.stage, Stage::Started) else {
            return Err(Status::failed_precondition(format!(
                "Container {id} is started already"
            )));
        };
        let mut file = std::fs::File::from(start);
        use std::io::Write;
        file.write_all(b"S").map_err(|err| {
            Status::failed_precondition(format!(
                "Container {id}'s init is gone ({err}): remove the container"
            ))
        })
    }

    /// Kills container `id`'s processes, unmounts its file systems (releasing its disk)
    /// and forgets it.
    pub async fn remove(&self, processes: &Processes, id: &str) -> Result<(), Status> {
        validate_id(id)?;
        let mut table = self.table.lock().await;
        if let Some(container) = table.get(id) {
            refuse_creating(id, container)?;
        }
        let container = table
            .remove(id)
            .ok_or_else(|| Status::not_found(format!("No container {id:?}")))?;
        if let Some(pid) = processes.running_pid(id) {
            kill(pid);
            if !processes.ended_within(id, KILL_TIMEOUT).await {
                warn!(%id, pid, "The container init did not die");
            }
        }
        processes.forget(id);
        drop(container.stage);
        teardown(&container.dir);
        if sys::is_mounted(&container.dir.join("lower")) {
            return Err(Status::internal(format!(
                "Container {id} is gone but its disk is still mounted"
            )));
        }
        info!(%id, "Container removed");
        Ok(())
    }

    /// The pid of started container `id`'s running init, and the container's directory.
    async fn started_init(
        &self,
        processes: &Processes,
        id: &str,
    ) -> Result<(u32, PathBuf), Status> {
        validate_id(id)?;
        let table = self.table.lock().await;
        let container = table
            .get(id)
            .ok_or_else(|| Status::not_found(format!("No container {id:?}")))?;
        refuse_creating(id, container)?;
        if matches!(container.stage, Stage::Created(_)) {
            return Err(Status::failed_precondition(format!(
                "Container {id} is not started: call StartContainer first"
            )));
        }
        let pid = processes.running_pid(id).ok_or_else(|| {
            Status::failed_precondition(format!("Container {id}'s init has ended: remove it"))
        })?;
        Ok((pid, container.dir.clone()))
    }

    /// The mount namespace of started container `id` (its init's), for file operations
    /// in its root.
    pub async fn mount_namespace(
        &self,
        processes: &Processes,
        id: &str,
    ) -> Result<OwnedFd, Status> {
        let (pid, _) = self.started_init(processes, id).await?;
        std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
            .map(OwnedFd::from)
            .map_err(|err| internal("namespace", err))
    }

    /// How a process joins container `id`: its init's namespaces, its root, `workdir`
    /// and user.
    pub async fn join(
        &self,
        processes: &Processes,
        request: &ExecProcessRequest,
    ) -> Result<Launch, Status> {
        let id = &request.container_id;
        let (pid, dir) = self.started_init(processes, id).await?;
        let storage::UserIds { uid, gid, groups } =
            storage::resolve_user(&dir.join("rootfs"), &request.user)?;
        let open = |ns: &str| -> Result<OwnedFd, Status> {
            std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
                .map(OwnedFd::from)
                .map_err(|err| internal("namespace", err))
        };
        let pid_ns = open("pid")?;
        let others = [open("ipc")?, open("uts")?, open("mnt")?];
        let cwd = sys::cstr(if request.workdir.is_empty() {
            "/"
        } else {
            &request.workdir
        })
        .map_err(|err| Status::invalid_argument(err.to_string()))?;
        Ok(Launch {
            program: None,
            pid_ns: Some(PidNamespace::Join(pid_ns)),
            pre_exec: Some(Box::new(move || {
                // SAFETY: setns on descriptors this closure owns, the capability limit,
                // then chdir and id calls with a prepared string: all async-signal-safe.
                unsafe {
                    for fd in &others {
                        if libc::setns(fd.as_raw_fd(), 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    sys::limit_capabilities()?;
                    if libc::chdir(cwd.as_ptr()) < 0
                        || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                        || libc::setgid(gid) < 0
                        || libc::setuid(uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })),
            workdir_root: crate::process::pin_root(pid),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_create_in_progress_holds_its_id_not_the_table() {
        let containers = Containers::default();
        let reservation = Reservation {
            table: containers.table.clone(),
            id: Some("web".into()),
        };
        containers.table.lock().await.insert(
            "web".into(),
            Container {
                dir: PathBuf::from("/nonexistent"),
                stage: Stage::Creating,
            },
        );
        // The table is free for other calls; this container refuses them for now.
        let err = containers.start("web").await.expect_err("being created");
        assert!(err.message().contains("being created"), "{err:?}");
        let processes = Processes::default();
        let err = containers
            .remove(&processes, "web")
            .await
            .expect_err("being created");
        assert!(err.message().contains("being created"), "{err:?}");
        assert!(containers.table.lock().await.contains_key("web"));
        // A create whose call is dropped half-way lets its id go.
        drop(reservation);
        assert!(!containers.table.lock().await.contains_key("web"));
    }

    #[test]
    fn ids_and_hostnames() {
        for good in ["a", "web-1", "x.y_z", &"a".repeat(64)] {
            validate_id(good).expect(good);
        }
        for bad in ["", ".", "..", "a/b", "a b", "a\0", &"a".repeat(65), "ä"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        validate_hostname("box-1.local").expect("hostname");
        for bad in ["", "-a", "a_b", "a b", &"h".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
