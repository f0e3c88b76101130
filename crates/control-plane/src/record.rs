//! Where a running server listens, recorded in its data directory
//! (`DATA/server.json`), so that a command given only `--data-dir` finds
//! the server — `meshward up`'s included, whose port is chosen at random.
//!
//! The server writes the record once it is listening (atomically: a reader
//! sees the whole record or none) and removes it when it exits cleanly. A
//! server that was killed leaves its record behind: a record names the
//! process that wrote it, by pid and start time, so that a reader can tell
//! a record of a running server from a stale one, even once the pid has
//! been given to another process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use meshward_identity::pem;
use serde::{Deserialize, Serialize};

/// The record's file in the data directory.
pub const RECORD_FILE: &str = "server.json";

/// Where the record of the server using `data_dir` is.
pub fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RECORD_FILE)
}

/// A running server, as it recorded itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Where to connect: the address listened on, or loopback of the same
    /// family when listening on every address.
    pub address: SocketAddr,
    /// A name in the server's certificate, to verify it by.
    pub server_name: String,
    /// The server's process.
    pub pid: u32,
    /// When that process started (clock ticks after boot, `/proc/PID/stat`),
    /// so a pid reused by another process is not taken for the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a server record ({error}): remove it, or give --server")]
    Invalid {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("recording where the server listens: {0}")]
    Write(String),
}

impl ServerRecord {
    /// The record of this process, listening on `listening`.
    pub fn of_this_process(listening: SocketAddr, server_name: &str) -> ServerRecord {
        let pid = std::process::id();
        let ip = match listening.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        ServerRecord {
            address: SocketAddr::new(ip, listening.port()),
            server_name: server_name.to_owned(),
            pid,
            started: start_time(pid),
        }
    }

    /// Writes the record into `data_dir`, replacing any; it is removed
    /// when the returned guard is dropped.
    pub fn write(&self, data_dir: &Path) -> Result<Recorded, RecordError> {
        let path = record_path(data_dir);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| RecordError::Write(e.to_string()))?;
        // Atomic, and readable by anyone who can read the directory: it
        // holds no secret.
        pem::write_public(&path, &(text + "\n")).map_err(|e| RecordError::Write(e.to_string()))?;
        Ok(Recorded {
            path,
            pid: self.pid,
        })
    }

    /// The record in `data_dir`, if there is one.
    pub fn read(data_dir: &Path) -> Result<Option<ServerRecord>, RecordError> {
        let path = record_path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(RecordError::Read { path, error }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| RecordError::Invalid { path, error })
    }

    /// Whether the process that wrote the record still runs: its pid is
    /// alive and, when the record says when it started, started then.
    pub fn is_running(&self) -> bool {
        match start_time(self.pid) {
            Some(now) => self.started.is_none_or(|then| then == now),
            None => false,
        }
    }
}

/// The record of this process, in place until dropped (the server's clean
/// exit). A record written since by another process is left alone.
#[derive(Debug)]
pub struct Recorded {
    path: PathBuf,
    pid: u32,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| serde_json::from_str::<ServerRecord>(&text).ok())
            .is_some_and(|r| r.pid == self.pid);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// When process `pid` started, from `/proc/PID/stat`; `None` if there is
/// no such process.
fn start_time(pid: u32) -> Option<u64> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/PID/stat` line, counted after the command name in
/// parentheses (which may itself hold spaces and parentheses).
fn start_time_in(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // Field 3 (state) is the first after the name.
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_record_is_read_back_running_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let record = ServerRecord::of_this_process("127.0.0.1:4242".parse().unwrap(), "localhost");
        assert_eq!(record.pid, std::process::id());
        assert!(record.started.is_some(), "this process has a start time");
        let recorded = record.write(dir.path()).unwrap();
        let read = ServerRecord::read(dir.path()).unwrap().unwrap();
        assert_eq!(read, record);
        assert!(read.is_running());
        drop(recorded);
        assert!(!record_path(dir.path()).exists());
        assert_eq!(ServerRecord::read(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_wildcard_listener_is_recorded_as_loopback() {
        let v4 = ServerRecord::of_this_process("0.0.0.0:15012".parse().unwrap(), "localhost");
        assert_eq!(v4.address, "127.0.0.1:15012".parse().unwrap());
        let v6 = ServerRecord::of_this_process("[::]:15012".parse().unwrap(), "localhost");
        assert_eq!(v6.address, "[::1]:15012".parse().unwrap());
        let exact = ServerRecord::of_this_process("127.0.0.2:1".parse().unwrap(), "localhost");
        assert_eq!(exact.address, "127.0.0.2:1".parse().unwrap());
    }

    #[test]
    fn a_record_of_a_gone_or_other_process_is_stale() {
        let mut record =
            ServerRecord::of_this_process("127.0.0.1:4242".parse().unwrap(), "localhost");
        // A pid the kernel never hands out (above pid_max's hard limit).
        record.pid = u32::MAX;
        assert!(!record.is_running());
        // This pid, but a process that started at another time: the pid
        // was reused.
        let mut reused = ServerRecord::of_this_process("127.0.0.1:1".parse().unwrap(), "x");
        reused.started = reused.started.map(|t| t + 1);
        assert!(!reused.is_running());
    }

    #[test]
    fn a_record_written_since_by_another_process_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ours = ServerRecord::of_this_process("127.0.0.1:1".parse().unwrap(), "localhost");
        let guard = ours.write(dir.path()).unwrap();
        let theirs = ServerRecord {
            pid: ours.pid.wrapping_add(1),
            ..ours.clone()
        };
        // Dropping the first guard must not remove the second writer's
        // record; `forget` leaves that record in place for the check.
        std::mem::forget(theirs.write(dir.path()).unwrap());
        drop(guard);
        assert_eq!(ServerRecord::read(dir.path()).unwrap(), Some(theirs));
    }

    #[test]
    fn a_broken_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(record_path(dir.path()), "{not json").unwrap();
        let e = ServerRecord::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{} is not a server record",
                record_path(dir.path()).display()
            )),
            "{e}"
        );
    }

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_parentheses() {
        let stat = "77 (a) b (c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(start_time_in(stat), Some(123_456));
        assert_eq!(start_time_in("77 (a) S 1"), None);
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }
}
