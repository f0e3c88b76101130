//! The workload side of identity: keeps a valid certificate for one SPIFFE
//! ID, from the mesh CA, for as long as the workload runs.
//!
//! The key is made in memory for every certificate and never leaves this
//! process. A new certificate is requested at half the remaining lifetime
//! (with jitter, so a fleet started together does not renew together),
//! failures are retried with capped exponential backoff, and the current
//! certificate keeps being served until it really expires. Each new
//! certificate is published on a watch channel that TLS configs read on
//! every handshake, so connections already open are not touched.

use std::sync::Arc;
use std::time::Duration;

use meshward_api::istio_ca::IstioCertificateRequest;
use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rand::RngExt as _;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::bundle::TrustBundle;
use crate::ca::{IssuedChain, new_key_and_csr};
use crate::chain;
use crate::pem;
use crate::spiffe::SpiffeId;
use crate::tls::{self, WatchedCert};

/// A connector whose TCP connections carry `mark` (TLS is added by tonic).
fn marked(
    mark: u32,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(move |uri: http::Uri| async move {
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(443);
        let mut last = std::io::Error::other(format!("{uri}: no address"));
        for addr in tokio::net::lookup_host((host, port)).await? {
            let socket = match addr {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket2::SockRef::from(&socket).set_mark(mark)?;
            match socket.connect(addr).await {
                Ok(stream) => return Ok(hyper_util::rt::TokioIo::new(stream)),
                Err(e) => last = e,
            }
        }
        Err(last)
    })
}

/// Where and how the agent gets certificates.
#[derive(Clone)]
pub struct AgentConfig {
    pub identity: SpiffeId,
    /// `https://host:port` of the CA; several, comma-separated, are tried
    /// in turn until one takes the connection.
    pub ca_address: String,
    /// The name to expect in the CA's certificate (`istiod.istio-system.svc`, `localhost`).
    pub ca_server_name: String,
    pub bundle: TrustBundle,
    /// A bootstrap token; renewal works without it, over mutual TLS.
    pub token: Option<String>,
    /// Requested lifetime; the CA's default when `None`.
    pub ttl: Option<Duration>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// `SO_MARK` for the connections to the CA: a proxy whose own traffic
    /// is exempt from capture by its mark must mark these too.
    pub mark: Option<u32>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: only whether there is one.
        f.debug_struct("AgentConfig")
            .field("identity", &self.identity.to_string())
            .field("ca_address", &self.ca_address)
            .field("has_token", &self.token.is_some())
            .finish()
    }
}

