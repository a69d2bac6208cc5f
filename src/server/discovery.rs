//! How a daemon on this machine is found: `<data-dir>/daemon.json`, which
//! [`crate::server::run`] writes once both listeners are bound (process
//! id, bound addresses, version) and removes when it stops, and the
//! per-user data directory in which clients start a daemon by themselves
//! (the Python `vcid.Monitor` with no address; `vcid stop` by default).
//!
//! Owns the file's format and location and nothing else: it must not start,
//! signal or connect to anything.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the daemon file inside the data directory.
pub const FILE_NAME: &str = "daemon.json";

/// What a running `vcid serve` tells about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonFile {
    /// Process id of the daemon.
    pub pid: u32,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address (`/metrics`, the web view).
    pub http_addr: SocketAddr,
    /// `vcid` version of the daemon.
    pub version: String,
}

impl DaemonFile {
    /// The file of this process serving on these addresses.
    pub fn current(grpc_addr: SocketAddr, http_addr: SocketAddr) -> Self {
        DaemonFile {
            pid: std::process::id(),
            grpc_addr,
            http_addr,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Writes `<data_dir>/daemon.json` atomically (a reader never sees half
    /// a file).
    pub fn write(&self, data_dir: &Path) -> io::Result<()> {
        let path = data_dir.join(FILE_NAME);
        let tmp = data_dir.join(format!(".{FILE_NAME}.{}", self.pid));
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        std::fs::write(&tmp, text + "\n")?;
        std::fs::rename(&tmp, &path)
    }

    /// Reads `<data_dir>/daemon.json`; `None` when there is none.
    pub fn read(data_dir: &Path) -> io::Result<Option<Self>> {
        let path = data_dir.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes `<data_dir>/daemon.json` if it still names process `pid` (a
    /// daemon started later on the same directory keeps its file).
    pub fn remove(data_dir: &Path, pid: u32) -> io::Result<()> {
        match Self::read(data_dir) {
            Ok(Some(file)) if file.pid == pid => std::fs::remove_file(data_dir.join(FILE_NAME)),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                std::fs::remove_file(data_dir.join(FILE_NAME))
            }
            Err(e) => Err(e),
        }
    }
}

/// The per-user data directory of a daemon that a client starts by itself:
/// `$XDG_DATA_HOME/vcid`, else `$HOME/.local/share/vcid` (`%LOCALAPPDATA%\vcid`
/// on Windows). `None` when none of those variables is set.
pub fn user_data_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if cfg!(windows) {
        return non_empty("LOCALAPPDATA").map(|p| p.join("vcid"));
    }
    if let Some(xdg) = non_empty("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("vcid"));
    }
    non_empty("HOME").map(|home| home.join(".local").join("share").join("vcid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_file_round_trips_and_is_removed_only_by_its_process() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DaemonFile::read(dir.path()).unwrap(), None);
        let file = DaemonFile {
            pid: 4242,
            grpc_addr: "127.0.0.1:50051".parse().unwrap(),
            http_addr: "127.0.0.1:9464".parse().unwrap(),
            version: "0.1.0".into(),
        };
        file.write(dir.path()).unwrap();
        assert_eq!(DaemonFile::read(dir.path()).unwrap(), Some(file.clone()));
        DaemonFile::remove(dir.path(), 1).unwrap();
        assert!(DaemonFile::read(dir.path()).unwrap().is_some());
        DaemonFile::remove(dir.path(), 4242).unwrap();
        assert_eq!(DaemonFile::read(dir.path()).unwrap(), None);

        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        let err = DaemonFile::read(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
