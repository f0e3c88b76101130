//! Transparent mode, end to end: a control plane and workloads each in a
//! network namespace of their own (tests/common/netns.rs), proxies started
//! with `--capture`, and applications that know nothing of the mesh — curl,
//! getent, a plain TCP client — calling services by name.
//!
//! These tests need root (network namespaces, iptables): they say so and
//! are skipped otherwise. CI runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use common::netns::{Host, Network, require_root};
use common::*;
use nix::sys::signal::Signal;

/// The mark the proxies put on their own connections: they run as root,
/// so the capture rules cannot exempt them by uid.
const MARK: &str = "1337";
const NS: &str = "bookinfo";
const TD: &str = "cluster.local";

/// A control plane in its own host, and the workloads a test adds. Field
/// order is drop order: processes stop before their namespaces go.
struct Mesh {
    processes: Vec<(String, Spawned)>,
    dir: PathBuf,
    data: PathBuf,
    config: PathBuf,
    server: SocketAddr,
    /// The control plane's host: commands that talk to the server run
    /// there (the root namespace has no route to the network).
    cp: Host,
    _net: Network,
}

impl Mesh {
    /// A network whose first host runs `meshward server` watching a
    /// config directory, and the hosts named in `hosts` (198.18.0.2, .3, …
    /// in that order).
    fn new(test: &str, hosts: &[&str]) -> (Mesh, Vec<Host>) {
        let net = Network::new(test);
        let cp = net.host("cp");
        let hosts = hosts.iter().map(|h| net.host(h)).collect();
        let dir = tempdir(test);
        let data = dir.join("data");
        let config = dir.join("config");
        std::fs::create_dir_all(&config).unwrap();
        let server = SocketAddr::new(IpAddr::V4(cp.ipv4()), 15012);
        let spawned = cp.spawn(
            "meshward server",
            &[
                bin(),
                "server",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &server.to_string(),
                "--config-dir",
                config.to_str().unwrap(),
            ],
        );
        spawned.logs.wait_for_stdout("listening on https://", START);
        let mesh = Mesh {
            processes: vec![("server".into(), spawned)],
            dir,
            data,
            config,
            server,
            cp,
            _net: net,
        };
        (mesh, hosts)
    }

    /// Writes `yaml` into the watched config directory as `name`.
    fn put(&self, name: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{name}"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config.join(name)).unwrap();
    }

