//! Decision reporting (`meshward proxy --report-decisions`): inbound access
//! records, sampled, sent to the control plane in batches, where the server
//! keeps a window of recent ones for `meshward suggest` and `meshward
//! replay --data-dir`.
//!
//! Traffic never waits for it: a record is offered to a bounded queue
//! (`try_send`) and dropped, counted, when the queue is full; batches go out
//! from their own task, and a batch the server cannot take is dropped too
//! (its count sent with the next one). Records are the access log's, with
//! the same facts (`crate::facts`), less what only the operator's own log
//! should hold (`crate::log::REPORT_LEAVES_OUT`); sampling picks them
//! before they are serialized.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshward_api::control::DecisionBatch;
use meshward_api::control::decisions_client::DecisionsClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::ControlPlane;
use crate::identity::WorkloadIdentity;
use crate::metrics::Metrics;

/// Records waiting to be sent; more are dropped.
const QUEUE: usize = 4096;
/// A batch holds at most this many records...
const BATCH_RECORDS: usize = 256;
/// ...and this many bytes (the server takes up to 4 MiB).
const BATCH_BYTES: usize = 1 << 20;
/// A batch waits at most this long for more records.
const BATCH_WAIT: Duration = Duration::from_secs(1);
/// How long a batch may take to reach the server.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where records are offered: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Vec<u8>>,
    /// Keep this fraction of records, evenly (1: all).
    fraction: f64,
    seen: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// The other end of a [`Reporter`]: what [`run`] sends from.
#[derive(Debug)]
pub struct Reports {
    rx: mpsc::Receiver<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

/// A reporter keeping `fraction` of the records (clamped to (0, 1]).
pub fn reporter(fraction: f64) -> (Reporter, Reports) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let fraction = if fraction.is_finite() && fraction > 0.0 {
        fraction.min(1.0)
    } else {
        1.0
    };
    (
        Reporter {
            tx,
            fraction,
            seen: Arc::default(),
            dropped: dropped.clone(),
        },
        Reports { rx, dropped },
    )
}

impl Reporter {
    /// Whether sampling keeps the next record (the n-th is kept when ⌊n·f⌋
    /// grows, so exactly a fraction f of them, evenly spread): asked before
    /// a record is serialized for reporting, so that the others never are.
    pub(crate) fn pick(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        self.fraction >= 1.0
            || ((n + 1) as f64 * self.fraction).floor() > (n as f64 * self.fraction).floor()
    }

    /// Queues one picked, serialized record when the queue has room.
    pub(crate) fn send(&self, line: Vec<u8>) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends batches to the control plane until `stop`.
pub async fn run(
    mut reports: Reports,
    control_plane: ControlPlane,
    identity: WorkloadIdentity,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut client = None;
    let mut failing = false;
    loop {
        let Some(batch) = next_batch(&mut reports.rx, &stop).await else {
            return;
        };
        let dropped = reports.dropped.swap(0, Ordering::Relaxed);
        let request = DecisionBatch {
            records: batch,
            dropped,
        };
        let count = request.records.len() as u64;
        if client.is_none() {
            client = crate::control::channel(&control_plane, 0, &identity, &metrics)
                .await
                .map(DecisionsClient::new)
                .map_err(|e| report_failure(&mut failing, &e))
                .ok();
        }
        let Some(connected) = client.as_mut() else {
            reports
                .dropped
                .fetch_add(count + dropped, Ordering::Relaxed);
            continue;
        };
        match tokio::time::timeout(SEND_TIMEOUT, connected.report(request)).await {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!("reporting decisions to the control plane again");
                }
                failing = false;
            }
            Ok(Err(status)) => {
                report_failure(&mut failing, status.message());
                reports
                    .dropped
                    .fetch_add(count + dropped, Ordering::Relaxed);
                client = None;
            }
            Err(_) => {
                report_failure(&mut failing, "timed out");
                reports
                    .dropped
                    .fetch_add(count + dropped, Ordering::Relaxed);
                client = None;
            }
        }
    }
}

/// Logs a failure once until reporting works again.
fn report_failure(failing: &mut bool, why: &str) {
    if !*failing {
        tracing::warn!(
            "reporting decisions to the control plane failed ({why}); dropping them until it works"
        );
    }
    *failing = true;
}

/// The next batch: the first record waited for, then whatever arrives
/// within [`BATCH_WAIT`], up to the batch's limits. `None` at `stop` or
/// when every reporter is gone.
async fn next_batch(
    rx: &mut mpsc::Receiver<Vec<u8>>,
    stop: &CancellationToken,
) -> Option<Vec<Vec<u8>>> {
    let first = tokio::select! {
        _ = stop.cancelled() => return None,
        first = rx.recv() => first?,
    };
    let mut bytes = first.len();
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + BATCH_WAIT;
    while batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            next = rx.recv() => next,
        };
        let Some(line) = next else { break };
        bytes += line.len();
        batch.push(line);
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_that_fraction_evenly() {
        let (reporter, mut reports) = reporter(0.25);
        for i in 0..16u8 {
            if reporter.pick() {
                reporter.send(vec![i]);
            }
        }
        let mut kept = Vec::new();
        while let Ok(line) = reports.rx.try_recv() {
            kept.push(line[0]);
        }
        assert_eq!(kept, [3, 7, 11, 15]);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (reporter, reports) = reporter(1.0);
        for _ in 0..QUEUE + 10 {
            reporter.send(b"x".to_vec());
        }
        assert_eq!(reports.dropped.load(Ordering::Relaxed), 10);
    }
}
