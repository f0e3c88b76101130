//! The rules in force, from `iptables-save` output: which chains and rules
//! are meshward's, and the `iptables-restore --noflush` input that replaces
//! exactly those (or removes them) and touches nothing else.
//!
//! Meshward's are the chains named `MESHWARD_*` (with their rules) and the
//! rules of other chains that jump (`-j`/`-g`) to one of them. Everything
//! else — other chains, a user's rules in `OUTPUT` — is left as it is.

use crate::plan::{self, RuleSet, TABLES};

/// Meshward's part of one table of the rules in force.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Owned {
    /// `:MESHWARD_X ...` chain lines, as saved.
    pub chain_lines: Vec<String>,
    /// The chain names.
    pub chains: Vec<String>,
    /// Every line to show: chain lines, then rules of meshward chains and
    /// jumps into them, in saved order.
    pub rule_lines: Vec<String>,
    /// Jumps into meshward chains from other chains: (chain, rule spec).
    pub jumps: Vec<(String, String)>,
}

/// Meshward's part of each table of `iptables-save` output (only tables
/// where meshward has something, among [`TABLES`]), in saved order.
pub(crate) fn owned(save_output: &str) -> Vec<(String, Owned)> {
    let mut tables: Vec<(String, Owned)> = Vec::new();
    let mut table: Option<String> = None;
    for line in save_output.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.to_owned());
            continue;
        }
        let Some(name) = table.as_deref().filter(|t| TABLES.contains(t)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_ours(chain) {
                let owned = entry(&mut tables, name);
                owned.chain_lines.push(line.to_owned());
                owned.chains.push(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            if is_ours(chain) {
                entry(&mut tables, name).rule_lines.push(line.to_owned());
            } else if jumps_to_ours(spec) {
                let owned = entry(&mut tables, name);
                owned.rule_lines.push(line.to_owned());
                owned.jumps.push((chain.to_owned(), spec.to_owned()));
            }
        }
    }
    tables
}

/// The entry of `name`, added (last) if missing.
fn entry<'a>(tables: &'a mut Vec<(String, Owned)>, name: &str) -> &'a mut Owned {
    let at = match tables.iter().position(|(t, _)| t == name) {
        Some(at) => at,
        None => {
            tables.push((name.to_owned(), Owned::default()));
            tables.len() - 1
        }
    };
    &mut tables[at].1
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(plan::PREFIX)
}

/// Whether a rule's target is a meshward chain. The rule is split as a
/// shell would, since iptables-save quotes strings (a comment may say
/// "-j MESHWARD_OUTPUT" without being a jump).
fn jumps_to_ours(spec: &str) -> bool {
    let words =
        shlex::split(spec).unwrap_or_else(|| spec.split_whitespace().map(str::to_owned).collect());
    words.windows(2).any(|pair| {
        matches!(pair[0].as_str(), "-j" | "--jump" | "-g" | "--goto") && is_ours(&pair[1])
    })
}