    /// The MeshConfig in force, through the config API.
    fn mesh_config(&self, yaml: &str) {
        let file = self.dir.join("mesh.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = self.cp.output(&[
            bin(),
            "apply",
            "--mesh-config",
            "-f",
            file.to_str().unwrap(),
            "--server",
            &format!("https://{}", self.server),
            "--data-dir",
            self.data.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "apply --mesh-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `meshward demo-app` named `name` in `host`: HTTP on 9080, TCP echo
    /// on 9000, every address.
    fn app(&mut self, host: &Host, name: &str) {
        let app = host.spawn(
            &format!("{name} (application)"),
            &[
                bin(),
                "demo-app",
                "--name",
                name,
                "--listen",
                "[::]:9080",
                "--tcp-echo",
                "[::]:9000",
            ],
        );
        self.processes.push((format!("{name} app"), app));
        host.wait_for_port(SocketAddr::new(IpAddr::V4(host.ipv4()), 9080));
    }

    /// The command line of a proxy for WorkloadEntry `NS/name` (service
    /// account `sa`), capturing its traffic, with a bootstrap token of its
    /// own; `extra` arguments added.
    fn proxy_argv(&self, name: &str, sa: &str, extra: &[&str]) -> Vec<String> {
        let token = self.dir.join(format!("{name}.token"));
        let out = run(&[
            "token",
            "create",
            "--data-dir",
            self.data.to_str().unwrap(),
            "-n",
            NS,
            "--service-account",
            sa,
        ]);
        std::fs::write(&token, out.stdout).unwrap();
        let log = self.access_log_path(name);
        let mut argv: Vec<String> = [
            bin(),
            "proxy",
            "--identity",
            &format!("spiffe://{TD}/ns/{NS}/sa/{sa}"),
            "--workload",
            &format!("{NS}/{name}"),
            "--capture",
            "--proxy-mark",
            MARK,
            "--control-plane",
            &self.server.to_string(),
            "--ca-address",
            &format!("https://{}", self.server),
            "--ca-root",
            self.data.join("root-cert.pem").to_str().unwrap(),
            "--ca-server-name",
            "localhost",
            "--token-file",
            token.to_str().unwrap(),
            "--access-log",
            log.to_str().unwrap(),
            "--audit-log",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    /// A proxy for WorkloadEntry `NS/name` (service account `sa`) in `host`,
    /// capturing its traffic; `extra` arguments added. Returns once it
    /// serves the control plane's configuration.
    fn proxy(&mut self, host: &Host, name: &str, sa: &str, extra: &[&str]) {
        let argv = self.proxy_argv(name, sa, extra);
        let proxy = host.spawn(&format!("{name} proxy"), &argv);
        self.processes.push((format!("{name} proxy"), proxy));
        wait_for(START, || {
            let dump = host.output(&[
                "curl",
                "-sS",
                "-m",
                "5",
                "http://127.0.0.1:15000/config_dump",
            ]);
            let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
            if dump.contains("\"source\": \"control plane") {
                Ok(())
            } else {
                Err(format!("{name}'s proxy is not configured yet: {dump}"))
            }
        });
    }

    fn access_log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.access.jsonl"))
    }

    /// The access records of `name`'s proxy.
    fn access_log(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.access_log_path(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn process(&mut self, name: &str) -> &mut Spawned {
        &mut self
            .processes
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .1
    }
}

fn workload_entry(name: &str, sa: &str, host: &Host, labels: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {{name: {name}, namespace: {NS}}}\n\
         spec: {{address: {}, serviceAccount: {sa}, labels: {{{labels}}}}}\n---\n",
        host.ipv4()
    )
}

/// `ratings.bookinfo` on the workloads labelled `app: ratings`: HTTP on
/// 9080, TCP on 9000. No address: the control plane allocates one.
const RATINGS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  - {number: 9000, name: tcp, protocol: TCP}
  - {number: 9090, name: grpc, protocol: GRPC}
  workloadSelector: {labels: {app: ratings}}
";

/// `curl ARGS` in `host`: (exit code, standard output).
fn curl(host: &Host, args: &[&str]) -> (i32, String) {
    let mut argv = vec!["curl", "-sS", "-m", "10"];
    argv.extend_from_slice(args);
    let out = host.output(&argv);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The HTTP status `curl` got for `url` from `host` (0: no response).
fn status(host: &Host, url: &str) -> u16 {
    let (_, out) = curl(host, &["-o", "/dev/null", "-w", "%{http_code}", url]);
    out.trim().parse().unwrap_or(0)
}

/// What `getent ahostsvN name` answers in `host`: the addresses, none when
/// the name does not resolve.
fn resolve(host: &Host, family: &str, name: &str) -> Vec<IpAddr> {
    let out = host.output(&["getent", family, name]);
    let mut addrs: Vec<IpAddr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    addrs.dedup();
    addrs
}

/// A gRPC health service (tonic-health) listening in `host` on `port`,
/// served from a thread of the test until the returned sender is dropped.
/// The listening socket is made in the host's namespace; sockets stay in
/// the namespace they were made in, wherever they are served from.
fn grpc_health_server(host: &Host, port: u16) -> std::sync::mpsc::Sender<()> {
    let listener = host.within(|| {
        std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(host.ipv4()), port)).unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("ratings", tonic_health::ServingStatus::Serving)
                .await;
            let stop = async move {
                // The sender dropping ends the wait.
                let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
            };
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop,
                )
                .await;
        });
    });
    stop
}

/// Asks the gRPC health service `service` at `addr`, from a connection made
/// in `host` (so it is captured like the application's own).
fn grpc_health_check(host: &Host, addr: SocketAddr, service: &str) -> Result<i32, String> {
    let stream = host
        .within(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let stream = std::sync::Mutex::new(Some(tokio::net::TcpStream::from_std(stream).unwrap()));
        // The one connection made above; tonic asks for it once.
        let connector = tower::service_fn(move |_: http::Uri| {
            let stream = stream.lock().unwrap().take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("only one connection"))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(COMMAND)
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let response = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
        Ok(response.into_inner().status)
    })
}

