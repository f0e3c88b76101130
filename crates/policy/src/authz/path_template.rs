//! Path templates in `paths`: `{*}` and `{**}`, matched as Envoy's
//! `uri_template` matcher does (Istio uses it when a path contains either,
//! rewriting them to its `*` and `**`). Envoy turns a template into one
//! regular expression over the whole path: `/`, the segments joined by `/`,
//! `{*}` as `[pchar]+` (one or more characters of one segment) and `{**}` as
//! `[pchar/]*` (zero or more characters, slashes included), where pchar is
//! Envoy's `kLiteral`: RFC 3986's less `*`, with `=` (which Envoy adds back).
//! So `/allow/admin/{**}` matches `/allow/admin/` and `/store/{**}/cart`
//! matches `/store//cart`, `/foo/{*}` matches `/foo/a=b` but not `/foo/`.
//! `{**}` is the last operator; literal segments may follow it.

/// A path value that uses template operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    raw: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Many,
}

/// Whether a `paths` value uses template syntax at all.
pub fn is_template(path: &str) -> bool {
    path.contains("{*}") || path.contains("{**}")
}

/// Istio's `CheckValidPathTemplate` for one value: braces only as whole
/// `{*}`/`{**}` segments, `{**}` as the last operator, and in a template path
/// every literal segment made of URL path characters (no `*`, no empty segment).
pub fn check(path: &str) -> Result<(), String> {
    let is_template = is_template(path);
    let trimmed = path.trim_matches('/');
    let mut seen_many = false;
    for glob in trimmed.split('/') {
        match glob {
            "{*}" | "{**}" if seen_many => {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in paths. {{**}} is not the last operator"
                ));
            }
            "{*}" => {}
            "{**}" => seen_many = true,
            g if g.contains(['{', '}']) => {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in paths. Contains '{{' or '}}' beyond a supported path template"
                ));
            }
            g if is_template && !is_valid_literal(g) => {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in paths. Contains segment {g} with invalid string literal"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What Envoy's template operators match, and what a literal segment of a
/// template may hold (Envoy's `kLiteral`, Istio's `isValidLiteral`): RFC 3986
/// `pchar` (unreserved, percent-encoded, sub-delims, `:` and `@`) without
/// `*`; `=` is in.
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

fn is_valid_literal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_pchar)
}

impl PathTemplate {
    /// Parses a template that [`check`] accepts.
    pub fn parse(path: &str) -> Result<PathTemplate, String> {
        check(path)?;
        let trimmed = path.trim_start_matches('/');
        let segments = trimmed
            .split('/')
            .map(|part| match part {
                "{*}" => Segment::One,
                "{**}" => Segment::Many,
                literal => Segment::Literal(literal.to_owned()),
            })
            .collect();
        Ok(PathTemplate {
            segments,
            raw: path.to_owned(),
        })
    }

