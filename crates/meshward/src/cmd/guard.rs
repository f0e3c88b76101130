//! `meshward guard -- PROGRAM [ARGS]` (hidden): runs a command that is not
//! meshward so that it cannot outlive the meshward that started it.
//!
//! `up` runs each `meshward.io/command` as `meshward guard -- sh -c
//! COMMAND`. The guard itself honours `MESHWARD_PARENT_PID` like every
//! meshward process (it gets SIGTERM when `up` dies, see `children.rs`);
//! the command runs in a process group of its own, so whatever it starts —
//! a shell's background jobs, a pipeline — is stopped with it. The guard
//! stops that whole group when it gets SIGTERM, SIGINT or SIGHUP, and also
//! when the command exits on its own (what it left behind goes too). It
//! exits with the command's status (128 + N for a signal N).

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::children::{PARENT_PID_ENV, StopSignals};

/// How long the command's group gets to stop before it is killed; shorter
/// than the time `up` gives the guard itself.
const GRACE: Duration = Duration::from_secs(3);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Before the command starts, so that no stop request is missed.
        let mut signals = StopSignals::install().context("installing signal handlers")?;
        let (program, rest) = args.command.split_first().context("no command")?;
        let mut child = tokio::process::Command::new(program)
            .args(rest)
            // The command is not meshward's child in the variable's sense.
            .env_remove(PARENT_PID_ENV)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;
        let group = Pid::from_raw(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .context("the command's process id")?,
        );
        let status = tokio::select! {
            status = child.wait() => Some(status?),
            _ = signals.recv() => None,
        };
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        let status = match status {
            Some(status) => status,
            None => match tokio::time::timeout(GRACE, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    let _ = killpg(group, Signal::SIGKILL);
                    child.wait().await?
                }
            },
        };
        // The rest of the group (reparented away from the command when it
        // exited) gets the rest of the grace period, then SIGKILL.
        while Instant::now() < deadline && killpg(group, None).is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if killpg(group, None).is_ok() {
            let _ = killpg(group, Signal::SIGKILL);
        }
        Ok(exit_code(status))
    })
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