#[test]
fn an_unchanged_application_calls_a_service_by_name_over_mutual_tls_authorized_by_policy() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("by-name", &["productpage", "ratings"]);
    let [productpage, ratings] = [&hosts[0], &hosts[1]];
    mesh.put(
        "registry.yaml",
        &format!(
            "{}{}{RATINGS}",
            workload_entry(
                "productpage",
                "productpage",
                productpage,
                "app: productpage"
            ),
            workload_entry("ratings", "ratings", ratings, "app: ratings"),
        ),
    );
    mesh.put(
        "policies.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  # The port keeps this rule off the TCP port: there a DENY rule's HTTP
  # fields are dropped, which would deny every connection (as in Istio).
  - to: [{operation: {ports: [\"9080\"], paths: [/denied]}}]
",
    );
    mesh.app(ratings, "ratings");
    let _grpc = grpc_health_server(ratings, 9090);
    mesh.proxy(ratings, "ratings", "ratings", &[]);
    mesh.proxy(
        productpage,
        "productpage",
        "productpage",
        &["--capture-dns"],
    );

    // By name, as the application would: the DNS proxy answers, the call
    // is captured and leaves as mutual TLS, the application sees the
    // caller's identity.
    let (code, body) = curl(productpage, &["http://ratings.bookinfo:9080/hello"]);
    assert_eq!(code, 0, "curl failed: {body}");
    let echoed: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(echoed["name"], "ratings");
    let xfcc = echoed["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default();
    assert!(
        xfcc.contains(&format!("URI=spiffe://{TD}/ns/{NS}/sa/productpage")),
        "{body}"
    );
    // Denied by policy at the server's proxy.
    assert_eq!(
        status(productpage, "http://ratings.bookinfo:9080/denied"),
        403
    );

    // TCP: a plain client socket in the workload's namespace.
    let vip = resolve(productpage, "ahostsv4", "ratings.bookinfo");
    assert_eq!(vip.len(), 1, "{vip:?}");
    let echoed = productpage.within(|| {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::new(vip[0], 9000), Duration::from_secs(10))
                .unwrap();
        stream.set_read_timeout(Some(COMMAND)).unwrap();
        stream.write_all(b"ping over the mesh").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).unwrap();
        back
    });
    assert_eq!(echoed, "ping over the mesh");
    // gRPC, over HTTP/2 end to end.
    let serving = grpc_health_check(productpage, SocketAddr::new(vip[0], 9090), "ratings");
    assert_eq!(
        serving,
        Ok(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    );
    wait_until(SETTLE, "the TCP connection in ratings' access log", || {
        mesh.access_log("ratings").iter().any(|r| {
            r["protocol"] == "TCP"
                && r["direction"] == "inbound"
                && r["source_principal"] == format!("spiffe://{TD}/ns/{NS}/sa/productpage")
        })
    });
    // Each log is written in batches of its own: wait for each record.
    wait_until(
        SETTLE,
        "the refused call in productpage's access log",
        || {
            mesh.access_log("productpage")
                .iter()
                .any(|r| r["destination"] == "outbound|9080|ratings.bookinfo" && r["status"] == 403)
        },
    );
    wait_until(SETTLE, "the gRPC call in ratings' access log", || {
        mesh.access_log("ratings").iter().any(|r| {
            r["protocol"] == "HTTP/2"
                && r["path"] == "/grpc.health.v1.Health/Check"
                && r["source_principal"] == format!("spiffe://{TD}/ns/{NS}/sa/productpage")
        })
    });
}

#[test]
fn a_workload_without_a_proxy_cannot_reach_a_strict_workload_in_plaintext_and_permissive_lets_it_in()
 {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("strict", &["legacy", "ratings"]);
    let [legacy, ratings] = [&hosts[0], &hosts[1]];
    mesh.put(
        "registry.yaml",
        &format!(
            "{}{RATINGS}",
            workload_entry("ratings", "ratings", ratings, "app: ratings")
        ),
    );
    let peer_authentication = |mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: bookinfo}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    mesh.put("policies.yaml", &peer_authentication("STRICT"));
    mesh.app(ratings, "ratings");
    mesh.proxy(ratings, "ratings", "ratings", &[]);

    // The legacy host has no proxy: it calls the workload's own address in
    // plaintext, which capture delivers to ratings' proxy.
    let url = format!("http://{}:9080/hello", ratings.ipv4());
    assert_eq!(status(legacy, &url), 0, "STRICT let plaintext through");
    // Refused by ratings' proxy for being plaintext on a STRICT port,
    // this caller's connection to the application's own port.
    let legacy_ip = legacy.ipv4().to_string();
    wait_until(SETTLE, "the refusal in ratings' access log", || {
        mesh.access_log("ratings").iter().any(|r| {
            r["direction"] == "inbound"
                && r["decision"] == "deny"
                && r["destination"] == "inbound|9080"
                && r["mtls_mode"] == "STRICT"
                && r["source_address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{legacy_ip}:")))
        })
    });

    mesh.put("policies.yaml", &peer_authentication("PERMISSIVE"));
    wait_until(SETTLE, "PERMISSIVE lets plaintext in", || {
        status(legacy, &url) == 200
    });
    let (_, body) = curl(legacy, &[&url]);
    assert!(!body.contains("x-forwarded-client-cert"), "{body}");
}

