//! Where a sandbox lives: `<runtime_dir>/sandbox/<id>/` holds its record
//! (`sandbox.json`), the supervisor's socket (`sandbox.sock`) and log
//! (`supervisor.log`), and a `vm` link to the VM's own directory (as Kata's
//! `assignSandbox` links the VM's sockets into the sandbox). The supervisor writes the
//! record atomically; anyone may read it. A sandbox whose supervisor is gone without
//! marking it `exited` (it was killed) has its VM (if it still runs) killed: one that
//! was running or paused is then left `exited` like a sandbox whose VM stopped by itself,
//! its record saying so and its log kept, and one still being created is removed, so none
//! is half there.
//! A name is claimed ([`reserve`]) under a lock, with a `name` file written before the
//! record exists, so two sandboxes never share one.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use vmfactory_hypervisor::qemu::process_cmdline;

use crate::SandboxError;

/// The record file in a sandbox directory.
pub const RECORD_FILE: &str = "sandbox.json";
/// The supervisor's socket in a sandbox directory.
pub const SOCKET_FILE: &str = "sandbox.sock";
/// The supervisor's log in a sandbox directory.
pub const LOG_FILE: &str = "supervisor.log";
/// The link to the VM directory in a sandbox directory.
pub const VM_LINK: &str = "vm";
/// The sandbox's name, written at creation, before its supervisor writes the record.
const NAME_FILE: &str = "name";
/// A directory without a record is taken for a sandbox starting up for this long.
const STARTING_SECONDS: u64 = 60;
/// Longest sandbox name.
const MAX_NAME: usize = 64;
/// Largest record accepted.
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// A sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// The supervisor is getting the VM.
    Creating,
    /// The VM runs.
    Running,
    /// The VM's vCPUs are stopped.
    Paused,
    /// The VM stopped by itself (the guest shut down, rebooted or panicked, or QEMU was
    /// killed): the supervisor has gone, leaving the record (with why) and its log
    /// until `sandbox rm`.
    Exited,
}

impl SandboxState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Exited => "exited",
        }
    }
}

/// What `sandbox.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id (12 hex digits).
    pub id: String,
    /// Name given at creation (may be empty).
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Pid of the supervisor process.
    pub supervisor_pid: u32,
    /// Pid of the VM's hypervisor process (0 while creating).
    pub vm_pid: u32,
    /// The VM's directory (empty while creating).
    pub vm_dir: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// State.
    pub state: SandboxState,
    /// The containers in the sandbox's VM.
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// Why an exited sandbox's VM stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
}

/// A container of a sandbox: what `sandbox exec --container` needs to run a process in
/// it as its image says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its name in the sandbox (also its id in the guest).
    pub name: String,
    /// The image reference it was made from.
    pub image: String,
    /// The image's content digest.
    pub digest: String,
    /// The image's environment (KEY=VALUE).
    pub env: Vec<String>,
    /// The image's working directory ("" = /).
    pub workdir: String,
    /// The image's user ("" = root).
    pub user: String,
}

/// The directory of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    /// The directory.
    pub path: PathBuf,
}

/// The directory holding every sandbox under `runtime_dir`.
pub fn sandboxes_root(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("sandbox")
}

/// A new random sandbox id.
pub fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Length of a sandbox id ([`new_id`]).
const ID_LEN: usize = 12;

/// Checks a user-given sandbox name.
pub fn validate_name(name: &str) -> Result<(), SandboxError> {
    let bad = |why| SandboxError::Name {
        name: name.chars().take(MAX_NAME + 8).collect(),
        why,
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad("give 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad("use letters, digits, '-', '_' and '.'"));
    }
    // As Docker's container names: not `.`, `..` or an option-like `-x`.
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("start it with a letter or digit"));
    }
    if name.len() == ID_LEN && name.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(bad(
            "it looks like a sandbox id, which a command could then mean as well: use another name",
        ));
    }
    Ok(())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SandboxRecord {
    /// A record for a sandbox being created by this process.
    pub fn creating(id: &str, name: &str) -> Self {
        Self {
            id: id.to_string(),
            name: name.to_string(),
            created_unix: now_unix(),
            supervisor_pid: std::process::id(),
            vm_pid: 0,
            vm_dir: PathBuf::new(),
            vcpus: 0,
            memory_mib: 0,
            state: SandboxState::Creating,
            containers: Vec::new(),
            exit_reason: None,
        }
    }

    /// Seconds since creation.
    pub fn age_seconds(&self) -> u64 {
        now_unix().saturating_sub(self.created_unix)
    }
}