impl AgentConfig {
    pub fn new(
        identity: SpiffeId,
        ca_address: String,
        ca_server_name: String,
        bundle: TrustBundle,
        token: Option<String>,
    ) -> AgentConfig {
        AgentConfig {
            identity,
            ca_address,
            ca_server_name,
            bundle,
            token,
            ttl: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            mark: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the CA at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the CA's answer is not a valid certificate for {identity}: {reason}")]
    BadChain { identity: String, reason: String },
    #[error("making the key or CSR: {0}")]
    Key(String),
}

/// The certificate in force, kept by the agent for renewal over mTLS. The
/// key is wiped from memory when replaced.
struct Current {
    key_pem: zeroize::Zeroizing<String>,
    chain_pem: String,
    /// The earliest expiry in the chain.
    not_after: i64,
}

/// Renewals are never closer together than this, however short the lifetime.
const MIN_RENEW_WAIT: Duration = Duration::from_millis(500);
/// Retries are never closer together than this.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Starts the agent. The returned [`WatchedCert`] holds `None` until the
/// first certificate arrives, then always the newest valid one.
pub fn start(config: AgentConfig) -> (WatchedCert, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(run(config, tx));
    (WatchedCert(rx), task)
}

async fn run(config: AgentConfig, tx: watch::Sender<Option<Arc<CertifiedKey>>>) {
    let mut current: Option<Current> = None;
    let initial_backoff = config.initial_backoff.max(MIN_BACKOFF);
    let max_backoff = config.max_backoff.max(initial_backoff);
    let mut backoff = initial_backoff;
    loop {
        match fetch(&config, current.as_ref()).await {
            Ok((key_pem, chain, certified, not_after)) => {
                tx.send_replace(Some(certified));
                let remaining = (not_after - unix_now()).max(0) as f64;
                // Half the remaining lifetime, ±10 %.
                let jitter: f64 = rand::rng().random_range(0.9..1.1);
                let wait = Duration::try_from_secs_f64(remaining / 2.0 * jitter)
                    .unwrap_or(MIN_RENEW_WAIT)
                    .max(MIN_RENEW_WAIT);
                tracing::info!(identity = %config.identity, renew_in = ?wait, "workload certificate updated");
                current = Some(Current {
                    key_pem,
                    chain_pem: chain.to_pem(),
                    not_after,
                });
                backoff = initial_backoff;
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let level_error = matches!(e, AgentError::BadChain { .. });
                if level_error {
                    tracing::error!(identity = %config.identity, error = %e, retry_in = ?backoff, "certificate request failed");
                } else {
                    tracing::warn!(identity = %config.identity, error = %e, retry_in = ?backoff, "certificate request failed");
                }
                let jitter: f64 = rand::rng().random_range(0.8..1.2);
                let mut wait = Duration::try_from_secs_f64(backoff.as_secs_f64() * jitter)
                    .unwrap_or(max_backoff);
                // The old certificate stays in force until it really expires,
                // and not a moment longer.
                if let Some(c) = &current {
                    let left =
                        Duration::from_secs(u64::try_from(c.not_after - unix_now()).unwrap_or(0));
                    if left < wait {
                        tokio::time::sleep(left).await;
                        tx.send_replace(None);
                        current = None;
                        wait -= left;
                    }
                }
                tokio::time::sleep(wait).await;
                backoff = backoff.saturating_mul(2).min(max_backoff);
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// A channel to the CA at `address` (a URL).
async fn connect(
    address: &str,
    tls: ClientTlsConfig,
    mark: Option<u32>,
) -> Result<Channel, AgentError> {
    let connect_error = |e: tonic::transport::Error| AgentError::Connect {
        address: address.to_owned(),
        reason: e.to_string(),
    };
    let endpoint = Channel::from_shared(address.to_owned())
        .map_err(|e| AgentError::Connect {
            address: address.to_owned(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(connect_error)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    match mark {
        None => endpoint.connect().await,
        Some(mark) => endpoint.connect_with_connector(marked(mark)).await,
    }
    .map_err(connect_error)
}

/// One round: new key and CSR, the CA's chain, checked.
async fn fetch(
    config: &AgentConfig,
    current: Option<&Current>,
) -> Result<
    (
        zeroize::Zeroizing<String>,
        IssuedChain,
        Arc<CertifiedKey>,
        i64,
    ),
    AgentError,
> {
    let (key, csr) =
        new_key_and_csr(&config.identity).map_err(|e| AgentError::Key(e.to_string()))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(config.bundle.to_pem()))
        .domain_name(config.ca_server_name.clone());
    // Renewal proves the identity with the certificate in force; the
    // bootstrap token is only sent when there is none.
    let renewing = current.filter(|c| c.not_after > unix_now());
    if let Some(current) = renewing {
        tls = tls.identity(Identity::from_pem(
            &current.chain_pem,
            current.key_pem.as_bytes(),
        ));
    }
    // Several servers (`--ca-address A,B`): the first that takes the
    // connection. One that answers has the last word, refusals included.
    let mut channel = Err(AgentError::Connect {
        address: config.ca_address.clone(),
        reason: "no address".into(),
    });
    for address in config.ca_address.split(',').map(str::trim) {
        if address.is_empty() {
            continue;
        }
        channel = connect(address, tls.clone(), config.mark).await;
        if channel.is_ok() {
            break;
        }
    }
    let channel = channel?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: config
            .ttl
            .map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)),
        metadata: None,
    });
    if let (None, Some(token)) = (renewing, &config.token) {
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| AgentError::Refused("the token is not a valid header value".into()))?;
        // Never indexed by HPACK, never printed.
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
    }
    let response = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(|s| AgentError::Refused(format!("{}: {}", s.code(), s.message())))?
        .into_inner();
    let bad = |reason: String| AgentError::BadChain {
        identity: config.identity.to_string(),
        reason,
    };
    let certificates = pem::parse_certificates(&response.cert_chain.concat()).map_err(bad)?;
    let verified =
        chain::verify(&certificates, &config.bundle, unix_now()).map_err(|e| bad(e.to_string()))?;
    if verified.id != config.identity {
        return Err(bad(format!("it is for {}", verified.id)));
    }
    let chain = IssuedChain { certificates };
    let certified = tls::certified_key(&key, &chain).map_err(|e| AgentError::Key(e.to_string()))?;
    Ok((
        zeroize::Zeroizing::new(key.serialize_pem()),
        chain,
        certified,
        verified.not_after,
    ))
}
