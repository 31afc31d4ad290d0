//! Running programs from tests: one runner with a time limit (and an optional cap on
//! what it may print), the processes of the system (alive, gone, signalled), and waiting
//! for a condition with a deadline.
//!
//! Output goes to anonymous files, not pipes, so a background process that inherits them
//! (a daemon that forgot to detach) cannot make a test wait; stdin is /dev/null.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Time limit of a command that has no reason to take long (qemu-img, qemu-io, mkfs).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// The last `max` characters of `s`, for failure messages.
pub fn tail(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_string()
    } else {
        format!("...{}", s.chars().skip(n - max).collect::<String>())
    }
}

/// Arguments as a shell would show them (quoted when they hold a space or are empty).
pub fn shown<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| {
            let a = a.as_ref().to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a command run with [`run_capped`] did.
#[derive(Debug)]
pub struct Finished {
    /// What ran, for messages.
    pub command: String,
    /// `None`: it was still running at the time limit and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
    /// Stdout passed the cap and the process was killed.
    pub capped: bool,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code; `None` when killed by a signal or by the time limit.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// The signal that ended the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    /// Whether the time limit ended it.
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// Stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stdout and stderr together (qemu-io prints some errors on stdout).
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout_text(), self.stderr)
    }

    /// Everything known about the run, for a failure message.
    pub fn describe(&self) -> String {
        let status = match self.status {
            None => format!("still running after {:?}, killed", self.elapsed),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
        };
        let capped = if self.capped { " (output cap)" } else { "" };
        format!(
            "`{}`: {status}{capped}\n  stderr: {:?}\n  stdout: {:?}",
            self.command,
            tail(&self.stderr, 3000),
            tail(&self.stdout_text(), 1500)
        )
    }

    /// Panics with [`Finished::describe`] unless the command failed and its output
    /// mentions `word`.
    pub fn expect_failure_saying(self, word: &str) -> Finished {
        assert!(
            !self.success() && self.all_output().contains(word),
            "expected a failure mentioning {word:?}: {}",
            self.describe()
        );
        self
    }

    /// Panics with [`Finished::describe`] unless the command exited 0.
    pub fn expect_success(self) -> Finished {
        assert!(self.success(), "{}", self.describe());
        self
    }
}

fn read_back(mut f: File, cap: u64) -> Vec<u8> {
    let mut v = Vec::new();
    f.rewind().unwrap();
    f.take(cap).read_to_end(&mut v).unwrap();
    v
}

/// Runs `cmd` for at most `limit` (then kills it), and kills it as soon as its stdout
/// passes `cap` bytes (a large disk streaming out is not a hang).
pub fn run_capped(cmd: &mut Command, limit: Duration, cap: u64) -> Finished {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        shown(&cmd.get_args().collect::<Vec<_>>())
    );
    let out = tempfile::tempfile().expect("creating a temporary file");
    let err = tempfile::tempfile().expect("creating a temporary file");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let mut capped = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break Some(s);
        }
        capped = out.metadata().is_ok_and(|m| m.len() > cap);
        if capped {
            let _ = child.kill();
            break Some(child.wait().expect("waiting for a child"));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Finished {
        command,
        status,
        stdout: read_back(out, cap),
        stderr: String::from_utf8_lossy(&read_back(err, 1 << 20)).into_owned(),
        elapsed: start.elapsed(),
        capped,
    }
}

/// Runs `cmd` for at most `limit`; see [`run_capped`].
pub fn run_timeout(cmd: &mut Command, limit: Duration) -> Finished {
    run_capped(cmd, limit, u64::MAX)
}

/// `program args` run in `dir` with [`run_timeout`], whatever its exit status.
pub fn run_in<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S], limit: Duration) -> Finished {
    run_timeout(Command::new(program).args(args).current_dir(dir), limit)
}

/// `program args` in `dir`; panics with its output unless it exits 0 within
/// [`COMMAND_LIMIT`].
pub fn run<S: AsRef<OsStr>>(dir: &Path, program: &str, args: &[S]) -> Finished {
    let r = run_in(dir, program, args, COMMAND_LIMIT);
    assert!(r.success(), "in {}: {}", dir.display(), r.describe());
    r
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name, which may hold spaces.
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` until `cond()` holds; returns whether it did.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for `pid` to be gone; true if it is.
pub fn wait_pid_gone(pid: i32, limit: Duration) -> bool {
    wait_until(limit, || !pid_alive(pid))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Kills `pid` (SIGKILL) if it keeps running past a grace period.
pub fn ensure_gone(pid: i32, what: &str) {
    if pid_alive(pid) && !wait_pid_gone(pid, Duration::from_secs(10)) {
        eprintln!("cleanup: {what} (pid {pid}) still running; killing it");
        signal(pid, libc::SIGKILL);
        wait_pid_gone(pid, Duration::from_secs(5));
    }
}

/// Every process as `(pid, /proc/PID)` (none when /proc cannot be read).
pub fn processes() -> Vec<(i32, PathBuf)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, e.path()))
        })
        .collect()
}

/// `(pid, command, path)` of every open descriptor of any process on a file under `dir`.
pub fn open_files_under(dir: &Path) -> Vec<(i32, String, PathBuf)> {
    let mut found = Vec::new();
    for (pid, proc_dir) in processes() {
        let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
                found.push((pid, comm.trim().to_string(), target));
            }
        }
    }
    found
}

/// The text of a caught panic.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "<non-string panic>".into()
    }
}

/// Runs `check(name)` for every name, catching panics, and fails once at the end with the
/// names (and messages) of all that failed.
pub fn run_each<T: AsRef<str>>(what: &str, names: &[T], check: impl Fn(&str)) {
    let mut failures = Vec::new();
    for name in names {
        let name = name.as_ref();
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(name))) {
            failures.push(format!("{name}: {}", panic_text(&*p)));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} failed:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}