impl SandboxDir {
    /// The directory of sandbox `id` under `runtime_dir`.
    pub fn new(runtime_dir: &Path, id: &str) -> Self {
        Self {
            path: sandboxes_root(runtime_dir).join(id),
        }
    }

    /// The supervisor's socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join(SOCKET_FILE)
    }

    /// The supervisor's log.
    pub fn log(&self) -> PathBuf {
        self.path.join(LOG_FILE)
    }

    /// Creates the directory (mode 0700), in a runtime directory that is ours alone.
    pub fn create(&self) -> Result<(), SandboxError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(runtime) = self.path.parent().and_then(Path::parent) {
            vmfactory_hypervisor::qemu::config::ensure_runtime_dir(runtime)
                .map_err(SandboxError::RuntimeDir)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(|source| SandboxError::Io {
                action: "Cannot create the sandbox directory",
                path: self.path.clone(),
                source,
            })
    }

    /// Writes the record atomically (temporary file, then rename).
    pub fn write(&self, record: &SandboxRecord) -> Result<(), SandboxError> {
        let path = self.path.join(RECORD_FILE);
        let temporary = self
            .path
            .join(format!(".{RECORD_FILE}.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(record).map_err(|err| SandboxError::Corrupt {
            path: path.clone(),
            problem: err.to_string(),
        })?;
        std::fs::write(&temporary, json)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|source| SandboxError::Io {
                action: "Cannot write",
                path,
                source,
            })
    }

    /// Reads the record.
    pub fn read(&self) -> Result<SandboxRecord, SandboxError> {
        use std::io::Read;
        let path = self.path.join(RECORD_FILE);
        let io = |source| SandboxError::Io {
            action: "Cannot read",
            path: path.clone(),
            source,
        };
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|file| file.take(MAX_RECORD_BYTES).read_to_end(&mut text))
            .map_err(io)?;
        serde_json::from_slice(&text).map_err(|err| SandboxError::Corrupt {
            path: path.clone(),
            problem: err.to_string(),
        })
    }

    /// Links `vm` in the sandbox directory to the VM's directory.
    pub fn link_vm(&self, vm_dir: &Path) -> Result<(), SandboxError> {
        let link = self.path.join(VM_LINK);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(vm_dir, &link).map_err(|source| SandboxError::Io {
            action: "Cannot link the VM directory into",
            path: link,
            source,
        })
    }

    /// Removes the directory (under its lock: see [`SandboxDir::lock`]).
    pub fn remove(&self) -> Result<(), SandboxError> {
        let _lock = self.lock();
        self.remove_locked()
    }

    /// Takes the directory's lock (`flock`, released when the file is dropped), which a
    /// listing that marks the sandbox exited and a removal hold, so that neither writes
    /// into a directory the other is deleting. `None` when the directory is gone. Not
    /// taken twice by one thread: a second open would wait on the first.
    fn lock(&self) -> Option<std::fs::File> {
        let file = std::fs::File::open(&self.path).ok()?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).ok()?;
        Some(file)
    }

    /// Removes the directory; the caller holds its lock.
    fn remove_locked(&self) -> Result<(), SandboxError> {
        match std::fs::remove_dir_all(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::Io {
                action: "Cannot remove the sandbox directory",
                path: self.path.clone(),
                source: err,
            }),
            _ => Ok(()),
        }
    }
}

/// True when `pid` is alive and its command line contains `needle`.
pub fn process_matches(pid: u32, needle: &str) -> bool {
    pid != 0 && process_cmdline(pid).is_some_and(|cmdline| cmdline.contains(needle))
}

