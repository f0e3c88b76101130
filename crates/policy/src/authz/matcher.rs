//! Istio's string match forms: exact, `prefix*`, `*suffix` and presence `*`.

/// How one policy value matches an attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: the attribute is present (non-empty), whatever its value.
    Presence,
    /// `*` anywhere, each matching any run of characters: how Istio reads
    /// namespace values (`team-*-prod`). The parts between the stars, in order.
    Glob(Vec<String>),
}

impl StringMatch {
    /// Reads a policy value the way Istio's `matcher.StringMatcher` does: a lone
    /// `*` is presence, a leading `*` a suffix match, a trailing `*` a prefix
    /// match, anything else exact.
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(value.to_owned())
        }
    }

    /// Reads a namespace value: like [`StringMatch::parse`], except that a
    /// `*` in the middle is a wildcard too (Istio's namespace generator turns
    /// every `*` into `.*`).
    pub fn parse_glob(value: &str) -> StringMatch {
        let stars = value.matches('*').count();
        // `*` is ASCII, so byte positions are safe whatever the value holds.
        let inner_star = value
            .bytes()
            .enumerate()
            .any(|(i, b)| b == b'*' && i > 0 && i + 1 < value.len());
        if value != "*" && (stars > 1 || inner_star) {
            StringMatch::Glob(value.split('*').map(str::to_owned).collect())
        } else {
            StringMatch::parse(value)
        }
    }

    /// The same, with every literal lower-cased, for case-insensitive fields.
    pub fn parse_ignore_case(value: &str) -> StringMatch {
        StringMatch::parse(&value.to_ascii_lowercase())
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
            StringMatch::Glob(parts) => glob_match(parts, value),
        }
    }
}

impl std::fmt::Display for StringMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StringMatch::Exact(s) => write!(f, "{s:?}"),
            StringMatch::Prefix(p) => write!(f, "\"{p}*\""),
            StringMatch::Suffix(s) => write!(f, "\"*{s}\""),
            StringMatch::Presence => f.write_str("\"*\""),
            StringMatch::Glob(parts) => write!(f, "{:?}", parts.join("*")),
        }
    }
}

/// `parts` are the pieces between `*`s: the first must start the value, the
/// last must end it, the others must appear in order between them.
fn glob_match(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return value == first;
    }
    if value.len() < first.len() + last.len()
        || !value.starts_with(first.as_str())
        || !value.ends_with(last.as_str())
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle.as_str()) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(StringMatch::parse("*"), StringMatch::Presence);
        assert_eq!(StringMatch::parse("a*"), StringMatch::Prefix("a".into()));
        assert_eq!(StringMatch::parse("*a"), StringMatch::Suffix("a".into()));
        assert_eq!(StringMatch::parse("a*b"), StringMatch::Exact("a*b".into()));
        // `**` is a suffix match on `*`, as in Istio.
        assert_eq!(StringMatch::parse("**"), StringMatch::Suffix("*".into()));
    }

    #[test]
    fn globs() {
        let g = StringMatch::parse_glob("team-*-prod");
        assert!(g.matches("team-a-prod"));
        assert!(g.matches("team--prod"));
        assert!(!g.matches("team-prod"));
        assert!(!g.matches("xteam-a-prod"));
        let g = StringMatch::parse_glob("*pay*ments*");
        assert!(g.matches("eu-payments-v2"));
        assert!(g.matches("paysments"));
        assert!(!g.matches("ments-pay"));
        assert_eq!(
            StringMatch::parse_glob("foo*"),
            StringMatch::Prefix("foo".into())
        );
        assert_eq!(StringMatch::parse_glob("*"), StringMatch::Presence);
        assert!(StringMatch::parse_glob("*pay*").matches("eu-payments"));
        // Non-ASCII first and last characters are fine.
        assert_eq!(StringMatch::parse_glob("é"), StringMatch::Exact("é".into()));
        assert!(StringMatch::parse_glob("ü*ü*ü").matches("üaübü"));
    }

    #[test]
    fn matching() {
        assert!(StringMatch::parse("/api/*").matches("/api/v1"));
        assert!(StringMatch::parse("/api/*").matches("/api/"));
        assert!(!StringMatch::parse("/api/*").matches("/api"));
        assert!(StringMatch::parse("*.json").matches("/a.json"));
        assert!(StringMatch::parse("*").matches("x"));
        assert!(!StringMatch::parse("*").matches(""));
        assert!(StringMatch::parse("").matches(""));
    }
}
