//! The config store: every object the server serves, validated by the
//! policy engine's loader and persisted in an embedded database (redb) in
//! the data directory, so applied configuration survives restarts.
//!
//! A write is all or nothing: a text with any invalid document changes
//! nothing, and the error is the one `meshward validate` prints. Each object
//! keeps the `creationTimestamp` of its first write (PeerAuthentication's
//! oldest-wins depends on it); writes that change nothing are not versions.
//!
//! Every object has one owner, recorded beside it ([`Owner`]): the config
//! API, or the file of the watched directory that defines it. The
//! directory owns what it defines: a file's objects change when the file
//! does (also an object the API wrote before: the file takes it over), and
//! while the directory is watched the API may neither write nor delete
//! them. The directory is put in force file by file, each whole or not at
//! all ([`Store::sync_directory`]); it never touches the API's own objects.
//! Where a workload runs is not its owner's to say but its runner's
//! (`meshward up`): [`Store::place`] lays an address and ports over a
//! WorkloadEntry, whoever owns it.
//!
//! Beside the objects: the revocation list (`meshward revoke`), each write a
//! version like any other, published to the CA as it commits; and the ids
//! of single-use bootstrap tokens already used, so no restart makes one
//! usable again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use meshward_api::resources::{Revocation, RevocationKind};
use meshward_identity::revocation::{self, RevocationList, Revocations};
use meshward_identity::service::TokenLedger;
use meshward_policy::api::{MeshConfig, Policy, RegistryObject};
use meshward_policy::load::{self, Loaded};
use serde::{Deserialize, Serialize};

pub mod backend;
pub mod etcd;
pub mod redb;

use backend::{Backend, BackendError, META, OBJECTS, REVOCATIONS, SPENT_TOKENS, Tables};
/// Expired single-use token records removed by each spend, at most.
const PRUNED_PER_SPEND: usize = 32;
/// A revocation's reason is for people: one line, this long at most.
const MAX_REASON: usize = 512;

/// The annotation `meshward get` shows an object's [`Owner`] in: `api`, or
/// `file:PATH`. The store sets it; one in a written object is dropped, as
/// its `creationTimestamp` is replaced.
pub const SOURCE_ANNOTATION: &str = "meshward.io/source";

/// The annotation `meshward get` marks a placed WorkloadEntry with
/// ([`Store::place`]): its `spec.address` and `spec.ports` are where the
/// process running it put it, not what its owner wrote.
pub const PLACEMENT_ANNOTATION: &str = "meshward.io/placement";
const PLACED: &str =
    "spec.address and spec.ports set by the process running the workload (meshward up)";

/// Where a workload runs, as the process running it chose: the address
/// and ports laid over its WorkloadEntry, whoever owns the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    address: String,
    ports: BTreeMap<String, u32>,
}

impl Placement {
    /// Lays the placement over a WorkloadEntry's JSON.
    fn lay_over(&self, object: &mut serde_json::Value) {
        if let Some(spec) = object.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.insert("address".into(), self.address.clone().into());
            spec.insert("ports".into(), serde_json::json!(self.ports));
        }
    }
}

/// Who owns an object, and so the one way it changes: through the config
/// API, or by editing the file of the watched directory that defines it.
/// Stored as `api` or `file:PATH`, the annotation's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Owner {
    /// Written through the config API (`meshward apply`).
    Api,
    /// Defined by this file of the watched directory, named as the loader
    /// names it in diagnostics. Empty for an object read from the directory
    /// by a meshward that did not record files (stored as `directory`): the
    /// next directory sync gives it its file, or deletes it.
    File(String),
}

impl Owner {
    /// The file that defines the object, if one is known.
    fn file(&self) -> Option<&str> {
        match self {
            Owner::File(path) if !path.is_empty() => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Api => f.write_str("api"),
            Owner::File(path) => write!(f, "file:{path}"),
        }
    }
}

impl From<Owner> for String {
    fn from(owner: Owner) -> String {
        owner.to_string()
    }
}

impl From<String> for Owner {
    fn from(stored: String) -> Owner {
        match stored.strip_prefix("file:") {
            Some(path) => Owner::File(path.to_owned()),
            None if stored == "directory" => Owner::File(String::new()),
            None => Owner::Api,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// Named `source` since the first stores.
    #[serde(rename = "source")]
    owner: Owner,
    object: serde_json::Value,
}

/// Why a write was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// Objects that files of the watched directory define: they change
    /// there. One line per object, naming its file.
    #[error("{}", .0.join("\n"))]
    Owned(Vec<String>),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl StoreError {
    /// Whether the store could not be opened because another process has
    /// it open (redb locks the file for one process at a time).
    pub fn is_in_use(&self) -> bool {
        matches!(self, StoreError::Backend(e) if redb::is_in_use(e))
    }
}

/// What a write did to one object, as `kubectl apply` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    /// `created`, `configured`, `unchanged` or `deleted` (`placed` by
    /// [`Store::place`]).
    pub action: &'static str,
}

/// What putting the watched directory in force did.
#[derive(Debug, Default)]
pub struct DirectorySync {
    /// Each object the files define or defined, as `kubectl apply` says it.
    pub changes: Vec<Change>,
    /// Objects the API had written that a file defines now, as `(key,
    /// file)`: the file's from this sync on, so each is reported once.
    pub taken_over: Vec<(String, String)>,
    /// The files not put in force, each with why (the loader's
    /// diagnostics, or the other files that define its objects too). Their
    /// objects keep their last good version.
    pub refused: BTreeMap<String, Vec<String>>,
}

impl DirectorySync {
    /// How many objects changed.
    pub fn changed(&self) -> usize {
        self.changes
            .iter()
            .filter(|c| c.action != "unchanged")
            .count()
    }
}

/// Everything in the store, typed: what push and describe work from.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub version: u64,
    pub mesh: MeshConfig,
    pub policies: Vec<Policy>,
    pub registry: Vec<RegistryObject>,
    /// By kind, then value.
    pub revocations: Vec<Revocation>,
}