/// True when the VM process of `record` is alive and its command line names the VM's
/// directory (as QEMU options write it: commas doubled).
fn vm_process_matches(record: &SandboxRecord) -> bool {
    record.vm_pid != 0
        && process_cmdline(record.vm_pid).is_some_and(|cmdline| {
            vmfactory_hypervisor::qemu::cmdline::cmdline_names(&cmdline, &record.vm_dir)
        })
}

/// True when the VM of `record` still runs, as far as can be told: a record without a VM
/// process counts as running.
pub fn vm_alive(record: &SandboxRecord) -> bool {
    record.vm_pid == 0 || vm_process_matches(record)
}

/// True when the supervisor of `record` still runs.
pub fn supervisor_alive(record: &SandboxRecord) -> bool {
    process_matches(record.supervisor_pid, &record.id)
}

/// Kills the VM of `record` if its process is still that VM's, and removes the sandbox.
pub fn sweep(dir: &SandboxDir, record: Option<&SandboxRecord>) -> Result<(), SandboxError> {
    let Some(_lock) = dir.lock() else {
        return Ok(()); // gone already
    };
    if let Some(record) = record {
        stop_vm(dir, record);
    }
    info!(path = %dir.path.display(), "Removing a sandbox whose supervisor is gone");
    dir.remove_locked()
}

/// Leaves exited the sandbox of `record`, whose supervisor is gone without a word (it was
/// killed: SIGKILL, the out-of-memory killer): its VM is killed if it still runs and the
/// VM's directory and the stale socket are removed; the record says what happened, and
/// the log (where that is appended) stays for `sandbox logs` until `sandbox rm`. Done
/// under the directory's lock, with the record read again under it: a concurrent
/// listing finds it exited already, and a removal (`rm -f`) is not written into.
/// Returns the record as written, or `None` when the sandbox was removed meanwhile.
pub fn abandoned(dir: &SandboxDir, record: SandboxRecord) -> Option<SandboxRecord> {
    let _lock = dir.lock()?;
    let mut record = match dir.read() {
        Ok(now) if now.id == record.id => now,
        _ => return None,
    };
    if record.state == SandboxState::Exited {
        return Some(record);
    }
    let vm_ran = vm_process_matches(&record);
    stop_vm(dir, &record);
    let _ = std::fs::remove_file(dir.socket());
    let _ = std::fs::remove_file(dir.path.join(VM_LINK));
    let reason = format!(
        "its supervisor (pid {}) ended without stopping it (it was killed, by SIGKILL or \
         the out-of-memory killer, say), {}",
        record.supervisor_pid,
        if vm_ran {
            "so its VM was stopped"
        } else {
            "and its VM is gone too"
        }
    );
    warn!(id = record.id, "A sandbox's supervisor is gone: {reason}");
    record.state = SandboxState::Exited;
    record.vm_pid = 0;
    record.vm_dir = PathBuf::new();
    record.exit_reason = Some(reason.clone());
    if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(dir.log()) {
        use std::io::Write;
        let _ = writeln!(log, "vmfactory: the sandbox exited: {reason}");
    }
    if let Err(err) = dir.write(&record) {
        warn!(%err, "Cannot mark a sandbox exited");
    }
    Some(record)
}

