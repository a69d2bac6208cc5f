//! The real `vcid serve` binary as a child process for the load examples
//! (`soak`, `ingest_load --child`): started on free loopback ports with a
//! temporary data directory, found through its `daemon.json`, killed when
//! dropped; and its memory read from `/proc`. Included with `#[path]` by
//! each example that needs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vcid::server::discovery::DaemonFile;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The daemon child; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub file: DaemonFile,
    _data: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/release/vcid` next to the running example's directory.
pub fn default_bin() -> Result<PathBuf, BoxError> {
    std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("vcid"))
        .ok_or_else(|| "cannot locate target/release/vcid; pass --bin".into())
}

/// Starts `bin serve` on free loopback ports and waits (at most 30 s) for
/// its `daemon.json`.
pub fn start_daemon(bin: &Path) -> Result<Daemon, BoxError> {
    let data = tempfile::tempdir()?;
    let child = Command::new(bin)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--log-level", "warn", "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(file) = DaemonFile::read(data.path())? {
            return Ok(Daemon {
                child,
                file,
                _data: data,
            });
        }
        if Instant::now() > deadline {
            return Err("the daemon did not write daemon.json within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A memory field of `/proc/{pid}/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU time (user + system, all threads) and minor page faults of
/// process `pid` so far, from `/proc/{pid}/stat`.
#[allow(dead_code, reason = "used by ingest_load, not by soak")]
pub fn cpu_and_faults(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in `(...)`:
    // state is field 3, minflt 10, utime 14 and stime 15 (proc(5)).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    let cpu = field(14)? + field(15)?;
    Some((
        Duration::from_secs_f64(cpu as f64 / ticks as f64),
        field(10)?,
    ))
}
