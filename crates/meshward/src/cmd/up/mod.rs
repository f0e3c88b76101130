//! `meshward up DIR`: a whole local mesh in one command.
//!
//! DIR holds Istio YAML: WorkloadEntries (one per workload), ServiceEntries
//! (the services they run) and the security policies. `up` starts the
//! control plane watching DIR, gives every workload its certificate, its
//! proxy and its application (`meshward demo-app` unless the entry's
//! `meshward.io/command` annotation names another; `meshward.io/proxy:
//! "false"` runs a workload without a proxy), waits until all are ready,
//! and prints where to call each service from each workload. Its proxies
//! report their decisions to the control plane, for `meshward suggest
//! --data-dir` and `meshward replay --data-dir`; with `--learn`, every
//! ALLOW and DENY policy is in dry-run. It then
//! streams allowed and denied decisions with the deciding policy until
//! Ctrl-C, SIGTERM or SIGHUP (its terminal closed), when it stops
//! everything it started. Its children share a process group of their own
//! and are tied to it (`children.rs`): killed with SIGKILL, `up` takes them
//! with it.
//!
//! Two modes:
//! - namespaced (`namespaced.rs`, the default; as an ordinary user in a
//!   user namespace of `up`'s own): each workload in
//!   its own network namespace with its own address, its proxy capturing
//!   its traffic, services called by name — as a pod;
//! - explicit (`explicit.rs`, where namespaces cannot be made, or with
//!   `--explicit`):
//!   everything on 127.0.0.1, each service on a local port of each caller.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshward_api::control::PlaceRequest;
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::token::TokenAuthority;
use meshward_policy::api::{Gateway, RegistryObject, ServiceEntry, WorkloadEntry};
use meshward_policy::load;
use serde::Serialize;

mod explicit;
mod gateway;
mod namespaced;
mod relay;
mod screen;

use crate::children::{Group, StopSignals};
use crate::cmd::control::{ServerArgs, client};
use crate::inputs::print_diagnostics;

/// The annotation naming a workload's command (`{port}` and `{name}` are
/// replaced); `demo-app` when absent.
const COMMAND: &str = "meshward.io/command";
/// `"false"`: the workload runs without a proxy (a legacy workload).
const PROXY: &str = "meshward.io/proxy";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The mesh: WorkloadEntries, ServiceEntries and policies (watched).
    dir: PathBuf,
    /// Keep the control plane's state here (a temporary directory otherwise).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long to wait for everything to be ready.
    #[arg(long, default_value = "60s")]
    ready_timeout: humantime::Duration,
    /// Everything on 127.0.0.1, each service on a local port of each
    /// caller (the mode where namespaces cannot be made); by default every
    /// workload gets its own network namespace and address (as an ordinary
    /// user, inside a user namespace of `up`'s own).
    #[arg(long)]
    explicit: bool,
    /// Learn: every ALLOW and DENY AuthorizationPolicy of DIR is decided
    /// and logged but not enforced (sent to the proxies in dry-run), so the
    /// application's normal traffic can be recorded, then turned into
    /// policies with `meshward suggest --data-dir DATA`.
    #[arg(long)]
    learn: bool,
}

/// What `up` started, as written to `DATA/up.json` for scripts and tests.
#[derive(Debug, Serialize)]
struct Mesh {
    control_plane: String,
    data_dir: PathBuf,
    /// The process group of everything `up` started (`kill -- -GROUP`).
    process_group: Option<i32>,
    /// `namespaced` (each workload in its own network namespace) or
    /// `explicit` (everything on 127.0.0.1).
    mode: &'static str,
    /// In namespaced mode as an ordinary user: the user namespace `up`
    /// made, which `meshward exec` joins.
    user_namespace: Option<UserNamespace>,
    workloads: Vec<Started>,
    /// The ingress gateway's ports, published on 127.0.0.1.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gateways: Vec<gateway::Published>,
    /// The CA of the gateway certificates `up` made (`curl --cacert`).
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_ca: Option<PathBuf>,
}

