//! The server's one TLS port: accepts connections, admits or refuses them
//! ([`Admission`]), completes TLS handshakes in their own tasks, and serves
//! each connection's HTTP/2 with the [`Limits`] of its kind (with a client
//! certificate of the mesh or without). gRPC routing is tonic's; connection
//! handling is here, since tonic's server applies one set of HTTP/2 limits
//! to every connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use tokio::sync::{Semaphore, watch};
use tonic::Status;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::ServiceExt;

use crate::ca::CertificateAuthority;
use crate::limits::{
    Admission, Admitted, BudgetedBody, CLOSE_GRACE, CREATE_CERTIFICATE_PATH, Limits, LogThrottle,
};
use crate::revocation::Revocations;
use crate::tls::{self, WatchedCert};

/// How long in-flight requests may finish after shutdown is asked for.
/// Idle connections (a client that keeps its channel open) do not hold the
/// server up past it.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The address a server listens on, for messages.
pub fn describe_listener(addr: SocketAddr) -> String {
    format!("https://{addr} (istio.v1.auth.IstioCertificateService)")
}

/// The TLS configuration of the server: its certificate from `cert` (read
/// on every handshake, so renewals apply to new connections), client
/// certificates optional (a bootstrap token suffices) but, when presented,
/// verified against the mesh's roots and refused when `revocations` names
/// them, as the proxies refuse them; no session resumption, which would
/// skip that check; HTTP/2 only.
fn server_tls(
    ca: &CertificateAuthority,
    cert: WatchedCert,
    revocations: Revocations,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let clients = tls::SpiffeClientVerifier::with_revocations(
        ca.bundle(),
        tls::TrustDomains(vec![ca.trust_domain().to_owned()]),
        false,
        revocations,
    )?;
    let mut config = tls::server_config(cert, clients)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Serves `routes` (the certificate service and whatever the control plane
/// adds beside it) on `listener` within `limits` until `shutdown`
/// completes, then drains for at most [`DRAIN_TIME`]. A client
/// certificate that `revocations` names is refused at the handshake, so a
/// revoked workload (or an old admin credential) gets neither the
/// authenticated limits nor any service.
pub async fn serve_routes(
    listener: tokio::net::TcpListener,
    ca: &CertificateAuthority,
    server_cert: WatchedCert,
    revocations: Revocations,
    routes: tonic::service::Routes,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls =
        server_tls(ca, server_cert, revocations).map_err(|e| ServeError::Tls(e.to_string()))?;
    let port = Arc::new(Port {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        routes,
        admission: Admission::new(
            limits.unauthenticated_per_peer,
            limits.unauthenticated_total,
        ),
        body_budget: Arc::new(Semaphore::new(limits.unauthenticated_body_bytes)),
        refusals: LogThrottle::new(Duration::from_secs(10)),
        limits,
    });
    // Every connection task holds a receiver: the sender sees when all are gone.
    let (stop, stopping) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admitted = match port.admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                if let Some(held_back) = port.refusals.allow(Instant::now()) {
                    tracing::warn!(%peer, held_back, "refused a connection: {refused}");
                }
                continue;
            }
        };
        // Small gRPC frames must not wait for delayed ACKs (40 ms otherwise).
        let _ = tcp.set_nodelay(true);
        tokio::spawn(
            port.clone()
                .connection(tcp, peer, admitted, stopping.clone()),
        );
    }
    // Stop accepting at once: new clients are refused rather than left hanging.
    drop(listener);
    let _ = stop.send(true);
    drop(stopping);
    let _ = tokio::time::timeout(DRAIN_TIME, stop.closed()).await;
    Ok(())
}

/// What every connection of one port shares.
struct Port {
    acceptor: tokio_rustls::TlsAcceptor,
    routes: tonic::service::Routes,
    limits: Limits,
    admission: Admission,
    /// Request-body bytes unauthenticated connections may hold, together.
    body_budget: Arc<Semaphore>,
    refusals: LogThrottle,
}

impl Port {
    /// One connection, from its TLS handshake to its close.
    async fn connection(
        self: Arc<Port>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
        mut stopping: watch::Receiver<bool>,
    ) {
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = stopping.changed() => return,
        };
        let info = tls.connect_info();
        // rustls verified any certificate presented against the mesh's roots.
        let authenticated = info.peer_certs().is_some_and(|certs| !certs.is_empty());
        // An authenticated connection no longer counts against its peer.
        let admitted = (!authenticated).then_some(admitted);
        let limits = if authenticated {
            &self.limits.authenticated
        } else {
            &self.limits.unauthenticated
        };
        let port = self.clone();
        let deadline = limits.request_timeout;
        let service = hyper::service::service_fn(move |request| {
            let (port, info) = (port.clone(), info.clone());
            async move {
                Ok::<_, Infallible>(port.request(request, info, authenticated, deadline).await)
            }
        });
        let mut conn = pin!(
            limits
                .http2()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        );
        let mut lifetime = pin!(expiry(limits.lifetime));
        let mut going_away = false;
        let mut stop_seen = false;
        loop {
            tokio::select! {
                result = &mut conn => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    break;
                }
                () = &mut lifetime => {
                    if going_away {
                        tracing::debug!(%peer, "closed a connection that outlived its grace");
                        break;
                    }
                    tracing::debug!(%peer, authenticated, "a connection reached the end of its lifetime; asking it to go away");
                    conn.as_mut().graceful_shutdown();
                    going_away = true;
                    lifetime.set(expiry(Some(CLOSE_GRACE)));
                }
                changed = stopping.changed(), if !stop_seen => {
                    stop_seen = true;
                    if changed.is_ok() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        drop(admitted);
    }

    /// One request: refused at once when an unauthenticated connection asks
    /// for anything but CreateCertificate (before any of its body is read),
    /// otherwise routed; its response must start within `deadline`.
    async fn request(
        &self,
        mut request: http::Request<Incoming>,
        info: TlsConnectInfo<TcpConnectInfo>,
        authenticated: bool,
        deadline: Duration,
    ) -> http::Response<tonic::body::Body> {
        if !authenticated && request.uri().path() != CREATE_CERTIFICATE_PATH {
            return Status::unauthenticated(format!(
                "{} needs a client certificate of the mesh; without one, only CreateCertificate (with a bootstrap token) is served",
                request.uri().path()
            ))
            .into_http();
        }
        // tonic's Request::peer_certs and remote_addr read this.
        request.extensions_mut().insert(info);
        let budget = (!authenticated).then(|| self.body_budget.clone());
        let request = request.map(|body| BudgetedBody::new(body, budget));
        match tokio::time::timeout(deadline, self.routes.clone().oneshot(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => Status::deadline_exceeded(format!(
                "the request was not received and answered within {deadline:?}"
            ))
            .into_http(),
        }
    }
}

/// Completes after `after`; never, for `None`.
async fn expiry(after: Option<Duration>) {
    match after {
        Some(after) => tokio::time::sleep(after).await,
        None => std::future::pending().await,
    }
}
