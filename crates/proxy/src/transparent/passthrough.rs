//! Outbound traffic to destinations the registry does not know, as Envoy
//! names them: under `ALLOW_ANY` it goes on to where the application sent
//! it, as plain TCP (`PassthroughCluster`); under `REGISTRY_ONLY` it is
//! refused (`BlackHoleCluster`). Either way the access log says which. A
//! service of `resolution: NONE` is passed through the same way, under its
//! own name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;

use crate::Shared;
use crate::io::Metered;
use crate::log::AccessRecord;
use crate::metrics::istio::{self, ResponseFlags, TrafficLabels};
use crate::metrics::{DecisionLabels, Direction};
use crate::socket::Dial;

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACK_HOLE: &str = "BlackHoleCluster";

/// Istio's labels for traffic to `cluster`: plain TCP to a destination
/// with no known workload, as Istio labels its passthrough and black hole
/// clusters (the cluster is the service).
fn istio_labels(shared: &Shared, cluster: &str) -> TrafficLabels {
    (shared.metrics.istio).outbound(cluster, None, false, istio::Protocol::Tcp)
}

fn count(shared: &Shared, decision: &'static str, cluster: &str) {
    shared
        .metrics
        .connections
        .get_or_create(&DecisionLabels {
            direction: Direction::Outbound,
            decision,
            policy: cluster.into(),
        })
        .inc();
}

/// Relays `tcp` to `dst`, untouched; logged as `cluster` (the
/// PassthroughCluster, or a `resolution: NONE` service).
pub async fn pass(
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    cluster: &str,
    mark: Option<u32>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let mut record = AccessRecord::new(
        SystemTime::now(),
        Direction::Outbound,
        "TCP",
        peer,
        cluster.into(),
    );
    record.upstream = Some(dst.to_string().into());
    count(&shared, "allow", cluster);
    let dial = Dial {
        mark,
        inbound_source: false,
    };
    match dial.connect(dst, shared.limits.connect_timeout).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            let connection = shared
                .metrics
                .istio
                .tcp_opened(&istio_labels(&shared, cluster));
            let mut tcp = Metered::new(tcp, &connection);
            record
                .relay(&mut tcp, &mut upstream, &shared.stop_now)
                .await;
        }
        Err(e) => {
            shared.metrics.upstream_error(Direction::Outbound);
            let labels = istio_labels(&shared, cluster);
            let flags = ResponseFlags::UpstreamConnectionFailure;
            drop(shared.metrics.istio.tcp_opened(&labels.with_flags(flags)));
            record.error = Some(format!("connecting to {dst}: {e}"));
        }
    }
    record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    shared.logs.access.write(&record);
}

/// Refuses a connection to `dst`: it is closed without a byte.
pub fn refuse(peer: SocketAddr, dst: SocketAddr, shared: &Shared) {
    let mut record = AccessRecord::new(
        SystemTime::now(),
        Direction::Outbound,
        "TCP",
        peer,
        BLACK_HOLE.into(),
    );
    record.upstream = Some(dst.to_string().into());
    record.decision = "deny";
    record.reason = Some(
        "the registry does not know this destination and outboundTrafficPolicy is REGISTRY_ONLY"
            .into(),
    );
    count(shared, "deny", BLACK_HOLE);
    let labels = istio_labels(shared, BLACK_HOLE).with_flags(ResponseFlags::NoHealthyUpstream);
    drop(shared.metrics.istio.tcp_opened(&labels));
    shared.logs.access.write(&record);
}
