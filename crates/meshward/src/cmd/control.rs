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
use meshward_control_plane::record::{ServerRecord, record_path};
use meshward_identity::error_chain;
use meshward_policy::load;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::inputs::print_diagnostics;
use crate::kinds::{self, Wanted};

/// Where the server is and how to prove being its admin.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// The server's address, https://HOST:PORT (or HOST:PORT) [default:
    /// where the server using --data-dir recorded it listens
    /// (DIR/server.json), else https://127.0.0.1:15012].
    #[arg(long)]
    server: Option<String>,
    /// The server's data directory: its admin credential (`admin/`) and
    /// where it listens (`server.json`), for `meshward server` and `meshward up` alike.
    #[arg(long, id = "data_dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The admin credential's directory, when not under --data-dir.
    #[arg(long, id = "admin_dir", value_name = "DIR")]
    admin_dir: Option<PathBuf>,
    /// The name in the server's certificate [default: the recorded one, else localhost].
    #[arg(long)]
    server_name: Option<String>,
}

/// The namespace of `get` and `delete`: one meaning, one default.
#[derive(clap::Args, Debug, Clone)]
pub struct NamespaceArg {
    /// The namespace of the objects.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
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
    /// What to show: a kind, its plural or Istio's short name (ap, pa, ra,
    /// we, se, dr), `revocations`, `meshconfig`, or `all` stored objects.
    kind: String,
    /// One object, by name.
    name: Option<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
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
    /// The SPIFFE ID, serial or token id.
    value: String,
    /// Why, kept with the entry and shown by `meshward get revocations`.
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// The object's kind, its plural or Istio's short name (ap, pa, ra, we, se, dr).
    kind: String,
    /// The object's name.
    name: String,
    #[command(flatten)]
    namespace: NamespaceArg,
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
    let target = args.target()?;
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
        .domain_name(target.server_name.clone());
    let channel = Channel::from_shared(target.url.clone())
        .with_context(|| format!("{} ({})", target.url, target.found))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| target.unreachable(args.data_dir.as_deref(), &e))?;
    Ok(ConfigServiceClient::new(channel))
}

/// The server a command calls, and how it was found.
#[derive(Debug)]
struct Target {
    url: String,
    server_name: String,
    found: Found,
}

/// Where a server's address came from, as an error names it.
#[derive(Debug)]
enum Found {
    Flag,
    Recorded {
        path: PathBuf,
        pid: u32,
        running: bool,
    },
    /// Nothing recorded where this was looked for (when --data-dir was given).
    Default {
        looked_in: Option<PathBuf>,
    },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Flag => f.write_str("from --server"),
            Found::Recorded { path, pid, running } => {
                write!(f, "recorded in {} by pid {pid}", path.display())?;
                if !running {
                    f.write_str(", which is no longer running")?;
                }
                Ok(())
            }
            Found::Default {
                looked_in: Some(path),
            } => write!(
                f,
                "the default: no --server, and no server recorded in {}",
                path.display()
            ),
            Found::Default { looked_in: None } => {
                f.write_str("the default: no --server or --data-dir")
            }
        }
    }
}

/// Where `meshward server` listens unless told otherwise.
const DEFAULT_SERVER: &str = "https://127.0.0.1:15012";
/// The name in the server's certificate unless told otherwise.
const DEFAULT_SERVER_NAME: &str = "localhost";

impl ServerArgs {
    /// `--server`; else what the server using `--data-dir` recorded; else
    /// the default. A record of a process that is gone is still tried (a
    /// server in another pid namespace looks gone), and said to be stale
    /// if the connection fails.
    fn target(&self) -> anyhow::Result<Target> {
        let recorded = match (&self.server, &self.data_dir) {
            (None, Some(data)) => ServerRecord::read(data)?,
            _ => None,
        };
        let (url, found) = match (&self.server, &recorded, &self.data_dir) {
            (Some(server), _, _) => (with_scheme(server), Found::Flag),
            (None, Some(record), Some(data)) => (
                format!("https://{}", record.address),
                Found::Recorded {
                    path: record_path(data),
                    pid: record.pid,
                    running: record.is_running(),
                },
            ),
            (None, _, data) => (
                DEFAULT_SERVER.to_owned(),
                Found::Default {
                    looked_in: data.as_deref().map(record_path),
                },
            ),
        };
        let server_name = self
            .server_name
            .clone()
            .or_else(|| recorded.map(|r| r.server_name))
            .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_owned());
        Ok(Target {
            url,
            server_name,
            found,
        })
    }
}

/// `HOST:PORT` as `https://HOST:PORT`; a URL as given.
fn with_scheme(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    }
}

impl Target {
    /// A failed connection: the address tried, where it came from, why it
    /// failed (each cause once) and, when nothing answered there, what to do.
    fn unreachable(
        &self,
        data_dir: Option<&std::path::Path>,
        e: &tonic::transport::Error,
    ) -> anyhow::Error {
        let mut message = format!(
            "connecting to the server at {} ({}): {}",
            self.url,
            self.found,
            error_chain(e)
        );
        if nothing_answered(e) {
            let dir = data_dir.map_or_else(|| "DIR".to_owned(), |d| d.display().to_string());
            message.push_str(&format!(
                "\nis `meshward server --data-dir {dir}` or `meshward up` running? give --server or --data-dir"
            ));
        }
        anyhow::Error::msg(message)
    }
}

