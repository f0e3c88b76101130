//! `meshward gateway`: the ingress gateway. A workload of the mesh (its own
//! certificate from the mesh CA, Istio's `istio-ingressgateway-service-account`
//! by default) configured by the control plane: it serves the ports of the
//! Gateways that select its labels (`istio: ingressgateway` by default),
//! routes by their VirtualServices, and enforces the RequestAuthentications
//! and AuthorizationPolicies that apply to it, until SIGTERM, when it
//! drains.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use meshward_identity::agent::{self, AgentConfig};
use meshward_identity::bundle::TrustBundle;
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::tls::TrustDomains;
use meshward_policy::Workload;
use meshward_policy::api::MeshConfig;
use meshward_policy::authn::JwksCache;
use meshward_proxy::config::{Limits, ProxyConfig};
use meshward_proxy::control;
use meshward_proxy::gateway::{Gateway, GatewayConfig};
use meshward_proxy::identity::WorkloadIdentity;
use meshward_proxy::jwks::Fetcher;
use meshward_proxy::log::LogTarget;
use meshward_proxy::policies::PolicyStore;
use meshward_proxy::{LogTargets, Proxy};

use crate::cmd::proxy::{control_plane_of, labels_of};
use crate::cmd::server::shutdown_signal;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway's SPIFFE ID.
    #[arg(
        long,
        default_value = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    )]
    identity: String,
    /// A label of the gateway, matched by Gateway and policy selectors
    /// (repeatable; default istio=ingressgateway).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The control plane (`meshward server`), HOST:PORT: Gateways,
    /// VirtualServices, policies and services come from it.
    #[arg(long, value_name = "HOST:PORT")]
    control_plane: String,
    /// The identity the control plane's certificate must carry (default:
    /// spiffe://TRUST_DOMAIN/ns/istio-system/sa/meshward).
    #[arg(long)]
    control_plane_identity: Option<String>,
    /// The WorkloadEntry this gateway is, NAMESPACE/NAME (its labels then
    /// come from it).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    workload: Option<String>,
    /// The address every Gateway port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    listen: IpAddr,
    /// Serve Gateway port NUMBER on local port PORT (0: any free one)
    /// instead of on NUMBER itself (repeatable): 443=8443.
    #[arg(long = "port", value_name = "NUMBER=PORT", value_parser = port_mapping)]
    ports: Vec<(u16, u16)>,
    /// Where `credentialName` credentials are: NAME.crt, NAME.key and, for
    /// MUTUAL, NAME-cacert.crt. Changed files are reloaded.
    #[arg(long)]
    credentials_dir: Option<PathBuf>,
    /// How often certificate files are checked for changes.
    #[arg(long, default_value = "1s")]
    cert_reload_interval: humantime::Duration,
    /// Admin endpoints: /healthz/ready, /config_dump, /stats/prometheus.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The mesh CA (`meshward server`).
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
    /// Access log: `-` (standard output), a file, or `off`.
    #[arg(long, default_value = "-")]
    access_log: LogTarget,
    /// Audit log (AUDIT matches and dry-run results): `-`, a file, or `off`.
    #[arg(long, default_value = "-")]
    audit_log: LogTarget,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "5s")]
    drain_grace: humantime::Duration,
    /// Use FILE for the keys of jwksUri URI instead of fetching it (repeatable).
    #[arg(long, value_name = "URI=FILE")]
    jwks: Vec<String>,
}

