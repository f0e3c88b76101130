//! The DNS proxy in process, on 127.0.0.1 with ports the system chose: a
//! proxy pointed at a fake upstream resolver, asked by hickory's client
//! over UDP and over TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use hickory_net::xfer::Protocol;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use meshward_api::resources::Service;
use meshward_policy::{PolicySet, Workload};
use meshward_proxy::config::{Limits, ProxyConfig};
use meshward_proxy::dns::DnsConfig;
use meshward_proxy::log::LogTarget;
use meshward_proxy::policies::PolicyStore;
use meshward_proxy::testing::dns::{FakeUpstream, addresses, ask};
use meshward_proxy::testing::*;
use meshward_proxy::{LogTargets, Proxy};

const BOTH: [Protocol; 2] = [Protocol::Udp, Protocol::Tcp];

/// A proxy of namespace `bookinfo` serving DNS on 127.0.0.1:0 and
/// forwarding to `upstreams`, each given `timeout`.
async fn dns_proxy(ca: &Ca, upstreams: Vec<SocketAddr>, timeout: Duration) -> (Proxy, SocketAddr) {
    start(ca, upstreams, timeout, false).await
}

async fn start(
    ca: &Ca,
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    await_services: bool,
) -> (Proxy, SocketAddr) {
    let workload = Workload {
        namespace: "bookinfo".into(),
        labels: Default::default(),
    };
    let config = ProxyConfig {
        workload: workload.clone(),
        inbound: vec![],
        upstreams: vec![],
        admin: Some("127.0.0.1:0".parse().unwrap()),
        limits: Limits::default(),
        drain_grace: Duration::from_secs(3),
        mark: None,
        transparent: None,
        dns: Some(DnsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            upstreams,
            mark: None,
            timeout: Some(timeout),
            await_services,
        }),
    };
    let store = PolicyStore::new(workload, PolicySet::default(), "test".into());
    let logs = LogTargets {
        access: LogTarget::Off,
        audit: LogTarget::Off,
        facts: Default::default(),
    };
    let proxy = Proxy::start(config, ca.identity(&id("bookinfo", "app")), store, logs)
        .await
        .unwrap();
    let addr = proxy.listeners().dns[0];
    (proxy, addr)
}

/// The registry's view: a Kubernetes-style host with an allocated pair,
/// and a host named as meshward's examples name them, IPv4 only.
fn services() -> Vec<Service> {
    let service = |host: &str, addresses: &[&str]| Service {
        host: host.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ..Service::default()
    };
    vec![
        service(
            "ratings.bookinfo.svc.cluster.local",
            &["240.240.0.7", "2001:2::f0f0:7"],
        ),
        service("reviews.bookinfo", &["240.240.1.2"]),
    ]
}

