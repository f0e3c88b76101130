//! The rules, as pure data: [`plan`] turns a [`CaptureConfig`] into the
//! `iptables-restore --noflush` input for each address family.
//!
//! The model is Istio's `istio-iptables` in REDIRECT mode
//! (`tools/istio-iptables/pkg/capture/run.go`), rule for rule and in its
//! order, with meshward's chain names:
//!
//! - nat `PREROUTING` → [`INBOUND`]: the proxy's own ports return, then
//!   excluded ports, then the captured ports go to [`IN_REDIRECT`]
//!   (`REDIRECT --to-ports` the inbound port).
//! - nat `OUTPUT` → [`OUTPUT`]: excluded ports return; connections from the
//!   inbound passthrough source (`127.0.0.6`, `::6`) return; the proxy's own
//!   loopback connections to an address other than `127.0.0.1`/`::1` (a
//!   workload calling itself through a service address comes back on the
//!   workload's address) go to [`IN_REDIRECT`], so they get inbound policy;
//!   other loopback traffic returns; everything else of the proxy returns;
//!   DNS to the nameservers goes to the DNS port; `127.0.0.1`/`::1` return;
//!   excluded ranges return; included ranges go to [`REDIRECT`]
//!   (`REDIRECT --to-ports` the outbound port).
//! - with DNS capture, raw `OUTPUT`/`PREROUTING` put the proxy's UDP
//!   conversations with the nameservers in conntrack zone 1 and the
//!   applications' (redirected to the proxy) in zone 2, as Istio does, so
//!   a source port the proxy reuses can never match the conntrack entry
//!   of an application's redirected query.
//!
//! Where meshward differs, and why:
//!
//! - The proxy's identity is its uids, gids and (new) socket mark. Istio
//!   emits "loopback traffic not of this uid returns" once per uid and per
//!   gid, so with two identities the first identity's rule returns the
//!   second's loopback traffic before that one's inbound redirect is
//!   reached. Meshward emits the redirect for each identity, then one
//!   "loopback traffic of none of them returns" rule, then the
//!   per-identity returns: the same result for one uid, and right for
//!   several (a marked proxy running as root, say).
//! - The DNS port exception in the loopback redirect applies to every
//!   identity (Istio leaves it out of the gid's rule).
//! - There is no HBONE tunnel port (Istio's 15008); the proxy's own ports
//!   (admin, outbound, inbound, DNS) always return in [`INBOUND`] instead,
//!   even from an include list.
//! - An include list minus the excluded ports is captured (Istio ignores
//!   exclusions when given a list).
//! - An included range whose address is a loopback address drops the
//!   "other loopback traffic returns" rule in its own family (Istio: in
//!   both).
//! - DNS is captured only to the given nameservers (no "capture all DNS"),
//!   and chains are created only in a family that has some.

use std::fmt;

use ipnet::IpNet;

use crate::CaptureError;
use crate::config::{CaptureConfig, Ports};

/// Every meshward chain starts with this; [`crate::uninstall`] removes all
/// of them.
pub const PREFIX: &str = "MESHWARD_";
/// nat: inbound TCP from `PREROUTING`: what to capture.
pub const INBOUND: &str = "MESHWARD_INBOUND";
/// nat: redirects to the inbound capture port.
pub const IN_REDIRECT: &str = "MESHWARD_IN_REDIRECT";
/// nat: redirects to the outbound capture port.
pub const REDIRECT: &str = "MESHWARD_REDIRECT";
/// nat: locally generated traffic from `OUTPUT`: what to capture.
pub const OUTPUT: &str = "MESHWARD_OUTPUT";
/// nat: DNS redirection; raw: outgoing DNS conntrack zones.
pub const OUTPUT_DNS: &str = "MESHWARD_OUTPUT_DNS";
/// raw: conntrack zone of the nameservers' answers.
pub const INBOUND_DNS: &str = "MESHWARD_INBOUND_DNS";

/// The tables meshward writes to, in the order they are applied.
pub const TABLES: [&str; 2] = ["nat", "raw"];

