//! Where the store keeps its data. [`Store`](super::Store) decides what a
//! write means (validation, owners, versions); a [`Backend`] only keeps
//! tables of strings and commits a change to them whole or not at all,
//! never over a change it did not see. Two backends: [`super::redb`], a
//! file in the data directory (one server), and [`super::etcd`], shared by
//! several servers.

use std::collections::BTreeMap;

use super::StoreError;

/// The store's data: table → key → value.
pub type Tables = BTreeMap<String, BTreeMap<String, String>>;

/// `Kind/namespace/name` → the stored object as JSON.
pub const OBJECTS: &str = "objects";
/// `version` → the store's version; `mesh` → MeshConfig YAML.
pub const META: &str = "meta";
/// `kind/value` → a revocation as JSON.
pub const REVOCATIONS: &str = "revocations";
/// Single-use token id → its expiry (Unix seconds, decimal).
pub const SPENT_TOKENS: &str = "spent_tokens";
/// Every table, as backends lay them out.
pub const TABLES: [&str; 4] = [OBJECTS, META, REVOCATIONS, SPENT_TOKENS];

/// Why a backend could not read or commit.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the store in {path}: {source}")]
    Redb {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("the store in etcd ({endpoints}): {what}: {source}")]
    Etcd {
        endpoints: String,
        what: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error(
        "the store in etcd ({endpoints}): other servers kept writing; gave up after {attempts} attempts: apply again"
    )]
    Contended { endpoints: String, attempts: usize },
    #[error("the store in etcd ({endpoints}): {what}")]
    Invalid { endpoints: String, what: String },
}

/// A change to the tables: given the state in force, edits it and says
/// whether to commit (`Ok(true)`), leave everything as it was
/// (`Ok(false)`), or refuse (an error, also committing nothing). A backend
/// shared by several writers may call it again on a newer state when
/// another writer committed in between, so it must compute everything it
/// reports from the state it is given.
pub type Change<'a> = &'a mut dyn FnMut(&mut Tables) -> Result<bool, StoreError>;

/// Tables of strings, committed whole.
pub trait Backend: Send + Sync {
    /// Everything, as of one committed state.
    fn read(&self) -> Result<Tables, BackendError>;
    /// Runs `change` on the state in force and commits what it made of
    /// it, all or nothing; never over a commit `change` did not see.
    fn update(&self, change: Change<'_>) -> Result<(), StoreError>;
    /// Where it keeps the data, for messages.
    fn describe(&self) -> String;
    /// For a backend that other processes write too: a value that changes
    /// whenever one did, so that the store reloads.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        None
    }
    /// For a shared backend: records what server `server` says of itself
    /// (its proxies), kept only while this process lives (a lease).
    fn announce(&self, _server: &str, _record: Vec<u8>) -> Result<(), BackendError> {
        Ok(())
    }
    /// Every live server's last record, by server.
    fn announced(&self) -> Result<BTreeMap<String, Vec<u8>>, BackendError> {
        Ok(BTreeMap::new())
    }
    /// For a shared backend: the value every server shares under `name`
    /// (the CA, sealed), if one was set.
    fn shared(&self, _name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(None)
    }
    /// Sets the shared value `name` unless it is set: whether this call set
    /// it (of servers racing, one does).
    fn share_once(&self, _name: &str, _value: Vec<u8>) -> Result<bool, BackendError> {
        Ok(false)
    }
}

/// `(table, key, value)` to write.
pub type Put<'a> = (&'a str, &'a str, &'a str);
/// `(table, key)` to delete.
pub type Delete<'a> = (&'a str, &'a str);

/// What `after` changed of `before`: the keys to put (with their values)
/// and to delete, per table.
pub fn diff<'a>(before: &'a Tables, after: &'a Tables) -> (Vec<Put<'a>>, Vec<Delete<'a>>) {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for table in TABLES {
        let was = before.get(table).unwrap_or(&EMPTY);
        let is = after.get(table).unwrap_or(&EMPTY);
        for (key, value) in is {
            if was.get(key) != Some(value) {
                puts.push((table, key.as_str(), value.as_str()));
            }
        }
        for key in was.keys().filter(|k| !is.contains_key(*k)) {
            deletes.push((table, key.as_str()));
        }
    }
    (puts, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_what_changed_and_nothing_else() {
        let mut before = Tables::new();
        before.entry(OBJECTS.into()).or_default().extend([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        let mut after = before.clone();
        let objects = after.get_mut(OBJECTS).unwrap();
        objects.insert("a".into(), "changed".into());
        objects.remove("b");
        after
            .entry(META.into())
            .or_default()
            .insert("version".into(), "1".into());
        let (puts, deletes) = diff(&before, &after);
        assert_eq!(
            puts,
            [(OBJECTS, "a", "changed"), (META, "version", "1")],
            "unchanged keys are not written"
        );
        assert_eq!(deletes, [(OBJECTS, "b")]);
    }
}
