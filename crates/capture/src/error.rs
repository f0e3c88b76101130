//! What can go wrong, each saying what to do about it.

use std::path::PathBuf;

/// An error from planning, installing, removing or showing capture rules.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The configuration cannot be turned into rules (names the option).
    #[error("invalid capture configuration: {0}")]
    Config(String),

    /// `/etc/resolv.conf` (or the file given) could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    ResolvConf { path: PathBuf, reason: String },

    /// A program that capture runs is not installed.
    #[error(
        "`{binary}` was not found on PATH: install the {package} package (Debian: apt-get install {package})"
    )]
    ToolMissing {
        binary: String,
        package: &'static str,
    },

    /// The kernel refused the change for want of privileges.
    #[error(
        "`{command}` was refused: capturing traffic needs root or CAP_NET_ADMIN in the workload's network namespace ({stderr})"
    )]
    PermissionDenied { command: String, stderr: String },

    /// IPv6 capture is on, but `ip6tables` cannot work in this kernel.
    #[error(
        "IPv6 capture is on, but `{command}` cannot work here: this kernel has no IPv6 (or no IPv6 NAT) support ({stderr}); turn IPv6 capture off with --ipv6=false"
    )]
    Ipv6Unavailable { command: String, stderr: String },

    /// Any other failure of a command.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    /// A command could not be started or talked to.
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}
