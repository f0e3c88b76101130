//! `meshward proxy`: the sidecar. Gets the workload certificate from the
//! mesh CA with a bootstrap token, reads policies from files (watched for
//! changes), and serves the workload's ports and the services it calls until
//! SIGTERM, when it drains.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshward_capture::Runner;
use meshward_identity::agent::{self, AgentConfig};
use meshward_identity::bundle::TrustBundle;
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::TrustDomains;
use meshward_policy::Workload;
use meshward_policy::authn::JwksCache;
use meshward_proxy::config::{InboundPort, Limits, ProxyConfig, Upstream};
use meshward_proxy::control::{self, ControlPlane};
use meshward_proxy::dns::DnsConfig;
use meshward_proxy::facts::FactSettings;
use meshward_proxy::identity::WorkloadIdentity;
use meshward_proxy::jwks::Fetcher;
use meshward_proxy::log::LogTarget;
use meshward_proxy::policies::{self, DirSource, PolicyStore};
use meshward_proxy::transparent::TransparentConfig;
use meshward_proxy::{LogTargets, Proxy};

use crate::cmd::capture::CaptureArgs;
use crate::cmd::server::shutdown_signal;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The workload's SPIFFE ID: spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    #[arg(long)]
    identity: String,
    /// The workload's namespace, when the identity does not name one.
    #[arg(long)]
    namespace: Option<String>,
    /// A workload label, matched by policy selectors (repeatable): app=reviews.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A workload port: [IP:]PORT=APP_IP:APP_PORT[,protocol=http|http2|grpc|tcp|auto][,port=POLICY_PORT] (repeatable).
    #[arg(long = "inbound", value_name = "SPEC")]
    inbound: Vec<InboundPort>,
    /// A service the workload calls, on a local listener:
    /// HOST:PORT=LISTEN_IP:PORT,endpoint=IP:PORT[,identity=SPIFFE_ID][,protocol=P][,tls=ISTIO_MUTUAL|DISABLE] (repeatable).
    #[arg(long = "upstream", value_name = "SPEC")]
    upstreams: Vec<Upstream>,
    /// Policy files or directories; changes are picked up while running.
    #[arg(long = "policies", value_name = "PATH")]
    policies: Vec<PathBuf>,
    /// Take policies, the workload's namespace and labels, and the services'
    /// endpoints and identities from this control plane (`meshward server`,
    /// HOST:PORT) instead of files. Several servers (HOST:PORT,HOST:PORT,
    /// or a name with several addresses): when one goes away the proxy
    /// resyncs from another, enforcing its last good configuration
    /// meanwhile.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    control_plane: Option<String>,
    /// The WorkloadEntry this proxy serves, NAMESPACE/NAME. The control
    /// plane accepts the claim only if that entry runs as --identity and,
    /// when the entry has an address, the proxy connects from it; without
    /// it, the proxy is the only entry with its identity, and is refused
    /// when several share it.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "control_plane")]
    workload: Option<String>,
    /// The identity the control plane's certificate must carry (default:
    /// spiffe://TRUST_DOMAIN/ns/istio-system/sa/meshward).
    #[arg(long)]
    control_plane_identity: Option<String>,
    /// MeshConfig YAML (trust domain aliases, extension providers, path normalization).
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Admin endpoints: /healthz/ready, /config_dump, /stats/prometheus.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Worker threads (Envoy's `concurrency`, ztunnel's worker threads): a
    /// sidecar serves one workload, and one thread is its cheapest; 0: one
    /// per CPU.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How many verified JWTs to remember, so the same token on the next
    /// request skips its signature check (Envoy's jwt_cache_size; 0: none).
    /// Time, issuer and audience are checked on every request regardless,
    /// and a token is remembered only for the keys that verified it.
    #[arg(long, default_value_t = meshward_policy::authn::verified::DEFAULT_CAPACITY)]
    jwt_cache_size: usize,
    /// The mesh CA (`meshward server`); several, comma-separated, are tried
    /// in turn (any server of one mesh renews).
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    ca_address: String,
    /// The mesh's root certificate(s): `root-cert.pem` from the server's data directory.
    #[arg(long)]
    ca_root: PathBuf,
    /// The name in the CA's serving certificate.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    ca_server_name: String,
    /// A file holding the bootstrap token (`meshward token create`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Requested certificate lifetime (the CA's default when not given).
    #[arg(long)]
    cert_ttl: Option<humantime::Duration>,
    /// Access log: `-` (standard output), a file, or `off`.
    #[arg(long, default_value = "-")]
    access_log: LogTarget,
    /// Audit log (AUDIT matches and dry-run results): `-`, a file, or `off`.
    #[arg(long, default_value = "-")]
    audit_log: LogTarget,
    /// Keep this request header's value in access records (repeatable),
    /// so that `meshward replay` can decide policies that read it;
    /// `authorization`, `proxy-authorization` and `cookie` are refused.
    #[arg(long = "log-header", value_name = "NAME")]
    log_headers: Vec<String>,
    /// Send inbound decision records (as in the access log, with their
    /// facts) to the control plane, which keeps the recent ones for
    /// `meshward suggest --data-dir` and `meshward replay --data-dir`;
    /// FRACTION of them (evenly sampled, 1 when not given). Traffic never
    /// waits for it: records that do not fit the queue are dropped.
    #[arg(
        long,
        value_name = "FRACTION",
        num_args = 0..=1,
        default_missing_value = "1",
        value_parser = fraction,
        requires = "control_plane"
    )]
    report_decisions: Option<f64>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "5s")]
    drain_grace: humantime::Duration,
    /// How often the policy files are checked for changes.
    #[arg(long, default_value = "500ms")]
    watch_interval: humantime::Duration,
    /// Use FILE for the keys of jwksUri URI instead of fetching it (repeatable).
    #[arg(long, value_name = "URI=FILE")]
    jwks: Vec<String>,
    /// Transparent mode: serve the capture ports (--outbound-port,
    /// --inbound-port), where capture rules (`meshward capture install`)
    /// send the workload's traffic, and route each connection by its
    /// original destination. Needs --control-plane.
    #[arg(long, requires = "control_plane")]
    transparent: bool,
    /// Transparent mode with the capture rules installed at start and
    /// removed at exit (as `meshward capture install` with the options
    /// below; the admin port is --admin's). The proxy's own connections
    /// must be exempt: run it as a --proxy-uid, or give --proxy-mark.
    /// Needs root or CAP_NET_ADMIN in the workload's network namespace.
    #[arg(long, requires = "control_plane")]
    capture: bool,
    /// The capture rules, and with --proxy-mark the SO_MARK the proxy puts
    /// on every connection it opens (CA and control plane included).
    #[command(flatten, next_help_heading = "Capture")]
    capture_args: CaptureArgs,
    /// Serve DNS on this address, UDP and TCP (repeatable): the mesh's
    /// service names are answered with their addresses, other names are
    /// forwarded. Capture sends DNS to 127.0.0.1:15053 and [::1]:15053.
    #[arg(long = "dns-listen", value_name = "IP:PORT")]
    dns_listen: Vec<SocketAddr>,
    /// Forward DNS the proxy does not answer to this resolver, IP or
    /// IP:PORT (repeatable, tried in turn; default: the nameservers of
    /// /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = dns_upstream)]
    dns_upstreams: Vec<SocketAddr>,
}

