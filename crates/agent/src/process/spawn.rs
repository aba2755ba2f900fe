//! Starting a VM's process without copying the agent.
//!
//! `fork` copies the agent's page tables, and every page the agent's threads write
//! afterwards until the child's `exec` becomes a copy-on-write fault (about 90 per
//! process started, counted in the guest). Under TCG each of those guest-kernel paths
//! runs slowly, and in a fresh clone it is translated for the first time. A child made
//! with `clone(CLONE_VM | CLONE_VFORK)` borrows the agent's memory until its `execve`, as
//! glibc's `posix_spawn` does, so there is nothing to copy or fault. `posix_spawn`
//! itself cannot give the child back an `oom_score_adj` of 0 (the agent runs at -1000),
//! and Rust's `Command` forks as soon as a `pre_exec` step is set; hence this module.
//!
//! The child runs on a stack of its own, in the agent's memory, while the thread that
//! cloned it waits (`CLONE_VFORK`) and the agent's other threads go on. So the child
//! only makes system calls through async-signal-safe libc wrappers on data prepared
//! before the clone, never allocates or takes a lock, runs with every signal blocked
//! until its handlers are reset, and reports a failure by writing the `errno` into
//! memory the two share. Containers' processes, whose hooks enter namespaces and change
//! roots, still start through `Command`.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::process::{WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Bytes of the child's stack. Its deepest call is a libc wrapper under `child_main`
/// (no recursion, no large locals): a few hundred bytes are used. Below it lies a guard
/// page, as under glibc's `posix_spawn`.
const CHILD_STACK: usize = 32 << 10;
const GUARD: usize = 4 << 10;

/// The shell that runs a file without a `#!` line.
const SHELL: &std::ffi::CStr = c"/bin/sh";

/// Highest signal number whose disposition the child resets.
const LAST_SIGNAL: c_int = 64;

/// What the child becomes: prepared in full before the clone.
pub struct Plan {
    /// The paths `execve` tries in turn: the program itself when it names a path,
    /// else the program in each directory of the environment's `PATH` (execvp's search).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    workdir: CString,
    terminal: bool,
}

