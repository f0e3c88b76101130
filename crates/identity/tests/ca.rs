//! The mesh CA on real files: root creation and reuse, X.509-SVID issuance,
//! refusals, plug-in CA, root rotation, and what openssl says about it all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use meshward_identity::ca::{self, CaMode, new_key_and_csr};
use meshward_identity::chain::{self, ChainError};
use meshward_identity::{CaError, CaFiles, CertificateAuthority, SpiffeId, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::*;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::istio("cluster.local", ns, sa).unwrap()
}

fn new_ca(dir: &Path) -> CertificateAuthority {
    CertificateAuthority::load_or_create(&CaFiles::new(dir), "cluster.local").unwrap()
}

#[test]
fn creates_a_root_once_with_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let first = new_ca(dir.path());
    assert_eq!(first.mode(), CaMode::SelfSigned);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ca::CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the CA key is readable by its owner only"
        );
    }
    let second = new_ca(dir.path());
    assert_eq!(
        first.bundle(),
        second.bundle(),
        "the root is reused on restart"
    );
    let root = X509Certificate::from_der(&first.bundle().roots()[0])
        .unwrap()
        .1;
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    let years = (root.validity().not_after.timestamp() - root.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
    assert_no_key_material(
        &format!("{first:?}"),
        &std::fs::read_to_string(dir.path().join(ca::CA_KEY)).unwrap(),
    );
}

/// Debug output shows no part of the key: not its PEM label, not a line of
/// its base64 body, and not its DER bytes as hex or as a byte list.
fn assert_no_key_material(debug: &str, key_pem: &str) {
    assert!(!debug.contains("PRIVATE"), "{debug}");
    let body: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    assert!(!body.is_empty(), "the key file has a body");
    for line in &body {
        // Any 16 characters of the body would be a leak.
        for chunk in line.as_bytes().chunks(16).filter(|c| c.len() == 16) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(!debug.contains(chunk), "Debug shows key material {chunk:?}");
        }
    }
    let der = ::pem::parse(key_pem).unwrap().into_contents();
    // The EC private key's secret scalar: `version 1, OCTET STRING (32)`.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 private key")
        + 5;
    let secret = &der[at..at + 16];
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !debug.to_ascii_lowercase().contains(&hex),
        "Debug shows key bytes as hex"
    );
    let list = secret
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    assert!(!debug.contains(&list), "Debug shows key bytes as a list");
}

#[test]
fn issues_x509_svids_from_the_authenticated_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let chain = ca.sign_csr(&csr, &identity, None).unwrap();
    assert_eq!(chain.certificates.len(), 2, "leaf and root");
    let verified = chain::verify(&chain.certificates, ca.bundle(), now()).unwrap();
    assert_eq!(verified.id, identity);
    assert_eq!(
        verified.not_after - verified.not_before,
        24 * 3600 + 60,
        "24 h, backdated a minute"
    );

    let leaf = X509Certificate::from_der(chain.leaf()).unwrap().1;
    let sans = &leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(sans.len(), 1, "exactly one SAN");
    assert!(matches!(
        sans[0],
        GeneralName::URI("spiffe://cluster.local/ns/foo/sa/bar")
    ));
    assert!(
        !leaf
            .basic_constraints()
            .unwrap()
            .is_some_and(|b| b.value.ca)
    );
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        leaf.serial.bits() > 64 && leaf.raw_serial()[0] & 0x80 == 0,
        "random positive serial"
    );
    assert!(
        leaf.extensions()
            .iter()
            .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER),
        "authority key identifier"
    );
}

#[test]
fn honours_the_requested_ttl_up_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path()).with_max_ttl(Duration::from_secs(48 * 3600));
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let chain = ca
        .sign_csr(&csr, &identity, Some(Duration::from_secs(3600)))
        .unwrap();
    let v = chain::verify(&chain.certificates, ca.bundle(), now()).unwrap();
    assert_eq!(v.not_after - v.not_before, 3600 + 60);
    let err = ca
        .sign_csr(&csr, &identity, Some(Duration::from_secs(72 * 3600)))
        .unwrap_err();
    assert!(matches!(err, CaError::TtlTooLong { .. }), "{err}");
}

#[test]
fn an_unasked_lifetime_is_the_default_but_never_beyond_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let lifetime = |ca: &meshward_identity::CertificateAuthority| {
        let chain = ca.sign_csr(&csr, &identity, None).unwrap();
        let v = chain::verify(&chain.certificates, ca.bundle(), now()).unwrap();
        v.not_after - v.not_before - 60
    };
    let ca = new_ca(dir.path());
    assert_eq!(lifetime(&ca), 24 * 3600, "Istio's default, 24 h");
    let ca = new_ca(dir.path()).with_max_ttl(Duration::from_secs(3600));
    assert_eq!(lifetime(&ca), 3600, "the maximum, when lower");
}

