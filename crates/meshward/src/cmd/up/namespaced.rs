//! Namespaced mode: every workload of DIR gets what a pod has — its own
//! network namespace and address on the lab's bridge (`meshward-netns`:
//! 198.18.0.0/24, no route out), its proxy capturing its traffic
//! (`meshward proxy --capture`, marked so its own connections pass) and
//! answering its DNS, and its application on its real port, calling
//! services by name. The control plane runs in a namespace of its own on
//! the same bridge, so the server sees each proxy's own address (and
//! checks a workload's claim against it); the machine reaches it through a
//! relay on 127.0.0.1 ([`super::relay`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use meshward_netns::{Host, Lab};
use meshward_policy::api::ServiceEntry;

use super::{Plan, Started, log_file};
use crate::children::Group;

/// Namespaces `up` makes are named `mwup<PID>n<K>-<HOST>`.
const PREFIX: &str = "mwup";
/// The control plane's port on the lab's network.
const SERVER_PORT: u16 = 15012;
/// The mark the proxies put on their own connections: they run as root,
/// so the capture rules cannot exempt them by uid.
const MARK: &str = "1337";
/// The proxy's admin port, inside each workload's namespace.
const ADMIN_PORT: u16 = 15000;

/// Where namespaced mode runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// As the machine's root.
    Root,
    /// As root of a user namespace of `up`'s own, made by the ordinary
    /// user `uid`.
    UserNamespace { uid: u32 },
}

/// Readies this process for namespaced mode, or says why it cannot run
/// here. As an ordinary user it moves the process into a user namespace
/// of its own (`meshward_netns::userns`), so it must run before any
/// thread starts; everything `up` starts afterwards is in it.
pub fn prepare() -> Result<Privilege, String> {
    for (tool, package) in [("ip", "iproute2"), ("iptables-restore", "iptables")] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !found {
            return Err(format!(
                "namespaced mode needs `{tool}`: apt-get install {package}"
            ));
        }
    }
    if meshward_netns::is_root() {
        return Ok(Privilege::Root);
    }
    let uid = nix::unistd::geteuid().as_raw();
    meshward_netns::userns::enter()
        .map(|()| Privilege::UserNamespace { uid })
        .map_err(|e| {
            format!(
                "namespaced mode needs root or a user namespace, and {e}; \
                 run `sudo meshward up` for it"
            )
        })
}

/// The lab: the control plane's host and one host per workload.
pub struct Network {
    /// Held for its namespaces, which go when it is dropped.
    _lab: Lab,
    pub control_plane: Host,
    /// By workload name (`namespace/name`).
    pub hosts: BTreeMap<String, Host>,
    /// The ingress gateway's host, when DIR has a Gateway.
    pub gateway: Option<Host>,
}

impl Network {
    /// Makes the lab and a host for each workload, named after it.
    pub fn create(plans: &[Plan<'_>], with_gateway: bool) -> anyhow::Result<Network> {
        let lab = Lab::create(PREFIX).context("making the lab's network namespaces")?;
        let control_plane = lab.host("cp")?;
        let gateway = if with_gateway {
            Some(lab.host("ingress")?)
        } else {
            None
        };
        let mut hosts = BTreeMap::new();
        for plan in plans {
            let mut name = host_name(&plan.name);
            let mut n = 2;
            while hosts.values().any(|h: &Host| h.name() == name) {
                name = format!("{}-{n}", host_name(&plan.name));
                n += 1;
            }
            hosts.insert(plan.name.clone(), lab.host(&name)?);
        }
        Ok(Network {
            _lab: lab,
            control_plane,
            hosts,
            gateway,
        })
    }

    /// Where the control plane listens, on the lab's network.
    pub fn server_address(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.control_plane.ipv4()), SERVER_PORT)
    }

    /// The host of workload `name`.
    fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts
            .get(name)
            .with_context(|| format!("no host for {name}"))
    }
}

/// A namespace name's host part for workload `ns/name`: lower-case letters,
/// digits and `-`, at most 32.
fn host_name(workload: &str) -> String {
    let (_, name) = workload.split_once('/').unwrap_or(("", workload));
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(28)
        .collect();
    if out.is_empty() || out == "hub" || out == "cp" || out == "ingress" {
        out.insert_str(0, "w-");
    }
    out
}

