//! Reading the policies and mesh configuration a command works on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use meshward_policy::api::MeshConfig;
use meshward_policy::authn::JwksCache;
use meshward_policy::load::{self, Loaded};
use meshward_policy::{Diagnostic, PolicySet};

use meshward_proxy::jwks::Fetcher;

/// Options shared by the commands that read policies.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Policy files or directories (searched for .yaml, .yml, .json); `-` for standard input.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// MeshConfig YAML, or Istio's `istio` ConfigMap with `data.mesh`.
    #[arg(long)]
    pub mesh_config: Option<PathBuf>,
}

impl PolicyArgs {
    pub fn mesh(&self) -> anyhow::Result<MeshConfig> {
        let Some(path) = &self.mesh_config else {
            return Ok(MeshConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading mesh config {}", path.display()))?;
        load::load_mesh_config(&path.display().to_string(), &text)
            .map_err(|d| anyhow::anyhow!("{d}"))
    }

    pub fn load(&self) -> Loaded {
        load::load_paths(&self.files)
    }

    /// Loads and requires every document to be valid: deciding on part of a
    /// configuration would answer a question nobody asked.
    pub fn policy_set(&self, jwks_overrides: &[String]) -> anyhow::Result<PolicySet> {
        let mesh = self.mesh()?;
        let loaded = self.load();
        print_diagnostics(&loaded.diagnostics);
        if loaded.has_errors() {
            bail!(
                "the policies above are invalid; fix them (see `meshward validate`) and try again"
            );
        }
        let fetcher = Fetcher::new(jwks_overrides).map_err(anyhow::Error::msg)?;
        let cache = Arc::new(JwksCache::new(Some(Arc::new(fetcher))));
        Ok(PolicySet::new(mesh, loaded.into_policies()).with_jwks(cache))
    }
}

pub fn print_diagnostics(diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        eprintln!("{d}");
    }
}

pub fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}
