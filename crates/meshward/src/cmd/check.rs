//! `meshward check`: the inbound pipeline on JSON Lines requests.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meshward_policy::check::{CheckInput, CheckOutput, Checker};

use crate::inputs::{PolicyArgs, read_input};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    policies: PolicyArgs,
    /// JSON Lines requests, one per line; `-` for standard input.
    #[arg(long)]
    input: PathBuf,
    /// json: one result object per line; text: a table.
    #[arg(short = 'o', long, value_enum, default_value = "json")]
    output: Format,
    /// Use FILE's keys for jwksUri URI instead of fetching it (repeatable).
    #[arg(long = "jwks", value_name = "URI=FILE")]
    jwks: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Format {
    Json,
    Text,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let set = args.policies.policy_set(&args.jwks)?;
    let text = read_input(&args.input)?;
    let mut checker = Checker::default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut bad_lines = 0usize;
    if matches!(args.output, Format::Text) {
        writeln!(
            out,
            "{:<5} {:<8} {:<6} {:<10} {:<32} {:<5} REASON",
            "LINE", "DECISION", "STATUS", "MTLS", "POLICY", "RULE"
        )?;
    }
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let input: CheckInput = match serde_json::from_str(trimmed) {
            Ok(input) => input,
            Err(e) => {
                bad_lines += 1;
                let message = format!("{}:{line_no}: {e}", args.input.display());
                match args.output {
                    Format::Json => writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "line": line_no, "error": message })
                    )?,
                    Format::Text => writeln!(out, "{line_no:<5} error    {message}")?,
                }
                continue;
            }
        };
        let result = checker.check(&set, &input);
        match args.output {
            Format::Json => writeln!(
                out,
                "{}",
                serde_json::to_string(&result).context("encoding result")?
            )?,
            Format::Text => write_text(&mut out, line_no, &result)?,
        }
    }
    out.flush()?;
    Ok(if bad_lines > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_text(out: &mut impl Write, line: usize, r: &CheckOutput) -> std::io::Result<()> {
    let decision = serde_json::to_value(r.decision)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut extras = Vec::new();
    if let Some(a) = &r.audit_policy {
        extras.push(format!("audited by {a}"));
    }
    for d in &r.dry_run {
        extras.push(format!(
            "dry-run {} would {}",
            d.policy,
            if d.decision == meshward_policy::authz::Verdict::Allow {
                "allow"
            } else {
                "deny"
            }
        ));
    }
    let extras = if extras.is_empty() {
        String::new()
    } else {
        format!(" [{}]", extras.join("; "))
    };
    writeln!(
        out,
        "{line:<5} {decision:<8} {:<6} {:<10} {:<32} {:<5} {}{extras}",
        r.status,
        r.mtls_mode.as_str(),
        r.policy.as_deref().unwrap_or("-"),
        r.rule.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
        r.reason
    )
}
