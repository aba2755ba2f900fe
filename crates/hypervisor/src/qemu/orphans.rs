//! Who owns a VM, and reaping VMs whose owner is gone. Every VM directory holds an
//! `owner` file naming the process that owns the VM (pid and start time, so a reused pid
//! is not mistaken for the owner): the process that started QEMU, then whoever adopted
//! it. A VM whose owner no longer runs is an orphan: nobody will ever stop it.
//! [`reap_orphans`] kills such VMs and removes their directories; it never touches a VM
//! whose owner lives (a sandbox, a client holding a handed-out VM).

use std::path::Path;

use tracing::{info, warn};

/// The owner file in a VM directory.
pub const OWNER_FILE: &str = "owner";

/// A process's start time (clock ticks since boot, field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Records this process as the owner of the VM in `vm_dir`.
pub fn claim(vm_dir: &Path) {
    let pid = std::process::id();
    write_owner(
        vm_dir,
        format!("{pid} {}\n", start_time(pid).unwrap_or(0)).as_bytes(),
    );
}

/// Writes the owner file of `vm_dir` whole (through a rename).
fn write_owner(vm_dir: &Path, text: &[u8]) {
    let path = vm_dir.join(OWNER_FILE);
    let temporary = vm_dir.join(format!(".{OWNER_FILE}.{}", std::process::id()));
    if let Err(err) =
        std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &path))
    {
        warn!(%err, path = %path.display(), "Cannot record the VM's owner");
    }
}

/// Adopts the handed-over VM in `vm_dir`: records this process as its owner first, then
/// takes its hand-over mark, so that at no moment it has neither a mark nor a living
/// owner (a reaper would take it for an orphan and stop it). False, with the owner file
/// as it was, when the mark was not there (not handed over, or taken first).
pub fn adopt_hand_over(vm_dir: &Path) -> bool {
    let previous = std::fs::read(vm_dir.join(OWNER_FILE)).ok();
    claim(vm_dir);
    if take_hand_over_mark(vm_dir) {
        return true;
    }
    match previous {
        Some(text) => write_owner(vm_dir, &text),
        None => {
            let _ = std::fs::remove_file(vm_dir.join(OWNER_FILE));
        }
    }
    false
}

/// The mark a handed-over VM carries until it is adopted or taken back.
pub const HAND_OVER_MARK: &str = "handed-over";

/// Marks the VM in `vm_dir` as handed over.
pub fn set_hand_over_mark(vm_dir: &Path) -> crate::Result<()> {
    std::fs::write(vm_dir.join(HAND_OVER_MARK), b"").map_err(|err| {
        crate::HypervisorError::InvalidConfig(format!(
            "Cannot mark {} as handed over: {err}",
            vm_dir.display()
        ))
    })
}

/// True while the VM in `vm_dir` carries its hand-over mark: handed over, and neither
/// adopted nor taken back yet.
pub fn hand_over_marked(vm_dir: &Path) -> bool {
    vm_dir.join(HAND_OVER_MARK).exists()
}

/// Takes the hand-over mark of the VM in `vm_dir`: true for the one caller that removed
/// it (an adopter, or the giver taking the VM back).
pub fn take_hand_over_mark(vm_dir: &Path) -> bool {
    std::fs::remove_file(vm_dir.join(HAND_OVER_MARK)).is_ok()
}

/// True when the owner recorded in `vm_dir` still runs (or nothing readable is recorded:
/// a VM being started right now).
fn owner_alive(vm_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(vm_dir.join(OWNER_FILE)) else {
        return true;
    };
    let mut fields = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(started))) = (
        fields.next().map(str::parse::<u32>),
        fields.next().map(str::parse::<u64>),
    ) else {
        return true;
    };
    start_time(pid).is_some_and(|now| now == started || started == 0)
}

/// Kills the QEMU of the VM directory `dir`, waits (at most 5 s) until it has exited, and
/// removes the directory. Its memory and files are released once this returns, so a
/// tmpfs under it can be unmounted.
pub fn reap_dir(dir: &Path) {
    let mut killed = Vec::new();
    for (pid, _) in super::processes_under(dir) {
        let Ok(pidfd) = super::process::open_pidfd(pid) else {
            continue;
        };
        // Looked at again through the pidfd's process: the pid may have been reused
        // between the listing and the open.
        if super::process_cmdline(pid)
            .is_some_and(|cmdline| super::cmdline::cmdline_names(&cmdline, dir))
            && rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).is_ok()
        {
            killed.push(pidfd);
        }
    }
    let deadline = std::time::Instant::now() + REAP_WAIT;
    for pidfd in &killed {
        super::process::wait_pidfd(
            pidfd,
            deadline.saturating_duration_since(std::time::Instant::now()),
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The longest [`reap_dir`] waits for the QEMUs it killed to exit.
const REAP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a VM handed over may wait for its adopter before a reaper may take it for an
/// orphan: a client that has its `GetBaseVM` answer but has not adopted the VM yet is
/// not its owner, and its giver may have stopped meanwhile (`factory destroy`). The
/// VMCache server's own grace (`HANDOVER_GRACE`) is as long.
pub const HAND_OVER_MARK_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How much longer the VM in `vm_dir` may wait for its adopter: `Some` while it carries
/// a hand-over mark younger than [`HAND_OVER_MARK_GRACE`].
fn adoption_grace_left(vm_dir: &Path) -> Option<std::time::Duration> {
    std::fs::metadata(vm_dir.join(HAND_OVER_MARK))
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .and_then(|age| HAND_OVER_MARK_GRACE.checked_sub(age))
        .filter(|left| !left.is_zero())
}

/// The VMs under `runtime_dir/vm` that [`reap_orphans_but_hand_overs`] leaves: handed
/// over by a giver that is gone and not adopted yet, each with how much longer it may
/// wait for its adopter before it counts as an orphan.
pub fn orphans_awaiting_adoption(runtime_dir: &Path) -> Vec<(String, std::time::Duration)> {
    orphan_dirs(runtime_dir)
        .into_iter()
        .filter_map(|(id, dir)| Some((id, adoption_grace_left(&dir)?)))
        .collect()
}

/// The VM directories under `runtime_dir/vm` whose owner is gone, with their ids.
fn orphan_dirs(runtime_dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(runtime_dir.join("vm")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            )
        })
        .filter(|(_, dir)| dir.is_dir() && !owner_alive(dir))
        .collect()
}

