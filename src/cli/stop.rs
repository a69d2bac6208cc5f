//! `vcid stop`: ends the daemon that serves a data directory on this
//! machine, found through its `daemon.json` (see `server::discovery`):
//! SIGTERM (the daemon's graceful shutdown: in-flight batches finish, open
//! epochs are checkpointed), then wait until the process is gone.
//!
//! Owns finding the process and telling whether it is still a vcid daemon;
//! it must not touch the data directory beyond removing a stale
//! `daemon.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::CliError;
use crate::server::discovery::{self, DaemonFile};

/// Arguments of `vcid stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// Data directory of the daemon to stop [default: the per-user one that
    /// the Python client starts a daemon in: $XDG_DATA_HOME/vcid, else
    /// ~/.local/share/vcid].
    #[arg(long, env = "VCID_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// How long to wait for the daemon to exit after SIGTERM.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

/// Runs `vcid stop`.
pub fn run(args: StopArgs) -> Result<(), CliError> {
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => discovery::user_data_dir().ok_or_else(|| {
            CliError::Input(
                "--data-dir: expected a directory (neither XDG_DATA_HOME nor HOME is set)".into(),
            )
        })?,
    };
    let file = DaemonFile::read(&data_dir)
        .map_err(|e| CliError::Failed(format!("reading the daemon file: {e}")))?
        .ok_or_else(|| none_runs(&data_dir, "it has no daemon.json"))?;
    if !is_vcid_daemon(file.pid) {
        // It crashed (or was killed) without removing its file.
        let _ = DaemonFile::remove(&data_dir, file.pid);
        return Err(none_runs(
            &data_dir,
            &format!(
                "its daemon.json names process {}, which is no longer running; removed the stale file",
                file.pid
            ),
        ));
    }
    terminate(file.pid)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while is_running(file.pid) {
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the vcid daemon (pid {}) is still running {} s after SIGTERM (a large checkpoint \
                 can take a while; run `vcid stop` again to keep waiting)",
                file.pid, args.timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "stopped the vcid daemon (pid {}, gRPC {}, data {})",
        file.pid,
        file.grpc_addr,
        data_dir.display()
    );
    Ok(())
}

fn none_runs(data_dir: &Path, why: &str) -> CliError {
    CliError::Failed(format!(
        "no vcid daemon runs for {}: {why} (a daemon started with `vcid serve --data-dir DIR` \
         is stopped with `vcid stop --data-dir DIR`)",
        data_dir.display()
    ))
}

/// Whether `pid` is alive and, where `/proc` tells, a `vcid serve` (the
/// number of a crashed daemon may have been reused by another program).
fn is_vcid_daemon(pid: u32) -> bool {
    if !is_running(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline.split(|&b| b == 0).any(|arg| arg == b"serve"),
        Err(_) => true,
    }
}

/// Whether `pid` exists and is not a zombie (an exited child its parent
/// has not reaped yet counts as gone).
#[cfg(unix)]
fn is_running(pid: u32) -> bool {
    let Ok(id) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(id, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[cfg(unix)]
fn terminate(pid: u32) -> Result<(), CliError> {
    let id = libc::pid_t::try_from(pid)
        .map_err(|_| CliError::Failed(format!("process id {pid} is out of range")))?;
    // SAFETY: sends SIGTERM to the process named by the daemon file, after
    // checking that it is a running vcid daemon.
    if unsafe { libc::kill(id, libc::SIGTERM) } != 0 {
        return Err(CliError::Failed(format!(
            "sending SIGTERM to the vcid daemon (pid {pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn is_running(_pid: u32) -> bool {
    false
}

#[cfg(not(unix))]
fn terminate(pid: u32) -> Result<(), CliError> {
    Err(CliError::Failed(format!(
        "`vcid stop` needs Unix signals; end process {pid} with your system's tools"
    )))
}