fn dns_queries(proxy: &Proxy, result: &str) -> f64 {
    let text = proxy.metrics().encode();
    Scrape::parse(&text)
        .unwrap()
        .get("meshward_dns_queries_total", &[("result", result)])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn mesh_names_are_answered_with_the_registrys_addresses_over_udp_and_tcp() {
    let ca = Ca::new();
    let upstream = FakeUpstream::start(&[]).await;
    let (proxy, dns) = dns_proxy(&ca, vec![upstream.addr], Duration::from_secs(5)).await;
    proxy.dns().unwrap().set_services(&services());
    for protocol in BOTH {
        for name in [
            "ratings.bookinfo.svc.cluster.local",
            "ratings.bookinfo",
            "ratings",
            "Ratings.BookInfo.svc.",
        ] {
            let a = ask(dns, protocol, name, RecordType::A).await;
            assert_eq!(a.response_code, ResponseCode::NoError, "{protocol} {name}");
            assert_eq!(addresses(&a), ["240.240.0.7"], "{protocol} {name} A");
            assert!(a.authoritative, "the proxy is the mesh names' authority");
            assert_eq!(a.answers[0].ttl, 30);
            let aaaa = ask(dns, protocol, name, RecordType::AAAA).await;
            assert_eq!(
                addresses(&aaaa),
                ["2001:2::f0f0:7"],
                "{protocol} {name} AAAA"
            );
        }
        let a = ask(dns, protocol, "reviews.bookinfo", RecordType::A).await;
        assert_eq!(addresses(&a), ["240.240.1.2"]);
        // IPv4 only: the name exists, with no IPv6 address.
        let aaaa = ask(dns, protocol, "reviews.bookinfo", RecordType::AAAA).await;
        assert_eq!(
            (aaaa.response_code, aaaa.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }
    assert_eq!(upstream.asked(), [], "no mesh name went upstream");
    assert_eq!(dns_queries(&proxy, "local"), 20.0);
    assert_eq!(dns_queries(&proxy, "forwarded"), 0.0);
    // /config_dump lists what the proxy answers.
    let (status, body, _) = get(proxy.admin_address.unwrap(), "/config_dump", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["dns"]["names"]["ratings"]["addresses"],
        serde_json::json!(["240.240.0.7", "2001:2::f0f0:7"]),
        "{}",
        dump["dns"]
    );
    assert_eq!(dump["dns"]["upstreams"][0], upstream.addr.to_string());
    assert_eq!(dump["listeners"]["dns"][0], dns.to_string());
    proxy.shutdown().await;
}

#[tokio::test]
async fn other_names_are_forwarded_and_the_upstreams_answer_comes_back() {
    let ca = Ca::new();
    let upstream = FakeUpstream::start(&[("example.test", &["192.0.2.80", "2001:db8::80"])]).await;
    let (proxy, dns) = dns_proxy(&ca, vec![upstream.addr], Duration::from_secs(5)).await;
    proxy.dns().unwrap().set_services(&services());
    for protocol in BOTH {
        let a = ask(dns, protocol, "example.test", RecordType::A).await;
        assert_eq!(a.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&a), ["192.0.2.80"], "{protocol}");
        assert_eq!(
            a.answers[0].ttl, 300,
            "the upstream's record, as it sent it"
        );
        assert!(!a.authoritative);
        let aaaa = ask(dns, protocol, "example.test", RecordType::AAAA).await;
        assert_eq!(addresses(&aaaa), ["2001:db8::80"], "{protocol}");
        // A name the upstream does not know: its NXDOMAIN.
        let nx = ask(dns, protocol, "nope.example.test", RecordType::A).await;
        assert_eq!(nx.response_code, ResponseCode::NXDomain, "{protocol}");
        // A mesh name, but not an address type: the upstream's to answer.
        let mx = ask(dns, protocol, "reviews.bookinfo", RecordType::MX).await;
        assert_eq!(mx.response_code, ResponseCode::NXDomain, "{protocol}");
    }
    // Each went upstream over the client's protocol, and nothing else did.
    let asked: std::collections::BTreeSet<String> = upstream
        .asked()
        .iter()
        .map(|(name, kind, protocol)| format!("{name} {kind} {protocol}"))
        .collect();
    let expected: std::collections::BTreeSet<String> = BOTH
        .iter()
        .flat_map(|protocol| {
            [
                ("example.test", RecordType::A),
                ("example.test", RecordType::AAAA),
                ("nope.example.test", RecordType::A),
                ("reviews.bookinfo", RecordType::MX),
            ]
            .map(|(name, kind)| format!("{name} {kind} {protocol}"))
        })
        .collect();
    assert_eq!(asked, expected);
    assert_eq!(dns_queries(&proxy, "forwarded"), 8.0);
    assert_eq!(dns_queries(&proxy, "local"), 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_and_the_next_upstream_is_tried() {
    let ca = Ca::new();
    // Bound and never read (UDP), accepted and never answered (TCP).
    let silent_udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent = silent_udp.local_addr().unwrap();
    let silent_tcp = tokio::net::TcpListener::bind(silent).await.unwrap();
    let (proxy, dns) = dns_proxy(&ca, vec![silent], Duration::from_millis(300)).await;
    for protocol in BOTH {
        let answer = ask(dns, protocol, "example.test", RecordType::A).await;
        assert_eq!(answer.response_code, ResponseCode::ServFail, "{protocol}");
    }
    assert_eq!(dns_queries(&proxy, "failed"), 2.0);
    proxy.shutdown().await;

    // The same silent resolver first: the second answers.
    let upstream = FakeUpstream::start(&[("example.test", &["192.0.2.80"])]).await;
    let (proxy, dns) =
        dns_proxy(&ca, vec![silent, upstream.addr], Duration::from_millis(300)).await;
    for protocol in BOTH {
        let a = ask(dns, protocol, "example.test", RecordType::A).await;
        assert_eq!(addresses(&a), ["192.0.2.80"], "{protocol}");
    }
    proxy.shutdown().await;
    drop((silent_udp, silent_tcp));
}

#[tokio::test]
async fn services_pushed_while_serving_are_answered_without_a_restart() {
    let ca = Ca::new();
    let upstream = FakeUpstream::start(&[]).await;
    let (proxy, dns) = dns_proxy(&ca, vec![upstream.addr], Duration::from_secs(5)).await;
    let names = proxy.dns().unwrap().clone();
    let details = Service {
        host: "details.bookinfo".into(),
        addresses: vec!["240.240.3.4".into()],
        ..Service::default()
    };
    // Not a mesh name yet: forwarded, and the upstream does not know it.
    let before = ask(dns, Protocol::Udp, "details.bookinfo", RecordType::A).await;
    assert_eq!(before.response_code, ResponseCode::NXDomain);
    assert!(upstream.was_asked("details.bookinfo"));
    let asked_before = upstream.asked().len();

    let mut all = services();
    all.push(details);
    names.set_services(&all);
    for protocol in BOTH {
        let after = ask(dns, protocol, "details.bookinfo", RecordType::A).await;
        assert_eq!(addresses(&after), ["240.240.3.4"], "{protocol}");
    }
    assert_eq!(
        upstream.asked().len(),
        asked_before,
        "answered by the proxy, not upstream"
    );

    // Removed from the registry: forwarded again.
    names.set_services(&services());
    let removed = ask(dns, Protocol::Tcp, "details.bookinfo", RecordType::A).await;
    assert_eq!(removed.response_code, ResponseCode::NXDomain);
    assert!(upstream.asked()[asked_before..].contains(&(
        "details.bookinfo".to_owned(),
        RecordType::A,
        Protocol::Tcp
    )));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_proxy_awaiting_its_control_plane_answers_servfail_until_its_services_arrive() {
    let ca = Ca::new();
    let upstream = FakeUpstream::start(&[("example.test", &["192.0.2.80"])]).await;
    let (proxy, dns) = start(&ca, vec![upstream.addr], Duration::from_secs(5), true).await;
    for name in ["ratings.bookinfo", "example.test"] {
        let answer = ask(dns, Protocol::Udp, name, RecordType::A).await;
        assert_eq!(answer.response_code, ResponseCode::ServFail, "{name}");
    }
    assert_eq!(
        upstream.asked(),
        [],
        "nothing forwarded before the services"
    );
    proxy.dns().unwrap().set_services(&services());
    let a = ask(dns, Protocol::Udp, "ratings.bookinfo", RecordType::A).await;
    assert_eq!(addresses(&a), ["240.240.0.7"]);
    let forwarded = ask(dns, Protocol::Udp, "example.test", RecordType::A).await;
    assert_eq!(addresses(&forwarded), ["192.0.2.80"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_dns_address_that_cannot_be_bound_is_named() {
    let ca = Ca::new();
    let taken = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let workload = Workload::default();
    let config = ProxyConfig {
        workload: workload.clone(),
        inbound: vec![],
        upstreams: vec![],
        admin: None,
        limits: Limits::default(),
        drain_grace: Duration::from_secs(1),
        mark: None,
        transparent: None,
        dns: Some(DnsConfig {
            listen: vec![addr],
            upstreams: vec!["127.0.0.1:53".parse().unwrap()],
            mark: None,
            timeout: None,
            await_services: false,
        }),
    };
    let store = PolicyStore::new(workload, PolicySet::default(), "test".into());
    let logs = LogTargets {
        access: LogTarget::Off,
        audit: LogTarget::Off,
        facts: Default::default(),
    };
    let Err(error) = Proxy::start(config, ca.identity(&id("default", "app")), store, logs).await
    else {
        panic!("started on a taken address");
    };
    let text = error.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("dns/udp"),
        "{text}"
    );
}