#[test]
fn unknown_destinations_follow_the_outbound_traffic_policy_and_exclusions_bypass_the_proxy() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("egress", &["productpage", "outside", "other"]);
    let [productpage, outside, other] = [&hosts[0], &hosts[1], &hosts[2]];
    mesh.put(
        "registry.yaml",
        &workload_entry(
            "productpage",
            "productpage",
            productpage,
            "app: productpage",
        ),
    );
    // Neither host is in the registry; both run plain applications.
    mesh.app(outside, "outside");
    mesh.app(other, "other");
    mesh.proxy(
        productpage,
        "productpage",
        "productpage",
        &[
            "--exclude-outbound-ports",
            "9000",
            "--exclude-outbound-ip-ranges",
            &format!("{}/32", other.ipv4()),
        ],
    );
    let unknown = format!("http://{}:9080/", outside.ipv4());

    // ALLOW_ANY, Istio's default: passed through as plain TCP.
    assert_eq!(status(productpage, &unknown), 200);
    wait_until(SETTLE, "a PassthroughCluster record", || {
        mesh.access_log("productpage")
            .iter()
            .any(|r| r["destination"] == "PassthroughCluster")
    });

    // REGISTRY_ONLY: refused, and logged as the black hole.
    mesh.mesh_config("outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n");
    wait_until(SETTLE, "REGISTRY_ONLY refuses the unknown address", || {
        status(productpage, &unknown) == 0
    });
    wait_until(
        SETTLE,
        "a BlackHoleCluster denial in the access log",
        || {
            mesh.access_log("productpage")
                .iter()
                .any(|r| r["destination"] == "BlackHoleCluster" && r["decision"] == "deny")
        },
    );
    // An excluded port and an excluded range never reach the proxy.
    let (code, echoed) = productpage.within(|| {
        let addr = SocketAddr::new(IpAddr::V4(outside.ipv4()), 9000);
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        stream.set_read_timeout(Some(COMMAND)).unwrap();
        stream.write_all(b"direct").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        (stream.read_to_string(&mut back).map(|_| 0), back)
    });
    assert_eq!((code.unwrap(), echoed.as_str()), (0, "direct"));
    assert_eq!(
        status(productpage, &format!("http://{}:9080/", other.ipv4())),
        200
    );
    let records = mesh.access_log("productpage");
    assert!(
        !records.iter().any(|r| {
            let upstream = r["upstream"].as_str().unwrap_or_default();
            upstream.ends_with(":9000") || upstream.starts_with(&other.ipv4().to_string())
        }),
        "an excluded destination went through the proxy: {records:?}"
    );
}

