//! The shared store: etcd (v3 API), for several servers over one mesh
//! configuration.
//!
//! # Layout
//!
//! Each table's entry is the key `PREFIX TABLE/KEY` (prefix `/meshward/`
//! by default), its value the entry's. Beside them, `PREFIX commit` holds
//! the revision of the last commit of any server.
//!
//! # Commits
//!
//! A change is computed from everything under the prefix read at one
//! revision, and committed in one etcd transaction on condition that
//! `PREFIX commit` is still as read (its modification revision): a commit
//! of another server in between fails the condition, and the change is
//! computed again over the newer state, up to [`ATTEMPTS`] times. Changes
//! are therefore applied in order, one over the other, and none is lost;
//! under contention that lasts, the write is refused as such.
//!
//! etcd refuses a transaction of more than `--max-txn-ops` operations
//! (128 by default) or 1.5 MiB: a change that writes more keys at once
//! (a first directory sync of a large mesh) needs etcd started with a
//! larger `--max-txn-ops`.
//!
//! # Other servers' changes
//!
//! [`Etcd::changes`] watches the commit key; each commit (of any server)
//! bumps what it sends, and the server reloads and pushes.
//!
//! # Servers
//!
//! Each server records its proxies at `PREFIX servers/ADDRESS`, attached
//! to a lease it renews with every record (every few seconds): when it
//! dies, etcd drops the record within the lease's time to live, and no
//! other server lists its proxies any more.
//!
//! The client is asynchronous; the store is called from threads and tasks
//! alike, so the client runs on a runtime of its own, and calls wait for
//! it on a channel (never inside another runtime's `block_on`).

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;

use super::StoreError;
use super::backend::{Backend, BackendError, Change, Tables, diff};

