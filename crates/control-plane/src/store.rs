//! The config store: every object the server serves, validated by the
//! policy engine's loader and persisted in an embedded database (redb) in
//! the data directory, so applied configuration survives restarts.
//!
//! A write is all or nothing: a text with any invalid document changes
//! nothing, and the error is the one `meshward validate` prints. Each object
//! keeps the `creationTimestamp` of its first write (PeerAuthentication's
//! oldest-wins depends on it); writes that change nothing are not versions.
//! Objects come from the API or from a watched directory; the directory's
//! objects are replaced as a set whenever the directory changes.
//!
//! Beside the objects: the revocation list (`meshward revoke`), each write a
//! version like any other, published to the CA as it commits; and the ids
//! of single-use bootstrap tokens already used, so no restart makes one
//! usable again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use meshward_api::resources::{Revocation, RevocationKind};
use meshward_identity::revocation::{self, RevocationList, Revocations};
use meshward_identity::service::TokenLedger;
use meshward_policy::api::{MeshConfig, Policy, RegistryObject};
use meshward_policy::load::{self, Loaded};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// `Kind/namespace/name` → [`Stored`] as JSON.
const OBJECTS: TableDefinition<&str, &str> = TableDefinition::new("objects");
/// `version` → the store's version; `mesh` → MeshConfig YAML.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// `kind/value` → [`Revocation`] as JSON.
const REVOCATIONS: TableDefinition<&str, &str> = TableDefinition::new("revocations");
/// Single-use token id → its expiry (Unix seconds), after which the record
/// is dropped (the token is refused as expired anyway).
const SPENT_TOKENS: TableDefinition<&str, u64> = TableDefinition::new("spent_tokens");
/// A revocation's reason is for people: one line, this long at most.
const MAX_REASON: usize = 512;

/// What wrote an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    /// The watched config directory.
    Directory,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    source: Source,
    object: serde_json::Value,
}

/// Why a write was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("the store in {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
}

impl StoreError {
    /// Whether the store could not be opened because another process has
    /// it open (redb locks the file for one process at a time).
    pub fn is_in_use(&self) -> bool {
        matches!(self, StoreError::Database { source, .. }
            if matches!(**source, redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch))
    }
}

/// What a write did to one object, as `kubectl apply` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: &'static str,
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
    db: redb::Database,
    path: String,
    current: RwLock<Arc<Config>>,
    /// The revocation list of `current`, for the CA.
    revoked: Revocations,
    /// Held from a write's start to its reload, so the configuration in
    /// force is always one committed state with its own version.
    writing: std::sync::Mutex<()>,
}

/// One more version: every write that changes something is one.
fn bump_version(meta: &mut redb::Table<&str, &str>) -> Result<(), redb::StorageError> {
    let version = meta
        .get("version")?
        .and_then(|v| v.value().parse::<u64>().ok())
        .unwrap_or(0);
    meta.insert("version", (version + 1).to_string().as_str())?;
    Ok(())
}

/// The kind as stored (`authorizationpolicy` → `AuthorizationPolicy`).
fn canonical_kind(kind: &str) -> &str {
    const KINDS: [&str; 6] = [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "WorkloadEntry",
        "ServiceEntry",
        "DestinationRule",
    ];
    KINDS
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(kind))
        .unwrap_or(kind)
}

