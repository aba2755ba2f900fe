//! A container's root disk: finding the hot-plugged disk by serial, preparing the overlay
//! root (the image is untrusted: no path of it is followed as a symbolic link), and users
//! from its `/etc/passwd`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use tonic::Status;
use vmfactory_protocols::agent::ContainerStorage;

/// Longest virtio-blk serial.
const MAX_SERIAL: usize = 20;
/// How long a hot-plugged disk may take to appear in the guest.
pub const DISK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a disk being waited for is looked for without a wake-up.
const DISK_POLL: Duration = Duration::from_millis(50);
/// How soon a disk is looked for again after a device event (doubling up to
/// [`DISK_POLL`] while it is not found).
const DISK_RECHECK: Duration = Duration::from_millis(2);
/// Bytes read of one device event (the kernel's are at most 2 KiB of text).
const UEVENT_BYTES: usize = 8 << 10;
/// Largest `/etc/passwd` read.
const MAX_PASSWD: u64 = 1 << 20;

/// Checks the storage of a container.
pub fn validate(storage: &ContainerStorage) -> Result<(), Status> {
    let serial = &storage.serial;
    if serial.is_empty()
        || serial.len() > MAX_SERIAL
        || !serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(Status::invalid_argument(format!(
            "Invalid disk serial {serial:?}: 1 to {MAX_SERIAL} letters, digits, '-' or '_'"
        )));
    }
    if !matches!(storage.fstype.as_str(), "erofs" | "ext4") {
        return Err(Status::invalid_argument(format!(
            "Unsupported file system {:?}: use \"erofs\" or \"ext4\"",
            storage.fstype
        )));
    }
    if !storage.read_only {
        return Err(Status::invalid_argument(
            "The root disk must be read-only (writes go to the tmpfs upper layer)",
        ));
    }
    Ok(())
}

/// `/dev/vdX` of the virtio disk whose serial is `serial`, waiting for it to appear.
pub async fn find_disk(serial: &str) -> Result<PathBuf, Status> {
    let started = Instant::now();
    // Listened to before the first look, so a disk added in between still wakes the wait.
    let events = uevents();
    // After a wake, look again soon, then less and less often, should an event come
    // before the disk can be read (its node is made before the kernel has scanned it).
    let mut pause = DISK_POLL;
    let mut message = vec![0u8; UEVENT_BYTES];
    loop {
        if let Some(device) = disk_with_serial(Path::new("/sys/block"), serial) {
            let node = Path::new("/dev").join(&device);
            if node.exists() {
                return Ok(node);
            }
        }
        if started.elapsed() > DISK_TIMEOUT {
            return Err(Status::not_found(format!(
                "No disk with serial {serial} appeared within {} s: attach it first",
                DISK_TIMEOUT.as_secs()
            )));
        }
        match &events {
            Some(events) => match tokio::time::timeout(pause, events.readable()).await {
                Ok(Ok(mut ready)) => {
                    while rustix::io::read(events.get_ref(), &mut message).is_ok_and(|n| n > 0) {}
                    ready.clear_ready();
                    pause = DISK_RECHECK;
                }
                _ => pause = (pause * 2).min(DISK_POLL),
            },
            None => tokio::time::sleep(DISK_POLL).await,
        }
    }
}

/// The kernel's device events (a `NETLINK_KOBJECT_UEVENT` socket): a hot-plugged disk
/// is announced once the kernel has added and scanned it, so it is found then rather
/// than at the next look; `None` when the socket cannot be set up (then looking every
/// [`DISK_POLL`]).
fn uevents() -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    use rustix::net::{netlink, AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        Some(netlink::KOBJECT_UEVENT),
    )
    .ok()?;
    // Group 1: the kernel's own events.
    rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 1)).ok()?;
    // SAFETY: the OwnedFd keeps its descriptor open as long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}

