//! Access and audit logs: one JSON object per line.
//!
//! Records are serialized on the connection's task and handed to a writer
//! task through a bounded queue, so a slow disk never stalls traffic; when
//! the queue is full the record is dropped and counted
//! (`meshward_log_records_dropped_total`). Paths are logged without their
//! query string, and no header or token value is ever logged.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use meshward_policy::Stage;
use meshward_policy::learn::record::{RECORD_VERSION, RecordWorkload, RequestAuth};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Direction;

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for LogTarget {
    type Err = std::convert::Infallible;

    /// `-` is standard output, `off` disables, anything else is a file
    /// appended to.
    fn from_str(s: &str) -> Result<LogTarget, Self::Err> {
        Ok(match s {
            "-" => LogTarget::Stdout,
            "off" => LogTarget::Off,
            path => LogTarget::File(PathBuf::from(path)),
        })
    }
}

const QUEUE: usize = 8192;

/// A handle for writing records to one log.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    dropped: Counter,
    /// Reportable records also go here (`--report-decisions`).
    report: Option<crate::report::Reporter>,
}

/// A record a [`LogSink`] writes.
pub trait Record: Serialize {
    /// Whether it is also reported to the control plane, when reporting.
    fn reportable(&self) -> bool {
        false
    }
}

/// Inbound decisions with their facts are reported.
impl Record for AccessRecord {
    fn reportable(&self) -> bool {
        self.workload.is_some()
    }
}

impl Record for AuditRecord {}

impl LogSink {
    /// Opens `target` and starts its writer task.
    pub fn open(target: &LogTarget, dropped: Counter) -> std::io::Result<LogSink> {
        let writer: Box<dyn Write + Send> = match target {
            LogTarget::Off => {
                return Ok(LogSink {
                    tx: None,
                    dropped,
                    report: None,
                });
            }
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("meshward-log".into())
            .spawn(move || write_lines(rx, writer))?;
        Ok(LogSink {
            tx: Some(tx),
            dropped,
            report: None,
        })
    }

    /// This sink, also reporting its reportable records to `report`.
    pub fn reporting(mut self, report: Option<crate::report::Reporter>) -> LogSink {
        self.report = report;
        self
    }

    /// Whether records are read at all: written to the log, or reported.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some() || self.report.is_some()
    }

    pub fn write<R: Record>(&self, record: &R) {
        if !self.is_enabled() {
            return;
        }
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("serializing a log record: {e}");
                return;
            }
        };
        if let Some(report) = &self.report
            && record.reportable()
        {
            report.offer(&line);
        }
        let Some(tx) = &self.tx else { return };
        line.push(b'\n');
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writes lines in batches: flushes whenever the queue runs empty.
fn write_lines(mut rx: mpsc::Receiver<Vec<u8>>, writer: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(writer);
    while let Some(line) = rx.blocking_recv() {
        let mut ok = out.write_all(&line).is_ok();
        while let Ok(line) = rx.try_recv() {
            ok &= out.write_all(&line).is_ok();
        }
        ok &= out.flush().is_ok();
        if !ok {
            eprintln!("meshward: writing a log record failed");
        }
    }
}

/// The two logs a proxy writes.
#[derive(Debug, Clone)]
pub struct Logs {
    pub access: LogSink,
    pub audit: LogSink,
    /// What inbound records keep beyond the decision (`crate::facts`).
    pub facts: crate::facts::FactSettings,
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One request or connection.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    pub time: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub direction: Direction,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: &'static str,
    pub source_address: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<Arc<str>>,
    /// The port the workload serves (inbound) or the service called (outbound).
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The verified JWT's `iss/sub`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// Why, for denials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<&'static str>,
    pub config_version: u64,
    pub duration_ms: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// What went wrong reaching the upstream, if something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The CUSTOM authorizer's verdict when it was asked: `allow`, `deny`
    /// or `error` (unreachable, timed out, or an error answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext_authz: Option<&'static str>,
    /// The CUSTOM authorizer's `dynamic_metadata` (gRPC providers), as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext_authz_metadata: Option<serde_json::Value>,
    /// The gateway's VirtualService route (`namespace/name/http[i]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The record format's version (`docs/decision-records.md`).
    #[serde(rename = "v")]
    pub record_version: u32,
    // The facts below let the decision be made again offline (`meshward
    // replay`, `meshward suggest`); `crate::facts` fills them for inbound
    // decisions while a log or decision reporting reads records.
    /// The workload decided for: namespace, labels, and name when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<RecordWorkload>,
    /// The address the peer connected to (`destination.ip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_ip: Option<IpAddr>,
    /// The workload port, as policies name it (`destination.port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// The TLS server name the peer asked for (`connection.sni`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The original client address, when it is not the peer's (`remote.ip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<IpAddr>,
    /// The path as received (no query), when normalization changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_path: Option<String>,
    /// The verified JWT's attributes and the claims policies in force read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_auth: Option<RequestAuth>,
    /// A bearer token was sent and nothing verified it (no
    /// RequestAuthentication applied): its value is never kept.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bearer_token: bool,
    /// The headers `--log-header` names: value, or null when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, Option<String>>>,
}

impl AccessRecord {
    /// Relays bytes both ways between `downstream` and `upstream` until both
    /// close, or until `stop` (the drain grace period ended); the counts,
    /// or what ended the relay, go into this record.
    pub async fn relay<D, U>(
        &mut self,
        downstream: &mut D,
        upstream: &mut U,
        stop: &tokio_util::sync::CancellationToken,
    ) where
        D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let copied = tokio::select! {
            copied = tokio::io::copy_bidirectional(downstream, upstream) => copied,
            _ = stop.cancelled() => Err(std::io::Error::other("closed: the drain grace period ended")),
        };
        match copied {
            Ok((sent_up, received_back)) => {
                self.bytes_received = sent_up;
                self.bytes_sent = received_back;
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    /// A record for traffic starting at `time`, allowed until said otherwise.
    pub fn new(
        time: SystemTime,
        direction: Direction,
        protocol: &'static str,
        source_address: SocketAddr,
        destination: String,
    ) -> AccessRecord {
        AccessRecord {
            time: timestamp(time),
            kind: "access",
            direction,
            protocol,
            source_address,
            source_principal: None,
            destination,
            upstream: None,
            method: None,
            path: None,
            authority: None,
            request_principal: None,
            status: None,
            decision: "allow",
            stage: None,
            policy: None,
            rule: None,
            reason: None,
            mtls_mode: None,
            config_version: 0,
            duration_ms: 0.0,
            bytes_received: 0,
            bytes_sent: 0,
            error: None,
            ext_authz: None,
            ext_authz_metadata: None,
            route: None,
            record_version: RECORD_VERSION,
            workload: None,
            destination_ip: None,
            destination_port: None,
            sni: None,
            remote_ip: None,
            original_path: None,
            request_auth: None,
            bearer_token: false,
            headers: None,
        }
    }
}

/// An AUDIT rule matched, or a dry-run policy would have decided.
#[derive(Debug, Serialize)]
pub struct AuditRecord {
    pub time: String,
    /// `audit` or `dry_run`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub source_address: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<Arc<str>>,
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// For dry-run: what the policy would have decided; for audit: `audit`.
    pub result: String,
    /// What was actually decided.
    pub decision: &'static str,
    pub config_version: u64,
}
