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

/// Loads `dir` into `store`; returns the errors that refused it, if any.
pub fn sync(dir: &PathBuf, store: &Store) -> Result<usize, Vec<String>> {
    let loaded = load::load_paths(std::slice::from_ref(dir));
    let errors = loaded.errors();
    if !errors.is_empty() {
        return Err(errors);
    }
    let changes = store
        .sync_directory(&loaded)
        .map_err(|e| vec![e.to_string()])?;
    Ok(changes.iter().filter(|c| c.action != "unchanged").count())
}

/// Polls `dir` every `interval` until the task is dropped.
pub async fn watch(dir: PathBuf, store: Arc<Store>, hub: Arc<Hub>, interval: Duration) {
    let fingerprint = |dir: &PathBuf| load::fingerprint(std::slice::from_ref(dir));
    let mut seen = None;
    loop {
        let current = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || fingerprint(&dir))
                .await
                .ok()
        };
        if current.is_some() && current != seen {
            seen = current;
            let (dir, store) = (dir.clone(), store.clone());
            match tokio::task::spawn_blocking(move || sync(&dir, &store)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(changed)) => {
                    let version = hub.store_version();
                    hub.changed(version);
                    tracing::info!(changed, version, "config directory changed");
                }
                Ok(Err(errors)) => tracing::error!(
                    "config directory refused; the previous configuration stays in force:\n{}",
                    errors.join("\n")
                ),
                Err(e) => tracing::error!("config directory: {e}"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}