#[test]
fn refuses_a_csr_for_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let (_key, csr) = new_key_and_csr(&id("foo", "admin")).unwrap();
    let err = ca.sign_csr(&csr, &id("foo", "bar"), None).unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/foo/sa/admin"),
        "{err}"
    );
}

#[test]
fn refuses_a_csr_asking_to_be_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let identity = id("foo", "bar");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec![identity.to_string()]).unwrap();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let err = ca.sign_csr(&csr, &identity, None).unwrap_err();
    assert!(matches!(err, CaError::CaRequested), "{err}");
}

#[test]
fn refuses_malformed_and_forged_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let identity = id("foo", "bar");
    for garbage in [
        "",
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(
                ca.sign_csr(garbage, &identity, None),
                Err(CaError::MalformedCsr(_))
            ),
            "{garbage:?}"
        );
    }
    // Flip a byte inside the signed part: the signature no longer verifies.
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let mut der = ::pem::parse(&csr).unwrap().into_contents();
    let i = der.len() / 2;
    der[i] ^= 0x01;
    let forged = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    assert!(matches!(
        ca.sign_csr(&forged, &identity, None),
        Err(CaError::MalformedCsr(_))
    ));
}

#[test]
fn refuses_identities_of_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let other = SpiffeId::istio("other.td", "foo", "bar").unwrap();
    let (_key, csr) = new_key_and_csr(&other).unwrap();
    assert!(matches!(
        ca.sign_csr(&csr, &other, None),
        Err(CaError::WrongTrustDomain { .. })
    ));
}

/// An operator's root and an intermediate signed by it, in Istio's plug-in layout.
fn plug_in_files(dir: &Path) -> (String, String) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "operator root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut inter_params = CertificateParams::default();
    inter_params
        .distinguished_name
        .push(DnType::CommonName, "cluster intermediate");
    inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    inter_params.use_authority_key_identifier_extension = true;
    let inter = inter_params
        .signed_by(&inter_key, &Issuer::new(root_params, &root_key))
        .unwrap();
    std::fs::write(dir.join(ca::CA_CERT), inter.pem()).unwrap();
    std::fs::write(dir.join(ca::CA_KEY), inter_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join(ca::CERT_CHAIN),
        format!("{}{}", inter.pem(), root.pem()),
    )
    .unwrap();
    std::fs::write(dir.join(ca::ROOT_CERT), root.pem()).unwrap();
    (root.pem(), inter.pem())
}

#[test]
fn signs_with_a_plug_in_intermediate_and_serves_the_full_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, inter_pem) = plug_in_files(dir.path());
    let ca = new_ca(dir.path());
    assert_eq!(ca.mode(), CaMode::PlugIn);
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let chain = ca.sign_csr(&csr, &identity, None).unwrap();
    let pems = chain.to_pem_list();
    assert_eq!(pems.len(), 3, "leaf, intermediate, root");
    assert_eq!(pems[1], inter_pem);
    assert_eq!(pems[2], root_pem);
    assert_eq!(
        chain::verify(&chain.certificates, ca.bundle(), now())
            .unwrap()
            .id,
        identity
    );
}

#[test]
fn an_incomplete_plug_in_directory_is_an_error_that_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    plug_in_files(dir.path());
    std::fs::remove_file(dir.path().join(ca::CERT_CHAIN)).unwrap();
    let err = CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local")
        .unwrap_err();
    assert!(err.to_string().contains("cert-chain.pem"), "{err}");
}

#[test]
fn a_rotated_root_trusts_the_old_one_during_the_overlap() {
    let old_dir = tempfile::tempdir().unwrap();
    let old = new_ca(old_dir.path());
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let old_chain = old.sign_csr(&csr, &identity, None).unwrap();

    let new_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        new_dir.path().join(ca::TRUSTED_ROOTS),
        old.bundle().to_pem(),
    )
    .unwrap();
    let new = new_ca(new_dir.path());
    assert_eq!(new.bundle().roots().len(), 2, "new root and old root");
    let new_chain = new.sign_csr(&csr, &identity, None).unwrap();
    // Both generations verify against the new bundle...
    assert!(chain::verify(&old_chain.certificates, new.bundle(), now()).is_ok());
    assert!(chain::verify(&new_chain.certificates, new.bundle(), now()).is_ok());
    // ...and a bundle without the old root refuses the old chain.
    let only_new = TrustBundle::new(vec![new.bundle().roots()[0].clone()]);
    // Both roots carry the same name, so the refusal is the new root's
    // signature not matching (or, with different names, no issuer at all).
    assert!(matches!(
        chain::verify(&old_chain.certificates, &only_new, now()),
        Err(ChainError::UntrustedRoot | ChainError::BadSignature { .. })
    ));
}