/// The user namespace a mesh runs in: that of process `pid`, made by user
/// `uid`.
#[derive(Debug, Serialize)]
struct UserNamespace {
    pid: u32,
    uid: u32,
    /// `/proc/PID/ns/user` as it reads (`user:[INODE]`): `exec` checks
    /// that the pid is still this namespace's.
    namespace: String,
}

#[derive(Debug, Serialize)]
struct Started {
    name: String,
    identity: String,
    proxied: bool,
    /// The application's own address.
    app: SocketAddr,
    /// Workload port (as policies name it) → where peers reach it.
    ports: BTreeMap<u16, SocketAddr>,
    /// `host:port` → the local address this workload calls it on.
    upstreams: BTreeMap<String, SocketAddr>,
    /// The proxy's admin endpoints (in its namespace, in namespaced mode).
    admin: Option<SocketAddr>,
    access_log: Option<PathBuf>,
    /// Its network namespace (namespaced mode): `meshward exec` enters it.
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<String>,
    /// Its own address (namespaced mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<std::net::IpAddr>,
    namespace: String,
    labels: BTreeMap<String, String>,
}

/// A free address on 127.0.0.1 for a process `up` is about to start.
///
/// The port is probed and released, so something else could take it
/// before the process binds it. The kernel hands out ports for outgoing
/// connections and for binds to port 0 from its ephemeral range, so the
/// ports come from below that range (which nothing allocates by itself),
/// in turn from a start that differs between runs: once released, a port
/// is not taken by the mesh's own connections. Where no such room exists,
/// the kernel picks.
fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    /// Where the next probe starts, and the range probed: [FIRST, end).
    static NEXT: OnceLock<(AtomicU32, u32)> = OnceLock::new();
    const FIRST: u32 = 10_000;
    let (next, end) = NEXT.get_or_init(|| {
        let end = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(0)
            .min(u32::from(u16::MAX));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let start = if end > FIRST + 1_000 {
            FIRST + seed % (end - FIRST)
        } else {
            0
        };
        (AtomicU32::new(start), end)
    });
    if *end > FIRST + 1_000 {
        for _ in 0..1_000 {
            let port = FIRST + next.fetch_add(1, Ordering::Relaxed) % (end - FIRST);
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(listener.local_addr()?);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn http_status(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: up\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = load::load_paths(std::slice::from_ref(&args.dir));
    print_diagnostics(&loaded.diagnostics);
    // The control plane starts with Istio's mesh defaults (BASE normalization).
    if let Some(warning) = loaded.path_normalization_summary(&Default::default()) {
        eprintln!("meshward up: warning: {warning}");
    }
    if loaded.has_errors() {
        bail!(
            "{} has errors (above); fix them and run again",
            args.dir.display()
        );
    }
    let entries: Vec<&WorkloadEntry> = loaded
        .registry
        .iter()
        .filter_map(|o| match o {
            RegistryObject::WorkloadEntry(we) => Some(we),
            _ => None,
        })
        .collect();
    let services: Vec<&ServiceEntry> = loaded
        .registry
        .iter()
        .filter_map(|o| match o {
            RegistryObject::ServiceEntry(se) => Some(se),
            _ => None,
        })
        .collect();
    let gateways: Vec<&Gateway> = loaded
        .registry
        .iter()
        .filter_map(|o| match o {
            RegistryObject::Gateway(g) => Some(g),
            _ => None,
        })
        .collect();
    if entries.is_empty() {
        bail!(
            "{} has no WorkloadEntry: nothing to run",
            args.dir.display()
        );
    }
    // Before any thread starts: as an ordinary user this enters a user
    // namespace, which a process with threads cannot.
    let privilege = if args.explicit {
        None
    } else {
        match namespaced::prepare() {
            Ok(privilege) => Some(privilege),
            Err(why) => {
                eprintln!(
                    "meshward up: {why}; running in explicit mode (every workload on 127.0.0.1)"
                );
                None
            }
        }
    };
    if let Some(namespaced::Privilege::UserNamespace { .. }) = privilege {
        // Entering a user namespace changed this process's credentials,
        // which clears the parent-death signal: ask for it again.
        crate::children::honour_parent()?;
    }
    let namespaced = privilege.is_some();
    let exe = std::env::current_exe().context("finding the meshward binary")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Before anything starts: from here on a stop request stops it all.
    let mut signals = runtime
        .block_on(async { StopSignals::install() })
        .context("installing signal handlers")?;
    let (data, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("meshward-up-{}", std::process::id())),
            true,
        ),
    };
    // This run's logs only: a reused data directory keeps its state, not
    // the decisions of earlier runs.
    let _ = std::fs::remove_dir_all(data.join("logs"));
    std::fs::create_dir_all(data.join("logs"))?;
    let _cleanup = temporary.then(|| RemoveOnDrop(data.clone()));
    let trust_domain = std::fs::read_to_string(data.join("trust-domain"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|_| "cluster.local".into());
    let plans = plans(&entries, &trust_domain)?;
    // The lab outlives every process in it: declared before `children`,
    // it is dropped after them.
    let network = if namespaced {
        Some(namespaced::Network::create(&plans, !gateways.is_empty())?)
    } else {
        None
    };
    // Started from this (the main) thread, which lives as long as `up`:
    // the children's parent-death signal is tied to it.
    let mut children = Group::default();

    // The control plane, watching DIR: in the lab (reached from here
    // through a relay), or on 127.0.0.1.
    let (mut server, listen) = match &network {
        Some(net) => (namespaced::server_command(net, &exe), net.server_address()),
        None => {
            let listen = free_addr()?;
            let mut server = Command::new(&exe);
            server.args(["server", "--listen", &listen.to_string()]);
            (server, listen)
        }
    };
    // Commands on this machine reach a lab's control plane through a relay
    // (there is no route to the lab): that is the address it records.
    let relay = match &network {
        Some(net) => Some(relay::start(net.control_plane.netns(), listen)?),
        None => None,
    };
    if let Some(relay) = relay {
        server.args(["--advertise", &relay.to_string()]);
    }
    if args.learn {
        server.arg("--dry-run-policies");
    }
    server
        .arg("--data-dir")
        .arg(&data)
        .arg("--config-dir")
        .arg(&args.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let stdout = children
        .spawn("meshward server", &mut server)?
        .stdout
        .take()
        .context("server output")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("listening on") => break,
            Some(Ok(_)) => {}
            _ => bail!("the control plane did not start (its errors are above)"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    // Where this process and the operator's commands reach it.
    let reach = relay.unwrap_or(listen);
    let tokens = TokenAuthority::load_or_create(&data, &trust_domain)?;
    let token_for = |plan: &Plan<'_>| -> anyhow::Result<PathBuf> {
        let path = log_file(&data, &plan.name, "token");
        meshward_identity::pem::write_private(
            &path,
            &tokens.create(&plan.identity, Duration::from_secs(3600))?,
        )?;
        Ok(path)
    };

    // The registry as it really is, then the workloads.
    let placements = match &network {
        Some(_) => Vec::new(),
        None => explicit::place(&plans)?,
    };
    let registry = match &network {
        Some(net) => namespaced::registry(net, &plans)?,
        None => explicit::registry(&plans, &placements)?,
    };
    let server_args = ServerArgs::local(&reach.to_string(), data.clone());
    runtime.block_on(async {
        client(&server_args)
            .await?
            .place(PlaceRequest {
                file: format!("{} (addresses chosen by meshward up)", args.dir.display()),
                text: registry,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        anyhow::Ok(())
    })?;
    let started = match &network {
        Some(net) => namespaced::start(
            net,
            &plans,
            &services,
            &mut children,
            &exe,
            &data,
            &token_for,
        )?,
        None => explicit::start(
            &plans,
            &placements,
            &services,
            &mut children,
            &exe,
            &data,
            listen,
            &token_for,
        )?,
    };

    let ingress = if gateways.is_empty() {
        None
    } else {
        let identity =
            SpiffeId::istio(&trust_domain, gateway::NAMESPACE, gateway::SERVICE_ACCOUNT)?;
        let token = log_file(&data, "istio-system/ingressgateway", "token");
        meshward_identity::pem::write_private(
            &token,
            &tokens.create(&identity, Duration::from_secs(3600))?,
        )?;
        let place = match &network {
            Some(net) => gateway::Place::Namespaced {
                host: net.gateway.as_ref().context("the gateway's host")?,
                control_plane: listen,
            },
            None => gateway::Place::Explicit {
                control_plane: listen,
            },
        };
        Some(gateway::start(
            &gateways,
            place,
            &mut children,
            &exe,
            &data,
            &token,
        )?)
    };

    // Ready: every application listens, every proxy has its certificate and
    // the control plane's configuration. A process that exits is reported.
    let deadline = Instant::now() + Duration::from(args.ready_timeout);
    let mut pending: Vec<&Started> = started.iter().collect();
    let mut gateway_pending = ingress.is_some();
    while !pending.is_empty() || gateway_pending {
        for (name, status) in children.exited() {
            eprintln!("meshward up: {name} exited ({status}); it is not running");
        }
        pending.retain(|w| !ready(w));
        gateway_pending = gateway_pending && !ingress.as_ref().is_some_and(gateway::ready);
        if Instant::now() > deadline {
            let mut names: Vec<&str> = pending.iter().map(|w| w.name.as_str()).collect();
            if gateway_pending {
                names.push("the ingress gateway");
            }
            eprintln!(
                "meshward up: not ready after {}: {}",
                args.ready_timeout,
                names.join(", ")
            );
            break;
        }
        let signal = runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), signals.recv())
                .await
                .ok()
        });
        if let Some(signal) = signal {
            println!("meshward up: stopping ({signal})");
            return Ok(ExitCode::SUCCESS);
        }
    }

    let mesh = Mesh {
        control_plane: format!("https://{reach}"),
        data_dir: data.clone(),
        process_group: children.id(),
        mode: if network.is_some() {
            "namespaced"
        } else {
            "explicit"
        },
        user_namespace: match privilege {
            Some(namespaced::Privilege::UserNamespace { uid }) => Some(UserNamespace {
                pid: std::process::id(),
                uid,
                namespace: std::fs::read_link("/proc/self/ns/user")
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            }),
            _ => None,
        },
        workloads: started,
        gateways: ingress
            .as_ref()
            .map(|g| g.published.clone())
            .unwrap_or_default(),
        gateway_ca: ingress.as_ref().and_then(|g| g.ca.clone()),
    };
    write_atomically(&data.join("up.json"), &serde_json::to_string_pretty(&mesh)?)?;
    if args.learn {
        println!(
            "meshward up: learning: every ALLOW and DENY policy is in dry-run, nothing is enforced; \
             send the application's traffic, then: meshward suggest --data-dir {}",
            data.display()
        );
    }
    screen::banner(&mesh, &services);
    if let Some(ingress) = &ingress {
        for p in &ingress.published {
            println!(
                "ingress gateway: port {} ({}) for {} at {}",
                p.port,
                p.protocol,
                p.hosts.join(", "),
                p.url
            );
        }
        if let Some(ca) = &ingress.ca {
            println!(
                "ingress gateway: certificates made by up, CA {}",
                ca.display()
            );
        }
    }

    // Live decisions until Ctrl-C, SIGTERM or SIGHUP.
    let stop = Arc::new(AtomicBool::new(false));
    let names = Arc::new(screen::Names::new(&mesh));
    if let Some(ingress) = &ingress {
        let (stop, names) = (stop.clone(), names.clone());
        let log = ingress.access_log.clone();
        std::thread::spawn(move || screen::follow("ingress-gateway", &log, &names, &stop));
    }
    for w in &mesh.workloads {
        if let Some(log) = w.access_log.clone() {
            let (stop, names) = (stop.clone(), names.clone());
            let name = w.name.clone();
            std::thread::spawn(move || screen::follow(&name, &log, &names, &stop));
        }
    }
    let signal = runtime.block_on(signals.recv());
    stop.store(true, Ordering::Relaxed);
    println!("meshward up: stopping ({signal})");
    children.stop();
    Ok(ExitCode::SUCCESS)
}