/// Kills the VMs under `runtime_dir/vm` whose owner is gone and removes their
/// directories; returns the ids reaped.
pub fn reap_orphans(runtime_dir: &Path) -> Vec<String> {
    reap(runtime_dir, false)
}

/// [`reap_orphans`], but a VM handed over less than [`HAND_OVER_MARK_GRACE`] ago is left
/// to its adopter: for `factory destroy` right after its server stopped, when a client
/// may hold an answer it has not acted on yet ([`orphans_awaiting_adoption`] lists them;
/// once their grace is over this reaps them too).
pub fn reap_orphans_but_hand_overs(runtime_dir: &Path) -> Vec<String> {
    reap(runtime_dir, true)
}

fn reap(runtime_dir: &Path, leave_hand_overs: bool) -> Vec<String> {
    let mut reaped = Vec::new();
    for (id, dir) in orphan_dirs(runtime_dir) {
        if leave_hand_overs && adoption_grace_left(&dir).is_some() {
            continue;
        }
        reap_dir(&dir);
        info!(id, "Reaped a VM whose owner is gone");
        reaped.push(id);
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_reaped_only_when_its_owner_is_gone() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let mine = runtime.path().join("vm/mine");
        let orphan = runtime.path().join("vm/orphan");
        let starting = runtime.path().join("vm/starting");
        for dir in [&mine, &orphan, &starting] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        claim(&mine);
        // Adopting claims first and gives the owner back when there was no mark.
        let other = runtime.path().join("vm/other");
        std::fs::create_dir_all(&other).expect("mkdir");
        std::fs::write(other.join(OWNER_FILE), "4294967294 1\n").expect("write");
        assert!(!adopt_hand_over(&other), "no mark, no adoption");
        assert_eq!(
            std::fs::read_to_string(other.join(OWNER_FILE)).expect("owner"),
            "4294967294 1\n"
        );
        set_hand_over_mark(&other).expect("mark");
        assert!(adopt_hand_over(&other));
        assert!(owner_alive(&other) && !hand_over_marked(&other));
        std::fs::remove_dir_all(&other).expect("rm");
        set_hand_over_mark(&mine).expect("mark");
        assert!(hand_over_marked(&mine));
        assert!(take_hand_over_mark(&mine), "the first taker wins");
        assert!(!take_hand_over_mark(&mine), "only once");
        assert!(!hand_over_marked(&mine));
        // A pid no process has, and our own pid with a start time that is not ours
        // (a reused pid).
        std::fs::write(orphan.join(OWNER_FILE), "4294967294 1\n").expect("write");
        let reused = runtime.path().join("vm/reused");
        std::fs::create_dir_all(&reused).expect("mkdir");
        std::fs::write(
            reused.join(OWNER_FILE),
            format!("{} 1\n", std::process::id()),
        )
        .expect("write");
        // Handed over by a giver that is gone, not adopted yet: left to its adopter while
        // the mark is young, an orphan once it is old.
        let handed = runtime.path().join("vm/handed");
        std::fs::create_dir_all(&handed).expect("mkdir");
        std::fs::write(handed.join(OWNER_FILE), "4294967294 1\n").expect("write");
        set_hand_over_mark(&handed).expect("mark");
        let mut reaped = reap_orphans_but_hand_overs(runtime.path());
        reaped.sort();
        assert_eq!(reaped, ["orphan", "reused"]);
        assert!(mine.exists() && starting.exists() && handed.exists());
        assert!(!orphan.exists() && !reused.exists());
        // Only the young hand-over of a gone giver awaits adoption (ours is adopted).
        set_hand_over_mark(&mine).expect("mark");
        let awaiting = orphans_awaiting_adoption(runtime.path());
        assert_eq!(awaiting.len(), 1, "{awaiting:?}");
        assert_eq!(awaiting[0].0, "handed");
        assert!(awaiting[0].1 <= HAND_OVER_MARK_GRACE && !awaiting[0].1.is_zero());
        assert!(take_hand_over_mark(&mine));
        let old = std::time::SystemTime::now() - HAND_OVER_MARK_GRACE * 2;
        std::fs::File::options()
            .write(true)
            .open(handed.join(HAND_OVER_MARK))
            .and_then(|file| file.set_modified(old))
            .expect("age the mark");
        assert!(orphans_awaiting_adoption(runtime.path()).is_empty());
        assert_eq!(reap_orphans_but_hand_overs(runtime.path()), ["handed"]);
        // The plain reaper takes a young one too (a hand-over a killed giver never sent).
        std::fs::create_dir_all(&handed).expect("mkdir");
        std::fs::write(handed.join(OWNER_FILE), "4294967294 1\n").expect("write");
        set_hand_over_mark(&handed).expect("mark");
        assert_eq!(reap_orphans(runtime.path()), ["handed"]);
    }
}
