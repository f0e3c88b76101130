//! Trust-domain aliases in principals, as Istio's `ReplaceTrustDomainAliases`.
//!
//! A principal `td/ns/N/sa/S` whose trust domain is the mesh's, one of its
//! aliases, or the literal `cluster.local` (Istio's pointer to "the local trust
//! domain") is expanded to the same identity under every trust domain of the
//! mesh. Other principals are kept as written.

use crate::api::MeshConfig;

pub(crate) fn expand_principals(principals: &[String], mesh: &MeshConfig) -> Vec<String> {
    let domains: Vec<&str> = std::iter::once(mesh.trust_domain.as_str())
        .chain(mesh.trust_domain_aliases.iter().map(String::as_str))
        .collect();
    let mut out = Vec::with_capacity(principals.len());
    for principal in principals {
        let parts: Vec<&str> = principal.split('/').collect();
        // Only `td/ns/N/sa/S` with a concrete (or pattern, not `*`) domain is rewritten.
        if parts.len() != 5 || parts[0] == "*" {
            out.push(principal.clone());
            continue;
        }
        let td = parts[0];
        if !(domains.iter().any(|d| string_match(td, d)) || td == "cluster.local") {
            out.push(principal.clone());
            continue;
        }
        for domain in &domains {
            let expanded = if suffix_match(domain, td) {
                principal.clone()
            } else {
                format!("{domain}/{}", parts[1..].join("/"))
            };
            if !out.contains(&expanded) {
                out.push(expanded);
            }
        }
    }
    out
}

/// `a` matches pattern `s` (either may carry Istio's one-sided `*`).
fn string_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_match(a, s)
        || prefix_match(s, a)
        || suffix_match(a, s)
        || suffix_match(s, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|s| a.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(td: &str, aliases: &[&str]) -> MeshConfig {
        MeshConfig {
            trust_domain: td.into(),
            trust_domain_aliases: aliases.iter().map(|s| s.to_string()).collect(),
            ..MeshConfig::default()
        }
    }

    fn expand(p: &str, m: &MeshConfig) -> Vec<String> {
        expand_principals(&[p.to_owned()], m)
    }

    #[test]
    fn aliases_expand_both_ways() {
        let m = mesh("new-td", &["old-td"]);
        assert_eq!(
            expand("old-td/ns/a/sa/b", &m),
            ["new-td/ns/a/sa/b", "old-td/ns/a/sa/b"]
        );
        assert_eq!(
            expand("new-td/ns/a/sa/b", &m),
            ["new-td/ns/a/sa/b", "old-td/ns/a/sa/b"]
        );
    }

    #[test]
    fn cluster_local_points_to_the_local_domain() {
        let m = mesh("example.com", &[]);
        assert_eq!(
            expand("cluster.local/ns/a/sa/b", &m),
            ["example.com/ns/a/sa/b"]
        );
    }

    #[test]
    fn foreign_and_wildcard_domains_are_kept() {
        let m = mesh("td", &["alias"]);
        assert_eq!(expand("other/ns/a/sa/b", &m), ["other/ns/a/sa/b"]);
        assert_eq!(expand("*/ns/a/sa/b", &m), ["*/ns/a/sa/b"]);
        assert_eq!(expand("td/ns/a", &m), ["td/ns/a"]);
        assert_eq!(expand("*", &m), ["*"]);
    }

    #[test]
    fn pattern_domain_is_kept_where_it_matches() {
        let m = mesh("new-td", &["old-td"]);
        assert_eq!(expand("*-td/ns/a/sa/b", &m), ["*-td/ns/a/sa/b"]);
    }
}
