//! `meshward apply | get | delete | status | revoke`: the configuration API
//! of a running `meshward server`, called with the admin credential.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use meshward_api::control::config_service_client::ConfigServiceClient;
use meshward_api::control::{
    ApplyRequest, DeleteRequest, GetRequest, RevokeRequest, StatusRequest,
};
use meshward_api::resources::{Revocation, RevocationKind};
use meshward_control_plane::admin::admin_dir;
use meshward_policy::load;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::inputs::print_diagnostics;

/// Where the server is and how to prove being its admin.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    server: String,
    /// The server's data directory (its `admin/` holds the admin credential).
    #[arg(long, id = "data_dir")]
    data_dir: Option<PathBuf>,
    /// The admin credential's directory, when not under --data-dir.
    #[arg(long, id = "admin_dir")]
    admin_dir: Option<PathBuf>,
    /// The name in the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// Files or directories of policies, WorkloadEntries and ServiceEntries.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// The files are MeshConfig (or Istio's `istio` ConfigMap).
    #[arg(long)]
    mesh_config: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WorkloadEntry, ServiceEntry, `all`, or `revocations`.
    kind: String,
    name: Option<String>,
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// yaml (the default for objects) or json; revocations are a table unless asked.
    #[arg(short = 'o', long, value_parser = ["yaml", "json"])]
    output: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// What VALUE is: identity (a SPIFFE ID), serial (a certificate serial in
    /// hex, as `meshward ca inspect` prints it) or token (a bootstrap token's
    /// id, as `meshward token create` prints it).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(["identity", "serial", "token"]))]
    kind: String,
    value: String,
    /// Why, kept with the entry and shown by `meshward get revocations`.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    kind: String,
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn client(args: &ServerArgs) -> anyhow::Result<ConfigServiceClient<Channel>> {
    let dir = match (&args.admin_dir, &args.data_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(data)) => admin_dir(data),
        (None, None) => bail!(
            "give --data-dir (the server's) or --admin-dir: the config API needs the admin credential"
        ),
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("root-cert.pem")?))
        .identity(Identity::from_pem(
            read("cert-chain.pem")?,
            read("key.pem")?,
        ))
        .domain_name(args.server_name.clone());
    let channel = Channel::from_shared(args.server.clone())
        .with_context(|| format!("--server {}", args.server))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    Ok(ConfigServiceClient::new(channel))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The server's refusal, as it worded it; a call that never reached the
