//! The embedded store: one redb file in the data directory, for one
//! server. Its write transactions run one at a time, so a change always
//! sees the state it commits over.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::StoreError;
use super::backend::{
    Backend, BackendError, Change, META, OBJECTS, REVOCATIONS, SPENT_TOKENS, Tables, diff,
};

/// The string tables, as earlier versions of meshward laid them out.
const STRINGS: [TableDefinition<&str, &str>; 3] = [
    TableDefinition::new(OBJECTS),
    TableDefinition::new(META),
    TableDefinition::new(REVOCATIONS),
];
/// Spent token ids and their expiry, as a number.
const SPENT: TableDefinition<&str, u64> = TableDefinition::new(SPENT_TOKENS);

pub struct Redb {
    db: redb::Database,
    path: String,
}

impl Redb {
    /// Opens (or creates) the file at `path`; refused while another
    /// process has it open.
    pub fn open(path: &Path) -> Result<Redb, BackendError> {
        let shown = path.display().to_string();
        let db = redb::Database::create(path).map_err(|e| BackendError::Redb {
            path: shown.clone(),
            source: Box::new(e.into()),
        })?;
        Ok(Redb { db, path: shown })
    }

    fn error(&self, e: impl Into<redb::Error>) -> BackendError {
        BackendError::Redb {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }
}

impl Backend for Redb {
    fn read(&self) -> Result<Tables, BackendError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let mut tables = Tables::new();
        for definition in STRINGS {
            let table = match txn.open_table(definition) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(self.error(e)),
            };
            let out = tables.entry(definition.name().to_owned()).or_default();
            for entry in table.iter().map_err(|e| self.error(e))? {
                let (k, v) = entry.map_err(|e| self.error(e))?;
                out.insert(k.value().to_owned(), v.value().to_owned());
            }
        }
        match txn.open_table(SPENT) {
            Ok(table) => {
                let out = tables.entry(SPENT_TOKENS.to_owned()).or_default();
                for entry in table.iter().map_err(|e| self.error(e))? {
                    let (k, v) = entry.map_err(|e| self.error(e))?;
                    out.insert(k.value().to_owned(), v.value().to_string());
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.error(e)),
        }
        Ok(tables)
    }

    fn update(&self, change: Change<'_>) -> Result<(), StoreError> {
        // One write transaction at a time (redb's): what is read here is
        // what the commit goes over.
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let before = self.read()?;
        let mut after = before.clone();
        if !change(&mut after)? {
            return Ok(());
        }
        let (puts, deletes) = diff(&before, &after);
        for (table, key, value) in puts {
            if table == SPENT_TOKENS {
                let expires = value.parse::<u64>().unwrap_or(0);
                let mut t = txn.open_table(SPENT).map_err(|e| self.error(e))?;
                t.insert(key, expires).map_err(|e| self.error(e))?;
            } else if let Some(definition) = STRINGS.iter().find(|d| d.name() == table) {
                let mut t = txn.open_table(*definition).map_err(|e| self.error(e))?;
                t.insert(key, value).map_err(|e| self.error(e))?;
            }
        }
        for (table, key) in deletes {
            if table == SPENT_TOKENS {
                let mut t = txn.open_table(SPENT).map_err(|e| self.error(e))?;
                t.remove(key).map_err(|e| self.error(e))?;
            } else if let Some(definition) = STRINGS.iter().find(|d| d.name() == table) {
                let mut t = txn.open_table(*definition).map_err(|e| self.error(e))?;
                t.remove(key).map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

/// Whether `e` says another process has the file open.
pub fn is_in_use(e: &BackendError) -> bool {
    matches!(e, BackendError::Redb { source, .. }
        if matches!(**source, redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch))
}