/// `NUMBER=PORT`.
fn port_mapping(value: &str) -> Result<(u16, u16), String> {
    let parsed = value
        .split_once('=')
        .and_then(|(n, p)| Some((n.parse::<u16>().ok()?, p.parse::<u16>().ok()?)));
    match parsed {
        Some((number, port)) if number > 0 => Ok((number, port)),
        _ => Err(format!(
            "{value:?} is not NUMBER=PORT (443=8443; PORT 0 for any free one)"
        )),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let id = SpiffeId::parse(&args.identity)
        .with_context(|| format!("--identity {:?}", args.identity))?;
    let Some((namespace, _)) = id.istio_parts() else {
        bail!("--identity {id} does not name a namespace (spiffe://TD/ns/NS/sa/SA)");
    };
    let mut labels = labels_of(&args.labels)?;
    if labels.is_empty() {
        labels.insert("istio".into(), "ingressgateway".into());
    }
    let control_plane = control_plane_of(
        &args.control_plane,
        args.control_plane_identity.as_deref(),
        &id,
        args.workload.clone(),
        None,
    )?;
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
    let mut port_map = BTreeMap::new();
    for (number, port) in &args.ports {
        if port_map.insert(*number, *port).is_some() {
            bail!("--port {number}=... is given twice");
        }
    }
    let fetcher = Fetcher::new(&args.jwks).map_err(anyhow::Error::msg)?;
    let jwks = Arc::new(JwksCache::new(Some(Arc::new(fetcher))));
    let workload = Workload {
        namespace: namespace.to_owned(),
        labels,
    };
    let config = ProxyConfig {
        workload: workload.clone(),
        inbound: Vec::new(),
        upstreams: Vec::new(),
        admin: Some(args.admin),
        limits: Limits::default(),
        drain_grace: args.drain_grace.into(),
        mark: None,
        transparent: None,
        dns: None,
    };
    let gateway_config = GatewayConfig {
        listen: args.listen,
        port_map,
        credentials_dir: args.credentials_dir.clone(),
        reload_interval: args.cert_reload_interval.into(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let agent_config = AgentConfig::new(
            id.clone(),
            args.ca_address.clone(),
            args.ca_server_name.clone(),
            bundle.clone(),
            token,
        );
        let (cert, _agent) = agent::start(agent_config);
        let identity = WorkloadIdentity {
            id: id.clone(),
            cert,
            bundle,
            trust_domains: TrustDomains(vec![id.trust_domain().to_owned()]),
            revocations: Default::default(),
        };
        // Nothing is allowed until the control plane's first configuration.
        let store = PolicyStore::for_gateway(
            workload,
            control::awaiting_configuration(MeshConfig::default()),
            "awaiting the control plane's first configuration: every request is denied".into(),
        );
        let logs = LogTargets {
            access: args.access_log,
            audit: args.audit_log,
            facts: Default::default(),
        };
        let proxy = Proxy::start(config, identity, store.clone(), logs).await?;
        let gateway = Gateway::start(&proxy, gateway_config);
        let stop = tokio_util::sync::CancellationToken::new();
        eprintln!("meshward gateway: configuration from {control_plane}",);
        tokio::spawn(control::run(
            control_plane,
            proxy.identity().clone(),
            store,
            Vec::new(),
            None,
            None,
            jwks,
            proxy.metrics_handle(),
            Some(gateway.clone()),
            stop.clone(),
        ));
        // Each change of the ports served, for people and for `up`.
        let mut bound = gateway.bound();
        tokio::spawn(async move {
            let mut said: BTreeMap<u16, SocketAddr> = BTreeMap::new();
            while bound.changed().await.is_ok() {
                let now = bound.borrow_and_update().clone();
                for (port, addr) in &now {
                    if said.get(port) != Some(addr) {
                        eprintln!("meshward gateway: port {port} on {addr}");
                    }
                }
                for port in said.keys().filter(|p| !now.contains_key(p)) {
                    eprintln!("meshward gateway: port {port} closed");
                }
                said = now;
            }
        });
        if let Some(admin) = proxy.admin_address {
            eprintln!("meshward gateway: admin on http://{admin} ({id})");
        }
        shutdown_signal().await;
        eprintln!("meshward gateway: draining");
        stop.cancel();
        proxy.shutdown().await;
        eprintln!("meshward gateway: stopped");
        Ok(ExitCode::SUCCESS)
    })
}
