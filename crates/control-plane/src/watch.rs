//! The watched config directory (`--config-dir`): polled for changes and
//! put in force file by file ([`Store::sync_directory`]). A file that does
//! not load, or defines an object another file defines too, is refused and
//! its objects keep their last good version, while the other files'
//! changes apply. The directory owns what it defines: editing a file
//! changes its objects, also ones the API wrote first.
//!
//! Each problem is logged once, when it appears (as `meshward validate`
//! prints it), not again at every later change of the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshward_policy::load;

use crate::push::Hub;
use crate::store::{DirectorySync, Store};

/// Why the directory was not read.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The directory itself cannot be read (gone, not permitted): nothing
    /// changes, rather than every file's objects being deleted.
    /// (The I/O error is in the message, not a source, so that it is said
    /// once however the error is printed.)
    #[error("{}: cannot read: {error}", .dir.display())]
    Unreadable { dir: PathBuf, error: std::io::Error },
    /// The store failed: worth trying again.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// Reads every file of `dir` and puts them in force in `store`.
pub fn sync(dir: &Path, store: &Store) -> Result<DirectorySync, SyncError> {
    let unreadable = |error| SyncError::Unreadable {
        dir: dir.to_owned(),
        error,
    };
    std::fs::metadata(dir).map_err(unreadable)?;
    let files = load::policy_files(dir).map_err(unreadable)?;
    // In a shared store, the files of this server's directory are named
    // `SERVER_ID:PATH`: other servers may watch a directory at the same
    // path, with other files in it.
    let prefix = store
        .server_id()
        .map(|id| format!("{id}:"))
        .unwrap_or_default();
    let loaded: Vec<_> = files
        .iter()
        .map(|file| (format!("{prefix}{}", file.display()), load::load_file(file)))
        .collect();
    // What is named otherwise is another server's.
    let root = format!("{prefix}{}", dir.join("").display());
    Ok(store.sync_directory_under(&root, &loaded)?)
}

/// Something worth a log line about the directory.
#[derive(Debug, PartialEq, Eq)]
enum News {
    /// An object the API wrote is a file's now.
    TakenOver { key: String, file: String },
    /// A file is refused, or refused for other reasons than last said.
    Refused { file: String, errors: Vec<String> },
    /// A file refused before is in force.
    InForce { file: String },
    /// The directory cannot be read.
    Unreadable(String),
}

impl News {
    fn log(&self) {
        match self {
            News::TakenOver { key, file } => tracing::warn!(
                object = %key,
                %file,
                "the API had written this object; the file defines it, so it is the file's from now on: change it there"
            ),
            News::Refused { file, errors } => tracing::error!(
                "{file} not put in force; its objects keep their last good version:\n{}",
                errors.join("\n")
            ),
            News::InForce { file } => tracing::info!("{file} is in force again"),
            News::Unreadable(error) => {
                tracing::error!("config directory {error}; the configuration in force stays")
            }
        }
    }
}

/// What the log has said about the directory, so that each problem is
/// said when it appears, not again at every later change.
#[derive(Default)]
struct Said {
    /// The refused files and why, as last said.
    refused: BTreeMap<String, Vec<String>>,
    unreadable: Option<String>,
}

impl Said {
    fn synced(&mut self, sync: &DirectorySync) -> Vec<News> {
        self.unreadable = None;
        let mut news: Vec<News> = sync
            .taken_over
            .iter()
            .map(|(key, file)| News::TakenOver {
                key: key.clone(),
                file: file.clone(),
            })
            .collect();
        for (file, errors) in &sync.refused {
            if self.refused.get(file) != Some(errors) {
                news.push(News::Refused {
                    file: file.clone(),
                    errors: errors.clone(),
                });
            }
        }
        for file in self.refused.keys() {
            if !sync.refused.contains_key(file) && Path::new(file).exists() {
                news.push(News::InForce { file: file.clone() });
            }
        }
        self.refused.clone_from(&sync.refused);
        news
    }

    fn failed(&mut self, error: &SyncError) -> Vec<News> {
        let said = error.to_string();
        if self.unreadable.as_ref() == Some(&said) {
            return Vec::new();
        }
        self.unreadable = Some(said.clone());
        vec![News::Unreadable(said)]
    }
}

