//! The ingress gateway of `meshward up`: when DIR has a Gateway, `up` runs
//! one `meshward gateway` (identity `istio-ingressgateway-service-account`
//! of `istio-system`, labels `istio: ingressgateway`) and publishes each
//! Gateway port on the machine at 127.0.0.1 — on the port's own number when
//! it is free, else on a free one. In namespaced mode the gateway runs in a
//! host of its own in the lab, published through a relay
//! ([`super::relay`]); in explicit mode it listens on 127.0.0.1 itself.
//!
//! Certificates named by `credentialName` that DIR's operator did not
//! provide are made on first start in `DATA/gateway-credentials/`: a CA of
//! `up`'s own (`ca.crt`, printed, so `curl --cacert` works) and a
//! certificate for the server's hosts.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use meshward_identity::spiffe::SpiffeId;
use meshward_policy::api::Gateway;
use serde::Serialize;

/// The gateway's service account, as Istio names it.
pub const SERVICE_ACCOUNT: &str = "istio-ingressgateway-service-account";
/// Its namespace.
pub const NAMESPACE: &str = "istio-system";
/// Its admin port (inside its namespace in namespaced mode).
const ADMIN_PORT: u16 = 15000;

/// One published Gateway port, as `up.json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The Gateway port number.
    pub port: u16,
    pub protocol: String,
    pub hosts: Vec<String>,
    /// Where to call it from this machine.
    pub url: String,
}

/// What `up` needs to know of the running gateway.
pub struct Running {
    pub published: Vec<Published>,
    pub admin: SocketAddr,
    pub netns: Option<String>,
    pub access_log: PathBuf,
    /// The CA of the certificates `up` made, if it made any.
    pub ca: Option<PathBuf>,
}

/// Gateway port number → (protocol, hosts), over every Gateway of DIR.
fn ports(gateways: &[&Gateway]) -> BTreeMap<u16, (String, Vec<String>)> {
    let mut ports: BTreeMap<u16, (String, Vec<String>)> = BTreeMap::new();
    for g in gateways {
        for s in &g.spec.servers {
            let Ok(n) = u16::try_from(s.port.number) else {
                continue;
            };
            let entry = ports
                .entry(n)
                .or_insert_with(|| (s.port.protocol.to_ascii_uppercase(), Vec::new()));
            entry.1.extend(s.hosts.iter().cloned());
        }
    }
    ports
}

/// The CA of `up`'s gateway certificates: the same subject and key each
/// time, so certificates made on a later start chain to `ca.crt` too.
fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meshward up gateway CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(params)
}

/// Makes every `credentialName` credential DIR's Gateways name that is
/// missing from `dir`; returns the CA's path when `dir` has `up`'s CA.
fn make_credentials(dir: &Path, gateways: &[&Gateway]) -> anyhow::Result<Option<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_cert = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let mut issuer = None;
    for g in gateways {
        for s in &g.spec.servers {
            let Some(tls) = &s.tls else { continue };
            let name = &tls.credential_name;
            if name.is_empty() || dir.join(format!("{name}.crt")).exists() {
                continue;
            }
            if issuer.is_none() {
                let key = if ca_key.exists() {
                    let pem = std::fs::read_to_string(&ca_key)
                        .with_context(|| format!("reading {}", ca_key.display()))?;
                    rcgen::KeyPair::from_pem(&pem)
                        .with_context(|| format!("reading {}", ca_key.display()))?
                } else {
                    let key = rcgen::KeyPair::generate()?;
                    meshward_identity::pem::create_private(&ca_key, &key.serialize_pem())?;
                    let cert = ca_params()?.self_signed(&key)?;
                    meshward_identity::pem::write_public(&ca_cert, &cert.pem())?;
                    key
                };
                issuer = Some(rcgen::Issuer::new(ca_params()?, key));
            }
            let Some(issuer) = &issuer else { continue };
            let hosts: Vec<String> = s
                .hosts
                .iter()
                .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_owned())
                .filter(|h| h != "*")
                .collect();
            let mut params = rcgen::CertificateParams::new(hosts)?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name.as_str());
            let key = rcgen::KeyPair::generate()?;
            let cert = params.signed_by(&key, issuer)?;
            meshward_identity::pem::write_private(
                &dir.join(format!("{name}.key")),
                &key.serialize_pem(),
            )?;
            meshward_identity::pem::write_public(&dir.join(format!("{name}.crt")), &cert.pem())?;
            if tls.mode.as_deref() == Some("MUTUAL")
                && !dir.join(format!("{name}-cacert.crt")).exists()
            {
                eprintln!(
                    "meshward up: {}/{}: MUTUAL credential {name} needs the clients' CA in {}",
                    g.metadata.namespace_or_default(),
                    g.metadata.name,
                    dir.join(format!("{name}-cacert.crt")).display()
                );
            }
        }
    }
    Ok(ca_cert.exists().then_some(ca_cert))
}

