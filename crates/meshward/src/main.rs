//! `meshward`: zero-trust security for services, with Istio's security API.
//!
//! The binary is a thin edge: argument parsing, reading files and printing.
//! Every decision is made by `meshward-policy`.

#![forbid(unsafe_code)]

mod children;
mod cmd;
mod inputs;
mod kinds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshward_identity::error_chain;

#[derive(Parser)]
#[command(
    name = "meshward",
    version,
    about = "Zero-trust security for services: Istio's security policies, without Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policy files as Istio's admission webhook would.
    Validate(cmd::validate::Args),
    /// Decide requests offline: mTLS mode, JWT, authorization — one result per input line.
    Check(cmd::check::Args),
    /// Show the effective mTLS mode and every policy that applies to a workload, and why others do not.
    Describe(cmd::describe::Args),
    /// Least-privilege policies from observed traffic: one ALLOW policy per workload, its observed callers and operations.
    Suggest(cmd::suggest::Args),
    /// Decide logged traffic again under proposed policies and report what would change; exit 1 if an allowed request would be denied.
    Replay(cmd::replay::Args),
    /// The mesh certificate authority: init, issue, inspect.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Bootstrap tokens that let a new workload obtain its first certificate.
    #[command(subcommand)]
    Token(cmd::ca::TokenCommand),
    /// The control plane: serves the mesh CA over Istio's certificate API.
    Server(Box<cmd::server::Args>),
    /// Store policies, WorkloadEntries and ServiceEntries in a running server (validated first).
    Apply(cmd::control::ApplyArgs),
    /// Show stored configuration: KIND [NAME] [-n NS | -A] [-o yaml|json].
    Get(cmd::control::GetArgs),
    /// Delete one stored object: KIND NAME -n NS.
    Delete(cmd::control::DeleteArgs),
    /// Every proxy connected to the server: workload, identity, certificate expiry, versions sent and acknowledged.
    Status(cmd::control::StatusArgs),
    /// Revoke a workload identity, a certificate serial or a bootstrap token id: the CA stops issuing for it, proxies refuse it.
    Revoke(cmd::control::RevokeArgs),
    /// A whole local mesh from a directory of Istio YAML: control plane, proxies, workloads.
    Up(cmd::up::Args),
    /// Run a command inside a workload of a running `meshward up`, as its application: its proxy captures the command's calls.
    Exec(cmd::exec::Args),
    /// A tiny workload for demos and tests: echoes what it received, calls other URLs.
    DemoApp(cmd::demo_app::Args),
    /// A small external authorizer for CUSTOM policies (Envoy's gRPC ext_authz API): decides on a header and the caller's SPIFFE ID.
    DemoAuthz(cmd::demo_authz::Args),
    /// The sidecar: mutual TLS, JWT and authorization in front of a workload.
    Proxy(Box<cmd::proxy::Args>),
    /// The ingress gateway: serves the Gateways that select it, routes by VirtualServices, enforces policies at the edge, forwards over mutual TLS.
    Gateway(Box<cmd::gateway::Args>),
    /// Transparent mode: install, remove or show the iptables rules that send a workload's traffic through its proxy.
    #[command(subcommand)]
    Capture(cmd::capture::CaptureCommand),
    /// Runs a command so that it stops with the meshward that started it (used by `up`).
    #[command(hide = true)]
    Guard(cmd::guard::Args),
}

fn main() -> ExitCode {
    // First: a child of `up` (or of a test) must not run on without it.
    if let Err(e) = children::honour_parent() {
        eprintln!("error: {}", error_chain(&*e));
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHWARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: `up` sends proxies' logs to files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Validate(args) => cmd::validate::run(args),
        Command::Check(args) => cmd::check::run(args),
        Command::Describe(args) => cmd::describe::run(args),
        Command::Suggest(args) => cmd::suggest::run(args),
        Command::Replay(args) => cmd::replay::run(args),
        Command::Ca(command) => cmd::ca::run(command),
        Command::Token(command) => cmd::ca::run_token(command),
        Command::Server(args) => cmd::server::run(*args),
        Command::Proxy(args) => cmd::proxy::run(*args),
        Command::Gateway(args) => cmd::gateway::run(*args),
        Command::Capture(command) => cmd::capture::run(command),
        Command::DemoApp(args) => cmd::demo_app::run(args),
        Command::DemoAuthz(args) => cmd::demo_authz::run(args),
        Command::Up(args) => cmd::up::run(args),
        Command::Exec(args) => cmd::exec::run(args),
        Command::Guard(args) => cmd::guard::run(args),
        Command::Apply(args) => cmd::control::apply(args),
        Command::Get(args) => cmd::control::get(args),
        Command::Delete(args) => cmd::control::delete(args),
        Command::Status(args) => cmd::control::status(args),
        Command::Revoke(args) => cmd::control::revoke(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once: a cause that a level already wrote into its
            // own message is not printed again after it.
            eprintln!("error: {}", error_chain(&*e));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and positional argument of every command, hidden ones
    /// included, says in `--help` what it is: clap's own `--help` and
    /// `--version` aside.
    #[test]
    fn every_argument_of_every_command_has_a_description() {
        fn walk(
            command: &clap::Command,
            path: &str,
            checked: &mut usize,
            missing: &mut Vec<String>,
        ) {
            let path = format!("{path} {}", command.get_name()).trim().to_owned();
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                *checked += 1;
                let described = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !described {
                    missing.push(format!("{path}: {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &path, checked, missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let (mut checked, mut missing) = (0, Vec::new());
        walk(&command, "", &mut checked, &mut missing);
        // The walk reached the commands' arguments (there are well over 100).
        assert!(checked > 100, "only {checked} arguments found");
        assert!(
            missing.is_empty(),
            "arguments without a description:\n{}",
            missing.join("\n")
        );
    }
}
