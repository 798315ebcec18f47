//! Process-group handling for the runner: status checks that do not reap,
//! group liveness, SIGTERM-then-SIGKILL shutdown, scratch directories, and a
//! signal handler that kills every running server and shell step when the
//! runner itself is interrupted.
//!
//! A process started by the runner leads a process group of its own and is
//! not reaped until its whole group has been stopped: an unreaped leader keeps
//! the group id reserved, so a later `killpg` can only reach processes the
//! runner started.
//!
//! Only what [`install_signal_cleanup`]'s handler needs is `unsafe` here, plus
//! `waitid` and `mkdtemp`, which std does not offer.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

/// How a process ended: `Exited(code)` or `Signaled(signal)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// The status as the reference runner prints it: the exit code, or minus
    /// the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => -s,
        }
    }
}

/// The exit status of child `pid` if it has ended, else `None`. Does not
/// reap it. A pid that is not (or no longer) our child counts as ended with
/// status -1.
pub fn exit_status(pid: i32) -> Option<ExitStatus> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `info` is a valid, writable siginfo_t for the call's duration.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Some(ExitStatus::Exited(-1));
    }
    // SAFETY: waitid filled `info` (or left it zeroed); si_pid and si_status
    // are valid to read for SIGCHLD-style results, and zero otherwise.
    let (spid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if spid == 0 {
        return None;
    }
    if info.si_code == libc::CLD_EXITED {
        Some(ExitStatus::Exited(status))
    } else {
        Some(ExitStatus::Signaled(status))
    }
}

/// Waits (without reaping) up to `timeout` for `pid` to end.
pub fn wait_exit(pid: i32, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = exit_status(pid);
        if st.is_some() || Instant::now() >= deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to process group `pgid`, ignoring a group that is gone.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// True while a live (non-zombie) process is in process group `pgid`. Uses
/// `/proc`; without it, watches the group leader only.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return exit_status(pgid).is_none();
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(data) = std::fs::read(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parens
        let Some(close) = data.iter().rposition(|&b| b == b')') else {
            continue;
        };
        let rest = String::from_utf8_lossy(data.get(close + 2..).unwrap_or_default()).into_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2].parse::<i32>() == Ok(pgid) {
            return true;
        }
    }
    false
}

/// SIGTERMs group `pgid`, waits up to `grace` for all of it to end, then
/// SIGKILLs whatever is left. The leader must not have been reaped yet.
pub fn stop_group(pgid: i32, grace: Duration) -> bool {
    kill_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut clean = true;
    while group_alive(pgid) {
        if Instant::now() >= deadline {
            clean = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_group(pgid, libc::SIGKILL);
    clean
}

/// Creates a fresh directory `PREFIX-XXXXXX` with mode 0700 (`mkdtemp`).
/// Keep the prefix short: Unix socket paths inside must stay under 108 bytes.
pub fn make_scratch_dir(prefix: &Path) -> io::Result<PathBuf> {
    let mut template = prefix.as_os_str().as_bytes().to_vec();
    template.extend_from_slice(b"-XXXXXX");
    let c = CString::new(template).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut bytes = c.into_bytes_with_nul();
    // SAFETY: `bytes` is a writable NUL-terminated buffer ending in "XXXXXX",
    // as mkdtemp requires; it is only modified in place.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    bytes.pop(); // the NUL
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

// ---------------------------------------------------------------- interrupts

const SLOTS: usize = 512;
static GROUPS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];

/// A process group registered for killing on interrupt; unregisters on drop.
#[derive(Debug)]
pub struct GroupGuard {
    slot: Option<usize>,
}

impl GroupGuard {
    /// Registers `pgid` so that [`install_signal_cleanup`]'s handler kills it.
    /// Drop the guard before reaping the group leader.
    pub fn register(pgid: i32) -> GroupGuard {
        let slot = GROUPS.iter().position(|g| {
            g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        GroupGuard { slot }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            GROUPS[s].store(0, Ordering::SeqCst);
        }
    }
}

/// Scratch folders to remove on interrupt: leaked C strings (never freed,
/// so the handler can never see a dangling pointer), null when unused.
static DIRS: [AtomicPtr<libc::c_char>; SLOTS] = [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS];

/// A scratch folder registered for removal on interrupt; unregisters on drop.
#[derive(Debug)]
pub struct DirGuard {
    slot: Option<usize>,
}

impl DirGuard {
    /// Registers `dir` so that [`install_signal_cleanup`]'s handler removes
    /// it (with `rm -rf`) if the runner is interrupted.
    pub fn register(dir: &Path) -> DirGuard {
        let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
            return DirGuard { slot: None };
        };
        let raw = c.into_raw();
        let slot = DIRS.iter().position(|d| {
            d.compare_exchange(ptr::null_mut(), raw, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        DirGuard { slot }
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            // the string is leaked on purpose (see DIRS)
            DIRS[s].store(ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    for g in &GROUPS {
        let pgid = g.load(Ordering::SeqCst);
        if pgid > 1 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
    let rm = c"/bin/rm";
    let (arg0, flags) = (c"rm", c"-rf");
    for d in &DIRS {
        let dir = d.load(Ordering::SeqCst);
        if dir.is_null() {
            continue;
        }
        // SAFETY: fork, execv, _exit and waitpid are async-signal-safe; the
        // argument strings are static or leaked NUL-terminated C strings.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let argv = [arg0.as_ptr(), flags.as_ptr(), dir as *const _, ptr::null()];
                libc::execv(rm.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            if pid > 0 {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
            }
        }
    }
    let msg = b"interrupted: killed the servers and shell steps still running\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + sig);
    }
}

/// Installs a handler for SIGINT, SIGTERM and SIGHUP that SIGKILLs every
/// server and shell step the runner has running (they sit in process groups
/// of their own, so a terminal's Ctrl-C does not reach them), removes the
/// scratch folders of running transcripts, and exits with 128 + signal.
pub fn install_signal_cleanup() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero sigaction is valid; we set the handler and an
        // empty mask before passing it to sigaction(2), and the handler only
        // uses async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn scratch_dirs_are_fresh() {
        let a = make_scratch_dir(Path::new("/tmp/bt")).unwrap();
        let b = make_scratch_dir(Path::new("/tmp/bt")).unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir());
        assert!(a.as_os_str().len() < 20);
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }

    #[test]
    fn status_without_reaping_and_group_stop() {
        let mut c = Command::new("sh")
            .args(["-c", "exit 3"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        assert_eq!(
            wait_exit(pid, Duration::from_secs(5)),
            Some(ExitStatus::Exited(3))
        );
        // still not reaped: std can reap it
        assert_eq!(c.wait().unwrap().code(), Some(3));

        // a group whose leader ignores SIGTERM's effect via a child
        let mut c = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        std::thread::sleep(Duration::from_millis(100));
        assert!(exit_status(pid).is_none());
        assert!(group_alive(pid));
        assert!(stop_group(pid, Duration::from_secs(5)));
        assert!(!group_alive(pid));
        let st = exit_status(pid).unwrap();
        assert_eq!(st, ExitStatus::Signaled(libc::SIGTERM));
        assert_eq!(st.code(), -libc::SIGTERM);
        c.wait().unwrap();
    }

    #[test]
    fn guard_registers_and_clears() {
        let g = GroupGuard::register(999_999);
        let slot = g.slot.unwrap();
        assert_eq!(GROUPS[slot].load(Ordering::SeqCst), 999_999);
        drop(g);
        assert_eq!(GROUPS[slot].load(Ordering::SeqCst), 0);
    }
}