/// How many times a change is computed again over newer commits.
pub const ATTEMPTS: usize = 16;
/// How long a request to etcd may take: past it, the store is unavailable
/// (for instance, etcd lost its quorum) and the write is refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response read (everything under the prefix is read at
/// once); etcd's own request limit (1.5 MiB by default) bounds each write.
const MAX_RESPONSE: usize = 256 << 20;
/// The key beside the tables that every commit changes.
const COMMIT: &str = "commit";
/// Where each server records itself (`PREFIX servers/ADDRESS`), under a
/// lease of its own: a server that dies leaves no record.
const SERVERS: &str = "servers/";
/// Values every server shares (`PREFIX shared/NAME`): the sealed CA, the
/// mesh's root certificate.
const SHARED: &str = "shared/";
/// The lease's time to live; each announcement renews it.
const LEASE_TTL: i64 = 10;

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    /// Every key's prefix (`/meshward/`).
    pub prefix: String,
    /// PEM: the CA that signed etcd's server certificates (TLS when set).
    pub ca: Option<Vec<u8>>,
    /// PEM: a client certificate and its key, for etcd's client auth.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: String,
    /// Always `Some` until dropped (then shut down without waiting: the
    /// store may be dropped inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    changes: watch::Sender<i64>,
    /// This process's lease, once granted.
    lease: std::sync::Arc<tokio::sync::Mutex<Option<i64>>>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Etcd {
    /// Connects to etcd; fails when no member answers.
    pub fn connect(options: EtcdOptions) -> Result<Etcd, BackendError> {
        let endpoints = options.endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| BackendError::Invalid {
                endpoints: endpoints.clone(),
                what: format!("starting the etcd client's runtime: {e}"),
            })?;
        let scheme = if options.ca.is_some() {
            "https"
        } else {
            "http"
        };
        let urls: Vec<String> = options
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(ca) = &options.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &options.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let client = run(Some(&runtime), async move {
            let mut client = Client::connect(urls, Some(connect)).await?;
            // A connection alone proves nothing: ask.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        })
        .ok_or_else(|| gone(&endpoints))?
        .map_err(|source| BackendError::Etcd {
            endpoints: endpoints.clone(),
            what: "connecting".into(),
            source: Box::new(source),
        })?;
        let (changes, _) = watch::channel(0);
        let etcd = Etcd {
            client,
            prefix: options.prefix,
            endpoints,
            runtime: Some(runtime),
            changes,
            lease: std::sync::Arc::default(),
        };
        etcd.watch()?;
        Ok(etcd)
    }

    /// The revision of each commit under the prefix, of any server, as
    /// etcd reports it.
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.changes.subscribe()
    }

    /// Watches the commit key for as long as the runtime runs,
    /// reconnecting after a failure.
    fn watch(&self) -> Result<(), BackendError> {
        let key = format!("{}{COMMIT}", self.prefix);
        // Every commit from here on is seen: the watch starts right after
        // the revision of this read, which comes before the store's first.
        let kv = self.kv();
        let first = key.clone();
        let start = run(self.runtime.as_ref(), async move {
            retrying(transient, || {
                let (mut kv, key) = (kv.clone(), first.clone());
                async move { kv.get(key, None).await }
            })
            .await
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error("reading"))?
        .header()
        .map_or(0, |h| h.revision());
        let (mut client, changes) = (self.client.clone(), self.changes.clone());
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        runtime.spawn(async move {
            // The last revision whose commits were reported.
            let mut seen = start;
            loop {
                let options = WatchOptions::new().with_start_revision(seen + 1);
                match client.watch(key.as_bytes(), Some(options)).await {
                    Ok(mut stream) => {
                        while let Ok(Some(response)) = stream.message().await {
                            if response.compact_revision() > 0 {
                                // What happened before etcd compacted its
                                // history is gone from the watch: reload
                                // everything, and watch on from there.
                                seen = seen.max(response.compact_revision() - 1);
                                changes.send_modify(|_| ());
                                break;
                            }
                            if let Some(revision) = response
                                .events()
                                .iter()
                                .filter_map(|e| e.kv())
                                .map(|kv| kv.mod_revision())
                                .max()
                            {
                                seen = seen.max(revision);
                                changes.send_replace(revision);
                            }
                        }
                    }
                    Err(e) => tracing::warn!("watching etcd: {e}"),
                }
                // The next watch starts after the last commit reported, so
                // none is missed while it is away.
                tokio::time::sleep(Duration::from_secs(1)).await; // pacing: a lost member is retried once a second
            }
        });
        Ok(())
    }

    /// A KV client that takes responses as large as a whole store can be.
    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE)
    }

    fn error(&self, what: &str) -> impl FnOnce(etcd_client::Error) -> BackendError + '_ {
        let what = what.to_owned();
        move |source| BackendError::Etcd {
            endpoints: self.endpoints.clone(),
            what,
            source: Box::new(source),
        }
    }

    /// Everything under the prefix, the commit key's modification revision
    /// (0: none yet) and the revision read at.
    fn read_all(&self) -> Result<(Tables, i64), BackendError> {
        let client = self.kv();
        let prefix = self.prefix.clone();
        let response = run(self.runtime.as_ref(), async move {
            retrying(transient, || {
                let mut client = client.clone();
                let prefix = prefix.clone();
                async move {
                    client
                        .get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error("reading"))?;
        let mut tables = Tables::new();
        let mut commit = 0;
        for kv in response.kvs() {
            let Some(rest) = kv.key().strip_prefix(self.prefix.as_bytes()) else {
                continue;
            };
            let (Ok(rest), Ok(value)) = (std::str::from_utf8(rest), kv.value_str()) else {
                continue;
            };
            if rest == COMMIT {
                commit = kv.mod_revision();
                continue;
            }
            if rest.starts_with(SERVERS) || rest.starts_with(SHARED) {
                continue;
            }
            if let Some((table, key)) = rest.split_once('/') {
                tables
                    .entry(table.to_owned())
                    .or_default()
                    .insert(key.to_owned(), value.to_owned());
            }
        }
        Ok((tables, commit))
    }
}

impl Backend for Etcd {
    fn read(&self) -> Result<Tables, BackendError> {
        self.read_all().map(|(tables, _)| tables)
    }

    fn update(&self, change: Change<'_>) -> Result<(), StoreError> {
        let mut unsure = 0;
        let mut attempt = 0;
        while attempt < ATTEMPTS {
            attempt += 1;
            let (before, commit) = self.read_all()?;
            let mut after = before.clone();
            if !change(&mut after)? {
                return Ok(());
            }
            let (puts, deletes) = diff(&before, &after);
            let key = |table: &str, key: &str| format!("{}{table}/{key}", self.prefix);
            let mut operations: Vec<TxnOp> = puts
                .iter()
                .map(|(table, k, value)| TxnOp::put(key(table, k), *value, None))
                .chain(
                    deletes
                        .iter()
                        .map(|(table, k)| TxnOp::delete(key(table, k), None)),
                )
                .collect();
            let guard = format!("{}{COMMIT}", self.prefix);
            operations.push(TxnOp::put(guard.clone(), commit.to_string(), None));
            let txn = Txn::new()
                .when([Compare::mod_revision(guard, CompareOp::Equal, commit)])
                .and_then(operations);
            let client = self.kv();
            let response = match run(self.runtime.as_ref(), async move {
                retrying(not_sent, || {
                    let (mut client, txn) = (client.clone(), txn.clone());
                    async move { client.txn(txn).await }
                })
                .await
            })
            .ok_or_else(|| gone(&self.endpoints))?
            {
                Ok(response) => response,
                // The cluster is changing leader: whether the commit was
                // made is unknown, so the change is computed again over
                // what is in force then (a change already made changes
                // nothing the second time; a single-use token already
                // spent is refused: fail closed).
                Err(e) if transient(&e) && unsure < RETRIES => {
                    unsure += 1;
                    attempt -= 1;
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(self.error("committing")(e).into()),
            };
            if response.succeeded() {
                return Ok(());
            }
            // Another server committed since the read: again, over it.
        }
        Err(BackendError::Contended {
            endpoints: self.endpoints.clone(),
            attempts: ATTEMPTS,
        }
        .into())
    }

    fn describe(&self) -> String {
        format!("etcd {} under {}", self.endpoints, self.prefix)
    }

    fn changes(&self) -> Option<watch::Receiver<i64>> {
        Some(self.changes())
    }

    fn announce(&self, server: &str, record: Vec<u8>) -> Result<(), BackendError> {
        let (client, lease) = (self.client.clone(), self.lease.clone());
        let key = format!("{}{SERVERS}{server}", self.prefix);
        run(self.runtime.as_ref(), async move {
            let mut lease = lease.lock().await;
            let mut client = client;
            // Renew the lease; one that expired (etcd was away longer than
            // its time to live) is replaced.
            let alive = match *lease {
                Some(id) => match client.lease_keep_alive(id).await {
                    Ok((mut keeper, mut stream)) => {
                        keeper.keep_alive().await?;
                        matches!(stream.message().await?, Some(r) if r.ttl() > 0)
                    }
                    Err(e) => return Err(e),
                },
                None => false,
            };
            if !alive {
                *lease = Some(client.lease_grant(LEASE_TTL, None).await?.id());
            }
            let options = PutOptions::new().with_lease(lease.unwrap_or_default());
            client.put(key, record, Some(options)).await.map(drop)
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error("recording this server"))
    }

    fn shared(&self, name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let client = self.kv();
        let key = format!("{}{SHARED}{name}", self.prefix);
        let response = run(self.runtime.as_ref(), async move {
            retrying(transient, || {
                let (mut client, key) = (client.clone(), key.clone());
                async move { client.get(key, None).await }
            })
            .await
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error(&format!("reading {name}")))?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn share_once(&self, name: &str, value: Vec<u8>) -> Result<bool, BackendError> {
        let client = self.kv();
        let key = format!("{}{SHARED}{name}", self.prefix);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let response = run(self.runtime.as_ref(), async move {
            retrying(not_sent, || {
                let (mut client, txn) = (client.clone(), txn.clone());
                async move { client.txn(txn).await }
            })
            .await
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error(&format!("sharing {name}")))?;
        Ok(response.succeeded())
    }

    fn announced(&self) -> Result<std::collections::BTreeMap<String, Vec<u8>>, BackendError> {
        let mut client = self.kv();
        let prefix = format!("{}{SERVERS}", self.prefix);
        let start = prefix.clone();
        let response = run(self.runtime.as_ref(), async move {
            client
                .get(start.as_bytes(), Some(GetOptions::new().with_prefix()))
                .await
        })
        .ok_or_else(|| gone(&self.endpoints))?
        .map_err(self.error("reading the servers' records"))?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let server = std::str::from_utf8(kv.key().strip_prefix(prefix.as_bytes())?).ok()?;
                Some((server.to_owned(), kv.value().to_vec()))
            })
            .collect())
    }
}

/// Runs `future` on the client's runtime and waits for it from this
/// thread, whatever runtime it may belong to; `None` if the runtime is
/// gone.
fn run<T: Send + 'static>(
    runtime: Option<&tokio::runtime::Runtime>,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    runtime?.spawn(async move {
        let _ = reply.send(future.await);
    });
    answer.recv().ok()
}

/// Runs `request` again (a bounded number of times) while it fails in a
/// way `again` says is worth another try: the client spreads requests over
/// the members, and one that is down refuses the connection until the
/// client stops choosing it. Writes are repeated only when they never
/// reached etcd ([`not_sent`]).
async fn retrying<T, F>(
    again: fn(&etcd_client::Error) -> bool,
    mut request: impl FnMut() -> F,
) -> Result<T, etcd_client::Error>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        match request().await {
            Err(e) if tries < RETRIES && again(&e) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// How many times a request that was not sent is tried again.
const RETRIES: usize = 20;

/// Whether `e` says the cluster could not answer now (no connection, no
/// leader, a leader changing): a read can simply be made again.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// Whether `e` says the request never reached a member (no connection).
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable && status.message().contains("connect")
        }
        _ => false,
    }
}

fn gone(endpoints: &str) -> BackendError {
    BackendError::Invalid {
        endpoints: endpoints.to_owned(),
        what: "the etcd client stopped".into(),
    }
}
