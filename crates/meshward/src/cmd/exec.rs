//! `meshward exec WORKLOAD -- CMD [ARGS...]`: runs a command inside a
//! workload of a running `meshward up` (namespaced mode), as its
//! application would run: in its network namespace, so its calls are
//! captured by the workload's proxy and leave with the workload's
//! identity, and names resolve through that proxy. The command replaces
//! this process (`ip netns exec`, then the command itself), so its exit
//! code and output are the command's. A mesh an ordinary user started runs
//! in a user namespace of theirs, which the same user joins first.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The data directory of the running `meshward up` (its `--data-dir`);
    /// without it, the one `meshward up` running without `--data-dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The workload, NAMESPACE/NAME (or NAME alone when no other workload
    /// has it).
    workload: String,
    /// The command to run there, and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data = match args.data_dir {
        Some(dir) => dir,
        None => running_up()?,
    };
    let record = data.join("up.json");
    let text = std::fs::read_to_string(&record).with_context(|| {
        format!(
            "reading {}: is `meshward up --data-dir {}` running?",
            record.display(),
            data.display()
        )
    })?;
    let mesh: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", record.display()))?;
    let workloads = mesh["workloads"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = workloads
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    let matching: Vec<&serde_json::Value> = workloads
        .iter()
        .filter(|w| {
            w["name"].as_str().is_some_and(|name| {
                name == args.workload
                    || name
                        .split_once('/')
                        .is_some_and(|(_, n)| n == args.workload)
            })
        })
        .collect();
    let workload = match matching.as_slice() {
        [one] => *one,
        [] => bail!(
            "no workload {:?} in the mesh of {}: it has {}",
            args.workload,
            data.display(),
            names.join(", ")
        ),
        _ => bail!(
            "{:?} names several workloads of {}: give NAMESPACE/NAME",
            args.workload,
            data.display()
        ),
    };
    let Some(netns) = workload["netns"].as_str() else {
        bail!(
            "the mesh of {} runs in explicit mode (every workload on this host's own network): \
             run the command directly, calling the addresses `meshward up` printed",
            data.display()
        );
    };
    // A mesh an ordinary user started lives in a user namespace of theirs:
    // join it (as its root), and its lab is there.
    if let Some(userns) = mesh["user_namespace"].as_object() {
        let (pid, uid) = (
            userns.get("pid").and_then(|p| p.as_i64()).unwrap_or(0),
            userns.get("uid").and_then(|u| u.as_u64()).unwrap_or(0),
        );
        let me = u64::from(nix::unistd::geteuid().as_raw());
        if me != uid {
            bail!(
                "the mesh of {} runs in a user namespace of uid {uid}: run `meshward exec` as that user",
                data.display()
            );
        }
        let pid = i32::try_from(pid).context("up.json: user_namespace.pid")?;
        // The pid of an `up` that is gone may be another process's now.
        let recorded = userns
            .get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("");
        let now = std::fs::read_link(format!("/proc/{pid}/ns/user"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if recorded.is_empty() || now != recorded {
            bail!(
                "the `meshward up` of {} (pid {pid}) is no longer running",
                data.display()
            );
        }
        meshward_netns::userns::join(pid).with_context(|| {
            format!(
                "is the `meshward up` of {} (pid {pid}) still running?",
                data.display()
            )
        })?;
    } else if !meshward_netns::is_root() {
        bail!(
            "the mesh of {} runs as root: entering a workload's network namespace needs root (sudo)",
            data.display()
        );
    }
    let error = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(&args.command)
        .exec();
    Err(error).with_context(|| format!("running `ip netns exec {netns} ...`"))
}

/// The data directory of the one `meshward up` running without
/// `--data-dir` (its temporary directory, named for its pid).
fn running_up() -> anyhow::Result<PathBuf> {
    let temp = std::env::temp_dir();
    let running: Vec<PathBuf> = std::fs::read_dir(&temp)
        .with_context(|| format!("reading {}", temp.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid: i32 = name.strip_prefix("meshward-up-")?.parse().ok()?;
            (alive(pid) && e.path().join("up.json").is_file()).then(|| e.path())
        })
        .collect();
    match running.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no `meshward up` is running without --data-dir: give the --data-dir of the one to use"
        ),
        _ => bail!(
            "several `meshward up` are running ({}): give --data-dir",
            running
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
