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