#[test]
fn two_endpoints_of_a_service_each_get_a_fair_share_of_requests() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("balance", &["productpage", "ratings-1", "ratings-2"]);
    let [productpage, r1, r2] = [&hosts[0], &hosts[1], &hosts[2]];
    mesh.put(
        "registry.yaml",
        &format!(
            "{}{}{}{RATINGS}",
            workload_entry(
                "productpage",
                "productpage",
                productpage,
                "app: productpage"
            ),
            workload_entry("ratings-1", "ratings", r1, "app: ratings"),
            workload_entry("ratings-2", "ratings", r2, "app: ratings"),
        ),
    );
    for (host, name) in [(r1, "ratings-1"), (r2, "ratings-2")] {
        mesh.app(host, name);
        mesh.proxy(host, name, "ratings", &[]);
    }
    mesh.proxy(
        productpage,
        "productpage",
        "productpage",
        &["--capture-dns"],
    );

    // One curl, 100 requests on one kept-alive connection to the proxy:
    // balanced per request, not per connection.
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://ratings.bookinfo:9080/{i}"))
        .collect();
    let mut args: Vec<&str> = vec!["-w", "\n"];
    args.extend(urls.iter().map(String::as_str));
    let (code, out) = curl(productpage, &args);
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names.len(), 100, "{out}");
    for name in ["ratings-1", "ratings-2"] {
        let share = names.iter().filter(|n| *n == name).count();
        assert!(share > 30, "{name} got {share} of 100: {names:?}");
    }

    // A DestinationRule asks for ROUND_ROBIN: strictly in turn.
    mesh.put(
        "destination-rule.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings.bookinfo
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
",
    );
    wait_until(SETTLE, "ROUND_ROBIN in productpage's routes", || {
        let dump = productpage.output(&[
            "curl",
            "-sS",
            "-m",
            "5",
            "http://127.0.0.1:15000/config_dump",
        ]);
        String::from_utf8_lossy(&dump.stdout).contains("ROUND_ROBIN")
    });
    let (code, out) = curl(productpage, &args);
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names.len(), 100, "{out}");
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "not in turn: {names:?}"
    );

    // One endpoint goes away (its application, then its proxy, which takes
    // its capture rules along): connections to it are refused, and every
    // request still succeeds, on the other.
    mesh.process("ratings-2 app").stop();
    mesh.process("ratings-2 proxy").stop();
    let (code, out) = curl(productpage, &args);
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, vec!["ratings-1".to_owned(); 100], "{out}");
}

#[test]
fn before_its_first_configuration_a_captured_proxy_lets_nothing_out() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("unconfigured", &["productpage", "outside"]);
    let [productpage, outside] = [&hosts[0], &hosts[1]];
    mesh.app(outside, "outside");
    // No WorkloadEntry names productpage: the control plane refuses its
    // claim, so it never receives a configuration.
    let argv = mesh.proxy_argv("productpage", "productpage", &[]);
    let proxy = productpage.spawn("productpage proxy", &argv);
    proxy
        .logs
        .wait_for_stderr("the control plane refused this proxy", START);
    mesh.processes.push(("productpage proxy".into(), proxy));
    // ALLOW_ANY is the mesh's default, yet nothing passes: the proxy does
    // not know the mesh yet.
    assert_eq!(
        status(productpage, &format!("http://{}:9080/", outside.ipv4())),
        0
    );
    let dump = productpage.output(&[
        "curl",
        "-sS",
        "-m",
        "5",
        "http://127.0.0.1:15000/config_dump",
    ]);
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert_eq!(dump["routes"]["configured"], false, "{dump}");
}