pub struct Store {
    backend: Box<dyn Backend>,
    current: RwLock<Arc<Config>>,
    /// The revocation list of `current`, for the CA.
    revoked: Revocations,
    /// Held from a write's start to its reload, so the configuration in
    /// force is always one committed state with its own version.
    writing: std::sync::Mutex<()>,
    /// Held through each reload (after writes here, and for other
    /// servers' commits): one state is read and put in force at a time.
    reloading: std::sync::Mutex<()>,
    /// Set by the first directory sync: from then on every file owner in
    /// the store is a file of the watched directory, and the API may not
    /// change those objects. Without a watched directory (a server started
    /// without `--config-dir` on a store that had one), nothing would put
    /// them right, so the API may take them over.
    directory_in_force: AtomicBool,
    /// WorkloadEntry key → where its workload runs. In memory only: it
    /// describes processes of this run, and their runner places them again
    /// at every start.
    placements: RwLock<BTreeMap<String, Placement>>,
    /// This server's lasting id among the servers of a shared store: it
    /// names this server's record and its directory's files.
    server_id: Option<String>,
}

/// One more version: every write that changes something is one.
fn bump_version(tables: &mut Tables) {
    let meta = tables.entry(META.to_owned()).or_default();
    let version = meta
        .get("version")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    meta.insert("version".into(), (version + 1).to_string());
}

/// The stored object at `key` of the objects table, if any (and readable).
fn stored(table: &BTreeMap<String, String>, key: &str) -> Option<Stored> {
    serde_json::from_str(table.get(key)?).ok()
}

/// Writes `object` at `key` as `owner`'s, keeping the creation time of
/// `previous`; returns what that did (`unchanged`: nothing written).
fn put(
    table: &mut BTreeMap<String, String>,
    key: &str,
    mut object: serde_json::Value,
    previous: Option<&Stored>,
    owner: &Owner,
    now: &str,
) -> &'static str {
    let created = previous
        .and_then(|p| p.object.pointer("/metadata/creationTimestamp").cloned())
        .unwrap_or_else(|| serde_json::Value::String(now.to_owned()));
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.insert("creationTimestamp".into(), created);
        // Owner and placement are the store's to say.
        if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            annotations.remove(SOURCE_ANNOTATION);
            annotations.remove(PLACEMENT_ANNOTATION);
            if annotations.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    let action = match previous {
        None => "created",
        Some(p)
            if p.owner == *owner
                && without_timestamp(p.object.clone()) == without_timestamp(object.clone()) =>
        {
            "unchanged"
        }
        Some(_) => "configured",
    };
    if action != "unchanged" {
        let stored = Stored {
            owner: owner.clone(),
            object,
        };
        table.insert(
            key.to_owned(),
            serde_json::to_string(&stored).unwrap_or_default(),
        );
    }
    action
}

/// The kind as stored (`authorizationpolicy` → `AuthorizationPolicy`).
fn canonical_kind(kind: &str) -> &str {
    const KINDS: [&str; 8] = [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "WorkloadEntry",
        "ServiceEntry",
        "DestinationRule",
        "Gateway",
        "VirtualService",
    ];
    KINDS
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(kind))
        .unwrap_or(kind)
}

fn key_of(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// `Kind namespace/name`, as diagnostics name an object.
fn display_key(key: &str) -> String {
    match key.split_once('/') {
        Some((kind, rest)) => format!("{kind} {rest}"),
        None => key.to_owned(),
    }
}

/// Every valid object of a load, with its key and JSON.
fn objects_of(loaded: &Loaded) -> Vec<(String, serde_json::Value)> {
    let policies = loaded.policies.iter().map(|p| {
        let meta = p.policy.metadata();
        (
            key_of(
                p.policy.kind().as_str(),
                meta.namespace_or_default(),
                &meta.name,
            ),
            serde_json::to_value(&p.policy),
        )
    });
    let registry = loaded.registry.iter().map(|r| {
        let meta = r.metadata();
        (
            key_of(r.kind(), meta.namespace_or_default(), &meta.name),
            serde_json::to_value(r),
        )
    });
    policies
        .chain(registry)
        .filter_map(|(k, v)| Some((k, v.ok()?)))
        .collect()
}

/// Refuses each file defining an object another file defines too (in
/// `definers`: key → the files defining it), except the one whose
/// definition is in force, when one is: its definition stays.
fn refuse_duplicates(
    definers: &BTreeMap<&str, Vec<&str>>,
    stored: &BTreeMap<String, Stored>,
    refused: &mut BTreeMap<String, Vec<String>>,
) {
    for (key, files) in definers.iter().filter(|(_, files)| files.len() > 1) {
        let previous = stored.get(*key);
        let holder = previous
            .and_then(|s| s.owner.file())
            .filter(|f| files.contains(f));
        let outcome = match (holder, previous.map(|s| &s.owner)) {
            (Some(file), _) => format!("the definition in {file} stays"),
            (None, Some(Owner::Api)) => "the object the API wrote stays".to_owned(),
            (None, _) => "none is put in force".to_owned(),
        };
        for file in files.iter().filter(|f| Some(**f) != holder) {
            let others: Vec<&str> = files.iter().copied().filter(|o| o != file).collect();
            refused.entry((*file).to_owned()).or_default().push(format!(
                "{file}: error: {}: also defined by {}; {outcome}: remove it from all but one file",
                display_key(key),
                others.join(", "),
            ));
        }
    }
}

/// The object as `get` shows it: as in force (placed, if it is), with its
/// owner in [`SOURCE_ANNOTATION`] and its placement marked.
fn shown(stored: Stored, placement: Option<&Placement>) -> serde_json::Value {
    let Stored { owner, mut object } = stored;
    if let Some(placement) = placement {
        placement.lay_over(&mut object);
    }
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut())
        && let Some(annotations) = meta
            .entry("annotations")
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()))
            .as_object_mut()
    {
        annotations.insert(SOURCE_ANNOTATION.into(), owner.to_string().into());
        if placement.is_some() {
            annotations.insert(PLACEMENT_ANNOTATION.into(), PLACED.into());
        }
    }
    object
}

/// The object without its creation time, for telling real changes.
fn without_timestamp(mut object: serde_json::Value) -> serde_json::Value {
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("creationTimestamp");
    }
    object
}