/// The `iptables-restore --noflush` input that makes meshward's part of
/// `saved` (one family's `iptables-save` output) exactly `planned`, or
/// nothing when `planned` is `None`; `None` when there is nothing to do.
///
/// Per table, in one transaction: the jumps into meshward chains are
/// deleted; planned chains are declared (created, or flushed if they
/// exist); meshward chains not planned are flushed and deleted; then the
/// planned rules are appended. Installing twice therefore leaves the same
/// rules as installing once, and there is no moment in between with the
/// old chains gone and the new ones not yet there.
pub(crate) fn replacement(saved: &str, planned: Option<&RuleSet>) -> Option<String> {
    let owned = owned(saved);
    let mut input = String::new();
    for name in TABLES {
        let old = owned.iter().find(|(t, _)| t == name).map(|(_, o)| o);
        let new = planned.and_then(|p| p.table(name));
        if old.is_none() && new.is_none() {
            continue;
        }
        input.push_str(&format!("*{name}\n"));
        if let Some(old) = old {
            for (chain, spec) in &old.jumps {
                input.push_str(&format!("-D {chain} {spec}\n"));
            }
        }
        let new_chains: &[&str] = new.map(|t| t.chains.as_slice()).unwrap_or_default();
        for chain in new_chains {
            input.push_str(&format!(":{chain} - [0:0]\n"));
        }
        let doomed: Vec<&String> = old
            .map(|o| o.chains.iter())
            .into_iter()
            .flatten()
            .filter(|c| !new_chains.contains(&c.as_str()))
            .collect();
        for chain in &doomed {
            input.push_str(&format!("-F {chain}\n"));
        }
        for chain in &doomed {
            input.push_str(&format!("-X {chain}\n"));
        }
        for rule in new.map(|t| t.rules.as_slice()).unwrap_or_default() {
            input.push_str(rule);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
    }
    (!input.is_empty()).then_some(input)
}

/// Meshward's lines of one family's `iptables-save` output, per table
/// (`*nat` ... `COMMIT`); empty when there are none.
pub(crate) fn show(saved: &str) -> String {
    let mut out = String::new();
    for (name, owned) in owned(saved) {
        out.push_str(&format!("*{name}\n"));
        for line in owned.chain_lines.iter().chain(&owned.rule_lines) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaptureConfig;

    /// What iptables-nft 1.8 prints with meshward installed (some rules
    /// elided) next to a user's own chain, rule and commented rule.
    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 29 15:26:45 2026
*filter
:INPUT ACCEPT [0:0]
:MESHWARD_NOT_OURS_HERE - [0:0]
-A INPUT -j MESHWARD_NOT_OURS_HERE
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MESHWARD_INBOUND_DNS - [0:0]
:MESHWARD_OUTPUT_DNS - [0:0]
-A PREROUTING -j MESHWARD_INBOUND_DNS
-A OUTPUT -j MESHWARD_OUTPUT_DNS
-A MESHWARD_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:MESHWARD_INBOUND - [0:0]
:MESHWARD_OUTPUT - [0:0]
:USER_CHAIN - [0:0]
-A PREROUTING -p tcp -j MESHWARD_INBOUND
-A OUTPUT -p udp -m comment --comment "not -j MESHWARD_OUTPUT" -j ACCEPT
-A OUTPUT -j MESHWARD_OUTPUT
-A OUTPUT -j USER_CHAIN
-A MESHWARD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A USER_CHAIN -d 198.18.0.1/32 -g MESHWARD_OUTPUT
-A USER_CHAIN -d 198.18.0.2/32 -j RETURN
COMMIT
"#;

    #[test]
    fn finds_meshward_chains_and_every_jump_into_them_only() {
        let owned = owned(SAVED);
        let names: Vec<&str> = owned.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["raw", "nat"], "in saved order, filter left out");
        let nat = &owned[1].1;
        assert_eq!(nat.chains, ["MESHWARD_INBOUND", "MESHWARD_OUTPUT"]);
        assert_eq!(
            nat.jumps,
            [
                ("PREROUTING".into(), "-p tcp -j MESHWARD_INBOUND".into()),
                ("OUTPUT".into(), "-j MESHWARD_OUTPUT".into()),
                (
                    "USER_CHAIN".into(),
                    "-d 198.18.0.1/32 -g MESHWARD_OUTPUT".into()
                ),
            ]
        );
        assert_eq!(owned[0].1.jumps.len(), 2);
    }

    #[test]
    fn uninstall_input_deletes_jumps_then_flushes_then_deletes_chains() {
        let input = replacement(SAVED, None).unwrap();
        assert_eq!(
            input,
            "*nat
-D PREROUTING -p tcp -j MESHWARD_INBOUND
-D OUTPUT -j MESHWARD_OUTPUT
-D USER_CHAIN -d 198.18.0.1/32 -g MESHWARD_OUTPUT
-F MESHWARD_INBOUND
-F MESHWARD_OUTPUT
-X MESHWARD_INBOUND
-X MESHWARD_OUTPUT
COMMIT
*raw
-D PREROUTING -j MESHWARD_INBOUND_DNS
-D OUTPUT -j MESHWARD_OUTPUT_DNS
-F MESHWARD_INBOUND_DNS
-F MESHWARD_OUTPUT_DNS
-X MESHWARD_INBOUND_DNS
-X MESHWARD_OUTPUT_DNS
COMMIT
"
        );
    }

    #[test]
    fn nothing_installed_and_nothing_planned_needs_no_command() {
        let clean =
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j USER\nCOMMIT\n";
        assert_eq!(replacement(clean, None), None);
        assert_eq!(replacement("", None), None);
        assert_eq!(show(clean), "");
    }

    #[test]
    fn install_over_old_rules_keeps_planned_chains_and_drops_the_rest() {
        let planned = crate::plan(&CaptureConfig::default()).unwrap().ipv4;
        let input = replacement(SAVED, Some(&planned)).unwrap();
        let nat_head: Vec<&str> = input.lines().take(9).collect();
        assert_eq!(
            nat_head,
            [
                "*nat",
                "-D PREROUTING -p tcp -j MESHWARD_INBOUND",
                "-D OUTPUT -j MESHWARD_OUTPUT",
                "-D USER_CHAIN -d 198.18.0.1/32 -g MESHWARD_OUTPUT",
                // Declared: created, or flushed when they exist.
                ":MESHWARD_INBOUND - [0:0]",
                ":MESHWARD_REDIRECT - [0:0]",
                ":MESHWARD_IN_REDIRECT - [0:0]",
                ":MESHWARD_OUTPUT - [0:0]",
                "-A MESHWARD_INBOUND -p tcp --dport 15000 -j RETURN",
            ]
        );
        // All planned rules follow; the raw chains (no DNS capture now) go.
        let expected_nat = planned.table("nat").unwrap().rules.join("\n");
        assert!(input.contains(&format!("{expected_nat}\nCOMMIT\n*raw\n")));
        assert!(input.ends_with(
            "-F MESHWARD_INBOUND_DNS\n-F MESHWARD_OUTPUT_DNS\n-X MESHWARD_INBOUND_DNS\n-X MESHWARD_OUTPUT_DNS\nCOMMIT\n"
        ));
    }

    #[test]
    fn show_lists_meshward_lines_per_table() {
        assert_eq!(
            show(SAVED),
            "*raw
:MESHWARD_INBOUND_DNS - [0:0]
:MESHWARD_OUTPUT_DNS - [0:0]
-A PREROUTING -j MESHWARD_INBOUND_DNS
-A OUTPUT -j MESHWARD_OUTPUT_DNS
-A MESHWARD_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
COMMIT
*nat
:MESHWARD_INBOUND - [0:0]
:MESHWARD_OUTPUT - [0:0]
-A PREROUTING -p tcp -j MESHWARD_INBOUND
-A OUTPUT -j MESHWARD_OUTPUT
-A MESHWARD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A USER_CHAIN -d 198.18.0.1/32 -g MESHWARD_OUTPUT
COMMIT
"
        );
    }
}