impl Plan {
    /// A plan to run `program` with `args` (argv[0] is `program`), exactly the
    /// environment `env` (later duplicates win), in `workdir`; a terminal process takes
    /// its fd 0 as controlling terminal. Fails on a NUL byte.
    pub fn new<'a>(
        program: &str,
        args: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        workdir: &str,
        terminal: bool,
    ) -> io::Result<Self> {
        let env: BTreeMap<&str, &str> = env.into_iter().collect();
        let candidates = if program.contains('/') {
            vec![c_string(program)?]
        } else {
            env.get("PATH")
                .copied()
                .unwrap_or_default()
                .split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    c_string(&format!("{}/{program}", dir.trim_end_matches('/')))
                })
                .collect::<io::Result<_>>()?
        };
        Ok(Self {
            candidates,
            argv: std::iter::once(program)
                .chain(args.iter().map(String::as_str))
                .map(c_string)
                .collect::<io::Result<_>>()?,
            env: env
                .iter()
                .map(|(key, value)| c_string(&format!("{key}={value}")))
                .collect::<io::Result<_>>()?,
            workdir: c_string(workdir)?,
            terminal,
        })
    }

    /// Starts the plan's process with `stdio` as its fds 0, 1 and 2. Returns when the
    /// child has called `execve` successfully (or failed: then its `errno`, and the child
    /// is reaped).
    pub fn spawn(&self, stdio: [BorrowedFd<'_>; 3]) -> io::Result<Spawned> {
        // The child's dup2s onto 0, 1 and 2 must not overwrite a source not yet dup'ed.
        let mut low = Vec::new();
        let mut fds = [0; 3];
        for (slot, fd) in fds.iter_mut().zip(stdio) {
            *slot = if fd.as_raw_fd() < 3 {
                let copy = rustix::io::fcntl_dupfd_cloexec(fd, 3)?;
                let raw = copy.as_raw_fd();
                low.push(copy);
                raw
            } else {
                fd.as_raw_fd()
            };
        }
        let pointers = |strings: &[CString]| {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<*const c_char>>()
        };
        let argv = pointers(&self.argv);
        let env = pointers(&self.env);
        // execvp's fallback for a file without a `#!` line: `/bin/sh FILE ARGS...`, FILE
        // filled in by the child (slot 1) for the candidate that was not an executable.
        let mut script_argv: Vec<*const c_char> = [SHELL.as_ptr(), std::ptr::null()]
            .into_iter()
            .chain(argv.iter().skip(1).copied())
            .collect();
        let shared = Shared {
            candidates: &self.candidates,
            argv: argv.as_ptr(),
            env: env.as_ptr(),
            workdir: &self.workdir,
            stdio: fds,
            terminal: self.terminal,
            script_argv: script_argv.as_mut_ptr(),
            errno: AtomicI32::new(0),
        };
        let stack = Stack::new()?;
        let top = stack.top();
        let mut pidfd: c_int = -1;
        // SAFETY: every pointer passed lives until `clone` returns, which with CLONE_VFORK
        // is after the child's successful execve or its exit: the child is done with
        // `stack`, `shared` and what it points to. The child runs `child_main` only
        // (see the module's doc). Signals are blocked around the clone so that no handler
        // of the agent's runs in the child on the agent's memory.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top.cast::<c_void>(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                std::ptr::from_ref(&shared).cast_mut().cast::<c_void>(),
                &mut pidfd as *mut c_int,
            );
            let clone_error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_error);
            }
            pid
        };
        drop((stack, low, script_argv));
        if pidfd < 0 {
            // A kernel without CLONE_PIDFD (before 5.2) started the child anyway: end it.
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(io::Error::other(
                "clone gave no pidfd: the guest kernel is older than 5.2",
            ));
        }
        // SAFETY: CLONE_PIDFD stored a new descriptor of the child here, owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let errno = shared.errno.load(Ordering::Acquire);
        if errno != 0 {
            // The child has exited (127) before its release of the clone: reap it.
            let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
            return Err(io::Error::from_raw_os_error(errno));
        }
        // SAFETY: an OwnedFd keeps its descriptor, open, until it is dropped with the
        // AsyncFd that owns it.
        match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(pidfd) => Ok(Spawned {
                pid: pid.unsigned_abs(),
                pidfd,
            }),
            Err(err) => {
                let (pidfd, err) = err.into_parts();
                let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
                let _ =
                    rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
                Err(err)
            }
        }
    }
}

/// The child's stack: an anonymous mapping with a guard page below it.
struct Stack {
    base: *mut c_void,
}

impl Stack {
    fn new() -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping; the guard is its own first page.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                GUARD + CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Self { base };
            if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// The stack's top: it grows down from here (16-byte aligned, as the x86-64 ABI
    /// wants; page-aligned in fact).
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(GUARD + CHILD_STACK)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by nobody once the clone returned.
        unsafe {
            libc::munmap(self.base, GUARD + CHILD_STACK);
        }
    }
}

fn c_string(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {s:?}")))
}

/// A started process, waited for through its pidfd (no pid reuse can confuse it).
pub struct Spawned {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl Spawned {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the process's end and reaps it. Cancel-safe until it returns.
    pub async fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
            match rustix::process::waitid(WaitId::PidFd(self.pidfd.get_ref().as_fd()), options)? {
                Some(status) => {
                    let raw = match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => (code & 0xff) << 8,
                        (None, Some(signal)) => signal | if status.dumped() { 0x80 } else { 0 },
                        (None, None) => 0xff << 8,
                    };
                    return Ok(ExitStatus::from_raw(raw));
                }
                None => ready.clear_ready(),
            }
        }
    }
}

/// What `child_main` reads: pointers into the parent's memory, valid until the clone
/// returns.
struct Shared<'a> {
    candidates: &'a [CString],
    argv: *const *const c_char,
    env: *const *const c_char,
    workdir: &'a CString,
    stdio: [RawFd; 3],
    terminal: bool,
    /// `/bin/sh`, (slot for the file), the arguments after argv[0], NULL.
    script_argv: *mut *const c_char,
    /// Set by the child when it gives up; read by the parent after the clone returns.
    errno: AtomicI32,
}