/// Polls `dir` every `interval` until the task is dropped. A change is
/// loaded once the directory has looked the same on two polls in a row, so
/// a copy in progress (or an editor's save) is not read half-written; a
/// failed store write is retried. Files are named by absolute path (in the
/// log and as owners), which means the same from any working directory.
pub async fn watch(dir: PathBuf, store: Arc<Store>, hub: Arc<Hub>, interval: Duration) {
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let fingerprint = |dir: &PathBuf| load::fingerprint(std::slice::from_ref(dir));
    let mut synced = None;
    let mut previous = None;
    let mut said = Said::default();
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
                Ok(Ok(report)) => {
                    synced = current;
                    said.synced(&report).iter().for_each(News::log);
                    let changed = report.changed();
                    if changed > 0 {
                        let version = hub.store_version();
                        hub.changed(version);
                        tracing::info!(changed, version, "config directory changed");
                    }
                }
                Ok(Err(e @ SyncError::Unreadable { .. })) => {
                    // Not retried until the directory changes.
                    synced = current;
                    said.failed(&e).iter().for_each(News::log);
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

    fn paths(store: &Store) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = store
            .get("AuthorizationPolicy", Some("web"), None)
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["spec"]["rules"][0]["to"][0]["operation"]["paths"][0]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn each_file_is_put_in_force_whole_and_a_broken_one_holds_back_only_itself() {
        let data = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let dir = config.path().to_path_buf();
        let store = store(&data);
        std::fs::write(dir.join("deny.yaml"), DENY).unwrap();
        assert_eq!(sync(&dir, &store).unwrap().changed(), 1);
        assert_eq!(sync(&dir, &store).unwrap().changed(), 0, "nothing changed");
        let owner = &store.get("", None, None).unwrap()[0]["metadata"]["annotations"]
            [crate::store::SOURCE_ANNOTATION];
        assert_eq!(
            owner.as_str().unwrap(),
            format!("file:{}", dir.join("deny.yaml").display())
        );
        let version = store.config().version;

        // deny.yaml breaks while a new file comes: the new file is taken,
        // deny.yaml's object keeps its last good version.
        std::fs::write(
            dir.join("more.yaml"),
            DENY.replace("name: deny", "name: more"),
        )
        .unwrap();
        std::fs::write(
            dir.join("deny.yaml"),
            DENY.replace("/admin", "/changed").replace("DENY", "NOPE"),
        )
        .unwrap();
        let report = sync(&dir, &store).unwrap();
        assert_eq!(report.changed(), 1);
        assert_eq!(store.config().version, version + 1);
        let errors = &report.refused[&dir.join("deny.yaml").display().to_string()];
        assert!(
            errors[0].contains("deny.yaml:4: error: AuthorizationPolicy web/deny: spec.action"),
            "{errors:?}"
        );
        assert_eq!(
            paths(&store),
            pairs(&[("deny", "/admin"), ("more", "/admin")])
        );

        // Fixed, it applies; removing a file removes its object.
        std::fs::write(dir.join("deny.yaml"), DENY.replace("/admin", "/changed")).unwrap();
        assert_eq!(sync(&dir, &store).unwrap().changed(), 1);
        assert_eq!(
            paths(&store),
            pairs(&[("deny", "/changed"), ("more", "/admin")])
        );
        std::fs::remove_file(dir.join("deny.yaml")).unwrap();
        assert_eq!(sync(&dir, &store).unwrap().changed(), 1);
        assert_eq!(paths(&store), pairs(&[("more", "/admin")]));

        // The directory gone (being replaced, say): nothing is deleted.
        drop(config);
        assert!(matches!(
            sync(&dir, &store),
            Err(SyncError::Unreadable { .. })
        ));
        assert_eq!(paths(&store), pairs(&[("more", "/admin")]));
    }

    #[test]
    fn each_problem_is_said_once() {
        let data = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let dir = config.path().to_path_buf();
        let store = store(&data);
        let mut said = Said::default();
        let name = |file: &str| dir.join(file).display().to_string();

        // The API wrote it; a file defines it: said when taken over.
        store.apply("api.yaml", DENY).unwrap();
        std::fs::write(dir.join("deny.yaml"), DENY).unwrap();
        assert_eq!(
            said.synced(&sync(&dir, &store).unwrap()),
            [News::TakenOver {
                key: "AuthorizationPolicy/web/deny".into(),
                file: name("deny.yaml"),
            }]
        );
        assert_eq!(said.synced(&sync(&dir, &store).unwrap()), []);

        // A broken file: said once, not again when another file changes,
        // again when its errors change, and when it is fixed.
        std::fs::write(dir.join("broken.yaml"), "kind: [\n").unwrap();
        let news = said.synced(&sync(&dir, &store).unwrap());
        assert!(
            matches!(&news[..], [News::Refused { file, .. }] if *file == name("broken.yaml")),
            "{news:?}"
        );
        std::fs::write(
            dir.join("other.yaml"),
            DENY.replace("name: deny", "name: other"),
        )
        .unwrap();
        assert_eq!(said.synced(&sync(&dir, &store).unwrap()), []);
        std::fs::write(dir.join("broken.yaml"), "\n\nkind: [\n").unwrap();
        assert_eq!(said.synced(&sync(&dir, &store).unwrap()).len(), 1);
        std::fs::write(dir.join("broken.yaml"), "").unwrap();
        assert_eq!(
            said.synced(&sync(&dir, &store).unwrap()),
            [News::InForce {
                file: name("broken.yaml")
            }]
        );

        // An unreadable directory: said once.
        let gone = dir.join("gone");
        let error = sync(&gone, &store).unwrap_err();
        assert_eq!(said.failed(&error).len(), 1);
        assert_eq!(said.failed(&sync(&gone, &store).unwrap_err()), []);
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