/// The name of the `vd*` block device under `sys_block` whose serial is `serial`.
pub fn disk_with_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            return None;
        }
        let mut found = String::new();
        std::fs::File::open(entry.path().join("serial"))
            .ok()?
            .take(64)
            .read_to_string(&mut found)
            .ok()?;
        (found.trim_end() == serial).then_some(name)
    })
}

fn image_error(what: &str, err: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!("The container image's {what}: {err}"))
}

/// Opens directory `name` under `parent` without following a link; a link or a file in
/// its place is replaced by an empty directory (the overlay records the change).
fn ensure_dir(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Status> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => return Ok(fd),
        Err(rustix::io::Errno::NOENT) => {}
        Err(_) => {
            rustix::fs::unlinkat(parent, name, rustix::fs::AtFlags::empty())
                .map_err(|err| image_error(&format!("/{name}"), err))?;
        }
    }
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755))
        .map_err(|err| image_error(&format!("/{name}"), err))?;
    rustix::fs::openat(parent, name, flags, Mode::empty())
        .map_err(|err| image_error(&format!("/{name}"), err))
}

/// Writes file `name` under `dir` afresh (whatever was there, link or not, goes).
fn write_file(dir: &OwnedFd, name: &str, data: &[u8]) -> Result<(), Status> {
    match rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(err) => return Err(image_error(&format!("/etc/{name}"), err)),
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|err| image_error(&format!("/etc/{name}"), err))?;
    std::fs::File::from(fd)
        .write_all(data)
        .map_err(|err| image_error(&format!("/etc/{name}"), err))
}

/// Makes the mount points and the files the agent provides in the overlay root `root`.
pub fn prepare_root(root: &Path, hostname: &str) -> Result<(), Status> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| image_error("root", err))?;
    for dir in ["proc", "sys", "dev", "tmp"] {
        ensure_dir(&root_fd, dir)?;
    }
    let etc = ensure_dir(&root_fd, "etc")?;
    write_file(&etc, "hostname", format!("{hostname}\n").as_bytes())?;
    write_file(
        &etc,
        "hosts",
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n")
            .as_bytes(),
    )?;
    // The VM's own file, copied when it is a regular file of at most 64 KiB.
    let resolv = rustix::fs::open(
        "/etc",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .and_then(|vm_etc| read_regular(&vm_etc, "resolv.conf", (64 << 10) + 1))
    .unwrap_or_default();
    let resolv = if resolv.len() > 64 << 10 {
        Vec::new()
    } else {
        resolv
    };
    write_file(&etc, "resolv.conf", &resolv)
}

/// Most supplementary groups a container user gets (the kernel takes 65536).
const MAX_GROUPS: usize = 256;

/// The ids a container process runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (`setgroups`).
    pub groups: Vec<u32>,
}

/// Resolves an image's `User` to ids as runc (and so Docker) does: `""` is root; `USER`
/// is a name or a uid, `GROUP` a name or a gid. A name must be in the image's
/// `/etc/passwd` (a group name in `/etc/group`); a uid needs no entry. Without a group the
/// user's entry gives the gid, and a uid without an entry gets gid 0; the supplementary
/// groups are then those of `/etc/group` that list the user's name (none with a group
/// given).
pub fn resolve_user(root: &Path, user: &str) -> Result<UserIds, Status> {
    if user.is_empty() {
        return Ok(UserIds::default());
    }
    if user.len() > 256 || user.contains(['\0', '\n']) {
        return Err(Status::invalid_argument(
            "Invalid user: too long or with NUL/newline",
        ));
    }
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    // The user's entry: by name, or by uid (optional then).
    let entry = match name.parse::<u32>() {
        Ok(uid) => {
            let entry = read_ids(root, "passwd").ok().and_then(|passwd| {
                find_entry(&passwd, |fields| fields[2].parse::<u32>() == Ok(uid))
            });
            (
                uid,
                entry.map(|fields| (fields[0].clone(), fields[3].clone())),
            )
        }
        Err(_) => {
            let passwd = read_ids(root, "passwd")?;
            let Some(fields) = find_entry(&passwd, |fields| fields[0] == name) else {
                return Err(Status::failed_precondition(format!(
                    "The image's user {name:?} is not in its /etc/passwd: the image names a \
                     user it does not have; fix the image's User"
                )));
            };
            let uid = fields[2]
                .parse()
                .map_err(|_| image_error("/etc/passwd", format!("bad uid for {name}")))?;
            (uid, Some((fields[0].clone(), fields[3].clone())))
        }
    };
    let (uid, user_entry) = entry;
    let gid = match group {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_ids(root, "group")?;
                let Some(fields) = find_entry(&groups, |fields| fields[0] == group) else {
                    return Err(Status::failed_precondition(format!(
                        "The image's group {group:?} is not in its /etc/group: fix the \
                         image's User"
                    )));
                };
                fields[2]
                    .parse()
                    .map_err(|_| image_error("/etc/group", format!("bad gid for {group}")))?
            }
        },
        None => match &user_entry {
            Some((_, gid)) => gid
                .parse()
                .map_err(|_| image_error("/etc/passwd", format!("bad gid for {name}")))?,
            None => 0,
        },
    };
    // The groups that list the user by name, unless a group was given.
    let groups = match (&user_entry, group) {
        (Some((login, _)), None) => read_ids(root, "group")
            .map(|groups| member_of(&groups, login))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(UserIds { uid, gid, groups })
}