/// The child's whole life: returns only on failure (then glibc's `clone` exits with it).
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `Shared`, alive until this child execs or exits.
    let shared = unsafe { &*arg.cast::<Shared<'_>>() };
    // SAFETY: only async-signal-safe calls on memory prepared before the clone.
    let errno = unsafe { child_steps(shared) };
    shared.errno.store(errno.max(1), Ordering::Release);
    127
}

fn errno() -> c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The child's steps, in the order Rust's `Command` takes them; returns the `errno` of
/// the step that failed.
unsafe fn child_steps(shared: &Shared<'_>) -> c_int {
    // SAFETY: see the caller.
    unsafe {
        for (target, &fd) in shared.stdio.iter().enumerate() {
            if libc::dup2(fd, target as c_int) < 0 {
                return errno();
            }
        }
        if let Err(err) = super::lead_own_session(shared.terminal) {
            return err.raw_os_error().unwrap_or(libc::EIO);
        }
        if libc::chdir(shared.workdir.as_ptr()) < 0 {
            return errno();
        }
        // Handlers would run on the agent's memory: back to the defaults, and SIGPIPE (which
        // Rust's runtime ignores) too; other ignored signals stay ignored across exec. Then
        // the empty mask a new program expects.
        for signal in 1..=LAST_SIGNAL {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // execvp's search: a missing candidate moves on, a denied one is remembered.
        let mut denied = false;
        let mut last = libc::ENOENT;
        for path in shared.candidates {
            libc::execve(path.as_ptr(), shared.argv, shared.env);
            last = errno();
            if last == libc::ENOEXEC {
                // Not an executable format: a script without `#!`, run by the shell as
                // glibc's execvp does.
                *shared.script_argv.add(1) = path.as_ptr();
                libc::execve(SHELL.as_ptr(), shared.script_argv.cast_const(), shared.env);
                last = errno();
            }
            match last {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return last,
            }
        }
        if denied {
            libc::EACCES
        } else {
            last
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Runs `sh -c script` with `env` in `workdir`; its output and end.
    async fn run(script: &str, env: &[(&str, &str)], workdir: &str) -> (String, ExitStatus) {
        let plan = Plan::new(
            "sh",
            &args(&["-c", script]),
            env.iter().copied(),
            workdir,
            false,
        )
        .expect("plan");
        let null = std::fs::File::open("/dev/null").expect("null");
        let (read, write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        let child = plan
            .spawn([null.as_fd(), write.as_fd(), write.as_fd()])
            .expect("spawn");
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        (out, child.wait().await.expect("wait"))
    }

    const PATH: (&str, &str) = ("PATH", "/bin:/usr/bin");

    #[tokio::test]
    async fn the_child_gets_its_own_session_no_inherited_signal_state_and_a_clean_environment() {
        // SAFETY: a process-wide disposition for SIGUSR1, the agent's kind of state; no
        // other test of this binary uses SIGUSR1.
        unsafe {
            libc::signal(libc::SIGUSR1, libc::SIG_IGN);
        }
        // The shell's own signal state is read with builtins (`read`, `echo`): a forked
        // reader (grep) could see the mask the shell holds while it forks.
        let script = "echo \"$$ $(cut -d' ' -f6 /proc/$$/stat)\"; \
            while read -r line; do case $line in SigBlk*|SigIgn*) echo \"$line\";; esac; done < /proc/$$/status; \
            env | sort; pwd";
        let (out, status) = run(script, &[PATH, ("B", "2"), ("A", "1"), ("A", "3")], "/tmp").await;
        assert!(status.success(), "{status:?} {out}");
        let mut lines = out.lines();
        let ids: Vec<&str> = lines.next().expect("ids").split(' ').collect();
        assert_eq!(ids[0], ids[1], "the child leads its own session: {out}");
        let blocked = lines.next().expect("SigBlk");
        assert_eq!(blocked, "SigBlk:\t0000000000000000", "{out}");
        let ignored = u64::from_str_radix(
            lines
                .next()
                .expect("SigIgn")
                .trim_start_matches("SigIgn:\t"),
            16,
        )
        .expect("hex");
        let bit = |signal: c_int| 1u64 << (signal - 1);
        assert_eq!(
            ignored & bit(libc::SIGPIPE),
            0,
            "SIGPIPE back to its default: {out}"
        );
        assert_ne!(
            ignored & bit(libc::SIGUSR1),
            0,
            "an ignored signal stays ignored: {out}"
        );
        let rest: Vec<&str> = lines.collect();
        // Exactly the given environment, the last of a duplicate winning (sh adds PWD,
        // SHLVL and _ of its own).
        let given: Vec<&str> = rest
            .iter()
            .copied()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        assert_eq!(given, ["A=3", "B=2", "PATH=/bin:/usr/bin", "/tmp"], "{out}");
        // SAFETY: as above.
        unsafe {
            libc::signal(libc::SIGUSR1, libc::SIG_DFL);
        }
    }

    #[tokio::test]
    async fn exit_codes_and_signals_come_back() {
        let (_, status) = run("exit 42", &[PATH], "/").await;
        assert_eq!(status.code(), Some(42));
        let (_, status) = run("kill -TERM $$", &[PATH], "/").await;
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(libc::SIGTERM))
        );
    }

    #[tokio::test]
    async fn the_path_search_is_execvps_and_failures_are_the_childs_errno() {
        let dir = tempfile::tempdir().expect("dir");
        let denied = dir.path().join("denied");
        std::fs::create_dir(&denied).expect("mkdir");
        let program = denied.join("true");
        std::fs::write(&program, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let stdio = || std::fs::File::open("/dev/null").expect("null");
        let (a, b, c) = (stdio(), stdio(), stdio());
        let fds = || [a.as_fd(), b.as_fd(), c.as_fd()];
        let spawn = |path: &str, program: &str, workdir: &str| {
            Plan::new(program, &[], [("PATH", path)], workdir, false)
                .expect("plan")
                .spawn(fds())
        };
        // A denied candidate is passed over for a later one, and only reported when
        // nothing else ran.
        let path = format!("/nonexistent:{}:/bin:/usr/bin", denied.display());
        let child = spawn(&path, "true", "/").expect("found after a denied one");
        assert!(child.wait().await.expect("wait").success());
        let only_denied = spawn(&denied.display().to_string(), "true", "/")
            .err()
            .expect("denied");
        assert_eq!(only_denied.kind(), io::ErrorKind::PermissionDenied);
        let missing = spawn("/bin:/usr/bin", "no-such-program-here", "/")
            .err()
            .expect("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let no_dir = spawn("/bin:/usr/bin", "true", "/nonexistent/dir")
            .err()
            .expect("workdir");
        assert_eq!(no_dir.kind(), io::ErrorKind::NotFound);
        assert!(
            Plan::new("tr\0ue", &[], [], "/", false).is_err(),
            "NUL refused"
        );
        // A file without `#!` is run by the shell, as execvp does.
        let script = dir.path().join("script");
        std::fs::write(&script, "echo script-ran \"$1\" >&2; exit 4\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (read, write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        let plan = Plan::new(
            &script.display().to_string(),
            &args(&["an arg"]),
            [PATH],
            "/",
            false,
        )
        .expect("plan");
        // Another test's child may hold the just-written file open between its fork and
        // exec (ETXTBSY): try again.
        let mut tries = 0;
        let child = loop {
            match plan.spawn([a.as_fd(), b.as_fd(), write.as_fd()]) {
                Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                spawned => break spawned.expect("script"),
            }
        };
        drop(write);
        let mut said = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut said)
            .expect("read");
        assert_eq!(said, "script-ran an arg\n");
        assert_eq!(child.wait().await.expect("wait").code(), Some(4));
        // The failed children were reaped: no zombie child of this process is left that
        // never became another program: named as this thread, which cloned it (other
        // tests' children exec).
        let me = std::process::id().to_string();
        let comm = std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
        let own_zombie = format!("({}) Z {me} ", comm.trim_end());
        let zombies = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
            .filter(|stat| stat.contains(&own_zombie))
            .count();
        assert_eq!(zombies, 0);
    }
}