#[test]
fn expired_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let chain = ca
        .sign_csr(&csr, &identity, Some(Duration::from_secs(600)))
        .unwrap();
    let later = now() + 3600;
    assert!(matches!(
        chain::verify(&chain.certificates, ca.bundle(), later),
        Err(ChainError::Expired { index: 0, .. })
    ));
}

/// These tests need the openssl command line (.ci/run installs it): without
/// it they fail, never pass unchecked.
fn require_openssl() {
    let version = std::process::Command::new("openssl")
        .arg("version")
        .output();
    assert!(
        version.as_ref().is_ok_and(|v| v.status.success()),
        "openssl is required (.ci/run installs it): {version:?}"
    );
}

/// openssl is the second opinion: it must accept the chain and see one URI
/// SAN and both EKUs.
#[test]
fn openssl_agrees() {
    require_openssl();
    let dir = tempfile::tempdir().unwrap();
    let (_, _) = plug_in_files(dir.path());
    let ca = new_ca(dir.path());
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    let chain = ca.sign_csr(&csr, &identity, None).unwrap();
    let pems = chain.to_pem_list();
    let out = tempfile::tempdir().unwrap();
    let leaf = out.path().join("leaf.pem");
    let untrusted = out.path().join("intermediate.pem");
    let root = out.path().join("root.pem");
    std::fs::write(&leaf, &pems[0]).unwrap();
    std::fs::write(&untrusted, &pems[1]).unwrap();
    std::fs::write(&root, ca.bundle().to_pem()).unwrap();
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/foo/sa/bar"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
}

#[test]
fn a_key_that_does_not_match_the_ca_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    plug_in_files(dir.path());
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(dir.path().join(ca::CA_KEY), other.serialize_pem()).unwrap();
    let err = CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local")
        .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
}

#[test]
fn a_chain_that_does_not_reach_the_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    plug_in_files(dir.path());
    // Replace the root with an unrelated one: ca-cert.pem no longer chains to it.
    let unrelated = tempfile::tempdir().unwrap();
    let (root_pem, _) = plug_in_files(unrelated.path());
    std::fs::write(dir.path().join(ca::ROOT_CERT), &root_pem).unwrap();
    std::fs::write(
        dir.path().join(ca::CERT_CHAIN),
        std::fs::read_to_string(dir.path().join(ca::CA_CERT)).unwrap(),
    )
    .unwrap();
    let err = CertificateAuthority::load_or_create(&CaFiles::new(dir.path()), "cluster.local")
        .unwrap_err();
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
}

#[test]
fn every_root_in_root_cert_pem_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, _) = plug_in_files(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (old_root, _) = plug_in_files(other.path());
    std::fs::write(
        dir.path().join(ca::ROOT_CERT),
        format!("{root_pem}{old_root}"),
    )
    .unwrap();
    let ca = new_ca(dir.path());
    assert_eq!(ca.bundle().roots().len(), 2);
    // The chain served still ends at the root ca-cert.pem leads to.
    let identity = id("foo", "bar");
    let (_key, csr) = new_key_and_csr(&identity).unwrap();
    assert_eq!(
        ca.sign_csr(&csr, &identity, None)
            .unwrap()
            .to_pem_list()
            .last()
            .unwrap(),
        &root_pem
    );
}

#[test]
fn two_processes_creating_the_ca_at_once_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                CertificateAuthority::load_or_create(&CaFiles::new(&path), "cluster.local")
                    .map(|ca| ca.bundle().clone())
            })
        })
        .collect();
    let bundles: Vec<TrustBundle> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(
        bundles.windows(2).all(|w| w[0] == w[1]),
        "every process sees the same root"
    );
}

/// A P-256 key in a CSR signed with SHA-384 (valid; `openssl req -sha384`):
/// the certificate must certify that P-256 key, whatever the CSR's
/// signature algorithm suggests.
#[test]
fn the_certificate_carries_the_csr_key_whatever_the_csr_signature_algorithm() {
    require_openssl();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let csr = dir.path().join("csr.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key.to_str().unwrap(),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-sha384",
        "-subj",
        "/",
        "-addext",
        "subjectAltName=URI:spiffe://cluster.local/ns/foo/sa/bar",
        "-out",
        csr.to_str().unwrap(),
    ]);
    let public_der = run(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = new_ca(ca_dir.path());
    let chain = ca
        .sign_csr(
            &std::fs::read_to_string(&csr).unwrap(),
            &id("foo", "bar"),
            None,
        )
        .unwrap();
    let leaf = X509Certificate::from_der(chain.leaf()).unwrap().1;
    assert_eq!(leaf.tbs_certificate.subject_pki.raw, public_der.as_slice());
}