/// An address family and its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The program that applies a ruleset atomically.
    pub fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The program that prints the rules in force.
    pub fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// The address applications use for "this host, not a workload".
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source the proxy binds when it forwards inbound connections to
    /// the workload's own address, so they are not captured again.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    /// A single address, as a host network of this family (`None` for the
    /// other family).
    fn host(self, ip: &std::net::IpAddr) -> Option<IpNet> {
        let net = IpNet::from(*ip);
        self.holds(&net).then_some(net)
    }
}

/// One table's part of a ruleset: chains to create (or flush), then rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub chains: Vec<&'static str>,
    /// `-A CHAIN ...` lines, in order.
    pub rules: Vec<String>,
}

/// Everything meshward installs in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub tables: Vec<Table>,
}

impl RuleSet {
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// The `iptables-restore --noflush` input: declaring a chain creates it,
/// or flushes it when it exists; rules are appended.
impl fmt::Display for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for table in &self.tables {
            writeln!(f, "*{}", table.name)?;
            for chain in &table.chains {
                writeln!(f, ":{chain} - [0:0]")?;
            }
            for rule in &table.rules {
                writeln!(f, "{rule}")?;
            }
            writeln!(f, "COMMIT")?;
        }
        Ok(())
    }
}

/// The rules for both families ([`Plan::ipv6`] is `None` when IPv6 capture
/// is off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ipv4: RuleSet,
    pub ipv6: Option<RuleSet>,
}

impl Plan {
    pub fn rulesets(&self) -> impl Iterator<Item = &RuleSet> {
        std::iter::once(&self.ipv4).chain(self.ipv6.as_ref())
    }
}

/// What `--dry-run` and the logs show: per family, the program and the
/// input it is given.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for rules in self.rulesets() {
            writeln!(
                f,
                "# {}: {} --noflush",
                rules.family.name(),
                rules.family.restore()
            )?;
            write!(f, "{rules}")?;
        }
        Ok(())
    }
}

/// The rules for `cfg`, or why there can be none.
pub fn plan(cfg: &CaptureConfig) -> Result<Plan, CaptureError> {
    cfg.validate()?;
    Ok(Plan {
        ipv4: ruleset(cfg, Family::V4),
        ipv6: cfg.ipv6.then(|| ruleset(cfg, Family::V6)),
    })
}

/// Who the proxy is: traffic matching one of these is the proxy's own.
#[derive(Debug, Clone, Copy)]
enum Identity {
    Uid(u32),
    Gid(u32),
    Mark(u32),
}

impl Identity {
    fn all(cfg: &CaptureConfig) -> Vec<Identity> {
        let uids = cfg.proxy_uids.iter().map(|&u| Identity::Uid(u));
        let gids = cfg.proxy_gids.iter().map(|&g| Identity::Gid(g));
        uids.chain(gids)
            .chain(cfg.proxy_mark.map(Identity::Mark))
            .collect()
    }

    /// The match for this identity, or (`negated`) for anything else.
    /// Marks are written in hex, as `iptables-save` prints them.
    fn matcher(self, negated: bool) -> String {
        let not = if negated { "! " } else { "" };
        match self {
            Identity::Uid(uid) => format!("-m owner {not}--uid-owner {uid}"),
            Identity::Gid(gid) => format!("-m owner {not}--gid-owner {gid}"),
            Identity::Mark(mark) => format!("-m mark {not}--mark {mark:#x}"),
        }
    }
}

/// Rules of one table, appended in order.
struct Rules(Vec<String>);

impl Rules {
    fn add(&mut self, chain: &str, spec: impl fmt::Display) {
        self.0.push(format!("-A {chain} {spec}"));
    }
}

fn ruleset(cfg: &CaptureConfig, family: Family) -> RuleSet {
    let dns_servers: Vec<IpNet> = if cfg.capture_dns {
        cfg.dns_servers
            .iter()
            .filter_map(|ip| family.host(ip))
            .collect()
    } else {
        Vec::new()
    };
    let identities = Identity::all(cfg);
    let mut tables = vec![nat(cfg, family, &identities, &dns_servers)];
    if !dns_servers.is_empty() {
        tables.push(dns_zones(cfg, &identities, &dns_servers));
    }
    RuleSet { family, tables }
}