/// Whether a connection failed for want of a server (refused, unreachable,
/// timed out), rather than in TLS with one.
fn nothing_answered(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<tonic::TimeoutExpired>().is_some()
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionRefused
                        | TimedOut
                        | HostUnreachable
                        | NetworkUnreachable
                        | AddrNotAvailable
                        | NotConnected
                )
            })
        {
            return true;
        }
        cause = e.source();
    }
    false
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The server's refusal, as it worded it; a call that never reached the
/// server (the connection failed, or the handshake refused the credential)
/// says why, each cause once.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::Error::msg(error_chain(&Refusal(status)))
}

/// A `tonic::Status` as its message and causes (its own `Display` adds
/// the code, details and metadata).
#[derive(Debug)]
struct Refusal(tonic::Status);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
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
            // Stored objects come from no file: their warnings name the
            // object alone.
            let loaded = load::load_str("server", &object.to_string());
            for d in &loaded.diagnostics {
                eprintln!("{}", d.unplaced());
            }
            policies.extend(loaded.policies.into_iter().map(|p| p.policy));
        }
        Ok(meshward_policy::PolicySet::new(
            mesh.into_iter().next().unwrap_or_default(),
            policies,
        ))
    })
}

pub fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let wanted = match kinds::for_get(&args.kind) {
        Ok(wanted) => wanted,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let (kind, namespaced) = match wanted {
        Wanted::All => ("", true),
        Wanted::One(kind) => (kind.name, kind.namespaced),
    };
    // The revocation list and the mesh config are in no namespace.
    let namespace = (namespaced && !args.all_namespaces).then(|| args.namespace.namespace.clone());
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let response = client
            .get(GetRequest {
                kind: kind.to_owned(),
                namespace: namespace.clone(),
                name: args.name.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        if kind == "Revocation" && args.output.is_none() {
            let list: Vec<Revocation> = serde_json::from_str(&response.objects_json)?;
            print_revocations(&list);
            return Ok(ExitCode::SUCCESS);
        }
        let objects: Vec<serde_json::Value> = serde_json::from_str(&response.objects_json)?;
        let kind_shown = if kind.is_empty() { "object" } else { kind };
        if let Some(name) = &args.name
            && objects.is_empty()
        {
            match &namespace {
                Some(ns) => eprintln!("{kind_shown} {ns}/{name} not found"),
                None => eprintln!("{kind_shown} {name} not found in any namespace"),
            }
            return Ok(ExitCode::from(1));
        }
        if args.output.as_deref() == Some("json") {
            println!("{}", serde_json::to_string_pretty(&objects)?);
        } else {
            for object in &objects {
                println!("---\n{}", serde_saphyr::to_string(object)?.trim_end());
            }
        }
        if let Some(ns) = &namespace
            && objects.is_empty()
        {
            // As kubectl's "No resources found in default namespace."
            eprintln!("no {kind_shown} in namespace {ns} (-A: every namespace)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let kind = match kinds::for_delete(&args.kind) {
        Ok(kind) => kind.name,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let namespace = &args.namespace.namespace;
    runtime()?.block_on(async {
        let mut client = client(&args.server).await?;
        let response = client
            .delete(DeleteRequest {
                kind: kind.to_owned(),
                namespace: namespace.clone(),
                name: args.name.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        if response.deleted {
            println!("{kind}/{namespace}/{} deleted", args.name);
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!("{kind}/{namespace}/{} not found", args.name);
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
        // Columns as wide as their widest value, however long an identity.
        let workload = |p: &meshward_api::control::ProxyStatus| {
            if p.workload.is_empty() {
                "-".to_owned()
            } else {
                p.workload.clone()
            }
        };
        let wide = |title: &str, f: &dyn Fn(&meshward_api::control::ProxyStatus) -> usize| {
            response
                .proxies
                .iter()
                .map(f)
                .chain([title.len()])
                .max()
                .unwrap_or(0)
        };
        let ww = wide("WORKLOAD", &|p| workload(p).len());
        let wi = wide("IDENTITY", &|p| p.identity.len());
        // Several servers on one store: which one each proxy streams from.
        let several = response.proxies.iter().any(|p| !p.server.is_empty());
        let server = |p: &meshward_api::control::ProxyStatus| {
            if several {
                format!("{:<w$} ", p.server, w = wide("SERVER", &|p| p.server.len()))
            } else {
                String::new()
            }
        };
        println!(
            "{:<ww$} {:<wi$} {}{:<20} {:>5} {:>5} {:<8} ERROR",
            "WORKLOAD",
            "IDENTITY",
            if several {
                format!("{:<w$} ", "SERVER", w = wide("SERVER", &|p| p.server.len()))
            } else {
                String::new()
            },
            "CERT EXPIRES",
            "SENT",
            "ACKED",
            "SYNC"
        );
        for p in &response.proxies {
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
                "{:<ww$} {:<wi$} {}{:<20} {:>5} {:>5} {:<8} {}",
                workload(p),
                p.identity,
                server(p),
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
            server: Some(format!("https://{address}")),
            data_dir: Some(data_dir),
            admin_dir: None,
            server_name: None,
        }
    }
}
