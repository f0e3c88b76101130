//! `meshward replay`: what a policy change would do to the traffic that
//! was logged. Every recorded request is decided again by
//! `meshward_policy::learn::replay`, with the engine the proxies run.

use std::process::ExitCode;

use meshward_policy::learn::replay;

use super::records::RecordArgs;
use crate::inputs::PolicyArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The proposed policies.
    #[command(flatten)]
    policies: PolicyArgs,
    #[command(flatten)]
    records: RecordArgs,
    /// `text` for people, `json` for programs.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Text,
    Json,
}

/// Exit 1 when a request that was allowed would be denied, so that it can
/// gate a change of policy; 0 otherwise; 2 when it cannot run.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let set = args.policies.policy_set(&[])?;
    let records = args.records.read("replay")?;
    let report = replay(&set, &records.records);
    match args.output {
        Output::Text => print!("{}", report.text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.breaks() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
