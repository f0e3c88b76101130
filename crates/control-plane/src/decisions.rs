//! Decision records reported by proxies (`meshward proxy
//! --report-decisions`), kept in a bounded window of recent ones under the
//! data directory, for `meshward suggest --data-dir` and `meshward replay
//! --data-dir`.
//!
//! The window is two files, `DATA/decisions/window-0.jsonl` (older) and
//! `window-1.jsonl` (newer), each at most half the window's size: when the
//! newer one would grow past that it becomes the older one, whose records
//! are dropped. Files are 0600 in a 0700 directory: records name callers
//! and paths.
//!
//! A proxy reports its own workload's decisions only. Each record's
//! `workload` is set from the registry — the workload the reporting proxy's
//! certificate, address and claim resolve to, as for its distribution
//! stream — whatever the record said, and the reporter's identity is added;
//! a record that is not an inbound decision record, or whose claim does not
//! resolve, is refused. A proxy can so only speak for traffic to its own
//! workload, which it decides anyway. Every report checks revocation, as
//! every push does: a revoked proxy's open connection reports nothing more.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meshward_api::control::decisions_server::Decisions;
use meshward_api::control::{DecisionBatch, DecisionBatchResponse};
use meshward_policy::learn::record::{is_http_token, is_unsafe_char};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::push::{Hub, caller, refused_status};

/// The directory under the data directory.
pub const DIRECTORY: &str = "decisions";
/// The window's default size in bytes (both files).
pub const DEFAULT_WINDOW: u64 = 64 << 20;
/// At most this many records per batch...
pub const MAX_BATCH_RECORDS: usize = 1024;
/// ...each at most this long.
pub const MAX_RECORD_BYTES: usize = 64 << 10;

const OLDER: &str = "window-0.jsonl";
const NEWER: &str = "window-1.jsonl";

/// The window on disk.
#[derive(Debug)]
pub struct Window {
    dir: PathBuf,
    /// Each file's limit: half the window.
    per_file: u64,
    newer: Mutex<Option<(std::fs::File, u64)>>,
}

impl Window {
    /// The window under `data_dir`, `size` bytes in all (two files).
    pub fn open(data_dir: &Path, size: u64) -> std::io::Result<Window> {
        let dir = data_dir.join(DIRECTORY);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Window {
            dir,
            per_file: (size / 2).max(1),
            newer: Mutex::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `lines` (each ending in a newline), turning the newer file
    /// into the older one first when they would not fit.
    pub fn append(&self, lines: &[Vec<u8>]) -> std::io::Result<()> {
        let bytes: u64 = lines.iter().map(|l| l.len() as u64).sum();
        let mut newer = self
            .newer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let size = match newer.as_ref() {
            Some((_, size)) => *size,
            None => std::fs::metadata(self.dir.join(NEWER)).map_or(0, |m| m.len()),
        };
        if size > 0 && size + bytes > self.per_file {
            *newer = None;
            std::fs::rename(self.dir.join(NEWER), self.dir.join(OLDER))?;
        }
        if newer.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(self.dir.join(NEWER))?;
            let size = file.metadata()?.len();
            *newer = Some((file, size));
        }
        let Some((file, size)) = newer.as_mut() else {
            return Ok(());
        };
        let mut out = std::io::BufWriter::new(&*file);
        for line in lines {
            out.write_all(line)?;
        }
        out.flush()?;
        *size += bytes;
        Ok(())
    }
}

/// Why a reported record is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not an inbound decision record of version 1 or later")]
    NotADecision,
    #[error("longer than {MAX_RECORD_BYTES} bytes")]
    TooLong,
    #[error("its method is not an HTTP token")]
    Method,
    #[error("a string holds a control character or line break")]
    ControlCharacter,
    #[error("{0}")]
    Workload(String),
}

/// Whether any string in `value` (keys too) holds a character that could
/// end or forge a line where records are written out.
fn holds_unsafe_char(value: &Value) -> bool {
    let unsafe_str = |s: &str| s.chars().any(is_unsafe_char);
    match value {
        Value::String(s) => unsafe_str(s),
        Value::Array(items) => items.iter().any(holds_unsafe_char),
        Value::Object(fields) => fields
            .iter()
            .any(|(k, v)| unsafe_str(k) || holds_unsafe_char(v)),
        _ => false,
    }
}