#[test]
fn capture_rules_leave_with_the_proxy_and_uninstall_removes_what_a_killed_one_left() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("capture", &["productpage"]);
    let productpage = &hosts[0];
    mesh.put(
        "registry.yaml",
        &workload_entry(
            "productpage",
            "productpage",
            productpage,
            "app: productpage",
        ),
    );
    let meshward_rules = |host: &Host| {
        let mut lines = Vec::new();
        for save in ["iptables-save", "ip6tables-save"] {
            let out = host.run(&[save]);
            lines.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("MESHWARD"))
                    .map(str::to_owned),
            );
        }
        lines
    };
    assert!(meshward_rules(productpage).is_empty());

    // Stopped: its rules go with it.
    mesh.proxy(
        productpage,
        "productpage",
        "productpage",
        &["--capture-dns"],
    );
    let installed = meshward_rules(productpage);
    assert!(
        installed
            .iter()
            .any(|l| l.contains("REDIRECT --to-ports 15001")),
        "{installed:?}"
    );
    assert!(
        installed.iter().any(|l| l.contains("--to-ports 15053")),
        "{installed:?}"
    );
    let status = mesh.process("productpage proxy").stop();
    assert!(status.success(), "{status}");
    assert!(meshward_rules(productpage).is_empty());

    // Killed: the rules stay, and `capture uninstall` removes them.
    mesh.processes.retain(|(n, _)| n != "productpage proxy");
    mesh.proxy(productpage, "productpage", "productpage", &[]);
    let proxy = mesh.process("productpage proxy");
    proxy.process.signal(Signal::SIGKILL);
    proxy.wait_exit(SETTLE);
    let left = meshward_rules(productpage);
    assert!(!left.is_empty(), "a killed proxy cannot remove its rules");
    // Another proxy refuses to take over (or remove) rules it did not install.
    let refused = productpage.output(&[
        bin(),
        "proxy",
        "--identity",
        &format!("spiffe://{TD}/ns/{NS}/sa/productpage"),
        "--capture",
        "--proxy-mark",
        MARK,
        "--control-plane",
        &mesh.server.to_string(),
        "--ca-root",
        mesh.data.join("root-cert.pem").to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("already installed"), "{stderr}");
    assert_eq!(meshward_rules(productpage), left);
    let out = productpage.run(&[bin(), "capture", "uninstall"]);
    assert!(out.status.success());
    assert!(meshward_rules(productpage).is_empty());
}

