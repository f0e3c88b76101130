//! The kinds `get` and `delete` take, spelled as kubectl takes them: the
//! kind, its plural or Istio's short name, in any case, alone or with its
//! API group (`authorizationpolicies.security.istio.io`).

use std::fmt;

/// A kind of what the server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// As the config API and the YAML name it.
    pub name: &'static str,
    /// Istio's short name (its CRD's `shortNames`).
    short: Option<&'static str>,
    plural: &'static str,
    group: &'static str,
    /// Stored objects, each in a namespace; `delete` takes these only.
    pub namespaced: bool,
}

const fn object(
    name: &'static str,
    short: &'static str,
    plural: &'static str,
    group: &'static str,
) -> Kind {
    Kind {
        name,
        short: Some(short),
        plural,
        group,
        namespaced: true,
    }
}

/// Every kind, in the order they are listed to the user.
pub const KINDS: &[Kind] = &[
    object(
        "AuthorizationPolicy",
        "ap",
        "authorizationpolicies",
        "security.istio.io",
    ),
    object(
        "PeerAuthentication",
        "pa",
        "peerauthentications",
        "security.istio.io",
    ),
    object(
        "RequestAuthentication",
        "ra",
        "requestauthentications",
        "security.istio.io",
    ),
    object(
        "WorkloadEntry",
        "we",
        "workloadentries",
        "networking.istio.io",
    ),
    object(
        "ServiceEntry",
        "se",
        "serviceentries",
        "networking.istio.io",
    ),
    object(
        "DestinationRule",
        "dr",
        "destinationrules",
        "networking.istio.io",
    ),
    object("Gateway", "gw", "gateways", "networking.istio.io"),
    object(
        "VirtualService",
        "vs",
        "virtualservices",
        "networking.istio.io",
    ),
    // The revocation list and the mesh config are the server's, in no
    // namespace: read with `get`, changed with `revoke` and `apply
    // --mesh-config`.
    Kind {
        name: "Revocation",
        short: None,
        plural: "revocations",
        group: "meshward.io",
        namespaced: false,
    },
    Kind {
        name: "MeshConfig",
        short: None,
        plural: "meshconfigs",
        group: "meshward.io",
        namespaced: false,
    },
];

/// What `get` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    One(Kind),
    /// `all`: every stored object.
    All,
}

impl Kind {
    fn is_called(&self, word: &str) -> bool {
        let word = word.to_ascii_lowercase();
        // `plural.group`, `kind.group`, `short.group` as kubectl takes them.
        let word = word
            .strip_suffix(self.group)
            .and_then(|w| w.strip_suffix('.'))
            .unwrap_or(&word);
        word == self.name.to_ascii_lowercase() || word == self.plural || self.short == Some(word)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.short {
            Some(short) => write!(f, "{} ({short})", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// The kind `word` names, for `get`.
pub fn for_get(word: &str) -> Result<Wanted, String> {
    if word.eq_ignore_ascii_case("all") {
        return Ok(Wanted::All);
    }
    find(word, KINDS.iter())
        .map(Wanted::One)
        .ok_or_else(|| unknown(word, "get", KINDS.iter(), ", or all"))
}

/// The kind `word` names, for `delete`: a stored object's.
pub fn for_delete(word: &str) -> Result<Kind, String> {
    let stored = || KINDS.iter().filter(|k| k.namespaced);
    match find(word, KINDS.iter()) {
        Some(kind) if kind.namespaced => Ok(kind),
        Some(kind) => Err(format!(
            "{} is not deleted: {}; delete takes {}",
            kind.name,
            if kind.name == "Revocation" {
                "a revocation cannot be lifted"
            } else {
                "apply another with `meshward apply --mesh-config`"
            },
            listed(stored(), "")
        )),
        None => Err(unknown(word, "delete", stored(), "")),
    }
}

fn find<'a>(word: &str, mut kinds: impl Iterator<Item = &'a Kind>) -> Option<Kind> {
    kinds.find(|k| k.is_called(word)).copied()
}

fn unknown<'a>(
    word: &str,
    command: &str,
    kinds: impl Iterator<Item = &'a Kind>,
    more: &str,
) -> String {
    format!(
        "unknown kind {word:?}: {command} takes {}",
        listed(kinds, more)
    )
}

fn listed<'a>(kinds: impl Iterator<Item = &'a Kind>, more: &str) -> String {
    let names: Vec<String> = kinds.map(Kind::to_string).collect();
    format!("{}{more}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_for_get(word: &str) -> &'static str {
        match for_get(word).unwrap_or_else(|e| panic!("{word}: {e}")) {
            Wanted::One(kind) => kind.name,
            Wanted::All => "all",
        }
    }

    #[test]
    fn istio_short_names_plurals_and_any_case_name_the_kind() {
        for (words, name) in [
            (
                &[
                    "ap",
                    "AP",
                    "authorizationpolicy",
                    "AuthorizationPolicies",
                    "authorizationpolicies.security.istio.io",
                ][..],
                "AuthorizationPolicy",
            ),
            (
                &["pa", "peerauthentication", "PeerAuthentications"],
                "PeerAuthentication",
            ),
            (
                &["ra", "requestauthentication", "requestauthentications"],
                "RequestAuthentication",
            ),
            (
                &[
                    "we",
                    "workloadentry",
                    "workloadentries",
                    "we.networking.istio.io",
                ],
                "WorkloadEntry",
            ),
            (&["se", "serviceentry", "ServiceEntries"], "ServiceEntry"),
            (
                &["dr", "destinationrule", "destinationrules"],
                "DestinationRule",
            ),
            (&["revocation", "revocations", "Revocations"], "Revocation"),
            (&["meshconfig", "MeshConfig"], "MeshConfig"),
            (&["all", "ALL"], "all"),
        ] {
            for word in words {
                assert_eq!(name_for_get(word), name, "{word}");
            }
        }
        assert_eq!(for_delete("AP").unwrap().name, "AuthorizationPolicy");
        assert_eq!(for_delete("dr").unwrap().name, "DestinationRule");
        assert_eq!(for_delete("gw").unwrap().name, "Gateway");
        assert_eq!(
            for_get("virtualservices.networking.istio.io").unwrap(),
            Wanted::One(KINDS[7])
        );
    }

    #[test]
    fn an_unknown_kind_is_refused_with_the_list() {
        let e = for_get("policies").unwrap_err();
        assert_eq!(
            e,
            "unknown kind \"policies\": get takes AuthorizationPolicy (ap), PeerAuthentication (pa), RequestAuthentication (ra), WorkloadEntry (we), ServiceEntry (se), DestinationRule (dr), Gateway (gw), VirtualService (vs), Revocation, MeshConfig, or all"
        );
        // A group that is not the kind's does not name it.
        assert!(for_get("ap.networking.istio.io").is_err());
        assert!(for_get("").is_err());
        let e = for_delete("all").unwrap_err();
        assert!(
            e.starts_with("unknown kind \"all\": delete takes AuthorizationPolicy (ap),"),
            "{e}"
        );
        assert!(e.ends_with("VirtualService (vs)"), "{e}");
    }

    #[test]
    fn delete_takes_stored_objects_only() {
        let e = for_delete("revocations").unwrap_err();
        assert!(e.starts_with("Revocation is not deleted: a revocation cannot be lifted; delete takes AuthorizationPolicy (ap)"), "{e}");
        assert!(for_delete("meshconfig").is_err());
    }
}
