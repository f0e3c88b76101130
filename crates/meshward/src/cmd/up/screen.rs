//! What `up` shows: a banner that fits a terminal (each workload with its
//! address and identity, each service and who runs it, where the logs and
//! admin endpoints are), then one line per decision of this run — caller
//! and callee named as workloads, the request principal when a JWT was
//! verified, the deciding policy — and the calls that failed on their way
//! out (503s).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshward_policy::api::ServiceEntry;

use super::{Mesh, Started};

/// Prints the banner.
pub fn banner(mesh: &Mesh, services: &[&ServiceEntry]) {
    let namespaced = mesh.mode == "namespaced";
    println!(
        "meshward up: {} workloads, {}",
        mesh.workloads.len(),
        if mesh.user_namespace.is_some() {
            "each in its own network namespace (in a user namespace: no root needed)"
        } else if namespaced {
            "each in its own network namespace"
        } else {
            "all on 127.0.0.1 (explicit mode)"
        }
    );
    println!(
        "  control plane {}   state and logs in {}",
        mesh.control_plane,
        mesh.data_dir.display()
    );
    println!();
    let width = |f: &dyn Fn(&Started) -> String, title: &str| {
        mesh.workloads
            .iter()
            .map(|w| f(w).len())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let address = |w: &Started| match w.address {
        Some(ip) => ip.to_string(),
        None => w.app.to_string(),
    };
    let identity = |w: &Started| {
        if w.proxied {
            w.identity.clone()
        } else {
            "(no proxy)".to_owned()
        }
    };
    let (wn, wa) = (
        width(&|w: &Started| w.name.clone(), "WORKLOAD"),
        width(&address, "ADDRESS"),
    );
    println!("  {:<wn$}  {:<wa$}  IDENTITY", "WORKLOAD", "ADDRESS");
    for w in &mesh.workloads {
        println!("  {:<wn$}  {:<wa$}  {}", w.name, address(w), identity(w));
    }
    println!();
    if namespaced {
        let runs: Vec<(String, String)> = services
            .iter()
            .flat_map(|se| {
                let runners = runners(se, mesh);
                se.spec.hosts.iter().flat_map(move |host| {
                    let runners = runners.clone();
                    se.spec
                        .ports
                        .iter()
                        .map(move |p| (format!("{host}:{}", p.number), runners.clone()))
                })
            })
            .collect();
        let ws = runs.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        for (service, runners) in &runs {
            println!("  {service:<ws$}  run by {runners}");
        }
        println!();
        println!(
            "  Call a service from a workload:  meshward exec --data-dir {} WORKLOAD -- curl http://HOST:PORT/",
            mesh.data_dir.display()
        );
        println!(
            "  A proxy's admin (/config_dump):   meshward exec ... WORKLOAD -- curl http://127.0.0.1:15000/config_dump"
        );
    } else {
        println!(
            "  Where each workload calls each service (its local port): workloads[].upstreams in up.json"
        );
        println!("  A proxy's admin endpoints: workloads[].admin in up.json");
    }
    println!();
    println!("Decisions follow (Ctrl-C stops everything):");
}

/// The workloads a ServiceEntry selects, by name.
fn runners(se: &ServiceEntry, mesh: &Mesh) -> String {
    let Some(selector) = &se.spec.workload_selector else {
        return "its endpoints".into();
    };
    let ns = se.metadata.namespace_or_default();
    let names: Vec<&str> = mesh
        .workloads
        .iter()
        .filter(|w| w.namespace == ns && selector.matches(&w.labels))
        .map(|w| w.name.as_str())
        .collect();
    if names.is_empty() {
        "no workload".into()
    } else {
        names.join(", ")
    }
}

/// Who a record's caller is, by its address (each workload's own, in
/// namespaced mode) or else by its identity when one workload has it.
pub struct Names {
    by_address: BTreeMap<IpAddr, String>,
    by_identity: BTreeMap<String, Vec<String>>,
}

impl Names {
    pub fn new(mesh: &Mesh) -> Names {
        let mut by_identity: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for w in mesh.workloads.iter().filter(|w| w.proxied) {
            by_identity
                .entry(w.identity.clone())
                .or_default()
                .push(w.name.clone());
        }
        Names {
            by_address: mesh
                .workloads
                .iter()
                .filter_map(|w| Some((w.address?, w.name.clone())))
                .collect(),
            by_identity,
        }
    }

    fn caller(&self, r: &serde_json::Value) -> String {
        let address: Option<IpAddr> = r["source_address"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip());
        if let Some(name) = address.and_then(|ip| self.by_address.get(&ip)) {
            return name.clone();
        }
        match r["source_principal"].as_str() {
            Some(principal) => match self.by_identity.get(principal).map(Vec::as_slice) {
                Some([one]) => one.clone(),
                _ => principal
                    .rsplit("/ns/")
                    .next()
                    .unwrap_or(principal)
                    .replace("/sa/", "/"),
            },
            None => format!(
                "{} (plaintext)",
                address.map_or_else(|| "-".to_owned(), |ip| ip.to_string())
            ),
        }
    }
}

/// Prints the decisions (inbound) and failures (outbound) `workload`'s
/// proxy logs from now on, until `stop`. Logs of earlier runs were removed
/// when `up` started, so everything shown is this run's.
pub fn follow(workload: &str, log: &Path, names: &Names, stop: &AtomicBool) {
    let mut offset = 0u64;
    let mut partial = String::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut file) = std::fs::File::open(log) {
            use std::io::Seek;
            if file.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                let mut text = String::new();
                if let Ok(n) = file.read_to_string(&mut text) {
                    offset += n as u64;
                    partial.push_str(&text);
                    while let Some(end) = partial.find('\n') {
                        let line: String = partial.drain(..=end).collect();
                        if let Ok(r) = serde_json::from_str::<serde_json::Value>(&line)
                            && let Some(shown) = line_for(workload, &r, names)
                        {
                            println!("{shown}");
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One record as a line: every inbound decision, and outbound calls that
/// failed (a 5xx or no answer); `None` for the rest.
fn line_for(workload: &str, r: &serde_json::Value, names: &Names) -> Option<String> {
    let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    let status = r["status"].as_u64();
    let status_text = status.map_or_else(|| "-".to_owned(), |s| s.to_string());
    let line = if r["direction"] == "inbound" {
        let policy = match (r["policy"].as_str(), r["rule"].as_u64()) {
            (Some(p), Some(rule)) => format!("{p} rule {rule}"),
            (Some(p), None) => p.to_owned(),
            _ => String::new(),
        };
        let decision = text("decision").to_ascii_uppercase();
        let principal = r["request_principal"]
            .as_str()
            .map(|p| format!("[jwt {p}]"))
            .unwrap_or_default();
        let mut line = format!(
            "{decision} {} -> {workload} {} {} {status_text} {principal} {policy}",
            names.caller(r),
            text("method"),
            text("path"),
        );
        if decision == "DENY"
            && let Some(reason) = r["reason"].as_str()
        {
            line.push_str(&format!(" ({reason})"));
        }
        line
    } else {
        let failed = status.is_some_and(|s| s >= 500) || !r["error"].is_null();
        if !failed {
            return None;
        }
        let to = r["authority"]
            .as_str()
            .or_else(|| r["destination"].as_str())
            .unwrap_or("-");
        let mut line = format!(
            "FAIL {workload} -> {to} {} {} {status_text}",
            text("method"),
            text("path"),
        );
        if let Some(error) = r["error"].as_str() {
            line.push_str(&format!(" ({error})"));
        }
        line
    };
    // Empty fields leave no gaps; the first word is padded so lines align.
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or_default();
    Some(format!(
        "{first:<5} {}",
        words.collect::<Vec<_>>().join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Mesh {
        let workload = |name: &str, identity: &str, address: &str| Started {
            name: name.into(),
            identity: identity.into(),
            proxied: true,
            app: "198.18.0.9:9080".parse().unwrap(),
            ports: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            admin: None,
            access_log: None,
            netns: None,
            address: Some(address.parse().unwrap()),
            namespace: "bookinfo".into(),
            labels: BTreeMap::new(),
        };
        Mesh {
            control_plane: "https://127.0.0.1:1".into(),
            data_dir: "/tmp/x".into(),
            process_group: None,
            mode: "namespaced",
            user_namespace: None,
            gateways: Vec::new(),
            gateway_ca: None,
            workloads: vec![
                workload(
                    "bookinfo/reviews-v1",
                    "spiffe://cluster.local/ns/bookinfo/sa/reviews",
                    "198.18.0.3",
                ),
                workload(
                    "bookinfo/reviews-v2",
                    "spiffe://cluster.local/ns/bookinfo/sa/reviews",
                    "198.18.0.4",
                ),
                workload(
                    "bookinfo/sleep",
                    "spiffe://cluster.local/ns/bookinfo/sa/sleep",
                    "198.18.0.6",
                ),
            ],
        }
    }

    #[test]
    fn callers_are_named_as_workloads_by_address_or_identity() {
        let names = Names::new(&mesh());
        let record = |address: &str, principal: Option<&str>| serde_json::json!({"source_address": address, "source_principal": principal});
        // Two workloads share reviews' identity: the address tells them apart.
        assert_eq!(
            names.caller(&record(
                "198.18.0.4:4000",
                Some("spiffe://cluster.local/ns/bookinfo/sa/reviews")
            )),
            "bookinfo/reviews-v2"
        );
        // Elsewhere (explicit mode), a unique identity names its workload.
        assert_eq!(
            names.caller(&record(
                "127.0.0.1:4000",
                Some("spiffe://cluster.local/ns/bookinfo/sa/sleep")
            )),
            "bookinfo/sleep"
        );
        assert_eq!(
            names.caller(&record(
                "127.0.0.1:4000",
                Some("spiffe://cluster.local/ns/bookinfo/sa/reviews")
            )),
            "bookinfo/reviews"
        );
        assert_eq!(
            names.caller(&record("10.1.2.3:5", None)),
            "10.1.2.3 (plaintext)"
        );
    }

    #[test]
    fn decisions_show_the_jwt_principal_and_outbound_failures_are_shown() {
        let names = Names::new(&mesh());
        let allowed = serde_json::json!({
            "direction": "inbound", "decision": "allow", "source_address": "198.18.0.6:1",
            "method": "GET", "path": "/", "status": 200, "policy": "bookinfo/productpage-viewer",
            "rule": 0, "request_principal": "testing@secure.istio.io/alice"
        });
        assert_eq!(
            line_for("bookinfo/productpage", &allowed, &names).unwrap(),
            "ALLOW bookinfo/sleep -> bookinfo/productpage GET / 200 [jwt testing@secure.istio.io/alice] bookinfo/productpage-viewer rule 0"
        );
        let failed = serde_json::json!({
            "direction": "outbound", "source_address": "198.18.0.6:1", "authority": "reviews.bookinfo:9080",
            "method": "GET", "path": "/x", "status": 503, "error": "connection refused"
        });
        assert_eq!(
            line_for("bookinfo/productpage", &failed, &names).unwrap(),
            "FAIL  bookinfo/productpage -> reviews.bookinfo:9080 GET /x 503 (connection refused)"
        );
        let ok = serde_json::json!({"direction": "outbound", "status": 200});
        assert!(line_for("bookinfo/productpage", &ok, &names).is_none());
    }
}
