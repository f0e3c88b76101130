//! Fetching `jwksUri`: over HTTP(S) within the rule's `timeout`, or from a
//! local file given with `--jwks URI=FILE` (offline checks, air-gapped proxies).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use meshward_policy::authn::jwks::{FetchError, JwksFetcher};

const MAX_BODY: u64 = 1 << 20;

pub struct Fetcher {
    overrides: HashMap<String, PathBuf>,
    agent: ureq::Agent,
}

impl Fetcher {
    pub fn new(overrides: &[String]) -> Result<Fetcher, String> {
        let mut map = HashMap::new();
        for o in overrides {
            let Some((uri, file)) = o.split_once('=') else {
                return Err(format!("--jwks takes URI=FILE, got {o:?}"));
            };
            map.insert(uri.to_owned(), PathBuf::from(file));
        }
        // One process-wide crypto provider for rustls: aws-lc-rs. Installing
        // twice is harmless, so the result is ignored.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(true)
            .build();
        Ok(Fetcher {
            overrides: map,
            agent: config.into(),
        })
    }
}

impl JwksFetcher for Fetcher {
    fn fetch(&self, uri: &str, timeout: Duration) -> Result<String, FetchError> {
        let err = |reason: String| FetchError {
            uri: uri.to_owned(),
            reason,
        };
        if let Some(path) = self.overrides.get(uri) {
            return std::fs::read_to_string(path)
                .map_err(|e| err(format!("{}: {e}", path.display())));
        }
        let mut response = self
            .agent
            .get(uri)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call()
            .map_err(|e| err(e.to_string()))?;
        response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| err(e.to_string()))
    }
}