fn key_of(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
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

/// The object without its creation time, for telling real changes.
fn without_timestamp(mut object: serde_json::Value) -> serde_json::Value {
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("creationTimestamp");
    }
    object
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let db = redb::Database::create(path).map_err(|e| StoreError::Database {
            path: shown.clone(),
            source: Box::new(e.into()),
        })?;
        let store = Store {
            db,
            path: shown,
            current: RwLock::new(Arc::default()),
            revoked: Revocations::new(),
            writing: std::sync::Mutex::new(()),
        };
        store.reload()?;
        Ok(store)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn db_error(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Validates every document of `text` and writes them all, or none.
    pub fn apply(&self, file: &str, text: &str) -> Result<Vec<Change>, StoreError> {
        let loaded = load::load_str(file, text);
        let errors = loaded.errors();
        if !errors.is_empty() {
            return Err(StoreError::Invalid(errors));
        }
        self.write(objects_of(&loaded), Source::Api, false)
    }

    /// Puts the directory's objects in force: those no longer in it are
    /// deleted. `loaded` must be free of errors (the caller reports them and
    /// keeps the previous state).
    pub fn sync_directory(&self, loaded: &Loaded) -> Result<Vec<Change>, StoreError> {
        self.write(objects_of(loaded), Source::Directory, true)
    }

    fn write(
        &self,
        objects: Vec<(String, serde_json::Value)>,
        source: Source,
        replace_source: bool,
    ) -> Result<Vec<Change>, StoreError> {
        let _writing = self.lock_writes();
        let now = jiff::Timestamp::now().to_string();
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let mut changes = Vec::new();
        {
            let mut table = txn.open_table(OBJECTS).map_err(|e| self.db_error(e))?;
            let incoming: BTreeMap<&str, ()> =
                objects.iter().map(|(k, _)| (k.as_str(), ())).collect();
            if replace_source {
                let mut gone = Vec::new();
                for entry in table.iter().map_err(|e| self.db_error(e))? {
                    let (k, v) = entry.map_err(|e| self.db_error(e))?;
                    let stored: Option<Stored> = serde_json::from_str(v.value()).ok();
                    if stored.is_some_and(|s| s.source == source)
                        && !incoming.contains_key(k.value())
                    {
                        gone.push(k.value().to_owned());
                    }
                }
                for k in gone {
                    table.remove(k.as_str()).map_err(|e| self.db_error(e))?;
                    changes.push(Change {
                        key: k,
                        action: "deleted",
                    });
                }
            }
            for (key, mut object) in objects {
                let previous: Option<Stored> = table
                    .get(key.as_str())
                    .map_err(|e| self.db_error(e))?
                    .and_then(|v| serde_json::from_str(v.value()).ok());
                let created = previous
                    .as_ref()
                    .and_then(|p| p.object.pointer("/metadata/creationTimestamp").cloned())
                    .unwrap_or_else(|| serde_json::Value::String(now.clone()));
                if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    meta.insert("creationTimestamp".into(), created);
                }
                // The directory never overwrites what the API wrote; an
                // API write takes an object over from the directory.
                if source == Source::Directory
                    && previous.as_ref().is_some_and(|p| p.source == Source::Api)
                {
                    tracing::warn!(%key, "the config directory has an object the API also wrote; the API's stays");
                    changes.push(Change {
                        key,
                        action: "conflict",
                    });
                    continue;
                }
                let action = match &previous {
                    None => "created",
                    Some(p)
                        if without_timestamp(p.object.clone())
                            == without_timestamp(object.clone())
                            && p.source == source =>
                    {
                        "unchanged"
                    }
                    Some(_) => "configured",
                };
                if action != "unchanged" {
                    let stored = Stored {
                        source: source.clone(),
                        object,
                    };
                    let json = serde_json::to_string(&stored).unwrap_or_default();
                    table
                        .insert(key.as_str(), json.as_str())
                        .map_err(|e| self.db_error(e))?;
                }
                changes.push(Change { key, action });
            }
            if changes.iter().any(|c| c.action != "unchanged") {
                let mut meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
                bump_version(&mut meta).map_err(|e| self.db_error(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_error(e))?;
        self.reload()?;
        Ok(changes)
    }

    /// Replaces the MeshConfig (YAML, or Istio's `istio` ConfigMap) after
    /// checking it loads.
    pub fn set_mesh_config(&self, file: &str, text: &str) -> Result<(), StoreError> {
        load::load_mesh_config(file, text).map_err(|d| StoreError::Invalid(vec![d.to_string()]))?;
        let _writing = self.lock_writes();
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
            let unchanged = meta
                .get("mesh")
                .map_err(|e| self.db_error(e))?
                .is_some_and(|v| v.value() == text);
            if !unchanged {
                meta.insert("mesh", text).map_err(|e| self.db_error(e))?;
                bump_version(&mut meta).map_err(|e| self.db_error(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_error(e))?;
        self.reload()
    }

    /// Deletes one object; `false` if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let kind = canonical_kind(kind);
        let key = key_of(kind, namespace, name);
        let _writing = self.lock_writes();
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let existed = {
            let mut table = txn.open_table(OBJECTS).map_err(|e| self.db_error(e))?;
            let existed = table
                .remove(key.as_str())
                .map_err(|e| self.db_error(e))?
                .is_some();
            if existed {
                let mut meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
                bump_version(&mut meta).map_err(|e| self.db_error(e))?;
            }
            existed
        };
        txn.commit().map_err(|e| self.db_error(e))?;
        self.reload()?;
        Ok(existed)
    }

    /// Objects of `kind` (all kinds when empty), in `namespace` (all when
    /// `None`), named `name` (all when `None`), as stored.
    pub fn get(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match txn.open_table(OBJECTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_error(e)),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_error(e))? {
            let (k, v) = entry.map_err(|e| self.db_error(e))?;
            let mut parts = k.value().splitn(3, '/');
            let (Some(k_kind), Some(k_ns), Some(k_name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let wanted = (kind.is_empty() || k_kind.eq_ignore_ascii_case(kind))
                && namespace.is_none_or(|ns| ns == k_ns)
                && name.is_none_or(|n| n == k_name);
            if wanted && let Ok(stored) = serde_json::from_str::<Stored>(v.value()) {
                out.push(stored.object);
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
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let (entry, created) = {
            let mut table = txn.open_table(REVOCATIONS).map_err(|e| self.db_error(e))?;
            let existing: Option<Revocation> = table
                .get(key.as_str())
                .map_err(|e| self.db_error(e))?
                .and_then(|v| serde_json::from_str(v.value()).ok());
            match existing {
                Some(entry) => (entry, false),
                None => {
                    let entry = Revocation {
                        kind,
                        value,
                        reason: reason.to_owned(),
                        revoked_at: jiff::Timestamp::now()
                            .strftime("%Y-%m-%dT%H:%M:%SZ")
                            .to_string(),
                    };
                    let json = serde_json::to_string(&entry).unwrap_or_default();
                    table
                        .insert(key.as_str(), json.as_str())
                        .map_err(|e| self.db_error(e))?;
                    let mut meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
                    bump_version(&mut meta).map_err(|e| self.db_error(e))?;
                    (entry, true)
                }
            }
        };
        txn.commit().map_err(|e| self.db_error(e))?;
        self.reload()?;
        Ok((entry, created))
    }

    /// Re-reads everything into the typed [`Config`]. Stored objects were
    /// valid when written; one that no longer loads (a newer meshward
    /// stored it) is skipped with a warning rather than taking the rest down.
    fn reload(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let mut objects = Vec::new();
        match txn.open_table(OBJECTS) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| self.db_error(e))? {
                    let (_, v) = entry.map_err(|e| self.db_error(e))?;
                    if let Ok(stored) = serde_json::from_str::<Stored>(v.value()) {
                        objects.push(stored.object);
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.db_error(e)),
        }
        let (version, mesh) = match txn.open_table(META) {
            Ok(meta) => {
                let read = |k: &str| -> Result<Option<String>, StoreError> {
                    Ok(meta
                        .get(k)
                        .map_err(|e| self.db_error(e))?
                        .map(|v| v.value().to_owned()))
                };
                (
                    read("version")?.and_then(|v| v.parse().ok()).unwrap_or(0),
                    read("mesh")?,
                )
            }
            Err(redb::TableError::TableDoesNotExist(_)) => (0, None),
            Err(e) => return Err(self.db_error(e)),
        };
        let mut revocations = Vec::new();
        match txn.open_table(REVOCATIONS) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| self.db_error(e))? {
                    let (_, v) = entry.map_err(|e| self.db_error(e))?;
                    match serde_json::from_str::<Revocation>(v.value()) {
                        Ok(r) => revocations.push(r),
                        Err(e) => tracing::error!("a stored revocation no longer loads: {e}"),
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.db_error(e)),
        }
        revocations.sort_by(|a, b| (a.kind, &a.value).cmp(&(b.kind, &b.value)));
        // Every entry was checked when written; should one not be now, the
        // list in force stays as it was rather than losing entries.
        match RevocationList::new(&revocations) {
            Ok(list) => {
                self.revoked.replace(list);
            }
            Err(e) => tracing::error!(
                "the stored revocation list no longer loads, keeping the previous one: {e}"
            ),
        }
        let mut config = Config {
            version,
            revocations,
            ..Config::default()
        };
        if let Some(text) = mesh {
            match load::load_mesh_config("mesh (stored)", &text) {
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
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }
}

/// Single-use tokens: spent in one write transaction, which redb runs one
/// at a time, so the look and the mark cannot be split by another use.
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
        let txn = self
            .db
            .begin_write()
            .map_err(|e| self.db_error(e).to_string())?;
        let spent = {
            let mut table = txn
                .open_table(SPENT_TOKENS)
                .map_err(|e| self.db_error(e).to_string())?;
            if table
                .get(id)
                .map_err(|e| self.db_error(e).to_string())?
                .is_some()
            {
                false
            } else {
                table
                    .insert(id, expires)
                    .map_err(|e| self.db_error(e).to_string())?;
                // Records of expired tokens are no longer needed.
                table
                    .retain(|_, expires| expires >= now)
                    .map_err(|e| self.db_error(e).to_string())?;
                true
            }
        };
        txn.commit().map_err(|e| self.db_error(e).to_string())?;
        Ok(spent)
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

    #[test]
    fn the_directory_replaces_its_own_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store.apply("api.yaml", DENY).unwrap();
        let other = DENY.replace("name: deny", "name: from-dir");
        let loaded = load::load_str("dir.yaml", &other);
        store.sync_directory(&loaded).unwrap();
        assert_eq!(store.config().policies.len(), 2);
        let changes = store.sync_directory(&Loaded::default()).unwrap();
        assert_eq!(
            changes,
            [Change {
                key: "AuthorizationPolicy/web/from-dir".into(),
                action: "deleted"
            }]
        );
        assert_eq!(store.config().policies.len(), 1, "the API's object stays");
        assert!(store.delete("authorizationpolicy", "web", "deny").unwrap());
        assert!(store.config().policies.is_empty());

        // The directory never takes over what the API wrote, and removing
        // its file never deletes the API's object.
        store.apply("api.yaml", DENY).unwrap();
        let same_key = load::load_str("dir.yaml", &DENY.replace("/admin", "/from-dir"));
        let changes = store.sync_directory(&same_key).unwrap();
        assert_eq!(changes[0].action, "conflict");
        store.sync_directory(&Loaded::default()).unwrap();
        let kept = store
            .get("AuthorizationPolicy", Some("web"), Some("deny"))
            .unwrap();
        assert_eq!(
            kept[0]["spec"]["rules"][0]["to"][0]["operation"]["paths"][0],
            "/admin"
        );
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
