//! `meshward ca init|issue|inspect` and `meshward token create`: the mesh CA
//! from the command line, for operators and tests.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use meshward_identity::ca::{self, CertificateAuthority};
use meshward_identity::token::{TokenAuthority, Uses};
use meshward_identity::{CaFiles, SpiffeId, TrustBundle, chain, pem};
use sha2::Digest;
use x509_parser::prelude::*;

/// The mesh's trust domain is recorded here by `ca init`, so every later
/// command (and the server) issues in the same one.
const TRUST_DOMAIN_FILE: &str = "trust-domain";
/// Where clients find the trust bundle.
pub const BUNDLE_FILE: &str = "root-cert.pem";

#[derive(clap::Args, Debug, Clone)]
pub struct DataDir {
    /// The control plane's data directory (CA in `ca/`, trust bundle in `root-cert.pem`).
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// The CA of a data directory, created on first use.
pub fn open_ca(
    data_dir: &Path,
    trust_domain: Option<&str>,
) -> anyhow::Result<CertificateAuthority> {
    let recorded = data_dir.join(TRUST_DOMAIN_FILE);
    let td = match (std::fs::read_to_string(&recorded).ok(), trust_domain) {
        (Some(existing), Some(asked)) if existing.trim() != asked => bail!(
            "{} was initialised for trust domain {:?}, not {asked:?}; use another --data-dir",
            data_dir.display(),
            existing.trim()
        ),
        (Some(existing), _) => {
            let td = existing.trim().to_owned();
            meshward_identity::spiffe::check_trust_domain(&td)
                .with_context(|| format!("{}", recorded.display()))?;
            td
        }
        (None, asked) => {
            let td = asked.unwrap_or("cluster.local").to_owned();
            meshward_identity::spiffe::check_trust_domain(&td)
                .with_context(|| format!("--trust-domain {td:?}"))?;
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            pem::write_public(&recorded, &format!("{td}\n"))?;
            td
        }
    };
    let ca = CertificateAuthority::load_or_create(&CaFiles::new(data_dir.join("ca")), &td)?;
    ca::write_bundle(&data_dir.join(BUNDLE_FILE), ca.bundle())?;
    Ok(ca)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 1h, 30m, 24h)"))?;
    if ttl.is_zero() {
        return Err("a lifetime must be longer than zero".into());
    }
    Ok(ttl)
}

/// A workload identity named the Istio way.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadIdentity {
    /// The workload's namespace (`ns/NS` in its SPIFFE ID).
    #[arg(short = 'n', long)]
    namespace: String,
    /// The workload's service account (`sa/SA` in its SPIFFE ID).
    #[arg(long)]
    service_account: String,
}

impl WorkloadIdentity {
    fn spiffe_id(&self, ca: &CertificateAuthority) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::istio(
            ca.trust_domain(),
            &self.namespace,
            &self.service_account,
        )?)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Create the mesh CA in the data directory (or show the existing one).
    Init {
        #[command(flatten)]
        dir: DataDir,
        /// The mesh's trust domain (first init only).
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Issue a workload certificate and key into a directory.
    Issue {
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        workload: WorkloadIdentity,
        /// Written: cert-chain.pem (leaf first), key.pem (0600), root-cert.pem.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate lives.
        #[arg(long, value_parser = parse_ttl, default_value = "24h")]
        ttl: Duration,
    },
    /// Show a certificate (or chain): SPIFFE ID, issuer, validity, fingerprint, and whether it chains to a bundle.
    Inspect {
        /// A PEM file: a certificate, or a chain leaf first.
        file: PathBuf,
        /// The trust bundle to check the chain against.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a bootstrap token for one workload identity; prints only the token.
    Create {
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        workload: WorkloadIdentity,
        /// How long the token can be used.
        #[arg(long, value_parser = parse_ttl, default_value = "1h")]
        ttl: Duration,
        /// The server accepts the token once (it records the token's id in
        /// its store); a second use, even after a restart, is refused.
        #[arg(long)]
        single_use: bool,
    },
}

pub fn run(command: CaCommand) -> anyhow::Result<ExitCode> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let ca = open_ca(&dir.data_dir, trust_domain.as_deref())?;
            let bundle = dir.data_dir.join(BUNDLE_FILE);
            println!("trust domain: {}", ca.trust_domain());
            println!(
                "CA:           {:?} in {}",
                ca.mode(),
                dir.data_dir.join("ca").display()
            );
            println!(
                "trust bundle: {} ({} root(s))",
                bundle.display(),
                ca.bundle().roots().len()
            );
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Issue {
            dir,
            workload,
            out,
            ttl,
        } => {
            let ca = open_ca(&dir.data_dir, None)?;
            let id = workload.spiffe_id(&ca)?;
            let (key, csr) = ca::new_key_and_csr(&id)?;
            let chain = ca.sign_csr(&csr, &id, Some(ttl))?;
            pem::write_private(&out.join("key.pem"), &key.serialize_pem())?;
            pem::write_public(&out.join("cert-chain.pem"), &chain.to_pem())?;
            pem::write_public(&out.join("root-cert.pem"), &ca.bundle().to_pem())?;
            println!("issued {id} into {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Inspect { file, bundle } => inspect(&file, bundle.as_deref()),
    }
}

pub fn run_token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Create {
        dir,
        workload,
        ttl,
        single_use,
    } = command;
    let ca = open_ca(&dir.data_dir, None)?;
    let id = workload.spiffe_id(&ca)?;
    let tokens = TokenAuthority::load_or_create(&dir.data_dir, ca.trust_domain())?;
    let uses = if single_use {
        Uses::Once
    } else {
        Uses::Reusable
    };
    let token = tokens.issue(&id, ttl, uses)?;
    println!("{}", token.token);
    // The id is not a secret: it is what `meshward revoke token` takes.
    eprintln!("token id: {}", token.id);
    Ok(ExitCode::SUCCESS)
}

fn inspect(file: &Path, bundle: Option<&Path>) -> anyhow::Result<ExitCode> {
    let certs = pem::read_certificates(file)?;
    let leaf_der = &certs[0];
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let id = chain::spiffe_id(&leaf)
        .map(|id| id.to_string())
        .unwrap_or_else(|e| format!("none ({e})"));
    let fingerprint = sha2::Sha256::digest(leaf_der.as_ref());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let left = leaf.validity().not_after.timestamp() - now;
    println!(
        "file:        {} ({} certificate(s))",
        file.display(),
        certs.len()
    );
    println!("SPIFFE ID:   {id}");
    println!("subject:     {}", leaf.subject());
    println!("issuer:      {}", leaf.issuer());
    println!("serial:      {}", leaf.raw_serial_as_string());
    println!(
        "valid:       {} to {} ({})",
        leaf.validity().not_before,
        leaf.validity().not_after,
        if left > 0 {
            format!(
                "expires in {}",
                humantime::format_duration(Duration::from_secs(left as u64))
            )
        } else {
            "EXPIRED".into()
        }
    );
    println!(
        "CA:          {}",
        leaf.basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
    );
    println!(
        "SHA-256:     {}",
        fingerprint
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    match bundle {
        None => println!("chain:       not checked (give --bundle root-cert.pem)"),
        Some(path) => {
            let bundle = TrustBundle::read(path)?;
            match chain::verify(&certs, &bundle, now) {
                Ok(_) => println!("chain:       verifies against {}", path.display()),
                Err(e) => {
                    println!(
                        "chain:       does NOT verify against {}: {e}",
                        path.display()
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
