//! The watched config directory (`--config-dir`): polled for changes, loaded
//! whole, and put in force as a set. A directory with any error changes
//! nothing: the errors are logged (as `meshward validate` prints them) and the
//! previous configuration stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshward_policy::load;

use crate::push::Hub;
use crate::store::Store;

/// Why a directory was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The files have errors: nothing to do until they change.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// The store failed: worth trying again.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// Loads `dir` into `store`; returns how many objects changed.
pub fn sync(dir: &PathBuf, store: &Store) -> Result<usize, SyncError> {
    let loaded = load::load_paths(std::slice::from_ref(dir));
    let errors = loaded.errors();
    if !errors.is_empty() {
        return Err(SyncError::Invalid(errors));
    }
    let changes = store.sync_directory(&loaded)?;
    Ok(changes.iter().filter(|c| c.action != "unchanged").count())
}

/// Polls `dir` every `interval` until the task is dropped. A change is
/// loaded once the directory has looked the same on two polls in a row, so
/// a copy in progress (or an editor's save) is not read half-written; a
/// failed load is retried.
pub async fn watch(dir: PathBuf, store: Arc<Store>, hub: Arc<Hub>, interval: Duration) {
    let fingerprint = |dir: &PathBuf| load::fingerprint(std::slice::from_ref(dir));
    let mut synced = None;
    let mut previous = None;
    loop {
        let current = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || fingerprint(&dir))
                .await
                .ok()
        };
        let settled = current.is_some() && (current == previous || synced.is_none());
        if settled && current != synced {
            let (dir, store) = (dir.clone(), store.clone());
            match tokio::task::spawn_blocking(move || sync(&dir, &store)).await {
                Ok(Ok(changed)) => {
                    synced = current;
                    if changed > 0 {
                        let version = hub.store_version();
                        hub.changed(version);
                        tracing::info!(changed, version, "config directory changed");
                    }
                }
                Ok(Err(SyncError::Invalid(errors))) => {
                    // Not retried until the files change: the errors are in them.
                    synced = current;
                    tracing::error!(
                        "config directory refused; the previous configuration stays in force:\n{}",
                        errors.join("\n")
                    );
                }
                Ok(Err(e)) => tracing::error!("config directory: {e}; retrying"),
                Err(e) => tracing::error!("config directory: {e}"),
            }
        }
        previous = current;
        tokio::time::sleep(interval).await;
    }
}
