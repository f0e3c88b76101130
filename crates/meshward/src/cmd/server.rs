//! `meshward server`: the control plane process. On one TLS port: the mesh
//! CA over Istio's certificate API, the configuration API (admin only), and
//! the distribution stream proxies connect to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use meshward_identity::limits::{self, Limits};
use meshward_identity::service::{self, BootstrapTokens, CallerAuthenticator, ClientCertificates};
use meshward_identity::token::TokenAuthority;

use meshward_api::control::decisions_server::DecisionsServer;
use meshward_api::control::distribution_server::DistributionServer;
use meshward_api::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use meshward_control_plane::admin::{admin_dir, write_admin_credential};
use meshward_control_plane::api::{ConfigApi, config_server};
use meshward_control_plane::decisions::{self, DecisionsService};
use meshward_control_plane::push::{DistributionService, Hub};
use meshward_control_plane::record::{ServerRecord, record_path};
use meshward_control_plane::store::Store;
use meshward_control_plane::watch;

use crate::cmd::ca::{BUNDLE_FILE, open_ca};
use crate::cmd::shared_ca;
use meshward_identity::sealed::SealingKey;

/// Prints a status line. A server whose standard output was closed (its
/// launcher stopped reading) keeps serving: the line is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// The config store's file in the data directory.
const STORE_FILE: &str = "store.redb";
/// How often a server on a shared store records its proxies there (its
/// lease lives a few times longer).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// Ends a task when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The name clients verify the server's certificate by: always in it.
const SERVER_NAME: &str = "localhost";

/// Why a second server cannot use `data_dir`: redb lets one process at a
/// time open the store, and the record names the one that has it.
fn held_by_another(data_dir: &std::path::Path) -> String {
    let record = record_path(data_dir);
    let holder = match ServerRecord::read(data_dir) {
        Ok(Some(running)) if running.is_running() => format!(
            "pid {}, the server listening on https://{} (as {} records)",
            running.pid,
            running.address,
            record.display()
        ),
        _ => format!(
            "its {STORE_FILE} is locked, and {} names no running server",
            record.display()
        ),
    };
    format!(
        "another meshward process holds {}: {holder}; stop it, or give this server another --data-dir",
        data_dir.display()
    )
}

