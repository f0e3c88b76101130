//! `meshward validate`: Istio's admission checks, offline, and warnings for
//! what the mesh config (`--mesh-config`, Istio's defaults without it) leaves
//! open.

use std::process::ExitCode;

use meshward_policy::Severity;

use crate::inputs::PolicyArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    policies: PolicyArgs,
    /// Treat warnings as errors.
    #[arg(long)]
    strict: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // What is risky depends on the mesh config in force (path normalization).
    let mesh = args.policies.mesh()?;
    let mut loaded = args.policies.load();
    let mesh_warnings = loaded.mesh_warnings(&mesh);
    loaded.diagnostics.extend(mesh_warnings);
    for d in &loaded.diagnostics {
        println!("{d}");
    }
    let errors = loaded
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = loaded.diagnostics.len() - errors;
    eprintln!(
        "{} document(s): {} valid polic{}, {errors} error(s), {warnings} warning(s)",
        loaded.documents,
        loaded.policies.len(),
        if loaded.policies.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    Ok(if errors > 0 || (args.strict && warnings > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