/// A local port on 127.0.0.1 for Gateway port `number`: its own when free.
fn local_port(number: u16) -> anyhow::Result<u16> {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, number)).is_ok() {
        return Ok(number);
    }
    Ok(super::free_addr()?.port())
}

/// Where the gateway runs and how it reaches the control plane.
pub enum Place<'a> {
    /// On 127.0.0.1.
    Explicit { control_plane: SocketAddr },
    /// In `host` of the lab.
    Namespaced {
        host: &'a meshward_netns::Host,
        control_plane: SocketAddr,
    },
}

/// Starts the gateway for DIR's Gateways.
pub fn start(
    gateways: &[&Gateway],
    place: Place<'_>,
    children: &mut crate::children::Group,
    exe: &Path,
    data: &Path,
    token: &Path,
) -> anyhow::Result<Running> {
    let credentials = data.join("gateway-credentials");
    let ca = make_credentials(&credentials, gateways)?;
    let name = format!("{NAMESPACE}/ingressgateway");
    let access_log = super::log_file(data, &name, "jsonl");
    let identity = SpiffeId::istio(&trust_domain(data), NAMESPACE, SERVICE_ACCOUNT)?;
    let (mut command, control_plane, listen, admin, netns) = match &place {
        Place::Explicit { control_plane } => {
            let admin = super::free_addr()?;
            (
                Command::new(exe),
                *control_plane,
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                admin,
                None,
            )
        }
        Place::Namespaced {
            host,
            control_plane,
        } => (
            host.command(exe),
            *control_plane,
            IpAddr::V4(host.ipv4()),
            SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            Some(host.netns().to_owned()),
        ),
    };
    command
        .args(["gateway", "--identity", &identity.to_string()])
        .args(["--control-plane", &control_plane.to_string()])
        .args(["--ca-address", &format!("https://{control_plane}")])
        .arg("--ca-root")
        .arg(data.join("root-cert.pem"))
        .args(["--ca-server-name", "localhost", "--token-file"])
        .arg(token)
        .args(["--listen", &listen.to_string()])
        .arg("--credentials-dir")
        .arg(&credentials)
        .args(["--admin", &admin.to_string()])
        .arg("--access-log")
        .arg(&access_log)
        .arg("--audit-log")
        .arg(super::log_file(data, &name, "audit.jsonl"))
        .stdout(Stdio::null())
        .stderr(super::stderr_file(data, &name, "gateway")?);
    let mut published = Vec::new();
    for (number, (protocol, hosts)) in ports(gateways) {
        let local = local_port(number)?;
        let addr = match &place {
            Place::Explicit { .. } => {
                command.args(["--port", &format!("{number}={local}")]);
                SocketAddr::from(([127, 0, 0, 1], local))
            }
            Place::Namespaced { host, .. } => super::relay::start_on(
                SocketAddr::from(([127, 0, 0, 1], local)),
                host.netns(),
                SocketAddr::new(listen, number),
            )?,
        };
        let scheme = if protocol == "HTTPS" { "https" } else { "http" };
        published.push(Published {
            port: number,
            protocol,
            hosts,
            url: format!("{scheme}://{addr}"),
        });
    }
    children.spawn("ingress gateway", &mut command)?;
    Ok(Running {
        published,
        admin,
        netns,
        access_log,
        ca,
    })
}

fn trust_domain(data: &Path) -> String {
    std::fs::read_to_string(data.join("trust-domain"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|_| "cluster.local".into())
}

/// Whether the gateway has its certificate and the control plane's
/// configuration.
pub fn ready(running: &Running) -> bool {
    match &running.netns {
        Some(netns) => super::namespaced::probe(netns, running.admin, Some(running.admin)),
        None => super::proxy_ready(running.admin),
    }
}
