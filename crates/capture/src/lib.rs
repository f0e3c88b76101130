//! Transparent capture: the iptables rules that send a workload's TCP
//! traffic (and optionally its DNS) through its meshward proxy, as Istio's
//! `istio-iptables` does for a sidecar, so applications need no change.
//!
//! - [`plan`] turns a [`CaptureConfig`] into the exact
//!   `iptables-restore --noflush` input for IPv4 and IPv6 (pure; see
//!   [`plan`](mod@plan) for the rules and where they differ from Istio's).
//! - [`install`] applies it, replacing whatever meshward had installed
//!   before: installing twice leaves the same rules as installing once.
//! - [`uninstall`] removes meshward's chains and the jumps to them, and
//!   nothing else.
//! - [`show`] prints meshward's rules as they are in force.
//!
//! Everything goes through the `iptables` tools (either backend; on Debian
//! the nft one), run by a [`Runner`]: for real, inside a network namespace,
//! or as a dry run. Each family is one `iptables-restore` call, and each
//! table in it one transaction, so no packet sees half a ruleset.
//!
//! Redirection is nat `REDIRECT` (not TPROXY): the proxy's capture
//! listeners read the original destination with `SO_ORIGINAL_DST`. What
//! the proxy must do for the rules to work:
//! - run under one of [`CaptureConfig::proxy_uids`] or
//!   [`CaptureConfig::proxy_gids`], or set [`CaptureConfig::proxy_mark`]
//!   (`SO_MARK`) on every socket it opens;
//! - bind `127.0.0.6` (`::6`, which [`install`] puts on `lo` as Istio
//!   does) as the source when it forwards an inbound connection to the
//!   workload's own address, which would otherwise be captured again;
//! - listen for DNS on loopback at [`CaptureConfig::dns_port`] (UDP and
//!   TCP): `REDIRECT` of locally generated packets goes to `127.0.0.1`
//!   (`::1`).

#![forbid(unsafe_code)]

mod config;
mod error;
pub mod plan;
mod runner;
mod saved;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{
    CaptureConfig, DEFAULT_PROXY_ID, Ports, RESOLV_CONF, all_addresses, nameservers, port,
    port_list,
};
pub use error::CaptureError;
pub use plan::{Family, Plan, RuleSet, plan};
pub use runner::Runner;

/// Installs the rules for `cfg`, replacing meshward's rules in force (in
/// both families; with IPv6 capture off, meshward's IPv6 rules are
/// removed where `ip6tables` works).
///
/// The configuration is checked and every family's rules are read before
/// anything changes, so a bad configuration, a missing tool or privilege,
/// or a kernel without IPv6 leaves the rules in force untouched.
pub fn install(cfg: &CaptureConfig, runner: &Runner) -> Result<(), CaptureError> {
    let plan = plan(cfg)?;
    let v4 = runner.read(Family::V4.save(), &[])?;
    let v6 = if cfg.ipv6 {
        Some(runner.read(Family::V6.save(), &[])?)
    } else {
        read_if_ipv6_works(runner)?
    };
    if cfg.ipv6 {
        add_ipv6_passthrough_source(runner)?;
    }
    replace(runner, Family::V4, &v4, Some(&plan.ipv4))?;
    if let Some(v6) = v6
        && let Err(e) = replace(runner, Family::V6, &v6, plan.ipv6.as_ref())
    {
        // Half installed would capture one family and not the other:
        // meshward's IPv4 rules are removed again, and the error says why.
        let now = runner.read(Family::V4.save(), &[])?;
        replace(runner, Family::V4, &now, None)?;
        return Err(e);
    }
    Ok(())
}

/// Removes meshward's chains, and the rules of other chains that jump to
/// them, in both families; nothing else. Nothing installed: does nothing.
/// Returns whether there was something to remove.
pub fn uninstall(runner: &Runner) -> Result<bool, CaptureError> {
    let v4 = runner.read(Family::V4.save(), &[])?;
    let v6 = read_if_ipv6_works(runner)?;
    let mut removed = replace(runner, Family::V4, &v4, None)?;
    if let Some(v6) = v6 {
        removed |= replace(runner, Family::V6, &v6, None)?;
    }
    Ok(removed)
}

/// Meshward's rules in force, per family and table, as `iptables-save`
/// prints them (chains, their rules, and the jumps into them); empty when
/// none are installed.
pub fn show(runner: &Runner) -> Result<String, CaptureError> {
    let mut out = String::new();
    let v4 = runner.read(Family::V4.save(), &[])?;
    let v6 = read_if_ipv6_works(runner)?;
    for (family, saved) in [(Family::V4, Some(v4)), (Family::V6, v6)] {
        let ours = saved.as_deref().map(saved::show).unwrap_or_default();
        if !ours.is_empty() {
            out.push_str(&format!("# {}\n{ours}", family.name()));
        }
    }
    Ok(out)
}

/// The IPv6 rules in force, or `None` where ip6tables cannot work (then
/// meshward cannot have IPv6 rules either).
fn read_if_ipv6_works(runner: &Runner) -> Result<Option<String>, CaptureError> {
    match runner.read(Family::V6.save(), &[]) {
        Ok(saved) => Ok(Some(saved)),
        Err(CaptureError::Ipv6Unavailable { .. } | CaptureError::ToolMissing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Puts `::6` on `lo`, as Istio's `istio-iptables` does: unlike
/// `127.0.0.6` (in `127.0.0.0/8`, all local), an IPv6 address can be bound
/// as a source only once it is on an interface, and the proxy binds it
/// when it forwards inbound connections to the workload's address. It is
/// left in place by [`uninstall`] (it changes nothing by itself, and may
/// not be meshward's).
fn add_ipv6_passthrough_source(runner: &Runner) -> Result<(), CaptureError> {
    // `replace`: adds the address, or leaves it as it is when present.
    runner.change(
        "ip",
        &["-6", "addr", "replace", "::6/128", "dev", "lo"],
        None,
    )
}

/// Makes meshward's part of one family's rules `planned` (none: removed);
/// whether there was anything to do.
fn replace(
    runner: &Runner,
    family: Family,
    saved: &str,
    planned: Option<&RuleSet>,
) -> Result<bool, CaptureError> {
    match saved::replacement(saved, planned) {
        Some(input) => {
            runner.change(family.restore(), &["--noflush"], Some(&input))?;
            Ok(true)
        }
        None => Ok(false),
    }
}