    /// Matches a normalized path (no query), as Envoy's regular expression
    /// for the template does.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let many = self.segments.iter().position(|s| *s == Segment::Many);
        let (before, after) = match many {
            Some(i) => (&self.segments[..i], Some(&self.segments[i + 1..])),
            None => (&self.segments[..], None),
        };
        // Each segment before `{**}` ends at the next `/`; without `{**}`,
        // the last one takes the rest of the path.
        for (i, segment) in before.iter().enumerate() {
            let (part, tail) = if after.is_none() && i + 1 == before.len() {
                (rest, "")
            } else {
                match rest.split_once('/') {
                    Some(split) => split,
                    None => return false,
                }
            };
            let matched = match segment {
                Segment::Literal(literal) => part == literal,
                Segment::One => !part.is_empty() && part.bytes().all(is_pchar),
                Segment::Many => false,
            };
            if !matched {
                return false;
            }
            rest = tail;
        }
        let Some(after) = after else {
            return true;
        };
        // `{**}`, then `/literal` for each segment after it: the path ends
        // with those, and what `{**}` takes is pchar or `/`, maybe nothing.
        let mut suffix = String::new();
        for segment in after {
            match segment {
                Segment::Literal(literal) => {
                    suffix.push('/');
                    suffix.push_str(literal);
                }
                // `check` admits no operator after `{**}`.
                Segment::One | Segment::Many => return false,
            }
        }
        rest.strip_suffix(suffix.as_str())
            .is_some_and(|middle| middle.bytes().all(|b| b == b'/' || is_pchar(b)))
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, p: &str) -> bool {
        PathTemplate::parse(t)
            .map(|t| t.matches(p))
            .unwrap_or(false)
    }

    #[test]
    fn one_segment() {
        assert!(m("/foo/{*}", "/foo/bar"));
        assert!(!m("/foo/{*}", "/foo/bar/baz"));
        assert!(!m("/foo/{*}", "/foo/"));
        assert!(!m("/foo/{*}", "/foo"));
        assert!(m("/foo/{*}/baz", "/foo/x/baz"));
        assert!(!m("/foo/{*}/baz", "/foo/x/y/baz"));
        assert!(!m("/foo/{*}/baz", "/foo//baz"));
    }

    #[test]
    fn one_segment_is_made_of_pchar_without_star() {
        assert!(m("/foo/{*}", "/foo/a-._~%2F!$&'()+,;:@Z9"));
        assert!(m("/foo/{*}", "/foo/a=b"), "Envoy's kLiteral has =");
        assert!(!m("/foo/{*}", "/foo/a*b"));
        // Raw non-ASCII never reaches a template: normalization encodes it
        // (`/foo/caf%C3%A9`), which `{*}` matches, as in Envoy.
        assert!(m("/foo/{*}", "/foo/caf%C3%A9"));
        assert!(!m("/foo/{*}", "/foo/a b"));
    }

    #[test]
    fn many_is_zero_or_more_characters_slashes_included() {
        assert!(m("/foo/{**}", "/foo/bar"));
        assert!(m("/foo/{**}", "/foo/bar/baz"));
        assert!(m("/foo/{**}", "/foo/"));
        assert!(m("/foo/{**}", "/foo//x//"));
        assert!(!m("/foo/{**}", "/foo"));
        assert!(!m("/foo/{**}", "/foobar"));
        assert!(m("/foo/{**}", "/foo/a=b"));
        assert!(m("/admin/{**}", "/admin/x=1/y"));
        assert!(m("/{**}", "/anything/at/all"));
        assert!(m("/{**}", "/"));
        assert!(m("/allow/admin/{**}", "/allow/admin/"));
    }

    #[test]
    fn literals_after_many() {
        assert!(m("/foo/{**}/bar", "/foo/a/b/bar"));
        assert!(m("/foo/{**}/bar", "/foo/a/bar"));
        assert!(m("/foo/{**}/bar", "/foo//bar"));
        assert!(m("/store/{**}/cart", "/store//cart"));
        assert!(!m("/foo/{**}/bar", "/foo/bar"));
        assert!(!m("/foo/{**}/bar", "/foo/a/baz"));
        assert!(!m("/foo/{**}/bar", "/foo/a/xbar"));
        assert!(m("/{*}/x/{**}/y/z", "/a/x/b/c/y/z"));
        assert!(!m("/{*}/x/{**}/y/z", "/a/x/b/c/y"));
    }

    #[test]
    fn validity_follows_istio() {
        assert!(check("/foo/{**}/bar").is_ok());
        assert!(check("/foo/{**}/{*}").is_err());
        assert!(check("/foo/x{*}").is_err());
        assert!(check("/foo/{*}/*").is_err());
        assert!(check("/foo/{*}//x").is_err());
        assert!(check("/foo/{*}").is_ok());
        assert!(check("/foo/*").is_ok());
        // Braces are rejected even outside a template, as Istio does.
        assert!(check("/foo/{bar}").is_err());
        assert!(check("/foo/{*").is_err());
    }
}