/// Kills the VM of `record` if its process is still that VM's and waits (a while) until
/// it has exited, and removes the VM's directory when it is one of this runtime
/// directory's.
fn stop_vm(dir: &SandboxDir, record: &SandboxRecord) {
    if record.vm_dir.as_os_str().is_empty() {
        return;
    }
    // Only a VM directory of this runtime directory: the record is a file, and a path
    // it names elsewhere is not removed.
    let runtime = dir.path.parent().and_then(Path::parent);
    let ours = runtime.is_some_and(|runtime| {
        record.vm_dir.parent() == Some(runtime.join("vm").as_path())
            && record
                .vm_dir
                .file_name()
                .is_some_and(|name| name != "." && name != "..")
    });
    if vm_process_matches(record) {
        warn!(
            id = record.id,
            pid = record.vm_pid,
            "Killing the VM of a sandbox whose supervisor is gone"
        );
    }
    if ours {
        // Every QEMU naming the directory, through a pidfd, waited for, then the directory.
        vmfactory_hypervisor::qemu::reap_dir(&record.vm_dir);
        return;
    }
    if vm_process_matches(record) {
        if let Ok(pid) = i32::try_from(record.vm_pid) {
            // SAFETY: kill on a pid whose command line names this sandbox's VM
            // directory; nothing else runs with that argument.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    warn!(
        id = record.id,
        vm_dir = %record.vm_dir.display(),
        "Not removing a VM directory outside the runtime directory"
    );
}

/// Every sandbox under `runtime_dir` whose supervisor runs, and every exited one, oldest
/// first. A running or paused sandbox whose supervisor is gone (killed) is left exited on
/// the way ([`abandoned`]); one still being created, or without a readable record, is
/// swept (its VM killed, its directory removed).
pub fn list(runtime_dir: &Path) -> Vec<(SandboxDir, SandboxRecord)> {
    let root = sandboxes_root(runtime_dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let dir = SandboxDir { path: entry.path() };
        if !dir.path.is_dir() {
            continue;
        }
        match dir.read() {
            // An exited sandbox stays, for its user to learn why, until `sandbox rm`.
            Ok(record) if record.state == SandboxState::Exited || supervisor_alive(&record) => {
                live.push((dir, record));
            }
            Ok(record) if record.state != SandboxState::Creating => {
                if let Some(record) = abandoned(&dir, record) {
                    live.push((dir, record));
                }
            }
            Ok(record) => {
                if let Err(err) = sweep(&dir, Some(&record)) {
                    warn!(%err, "Cannot sweep a sandbox");
                }
            }
            // A directory without a readable record: a supervisor may be writing its
            // first record right now; leave young ones alone.
            Err(_) => {
                if !starting_up(&entry) {
                    let _ = sweep(&dir, None);
                }
            }
        }
    }
    live.sort_by_key(|(_, record)| (record.created_unix, record.id.clone()));
    live
}

/// Makes the directory of the new sandbox `id`, claiming `name` (empty: none) for it:
/// under a lock on the sandboxes' directory, the name is checked ([`check_name`]) and
/// written into the directory before the lock is let go, so two creates with one name
/// cannot both pass.
pub fn reserve(runtime_dir: &Path, id: &str, name: &str) -> Result<SandboxDir, SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = SandboxDir::new(runtime_dir, id);
    if name.is_empty() {
        dir.create()?;
        return Ok(dir);
    }
    vmfactory_hypervisor::qemu::config::ensure_runtime_dir(runtime_dir)
        .map_err(SandboxError::RuntimeDir)?;
    let root = sandboxes_root(runtime_dir);
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| SandboxError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(io("Cannot create the sandboxes' directory", &root))?;
    // The sandboxes' directory itself is locked: no lock file is left behind.
    let lock = std::fs::File::open(&root).map_err(io("Cannot open", &root))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|err| io("Cannot lock", &root)(err.into()))?;
    check_name(runtime_dir, name)?;
    dir.create()?;
    let name_path = dir.path.join(NAME_FILE);
    std::fs::write(&name_path, name).map_err(io("Cannot write", &name_path))?;
    Ok(dir)
}

/// Checks that `name` is well formed, free (no live sandbox and none starting up has it)
/// and not the start of a live sandbox's id (names are looked up first, so it would hide
/// that sandbox from its id's prefix). [`reserve`] checks again under its lock.
pub fn check_name(runtime_dir: &Path, name: &str) -> Result<(), SandboxError> {
    validate_name(name)?;
    let live = list(runtime_dir);
    if let Some((_, holder)) = live.iter().find(|(_, r)| r.name == name) {
        return Err(if holder.state == SandboxState::Exited {
            SandboxError::NameTakenByExited(name.to_string())
        } else {
            SandboxError::NameTaken(name.to_string())
        });
    }
    if starting_names(&sandboxes_root(runtime_dir)).any(|n| n == name) {
        return Err(SandboxError::NameTaken(name.to_string()));
    }
    let hex = name.chars().all(|c| c.is_ascii_hexdigit());
    if let Some((_, hidden)) = live.iter().find(|(_, r)| hex && r.id.starts_with(name)) {
        return Err(SandboxError::NameHidesId {
            name: name.to_string(),
            id: hidden.id.clone(),
        });
    }
    Ok(())
}

