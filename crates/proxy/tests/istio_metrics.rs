//! Istio's standard metrics through a pair of proxies: HTTP, gRPC and TCP
//! from sleep's proxy (the source reporter) to web's (the destination
//! reporter), each series asserted with its exact label set on both sides,
//! allowed and denied, mutual TLS and plaintext; and a client's `Host`
//! never becoming a label value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use meshward_api::resources::Service;
use meshward_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// sleep may call `/public/*` and `/pkg.Svc/Allowed`, and TCP port 9000;
/// not port 9001.
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: web}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/sleep/sa/sleep"]}}]
    to: [{operation: {paths: ["/public/*", "/pkg.Svc/Allowed"]}}]
  - from: [{source: {principals: ["cluster.local/ns/sleep/sa/sleep"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;

const WEB_ID: &str = "spiffe://cluster.local/ns/web/sa/web";
const SLEEP_ID: &str = "spiffe://cluster.local/ns/sleep/sa/sleep";

type Labels = Vec<(&'static str, &'static str)>;

/// What web's proxy reports of sleep's mutual TLS traffic: web is known
/// by its WorkloadEntry and labels, sleep by its identity alone.
const AT_WEB: [(&str, &str); 22] = [
    ("reporter", "destination"),
    ("source_workload", "sleep"),
    ("source_canonical_service", "unknown"),
    ("source_canonical_revision", "unknown"),
    ("source_workload_namespace", "sleep"),
    ("source_principal", SLEEP_ID),
    ("source_app", "unknown"),
    ("source_version", "unknown"),
    ("source_cluster", "meshward"),
    ("destination_workload", "web-v1"),
    ("destination_workload_namespace", "web"),
    ("destination_principal", WEB_ID),
    ("destination_app", "web"),
    ("destination_version", "v1"),
    ("destination_service", "web.web"),
    ("destination_canonical_service", "web"),
    ("destination_canonical_revision", "v1"),
    ("destination_service_name", "web.web"),
    ("destination_service_namespace", "web"),
    ("destination_cluster", "meshward"),
    ("response_flags", "-"),
    ("connection_security_policy", "mutual_tls"),
];

/// What sleep's proxy reports of its calls to web: sleep known by its
/// WorkloadEntry (no version label: `latest`), web by its verified
/// identity.
const AT_SLEEP: [(&str, &str); 22] = [
    ("reporter", "source"),
    ("source_workload", "sleep"),
    ("source_canonical_service", "sleep"),
    ("source_canonical_revision", "latest"),
    ("source_workload_namespace", "sleep"),
    ("source_principal", SLEEP_ID),
    ("source_app", "sleep"),
    ("source_version", "latest"),
    ("source_cluster", "meshward"),
    ("destination_workload", "web"),
    ("destination_workload_namespace", "web"),
    ("destination_principal", WEB_ID),
    ("destination_app", "unknown"),
    ("destination_version", "unknown"),
    ("destination_service", "web.web"),
    ("destination_canonical_service", "unknown"),
    ("destination_canonical_revision", "unknown"),
    ("destination_service_name", "web.web"),
    ("destination_service_namespace", "web"),
    ("destination_cluster", "meshward"),
    ("response_flags", "-"),
    ("connection_security_policy", "mutual_tls"),
];

/// `base` with `changes` made (replaced or added).
fn with(base: &[(&'static str, &'static str)], changes: &[(&'static str, &'static str)]) -> Labels {
    let mut all: BTreeMap<&str, &str> = base.iter().copied().collect();
    all.extend(changes.iter().copied());
    all.into_iter().collect()
}

fn http(base: &[(&'static str, &'static str)], code: &'static str) -> Labels {
    with(
        base,
        &[
            ("request_protocol", "http"),
            ("response_code", code),
            ("grpc_response_status", ""),
        ],
    )
}

fn grpc(base: &[(&'static str, &'static str)], status: &'static str) -> Labels {
    with(
        base,
        &[
            ("request_protocol", "grpc"),
            ("response_code", "200"),
            ("grpc_response_status", status),
        ],
    )
}

fn service(host: &str, entry: &str, identity: &str) -> Service {
    Service {
        host: host.into(),
        entry: entry.into(),
        identities: [identity.to_owned()].into(),
        ..Service::default()
    }
}

struct Mesh {
    web: TestProxy,
    sleep: TestProxy,
}

/// web's proxy in front of an HTTP, a gRPC and a TCP echo application
/// (TCP on policy ports 9000 and 9001), sleep's calling each over mutual
/// TLS; each told its WorkloadEntry and the registry's services, as the
/// control plane tells them.
async fn mesh(ca: &Ca) -> Mesh {
    let (app, tcp) = (echo_app("web").await, tcp_echo().await);
    let web = start_proxy(ProxySpec {
        identity: ca.identity(&id("web", "web")),
        namespace: "web",
        labels: &[("app", "web"), ("version", "v1")],
        inbound: vec![
            format!("0={app},protocol=http"),
            format!("0={app},protocol=grpc"),
            format!("0={tcp},protocol=tcp,port=9000"),
            format!("0={tcp},protocol=tcp,port=9001"),
        ],
        upstreams: vec![],
        policies: POLICIES,
        mesh_config: None,
    })
    .await;
    let upstream = |port: u16, endpoint, protocol| {
        format!(
            "web.web:{port}=127.0.0.1:0,endpoint={endpoint},identity={WEB_ID},protocol={protocol}"
        )
    };
    let sleep = start_proxy(ProxySpec {
        identity: ca.identity(&id("sleep", "sleep")),
        namespace: "sleep",
        labels: &[("app", "sleep")],
        inbound: vec![],
        upstreams: vec![
            upstream(80, web.inbound[0], "http"),
            upstream(81, web.inbound[1], "grpc"),
            upstream(9000, web.inbound[2], "tcp"),
            upstream(9001, web.inbound[3], "tcp"),
        ],
        policies: "",
        mesh_config: None,
    })
    .await;
    let services = [
        service("web.web", "web/web", WEB_ID),
        service("api.web", "web/api", "spiffe://cluster.local/ns/web/sa/api"),
    ];
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let istio = &web.proxy.as_ref().unwrap().metrics().istio;
    let web_labels = labels(&[("app", "web"), ("version", "v1")]);
    istio.set_local(&id("web", "web"), "web", &web_labels, Some("web/web-v1"));
    istio.set_services(&services);
    let istio = &sleep.proxy.as_ref().unwrap().metrics().istio;
    let sleep_labels = labels(&[("app", "sleep")]);
    istio.set_local(
        &id("sleep", "sleep"),
        "sleep",
        &sleep_labels,
        Some("sleep/sleep"),
    );
    istio.set_services(&services);
    Mesh { web, sleep }
}

/// Waits until `name{labels}` is `value` in `proxy`'s scrape; fails with
/// the scrape after [`SETTLE`].
async fn until(proxy: &TestProxy, name: &str, labels: &[(&str, &str)], value: f64) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let scrape = proxy.scrape();
        if scrape.get(name, labels) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {name}{labels:?} = {value}:\n{scrape}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // pacing: the poll interval
    }
}

/// How many series of `name` the scrape has.
fn series(scrape: &Scrape, name: &str) -> usize {
    scrape.iter().filter(|(n, _, _)| *n == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_reported_by_both_proxies_with_istios_labels() {
    let ca = Ca::new();
    let m = mesh(&ca).await;
    let out = m.sleep.outbound[0];
    let (status, body, _) = get(out, "/public/a", &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = get(out, "/public/b", &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = get(out, "/admin", &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));

    let requests = "istio_requests_total";
    until(&m.web, requests, &http(&AT_WEB, "200"), 2.0).await;
    until(&m.web, requests, &http(&AT_WEB, "403"), 1.0).await;
    until(&m.sleep, requests, &http(&AT_SLEEP, "200"), 2.0).await;
    until(&m.sleep, requests, &http(&AT_SLEEP, "403"), 1.0).await;
    for proxy in [&m.web, &m.sleep] {
        let scrape = proxy.scrape();
        assert_eq!(series(&scrape, requests), 2, "{scrape}");
    }

    // The histograms: one observation per request, in Istio's buckets; a
    // GET has no body; the denial's body is Envoy's 19-byte message.
    for (proxy, base) in [(&m.web, &AT_WEB), (&m.sleep, &AT_SLEEP)] {
        let scrape = proxy.scrape();
        let ok = http(base, "200");
        let denied = http(base, "403");
        let get = |name: &str, labels: &Labels| scrape.get(name, labels);
        assert_eq!(
            get("istio_request_duration_milliseconds_count", &ok),
            Some(2.0)
        );
        assert_eq!(get("istio_request_bytes_count", &ok), Some(2.0));
        assert_eq!(get("istio_request_bytes_sum", &ok), Some(0.0));
        assert!(
            get("istio_response_bytes_sum", &ok).unwrap() > 0.0,
            "{scrape}"
        );
        assert_eq!(
            get("istio_response_bytes_sum", &denied),
            Some(19.0),
            "{scrape}"
        );
        let mut inf = ok.clone();
        inf.push(("le", "+Inf"));
        assert_eq!(
            get("istio_request_duration_milliseconds_bucket", &inf),
            Some(2.0)
        );
        let mut longest = ok.clone();
        longest.push(("le", "3600000.0"));
        assert_eq!(
            get("istio_request_duration_milliseconds_bucket", &longest),
            Some(2.0)
        );
    }
    // meshward's own metrics are still there, unchanged.
    let scrape = m.web.scrape();
    let own = [
        ("direction", "inbound"),
        ("decision", "allow"),
        ("policy", "web/allow-sleep"),
    ];
    assert_eq!(
        scrape.get("meshward_requests_total", &own),
        Some(2.0),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_carry_the_grpc_status() {
    let ca = Ca::new();
    let m = mesh(&ca).await;
    let out = m.sleep.outbound[1];
    let call = [("content-type", "application/grpc"), ("te", "trailers")];
    let (status, _, _, trailers) = h2(out, "POST", "/pkg.Svc/Allowed", &call).await;
    assert_eq!(status, 200);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let (status, headers, _, _) = h2(out, "POST", "/pkg.Svc/Denied", &call).await;
    assert_eq!(status, 200, "gRPC denials are trailers-only responses");
    assert_eq!(headers["grpc-status"], "7");

    let requests = "istio_requests_total";
    until(&m.web, requests, &grpc(&AT_WEB, "0"), 1.0).await;
    until(&m.web, requests, &grpc(&AT_WEB, "7"), 1.0).await;
    until(&m.sleep, requests, &grpc(&AT_SLEEP, "0"), 1.0).await;
    until(&m.sleep, requests, &grpc(&AT_SLEEP, "7"), 1.0).await;
    for proxy in [&m.web, &m.sleep] {
        let scrape = proxy.scrape();
        assert_eq!(series(&scrape, requests), 2, "{scrape}");
    }
    // The allowed call's five-byte request body crossed both proxies; web's
    // never read the denied one's (sleep's may have sent it meanwhile).
    for (proxy, base) in [(&m.web, &AT_WEB), (&m.sleep, &AT_SLEEP)] {
        let scrape = proxy.scrape();
        let sum = |status| scrape.get("istio_request_bytes_sum", &grpc(base, status));
        assert_eq!(sum("0"), Some(5.0), "{scrape}");
    }
    let scrape = m.web.scrape();
    let denied = scrape.get("istio_request_bytes_sum", &grpc(&AT_WEB, "7"));
    assert_eq!(denied, Some(0.0), "{scrape}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_and_bytes_are_reported_by_both_proxies() {
    let ca = Ca::new();
    let m = mesh(&ca).await;
    let mut allowed = TcpStream::connect(m.sleep.outbound[2]).await.unwrap();
    allowed.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    tokio::time::timeout(SETTLE, allowed.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"hello");
    let tcp = |base: &[(&'static str, &'static str)]| with(base, &[("request_protocol", "tcp")]);
    // Bytes are counted while the connection lives.
    until(&m.web, "istio_tcp_received_bytes_total", &tcp(&AT_WEB), 5.0).await;
    until(&m.web, "istio_tcp_sent_bytes_total", &tcp(&AT_WEB), 5.0).await;
    until(
        &m.sleep,
        "istio_tcp_received_bytes_total",
        &tcp(&AT_SLEEP),
        5.0,
    )
    .await;
    until(&m.sleep, "istio_tcp_sent_bytes_total", &tcp(&AT_SLEEP), 5.0).await;
    for (proxy, base) in [(&m.web, &AT_WEB), (&m.sleep, &AT_SLEEP)] {
        let scrape = proxy.scrape();
        let opened = scrape.get("istio_tcp_connections_opened_total", &tcp(base));
        let closed = scrape.get("istio_tcp_connections_closed_total", &tcp(base));
        assert_eq!((opened, closed), (Some(1.0), Some(0.0)), "{scrape}");
    }
    drop(allowed);

    // Port 9001 is denied: web's proxy closes it at once, counted opened
    // and closed as Envoy counts a connection its RBAC filter closes.
    let mut denied = TcpStream::connect(m.sleep.outbound[3]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SETTLE, denied.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    drop(denied);

    for (proxy, base) in [(&m.web, &AT_WEB), (&m.sleep, &AT_SLEEP)] {
        until(proxy, "istio_tcp_connections_closed_total", &tcp(base), 2.0).await;
        let scrape = proxy.scrape();
        let get = |name| scrape.get(name, &tcp(base));
        assert_eq!(
            get("istio_tcp_connections_opened_total"),
            Some(2.0),
            "{scrape}"
        );
        assert_eq!(get("istio_tcp_received_bytes_total"), Some(5.0), "{scrape}");
        assert_eq!(get("istio_tcp_sent_bytes_total"), Some(5.0), "{scrape}");
        assert_eq!(series(&scrape, "istio_requests_total"), 0, "{scrape}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_reported_without_principals() {
    let ca = Ca::new();
    let m = mesh(&ca).await;
    // Straight to web's port (PERMISSIVE), without a proxy: no identity,
    // so the ALLOW rule for sleep does not match.
    let (status, _, _) = get(m.web.inbound[0], "/public/a", &[]).await.unwrap();
    assert_eq!(status, 403);
    let plaintext = with(
        &http(&AT_WEB, "403"),
        &[
            ("source_workload", "unknown"),
            ("source_workload_namespace", "unknown"),
            ("source_principal", "unknown"),
            ("source_cluster", "unknown"),
            ("destination_principal", "unknown"),
            ("connection_security_policy", "none"),
        ],
    );
    until(&m.web, "istio_requests_total", &plaintext, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_host_never_becomes_a_label_value() {
    let ca = Ca::new();
    let m = mesh(&ca).await;
    let out = m.sleep.outbound[0];
    let hosts: Vec<String> = (0..20).map(|i| format!("attacker-{i}.example")).collect();
    for host in &hosts {
        let (status, body, _) = get(out, "/public/a", &[("host", host)]).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(seen(&body)["headers"]["host"], host.as_str());
    }
    // Twenty hosts, one series each side: the service called (sleep), the
    // one web serves (web).
    until(&m.web, "istio_requests_total", &http(&AT_WEB, "200"), 20.0).await;
    until(
        &m.sleep,
        "istio_requests_total",
        &http(&AT_SLEEP, "200"),
        20.0,
    )
    .await;
    for proxy in [&m.web, &m.sleep] {
        let scrape = proxy.scrape();
        assert_eq!(series(&scrape, "istio_requests_total"), 1, "{scrape}");
        let text = scrape.to_string();
        assert!(!text.contains("attacker"), "{text}");
    }

    // A host naming a service the registry knows selects it at web; the
    // caller reports the service it called.
    let (status, _, _) = get(out, "/public/a", &[("host", "api.web:8080")])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let api = with(
        &http(&AT_WEB, "200"),
        &[
            ("destination_service", "api.web"),
            ("destination_service_name", "api.web"),
        ],
    );
    until(&m.web, "istio_requests_total", &api, 1.0).await;
    until(
        &m.sleep,
        "istio_requests_total",
        &http(&AT_SLEEP, "200"),
        21.0,
    )
    .await;
}