/// The gids of the `/etc/group` entries whose member list names `login`, at most
/// [`MAX_GROUPS`].
fn member_of(groups: &str, login: &str) -> Vec<u32> {
    let mut gids: Vec<u32> = groups
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 4 && fields[3].split(',').any(|m| m.trim() == login))
        .filter_map(|fields| fields[2].parse().ok())
        .collect();
    gids.sort_unstable();
    gids.dedup();
    gids.truncate(MAX_GROUPS);
    gids
}

/// The first line of an `/etc/passwd` or `/etc/group` text with at least four fields for
/// which `matches` holds, split into its fields.
fn find_entry(text: &str, matches: impl Fn(&[String]) -> bool) -> Option<Vec<String>> {
    text.lines()
        .map(|line| line.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && matches(fields))
}

/// The image's `/etc/<name>` (`passwd` or `group`), at most [`MAX_PASSWD`] bytes.
fn read_ids(root: &Path, name: &str) -> Result<String, Status> {
    let what = format!("/etc/{name}");
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = rustix::fs::open(root, flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|err| image_error("root", err))?;
    let etc = rustix::fs::openat(&root_fd, "etc", flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|err| image_error("/etc", err))?;
    let bytes = read_regular(&etc, name, MAX_PASSWD).map_err(|err| image_error(&what, err))?;
    String::from_utf8(bytes).map_err(|err| image_error(&what, err))
}

