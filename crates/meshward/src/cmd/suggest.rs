//! `meshward suggest`: least-privilege policies from observed traffic.
//! Reading and printing only; `meshward_policy::learn` decides what to write.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use meshward_policy::learn::{Callers, PathMode, Plaintext, SuggestOptions, suggest};
use meshward_policy::load;

use super::records::RecordArgs;
use crate::inputs::print_diagnostics;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    records: RecordArgs,
    /// Only workloads of this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Only this workload (NAMESPACE/NAME, its WorkloadEntry).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    workload: Option<String>,
    /// Only requests seen within this long before now (`30m`, `2h`, `7d`).
    #[arg(long, value_name = "DURATION")]
    since: Option<humantime::Duration>,
    /// Leave out operations seen fewer times than this.
    #[arg(long, default_value_t = 1, value_name = "N")]
    min_count: u64,
    /// How paths are written: each as seen (`exact`), with `{*}` where a
    /// segment varied (`templates`), or `/first-segment/*` (`prefixes`,
    /// wider than what was seen).
    #[arg(long, value_enum, default_value = "templates")]
    paths: PathsArg,
    /// Name callers by their identity (`principals`) or their namespace
    /// (`namespaces`, every caller of a namespace alike).
    #[arg(long, value_enum, default_value = "principals")]
    callers: CallersArg,
    /// Callers without a mesh identity (plaintext): left out (`skip`), or
    /// allowed by their address (`ip-blocks`).
    #[arg(long, value_enum, default_value = "skip")]
    plaintext: PlaintextArg,
    /// Write every policy with the annotation `istio.io/dry-run: "true"`:
    /// decided and logged, never enforced.
    #[arg(long)]
    dry_run: bool,
    /// The policies in force (files or directories): no `allow-nothing` is
    /// written for a namespace that already has one.
    #[arg(long, value_name = "PATH")]
    policies: Vec<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PathsArg {
    Exact,
    Templates,
    Prefixes,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CallersArg {
    Principals,
    Namespaces,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PlaintextArg {
    Skip,
    IpBlocks,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(w) = &args.workload
        && w.split_once('/')
            .is_none_or(|(ns, name)| ns.is_empty() || name.is_empty())
    {
        bail!("--workload takes NAMESPACE/NAME (a WorkloadEntry), got {w:?}");
    }
    let have_allow_nothing = if args.policies.is_empty() {
        Default::default()
    } else {
        let loaded = load::load_paths(&args.policies);
        print_diagnostics(&loaded.diagnostics);
        if loaded.has_errors() {
            bail!("the policies above (--policies) are invalid; fix them and try again");
        }
        meshward_policy::learn::suggest::namespaces_denying_by_default(&loaded.into_policies())
    };
    let since = args
        .since
        .and_then(|d| meshward_policy::learn::suggest::time_ago(d.into()));
    let records = args.records.read("suggest")?;
    let options = SuggestOptions {
        namespace: args.namespace,
        workload: args.workload,
        since,
        min_count: args.min_count,
        paths: match args.paths {
            PathsArg::Exact => PathMode::Exact,
            PathsArg::Templates => PathMode::Templates,
            PathsArg::Prefixes => PathMode::Prefixes,
        },
        callers: match args.callers {
            CallersArg::Principals => Callers::Principals,
            CallersArg::Namespaces => Callers::Namespaces,
        },
        plaintext: match args.plaintext {
            PlaintextArg::Skip => Plaintext::Skip,
            PlaintextArg::IpBlocks => Plaintext::IpBlocks,
        },
        dry_run: args.dry_run,
        have_allow_nothing,
    };
    let suggestion = suggest(&records.records, &options);
    print!("{}", suggestion.yaml);
    for note in &suggestion.notes {
        eprintln!("meshward suggest: {note}");
    }
    eprintln!(
        "meshward suggest: {} polic{} with {} rule(s) from {} request(s), {} allow-nothing",
        suggestion.policies,
        if suggestion.policies == 1 { "y" } else { "ies" },
        suggestion.rules,
        suggestion.requests,
        suggestion.allow_nothing
    );
    Ok(ExitCode::SUCCESS)
}