/// True for a sandbox directory changed less than [`STARTING_SECONDS`] ago: one whose
/// sandbox may be starting up.
fn starting_up(entry: &std::fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age.as_secs() < STARTING_SECONDS)
}

/// The names claimed in directories under `root` younger than [`STARTING_SECONDS`]:
/// sandboxes starting up. Read whether or not a record has appeared meanwhile (one written
/// between a listing and this look would otherwise be in neither); a dead sandbox's
/// directory has been swept by the listing before.
fn starting_names(root: &Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(starting_up)
        .filter_map(|entry| {
            use std::io::Read;
            let mut name = String::new();
            std::fs::File::open(entry.path().join(NAME_FILE))
                .ok()?
                .take(MAX_NAME as u64 + 1)
                .read_to_string(&mut name)
                .ok()?;
            Some(name)
        })
}

/// The live sandbox that `key` names: an id, a unique id prefix, or a name.
pub fn find(runtime_dir: &Path, key: &str) -> Result<(SandboxDir, SandboxRecord), SandboxError> {
    // An empty key (an unset shell variable, say) names nothing: unnamed sandboxes have
    // an empty name, and `rm ""` must not remove one of them.
    if key.is_empty() {
        return Err(SandboxError::NotFound(String::new()));
    }
    let live = list(runtime_dir);
    if let Some(found) = live
        .iter()
        .find(|(_, r)| r.id == key || (!r.name.is_empty() && r.name == key))
    {
        return Ok(found.clone());
    }
    let mut prefixed = live.into_iter().filter(|(_, r)| r.id.starts_with(key));
    match (prefixed.next(), prefixed.next()) {
        (Some(found), None) if !key.is_empty() => Ok(found),
        (Some(_), Some(_)) => Err(SandboxError::Ambiguous(key.to_string())),
        _ => Err(SandboxError::NotFound(key.chars().take(80).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.test_a").is_ok());
        for bad in [
            "",
            "a b",
            "x/y",
            &"n".repeat(65),
            "9bceac5b7714",
            ".",
            "..",
            "-x",
            "_a",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_name_is_claimed_by_one_create_only() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let runtime = runtime.path().to_path_buf();
        // Eight creates with one name at once, as eight shells would start them.
        let claims: Vec<bool> = (0..8)
            .map(|n| {
                let runtime = runtime.clone();
                std::thread::spawn(move || reserve(&runtime, &format!("{n:012x}"), "web").is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().expect("thread"))
            .collect();
        assert_eq!(claims.iter().filter(|&&ok| ok).count(), 1, "{claims:?}");
        assert!(matches!(
            reserve(&runtime, "a00000000000", "web"),
            Err(SandboxError::NameTaken(name)) if name == "web"
        ));
        assert!(matches!(
            check_name(&runtime, "web"),
            Err(SandboxError::NameTaken(_))
        ));
        // Other names and unnamed sandboxes are not held up.
        reserve(&runtime, "b00000000000", "db").expect("another name");
        reserve(&runtime, "c00000000000", "").expect("no name");
        reserve(&runtime, "d00000000000", "").expect("no name again");
        // A claim whose sandbox never started (no record within a minute) lets go.
        let ten_minutes_ago = SystemTime::now() - std::time::Duration::from_secs(600);
        for entry in std::fs::read_dir(sandboxes_root(&runtime)).expect("list") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                std::fs::File::open(&path)
                    .and_then(|dir| dir.set_modified(ten_minutes_ago))
                    .expect("age the directory");
            }
        }
        reserve(&runtime, "e00000000000", "web").expect("an abandoned claim lets go");
    }

    #[test]
    fn records_round_trip_and_dead_supervisors_are_swept() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let mine = SandboxDir::new(runtime.path(), "aaaaaaaaaaaa");
        mine.create().expect("create");
        // A supervisor pid that no process has.
        let mut record = SandboxRecord::creating("aaaaaaaaaaaa", "one");
        record.supervisor_pid = u32::MAX - 1;
        mine.write(&record).expect("write");
        assert_eq!(mine.read().expect("read"), record);
        assert!(
            list(runtime.path()).is_empty(),
            "a dead supervisor's sandbox is not listed"
        );
        assert!(!mine.path.exists(), "and is swept");
        assert!(matches!(
            find(runtime.path(), "one"),
            Err(SandboxError::NotFound(_))
        ));
        // A record naming a VM directory outside the runtime directory (forged, or
        // damaged) has its sandbox swept but that directory left alone; its own VM
        // directory goes.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        for (vm_dir, removed) in [
            (elsewhere.path().to_path_buf(), false),
            (runtime.path().join("vm/bbbbbbbbbbbb"), true),
        ] {
            std::fs::create_dir_all(&vm_dir).expect("mkdir");
            let swept = SandboxDir::new(runtime.path(), "bbbbbbbbbbbb");
            swept.create().expect("create");
            let mut record = SandboxRecord::creating("bbbbbbbbbbbb", "two");
            record.supervisor_pid = u32::MAX - 1;
            record.vm_dir = vm_dir.clone();
            swept.write(&record).expect("write");
            assert!(list(runtime.path()).is_empty());
            assert_eq!(vm_dir.exists(), !removed, "{}", vm_dir.display());
        }
    }

    #[test]
    fn a_running_sandbox_whose_supervisor_is_gone_is_left_exited() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let dir = SandboxDir::new(runtime.path(), "cccccccccccc");
        dir.create().expect("create");
        let vm_dir = runtime.path().join("vm/cccccccccccc");
        std::fs::create_dir_all(&vm_dir).expect("mkdir");
        std::fs::write(dir.socket(), "").expect("socket");
        std::fs::write(dir.log(), "last words\n").expect("log");
        let mut record = SandboxRecord::creating("cccccccccccc", "web");
        record.supervisor_pid = u32::MAX - 1;
        record.state = SandboxState::Paused;
        record.vm_pid = u32::MAX - 2;
        record.vm_dir = vm_dir.clone();
        dir.write(&record).expect("write");
        let live = list(runtime.path());
        assert_eq!(live.len(), 1, "kept, for its user to learn why");
        let kept = &live[0].1;
        assert_eq!(kept.state, SandboxState::Exited);
        let reason = kept.exit_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("supervisor (pid 4294967294)"), "{reason}");
        assert_eq!(dir.read().expect("read"), *kept, "written down");
        assert!(!vm_dir.exists(), "the VM's directory is removed");
        assert!(!dir.socket().exists(), "the stale socket is removed");
        let log = std::fs::read_to_string(dir.log()).expect("log");
        assert!(
            log.starts_with("last words\n") && log.contains(reason),
            "{log}"
        );
        // Its name stays taken, by an exited sandbox; it is found, and a sweep (`rm`)
        // removes it.
        assert!(matches!(
            check_name(runtime.path(), "web"),
            Err(SandboxError::NameTakenByExited(_))
        ));
        let (found, again) = find(runtime.path(), "web").expect("found");
        assert_eq!(again, *kept, "a second look changes nothing");
        sweep(&found, Some(&again)).expect("sweep");
        assert!(list(runtime.path()).is_empty());
        assert!(!dir.path.exists());
    }

    #[test]
    fn a_record_whose_process_lives_is_listed_and_found() {
        let runtime = tempfile::tempdir().expect("tempdir");
        // Our own process: its command line contains the test binary's name, which we
        // use as the "id" so that supervisor_alive holds.
        let cmdline = std::fs::read("/proc/self/cmdline").expect("cmdline");
        let argv0 = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .next()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let dir = SandboxDir::new(runtime.path(), "bbbbbbbbbbbb");
        dir.create().expect("create");
        let mut record = SandboxRecord::creating(&argv0, "two");
        record.state = SandboxState::Running;
        dir.write(&record).expect("write");
        let live = list(runtime.path());
        assert_eq!(live.len(), 1);
        assert_eq!(find(runtime.path(), "two").expect("by name").1, record);
        assert_eq!(find(runtime.path(), &argv0).expect("by id").1, record);
        // An empty key names nothing, not even a sandbox without a name.
        record.name = String::new();
        dir.write(&record).expect("write");
        assert!(matches!(
            find(runtime.path(), ""),
            Err(SandboxError::NotFound(_))
        ));
    }
}