/// At most `max` bytes of the regular file `name` in `dir`. The container (or its image)
/// controls the file: it is opened without following a link and without blocking, and
/// anything but a regular file is refused, so a FIFO or a device there cannot stop the
/// agent, whose one thread serves every request.
fn read_regular(dir: &OwnedFd, name: &str, max: u64) -> std::io::Result<Vec<u8>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let stat = rustix::fs::fstat(&file)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(file)
        .take(max)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: UserIds) -> (u32, u32) {
        (user.uid, user.gid)
    }

    #[test]
    fn storage_is_checked() {
        let ok = ContainerStorage {
            serial: "vmf0123".into(),
            fstype: "erofs".into(),
            read_only: true,
        };
        validate(&ok).expect("ok");
        let bad = |f: fn(&mut ContainerStorage)| {
            let mut s = ok.clone();
            f(&mut s);
            validate(&s).is_err()
        };
        assert!(bad(|s| s.serial = String::new()));
        assert!(bad(|s| s.serial = "a/b".into()));
        assert!(bad(|s| s.serial = "x".repeat(21)));
        assert!(bad(|s| s.fstype = "xfs".into()));
        assert!(bad(|s| s.read_only = false));
    }

    #[test]
    fn disks_are_found_by_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, serial) in [("vda", "one"), ("vdb", "two\n"), ("sda", "two")] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("serial"), serial).expect("write");
        }
        assert_eq!(disk_with_serial(dir.path(), "two").as_deref(), Some("vdb"));
        assert_eq!(disk_with_serial(dir.path(), "three"), None);
    }

    #[test]
    fn a_fifo_as_passwd_is_refused_without_waiting() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("etc")).expect("mkdir");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("etc/passwd"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        // Without O_NONBLOCK the open would wait for a writer forever.
        let err = resolve_user(root.path(), "nginx").expect_err("a FIFO");
        assert!(err.message().contains("not a regular file"), "{err:?}");
        std::fs::remove_file(root.path().join("etc/passwd")).expect("rm");
        std::fs::write(
            root.path().join("etc/passwd"),
            "nginx:x:101:102::/:/bin/sh\n",
        )
        .expect("write");
        assert_eq!(
            ids(resolve_user(root.path(), "nginx").expect("user")),
            (101, 102)
        );
    }

    #[test]
    fn root_is_prepared_without_following_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink(outside.join("victim"), root.join("etc/hosts")).expect("ln");
        std::os::unix::fs::symlink(&outside, root.join("proc")).expect("ln");
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:44::/:/bin/sh\n",
        )
        .expect("passwd");
        prepare_root(&root, "box").expect("prepare");
        assert!(!outside.join("victim").exists());
        assert!(std::fs::symlink_metadata(root.join("proc"))
            .expect("proc")
            .is_dir());
        assert!(std::fs::read_to_string(root.join("etc/hosts"))
            .expect("hosts")
            .contains("box"));
        assert_eq!(ids(resolve_user(&root, "").expect("root")), (0, 0));
        assert_eq!(ids(resolve_user(&root, "web").expect("web")), (33, 44));
        assert_eq!(ids(resolve_user(&root, "web:7").expect("web")), (33, 7));
        // As runc: a uid takes its entry's gid, and gid 0 without an entry.
        assert_eq!(ids(resolve_user(&root, "33").expect("uid")), (33, 44));
        assert_eq!(ids(resolve_user(&root, "033").expect("uid")), (33, 44));
        assert_eq!(ids(resolve_user(&root, "1000").expect("uid")), (1000, 0));
        assert_eq!(ids(resolve_user(&root, "1000:5").expect("uid")), (1000, 5));
        let missing = resolve_user(&root, "nobody").expect_err("no such user");
        // Not NotFound: the host reads that as "command not found" (exit status 127).
        assert_eq!(
            missing.code(),
            tonic::Code::FailedPrecondition,
            "{missing:?}"
        );
        assert!(
            missing.message().contains("fix the image's User"),
            "{missing:?}"
        );
        // Group names come from /etc/group.
        assert!(resolve_user(&root, "1:x").is_err(), "no /etc/group");
        std::fs::write(root.join("etc/group"), "root:x:0:\nwww:x:55:web\n").expect("group");
        assert_eq!(
            ids(resolve_user(&root, "web:www").expect("group name")),
            (33, 55)
        );
        assert_eq!(
            ids(resolve_user(&root, "1000:www").expect("group name")),
            (1000, 55)
        );
        let err = resolve_user(&root, "web:nogroup").expect_err("no such group");
        assert!(err.message().contains("/etc/group"), "{err:?}");
        // Supplementary groups: those listing the user (by name or by its uid's entry),
        // none with a group given or for a uid without an entry.
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nwww:x:55:web\naudio:x:29:root, web\nvideo:x:44:webber\n",
        )
        .expect("group");
        assert_eq!(resolve_user(&root, "web").expect("web").groups, [29, 55]);
        assert_eq!(resolve_user(&root, "33").expect("uid").groups, [29, 55]);
        assert!(resolve_user(&root, "web:7").expect("web").groups.is_empty());
        assert!(resolve_user(&root, "1000").expect("uid").groups.is_empty());
    }
}
