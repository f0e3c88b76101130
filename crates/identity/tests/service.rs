//! Istio's certificate service over real TLS on 127.0.0.1: bootstrap with a
//! token, renew with the issued certificate, and every refusal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use meshward_api::istio_ca::IstioCertificateRequest;
use meshward_api::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshward_identity::ca::new_key_and_csr;
use meshward_identity::token::TokenAuthority;
use meshward_identity::{CaFiles, CertificateAuthority, SpiffeId, chain};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use common::{Mesh, now, start};

async fn client(
    mesh: &Mesh,
    server_name: &str,
    identity: Option<Identity>,
) -> Result<IstioCertificateServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(mesh.bundle.to_pem()))
        .domain_name(server_name);
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let channel = Channel::from_shared(format!("https://{}", mesh.addr))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(60))
        .connect()
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

fn request(csr: String, token: Option<&str>, ttl: i64) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: None,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn workload() -> SpiffeId {
    SpiffeId::istio("cluster.local", "foo", "bar").unwrap()
}

#[tokio::test]
async fn bootstrap_with_a_token_then_renew_with_the_certificate() {
    let mesh = start().await;
    let id = workload();
    let token = mesh.tokens.create(&id, Duration::from_secs(600)).unwrap();

    // Bootstrap: token → CSR → chain, leaf first, root last.
    let (key, csr) = new_key_and_csr(&id).unwrap();
    let mut c = client(&mesh, "istiod.istio-system.svc", None)
        .await
        .unwrap();
    let response = c
        .create_certificate(request(csr, Some(&token), 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.cert_chain.len(), 2);
    let chain_pem = response.cert_chain.concat();
    let certs = meshward_identity::pem::parse_certificates(&chain_pem).unwrap();
    let verified = chain::verify(&certs, &mesh.bundle, now()).unwrap();
    assert_eq!(verified.id, id);
    assert_eq!(
        verified.not_after - verified.not_before,
        3600 + 60,
        "validity_duration honoured"
    );

    // Renewal: no token, the issued certificate over mutual TLS.
    let identity = Identity::from_pem(&chain_pem, key.serialize_pem());
    let mut renewing = client(&mesh, "localhost", Some(identity)).await.unwrap();
    let (_key2, csr2) = new_key_and_csr(&id).unwrap();
    let renewed = renewing
        .create_certificate(request(csr2, None, 0))
        .await
        .unwrap()
        .into_inner();
    let certs = meshward_identity::pem::parse_certificates(&renewed.cert_chain.concat()).unwrap();
    assert_eq!(chain::verify(&certs, &mesh.bundle, now()).unwrap().id, id);

    // The renewed identity cannot ask for someone else.
    let (_key3, other_csr) =
        new_key_and_csr(&SpiffeId::istio("cluster.local", "foo", "admin").unwrap()).unwrap();
    let status = renewing
        .create_certificate(request(other_csr, None, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
}

#[tokio::test]
async fn refusals() {
    let mesh = start().await;
    let id = workload();
    let (_key, csr) = new_key_and_csr(&id).unwrap();
    let mut c = client(&mesh, "localhost", None).await.unwrap();

    // No credential at all.
    let status = c
        .create_certificate(request(csr.clone(), None, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    // A token from another mesh's key.
    let other_dir = tempfile::tempdir().unwrap();
    let forged = TokenAuthority::load_or_create(other_dir.path(), "cluster.local")
        .unwrap()
        .create(&id, Duration::from_secs(600))
        .unwrap();
    let status = c
        .create_certificate(request(csr.clone(), Some(&forged), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("bootstrap token"), "{status}");

    // Garbage token.
    let status = c
        .create_certificate(request(csr.clone(), Some("not-a-token"), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // An expired token (1 s lifetime, no leeway).
    let short = mesh.tokens.create(&id, Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await; // pacing: past its expiry (whole seconds)
    let status = c
        .create_certificate(request(csr.clone(), Some(&short), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("expired"), "{status}");

    let token = mesh.tokens.create(&id, Duration::from_secs(600)).unwrap();
    // A CSR for another identity than the token's.
    let (_k, other_csr) =
        new_key_and_csr(&SpiffeId::istio("cluster.local", "foo", "admin").unwrap()).unwrap();
    let status = c
        .create_certificate(request(other_csr, Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A malformed CSR.
    let status = c
        .create_certificate(request("garbage".into(), Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A CSR asking for a CA certificate.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let status = c
        .create_certificate(request(ca_csr, Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("CA certificate"), "{status}");
    // A token signed with this mesh's key but for another audience.
    let key_pem =
        std::fs::read(mesh._dir.path().join(meshward_identity::token::TOKEN_KEY)).unwrap();
    let claims = serde_json::json!({"iss": "meshward", "aud": "someone-else", "sub": id.to_string(), "iat": now(), "exp": now() + 600});
    let wrong_aud = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&key_pem).unwrap(),
    )
    .unwrap();
    let (_k, fresh_csr) = new_key_and_csr(&id).unwrap();
    let status = c
        .create_certificate(request(fresh_csr, Some(&wrong_aud), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    // A TTL beyond the maximum.
    let status = c
        .create_certificate(request(csr, Some(&token), 365 * 24 * 3600))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max allowed TTL"), "{status}");
}

#[tokio::test]
async fn a_client_certificate_from_another_mesh_is_refused_at_the_handshake() {
    let mesh = start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other =
        CertificateAuthority::load_or_create(&CaFiles::new(other_dir.path()), "cluster.local")
            .unwrap();
    let id = workload();
    let token = mesh.tokens.create(&id, Duration::from_secs(600)).unwrap();
    let (key, csr) = new_key_and_csr(&id).unwrap();

    // The token alone is enough: without a client certificate the same
    // request is granted...
    let mut plain = client(&mesh, "localhost", None).await.unwrap();
    plain
        .create_certificate(request(csr.clone(), Some(&token), 0))
        .await
        .expect("a valid bootstrap token is accepted");

    // ...so when a foreign certificate is added, the handshake is the only
    // thing that can refuse it: a transport failure, never an answer from
    // the service.
    let foreign = other.sign_csr(&csr, &id, None).unwrap();
    let identity = Identity::from_pem(foreign.to_pem(), key.serialize_pem());
    let refusal = match client(&mesh, "localhost", Some(identity)).await {
        Err(e) => format!("{e:?}"),
        Ok(mut c) => {
            let status = c
                .create_certificate(request(csr, Some(&token), 0))
                .await
                .expect_err("a certificate from another CA is refused");
            // A service's answer has no transport error behind it.
            let text = format!("{status:?}");
            assert!(
                text.contains("tonic::transport::Error(Transport"),
                "refused by the service rather than the handshake: {text}"
            );
            text
        }
    };
    // The server's verifier ends the handshake with a fatal alert (both
    // roots have the same subject, so the foreign chain fails on its
    // signature: decrypt_error). With TLS 1.3 the client may already be
    // writing when it arrives: it sees the alert, a broken pipe or a closed
    // connection, all from the handshake.
    assert!(
        ["received fatal alert", "broken pipe", "connection closed"]
            .iter()
            .any(|w| refusal.contains(w)),
        "not refused by the handshake: {refusal}"
    );
}

#[tokio::test]
async fn the_server_certificate_names_istiod_and_localhost() {
    let mesh = start().await;
    for name in [
        "localhost",
        "istiod.istio-system.svc",
        "meshward.istio-system.svc",
    ] {
        assert!(client(&mesh, name, None).await.is_ok(), "{name}");
    }
    assert!(client(&mesh, "elsewhere.example", None).await.is_err());
}

#[tokio::test]
async fn the_server_certificate_renews_itself_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::sync::Arc::new(
        CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local").unwrap(),
    );
    let server = meshward_identity::service::ServerCertificate::start(
        ca,
        "istio-system".into(),
        Vec::new(),
        Duration::from_secs(2),
    )
    .unwrap();
    let mut rx = server.cert.0.clone();
    let first = rx.borrow_and_update().clone().unwrap();
    // Renewed at half of 2 s; bounded wait, generous for a busy machine.
    tokio::time::timeout(Duration::from_secs(30), rx.changed())
        .await
        .expect("renewed within 30 s")
        .unwrap();
    let second = rx.borrow().clone().unwrap();
    assert_ne!(first.cert[0], second.cert[0]);
}
