//! Istio's string match forms: exact, `prefix*`, `*suffix` and presence `*`.

/// How one policy value matches an attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: the attribute is present (non-empty), whatever its value.
    Presence,
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
        }
    }

    pub fn exact(&self) -> Option<&str> {
        match self {
            StringMatch::Exact(s) => Some(s),
            _ => None,
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
        }
    }
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
