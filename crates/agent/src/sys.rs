//! Guest system operations: details, clock, RNG, CPU and memory onlining.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmfactory_protocols::agent::{GuestDetailsResponse, OnlineCpuMemResponse};

/// Largest entropy buffer accepted by `ReseedRandomDev`.
pub use vmfactory_protocols::contract::MAX_RESEED_BYTES;
/// How long `OnlineCPUMem` waits for hot-plugged CPUs to appear.
const ONLINE_WAIT: Duration = Duration::from_secs(10);

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Errors of guest system operations.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SysError(String);

fn io_error(what: &str, path: &Path, err: std::io::Error) -> SysError {
    SysError(format!("{what} {}: {err}", path.display()))
}

/// Kernel release, online CPUs, MemTotal and agent version.
pub fn guest_details() -> Result<GuestDetailsResponse, SysError> {
    let online = read("/sys/devices/system/cpu/online")?;
    let meminfo = read("/proc/meminfo")?;
    Ok(GuestDetailsResponse {
        kernel_release: kernel_release()?,
        online_cpus: count_cpu_list(&online)
            .ok_or_else(|| SysError(format!("Unparsable CPU list {online:?}")))?,
        mem_total_kib: mem_total_kib(&meminfo)
            .ok_or_else(|| SysError("No MemTotal in /proc/meminfo".into()))?,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        clocksource: clocksource(),
    })
}

/// The kernel's current clocksource; empty when sysfs does not say.
fn clocksource() -> String {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|name| name.trim().chars().take(64).collect())
        .unwrap_or_default()
}

fn read(path: &str) -> Result<String, SysError> {
    std::fs::read_to_string(path).map_err(|err| io_error("Cannot read", Path::new(path), err))
}

fn kernel_release() -> Result<String, SysError> {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(SysError(format!(
            "uname failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Counts the CPUs in a kernel CPU list such as `0-3,5,7-8`.
pub fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    let mut count = 0u32;
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
                count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
            }
            None => {
                part.parse::<u32>().ok()?;
                count = count.checked_add(1)?;
            }
        }
    }
    Some(count)
}

