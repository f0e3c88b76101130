//! `meshward proxy --dns-listen` configured by `meshward server`: the
//! names of the registry's services resolve to their addresses — those an
//! entry gives, or the pair the control plane allocated — and other names
//! are forwarded to `--dns-upstream`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use common::*;
use meshward_proxy::testing::dns::{
    DnsProtocol, FakeUpstream, RecordType, ResponseCode, addresses, ask,
};

const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: sleep, namespace: sleep}
spec: {address: 127.0.0.1, labels: {app: sleep}, serviceAccount: sleep}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: web}
spec: {address: 127.0.0.1, labels: {app: web}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: web}
spec:
  hosts: [web.web]
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: web}
spec:
  hosts: [db.web.svc.cluster.local]
  addresses: [192.0.2.5]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, serviceAccount: db}]
"#;

#[test]
fn service_names_resolve_to_the_registrys_addresses_and_the_rest_is_forwarded() {
    let dir = tempdir("dns");
    let mesh = server(&dir);
    let file = dir.join("registry.yaml");
    std::fs::write(&file, REGISTRY).unwrap();
    let applied = mesh.admin(&["apply", "-f", file.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(FakeUpstream::start(&[("example.test", &["192.0.2.80"])]));
    let proxy = spawn(
        "meshward proxy (sleep)",
        meshward()
            .args([
                "proxy",
                "--identity",
                "spiffe://cluster.local/ns/sleep/sa/sleep",
            ])
            .args(["--control-plane", &mesh.ca_addr])
            .args(["--ca-address", &format!("https://{}", mesh.ca_addr)])
            .args([
                "--ca-root",
                mesh.data.join("root-cert.pem").to_str().unwrap(),
            ])
            .args(["--ca-server-name", "localhost"])
            .args([
                "--token-file",
                mesh.token("sleep", "sleep").to_str().unwrap(),
            ])
            .args([
                "--admin",
                "127.0.0.1:0",
                "--access-log",
                "off",
                "--audit-log",
                "off",
            ])
            .args(["--dns-listen", "127.0.0.1:0"])
            .args(["--dns-upstream", &upstream.addr.to_string()]),
    );
    let line = proxy.logs.wait_for_stderr("meshward proxy: dns on ", START);
    let dns: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    // Once the control plane's services are in force, web.web answers with
    // the pair allocated for it (the entry gives none).
    let web = wait_for(START, || {
        let a = runtime.block_on(ask(dns, DnsProtocol::Udp, "web.web", RecordType::A));
        match addresses(&a).as_slice() {
            [one] => Ok(one.parse::<Ipv4Addr>().unwrap()),
            other => Err(format!("web.web A: {:?} {other:?}", a.response_code)),
        }
    });
    // Until then web.web went upstream; from now on no mesh name does.
    let asked_before = upstream.asked().len();
    let [240, 240, hi, lo] = web.octets() else {
        panic!("{web} is not in 240.240.0.0/16");
    };
    for protocol in [DnsProtocol::Udp, DnsProtocol::Tcp] {
        let aaaa = runtime.block_on(ask(dns, protocol, "web.web", RecordType::AAAA));
        let v6: Vec<Ipv6Addr> = addresses(&aaaa)
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            v6,
            [Ipv6Addr::new(
                0x2001,
                2,
                0,
                0,
                0,
                0,
                0xf0f0,
                u16::from_be_bytes([hi, lo])
            )],
            "{protocol}"
        );
        // An entry's own address, under its Kubernetes-style short forms.
        for name in ["db.web", "db.web.svc", "db.web.svc.cluster.local"] {
            let a = runtime.block_on(ask(dns, protocol, name, RecordType::A));
            assert_eq!(addresses(&a), ["192.0.2.5"], "{protocol} {name}");
        }
        let forwarded = runtime.block_on(ask(dns, protocol, "example.test", RecordType::A));
        assert_eq!(addresses(&forwarded), ["192.0.2.80"], "{protocol}");
        let unknown = runtime.block_on(ask(dns, protocol, "nope.test", RecordType::A));
        assert_eq!(unknown.response_code, ResponseCode::NXDomain, "{protocol}");
    }
    let asked: Vec<String> = upstream.asked()[asked_before..]
        .iter()
        .map(|(name, _, _)| name.clone())
        .collect();
    assert!(
        asked
            .iter()
            .all(|n| n == "example.test" || n == "nope.test"),
        "only other names went upstream: {asked:?}"
    );
}