fn nat(cfg: &CaptureConfig, family: Family, who: &[Identity], dns: &[IpNet]) -> Table {
    let mut chains = vec![INBOUND, REDIRECT, IN_REDIRECT, OUTPUT];
    if !dns.is_empty() {
        chains.push(OUTPUT_DNS);
    }
    let mut r = Rules(Vec::new());

    // The proxy's own listeners are never captured inbound (Istio: its
    // tunnel port), whatever the lists below say.
    for port in cfg.own_ports() {
        r.add(INBOUND, format_args!("-p tcp --dport {port} -j RETURN"));
    }
    r.add(
        REDIRECT,
        format_args!("-p tcp -j REDIRECT --to-ports {}", cfg.outbound_port),
    );
    r.add(
        IN_REDIRECT,
        format_args!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_port),
    );

    // Inbound: nothing is captured when the include list is empty.
    let excluded = &cfg.exclude_inbound_ports;
    match &cfg.include_inbound_ports {
        Ports::All => {
            r.add("PREROUTING", format_args!("-p tcp -j {INBOUND}"));
            for port in excluded {
                r.add(INBOUND, format_args!("-p tcp --dport {port} -j RETURN"));
            }
            r.add(INBOUND, format_args!("-p tcp -j {IN_REDIRECT}"));
        }
        Ports::List(ports) => {
            let captured: Vec<u16> = ports
                .iter()
                .copied()
                .filter(|p| !excluded.contains(p))
                .collect();
            if !captured.is_empty() {
                r.add("PREROUTING", format_args!("-p tcp -j {INBOUND}"));
            }
            for port in captured {
                r.add(
                    INBOUND,
                    format_args!("-p tcp --dport {port} -j {IN_REDIRECT}"),
                );
            }
        }
    }

    // Outbound: everything locally generated passes through OUTPUT.
    r.add("OUTPUT", format_args!("-j {OUTPUT}"));
    for port in &cfg.exclude_outbound_ports {
        r.add(OUTPUT, format_args!("-p tcp --dport {port} -j RETURN"));
        r.add(OUTPUT, format_args!("-p udp --dport {port} -j RETURN"));
    }
    // The proxy forwarding inbound connections to the workload's address.
    r.add(
        OUTPUT,
        format_args!("-o lo -s {} -j RETURN", family.passthrough_source()),
    );
    // With DNS capture, TCP to port 53 on loopback (a local resolver) is
    // left for the DNS rules below instead.
    let not_dns = if dns.is_empty() { "" } else { "! --dport 53 " };
    let loopback = family.loopback();
    // The proxy calling the workload's own address over loopback (app →
    // service address → proxy → the same workload): inbound capture, so
    // the call gets the workload's inbound policy.
    for id in who {
        r.add(
            OUTPUT,
            format_args!(
                "-o lo ! -d {loopback} -p tcp {not_dns}{} -j {IN_REDIRECT}",
                id.matcher(false)
            ),
        );
    }
    // An application calling itself (or another process here) over
    // loopback is not captured, unless loopback addresses are included.
    let loopback_included = cfg
        .include_outbound_ip_ranges
        .iter()
        .any(|net| family.holds(net) && net.network().is_loopback());
    if !loopback_included {
        let not_the_proxy: Vec<String> = who.iter().map(|id| id.matcher(true)).collect();
        let protocol = if dns.is_empty() { "" } else { "-p tcp " };
        r.add(
            OUTPUT,
            format_args!(
                "-o lo {protocol}{not_dns}{} -j RETURN",
                not_the_proxy.join(" ")
            ),
        );
    }
    // The proxy's own traffic never loops back into it (any protocol,
    // any destination).
    for id in who {
        r.add(OUTPUT, format_args!("{} -j RETURN", id.matcher(false)));
    }
    if !dns.is_empty() {
        r.add(OUTPUT, format_args!("-j {OUTPUT_DNS}"));
        let port = cfg.dns_port;
        for server in dns {
            r.add(
                OUTPUT_DNS,
                format_args!("-p tcp --dport 53 -d {server} -j REDIRECT --to-ports {port}"),
            );
        }
        for server in dns {
            r.add(
                OUTPUT_DNS,
                format_args!("-p udp --dport 53 -d {server} -j REDIRECT --to-ports {port}"),
            );
        }
    }
    // Applications talking to this host's own services.
    r.add(OUTPUT, format_args!("-d {loopback} -j RETURN"));
    for net in cfg
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|n| family.holds(n))
    {
        r.add(OUTPUT, format_args!("-d {} -j RETURN", net.trunc()));
    }
    let included: Vec<&IpNet> = cfg
        .include_outbound_ip_ranges
        .iter()
        .filter(|n| family.holds(n))
        .collect();
    if included.iter().any(|n| n.prefix_len() == 0) {
        r.add(OUTPUT, format_args!("-j {REDIRECT}"));
    } else {
        for net in included {
            r.add(OUTPUT, format_args!("-d {} -j {REDIRECT}", net.trunc()));
        }
    }

    Table {
        name: "nat",
        chains,
        rules: r.0,
    }
}