/// Whether a started workload is ready: its application listens, and its
/// proxy (if any) has its certificate and the control plane's
/// configuration. Checked from inside its namespace in namespaced mode.
fn ready(w: &Started) -> bool {
    match &w.netns {
        Some(netns) => namespaced::probe(netns, w.app, w.admin),
        None => {
            TcpStream::connect_timeout(&w.app, Duration::from_millis(200)).is_ok()
                && w.admin.is_none_or(proxy_ready)
        }
    }
}

/// Whether the proxy whose admin endpoints are at `admin` is ready and
/// serves the control plane's configuration.
fn proxy_ready(admin: SocketAddr) -> bool {
    http_status(admin, "/healthz/ready").is_some_and(|r| r.0 == 200)
        && http_status(admin, "/config_dump")
            .is_some_and(|r| r.1.contains("control plane, version"))
}

/// One workload of DIR, as both modes start it.
pub(crate) struct Plan<'a> {
    entry: &'a WorkloadEntry,
    /// `namespace/name`.
    name: String,
    identity: SpiffeId,
    proxied: bool,
}

fn plans<'a>(entries: &[&'a WorkloadEntry], trust_domain: &str) -> anyhow::Result<Vec<Plan<'a>>> {
    entries
        .iter()
        .map(|entry| {
            let ns = entry.metadata.namespace_or_default();
            let sa = if entry.spec.service_account.is_empty() {
                "default"
            } else {
                &entry.spec.service_account
            };
            Ok(Plan {
                entry,
                name: format!("{ns}/{}", entry.metadata.name),
                identity: SpiffeId::istio(trust_domain, ns, sa)?,
                proxied: entry
                    .metadata
                    .annotations
                    .get(PROXY)
                    .is_none_or(|v| v != "false"),
            })
        })
        .collect()
}