impl Store {
    /// Opens (or creates) the embedded store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::new(Box::new(redb::Redb::open(path)?))
    }

    /// The store kept by `backend`.
    pub fn new(backend: Box<dyn Backend>) -> Result<Store, StoreError> {
        let store = Store {
            backend,
            current: RwLock::new(Arc::default()),
            revoked: Revocations::new(),
            writing: std::sync::Mutex::new(()),
            reloading: std::sync::Mutex::new(()),
            directory_in_force: AtomicBool::new(false),
            placements: RwLock::default(),
            server_id: None,
        };
        store.reload()?;
        Ok(store)
    }

    /// Where the store keeps its data, for messages.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// For a store other servers write too (etcd): changes whenever one
    /// of them committed; [`Store::reload`] then puts it in force here.
    pub fn remote_changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        self.backend.changes()
    }

    /// This store, as seen by the server `id` among those sharing it.
    pub fn with_server_id(mut self, id: String) -> Store {
        self.server_id = Some(id);
        self
    }

    /// The id [`Store::with_server_id`] gave this server.
    pub fn server_id(&self) -> Option<&str> {
        self.server_id.as_deref()
    }

    /// Whether other servers share this store.
    pub fn is_shared(&self) -> bool {
        self.backend.changes().is_some()
    }

    /// Records this server's own record (its proxies) in a shared store,
    /// for as long as it lives.
    pub fn announce(&self, server: &str, record: Vec<u8>) -> Result<(), StoreError> {
        Ok(self.backend.announce(server, record)?)
    }

    /// The value shared under `name` by every server of a shared store.
    pub fn shared(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.backend.shared(name)?)
    }

    /// Shares `value` under `name` unless a value is shared there already;
    /// whether this call did.
    pub fn share_once(&self, name: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        Ok(self.backend.share_once(name, value)?)
    }

    /// Every live server's record, by server (none for an unshared store).
    pub fn announced(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        Ok(self.backend.announced()?)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `change` through the backend (see [`backend::Change`]) and
    /// returns what its last run reported.
    fn update<R>(
        &self,
        mut change: impl FnMut(&mut Tables) -> Result<(R, bool), StoreError>,
    ) -> Result<R, StoreError> {
        let mut out = None;
        self.backend.update(&mut |tables| {
            let (reported, commit) = change(tables)?;
            out = Some(reported);
            Ok(commit)
        })?;
        out.ok_or_else(|| {
            StoreError::Invalid(vec![format!(
                "the store in {} committed without running the change",
                self.describe()
            )])
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Validates every document of `text` and writes them all, or none.
    /// Objects that files of the watched directory define are refused
    /// ([`StoreError::Owned`]), and then nothing is written.
    pub fn apply(&self, file: &str, text: &str) -> Result<Vec<Change>, StoreError> {
        let loaded = load::load_str(file, text);
        let errors = loaded.errors();
        if !errors.is_empty() {
            return Err(StoreError::Invalid(errors));
        }
        let objects = objects_of(&loaded);
        let _writing = self.lock_writes();
        let now = jiff::Timestamp::now().to_string();
        let changes = self.update(|tables| {
            let table = tables.entry(OBJECTS.to_owned()).or_default();
            let owned: Vec<String> = objects
                .iter()
                .filter_map(|(key, _)| self.owned_by_file(key, stored(table, key).as_ref()))
                .collect();
            if !owned.is_empty() {
                return Err(StoreError::Owned(owned));
            }
            let mut changes = Vec::new();
            for (key, object) in &objects {
                let previous = stored(table, key);
                let action = put(
                    table,
                    key,
                    object.clone(),
                    previous.as_ref(),
                    &Owner::Api,
                    &now,
                );
                changes.push(Change {
                    key: key.clone(),
                    action,
                });
            }
            let changed = changes.iter().any(|c| c.action != "unchanged");
            if changed {
                bump_version(tables);
            }
            Ok((changes, changed))
        })?;
        self.reload()?;
        Ok(changes)
    }

    /// Puts the watched directory's files in force, each whole or not at
    /// all, in one version. `files` are every file of the directory as read
    /// now (path as the loader names it, and what it loaded).
    ///
    /// A file with any error is refused, and so is a file defining an
    /// object another file defines too (the one whose definition is in
    /// force keeps it; when neither's is, both are refused). A refused
    /// file's objects keep their last good version. Every other file's
    /// objects are written as that file's, taking over objects the API
    /// wrote; objects of files no longer in the directory, or no longer in
    /// their file, are deleted. Objects the API owns are never touched.
    pub fn sync_directory(&self, files: &[(String, Loaded)]) -> Result<DirectorySync, StoreError> {
        self.sync_directory_under("", files)
    }

    /// [`Store::sync_directory`] for the directory whose files' names start
    /// with `root`, in a store other servers' directories write too (etcd):
    /// objects of files outside it are another server's, never deleted
    /// here, and a file here defining one of them is refused.
    pub fn sync_directory_under(
        &self,
        root: &str,
        files: &[(String, Loaded)],
    ) -> Result<DirectorySync, StoreError> {
        let foreign = |s: &Stored| s.owner.file().is_some_and(|f| !f.starts_with(root));
        let _writing = self.lock_writes();
        let now = jiff::Timestamp::now().to_string();
        let report = self.update(|tables| {
            let mut report = DirectorySync::default();
            let table = tables.entry(OBJECTS.to_owned()).or_default();
            let stored: BTreeMap<String, Stored> = table
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), serde_json::from_str(v).ok()?)))
                .collect();
            let mut refused: BTreeMap<String, Vec<String>> = files
                .iter()
                .filter(|(_, loaded)| loaded.has_errors())
                .map(|(file, loaded)| (file.clone(), loaded.errors()))
                .collect();
            // Each loaded file's objects; in a file defining one twice, the
            // last definition wins, as in an API apply.
            let loaded: Vec<(&str, BTreeMap<String, serde_json::Value>)> = files
                .iter()
                .filter(|(file, _)| !refused.contains_key(file))
                .map(|(file, loaded)| (file.as_str(), objects_of(loaded).into_iter().collect()))
                .collect();
            // Who defines each object: the loaded files, and the files that
            // did not load for what they hold (they may still define it).
            let mut definers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (file, objects) in &loaded {
                for key in objects.keys() {
                    definers.entry(key).or_default().push(file);
                }
            }
            for (key, s) in &stored {
                if let Some(file) = s.owner.file()
                    && refused.contains_key(file)
                {
                    definers.entry(key).or_default().push(file);
                }
            }
            refuse_duplicates(&definers, &stored, &mut refused);
            for (file, objects) in &loaded {
                for key in objects.keys() {
                    if let Some(other) = stored.get(key).filter(|s| foreign(s)) {
                        refused.entry((*file).to_owned()).or_default().push(format!(
                            "{file}: error: {}: defined by {} of another server's directory; \
                             remove it from one of them",
                            display_key(key),
                            other.owner
                        ));
                    }
                }
            }
            let mut defined = BTreeSet::new();
            for (file, objects) in &loaded {
                if refused.contains_key(*file) {
                    continue;
                }
                let owner = Owner::File((*file).to_owned());
                for (key, object) in objects {
                    let previous = stored.get(key);
                    let action = put(table, key, object.clone(), previous, &owner, &now);
                    if previous.is_some_and(|p| p.owner == Owner::Api) {
                        report.taken_over.push((key.clone(), (*file).to_owned()));
                    }
                    defined.insert(key.clone());
                    report.changes.push(Change {
                        key: key.clone(),
                        action,
                    });
                }
            }
            for (key, s) in &stored {
                let gone = match &s.owner {
                    Owner::Api => false,
                    _ if foreign(s) => false,
                    Owner::File(file) => !refused.contains_key(file) && !defined.contains(key),
                };
                if gone {
                    table.remove(key);
                    report.changes.push(Change {
                        key: key.clone(),
                        action: "deleted",
                    });
                }
            }
            let changed = report.changed() > 0;
            if changed {
                bump_version(tables);
            }
            report.refused = refused;
            Ok((report, changed))
        })?;
        self.directory_in_force.store(true, Ordering::Release);
        self.reload()?;
        Ok(report)
    }

    /// Why the API may not change the object at `key`: a file of the
    /// watched directory defines it.
    fn owned_by_file(&self, key: &str, stored: Option<&Stored>) -> Option<String> {
        let file = stored?.owner.file()?;
        // In a shared store another server's directory may own it.
        let watched = self.directory_in_force.load(Ordering::Acquire) || self.is_shared();
        watched.then(|| {
            format!(
                "{} is defined by {file}: edit or remove it there",
                display_key(key)
            )
        })
    }

    /// Places workloads: each WorkloadEntry of `text` says where the
    /// process running it (`meshward up`) put it, and only its
    /// `spec.address` and `spec.ports` are taken, laid over the entry of
    /// that name whoever owns it (a file of the watched directory, which
    /// the API may not write, included), now or once it exists. Any other
    /// kind is refused. A placement is kept in memory until the server
    /// stops: it describes processes of this run.
    pub fn place(&self, file: &str, text: &str) -> Result<Vec<Change>, StoreError> {
        let loaded = load::load_str(file, text);
        let mut errors = loaded.errors();
        errors.extend(loaded.policies.iter().map(|p| {
            format!(
                "{}: {}: only WorkloadEntries are placed",
                p.location,
                p.policy.display_name()
            )
        }));
        let mut incoming = Vec::new();
        for object in &loaded.registry {
            let meta = object.metadata();
            let key = key_of(object.kind(), meta.namespace_or_default(), &meta.name);
            match object {
                RegistryObject::WorkloadEntry(entry) => incoming.push((
                    key,
                    Placement {
                        address: entry.spec.address.clone(),
                        ports: entry.spec.ports.clone(),
                    },
                )),
                _ => errors.push(format!(
                    "{file}: {}: only WorkloadEntries are placed",
                    display_key(&key)
                )),
            }
        }
        if !errors.is_empty() {
            return Err(StoreError::Invalid(errors));
        }
        let _writing = self.lock_writes();
        let mut placements = self.placements();
        let mut changes = Vec::new();
        for (key, placement) in incoming {
            let action = if placements.get(&key) == Some(&placement) {
                "unchanged"
            } else {
                "placed"
            };
            placements.insert(key.clone(), placement);
            changes.push(Change { key, action });
        }
        if changes.iter().any(|c| c.action != "unchanged") {
            // In place before the version that announces them, so that any
            // reload of that version lays them over (and back if it fails).
            let before = std::mem::replace(
                &mut *self
                    .placements
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                placements,
            );
            let bumped = self.update(|tables| {
                bump_version(tables);
                Ok(((), true))
            });
            if let Err(e) = bumped {
                *self
                    .placements
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = before;
                return Err(e);
            }
            self.reload()?;
        }
        Ok(changes)
    }

    fn placements(&self) -> BTreeMap<String, Placement> {
        self.placements
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the MeshConfig (YAML, or Istio's `istio` ConfigMap) after
    /// checking it loads.
    pub fn set_mesh_config(&self, file: &str, text: &str) -> Result<(), StoreError> {
        load::load_mesh_config(file, text).map_err(|d| StoreError::Invalid(vec![d.to_string()]))?;
        let _writing = self.lock_writes();
        self.update(|tables| {
            let meta = tables.entry(META.to_owned()).or_default();
            if meta.get("mesh").is_some_and(|m| m == text) {
                return Ok(((), false));
            }
            meta.insert("mesh".into(), text.to_owned());
            bump_version(tables);
            Ok(((), true))
        })?;
        self.reload()
    }

    /// Deletes one object; `false` if there was none. An object a file of
    /// the watched directory defines is refused ([`StoreError::Owned`]).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let kind = canonical_kind(kind);
        let key = key_of(kind, namespace, name);
        let _writing = self.lock_writes();
        let existed = self.update(|tables| {
            let table = tables.entry(OBJECTS.to_owned()).or_default();
            if let Some(why) = self.owned_by_file(&key, stored(table, &key).as_ref()) {
                return Err(StoreError::Owned(vec![why]));
            }
            let existed = table.remove(&key).is_some();
            if existed {
                bump_version(tables);
            }
            Ok((existed, existed))
        })?;
        self.reload()?;
        Ok(existed)
    }

    /// Objects of `kind` (all kinds when empty), in `namespace` (all when
    /// `None`), named `name` (all when `None`), as stored, each with its
    /// owner in the annotation [`SOURCE_ANNOTATION`].
    pub fn get(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let tables = self.backend.read()?;
        let placements = self.placements();
        let mut out = Vec::new();
        for (key, value) in tables.get(OBJECTS).into_iter().flatten() {
            let mut parts = key.splitn(3, '/');
            let (Some(k_kind), Some(k_ns), Some(k_name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let wanted = (kind.is_empty() || k_kind.eq_ignore_ascii_case(kind))
                && namespace.is_none_or(|ns| ns == k_ns)
                && name.is_none_or(|n| n == k_name);
            if wanted && let Ok(stored) = serde_json::from_str::<Stored>(value) {
                out.push(shown(stored, placements.get(key)));
            }
        }
        Ok(out)
    }

    /// The revocation list in force, kept current by every write.
    pub fn revocations(&self) -> Revocations {
        self.revoked.clone()
    }

    /// Adds `value` of `kind` to the revocation list. Returns the entry and
    /// whether it is new; revoking again keeps the first entry (its time
    /// and reason).
    pub fn revoke(
        &self,
        kind: RevocationKind,
        value: &str,
        reason: &str,
    ) -> Result<(Revocation, bool), StoreError> {
        let value = revocation::canonical(kind, value)
            .map_err(|e| StoreError::Invalid(vec![e.to_string()]))?;
        let reason = reason.trim();
        if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(StoreError::Invalid(vec![format!(
                "the reason must be one line of at most {MAX_REASON} characters"
            )]));
        }
        let key = format!("{}/{value}", kind.as_str());
        let _writing = self.lock_writes();
        let revoked_at = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let outcome = self.update(|tables| {
            let table = tables.entry(REVOCATIONS.to_owned()).or_default();
            if let Some(entry) = table
                .get(&key)
                .and_then(|v| serde_json::from_str::<Revocation>(v).ok())
            {
                return Ok(((entry, false), false));
            }
            let entry = Revocation {
                kind,
                value: value.clone(),
                reason: reason.to_owned(),
                revoked_at: revoked_at.clone(),
            };
            table.insert(
                key.clone(),
                serde_json::to_string(&entry).unwrap_or_default(),
            );
            bump_version(tables);
            Ok(((entry, true), true))
        })?;
        self.reload()?;
        Ok(outcome)
    }

    /// Re-reads everything into the typed [`Config`]: after each write, and
    /// when another server changed a shared store. Stored objects were
    /// valid when written; one that no longer loads (a newer meshward
    /// stored it) is skipped with a warning rather than taking the rest down.
    pub fn reload(&self) -> Result<(), StoreError> {
        let _reloading = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tables = self.backend.read()?;
        let placements = self.placements();
        let mut objects = Vec::new();
        for (key, value) in tables.get(OBJECTS).into_iter().flatten() {
            if let Ok(mut stored) = serde_json::from_str::<Stored>(value) {
                if let Some(placement) = placements.get(key) {
                    placement.lay_over(&mut stored.object);
                }
                objects.push(stored.object);
            }
        }
        let meta = tables.get(META);
        let version = meta
            .and_then(|m| m.get("version"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Versions only grow: a reload that read before a newer one put
        // its state in force (a shared store's watch racing a write here)
        // leaves the newer in force.
        if version < self.config().version {
            return Ok(());
        }
        let mesh = meta.and_then(|m| m.get("mesh"));
        let mut revocations = Vec::new();
        for value in tables
            .get(REVOCATIONS)
            .into_iter()
            .flatten()
            .map(|(_, v)| v)
        {
            match serde_json::from_str::<Revocation>(value) {
                Ok(r) => revocations.push(r),
                Err(e) => tracing::error!("a stored revocation no longer loads: {e}"),
            }
        }
        revocations.sort_by(|a, b| (a.kind, &a.value).cmp(&(b.kind, &b.value)));
        let mut config = Config {
            version,
            revocations,
            ..Config::default()
        };
        if let Some(text) = mesh {
            match load::load_mesh_config("mesh (stored)", text) {
                Ok(m) => config.mesh = m,
                Err(d) => tracing::warn!("the stored mesh config no longer loads: {d}"),
            }
        }
        for object in objects {
            let text = object.to_string();
            let loaded = load::load_str("store", &text);
            if loaded.has_errors() {
                tracing::warn!(diagnostics = ?loaded.diagnostics, "a stored object no longer loads");
            }
            config
                .policies
                .extend(loaded.policies.into_iter().map(|p| p.policy));
            config.registry.extend(loaded.registry);
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if config.version >= current.version {
            // Every entry was checked when written; should one not be now,
            // the list in force stays as it was rather than losing entries.
            match RevocationList::new(&config.revocations) {
                Ok(list) => {
                    self.revoked.replace(list);
                }
                Err(e) => tracing::error!(
                    "the stored revocation list no longer loads, keeping the previous one: {e}"
                ),
            }
            *current = Arc::new(config);
        }
        Ok(())
    }
}

/// Single-use tokens: the look and the mark are one change, which the
/// backend commits only over the state it looked at, so two uses cannot
/// both find the token unspent.
impl TokenLedger for Store {
    fn spend(&self, id: &str, expires: u64) -> Result<bool, String> {
        let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
        // A token that expired between its verification and now is not
        // spent: its record may already be gone (records are kept only
        // while a token can still verify), so spending it could succeed
        // twice.
        if now > expires {
            return Ok(false);
        }
        self.update(|tables| {
            let table = tables.entry(SPENT_TOKENS.to_owned()).or_default();
            if table.contains_key(id) {
                return Ok((false, false));
            }
            table.insert(id.to_owned(), expires.to_string());
            // Records of expired tokens are no longer needed; a few at a
            // time, so one change stays small (etcd bounds a transaction's
            // operations) however many expired since the last use.
            let expired: Vec<String> = table
                .iter()
                .filter(|(_, e)| e.parse::<u64>().map_or(true, |e| e < now))
                .map(|(k, _)| k.clone())
                .take(PRUNED_PER_SPEND)
                .collect();
            for key in expired {
                table.remove(&key);
            }
            Ok((true, true))
        })
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: web}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n";

    #[test]
    fn applied_objects_survive_a_restart_and_keep_their_creation_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = Store::open(&path).unwrap();
        let changes = store.apply("deny.yaml", DENY).unwrap();
        assert_eq!(changes[0].action, "created");
        let created = store
            .get("AuthorizationPolicy", Some("web"), Some("deny"))
            .unwrap()[0]["metadata"]["creationTimestamp"]
            .clone();
        assert!(created.is_string());
        assert_eq!(store.config().version, 1);
        assert_eq!(
            store.apply("deny.yaml", DENY).unwrap()[0].action,
            "unchanged"
        );
        assert_eq!(
            store.config().version,
            1,
            "an unchanged apply is not a version"
        );
        let changed = DENY.replace("/admin", "/root");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            store.apply("deny.yaml", &changed).unwrap()[0].action,
            "configured"
        );
        drop(store);

        let store = Store::open(&path).unwrap();
        let config = store.config();
        assert_eq!(config.version, 2);
        assert_eq!(config.policies.len(), 1);
        let again = store.get("authorizationpolicy", None, None).unwrap();
        assert_eq!(
            again[0]["metadata"]["creationTimestamp"], created,
            "kept on update"
        );
        assert_eq!(
            again[0]["spec"]["rules"][0]["to"][0]["operation"]["paths"][0],
            "/root"
        );
    }

    #[test]
    fn an_invalid_document_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store.apply("deny.yaml", DENY).unwrap();
        let bad = format!(
            "{DENY}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: web}}\nspec: {{action: NOPE}}\n"
        );
        let Err(StoreError::Invalid(errors)) = store.apply("bad.yaml", &bad) else {
            panic!("an invalid document was accepted");
        };
        assert!(
            errors[0].starts_with("bad.yaml:9: error: AuthorizationPolicy web/bad: spec.action"),
            "{errors:?}"
        );
        assert_eq!(store.get("", None, None).unwrap().len(), 1);
        assert_eq!(store.config().version, 1);
    }

    /// `(file, what it loads)`, as the watcher hands files to the store.
    fn file(name: &str, text: &str) -> (String, Loaded) {
        (name.to_owned(), load::load_str(name, text))
    }

    fn owner_of(store: &Store, name: &str) -> String {
        let got = store
            .get("AuthorizationPolicy", Some("web"), Some(name))
            .unwrap();
        got[0]["metadata"]["annotations"][SOURCE_ANNOTATION]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn path_of(store: &Store, name: &str) -> String {
        let got = store
            .get("AuthorizationPolicy", Some("web"), Some(name))
            .unwrap();
        got[0]["spec"]["rules"][0]["to"][0]["operation"]["paths"][0]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn policy(name: &str, path: &str) -> String {
        DENY.replace("name: deny", &format!("name: {name}"))
            .replace("/admin", path)
    }

    #[test]
    fn the_directory_owns_what_it_defines_and_never_touches_the_apis_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        store.apply("api.yaml", DENY).unwrap();
        store
            .apply("api-only.yaml", &policy("api-only", "/api"))
            .unwrap();
        assert_eq!(owner_of(&store, "deny"), "api");

        // A file defining an object the API wrote takes it over: its
        // content is in force, the file is its owner, and it is reported
        // once, in one version.
        let version = store.config().version;
        let dir_files = [file("/d/a.yaml", &policy("deny", "/from-file"))];
        let sync = store.sync_directory(&dir_files).unwrap();
        assert_eq!(
            sync.taken_over,
            [(
                "AuthorizationPolicy/web/deny".to_owned(),
                "/d/a.yaml".to_owned()
            )]
        );
        assert_eq!(sync.changed(), 1);
        assert!(sync.refused.is_empty(), "{:?}", sync.refused);
        assert_eq!(store.config().version, version + 1);
        assert_eq!(path_of(&store, "deny"), "/from-file");
        assert_eq!(owner_of(&store, "deny"), "file:/d/a.yaml");
        let again = store.sync_directory(&dir_files).unwrap();
        assert!(again.taken_over.is_empty(), "reported once");
        assert_eq!(again.changed(), 0);
        assert_eq!(store.config().version, version + 1, "no change, no version");

        // Editing the file changes the object.
        let edited = [file("/d/a.yaml", &policy("deny", "/edited"))];
        assert_eq!(store.sync_directory(&edited).unwrap().changed(), 1);
        assert_eq!(path_of(&store, "deny"), "/edited");

        // The API may neither write nor delete it, and is told where it is;
        // an apply holding it writes nothing at all.
        let both = format!("{}---\n{}", policy("new", "/new"), policy("deny", "/api"));
        let Err(StoreError::Owned(why)) = store.apply("api.yaml", &both) else {
            panic!("the API wrote a file's object");
        };
        assert_eq!(
            why,
            ["AuthorizationPolicy web/deny is defined by /d/a.yaml: edit or remove it there"]
        );
        let Err(StoreError::Owned(why)) = store.delete("authorizationpolicy", "web", "deny") else {
            panic!("the API deleted a file's object");
        };
        assert_eq!(
            why,
            ["AuthorizationPolicy web/deny is defined by /d/a.yaml: edit or remove it there"]
        );
        assert_eq!(path_of(&store, "deny"), "/edited");
        assert!(store.get("", Some("web"), Some("new")).unwrap().is_empty());

        // The API's own objects: untouched by every sync, and by an empty
        // directory, which deletes only the file's objects.
        assert_eq!(owner_of(&store, "api-only"), "api");
        let emptied = store.sync_directory(&[]).unwrap();
        assert_eq!(
            emptied.changes,
            [Change {
                key: "AuthorizationPolicy/web/deny".into(),
                action: "deleted"
            }]
        );
        assert_eq!(path_of(&store, "api-only"), "/api");
        // Now no file defines it: the API may write it again.
        assert_eq!(store.apply("api.yaml", DENY).unwrap()[0].action, "created");
        assert_eq!(owner_of(&store, "deny"), "api");
    }

    #[test]
    fn owners_persist_and_a_store_without_a_watched_directory_lets_the_api_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        store.sync_directory(&[file("/d/a.yaml", DENY)]).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(owner_of(&store, "deny"), "file:/d/a.yaml", "kept in redb");
        // No directory is watched in this run (a server without
        // --config-dir): nothing would ever sync the file, so the object
        // is not held for it.
        assert_eq!(
            store.apply("api.yaml", &policy("deny", "/api")).unwrap()[0].action,
            "configured"
        );
        assert_eq!(owner_of(&store, "deny"), "api");
    }

    #[test]
    fn the_owner_annotation_is_the_stores_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store.apply("api.yaml", DENY).unwrap();
        // What `get` shows applies back unchanged ...
        let shown = store
            .get("AuthorizationPolicy", Some("web"), Some("deny"))
            .unwrap();
        let text = serde_json::to_string(&shown[0]).unwrap();
        assert_eq!(
            store.apply("got.json", &text).unwrap()[0].action,
            "unchanged"
        );
        // ... and an owner written into an object is not taken from it.
        let claimed = DENY.replace(
            "namespace: web}",
            "namespace: web, annotations: {meshward.io/source: 'file:/etc/x.yaml', team: a}}",
        );
        assert_eq!(
            store.apply("claim.yaml", &claimed).unwrap()[0].action,
            "configured"
        );
        let got = store
            .get("AuthorizationPolicy", Some("web"), Some("deny"))
            .unwrap();
        assert_eq!(
            got[0]["metadata"]["annotations"],
            serde_json::json!({SOURCE_ANNOTATION: "api", "team": "a"})
        );
    }

    #[test]
    fn a_file_that_does_not_load_keeps_its_objects_while_the_others_apply() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store
            .sync_directory(&[
                file("/d/a.yaml", DENY),
                file("/d/b.yaml", &policy("other", "/b")),
            ])
            .unwrap();
        let version = store.config().version;

        // a.yaml breaks (one document valid and new, one not): none of it
        // is taken, its object keeps its last good version, and b.yaml's
        // edit applies, in one version.
        let broken = format!(
            "{}---\n{}",
            policy("also-a", "/a2"),
            DENY.replace("/admin", "/changed").replace("DENY", "NOPE")
        );
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", &broken),
                file("/d/b.yaml", &policy("other", "/b-edited")),
            ])
            .unwrap();
        assert_eq!(sync.changed(), 1);
        assert_eq!(store.config().version, version + 1);
        assert_eq!(path_of(&store, "other"), "/b-edited");
        assert_eq!(path_of(&store, "deny"), "/admin", "the last good version");
        assert!(
            store
                .get("", Some("web"), Some("also-a"))
                .unwrap()
                .is_empty()
        );
        let errors = &sync.refused["/d/a.yaml"];
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("/d/a.yaml:9: error: AuthorizationPolicy web/deny: spec.action"),
            "{errors:?}"
        );
        // A file that does not parse at all: the same.
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", "kind: [\n"),
                file("/d/b.yaml", &policy("other", "/b")),
            ])
            .unwrap();
        assert!(
            sync.refused["/d/a.yaml"][0].starts_with("/d/a.yaml:"),
            "{:?}",
            sync.refused
        );
        assert_eq!(path_of(&store, "deny"), "/admin");
        assert_eq!(path_of(&store, "other"), "/b");

        // Fixed, it applies whole.
        let fixed = format!(
            "{}---\n{}",
            policy("also-a", "/a2"),
            policy("deny", "/fixed")
        );
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", &fixed),
                file("/d/b.yaml", &policy("other", "/b")),
            ])
            .unwrap();
        assert!(sync.refused.is_empty());
        assert_eq!(path_of(&store, "deny"), "/fixed");
        assert_eq!(path_of(&store, "also-a"), "/a2");
    }

    #[test]
    fn two_files_defining_one_object_are_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store.sync_directory(&[file("/d/a.yaml", DENY)]).unwrap();
        let version = store.config().version;

        // b.yaml defines a.yaml's object too: b.yaml is refused whole (its
        // own new object too), a.yaml's definition stays.
        let b = format!("{}---\n{}", policy("b-only", "/b"), policy("deny", "/b"));
        let sync = store
            .sync_directory(&[file("/d/a.yaml", DENY), file("/d/b.yaml", &b)])
            .unwrap();
        assert_eq!(
            sync.refused["/d/b.yaml"],
            [
                "/d/b.yaml: error: AuthorizationPolicy web/deny: also defined by /d/a.yaml; the definition in /d/a.yaml stays: remove it from all but one file"
            ]
        );
        assert!(!sync.refused.contains_key("/d/a.yaml"));
        assert_eq!(sync.changed(), 0);
        assert_eq!(store.config().version, version);
        assert_eq!(path_of(&store, "deny"), "/admin");
        assert!(
            store
                .get("", Some("web"), Some("b-only"))
                .unwrap()
                .is_empty()
        );

        // Two new definitions: neither is put in force.
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", DENY),
                file("/d/c.yaml", &policy("new", "/c")),
                file("/d/d.yaml", &policy("new", "/d")),
            ])
            .unwrap();
        assert_eq!(
            sync.refused["/d/c.yaml"],
            [
                "/d/c.yaml: error: AuthorizationPolicy web/new: also defined by /d/d.yaml; none is put in force: remove it from all but one file"
            ]
        );
        assert!(sync.refused["/d/d.yaml"][0].contains("also defined by /d/c.yaml"));
        assert!(store.get("", Some("web"), Some("new")).unwrap().is_empty());

        // A file that does not load still holds its objects: another file
        // defining one of them is refused too.
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", "kind: [\n"),
                file("/d/b.yaml", &policy("deny", "/b")),
            ])
            .unwrap();
        assert!(sync.refused.contains_key("/d/a.yaml"));
        assert!(
            sync.refused["/d/b.yaml"][0]
                .contains("also defined by /d/a.yaml; the definition in /d/a.yaml stays"),
            "{:?}",
            sync.refused
        );
        assert_eq!(path_of(&store, "deny"), "/admin");

        // Moved from one file to another in one edit: the object follows.
        let sync = store
            .sync_directory(&[
                file("/d/a.yaml", &policy("a-now", "/a")),
                file("/d/b.yaml", &policy("deny", "/b")),
            ])
            .unwrap();
        assert!(sync.refused.is_empty(), "{:?}", sync.refused);
        assert_eq!(owner_of(&store, "deny"), "file:/d/b.yaml");
        assert_eq!(path_of(&store, "deny"), "/b");
    }

    #[test]
    fn objects_a_store_read_from_the_directory_before_owners_were_recorded_get_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        // As an older meshward wrote them.
        store
            .backend
            .update(&mut |tables| {
                let table = tables.entry(OBJECTS.to_owned()).or_default();
                for name in ["deny", "gone"] {
                    let object: serde_json::Value = serde_json::to_value(
                        &load::load_str("x", &policy(name, "/old")).policies[0].policy,
                    )
                    .unwrap();
                    let json = serde_json::json!({"source": "directory", "object": object});
                    table.insert(format!("AuthorizationPolicy/web/{name}"), json.to_string());
                }
                Ok(true)
            })
            .unwrap();
        store.reload().unwrap();
        assert_eq!(store.config().policies.len(), 2);

        let sync = store
            .sync_directory(&[file("/d/a.yaml", &policy("deny", "/old"))])
            .unwrap();
        assert!(sync.taken_over.is_empty(), "the directory's already");
        assert_eq!(owner_of(&store, "deny"), "file:/d/a.yaml");
        assert!(store.get("", Some("web"), Some("gone")).unwrap().is_empty());
    }

    #[test]
    fn a_placement_lies_over_the_files_workload_entry_and_lives_as_long_as_the_server() {
        const ENTRY: &str = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: reviews, namespace: shop}\nspec: {serviceAccount: reviews, labels: {app: reviews, version: v1}, ports: {http: 9080}}\n";
        let placed = ENTRY
            .replace(
                "serviceAccount: reviews",
                "address: 127.0.0.1, serviceAccount: other",
            )
            .replace("9080", "40001");
        let entry = |store: &Store| {
            let config = store.config();
            let [RegistryObject::WorkloadEntry(we)] = &config.registry[..] else {
                panic!("{:?}", config.registry);
            };
            (
                we.spec.address.clone(),
                we.spec.ports["http"],
                we.spec.labels["version"].clone(),
                we.spec.service_account.clone(),
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();

        // Placed before the directory defines it: laid over once it does.
        assert_eq!(store.place("up", &placed).unwrap()[0].action, "placed");
        store.sync_directory(&[file("/d/w.yaml", ENTRY)]).unwrap();
        let in_force = (
            "127.0.0.1".to_owned(),
            40001,
            "v1".to_owned(),
            "reviews".to_owned(),
        );
        assert_eq!(entry(&store), in_force, "only address and ports are placed");
        let shown = &store.get("WorkloadEntry", None, None).unwrap()[0];
        assert_eq!(shown["spec"]["address"], "127.0.0.1");
        assert_eq!(
            shown["metadata"]["annotations"][SOURCE_ANNOTATION],
            "file:/d/w.yaml"
        );
        assert!(shown["metadata"]["annotations"][PLACEMENT_ANNOTATION].is_string());

        // Editing the file takes effect, still placed; placing again the
        // same is no version.
        store
            .sync_directory(&[file(
                "/d/w.yaml",
                &ENTRY.replace("version: v1", "version: v2"),
            )])
            .unwrap();
        assert_eq!(entry(&store).2, "v2");
        assert_eq!(entry(&store).0, "127.0.0.1");
        let version = store.config().version;
        assert_eq!(store.place("up", &placed).unwrap()[0].action, "unchanged");
        assert_eq!(store.config().version, version);

        // Only WorkloadEntries are placed.
        assert!(matches!(
            store.place("up", DENY),
            Err(StoreError::Invalid(_))
        ));
        drop(store);

        // Not kept across a restart: the runner places its workloads again.
        let store = Store::open(&path).unwrap();
        assert_eq!(entry(&store).0, "");
        assert_eq!(entry(&store).1, 9080);
    }

    #[test]
    fn revocations_persist_are_versions_and_reach_the_ca_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        let ca_view = store.revocations();
        let id = "spiffe://cluster.local/ns/web/sa/web";
        let (entry, created) = store
            .revoke(RevocationKind::Identity, id, "stolen laptop")
            .unwrap();
        assert!(created);
        assert_eq!(entry.value, id);
        assert_eq!(store.config().version, 1);
        let parsed = meshward_identity::SpiffeId::parse(id).unwrap();
        assert!(ca_view.current().check_identity(&parsed).is_err());
        // Again: the first entry stays, nothing changes.
        let (again, created) = store
            .revoke(RevocationKind::Identity, id, "other words")
            .unwrap();
        assert!(!created);
        assert_eq!(again, entry);
        assert_eq!(store.config().version, 1);
        // Serials are kept in one spelling.
        let (serial, _) = store.revoke(RevocationKind::Serial, "0A0B0C", "").unwrap();
        assert_eq!(serial.value, "0a:0b:0c");
        // Nonsense is refused and changes nothing.
        for (kind, value, reason) in [
            (RevocationKind::Identity, "web/web", ""),
            (RevocationKind::Serial, "xyz", ""),
            (RevocationKind::Token, "a b", ""),
            (RevocationKind::Token, "t", "two\nlines"),
        ] {
            assert!(
                matches!(
                    store.revoke(kind, value, reason),
                    Err(StoreError::Invalid(_))
                ),
                "{value:?} {reason:?}"
            );
        }
        assert_eq!(store.config().version, 2);
        drop(store);

        let store = Store::open(&path).unwrap();
        let config = store.config();
        assert_eq!(config.revocations.len(), 2);
        assert_eq!(config.revocations[0].reason, "stolen laptop");
        assert!(
            store
                .revocations()
                .current()
                .check_serial("0a:0b:0c")
                .is_err()
        );
    }

    #[test]
    fn a_single_use_token_is_spent_once_across_threads_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Arc::new(Store::open(&path).unwrap());
        let expires = jiff::Timestamp::now().as_second().unsigned_abs() + 600;
        let racing: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || store.spend("t1", expires).unwrap())
            })
            .collect();
        let spent = racing
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|spent| *spent)
            .count();
        assert_eq!(spent, 1, "exactly one of eight racing uses spends it");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(
            !store.spend("t1", expires).unwrap(),
            "still spent after a restart"
        );
        // A token past its expiry is never spent — its record may already
        // have been pruned, so spending it could succeed twice — and
        // records of unexpired ones are kept.
        assert!(
            !store.spend("old", 1).unwrap(),
            "an expired token is not spent"
        );
        assert!(!store.spend("old", 1).unwrap());
        assert!(store.spend("t2", expires).unwrap());
        assert!(!store.spend("t2", expires).unwrap());
    }
}
