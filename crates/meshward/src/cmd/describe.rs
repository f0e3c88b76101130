//! `meshward describe`: what applies to a workload, in evaluation order, and why.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::bail;
use meshward_policy::api::{Action, Policy};
use meshward_policy::authz::is_dry_run;
use meshward_policy::resolve::{Applicability, oldest_first};
use meshward_policy::validate;
use meshward_policy::{PolicySet, Workload};

use crate::cmd::control::ServerArgs;
use crate::inputs::PolicyArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Policy files or directories; or, with --data-dir/--admin-dir, what a
    /// running server holds.
    #[arg(short = 'f', long = "filename", num_args = 1.., required_unless_present_any = ["data_dir", "admin_dir"])]
    files: Vec<std::path::PathBuf>,
    /// MeshConfig YAML, or Istio's `istio` ConfigMap with `data.mesh`.
    #[arg(long)]
    mesh_config: Option<std::path::PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
    /// The workload's namespace.
    #[arg(short = 'n', long)]
    namespace: String,
    /// The workload's labels, `k=v,k2=v2`.
    #[arg(short = 'l', long, default_value = "")]
    labels: String,
    /// Show the mTLS mode of this workload port too.
    #[arg(long)]
    port: Vec<u16>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut labels = BTreeMap::new();
    for pair in args.labels.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--labels takes k=v pairs separated by commas, got {pair:?}");
        };
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let workload = Workload {
        namespace: args.namespace.clone(),
        labels,
    };
    let set = if args.files.is_empty() {
        crate::cmd::control::live_policy_set(&args.server)?
    } else {
        PolicyArgs {
            files: args.files.clone(),
            mesh_config: args.mesh_config.clone(),
        }
        .policy_set(&[])?
    };
    print!("{}", describe(&set, &workload, &args.port));
    Ok(ExitCode::SUCCESS)
}

/// Which provider a CUSTOM policy calls, and on which protocols it is
/// asked (Istio ignores a CUSTOM policy with an HTTP provider on TCP).
fn provider_note(mesh: &meshward_policy::api::MeshConfig, name: &str) -> String {
    match mesh.extension_provider(name) {
        Some(p) if p.envoy_ext_authz_grpc.is_some() && p.envoy_ext_authz_http.is_none() => {
            format!(
                "provider {name} (envoyExtAuthzGrpc: asked for HTTP requests and TCP connections)"
            )
        }
        Some(p) if p.envoy_ext_authz_http.is_some() => format!(
            "provider {name} (envoyExtAuthzHttp: asked for HTTP requests only; on TCP ports the policy is ignored, as in Istio)"
        ),
        Some(_) => format!("provider {name} (not an ext_authz provider: denies what it matches)"),
        None => format!(
            "provider {name} (not in meshConfig.extensionProviders: denies what it matches)"
        ),
    }
}