/// `DATA/logs/NS.NAME.EXT`.
fn log_file(data: &Path, workload: &str, ext: &str) -> PathBuf {
    data.join("logs")
        .join(format!("{}.{ext}", workload.replace('/', ".")))
}

/// A process's standard error, to `DATA/logs/NS.NAME.WHAT.log`.
fn stderr_file(data: &Path, workload: &str, what: &str) -> anyhow::Result<Stdio> {
    let path = log_file(data, workload, &format!("{what}.log"));
    Ok(Stdio::from(
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// The application's arguments after `meshward`: the annotation's command
/// under `meshward guard` (`true`), or the demo app's extra arguments
/// (`false`; the caller adds its name and address).
fn app_command(plan: &Plan<'_>, port: u16) -> (Vec<String>, bool) {
    match plan.entry.metadata.annotations.get(COMMAND) {
        // Under `meshward guard`, so that what the command starts stops
        // with `up` too.
        Some(command) => (
            vec![
                "guard".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                command
                    .replace("{port}", &port.to_string())
                    .replace("{name}", &plan.entry.metadata.name),
            ],
            true,
        ),
        None => (Vec::new(), false),
    }
}

/// Writes `path` whole or not at all (a temporary file renamed into place),
/// so a script polling for it never reads half of it.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
