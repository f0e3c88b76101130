//! The server's metrics, on a plain HTTP port (`--metrics`, Istio's 15014):
//! connected proxies, pushes and their latency, NACKs, the config version,
//! and certificate requests signed and refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshward_identity::service::CaCounters;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::push::Hub;

/// The metrics text, read from the live counters.
pub fn encode(hub: &Hub, ca: &CaCounters) -> String {
    let mut registry = Registry::with_prefix("meshward_server");
    registry.register(
        "connected_proxies",
        "Proxies with an open distribution stream",
        ConstGauge::new(hub.connected() as i64),
    );
    registry.register(
        "config_version",
        "The version of the configuration in the store",
        ConstGauge::new(hub.store_version() as i64),
    );
    registry.register(
        "pushes",
        "Responses sent on distribution streams (snapshots and deltas)",
        ConstCounter::new(hub.pushes.load(Ordering::Relaxed)),
    );
    registry.register(
        "nacks",
        "Configurations proxies refused",
        ConstCounter::new(hub.nacks.load(Ordering::Relaxed)),
    );
    registry.register(
        "push_latency_seconds",
        "From a configuration change to each push it caused (includes the debounce)",
        hub.push_latency.clone(),
    );
    registry.register(
        "csr_signed",
        "Certificate requests signed",
        ConstCounter::new(ca.signed.load(Ordering::Relaxed)),
    );
    registry.register(
        "csr_refused",
        "Certificate requests refused",
        ConstCounter::new(ca.refused.load(Ordering::Relaxed)),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>, ca: Arc<CaCounters>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors and the like: pause rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (hub, ca) = (hub.clone(), ca.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let body = encode(&hub, &ca);
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