/// The text of `meshward describe`.
pub fn describe(set: &PolicySet, workload: &Workload, ports: &[u16]) -> String {
    let mut s = String::new();
    let mesh = set.mesh();
    let labels: Vec<String> = workload
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        s,
        "Workload:    namespace {}, labels {}",
        workload.namespace,
        if labels.is_empty() {
            "(none)".into()
        } else {
            labels.join(",")
        }
    );
    let _ = writeln!(
        s,
        "Mesh:        trust domain {}{}, root namespace {}",
        mesh.trust_domain,
        if mesh.trust_domain_aliases.is_empty() {
            String::new()
        } else {
            format!(" (aliases {})", mesh.trust_domain_aliases.join(", "))
        },
        mesh.root_namespace
    );
    let compiled = set.for_workload(workload);

    let _ = writeln!(s, "\nMutual TLS:");
    let _ = writeln!(
        s,
        "  workload mode: {} (from {})",
        compiled.mtls.mode,
        compiled
            .mtls
            .decided_by
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "default: no PeerAuthentication sets a mode".into())
    );
    let mut shown: Vec<u16> = compiled.mtls.port_modes.keys().copied().collect();
    shown.extend(ports);
    shown.sort_unstable();
    shown.dedup();
    for port in shown {
        let _ = writeln!(
            s,
            "  port {port}: {} (from {})",
            compiled.mtls.mode_for_port(port),
            compiled.mtls.source_for_port(port)
        );
    }
    for (loser, winner) in &compiled.mtls.superseded {
        let _ = writeln!(
            s,
            "  {loser} is ignored: {winner} is older at the same level"
        );
    }

    let explained = set.explain(workload);
    let applies = |p: &&(&Policy, Applicability)| matches!(p.1, Applicability::Applies(_));
    let mut applying: Vec<&(&Policy, Applicability)> = explained.iter().filter(applies).collect();
    applying.sort_by(|a, b| {
        let key = |p: &Policy| {
            (
                p.metadata().namespace_or_default().to_owned(),
                p.metadata().name.clone(),
            )
        };
        key(a.0).cmp(&key(b.0))
    });

    let _ = writeln!(s, "\nRequestAuthentication (JWT rules merged, by issuer):");
    let mut any = false;
    for (p, a) in &applying {
        if let (Policy::RequestAuthentication(ra), Applicability::Applies(scope)) = (p, a) {
            any = true;
            let issuers: Vec<&str> = ra
                .spec
                .jwt_rules
                .iter()
                .map(|r| r.issuer.as_str())
                .collect();
            let _ = writeln!(
                s,
                "  {}  [{}]  issuers: {}",
                ra.key(),
                scope.describe(),
                issuers.join(", ")
            );
        }
    }
    if !any {
        let _ = writeln!(
            s,
            "  (none: requests are not authenticated by JWT; tokens pass through unverified)"
        );
    }

    let _ = writeln!(s, "\nAuthorizationPolicy, in evaluation order:");
    for action in [Action::Custom, Action::Deny, Action::Allow, Action::Audit] {
        let mut lines = Vec::new();
        for (p, a) in &applying {
            if let (Policy::AuthorizationPolicy(ap), Applicability::Applies(scope)) = (p, a)
                && ap.spec.action == action
            {
                let mut notes = vec![
                    scope.describe().to_owned(),
                    format!("{} rule(s)", ap.spec.rules.len()),
                ];
                if is_dry_run(ap) {
                    notes.push("dry-run: reported, never enforced".into());
                }
                if let Some(provider) = &ap.spec.provider {
                    notes.push(provider_note(mesh, &provider.name));
                }
                lines.push(format!("    {}  [{}]", ap.key(), notes.join(", ")));
            }
        }
        let what = match action {
            Action::Custom => "CUSTOM (external authorizer decides first)",
            Action::Deny => "DENY (a match denies)",
            Action::Allow => "ALLOW (if any applies, requests that match none are denied)",
            Action::Audit => "AUDIT (a match is logged, never decides)",
        };
        let _ = writeln!(s, "  {what}:");
        if lines.is_empty() {
            let _ = writeln!(s, "    (none)");
        }
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
    }
    let has_allow = applying.iter().any(|(p, _)| matches!(p, Policy::AuthorizationPolicy(ap) if ap.spec.action == Action::Allow && !is_dry_run(ap)));
    let _ = writeln!(
        s,
        "  => {}",
        if has_allow {
            "default: DENY (an enforced ALLOW policy applies)"
        } else {
            "default: ALLOW (no enforced ALLOW policy applies)"
        }
    );
    for (p, _) in &applying {
        if let Some(issue) = validate::path_normalization_warning(p, mesh.normalization()) {
            let _ = writeln!(
                s,
                "  warning: {}: {}: {}",
                p.display_name(),
                issue.field,
                issue.message
            );
        }
    }

    let mut not_applying: Vec<&(&Policy, Applicability)> =
        explained.iter().filter(|p| !applies(p)).collect();
    not_applying.sort_by(|a, b| oldest_first(a.0.metadata(), b.0.metadata()));
    let _ = writeln!(s, "\nPolicies that do not apply:");
    if not_applying.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for (p, a) in not_applying {
        if let Applicability::DoesNotApply(why) = a {
            let _ = writeln!(s, "  {}: {why}", p.display_name());
        }
    }
    s
}
