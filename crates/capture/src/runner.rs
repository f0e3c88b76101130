//! How the iptables tools are run: for real, inside a network namespace
//! (`ip netns exec`), or as a dry run that prints what would change.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::CaptureError;

/// Runs `iptables-save` (reads) and `iptables-restore` (changes).
///
/// A dry run still reads the rules in force, so that it prints exactly the
/// changes a real run would make, and prints each change instead of
/// making it. If it cannot read them (no root, say), it says so and prints
/// the changes as if nothing were installed.
pub struct Runner {
    prefix: Vec<String>,
    dry_run: Option<Arc<Mutex<dyn Write + Send>>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("prefix", &self.prefix)
            .field("dry_run", &self.is_dry_run())
            .finish()
    }
}

impl Runner {
    /// Runs the commands in this process's network namespace.
    pub fn system() -> Runner {
        Runner {
            prefix: Vec::new(),
            dry_run: None,
        }
    }

    /// Prints every change to `out` instead of making it.
    pub fn dry_run(out: impl Write + Send + 'static) -> Runner {
        Runner {
            prefix: Vec::new(),
            dry_run: Some(Arc::new(Mutex::new(out))),
        }
    }

    /// Runs every command inside the named network namespace
    /// (`ip netns exec NAME ...`).
    pub fn in_netns(mut self, name: &str) -> Runner {
        self.prefix = ["ip", "netns", "exec", name]
            .into_iter()
            .map(str::to_owned)
            .collect();
        self
    }

    pub fn is_dry_run(&self) -> bool {
        self.dry_run.is_some()
    }

    /// Runs a command that only reads; returns its standard output.
    pub(crate) fn read(&self, program: &str, args: &[&str]) -> Result<String, CaptureError> {
        match self.execute(program, args, None) {
            Err(e) if self.is_dry_run() => {
                self.print(&format!(
                    "# could not read the rules in force ({e});\n# what follows assumes that no meshward rule is installed\n"
                ));
                Ok(String::new())
            }
            result => result,
        }
    }

    /// Runs a command that changes something, with `input` (if any) on its
    /// standard input; a dry run prints it instead.
    pub(crate) fn change(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<(), CaptureError> {
        if self.is_dry_run() {
            let command = self.command_line(program, args);
            self.print(&match input {
                Some(input) => format!("{command} <<'EOF'\n{input}EOF\n"),
                None => format!("{command}\n"),
            });
            return Ok(());
        }
        self.execute(program, args, input).map(drop)
    }

    fn print(&self, text: &str) {
        if let Some(out) = &self.dry_run {
            // A poisoned lock only means another print panicked; the
            // writer itself is still usable.
            let mut out = out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Dry-run output is best effort, as println! would be.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }

    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut words: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        words.push(program);
        words.extend_from_slice(args);
        words.join(" ")
    }

    fn execute(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, CaptureError> {
        let command = self.command_line(program, args);
        let (first, rest) = match self.prefix.split_first() {
            Some((ip, rest)) => (ip.as_str(), {
                let mut rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                rest.push(program);
                rest.extend_from_slice(args);
                rest
            }),
            None => (program, args.to_vec()),
        };
        let mut child = Command::new(first)
            .args(&rest)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Untranslated messages: they are matched below.
            .env("LC_ALL", "C")
            .spawn()
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => missing(first),
                _ => CaptureError::Io {
                    command: command.clone(),
                    source,
                },
            })?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A write error (the tool exited early) shows in its status
            // and stderr below, which say more.
            let _ = stdin.write_all(input.as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|source| CaptureError::Io {
                command: command.clone(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !output.status.success() {
            return Err(classify(
                program,
                command,
                output.status.to_string(),
                stderr,
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn missing(binary: &str) -> CaptureError {
    CaptureError::ToolMissing {
        binary: binary.to_owned(),
        package: if binary == "ip" {
            "iproute2"
        } else {
            "iptables"
        },
    }
}

/// Says why a command failed, in terms of what to do.
fn classify(program: &str, command: String, status: String, stderr: String) -> CaptureError {
    // `ip netns exec` reports a missing program itself.
    if stderr.contains(&format!("exec of \"{program}\" failed"))
        && stderr.contains("No such file or directory")
    {
        return missing(program);
    }
    if stderr.contains("Permission denied")
        || stderr.contains("you must be root")
        || stderr.contains("Operation not permitted")
    {
        return CaptureError::PermissionDenied { command, stderr };
    }
    if program.starts_with("ip6tables")
        && (stderr.contains("Address family not supported")
            || stderr.contains("Table does not exist")
            || stderr.contains("Protocol not supported"))
    {
        return CaptureError::Ipv6Unavailable { command, stderr };
    }
    CaptureError::CommandFailed {
        command,
        status,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_say_what_is_needed() {
        let root = classify(
            "iptables-restore",
            "iptables-restore --noflush".into(),
            "exit status: 4".into(),
            "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)".into(),
        );
        assert!(
            root.to_string()
                .contains("needs root or CAP_NET_ADMIN in the workload's network namespace"),
            "{root}"
        );
        let v6 = classify(
            "ip6tables-save",
            "ip6tables-save".into(),
            "exit status: 1".into(),
            "ip6tables-save v1.8.9 (legacy): Cannot initialize: Address family not supported by protocol".into(),
        );
        assert!(v6.to_string().contains("--ipv6=false"), "{v6}");
        let netns = classify(
            "iptables-save",
            "ip netns exec x iptables-save".into(),
            "exit status: 255".into(),
            "exec of \"iptables-save\" failed: No such file or directory".into(),
        );
        assert_eq!(
            netns.to_string(),
            "`iptables-save` was not found on PATH: install the iptables package (Debian: apt-get install iptables)"
        );
        let other = classify(
            "iptables-restore",
            "iptables-restore --noflush".into(),
            "exit status: 2".into(),
            "line 3: RULE_APPEND failed".into(),
        );
        assert_eq!(
            other.to_string(),
            "`iptables-restore --noflush` failed (exit status: 2): line 3: RULE_APPEND failed"
        );
    }

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let runner = Runner::system();
        let e = runner
            .read("meshward-no-such-iptables-save", &[])
            .unwrap_err();
        assert!(
            e.to_string().starts_with("`meshward-no-such-iptables-save` was not found on PATH: install the iptables package"),
            "{e}"
        );
        assert!(
            missing("ip")
                .to_string()
                .contains("apt-get install iproute2")
        );
    }

    #[test]
    fn a_dry_run_prints_changes_with_their_input() {
        let out = crate::testing::Transcript::default();
        let runner = Runner::dry_run(out.clone()).in_netns("ns1");
        runner
            .change("iptables-restore", &["--noflush"], Some("*nat\nCOMMIT\n"))
            .unwrap();
        assert_eq!(
            out.text(),
            "ip netns exec ns1 iptables-restore --noflush <<'EOF'\n*nat\nCOMMIT\nEOF\n"
        );
    }
}
