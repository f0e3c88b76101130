//! A mesh CA serving Istio's certificate API on 127.0.0.1, for tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshward_identity::service::{self, BootstrapTokens, ClientCertificates};
use meshward_identity::token::TokenAuthority;
use meshward_identity::{CaFiles, CertificateAuthority, TrustBundle};

pub struct Mesh {
    pub _dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub bundle: TrustBundle,
    pub tokens: TokenAuthority,
    pub ca: Arc<CertificateAuthority>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start() -> Mesh {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path().join("ca")), "cluster.local")
            .unwrap(),
    );
    let server_cert = service::ServerCertificate::start(
        ca.clone(),
        "istio-system".into(),
        Vec::new(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let authenticators: Vec<Box<dyn service::CallerAuthenticator>> = vec![
        Box::new(BootstrapTokens(
            TokenAuthority::load_or_create(dir.path(), "cluster.local").unwrap(),
        )),
        Box::new(ClientCertificates {
            bundle: ca.bundle().clone(),
            trust_domain: "cluster.local".into(),
        }),
    ];
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_ca = ca.clone();
    tokio::spawn(async move {
        let cert = server_cert.cert.clone();
        service::serve(listener, server_ca, cert, authenticators, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        drop(server_cert);
    });
    Mesh {
        tokens: TokenAuthority::load_or_create(dir.path(), "cluster.local").unwrap(),
        bundle: ca.bundle().clone(),
        ca,
        _dir: dir,
        addr,
        stop: Some(stop),
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
