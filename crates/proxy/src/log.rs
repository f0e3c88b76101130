//! Access and audit logs: one JSON object per line.
//!
//! Records are serialized on the connection's task into a buffer that a
//! writer thread writes out in batches (at 64 KiB, or every 100 ms), so a
//! slow disk never stalls traffic; when 8 MiB are waiting, records are
//! dropped and counted (`meshward_log_records_dropped_total`). Paths are logged without their
//! query string. No token and no credential header (`authorization`,
//! `proxy-authorization`, `cookie`) is ever logged; the values of headers
//! the operator names with `--log-header`, and the JWT claims the policies
//! in force read, are. Log files are created 0600 for that reason.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use meshward_policy::Stage;
use meshward_policy::learn::record::{RECORD_VERSION, RecordWorkload, RequestAuth};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

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

/// Records are written in batches: when this many bytes are waiting, or
/// [`FLUSH_INTERVAL`] after the first of them, whichever comes first.
const FLUSH_AT: usize = 64 * 1024;
/// The longest a record waits to be written (Envoy flushes its access log
/// files on a timer too).
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Past this many bytes waiting (a disk that fell behind), records are
/// dropped and counted rather than held.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// A handle for writing records to one log.
///
/// A record is serialized straight into a shared buffer, and a writer
/// thread writes the buffer out in batches. Nothing on the request path
/// waits for the disk, and a record costs no system call and no wake-up
/// of another thread (which, one per record, cost more than all of the
/// proxy's own work on a request).
#[derive(Debug, Clone)]
pub struct LogSink {
    inner: Option<Arc<Buffered>>,
    dropped: Counter,
    /// Reportable records also go here (`--report-decisions`).
    report: Option<crate::report::Reporter>,
}

/// Records waiting for the writer thread, and the file they go to.
struct Buffered {
    pending: Mutex<Vec<u8>>,
    /// Signalled when `pending` reaches [`FLUSH_AT`].
    full: Condvar,
    out: Mutex<std::io::BufWriter<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for Buffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffered").finish_non_exhaustive()
    }
}

/// A record a [`LogSink`] writes.
pub trait Record: Serialize {
    /// Whether it is also reported to the control plane, when reporting.
    fn reportable(&self) -> bool {
        false
    }

