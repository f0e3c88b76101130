//! Explicit mode: everything on 127.0.0.1, where neither network
//! namespaces nor capture are possible (not root), or when asked
//! (`--explicit`). Each workload's application and proxy listen on free
//! ports; the proxy's `--inbound` ports are where peers reach the
//! workload, and each service it calls has a local `--upstream` listener,
//! which the demo application is told about. Addresses and ports written
//! in DIR's WorkloadEntries are replaced by the ones chosen; each named
//! port's number stays the port policies name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use meshward_policy::api::ServiceEntry;
use meshward_proxy::config::Protocol;

use super::{Plan, Started, free_addr, log_file, stderr_file};
use crate::children::Group;

/// Where a workload's application listens, and its named ports: (port
/// name, workload port number, where peers reach it).
pub struct Placement {
    app: SocketAddr,
    ports: Vec<(String, u16, SocketAddr)>,
}

/// Chooses every workload's addresses.
pub fn place(plans: &[Plan<'_>]) -> anyhow::Result<Vec<Placement>> {
    plans
        .iter()
        .map(|plan| {
            let app = free_addr()?;
            let mut ports = Vec::new();
            for (port_name, number) in &plan.entry.spec.ports {
                let number = u16::try_from(*number).context("a port number")?;
                ports.push((
                    port_name.clone(),
                    number,
                    if plan.proxied { free_addr()? } else { app },
                ));
            }
            Ok(Placement { app, ports })
        })
        .collect()
}

/// The WorkloadEntries with the addresses chosen.
pub fn registry(plans: &[Plan<'_>], placements: &[Placement]) -> anyhow::Result<String> {
    let mut registry = String::new();
    for (plan, placed) in plans.iter().zip(placements) {
        let mut entry = (*plan.entry).clone();
        entry.spec.address = "127.0.0.1".into();
        entry.spec.ports = placed
            .ports
            .iter()
            .map(|(name, _, addr)| (name.clone(), u32::from(addr.port())))
            .collect();
        registry.push_str(&serde_json::to_string(&entry)?);
        registry.push_str("\n---\n");
    }
    Ok(registry)
}

/// Starts every workload's application and proxy.
#[allow(clippy::too_many_arguments)]
pub fn start(
    plans: &[Plan<'_>],
    placements: &[Placement],
    services: &[&ServiceEntry],
    children: &mut Group,
    exe: &Path,
    data: &Path,
    control_plane: SocketAddr,
    token_for: &dyn Fn(&Plan<'_>) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<Vec<Started>> {
    let service_ports: Vec<(String, u16, String)> = services
        .iter()
        .flat_map(|se| {
            se.spec.hosts.iter().flat_map(move |host| {
                se.spec.ports.iter().filter_map(move |p| {
                    Some((
                        host.clone(),
                        u16::try_from(p.number).ok()?,
                        p.protocol.clone(),
                    ))
                })
            })
        })
        .collect();
    // Where each workload's named ports are, for workloads without a proxy.
    let views: Vec<Placed> = plans
        .iter()
        .zip(placements)
        .map(|(p, placed)| Placed {
            namespace: p.entry.metadata.namespace_or_default().to_owned(),
            labels: p.entry.spec.labels.clone(),
            ports: placed
                .ports
                .iter()
                .map(|(n, _, a)| (n.clone(), *a))
                .collect(),
        })
        .collect();
    let mut started = Vec::new();
    for (plan, placed) in plans.iter().zip(placements) {
        // The local address this workload calls each service on.
        let mut upstreams = BTreeMap::new();
        for (host, port, _) in &service_ports {
            let addr = if plan.proxied {
                Some(free_addr()?)
            } else {
                // Without a proxy, services are called where their workloads listen.
                endpoint_of(&views, services, host, *port)
            };
            if let Some(addr) = addr {
                upstreams.insert(format!("{host}:{port}"), addr);
            }
        }
        let mut app = Command::new(exe);
        match super::app_command(plan, placed.app.port()) {
            (args, true) => {
                app.args(args);
            }
            (_, false) => {
                app.args(["demo-app", "--name", &plan.entry.metadata.name])
                    .args(["--listen", &placed.app.to_string()]);
                for (service, addr) in &upstreams {
                    app.args(["--upstream", &format!("{service}={addr}")]);
                }
            }
        }
        app.stdout(Stdio::null())
            .stderr(stderr_file(data, &plan.name, "app")?);
        children.spawn(&format!("{} (application)", plan.name), &mut app)?;

        let mut admin = None;
        let mut access_log = None;
        if plan.proxied {
            let admin_addr = free_addr()?;
            let log = log_file(data, &plan.name, "jsonl");
            let mut proxy = Command::new(exe);
            proxy.args(["proxy", "--identity", &plan.identity.to_string()]);
            // Which WorkloadEntry it is: several may share the identity.
            proxy.args(["--workload", &plan.name]);
            for (k, v) in &plan.entry.spec.labels {
                proxy.args(["--label", &format!("{k}={v}")]);
            }
            for (port_name, number, addr) in &placed.ports {
                let protocol = Protocol::from_port_name(port_name).as_str();
                proxy.args([
                    "--inbound",
                    &format!("{addr}={},protocol={protocol},port={number}", placed.app),
                ]);
            }
            for (host, port, protocol) in &service_ports {
                let Some(local) = upstreams.get(&format!("{host}:{port}")) else {
                    continue;
                };
                let protocol = Protocol::from_port_name(&protocol.to_ascii_lowercase()).as_str();
                proxy.args([
                    "--upstream",
                    &format!("{host}:{port}={local},protocol={protocol}"),
                ]);
            }
            proxy
                .args(["--control-plane", &control_plane.to_string()])
                .args(["--ca-address", &format!("https://{control_plane}")])
                .arg("--ca-root")
                .arg(data.join("root-cert.pem"))
                .args(["--ca-server-name", "localhost", "--token-file"])
                .arg(token_for(plan)?)
                .arg("--report-decisions")
                .args(["--admin", &admin_addr.to_string(), "--access-log"])
                .arg(&log)
                .args(["--audit-log"])
                .arg(log_file(data, &plan.name, "audit.jsonl"))
                .stdout(Stdio::null())
                .stderr(stderr_file(data, &plan.name, "proxy")?);
            children.spawn(&format!("{} (proxy)", plan.name), &mut proxy)?;
            admin = Some(admin_addr);
            access_log = Some(log);
        }
        started.push(Started {
            name: plan.name.clone(),
            identity: plan.identity.to_string(),
            proxied: plan.proxied,
            app: placed.app,
            ports: placed.ports.iter().map(|(_, n, a)| (*n, *a)).collect(),
            upstreams,
            admin,
            access_log,
            netns: None,
            address: None,
            namespace: plan.entry.metadata.namespace_or_default().to_owned(),
            labels: plan.entry.spec.labels.clone(),
        });
    }
    Ok(started)
}

/// A workload's namespace, labels, and where its named ports are.
struct Placed {
    namespace: String,
    labels: BTreeMap<String, String>,
    ports: Vec<(String, SocketAddr)>,
}

/// Where a service's first endpoint listens, for workloads without a proxy.
fn endpoint_of(
    plans: &[Placed],
    services: &[&ServiceEntry],
    host: &str,
    port: u16,
) -> Option<SocketAddr> {
    let se = services
        .iter()
        .find(|se| se.spec.hosts.iter().any(|h| h == host))?;
    let port_name = se
        .spec
        .ports
        .iter()
        .find(|p| p.number == u32::from(port))?
        .name
        .clone();
    let selector = se.spec.workload_selector.as_ref()?;
    let ns = se.metadata.namespace_or_default();
    plans.iter().find_map(|p| {
        (p.namespace == ns && selector.matches(&p.labels))
            .then(|| {
                p.ports
                    .iter()
                    .find(|(n, _)| *n == port_name)
                    .map(|(_, a)| *a)
            })
            .flatten()
    })
}
