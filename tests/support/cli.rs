//! The `qcow2fs` binary under test: where it is, and running its commands.

use super::process::{COMMAND_LIMIT, Finished, run, run_in, shown, tail};
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;

/// Path of the `qcow2fs` binary under test.
pub fn qcow2fs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2fs")
}

/// Runs `qcow2fs args` in `dir`; panics with its output unless it succeeds; returns stdout.
pub fn qcow2fs<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Vec<u8> {
    run(dir, qcow2fs_bin(), args).stdout
}

/// Runs `qcow2fs args` in `dir` within [`COMMAND_LIMIT`], whatever its exit status.
pub fn qcow2fs_try<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Finished {
    run_in(dir, qcow2fs_bin(), args, COMMAND_LIMIT)
}

/// `qcow2fs` output parsed as JSON.
pub fn qcow2fs_json<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Value {
    let out = qcow2fs(dir, args);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "qcow2fs {} printed invalid JSON: {e}\n{}",
            shown(args),
            tail(&String::from_utf8_lossy(&out), 2000)
        )
    })
}
