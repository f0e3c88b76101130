//! Child processes that never outlive the meshward that started them.
//!
//! `meshward up` starts a control plane, proxies and applications, and the
//! tests start meshward processes. However the parent ends — Ctrl-C,
//! SIGTERM, SIGHUP when its terminal closes, SIGKILL, a crash — what it
//! started ends too:
//!
//! - The parent names itself in [`PARENT_PID_ENV`] on every child it starts
//!   ([`Group::spawn`] does it). A meshward process that finds the variable
//!   ([`honour_parent`], first thing in `main`) asks the kernel for SIGTERM
//!   when its parent dies (`PR_SET_PDEATHSIG`), then checks that its parent
//!   is still that process: if the parent died before the request was in
//!   place, it exits at once instead of running unowned.
//! - A command that is not meshward (`meshward.io/command`) runs under the
//!   hidden `meshward guard`, which honours the variable for it and stops
//!   the command's whole process group when it is stopped or its parent
//!   dies (`cmd/guard.rs`).
//! - `up`'s children share one process group of their own ([`Group`]), so
//!   the terminal's Ctrl-C and hang-up reach `up` alone, and it stops them
//!   in order: proxies and applications first, the control plane last, and
//!   then whatever of the group is left.
//!
//! The kernel sends the parent-death signal when the *thread* that started
//! the child exits, not the process: a parent must start its children from
//! a thread that lives as long as it does (`up` uses its main thread).

use std::io;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// The environment variable naming the process a meshward child must not
/// outlive (its pid, in decimal).
pub const PARENT_PID_ENV: &str = "MESHWARD_PARENT_PID";

/// In a child: if [`PARENT_PID_ENV`] names a process, be sent SIGTERM when
/// it dies, and refuse to run if it already has.
pub fn honour_parent() -> anyhow::Result<()> {
    let Some(value) = std::env::var_os(PARENT_PID_ENV) else {
        return Ok(());
    };
    let expected: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|pid| *pid > 0)
        .with_context(|| format!("{PARENT_PID_ENV}={value:?} is not a process id; unset it"))?;
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
        .context("asking to be stopped when the parent process dies (PR_SET_PDEATHSIG)")?;
    // After the request, so a parent that died before it is seen here.
    let parent = nix::unistd::getppid().as_raw();
    if parent != expected {
        bail!(
            "the process that started this one ({expected}, {PARENT_PID_ENV}) has already exited; not running without it"
        );
    }
    Ok(())
}

/// Makes `command`'s process stop when this one dies: see the module docs.
/// Call from a thread that lives as long as the process.
pub fn tie(command: &mut Command) -> &mut Command {
    command.env(PARENT_PID_ENV, std::process::id().to_string())
}

/// Processes started together, in one process group of their own; stopped
/// (SIGTERM, then SIGKILL after a grace period) when dropped.
#[derive(Default)]
pub struct Group {
    children: Vec<(String, Child)>,
    /// Children (by pid) whose exit [`Self::exited`] reported.
    reported: std::collections::BTreeSet<u32>,
    /// The group: the first child's pid.
    id: Option<Pid>,
}

impl Group {
    /// How long children get to stop before they are killed.
    const GRACE: Duration = Duration::from_secs(5);

    /// Starts `command` in the group, tied to this process, with no
    /// standard input (the terminal belongs to `up`).
    pub fn spawn(&mut self, name: &str, command: &mut Command) -> anyhow::Result<&mut Child> {
        use std::os::unix::process::CommandExt;
        let child = tie(command)
            .stdin(Stdio::null())
            .process_group(self.id.map_or(0, Pid::as_raw))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if self.id.is_none() {
            self.id = Some(Pid::from_raw(pid_i32(child.id())?));
        }
        self.children.push((name.to_owned(), child));
        let (_, child) = self.children.last_mut().context("the child just started")?;
        Ok(child)
    }

    /// The process group's id, once a child was started.
    pub fn id(&self) -> Option<i32> {
        self.id.map(Pid::as_raw)
    }

    /// Names and statuses of processes that exited since the last call.
    pub fn exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut exited = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait()
                && self.reported.insert(child.id())
            {
                exited.push((name.clone(), status));
            }
        }
        exited
    }

    /// SIGTERM to each child, newest first (proxies and applications before
    /// the control plane); after [`Self::GRACE`], SIGKILL to whatever is
    /// left of the group. Every child is reaped.
    pub fn stop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None))
                && let Ok(pid) = pid_i32(child.id())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Self::GRACE;
        while Instant::now() < deadline && self.running() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // While a child is unreaped the group's id cannot be reused, so this
        // reaches only what this group started.
        if let Some(group) = self.id
            && self.running()
        {
            let _ = killpg(group, Signal::SIGKILL);
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }

    fn running(&mut self) -> bool {
        self.children
            .iter_mut()
            .any(|(_, child)| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pid_i32(pid: u32) -> anyhow::Result<i32> {
    i32::try_from(pid).context("a process id out of range")
}

/// The signals that stop a process which stops others (`up`, `guard`):
/// SIGTERM, SIGINT (Ctrl-C), and SIGHUP (its terminal closed) unless it was
/// started with SIGHUP ignored (`nohup`), which it then keeps ignoring.
///
/// Once installed they no longer end the process by themselves, and one
/// that arrives before [`Self::recv`] is called is not lost.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Installs the handlers; needs a Tokio runtime context.
    pub fn install() -> io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: if ignored_at_start(Signal::SIGHUP) {
                None
            } else {
                Some(signal(SignalKind::hangup())?)
            },
        })
    }

    /// Waits for one of the signals; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        let hangup = async {
            match &mut self.hangup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
            _ = hangup => "SIGHUP",
        }
    }
}

/// Whether `signal` is ignored by this process (inherited from its
/// launcher, as `nohup` does), from `SigIgn` in `/proc/self/status`.
fn ignored_at_start(signal: Signal) -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| ignored_in(&s, signal))
}

/// Whether a `/proc/PID/status` text says `signal` is ignored.
fn ignored_in(status: &str, signal: Signal) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal as u64 - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ignored_signal_is_read_from_the_status_mask() {
        // As `nohup` leaves it: SIGHUP (1) ignored, and SIGPIPE (13).
        let status = "Name:\tmeshward\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n";
        assert!(ignored_in(status, Signal::SIGHUP));
        assert!(ignored_in(status, Signal::SIGPIPE));
        assert!(!ignored_in(status, Signal::SIGTERM));
        assert!(!ignored_in("SigIgn:\t0000000000000000\n", Signal::SIGHUP));
        assert!(!ignored_in("", Signal::SIGHUP));
    }
}