/// server (the connection failed, or the handshake refused the credential)
/// says why, from the innermost cause.
fn refused(status: tonic::Status) -> anyhow::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&status);
    let mut innermost = None;
    while let Some(e) = cause {
        innermost = Some(e.to_string());
        cause = e.source();
    }
    match innermost {
        Some(why) if why != status.message() => {
            anyhow::anyhow!("{}: {why}", status.message())
        }
        _ => anyhow::anyhow!("{}", status.message()),
    }
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    // Everything is checked first, with the same engine the server uses:
    // nothing is sent unless every file is valid.
    let mut texts = Vec::new();
    for path in &args.files {
        let files =
            load::policy_files(path).with_context(|| format!("reading {}", path.display()))?;
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            texts.push((file.display().to_string(), text));
        }
    }
    if !args.mesh_config {
        let mut invalid = false;
        for (file, text) in &texts {
            let loaded = load::load_str(file, text);
            print_diagnostics(&loaded.diagnostics);
            invalid |= loaded.has_errors();
        }
        if invalid {
            eprintln!("nothing was applied: fix the errors above (see `meshward validate`)");
            return Ok(ExitCode::from(1));
        }
    }
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        for (file, text) in texts {
            let response = client
                .apply(ApplyRequest {
                    file,
                    text,
                    mesh_config: args.mesh_config,
                })
                .await
                .map_err(refused)?
                .into_inner();
            for change in response.changes {
                println!("{} {}", change.key, change.action);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Every policy and the mesh config a running server holds, for
/// `describe` against the live configuration.
pub fn live_policy_set(args: &ServerArgs) -> anyhow::Result<meshward_policy::PolicySet> {
    runtime()?.block_on(async {
        let mut client = client(args).await?;
        let fetch = |kind: &str| GetRequest {
            kind: kind.to_owned(),
            namespace: None,
            name: None,
        };
        let all = client.get(fetch("")).await.map_err(refused)?.into_inner();
        let mesh = client
            .get(fetch("MeshConfig"))
            .await
            .map_err(refused)?
            .into_inner();
        let mesh: Vec<meshward_policy::api::MeshConfig> = serde_json::from_str(&mesh.objects_json)?;
        let objects: Vec<serde_json::Value> = serde_json::from_str(&all.objects_json)?;
        let mut policies = Vec::new();
        for object in objects {
            let loaded = load::load_str("server", &object.to_string());
            print_diagnostics(&loaded.diagnostics);
            policies.extend(loaded.policies.into_iter().map(|p| p.policy));
        }
        Ok(meshward_policy::PolicySet::new(
            mesh.into_iter().next().unwrap_or_default(),
            policies,
        ))
    })
}

fn is_revocations(kind: &str) -> bool {
    kind.eq_ignore_ascii_case("revocations") || kind.eq_ignore_ascii_case("revocation")
}

pub fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let kind = if args.kind == "all" {
            String::new()
        } else {
            args.kind.clone()
        };
        if is_revocations(&kind) && args.output.is_none() {
            let response = client
                .get(GetRequest {
                    kind,
                    namespace: None,
                    name: None,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let list: Vec<Revocation> = serde_json::from_str(&response.objects_json)?;
            print_revocations(&list);
            return Ok(ExitCode::SUCCESS);
        }
        let response = client
            .get(GetRequest {
                kind,
                namespace: args.namespace.clone(),
                name: args.name.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        let objects: Vec<serde_json::Value> = serde_json::from_str(&response.objects_json)?;
        if args.name.is_some() && objects.is_empty() {
            eprintln!("not found");
            return Ok(ExitCode::from(1));
        }
        if args.output.as_deref() == Some("json") {
            println!("{}", serde_json::to_string_pretty(&objects)?);
        } else {
            for object in &objects {
                println!("---\n{}", serde_saphyr::to_string(object)?.trim_end());
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let response = client
            .delete(DeleteRequest {
                kind: args.kind.clone(),
                namespace: args.namespace.clone(),
                name: args.name.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        if response.deleted {
            println!("{}/{}/{} deleted", args.kind, args.namespace, args.name);
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!("{}/{}/{} not found", args.kind, args.namespace, args.name);
            Ok(ExitCode::from(1))
        }
    })
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let response = client
            .status(StatusRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        println!("config version {}", response.version);
        println!(
            "{:<28} {:<52} {:<20} {:>5} {:>5} {:<8} ERROR",
            "WORKLOAD", "IDENTITY", "CERT EXPIRES", "SENT", "ACKED", "SYNC"
        );
        for p in response.proxies {
            let expires = std::time::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(p.certificate_expiry).unwrap_or(0));
            let sync = if !p.nack.is_empty() {
                "NACKED"
            } else if p.acked_version == p.sent_version {
                "SYNCED"
            } else {
                "STALE"
            };
            println!(
                "{:<28} {:<52} {:<20} {:>5} {:>5} {:<8} {}",
                if p.workload.is_empty() {
                    "-"
                } else {
                    &p.workload
                },
                p.identity,
                humantime::format_rfc3339_seconds(expires).to_string(),
                p.sent_version,
                p.acked_version,
                sync,
                p.nack
            );
        }
        // Proxies the server would not give a workload, and why.
        let now = std::time::SystemTime::now();
        for r in response.refused {
            let expires = std::time::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(r.certificate_expiry).unwrap_or(0));
            let ago = now
                .duration_since(
                    std::time::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(r.last_refused).unwrap_or(0)),
                )
                .map_or(0, |d| d.as_secs());
            println!(
                "{:<28} {:<52} {:<20} {:>5} {:>5} {:<8} {} ({} from {}, last {ago} s ago)",
                if r.claimed_workload.is_empty() {
                    "-"
                } else {
                    &r.claimed_workload
                },
                r.identity,
                humantime::format_rfc3339_seconds(expires).to_string(),
                "-",
                "-",
                "REFUSED",
                r.reason,
                if r.attempts == 1 {
                    "once".to_owned()
                } else {
                    format!("{} times", r.attempts)
                },
                r.peer_address,
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_revocations(list: &[Revocation]) {
    println!("{:<9} {:<60} {:<21} REASON", "KIND", "VALUE", "REVOKED AT");
    for r in list {
        println!(
            "{:<9} {:<60} {:<21} {}",
            r.kind.as_str(),
            r.value,
            r.revoked_at,
            r.reason
        );
    }
}

pub fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let response = client
            .revoke(RevokeRequest {
                kind: args.kind.clone(),
                value: args.value.clone(),
                reason: args.reason.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        let entry: Revocation = serde_json::from_str(&response.revocation_json)?;
        if response.created {
            println!(
                "{} {} revoked (config version {})",
                entry.kind.as_str(),
                entry.value,
                response.version
            );
        } else {
            println!(
                "{} {} was already revoked at {}",
                entry.kind.as_str(),
                entry.value,
                entry.revoked_at
            );
        }
        if entry.kind == RevocationKind::Token {
            eprintln!(
                "note: certificates already issued with this token stay valid; revoke their identity or serial to refuse them too"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

impl ServerArgs {
    /// The server at `address` (HOST:PORT), with the admin credential under `data_dir`.
    pub fn local(address: &str, data_dir: PathBuf) -> ServerArgs {
        ServerArgs {
            server: format!("https://{address}"),
            data_dir: Some(data_dir),
            admin_dir: None,
            server_name: "localhost".into(),
        }
    }
}
