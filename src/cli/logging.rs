//! Where messages go: stderr while a command runs in the foreground, then syslog or the
//! `log=FILE` file once a mount daemon has detached, so errors never vanish.

use parking_lot::Mutex;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::path::Path;

enum Sink {
    Stderr,
    File(File),
    Syslog,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);

struct SwitchWriter;

impl Write for SwitchWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *SINK.lock() {
            Sink::Stderr => std::io::stderr().write_all(buf)?,
            Sink::File(f) => f.write_all(buf)?,
            Sink::Syslog => {
                let text = String::from_utf8_lossy(buf);
                let line = text.trim_end().replace('\0', " ");
                if let Ok(c) = CString::new(line) {
                    // SAFETY: both strings are valid NUL-terminated C strings.
                    unsafe { libc::syslog(libc::LOG_NOTICE, c"%s".as_ptr(), c.as_ptr()) };
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the logger (once per process). `RUST_LOG` overrides the default level:
/// warnings for commands, and also informational messages (mounts, overlays) for the
/// mount daemon when `daemon`.
pub fn init(daemon: bool) {
    let level = if daemon {
        "info,fuser=error"
    } else {
        "warn,fuser=error"
    };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format(|buf, record| {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let to_file = matches!(&*SINK.lock(), Sink::File(_));
            if to_file {
                writeln!(
                    buf,
                    "[{ts}] qcow2fs[{}] {}: {}",
                    std::process::id(),
                    record.level(),
                    record.args()
                )
            } else {
                writeln!(
                    buf,
                    "qcow2fs: {}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                )
            }
        })
        .target(env_logger::Target::Pipe(Box::new(SwitchWriter)))
        .try_init();
}

/// Sends further messages to `path` (appending).
pub fn to_file(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *SINK.lock() = Sink::File(f);
    Ok(())
}

/// Sends further messages to syslog (the journal on systemd machines).
pub fn to_syslog() {
    // SAFETY: the identifier is a static C string that outlives the process's use of it.
    unsafe { libc::openlog(c"qcow2fs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    *SINK.lock() = Sink::Syslog;
}
