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

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: web}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n";

    fn store(dir: &tempfile::TempDir) -> Arc<Store> {
        Arc::new(Store::open(&dir.path().join("store.redb")).unwrap())
    }

    #[test]
    fn a_directory_is_put_in_force_whole_or_not_at_all() {
        let data = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let dir = config.path().to_path_buf();
        let store = store(&data);
        std::fs::write(dir.join("deny.yaml"), DENY).unwrap();
        assert_eq!(sync(&dir, &store).unwrap(), 1);
        assert_eq!(sync(&dir, &store).unwrap(), 0, "nothing changed");
        let version = store.config().version;

        // A second, valid file and a broken one: neither is taken.
        std::fs::write(
            dir.join("more.yaml"),
            DENY.replace("name: deny", "name: more"),
        )
        .unwrap();
        std::fs::write(
            dir.join("broken.yaml"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: web}\nspec: {action: NOPE}\n",
        )
        .unwrap();
        match sync(&dir, &store) {
            Err(SyncError::Invalid(errors)) => {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert!(errors[0].contains("broken.yaml:4"), "{errors:?}");
            }
            other => panic!("expected the directory to be refused, got {other:?}"),
        }
        assert_eq!(store.config().version, version, "nothing changed");
        assert_eq!(store.config().policies.len(), 1);

        // Fixed: both new objects go in; removing a file removes its object.
        std::fs::remove_file(dir.join("broken.yaml")).unwrap();
        assert_eq!(sync(&dir, &store).unwrap(), 1);
        assert_eq!(store.config().policies.len(), 2);
        std::fs::remove_file(dir.join("deny.yaml")).unwrap();
        assert_eq!(sync(&dir, &store).unwrap(), 1);
        let names: Vec<String> = store
            .config()
            .policies
            .iter()
            .map(|p| p.metadata().name.clone())
            .collect();
        assert_eq!(names, ["more"]);
    }

    #[tokio::test]
    async fn the_watcher_applies_changes_and_tells_the_hub() {
        let data = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let store = store(&data);
        let hub = Arc::new(Hub::new(
            store.clone(),
            "cluster.local".into(),
            String::new(),
        ));
        let mut changes = hub.subscribe();
        let task = tokio::spawn(watch(
            config.path().to_path_buf(),
            store.clone(),
            hub.clone(),
            Duration::from_millis(10),
        ));
        std::fs::write(config.path().join("deny.yaml"), DENY).unwrap();
        tokio::time::timeout(Duration::from_secs(30), changes.changed())
            .await
            .expect("the hub is told within 30 s")
            .unwrap();
        assert_eq!(*changes.borrow(), store.config().version);
        assert_eq!(store.config().policies.len(), 1);
        task.abort();
    }
}