/// Reads `MemTotal` (KiB) from the text of `/proc/meminfo`.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sets `CLOCK_REALTIME`.
pub fn set_clock(sec: i64, usec: i64) -> Result<(), SysError> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: (usec * 1000) as libc::c_long,
    };
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(SysError(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `sec` seconds and `nsec` nanoseconds.
pub fn set_clock_ns(sec: i64, nsec: u32) -> Result<(), SysError> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(SysError(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

/// Sets the hostname (of the agent's UTS namespace, the guest's).
pub fn set_hostname(name: &str) -> Result<(), SysError> {
    // SAFETY: a valid buffer of the given length; the kernel copies it.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(SysError(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

/// `/dev/random`, opened once for every reseed.
static RANDOM_DEVICE: OnceLock<File> = OnceLock::new();

/// Opens `/dev/random` for [`reseed_rng`], once. The server does it when it starts, so a
/// template's clones inherit the open descriptor and their hand-out does not look the
/// device up, open and close it (guest code a clone's QEMU would translate anew).
pub fn random_device() -> Result<&'static File, SysError> {
    if let Some(file) = RANDOM_DEVICE.get() {
        return Ok(file);
    }
    let path = Path::new("/dev/random");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|err| io_error("Cannot open", path, err))?;
    Ok(RANDOM_DEVICE.get_or_init(|| file))
}

/// Credits `data` to the kernel's entropy pool and forces a CRNG reseed.
pub fn reseed_rng(data: &[u8]) -> Result<(), SysError> {
    let file = random_device()?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built as
    // u32 words so the kernel's array is aligned.
    let len = u32::try_from(data.len()).map_err(|_| SysError("Too much data".into()))?;
    let mut words = Vec::with_capacity(2 + data.len().div_ceil(4));
    words.push(len.saturating_mul(8)); // entropy credited, in bits
    words.push(len);
    words.extend(data.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of 8 + buf_size bytes from a valid buffer.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) } != 0 {
        return Err(SysError(format!(
            "RNDADDENTROPY failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(SysError(format!(
            "RNDRESEEDCRNG failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Onlines every offline CPU (and memory block unless `cpu_only`). Waits until `nb_cpus`
/// CPUs are online and online memory blocks cover `memory_mib` (0: no wait), as the
/// guest's ACPI handler adds hot-plugged CPUs and memory after QEMU has answered.
pub async fn online_cpu_mem(
    nb_cpus: u32,
    cpu_only: bool,
    memory_mib: u32,
) -> Result<OnlineCpuMemResponse, SysError> {
    let started = Instant::now();
    let mut response = OnlineCpuMemResponse::default();
    loop {
        response.cpus_onlined += online_all(
            Path::new("/sys/devices/system/cpu"),
            "cpu",
            "online",
            "0",
            "1",
        )?;
        if !cpu_only {
            response.memory_blocks_onlined += online_all(
                Path::new("/sys/devices/system/memory"),
                "memory",
                "state",
                "offline",
                "online",
            )?;
        }
        let online = count_cpu_list(&read("/sys/devices/system/cpu/online")?).unwrap_or(0);
        let memory = if cpu_only || memory_mib == 0 {
            u64::MAX
        } else {
            online_memory_mib(Path::new("/sys/devices/system/memory"))?
        };
        if online >= nb_cpus && memory >= u64::from(memory_mib) {
            return Ok(response);
        }
        if started.elapsed() > ONLINE_WAIT {
            return Err(SysError(if online < nb_cpus {
                format!("Only {online} of {nb_cpus} CPUs came online within {ONLINE_WAIT:?}")
            } else {
                format!(
                    "Only {memory} of {memory_mib} MiB of memory came online within {ONLINE_WAIT:?}"
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// MiB of memory in online memory blocks under `dir` (`/sys/devices/system/memory`).
fn online_memory_mib(dir: &Path) -> Result<u64, SysError> {
    let path = dir.join("block_size_bytes");
    let block_size =
        std::fs::read_to_string(&path).map_err(|err| io_error("Cannot read", &path, err))?;
    let block_size = u64::from_str_radix(block_size.trim(), 16)
        .map_err(|_| SysError(format!("Unparsable memory block size {block_size:?}")))?;
    let entries = std::fs::read_dir(dir).map_err(|err| io_error("Cannot list", dir, err))?;
    let online = entries
        .flatten()
        .filter(|entry| is_numbered(entry, "memory"))
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("state"))
                .is_ok_and(|state| state.trim() == "online")
        })
        .count();
    Ok((online as u64).saturating_mul(block_size) >> 20)
}

/// True for a sysfs item `<prefix>N` (N decimal), such as `cpu3` or `memory32`.
fn is_numbered(entry: &std::fs::DirEntry, prefix: &str) -> bool {
    entry
        .file_name()
        .to_str()
        .and_then(|name| name.strip_prefix(prefix))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Writes `on` to `<dir>/<prefix>N/<file>` wherever it reads `off`; returns how many.
fn online_all(dir: &Path, prefix: &str, file: &str, off: &str, on: &str) -> Result<u32, SysError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(io_error("Cannot list", dir, err)),
    };
    let mut count = 0;
    for entry in entries.flatten() {
        if !is_numbered(&entry, prefix) {
            continue;
        }
        let path = entry.path().join(file);
        let Ok(state) = std::fs::read_to_string(&path) else {
            continue; // cpu0 has no "online" file
        };
        if state.trim() == off {
            match std::fs::write(&path, on) {
                Ok(()) => count += 1,
                // The kernel onlines hot-plugged memory itself (`memhp_default_state`):
                // a write racing it fails, and the item is online all the same.
                Err(_) if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != off) => {}
                Err(err) => return Err(io_error("Cannot online", &path, err)),
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpu_list(""), Some(0));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a"), None);
    }

    #[test]
    fn parses_mem_total() {
        let meminfo = "MemTotal:         228700 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total_kib(meminfo), Some(228_700));
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn onlines_only_offline_items() {
        let dir = std::env::temp_dir().join(format!("vmf-online-{}", std::process::id()));
        for (name, state) in [("cpu0", None), ("cpu1", Some("0")), ("cpu2", Some("1"))] {
            std::fs::create_dir_all(dir.join(name)).expect("mkdir");
            if let Some(state) = state {
                std::fs::write(dir.join(name).join("online"), state).expect("write");
            }
        }
        std::fs::create_dir_all(dir.join("cpufreq")).expect("mkdir");
        let count = online_all(&dir, "cpu", "online", "0", "1").expect("online");
        assert_eq!(count, 1);
        let state = std::fs::read_to_string(dir.join("cpu1/online")).expect("read");
        assert_eq!(state, "1");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn counts_online_memory_blocks() {
        let dir = std::env::temp_dir().join(format!("vmf-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("block_size_bytes"), "8000000\n").expect("write");
        for (name, state) in [
            ("memory0", "online\n"),
            ("memory1", "online\n"),
            ("memory32", "offline\n"),
            ("memoryx", "online\n"),
        ] {
            std::fs::create_dir_all(dir.join(name)).expect("mkdir");
            std::fs::write(dir.join(name).join("state"), state).expect("write");
        }
        assert_eq!(online_memory_mib(&dir).expect("count"), 256);
        std::fs::write(dir.join("memory32/state"), "online\n").expect("write");
        assert_eq!(online_memory_mib(&dir).expect("count"), 384);
        std::fs::write(dir.join("block_size_bytes"), "zz").expect("write");
        assert!(online_memory_mib(&dir).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