    /// The record as reported: by default, as logged.
    fn report_line(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

/// Fields of an access record kept out of what is reported to the control
/// plane: the CUSTOM authorizer's metadata, and the free text of denials
/// and upstream errors. Replaying and suggesting need none of them.
pub const REPORT_LEAVES_OUT: [&str; 3] = ["ext_authz_metadata", "reason", "error"];

/// Inbound decisions with their facts are reported.
impl Record for AccessRecord {
    fn reportable(&self) -> bool {
        self.workload.is_some()
    }

    fn report_line(&self) -> serde_json::Result<Vec<u8>> {
        let mut value = serde_json::to_value(self)?;
        if let Some(fields) = value.as_object_mut() {
            for field in REPORT_LEAVES_OUT {
                fields.remove(field);
            }
        }
        serde_json::to_vec(&value)
    }
}

impl Record for AuditRecord {}

impl LogSink {
    /// Opens `target` and starts its writer thread.
    pub fn open(target: &LogTarget, dropped: Counter) -> std::io::Result<LogSink> {
        let writer: Box<dyn Write + Send> = match target {
            LogTarget::Off => {
                return Ok(LogSink {
                    inner: None,
                    dropped,
                    report: None,
                });
            }
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            ),
        };
        LogSink::with_writer(writer, dropped)
    }

    /// A sink writing to `writer` from a thread of its own.
    fn with_writer(writer: Box<dyn Write + Send>, dropped: Counter) -> std::io::Result<LogSink> {
        let inner = Arc::new(Buffered {
            pending: Mutex::new(Vec::with_capacity(FLUSH_AT)),
            full: Condvar::new(),
            out: Mutex::new(std::io::BufWriter::with_capacity(FLUSH_AT, writer)),
        });
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("meshward-log".into())
            .spawn(move || write_batches(writer))?;
        Ok(LogSink {
            inner: Some(inner),
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
        self.inner.is_some() || self.report.is_some()
    }

    pub fn write<R: Record>(&self, record: &R) {
        if let Some(report) = &self.report
            && record.reportable()
            && report.pick()
        {
            match record.report_line() {
                Ok(line) => report.send(line),
                Err(e) => tracing::error!("serializing a reported record: {e}"),
            }
        }
        if let Some(inner) = &self.inner {
            self.append(inner, |pending| serde_json::to_writer(pending, record));
        }
    }

    /// Appends one record (`put`) and its newline to what waits for the
    /// writer thread, unless too much waits already.
    fn append(&self, inner: &Buffered, put: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
        let mut pending = lock(&inner.pending);
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.inc();
            return;
        }
        let start = pending.len();
        if let Err(e) = put(&mut pending) {
            pending.truncate(start);
            drop(pending);
            tracing::error!("serializing a log record: {e}");
            return;
        }
        pending.push(b'\n');
        if pending.len() >= FLUSH_AT {
            inner.full.notify_one();
        }
    }

    /// Writes out every record so far, now (at shutdown).
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            let batch = std::mem::take(&mut *lock(&inner.pending));
            inner.write_out(&batch);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Buffered {
    fn write_out(&self, batch: &[u8]) {
        if batch.is_empty() {
            return;
        }
        let mut out = lock(&self.out);
        if out.write_all(batch).and_then(|()| out.flush()).is_err() {
            eprintln!("meshward: writing log records failed");
        }
    }
}

/// The writer thread: waits for a batch to fill or for the interval to
/// pass, then writes it; ends (after a last batch) once no sink is left.
fn write_batches(inner: Arc<Buffered>) {
    let mut spare = Vec::with_capacity(FLUSH_AT);
    loop {
        let last = Arc::strong_count(&inner) == 1;
        {
            let pending = lock(&inner.pending);
            let (mut pending, _) = inner
                .full
                .wait_timeout_while(pending, FLUSH_INTERVAL, |p| p.len() < FLUSH_AT)
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *pending, &mut spare);
        }
        inner.write_out(&spare);
        spare.clear();
        if last {
            return;
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

impl Logs {
    /// Writes out every record so far (see [`LogSink::flush`]).
    pub fn flush(&self) {
        self.access.flush();
        self.audit.flush();
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A record's time, formatted only when the record is written.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// One request or connection.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub direction: Direction,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: &'static str,
    pub source_address: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<Arc<str>>,
    /// The port the workload serves (inbound) or the service called (outbound).
    pub destination: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Arc<str>>,
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
        destination: Arc<str>,
    ) -> AccessRecord {
        AccessRecord {
            time,
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
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `audit` or `dry_run`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub source_address: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<Arc<str>>,
    pub destination: Arc<str>,
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[derive(Serialize)]
    struct Line {
        n: usize,
    }

    impl Record for Line {}

    /// What the writer thread wrote, as it arrives.
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Mutex<Vec<u8>>) -> usize {
        lock(out).iter().filter(|b| **b == b'\n').count()
    }

    /// Records hold claim and header values: a log file is the proxy's
    /// user's alone.
    #[test]
    fn log_files_are_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        let sink = LogSink::open(&LogTarget::File(path.clone()), Counter::default()).unwrap();
        sink.write(&Line { n: 1 });
        sink.flush();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// What is reported leaves out what only the operator's log keeps;
    /// the log keeps all of it.
    #[test]
    fn reported_records_leave_out_metadata_and_free_text() {
        let mut record = AccessRecord::new(
            SystemTime::UNIX_EPOCH,
            Direction::Inbound,
            "HTTP/1.1",
            "127.0.0.1:1".parse().unwrap(),
            Arc::from("web"),
        );
        record.reason = Some("no ALLOW rule matched".into());
        record.error = Some("upstream reset".into());
        record.ext_authz_metadata = Some(serde_json::json!({"user": "alice"}));
        record.method = Some("GET".into());
        let reported: serde_json::Value =
            serde_json::from_slice(&record.report_line().unwrap()).unwrap();
        for field in REPORT_LEAVES_OUT {
            assert!(reported.get(field).is_none(), "{field} in {reported}");
        }
        assert_eq!(reported["method"], "GET", "{reported}");
        let logged = serde_json::to_value(&record).unwrap();
        for field in REPORT_LEAVES_OUT {
            assert!(logged.get(field).is_some(), "{field} not in {logged}");
        }
    }

    #[test]
    fn records_are_written_within_the_interval_without_a_flush() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink =
            LogSink::with_writer(Box::new(Captured(out.clone())), Counter::default()).unwrap();
        for n in 0..3 {
            sink.write(&Line { n });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines(&out) < 3 {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::yield_now();
        }
        assert_eq!(
            String::from_utf8(lock(&out).clone()).unwrap(),
            "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n"
        );
    }

    #[test]
    fn a_flush_writes_what_is_pending_at_once() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink =
            LogSink::with_writer(Box::new(Captured(out.clone())), Counter::default()).unwrap();
        sink.write(&Line { n: 7 });
        sink.flush();
        assert_eq!(lines(&out), 1);
    }

    /// A disk that does not take anything until told to.
    struct Stuck(mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn behind_a_stuck_disk_records_are_dropped_and_counted_not_held() {
        let (release, stuck) = mpsc::channel();
        let dropped = Counter::default();
        let sink = LogSink::with_writer(Box::new(Stuck(stuck)), dropped.clone()).unwrap();
        // The writer takes one batch and is stuck writing it; behind it,
        // at most MAX_PENDING bytes wait (written twice over, at most).
        let record = Line { n: usize::MAX };
        let per = serde_json::to_vec(&record).unwrap().len() + 1;
        for _ in 0..4 * MAX_PENDING / per {
            sink.write(&record);
        }
        assert!(dropped.get() > 0, "records were dropped and counted");
        assert!(lock(&sink.inner.as_ref().unwrap().pending).len() <= MAX_PENDING + per);
        drop(release);
    }
}