/// Istio's DNS conntrack zones (`addDNSConntrackZones`): the proxy's
/// queries to the nameservers and its answers to applications in zone 1
/// and 2 respectively, the applications' queries in zone 2, the servers'
/// answers in zone 1.
fn dns_zones(cfg: &CaptureConfig, who: &[Identity], dns: &[IpNet]) -> Table {
    let mut r = Rules(Vec::new());
    r.add("OUTPUT", format_args!("-j {OUTPUT_DNS}"));
    for id in who {
        let id = id.matcher(false);
        r.add(
            OUTPUT_DNS,
            format_args!("-p udp --dport 53 {id} -j CT --zone 1"),
        );
        r.add(
            OUTPUT_DNS,
            format_args!("-p udp --sport {} {id} -j CT --zone 2", cfg.dns_port),
        );
    }
    r.add("PREROUTING", format_args!("-j {INBOUND_DNS}"));
    for server in dns {
        r.add(
            OUTPUT_DNS,
            format_args!("-p udp --dport 53 -d {server} -j CT --zone 2"),
        );
        r.add(
            INBOUND_DNS,
            format_args!("-p udp --sport 53 -s {server} -j CT --zone 1"),
        );
    }
    Table {
        name: "raw",
        chains: vec![OUTPUT_DNS, INBOUND_DNS],
        rules: r.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(cfg: &CaptureConfig) -> RuleSet {
        plan(cfg).unwrap().ipv4
    }

    fn v6(cfg: &CaptureConfig) -> RuleSet {
        plan(cfg).unwrap().ipv6.unwrap()
    }

    fn rules(set: &RuleSet, table: &str) -> Vec<String> {
        set.table(table).unwrap().rules.clone()
    }

    /// The rules of one chain, in order, without the `-A CHAIN ` prefix.
    fn chain(set: &RuleSet, table: &str, chain: &str) -> Vec<String> {
        let prefix = format!("-A {chain} ");
        rules(set, table)
            .iter()
            .filter_map(|r| r.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Istio's default sidecar (uid and gid 1337, everything captured),
    /// with meshward's ports and names: `empty.golden` plus inbound
    /// `inbound-ports-wildcard.golden` and the wildcard outbound range.
    #[test]
    fn default_plan_is_istios_sidecar_rules() {
        assert_eq!(
            v4(&CaptureConfig::default()).to_string(),
            "*nat
:MESHWARD_INBOUND - [0:0]
:MESHWARD_REDIRECT - [0:0]
:MESHWARD_IN_REDIRECT - [0:0]
:MESHWARD_OUTPUT - [0:0]
-A MESHWARD_INBOUND -p tcp --dport 15000 -j RETURN
-A MESHWARD_INBOUND -p tcp --dport 15001 -j RETURN
-A MESHWARD_INBOUND -p tcp --dport 15006 -j RETURN
-A MESHWARD_INBOUND -p tcp --dport 15053 -j RETURN
-A MESHWARD_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESHWARD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j MESHWARD_INBOUND
-A MESHWARD_INBOUND -p tcp -j MESHWARD_IN_REDIRECT
-A OUTPUT -j MESHWARD_OUTPUT
-A MESHWARD_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A MESHWARD_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 1337 -j MESHWARD_IN_REDIRECT
-A MESHWARD_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m owner --gid-owner 1337 -j MESHWARD_IN_REDIRECT
-A MESHWARD_OUTPUT -o lo -m owner ! --uid-owner 1337 -m owner ! --gid-owner 1337 -j RETURN
-A MESHWARD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHWARD_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESHWARD_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESHWARD_OUTPUT -j MESHWARD_REDIRECT
COMMIT
"
        );
    }

    #[test]
    fn ipv6_has_the_same_rules_with_ipv6_loopback_and_passthrough_source() {
        let cfg = CaptureConfig::default();
        let expected = v4(&cfg)
            .to_string()
            .replace("127.0.0.6/32", "::6/128")
            .replace("127.0.0.1/32", "::1/128");
        assert_eq!(v6(&cfg).to_string(), expected);
        assert!(expected.contains("-A MESHWARD_OUTPUT -o lo -s ::6/128 -j RETURN\n"));
        assert!(expected.contains(
            "-A MESHWARD_OUTPUT -o lo ! -d ::1/128 -p tcp -m owner --uid-owner 1337 -j MESHWARD_IN_REDIRECT\n"
        ));

        let v4_only = CaptureConfig {
            ipv6: false,
            ..CaptureConfig::default()
        };
        let plan = plan(&v4_only).unwrap();
        assert_eq!(plan.ipv6, None);
        assert_eq!(plan.rulesets().count(), 1);
    }

    #[test]
    fn several_uids_and_gids_are_each_excluded_and_one_rule_returns_other_loopback() {
        let cfg = CaptureConfig {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![1],
            ..CaptureConfig::default()
        };
        assert_eq!(
            chain(&v4(&cfg), "nat", OUTPUT),
            [
                "-o lo -s 127.0.0.6/32 -j RETURN",
                "-o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 3 -j MESHWARD_IN_REDIRECT",
                "-o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 4 -j MESHWARD_IN_REDIRECT",
                "-o lo ! -d 127.0.0.1/32 -p tcp -m owner --gid-owner 1 -j MESHWARD_IN_REDIRECT",
                "-o lo -m owner ! --uid-owner 3 -m owner ! --uid-owner 4 -m owner ! --gid-owner 1 -j RETURN",
                "-m owner --uid-owner 3 -j RETURN",
                "-m owner --uid-owner 4 -j RETURN",
                "-m owner --gid-owner 1 -j RETURN",
                "-d 127.0.0.1/32 -j RETURN",
                "-j MESHWARD_REDIRECT",
            ]
        );
    }

    #[test]
    fn a_marked_proxy_is_excluded_by_its_mark_wherever_a_uid_would_be() {
        // A proxy running as root, its sockets marked: no uid or gid.
        let cfg = CaptureConfig {
            proxy_uids: vec![],
            proxy_gids: vec![],
            proxy_mark: Some(1337),
            ..CaptureConfig::default()
        };
        assert_eq!(
            chain(&v4(&cfg), "nat", OUTPUT),
            [
                "-o lo -s 127.0.0.6/32 -j RETURN",
                "-o lo ! -d 127.0.0.1/32 -p tcp -m mark --mark 0x539 -j MESHWARD_IN_REDIRECT",
                "-o lo -m mark ! --mark 0x539 -j RETURN",
                "-m mark --mark 0x539 -j RETURN",
                "-d 127.0.0.1/32 -j RETURN",
                "-j MESHWARD_REDIRECT",
            ]
        );
        // With the default uid too, the mark's loopback redirect comes
        // before the rule that returns loopback traffic of neither.
        let both = CaptureConfig {
            proxy_mark: Some(0x10),
            proxy_gids: vec![],
            ..CaptureConfig::default()
        };
        assert_eq!(
            chain(&v4(&both), "nat", OUTPUT)[1..6],
            [
                "-o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 1337 -j MESHWARD_IN_REDIRECT",
                "-o lo ! -d 127.0.0.1/32 -p tcp -m mark --mark 0x10 -j MESHWARD_IN_REDIRECT",
                "-o lo -m owner ! --uid-owner 1337 -m mark ! --mark 0x10 -j RETURN",
                "-m owner --uid-owner 1337 -j RETURN",
                "-m mark --mark 0x10 -j RETURN",
            ]
        );
    }

    /// Istio's `dns-uid-gid.golden`: DNS to the resolv.conf servers goes to
    /// the DNS port, loopback rules spare port 53, and the raw table
    /// splits the proxy's DNS from the applications' in conntrack zones.
    #[test]
    fn dns_capture_redirects_only_the_nameservers_and_splits_conntrack_zones() {
        let cfg = CaptureConfig {
            capture_dns: true,
            dns_servers: vec![
                "198.18.0.53".parse().unwrap(),
                "2001:2::53".parse().unwrap(),
                "127.0.0.53".parse().unwrap(),
            ],
            ..CaptureConfig::default()
        };
        let set = v4(&cfg);
        assert_eq!(
            set.table("nat").unwrap().chains,
            [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT, OUTPUT_DNS]
        );
        assert_eq!(
            chain(&set, "nat", OUTPUT),
            [
                "-o lo -s 127.0.0.6/32 -j RETURN",
                "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 53 -m owner --uid-owner 1337 -j MESHWARD_IN_REDIRECT",
                "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 53 -m owner --gid-owner 1337 -j MESHWARD_IN_REDIRECT",
                "-o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -m owner ! --gid-owner 1337 -j RETURN",
                "-m owner --uid-owner 1337 -j RETURN",
                "-m owner --gid-owner 1337 -j RETURN",
                "-j MESHWARD_OUTPUT_DNS",
                "-d 127.0.0.1/32 -j RETURN",
                "-j MESHWARD_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&set, "nat", OUTPUT_DNS),
            [
                "-p tcp --dport 53 -d 198.18.0.53/32 -j REDIRECT --to-ports 15053",
                "-p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053",
                "-p udp --dport 53 -d 198.18.0.53/32 -j REDIRECT --to-ports 15053",
                "-p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053",
            ]
        );
        assert_eq!(
            set.table("raw").unwrap().to_owned(),
            Table {
                name: "raw",
                chains: vec![OUTPUT_DNS, INBOUND_DNS],
                rules: [
                    "-A OUTPUT -j MESHWARD_OUTPUT_DNS",
                    "-A MESHWARD_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
                    "-A MESHWARD_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
                    "-A MESHWARD_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
                    "-A MESHWARD_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
                    "-A PREROUTING -j MESHWARD_INBOUND_DNS",
                    "-A MESHWARD_OUTPUT_DNS -p udp --dport 53 -d 198.18.0.53/32 -j CT --zone 2",
                    "-A MESHWARD_INBOUND_DNS -p udp --sport 53 -s 198.18.0.53/32 -j CT --zone 1",
                    "-A MESHWARD_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j CT --zone 2",
                    "-A MESHWARD_INBOUND_DNS -p udp --sport 53 -s 127.0.0.53/32 -j CT --zone 1",
                ]
                .map(str::to_owned)
                .to_vec(),
            }
        );
        // The IPv6 server is captured in IPv6 only.
        let set6 = v6(&cfg);
        assert_eq!(
            chain(&set6, "nat", OUTPUT_DNS),
            [
                "-p tcp --dport 53 -d 2001:2::53/128 -j REDIRECT --to-ports 15053",
                "-p udp --dport 53 -d 2001:2::53/128 -j REDIRECT --to-ports 15053",
            ]
        );
        assert_eq!(
            chain(&set6, "raw", INBOUND_DNS),
            ["-p udp --sport 53 -s 2001:2::53/128 -j CT --zone 1"]
        );
    }

    #[test]
    fn dns_chains_exist_only_in_a_family_with_a_nameserver() {
        let cfg = CaptureConfig {
            capture_dns: true,
            dns_servers: vec!["198.18.0.53".parse().unwrap()],
            proxy_mark: Some(7),
            ..CaptureConfig::default()
        };
        let set6 = v6(&cfg);
        assert_eq!(set6.tables.len(), 1, "no raw table: {set6}");
        assert!(!set6.to_string().contains("DNS"), "{set6}");
        assert!(!set6.to_string().contains("--dport 53"), "{set6}");
        // The mark has its conntrack zone rules like a uid.
        assert!(
            rules(&v4(&cfg), "raw").contains(
                &"-A MESHWARD_OUTPUT_DNS -p udp --dport 53 -m mark --mark 0x7 -j CT --zone 1"
                    .to_owned()
            )
        );
        // DNS capture off: the servers are ignored.
        let off = CaptureConfig {
            capture_dns: false,
            ..cfg
        };
        assert!(!v4(&off).to_string().contains("DNS"));
    }

    #[test]
    fn an_inbound_port_list_captures_those_ports_minus_exclusions() {
        let cfg = CaptureConfig {
            include_inbound_ports: Ports::List(vec![9080, 8080, 15006]),
            exclude_inbound_ports: vec![8080],
            ..CaptureConfig::default()
        };
        let set = v4(&cfg);
        assert_eq!(
            chain(&set, "nat", INBOUND),
            [
                "-p tcp --dport 15000 -j RETURN",
                "-p tcp --dport 15001 -j RETURN",
                "-p tcp --dport 15006 -j RETURN",
                "-p tcp --dport 15053 -j RETURN",
                "-p tcp --dport 9080 -j MESHWARD_IN_REDIRECT",
                "-p tcp --dport 15006 -j MESHWARD_IN_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&set, "nat", "PREROUTING"),
            ["-p tcp -j MESHWARD_INBOUND"]
        );

        // An empty list captures nothing inbound: no jump from PREROUTING.
        let none = CaptureConfig {
            include_inbound_ports: Ports::none(),
            ..CaptureConfig::default()
        };
        assert!(chain(&v4(&none), "nat", "PREROUTING").is_empty());
        assert!(
            !v4(&none)
                .to_string()
                .contains("-j MESHWARD_IN_REDIRECT\n-A OUTPUT")
        );
    }

    #[test]
    fn excluded_ports_return_before_capture() {
        let cfg = CaptureConfig {
            exclude_inbound_ports: vec![22, 9090],
            exclude_outbound_ports: vec![5432],
            admin_port: 16000,
            ..CaptureConfig::default()
        };
        let set = v4(&cfg);
        assert_eq!(
            chain(&set, "nat", INBOUND),
            [
                "-p tcp --dport 16000 -j RETURN",
                "-p tcp --dport 15001 -j RETURN",
                "-p tcp --dport 15006 -j RETURN",
                "-p tcp --dport 15053 -j RETURN",
                "-p tcp --dport 22 -j RETURN",
                "-p tcp --dport 9090 -j RETURN",
                "-p tcp -j MESHWARD_IN_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&set, "nat", OUTPUT)[..3],
            [
                "-p tcp --dport 5432 -j RETURN",
                "-p udp --dport 5432 -j RETURN",
                "-o lo -s 127.0.0.6/32 -j RETURN",
            ]
        );
    }

    /// Whatever the include list says, no connection to one of the
    /// proxy's own ports reaches the inbound redirect: they return first.
    #[test]
    fn the_proxys_own_ports_are_always_excluded_from_inbound_capture() {
        let own = [15000, 15001, 15006, 15053];
        for include in [
            Ports::All,
            Ports::List(own.to_vec()),
            Ports::List(vec![80, 15001]),
        ] {
            let cfg = CaptureConfig {
                include_inbound_ports: include.clone(),
                ..CaptureConfig::default()
            };
            for set in plan(&cfg).unwrap().rulesets() {
                let inbound = chain(set, "nat", INBOUND);
                let first_redirect = inbound
                    .iter()
                    .position(|r| r.ends_with("-j MESHWARD_IN_REDIRECT"))
                    .unwrap();
                for port in own {
                    let returns = format!("-p tcp --dport {port} -j RETURN");
                    let at = inbound.iter().position(|r| *r == returns);
                    assert!(
                        at.is_some_and(|at| at < first_redirect),
                        "{include}: port {port} is not returned first: {inbound:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ip_ranges_are_split_by_family_exclusions_first() {
        let cfg = CaptureConfig {
            include_outbound_ip_ranges: nets(&["198.18.0.0/15", "2001:2::/48", "10.1.2.3/8"]),
            exclude_outbound_ip_ranges: nets(&["198.18.1.0/24", "2001:2::5/128"]),
            ..CaptureConfig::default()
        };
        assert_eq!(
            chain(&v4(&cfg), "nat", OUTPUT)[6..],
            [
                "-d 127.0.0.1/32 -j RETURN",
                "-d 198.18.1.0/24 -j RETURN",
                "-d 198.18.0.0/15 -j MESHWARD_REDIRECT",
                // Host bits are dropped, as iptables would.
                "-d 10.0.0.0/8 -j MESHWARD_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&v6(&cfg), "nat", OUTPUT)[6..],
            [
                "-d ::1/128 -j RETURN",
                "-d 2001:2::5/128 -j RETURN",
                "-d 2001:2::/48 -j MESHWARD_REDIRECT",
            ]
        );
        // A family with no included range is not captured outbound.
        let v4_ranges = CaptureConfig {
            include_outbound_ip_ranges: nets(&["198.18.0.0/15"]),
            ..CaptureConfig::default()
        };
        assert!(
            !rules(&v6(&v4_ranges), "nat")
                .iter()
                .any(|r| r.ends_with("-j MESHWARD_REDIRECT"))
        );
        // Including everything is one rule, whatever else is listed.
        let all = CaptureConfig {
            include_outbound_ip_ranges: nets(&["198.18.0.0/15", "0.0.0.0/0"]),
            ..CaptureConfig::default()
        };
        assert_eq!(
            chain(&v4(&all), "nat", OUTPUT).last().unwrap(),
            "-j MESHWARD_REDIRECT"
        );
    }

    /// Istio's `loopback-outbound-iprange.golden`: including a loopback
    /// address means loopback traffic is no longer returned wholesale.
    #[test]
    fn an_included_loopback_range_keeps_loopback_traffic_in_capture() {
        let cfg = CaptureConfig {
            include_outbound_ip_ranges: nets(&["127.1.2.3/32", "::/0"]),
            ..CaptureConfig::default()
        };
        let out4 = chain(&v4(&cfg), "nat", OUTPUT);
        assert!(
            !out4.iter().any(|r| r.starts_with("-o lo -m owner !")),
            "{out4:?}"
        );
        assert_eq!(out4.last().unwrap(), "-d 127.1.2.3/32 -j MESHWARD_REDIRECT");
        // IPv6 did not include its loopback: the rule stays there.
        let out6 = chain(&v6(&cfg), "nat", OUTPUT);
        assert!(out6.contains(
            &"-o lo -m owner ! --uid-owner 1337 -m owner ! --gid-owner 1337 -j RETURN".to_owned()
        ));
    }

    #[test]
    fn plan_prints_each_family_with_its_restore_command() {
        let cfg = CaptureConfig::default();
        let plan = plan(&cfg).unwrap();
        let text = plan.to_string();
        assert!(text.starts_with("# IPv4: iptables-restore --noflush\n*nat\n"));
        assert!(text.contains("COMMIT\n# IPv6: ip6tables-restore --noflush\n*nat\n"));
        assert_eq!(
            text,
            format!(
                "# IPv4: iptables-restore --noflush\n{}# IPv6: ip6tables-restore --noflush\n{}",
                plan.ipv4,
                plan.ipv6.as_ref().unwrap()
            )
        );
    }
}
