//! Where `suggest` and `replay` read decision records from: proxies'
//! access logs, or the recent window a server keeps (`--data-dir`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use meshward_policy::learn::Records;

use meshward_control_plane::decisions::DIRECTORY as DECISIONS_DIR;

#[derive(clap::Args, Debug, Clone)]
pub struct RecordArgs {
    /// Access logs of meshward proxies (`--access-log`): files, or
    /// directories whose .jsonl files are read; `-` for standard input.
    #[arg(
        long = "log",
        value_name = "PATH",
        num_args = 1..,
        required_unless_present = "data_dir"
    )]
    pub logs: Vec<PathBuf>,
    /// Read the recent decisions the server of this data directory keeps
    /// (reported by proxies run with --report-decisions, as `meshward up`
    /// runs them) instead of logs.
    #[arg(long, value_name = "DIR", conflicts_with = "logs")]
    pub data_dir: Option<PathBuf>,
}

impl RecordArgs {
    /// Reads every record; lines that are not records are warned about
    /// (named, with a count), not fatal.
    pub fn read(&self, command: &str) -> anyhow::Result<Records> {
        let mut records = Records::default();
        let files = match &self.data_dir {
            Some(dir) => {
                let window = dir.join(DECISIONS_DIR);
                let files = jsonl_files(&window).with_context(|| {
                    format!(
                        "reading {}: no decisions reported there (is `meshward server --data-dir {}` or `meshward up --data-dir {}` running, with proxies that report decisions?)",
                        window.display(),
                        dir.display(),
                        dir.display()
                    )
                })?;
                if files.is_empty() {
                    bail!(
                        "{} holds no decisions yet: send some traffic through the mesh first",
                        window.display()
                    );
                }
                files
            }
            None => {
                let mut files = Vec::new();
                for path in &self.logs {
                    if path.is_dir() {
                        files.extend(
                            jsonl_files(path)
                                .with_context(|| format!("reading {}", path.display()))?,
                        );
                    } else {
                        files.push(path.clone());
                    }
                }
                files
            }
        };
        for file in &files {
            let name = file.display().to_string();
            if file == Path::new("-") {
                records.read("standard input", std::io::stdin().lock())
            } else {
                let opened =
                    std::fs::File::open(file).with_context(|| format!("reading {name}"))?;
                records.read(&name, std::io::BufReader::new(opened))
            }
            .with_context(|| format!("reading {name}"))?;
        }
        for line in &records.unreadable {
            eprintln!("meshward {command}: warning: {line}");
        }
        let more = records.unreadable_count - records.unreadable.len();
        if more > 0 {
            eprintln!("meshward {command}: warning: {more} more line(s) are not decision records");
        }
        Ok(records)
    }
}

/// The `.jsonl` files of `dir`, sorted by name.
fn jsonl_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}