#[test]
fn captured_dns_answers_mesh_names_in_both_families_and_forwards_the_rest() {
    require_root!();
    let (mut mesh, hosts) = Mesh::new("dns", &["productpage", "resolver"]);
    let [productpage, resolver] = [&hosts[0], &hosts[1]];
    mesh.put(
        "registry.yaml",
        &format!(
            "{}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: details, namespace: bookinfo}}
spec:
  hosts: [details.bookinfo.svc.cluster.local]
  addresses: [240.240.7.7, \"2001:2::7:7\"]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {}}}]
---
{RATINGS}",
            workload_entry(
                "productpage",
                "productpage",
                productpage,
                "app: productpage"
            ),
            resolver.ipv4(),
        ),
    );
    // The machine's resolver is never asked: the host's resolv.conf names
    // the gateway, capture sends that to the proxy, and the proxy forwards
    // what it does not answer to this one.
    let (udp, tcp) = resolver.within(|| {
        let addr = SocketAddr::new(IpAddr::V4(resolver.ipv4()), 53);
        (
            std::net::UdpSocket::bind(addr).unwrap(),
            std::net::TcpListener::bind(addr).unwrap(),
        )
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(async {
        meshward_proxy::testing::dns::FakeUpstream::on(
            udp,
            tcp,
            &[
                ("example.test", &["198.18.0.200", "2001:2::200"]),
                ("api.example.test", &[&resolver.ipv4().to_string()]),
            ],
        )
    });
    // details' only endpoint, a plain application without a proxy.
    mesh.app(resolver, "details");
    mesh.proxy(
        productpage,
        "productpage",
        "productpage",
        &[
            "--capture-dns",
            "--dns-upstream",
            &upstream.addr.to_string(),
        ],
    );

    // A mesh host with its own addresses, in every form a Kubernetes
    // resolver would ask, A and AAAA.
    for name in [
        "details.bookinfo.svc.cluster.local",
        "details.bookinfo.svc",
        "details.bookinfo",
        "details",
    ] {
        assert_eq!(
            resolve(productpage, "ahostsv4", name),
            vec!["240.240.7.7".parse::<IpAddr>().unwrap()],
            "{name}"
        );
        assert_eq!(
            resolve(productpage, "ahostsv6", name),
            vec!["2001:2::7:7".parse::<IpAddr>().unwrap()],
            "{name}"
        );
    }
    // An allocated pair: IPv4 from 240.240.0.0/16, IPv6 from 2001:2::/48.
    let v4 = resolve(productpage, "ahostsv4", "ratings.bookinfo");
    let v6 = resolve(productpage, "ahostsv6", "ratings.bookinfo");
    let in_range = |ip: &IpAddr, net: &str| net.parse::<ipnet::IpNet>().unwrap().contains(ip);
    assert!(
        v4.len() == 1 && in_range(&v4[0], "240.240.0.0/16"),
        "{v4:?}"
    );
    assert!(v6.len() == 1 && in_range(&v6[0], "2001:2::/48"), "{v6:?}");
    assert!(
        !upstream.was_asked("ratings.bookinfo"),
        "{:?}",
        upstream.asked()
    );
    // A call by name over IPv6 reaches the service too (the proxy routes
    // the IPv6 address; the endpoint is called over IPv4 as registered).
    let (code, body) = curl(productpage, &["-6", "http://details.bookinfo:9080/v6"]);
    assert_eq!(code, 0, "{body}");

    // Everything else is forwarded, and the upstream's answer comes back.
    assert_eq!(
        resolve(productpage, "ahostsv4", "example.test"),
        vec!["198.18.0.200".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        resolve(productpage, "ahostsv6", "example.test"),
        vec!["2001:2::200".parse::<IpAddr>().unwrap()]
    );
    assert!(upstream.was_asked("example.test"));
    assert!(resolve(productpage, "ahostsv4", "nowhere.test").is_empty());
    assert!(upstream.was_asked("nowhere.test"));

    // Egress under REGISTRY_ONLY, as Istio users allow it: a `resolution:
    // DNS` entry is called by name (its allocated address), its host
    // resolved by the proxy through the upstream resolver; a `resolution:
    // NONE` entry's range passes through to the address called.
    mesh.put(
        "egress.yaml",
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: bookinfo}
spec:
  hosts: [api.example.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 9080, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo-range, namespace: bookinfo}
spec:
  hosts: [echo.example.test]
  addresses: [198.18.0.0/24]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 9000, name: tcp, protocol: TCP}]
",
    );
    mesh.mesh_config("outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n");
    wait_until(
        SETTLE,
        "the egress entries and REGISTRY_ONLY in force",
        || {
            let dump = productpage.output(&[
                "curl",
                "-sS",
                "-m",
                "5",
                "http://127.0.0.1:15000/config_dump",
            ]);
            let dump = String::from_utf8_lossy(&dump.stdout);
            dump.contains("REGISTRY_ONLY")
                && dump.contains("api.example.test:9080")
                && dump.contains("echo.example.test")
        },
    );
    let api = resolve(productpage, "ahostsv4", "api.example.test");
    assert!(
        api.len() == 1 && in_range(&api[0], "240.240.0.0/16"),
        "{api:?}"
    );
    let (code, body) = curl(productpage, &["http://api.example.test:9080/egress"]);
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("\"name\":\"details\""), "{body}");
    assert!(upstream.was_asked("api.example.test"));
    let echoed = productpage.within(|| {
        let addr = SocketAddr::new(IpAddr::V4(resolver.ipv4()), 9000);
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        stream.set_read_timeout(Some(COMMAND)).unwrap();
        stream.write_all(b"in range").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).unwrap();
        back
    });
    assert_eq!(echoed, "in range");
    wait_until(
        SETTLE,
        "both egress calls in productpage's access log",
        || {
            let records = mesh.access_log("productpage");
            records
                .iter()
                .any(|r| r["destination"] == "outbound|9000|echo.example.test")
                && records.iter().any(|r| {
                    r["destination"] == "outbound|9080|api.example.test" && r["status"] == 200
                })
        },
    );
    drop(runtime);
}