/// A fraction in (0, 1].
fn fraction(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|f| *f > 0.0 && *f <= 1.0)
        .ok_or_else(|| format!("{value:?} is not a fraction in (0, 1], such as 1 or 0.1"))
}

/// `--label KEY=VALUE`s as a map.
pub(crate) fn labels_of(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for label in labels {
        let Some((k, v)) = label.split_once('=') else {
            bail!("--label takes KEY=VALUE, got {label:?}");
        };
        map.insert(k.to_owned(), v.to_owned());
    }
    Ok(map)
}

/// `--control-plane` and `--control-plane-identity` (default: the server's
/// `spiffe://TRUST_DOMAIN/ns/istio-system/sa/meshward` in `id`'s trust
/// domain).
pub(crate) fn control_plane_of(
    list: &str,
    identity: Option<&str>,
    id: &SpiffeId,
    workload: Option<String>,
    mark: Option<u32>,
) -> anyhow::Result<ControlPlane> {
    // HOST:PORT[,HOST:PORT...]: every address of every entry (a DNS name
    // may have several), in order.
    let entries: Vec<&str> = list
        .split(',')
        .map(|a| a.trim().trim_start_matches("https://"))
        .filter(|a| !a.is_empty())
        .collect();
    let mut addresses = Vec::new();
    let mut unresolved = Vec::new();
    for entry in &entries {
        // One name that does not resolve leaves the others.
        match std::net::ToSocketAddrs::to_socket_addrs(entry) {
            Ok(resolved) => {
                for address in resolved {
                    if !addresses.contains(&address) {
                        addresses.push(address);
                    }
                }
            }
            Err(e) => unresolved.push(format!("{entry}: {e}")),
        }
    }
    if addresses.is_empty() && !unresolved.is_empty() {
        bail!("--control-plane: {}", unresolved.join("; "));
    }
    for why in &unresolved {
        tracing::warn!("--control-plane {why}; using the others");
    }
    let first = entries
        .first()
        .with_context(|| format!("--control-plane {list:?}: no address"))?;
    if addresses.is_empty() {
        bail!("--control-plane {list}: no address");
    }
    let identity = match identity {
        Some(cp) => {
            SpiffeId::parse(cp).with_context(|| format!("--control-plane-identity {cp}"))?
        }
        None => SpiffeId::istio(id.trust_domain(), "istio-system", "meshward")?,
    };
    Ok(ControlPlane {
        addresses,
        // Every server's certificate carries the same names.
        server_name: first
            .rsplit_once(':')
            .map_or(*first, |(host, _)| host)
            .trim_matches(['[', ']'])
            .to_owned(),
        identity,
        workload,
        mark,
    })
}