/// The record to keep for `line`, reported by `reporter` for `workload`
/// (namespace, name, labels): its own workload field replaced.
pub fn accept(
    line: &[u8],
    reporter: &str,
    workload: impl FnOnce(Option<&str>) -> Result<Value, String>,
) -> Result<Vec<u8>, Refused> {
    if line.len() > MAX_RECORD_BYTES {
        return Err(Refused::TooLong);
    }
    let mut record: Value =
        serde_json::from_slice(line).map_err(|e| Refused::NotJson(e.to_string()))?;
    let Some(fields) = record.as_object_mut() else {
        return Err(Refused::NotADecision);
    };
    let is = |k: &str, v: &str| fields.get(k).and_then(Value::as_str) == Some(v);
    let versioned = fields
        .get("v")
        .and_then(Value::as_u64)
        .is_some_and(|v| v >= 1);
    if !is("type", "access") || !is("direction", "inbound") || !versioned {
        return Err(Refused::NotADecision);
    }
    // What a proxy writes holds neither; a compromised one could use them to
    // forge lines of what `suggest` and `replay` print.
    match fields.get("method") {
        None | Some(Value::Null) => {}
        Some(Value::String(method)) if is_http_token(method) => {}
        Some(_) => return Err(Refused::Method),
    }
    if fields
        .iter()
        .any(|(k, v)| k.chars().any(is_unsafe_char) || holds_unsafe_char(v))
    {
        return Err(Refused::ControlCharacter);
    }
    let claim = fields
        .get("workload")
        .and_then(|w| w.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let namespace = fields
        .get("workload")
        .and_then(|w| w.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let claim = match (namespace, claim) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        _ => None,
    };
    let truth = workload(claim.as_deref()).map_err(Refused::Workload)?;
    fields.insert("workload".into(), truth);
    fields.insert("reporter".into(), Value::String(reporter.to_owned()));
    let mut out = serde_json::to_vec(&record).map_err(|e| Refused::NotJson(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

/// The gRPC service: batches from proxies, into the window.
pub struct DecisionsService {
    pub hub: Arc<Hub>,
    pub window: Arc<Window>,
}

#[tonic::async_trait]
impl Decisions for DecisionsService {
    async fn report(
        &self,
        request: Request<DecisionBatch>,
    ) -> Result<Response<DecisionBatchResponse>, Status> {
        let (identity, _) = caller(&request, "a proxy reports with its workload certificate")?;
        // Checked per report, not only at the handshake: the channel a
        // proxy reports on outlives a revocation.
        let leaf = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned());
        if let Some(leaf) = leaf {
            self.hub
                .check_revocation(&leaf)
                .map_err(|refusal| refused_status(&refusal))?;
        }
        let peer = request.remote_addr();
        let batch = request.into_inner();
        if batch.records.len() > MAX_BATCH_RECORDS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH_RECORDS} records per batch"
            )));
        }
        let reporter = identity.to_string();
        let mut placed: HashMap<Option<String>, Result<Value, String>> = HashMap::new();
        let mut kept = Vec::with_capacity(batch.records.len());
        let mut refused = 0u64;
        let mut first_refusal = None;
        for line in &batch.records {
            let accepted = accept(line, &reporter, |claim| {
                placed
                    .entry(claim.map(str::to_owned))
                    .or_insert_with(|| {
                        self.hub
                            .workload_of(&identity, peer, claim)
                            .map_err(|e| e.to_string())
                            .and_then(|w| serde_json::to_value(w).map_err(|e| e.to_string()))
                    })
                    .clone()
            });
            match accepted {
                Ok(line) => kept.push(line),
                Err(why) => {
                    refused += 1;
                    first_refusal.get_or_insert(why);
                }
            }
        }
        if let Some(why) = first_refusal {
            tracing::debug!(%identity, refused, "decision records refused: {why}");
        }
        if batch.dropped > 0 {
            tracing::debug!(%identity, dropped = batch.dropped, "a proxy dropped decision records");
        }
        let count = kept.len() as u64;
        let window = self.window.clone();
        tokio::task::spawn_blocking(move || window.append(&kept))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                tracing::warn!("keeping decision records: {e}");
                Status::unavailable(format!("keeping decision records: {e}"))
            })?;
        Ok(Response::new(DecisionBatchResponse {
            kept: count,
            refused,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_two_files_at_most() {
        let data = tempfile::tempdir().unwrap();
        let window = Window::open(data.path(), 200).unwrap();
        let line = |i: usize| format!("{{\"n\":{i:040}}}\n").into_bytes();
        for i in 0..10 {
            window.append(&[line(i)]).unwrap();
        }
        let read = |f: &str| std::fs::read_to_string(window.dir().join(f)).unwrap();
        let (older, newer) = (read(OLDER), read(NEWER));
        assert!(older.len() <= 100 && newer.len() <= 100, "{older}{newer}");
        assert!(newer.ends_with(&String::from_utf8(line(9)).unwrap()));
        assert!(
            !older.contains(&format!("{:040}", 0)),
            "the oldest are gone"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(window.dir().join(NEWER))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn records_are_filed_under_the_reporters_workload() {
        let record = br#"{"type":"access","direction":"inbound","v":1,"workload":{"namespace":"other","name":"victim","labels":{"app":"victim"}}}"#;
        let mut asked = None;
        let kept = accept(record, "spiffe://td/ns/a/sa/b", |claim| {
            asked = claim.map(str::to_owned);
            Ok(serde_json::json!({"namespace": "a", "name": "b", "labels": {"app": "b"}}))
        })
        .unwrap();
        assert_eq!(asked.as_deref(), Some("other/victim"));
        let kept: Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(kept["workload"]["namespace"], "a");
        assert_eq!(kept["reporter"], "spiffe://td/ns/a/sa/b");
        let refused = accept(record, "r", |_| Err("no WorkloadEntry other/victim".into()));
        assert_eq!(
            refused,
            Err(Refused::Workload("no WorkloadEntry other/victim".into()))
        );
        for bad in [
            &br#"{"type":"access","direction":"outbound","v":1}"#[..],
            br#"{"type":"access","direction":"inbound"}"#,
            br#"[1]"#,
        ] {
            assert_eq!(
                accept(bad, "r", |_| Ok(Value::Null)),
                Err(Refused::NotADecision)
            );
        }
        assert!(matches!(
            accept(b"{", "r", |_| Ok(Value::Null)),
            Err(Refused::NotJson(_))
        ));
    }

    /// What `suggest` and `replay` print cannot be forged through a record:
    /// a method that is not an HTTP token, or a control character or line
    /// break in any string (key or value, however deep), is refused.
    #[test]
    fn records_that_could_forge_output_are_refused() {
        let with = |extra: Value| {
            let mut record = serde_json::json!({"type": "access", "direction": "inbound", "v": 1});
            record
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let line = serde_json::to_vec(&record).unwrap();
            accept(&line, "r", |_| Ok(Value::Null)).map(|_| ())
        };
        let injected = "X\n---\napiVersion: security.istio.io/v1";
        assert_eq!(
            with(serde_json::json!({"method": injected})),
            Err(Refused::Method)
        );
        assert_eq!(
            with(serde_json::json!({"method": "GET /"})),
            Err(Refused::Method)
        );
        assert_eq!(with(serde_json::json!({"method": 1})), Err(Refused::Method));
        for bad in [
            serde_json::json!({"path": "/a\rb"}),
            serde_json::json!({"source_principal": "spiffe://x\u{85}y"}),
            serde_json::json!({"headers": {"x-a": "1\u{2028}2"}}),
            serde_json::json!({"request_auth": {"claims": [{"k\u{7f}": "v"}]}}),
        ] {
            assert_eq!(with(bad.clone()), Err(Refused::ControlCharacter), "{bad}");
        }
        assert_eq!(
            with(
                serde_json::json!({"method": "PATCH", "path": "/caf\u{e9}", "headers": {"x-a": "a\tb"}})
            ),
            Ok(())
        );
    }
}