/// Each workload's WorkloadEntry with the address of its host; ports stay
/// as written (the application listens on its real ports).
pub fn registry(net: &Network, plans: &[Plan<'_>]) -> anyhow::Result<String> {
    let mut text = String::new();
    for plan in plans {
        let mut entry = (*plan.entry).clone();
        entry.spec.address = net.host(&plan.name)?.ipv4().to_string();
        text.push_str(&serde_json::to_string(&entry)?);
        text.push_str("\n---\n");
    }
    Ok(text)
}

/// The command that runs the control plane in its host.
pub fn server_command(net: &Network, exe: &Path) -> Command {
    let mut command = net.control_plane.command(exe);
    command.args(["server", "--listen", &net.server_address().to_string()]);
    command
}

/// Starts every workload: its proxy first (which captures its traffic
/// before its application runs), then its application.
#[allow(clippy::too_many_arguments)]
pub fn start(
    net: &Network,
    plans: &[Plan<'_>],
    services: &[&ServiceEntry],
    children: &mut Group,
    exe: &Path,
    data: &Path,
    token_for: &dyn Fn(&Plan<'_>) -> anyhow::Result<std::path::PathBuf>,
) -> anyhow::Result<Vec<Started>> {
    let server = net.server_address();
    let mut started = Vec::new();
    for plan in plans {
        let host = net.host(&plan.name)?;
        let address = IpAddr::V4(host.ipv4());
        let ports: BTreeMap<u16, SocketAddr> = plan
            .entry
            .spec
            .ports
            .values()
            .filter_map(|n| u16::try_from(*n).ok())
            .map(|n| (n, SocketAddr::new(address, n)))
            .collect();
        let first_port = ports.keys().next().copied().unwrap_or(8080);
        let mut admin = None;
        let mut access_log = None;
        if plan.proxied {
            let log = log_file(data, &plan.name, "jsonl");
            let mut proxy = host.command(exe);
            proxy
                .args(["proxy", "--identity", &plan.identity.to_string()])
                .args(["--workload", &plan.name])
                .args(["--capture", "--capture-dns", "--proxy-mark", MARK])
                .args(["--control-plane", &server.to_string()])
                .args(["--ca-address", &format!("https://{server}")])
                .arg("--ca-root")
                .arg(data.join("root-cert.pem"))
                .args(["--ca-server-name", "localhost", "--token-file"])
                .arg(token_for(plan)?)
                .args(["--admin", &format!("127.0.0.1:{ADMIN_PORT}")])
                .arg("--report-decisions")
                .arg("--access-log")
                .arg(&log)
                .arg("--audit-log")
                .arg(log_file(data, &plan.name, "audit.jsonl"))
                .stdout(Stdio::null())
                .stderr(super::stderr_file(data, &plan.name, "proxy")?);
            children.spawn(&format!("{} (proxy)", plan.name), &mut proxy)?;
            admin = Some(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)));
            access_log = Some(log);
        } else {
            // No proxy, so no DNS proxy: services resolve to an endpoint's
            // own address, as a headless service's name does.
            host.write_etc("hosts", &hosts_file(net, plans, services))?;
        }
        let mut app = host.command(exe);
        match super::app_command(plan, first_port) {
            (args, true) => {
                app.args(args);
            }
            (_, false) => {
                // Services are called by name: no upstreams to tell it.
                app.args(["demo-app", "--name", &plan.entry.metadata.name])
                    .args(["--listen", &format!("[::]:{first_port}")]);
            }
        }
        app.stdout(Stdio::null())
            .stderr(super::stderr_file(data, &plan.name, "app")?);
        children.spawn(&format!("{} (application)", plan.name), &mut app)?;
        started.push(Started {
            name: plan.name.clone(),
            identity: plan.identity.to_string(),
            proxied: plan.proxied,
            app: SocketAddr::new(address, first_port),
            ports,
            upstreams: BTreeMap::new(),
            admin,
            access_log,
            netns: Some(host.netns().to_owned()),
            address: Some(address),
            namespace: plan.entry.metadata.namespace_or_default().to_owned(),
            labels: plan.entry.spec.labels.clone(),
        });
    }
    Ok(started)
}

/// `/etc/hosts` for a workload without a proxy: each service host at its
/// first endpoint's address.
fn hosts_file(net: &Network, plans: &[Plan<'_>], services: &[&ServiceEntry]) -> String {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for se in services {
        let Some(selector) = &se.spec.workload_selector else {
            continue;
        };
        let ns = se.metadata.namespace_or_default();
        let endpoint = plans.iter().find(|p| {
            p.entry.metadata.namespace_or_default() == ns && selector.matches(&p.entry.spec.labels)
        });
        if let Some(host) = endpoint.and_then(|p| net.hosts.get(&p.name)) {
            for name in &se.spec.hosts {
                text.push_str(&format!("{} {name}\n", host.ipv4()));
            }
        }
    }
    text
}

/// Whether something listens at `addr` in network namespace `netns`, and,
/// for a proxy's admin address, whether it serves the control plane's
/// configuration: checked from a thread that entered the namespace.
pub fn probe(netns: &str, app: SocketAddr, admin: Option<SocketAddr>) -> bool {
    let netns = netns.to_owned();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if meshward_netns::enter(&netns).is_err() {
                    return false;
                }
                let app_up = TcpStream::connect_timeout(&app, Duration::from_millis(200)).is_ok();
                app_up && admin.is_none_or(super::proxy_ready)
            })
            .join()
            .unwrap_or(false)
    })
}