/// `IP` (port 53) or `IP:PORT`.
fn dns_upstream(value: &str) -> Result<SocketAddr, String> {
    value
        .parse::<SocketAddr>()
        .or_else(|_| {
            value
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{value:?} is not IP or IP:PORT"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let id = SpiffeId::parse(&args.identity)
        .with_context(|| format!("--identity {:?}", args.identity))?;
    let namespace = match (&args.namespace, id.istio_parts()) {
        (Some(ns), _) => ns.clone(),
        (None, Some((ns, _))) => ns.to_owned(),
        (None, None) => bail!(
            "--identity {id} does not name a namespace (spiffe://TD/ns/NS/sa/SA); give --namespace"
        ),
    };
    if let Some(claim) = &args.workload {
        let Some((claimed_ns, name)) = claim.split_once('/') else {
            bail!("--workload takes NAMESPACE/NAME (a WorkloadEntry), got {claim:?}");
        };
        if claimed_ns.is_empty() || name.is_empty() || name.contains('/') {
            bail!("--workload takes NAMESPACE/NAME (a WorkloadEntry), got {claim:?}");
        }
        if let Some((ns, _)) = id.istio_parts()
            && ns != claimed_ns
        {
            bail!(
                "--workload {claim} is in namespace {claimed_ns}, but --identity {id} is in {ns}: \
                 a WorkloadEntry's identity is in its own namespace"
            );
        }
    }
    let labels = labels_of(&args.labels)?;
    let mut facts = FactSettings::new(args.workload.as_deref(), &args.log_headers)?;
    let reports = args.report_decisions.map(|fraction| {
        let (reporter, reports) = meshward_proxy::report::reporter(fraction);
        facts.report = Some(reporter);
        reports
    });
    let transparent = args.transparent || args.capture;
    let mark = args.capture_args.proxy_mark;
    let capture = if transparent {
        let mut config = args.capture_args.to_config()?;
        config.admin_port = args.admin.port();
        // The proxy's own connections must pass the rules untouched, or
        // they loop back into it.
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        if mark.is_none() && !config.proxy_uids.contains(&uid) && !config.proxy_gids.contains(&gid)
        {
            bail!(
                "this proxy runs as uid {uid} (gid {gid}), which capture rules for --proxy-uid \
                 {:?} / --proxy-gid {:?} do not exempt, so its own connections would be captured \
                 again: give --proxy-mark MARK (the proxy marks its connections; the rules must \
                 exempt the same mark) or run it as one of those uids",
                config.proxy_uids,
                config.proxy_gids
            );
        }
        Some(config).filter(|_| args.capture)
    } else {
        None
    };
    // Capturing DNS, the proxy serves it where the rules send it.
    let dns_listen = if args.dns_listen.is_empty() && args.capture && args.capture_args.capture_dns
    {
        let port = args.capture_args.dns_port;
        let mut listen = vec![SocketAddr::from(([127, 0, 0, 1], port))];
        if args.capture_args.ipv6 {
            listen.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
        }
        listen
    } else {
        args.dns_listen.clone()
    };
    if args.inbound.is_empty() && args.upstreams.is_empty() && dns_listen.is_empty() && !transparent
    {
        bail!(
            "nothing to serve: give at least one --inbound, --upstream or --dns-listen, or --transparent"
        );
    }
    if args.control_plane.is_some() && !args.policies.is_empty() {
        bail!("give --policies or --control-plane, not both: policies come from one place");
    }
    if args.control_plane.is_none() {
        for upstream in &args.upstreams {
            upstream.check_static().with_context(|| "--upstream")?;
        }
    }
    let control_plane = match &args.control_plane {
        None => None,
        Some(address) => Some(control_plane_of(
            address,
            args.control_plane_identity.as_deref(),
            &id,
            args.workload.clone(),
            mark,
        )?),
    };
    let bundle = TrustBundle::read(&args.ca_root)
        .with_context(|| format!("reading --ca-root {}", args.ca_root.display()))?;
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let fetcher = Fetcher::new(&args.jwks).map_err(anyhow::Error::msg)?;
    let jwks =
        Arc::new(JwksCache::new(Some(Arc::new(fetcher))).with_verified_tokens(args.jwt_cache_size));
    let source = DirSource {
        paths: args.policies.clone(),
        mesh_config: args.mesh_config.clone(),
    };
    let set = source
        .load(&jwks)
        .context("the proxy starts only with valid policies")?;
    let mut trust_domains = vec![id.trust_domain().to_owned()];
    trust_domains.extend(set.mesh().trust_domain_aliases.iter().cloned());
    let workload = Workload { namespace, labels };
    let config = ProxyConfig {
        workload: workload.clone(),
        inbound: args.inbound,
        upstreams: args.upstreams,
        admin: Some(args.admin),
        limits: Limits::default(),
        drain_grace: args.drain_grace.into(),
        mark,
        transparent: transparent.then(|| {
            TransparentConfig::on_ports(
                args.capture_args.outbound_port,
                args.capture_args.inbound_port,
            )
        }),
        dns: (!dns_listen.is_empty()).then(|| DnsConfig {
            listen: dns_listen.clone(),
            upstreams: args.dns_upstreams.clone(),
            mark,
            timeout: None,
            await_services: control_plane.is_some(),
        }),
    };

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.concurrency > 0 {
        builder.worker_threads(args.concurrency);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Capture before anything is served, so the workload's traffic never
    // leaves uncaptured once the proxy runs. Rules already in force belong
    // to someone else (another proxy, or one killed): never replaced.
    if let Some(config) = &capture {
        let runner = Runner::system();
        let present =
            meshward_capture::show(&runner).context("--capture: reading the rules in force")?;
        if !present.trim().is_empty() {
            bail!(
                "--capture: meshward's capture rules are already installed in this network \
                 namespace (another proxy's, or a killed one's): `meshward capture show` lists \
                 them, `meshward capture uninstall` removes them"
            );
        }
        meshward_capture::install(config, &runner)
            .context("--capture: installing the capture rules")?;
        eprintln!("meshward proxy: capture rules installed");
    }
    let served = runtime.block_on(async move {
        let mut agent_config = AgentConfig::new(
            id.clone(),
            args.ca_address.clone(),
            args.ca_server_name.clone(),
            bundle.clone(),
            token,
        );
        agent_config.ttl = args.cert_ttl.map(Into::into);
        agent_config.mark = mark;
        // Capture before anything is served: the workload's traffic never
        // leaves uncaptured once the proxy runs.
        let (cert, _agent) = agent::start(agent_config);
        let identity = WorkloadIdentity {
            id: id.clone(),
            cert,
            bundle,
            trust_domains: TrustDomains(trust_domains),
            // Filled by the control plane; empty for a proxy without one.
            revocations: Default::default(),
        };
        // Configured by the control plane: nothing is served as allowed
        // until its first configuration is in force.
        let store = match &control_plane {
            Some(_) => PolicyStore::new(
                workload,
                control::awaiting_configuration(set.mesh().clone()),
                "awaiting the control plane's first configuration: every inbound request is denied"
                    .into(),
            ),
            None => PolicyStore::new(workload, set, source.describe()),
        };
        policies::warm_jwks(&store, &jwks);
        let stop_watching = tokio_util::sync::CancellationToken::new();
        let control_jwks = jwks.clone();
        if !source.paths.is_empty() || source.mesh_config.is_some() {
            tokio::spawn(policies::watch_dir(
                source,
                store.clone(),
                jwks,
                Duration::from(args.watch_interval),
                stop_watching.clone(),
            ));
        }
        let logs = LogTargets {
            access: args.access_log,
            audit: args.audit_log,
            facts,
        };
        let proxy = Proxy::start(config, identity, store.clone(), logs).await?;
        if let (Some(control_plane), Some(reports)) = (&control_plane, reports) {
            tokio::spawn(meshward_proxy::report::run(
                reports,
                control_plane.clone(),
                proxy.identity().clone(),
                proxy.metrics_handle(),
                stop_watching.clone(),
            ));
        }
        if let Some(control_plane) = control_plane {
            eprintln!("meshward proxy: configuration from {control_plane}",);
            tokio::spawn(control::run(
                control_plane,
                proxy.identity().clone(),
                store,
                proxy.outbound().to_vec(),
                proxy.routes(),
                proxy.dns().cloned(),
                control_jwks,
                proxy.metrics_handle(),
                None,
                stop_watching.clone(),
            ));
        }
        for l in proxy
            .listeners()
            .inbound
            .iter()
            .chain(&proxy.listeners().outbound)
        {
            eprintln!(
                "meshward proxy: {} on {} -> {}",
                l.name,
                l.address,
                l.forward_to.join(",")
            );
        }
        for addr in &proxy.listeners().dns {
            eprintln!("meshward proxy: dns on {addr} (udp, tcp)");
        }
        if let Some(admin) = proxy.admin_address {
            eprintln!("meshward proxy: admin on http://{admin} ({id})");
        }
        shutdown_signal().await;
        eprintln!("meshward proxy: draining");
        stop_watching.cancel();
        proxy.shutdown().await;
        eprintln!("meshward proxy: stopped");
        Ok(ExitCode::SUCCESS)
    });
    // Stopped, or never started: the rules this proxy installed go. (A
    // panic or a kill leaves them, and the workload's traffic fails closed
    // until `meshward capture uninstall`.)
    if capture.is_some() {
        match meshward_capture::uninstall(&Runner::system()) {
            Ok(_) => eprintln!("meshward proxy: capture rules removed"),
            Err(e) => eprintln!(
                "meshward proxy: removing the capture rules failed: {e}; run `meshward capture uninstall`"
            ),
        }
    }
    served
}
