//! Test support: scratch network namespaces, so that tests run the real
//! iptables without ever touching the machine's own rules, and a
//! transcript to read a dry run back.
//!
//! Compiled with the `testing` feature (the crate's own tests enable it;
//! other crates' tests may too).

// Test support: a failed setup step must fail the test at once, where it
// happened, so unwrap and expect are the right tools here, as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Runner;

/// True when the test runs as root; otherwise says that it is skipped.
/// Use as `if !testing::root_or_skip() { return; }`.
pub fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    println!("skipped: needs root (creates a network namespace)");
    false
}

/// A network namespace of its own (`mw-cap-<pid>-<n>`), deleted when
/// dropped, also when the test panics. Its rules start empty.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mw-cap-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(status.success(), "ip netns add {name}: {status}");
        Netns { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A runner whose commands run in this namespace.
    pub fn runner(&self) -> Runner {
        Runner::system().in_netns(&self.name)
    }

    /// Runs a program in the namespace; its standard output, or a panic
    /// with its standard error.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("running ip netns exec");
        assert!(
            output.status.success(),
            "{program} {args:?} in {}: {}\n{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// `iptables-save` (or `ip6tables-save`) of every table, without the
    /// comment lines (which carry a timestamp) and with chain counters
    /// zeroed, so two states compare by their rules.
    pub fn rules(&self, save: &str) -> String {
        self.exec(save, &[])
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.find(" [") {
                Some(at) if line.starts_with(':') => format!("{} [0:0]\n", &line[..at]),
                _ => format!("{line}\n"),
            })
            .collect()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A writer whose text can be read back: give a clone to
/// [`Runner::dry_run`], then read [`Transcript::text`].
#[derive(Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<u8>>>);

impl Transcript {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