/// How long the server's own certificate lives; it is renewed at half that,
/// while running.
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// State: the CA, the trust bundle (root-cert.pem), the token key.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where to serve (TLS, gRPC).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// The address recorded in DATA/server.json for commands on this
    /// machine to connect to, when it is not --listen (a relay, or NAT).
    #[arg(long, value_name = "IP:PORT")]
    advertise: Option<SocketAddr>,
    /// The mesh's trust domain (first start only; it is recorded).
    #[arg(long)]
    trust_domain: Option<String>,
    /// The root namespace: names the server's identity and DNS names.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Extra DNS names or IP addresses for the server's certificate.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// A directory of policies, WorkloadEntries and ServiceEntries, watched:
    /// changes are in force within a second.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Prometheus metrics over plain HTTP (`/metrics`); Istio uses 15014.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// How much of the decisions proxies report (`meshward proxy
    /// --report-decisions`) to keep under DATA/decisions, in MiB: the most
    /// recent, for `meshward suggest` and `meshward replay --data-dir`.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    decision_window_mib: u64,
    /// Learning: send every ALLOW and DENY AuthorizationPolicy to proxies
    /// with `istio.io/dry-run: "true"`, so they decide and log by them but
    /// enforce none (`meshward up --learn`); the store keeps them as
    /// written.
    #[arg(long)]
    dry_run_policies: bool,
    /// The longest lifetime a workload certificate may ask for, at bootstrap
    /// and renewal (Istio's MAX_WORKLOAD_CERT_TTL); longer requests are
    /// refused. A request without a lifetime gets 24h, or this when shorter.
    #[arg(long, default_value = "24h", value_parser = positive_duration)]
    max_workload_cert_ttl: humantime::Duration,
    /// Changes are pushed once none came for this long (istiod's
    /// PILOT_DEBOUNCE_AFTER).
    #[arg(long, default_value = "100ms")]
    debounce: humantime::Duration,
    /// ... and at the latest this long after the first (PILOT_DEBOUNCE_MAX).
    #[arg(long, default_value = "1s")]
    debounce_max: humantime::Duration,
    /// Connections without a client certificate (bootstrapping, or in their
    /// TLS handshake) from one address (IPv6: one /64); more are closed at
    /// once. Raise it when many workloads bootstrap from one address.
    #[arg(long, default_value_t = Limits::default().unauthenticated_per_peer as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated_per_peer: u64,
    /// Where the configuration is kept: `redb` (DATA/store.redb, for one
    /// server) or `etcd://HOST:PORT[,HOST:PORT...]` (etcd's v3 API, shared
    /// by every server given the same).
    #[arg(
        long,
        default_value = "redb",
        value_name = "redb|etcd://HOST:PORT[,...]"
    )]
    store: String,
    /// With an etcd store: the prefix of every key meshward writes.
    #[arg(long, default_value = "/meshward/")]
    etcd_prefix: String,
    /// With an etcd store: the CA (PEM) of etcd's server certificates; TLS
    /// to etcd when given.
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// With an etcd store over TLS: a client certificate (PEM) for etcd's
    /// client authentication, with --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_cacert"])]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// With an etcd store: a 32-byte key (raw, hex or base64; `openssl rand
    /// -out FILE 32`), the same on every server. The first server seals its
    /// CA and token key with it (AES-256-GCM) and shares them through etcd;
    /// the others take them from there. Without it, give every server the
    /// same CA files.
    #[arg(long, value_name = "FILE")]
    ca_key_encryption_key_file: Option<PathBuf>,
    /// Connections without a client certificate in total.
    #[arg(long, default_value_t = Limits::default().unauthenticated_total as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_unauthenticated: u64,
}

/// The config store `--store` names.
fn open_store(args: &Args) -> anyhow::Result<Store> {
    if args.store == "redb" {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating {}", args.data_dir.display()))?;
        return match Store::open(&args.data_dir.join(STORE_FILE)) {
            Ok(store) => Ok(store),
            Err(e) if e.is_in_use() => bail!(held_by_another(&args.data_dir)),
            Err(e) => Err(anyhow::Error::new(e).context("opening the config store")),
        };
    }
    let Some(list) = args.store.strip_prefix("etcd://") else {
        bail!(
            "--store {}: use `redb` or `etcd://HOST:PORT[,HOST:PORT...]`",
            args.store
        );
    };
    let endpoints: Vec<String> = list
        .split(',')
        .map(|e| e.trim().trim_end_matches('/').to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!(
            "--store {}: name at least one etcd member, HOST:PORT",
            args.store
        );
    }
    let read = |path: &Option<PathBuf>, flag: &str| -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("{flag} {}", p.display())))
            .transpose()
    };
    let options = meshward_control_plane::store::etcd::EtcdOptions {
        endpoints,
        prefix: args.etcd_prefix.clone(),
        ca: read(&args.etcd_cacert, "--etcd-cacert")?,
        identity: read(&args.etcd_cert, "--etcd-cert")?.zip(read(&args.etcd_key, "--etcd-key")?),
    };
    let backend = meshward_control_plane::store::etcd::Etcd::connect(options)
        .context("opening the config store")?;
    Ok(Store::new(Box::new(backend))
        .context("reading the config store")?
        .with_server_id(server_id(&args.data_dir)?))
}

/// This server's lasting id among those of a shared store
/// (`DATA/server-id`, made once): it names its record and its directory's
/// files there, whatever address it listens on.
fn server_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("server-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_owned());
    }
    // Unique, not secret: the standard library's randomly seeded hasher
    // over this process and the time.
    let n = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        (std::process::id(), std::time::SystemTime::now()),
    );
    let id = format!("{n:016x}");
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(&path, format!("{id}\n")))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn positive_duration(s: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s.parse().map_err(|e| format!("{e} (use e.g. 24h, 90m)"))?;
    if Duration::from(d).is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// The largest ApplyRequest (one file's text): tonic's usual 4 MiB, so every
/// file that applied before still does; a Kubernetes object is at most
/// 1.5 MiB. Only the admin's requests are decoded at all.
const CONFIG_MAX_MESSAGE: usize = 4 << 20;
/// The largest DistributionRequest: a nonce, an error and the hosts a proxy
/// subscribes to (a thousand full-length names fit).
const DISTRIBUTION_MAX_MESSAGE: usize = 256 << 10;
/// A batch of reported decision records (proxies send at most 1 MiB).
const DECISIONS_MAX_MESSAGE: usize = 4 << 20;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The store first: on a shared one, the CA may come from it.
    let store = Arc::new(open_store(&args)?);
    let sealing = args
        .ca_key_encryption_key_file
        .as_deref()
        .map(SealingKey::read)
        .transpose()?;
    let had_own = shared_ca::before_open(&store, &args.data_dir, sealing.as_ref())?;
    let mut ca = open_ca(&args.data_dir, args.trust_domain.as_deref())?;
    TokenAuthority::load_or_create(&args.data_dir, ca.trust_domain())?;
    if shared_ca::after_open(&store, &args.data_dir, sealing.as_ref(), had_own, &ca)? {
        // Another server's CA, taken in place of the one just made.
        ca = open_ca(&args.data_dir, None)?;
    }
    let ca = Arc::new(ca.with_max_ttl(args.max_workload_cert_ttl.into()));
    let tokens = TokenAuthority::load_or_create(&args.data_dir, ca.trust_domain())?;
    let authenticators: Vec<Box<dyn CallerAuthenticator>> = vec![
        Box::new(BootstrapTokens(tokens)),
        Box::new(ClientCertificates {
            bundle: ca.bundle().clone(),
            trust_domain: ca.trust_domain().to_owned(),
        }),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server_cert = service::ServerCertificate::start(
            ca.clone(),
            args.root_namespace.clone(),
            args.sans.clone(),
            SERVER_CERT_TTL,
        )?;
        say!("config store: {}", store.describe());
        let admin = write_admin_credential(&ca, &args.root_namespace, &admin_dir(&args.data_dir))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Before saying so: whoever waits for "listening on" finds the record.
        // Commands on this machine connect to what is recorded: where it
        // listens, unless it is reached another way (`up`'s relay into its
        // lab, whose addresses the machine has no route to).
        let advertised = args.advertise.unwrap_or(addr);
        let _recorded =
            ServerRecord::of_this_process(advertised, SERVER_NAME).write(&args.data_dir)?;
        say!("meshward server: trust domain {}", ca.trust_domain());
        say!("listening on {}", service::describe_listener(addr));
        say!("admin credential: {}", admin_dir(&args.data_dir).display());
        say!(
            "root certificate: {}",
            args.data_dir.join(BUNDLE_FILE).display()
        );
        let mut hub = Hub::new(
            store.clone(),
            ca.trust_domain().to_owned(),
            ca.bundle().to_pem(),
        );
        hub.debounce = args.debounce.into();
        hub.debounce_max = args.debounce_max.into();
        hub.dry_run_policies = args.dry_run_policies;
        if args.dry_run_policies {
            say!("learning: every ALLOW and DENY AuthorizationPolicy is sent in dry-run, enforcing none");
        }
        let hub = Arc::new(hub);
        // A shared store: what other servers commit is put in force here
        // and pushed to this server's proxies too.
        let _remote = store.remote_changes().map(|mut changes| {
            let (store, hub) = (store.clone(), hub.clone());
            AbortOnDrop(tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let reloading = store.clone();
                    match tokio::task::spawn_blocking(move || reloading.reload()).await {
                        Ok(Ok(())) => hub.changed(store.config().version),
                        Ok(Err(e)) => tracing::warn!("reloading the shared store: {e}"),
                        Err(e) => tracing::warn!("reloading the shared store: {e}"),
                    }
                }
            }))
        });
        // A shared store: this server records its proxies there, for every
        // server's `status`, renewing its lease with each record.
        let _announce = store.is_shared().then(|| {
            let (store, hub) = (store.clone(), hub.clone());
            let server = advertised.to_string();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    let record = hub.record(&server);
                    let store = store.clone();
                    let id = store.server_id().unwrap_or_default().to_owned();
                    match tokio::task::spawn_blocking(move || store.announce(&id, record)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("recording this server in the store: {e}"),
                        Err(e) => tracing::warn!("recording this server in the store: {e}"),
                    }
                    tokio::time::sleep(ANNOUNCE_EVERY).await;
                }
            }))
        });
        let _watcher = args.config_dir.clone().map(|dir| {
            say!("watching {}", dir.display());
            AbortOnDrop(tokio::spawn(watch::watch(
                dir,
                store.clone(),
                hub.clone(),
                Duration::from_millis(500),
            )))
        });
        let own = service::server_spiffe_id(&ca, &args.root_namespace)?;
        // Revocations and used single-use tokens live in the store: the CA
        // reads the list the store keeps current, and spends tokens there.
        let ca_service = service::CaService::new(ca.clone(), authenticators)
            .with_reserved(vec![admin.clone(), own.clone()])
            .with_revocations(store.revocations())
            .with_token_ledger(store.clone());
        let ca_counters = ca_service.counters();
        let _metrics = match args.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--metrics {addr}"))?;
                say!("metrics on http://{}/metrics", listener.local_addr()?);
                Some(AbortOnDrop(tokio::spawn(
                    meshward_control_plane::metrics::serve(listener, hub.clone(), ca_counters),
                )))
            }
            None => None,
        };
        let routes = tonic::service::Routes::new(
            IstioCertificateServiceServer::new(ca_service)
                .max_decoding_message_size(limits::CREATE_CERTIFICATE_MAX_MESSAGE),
        )
        .add_service(config_server(
            // Revoking the admin identity would revoke the credential made
            // at every start too: an old admin certificate is revoked by
            // its serial instead.
            ConfigApi::new(store.clone(), hub.clone(), admin.clone())
                .with_unrevocable(vec![own, admin])
                .with_server(advertised.to_string()),
            CONFIG_MAX_MESSAGE,
        ))
        .add_service(
            DistributionServer::new(DistributionService(hub.clone()))
                .max_decoding_message_size(DISTRIBUTION_MAX_MESSAGE),
        )
        .add_service(
            DecisionsServer::new(DecisionsService {
                hub: hub.clone(),
                window: Arc::new(
                    decisions::Window::open(
                        &args.data_dir,
                        args.decision_window_mib.saturating_mul(1 << 20),
                    )
                    .with_context(|| {
                        format!("creating {}", args.data_dir.join(decisions::DIRECTORY).display())
                    })?,
                ),
            })
            .max_decoding_message_size(DECISIONS_MAX_MESSAGE),
        );
        let limits = Limits {
            unauthenticated_per_peer: usize::try_from(args.max_unauthenticated_per_peer)
                .unwrap_or(usize::MAX),
            unauthenticated_total: usize::try_from(args.max_unauthenticated).unwrap_or(usize::MAX),
            ..Limits::default()
        };
        service::serve_routes(
            listener,
            &ca,
            server_cert.cert.clone(),
            store.revocations(),
            routes,
            limits,
            shutdown_signal(),
        )
        .await
        .context("serving")?;
        say!("meshward server: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
