//! Path templates in `paths`: `{*}` matches one path segment, `{**}` one or
//! more segments and may only come last (Envoy's `uri_template` matcher, which
//! Istio uses when a path contains `{*}` or `{**}`).

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

fn is_valid_literal(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b))
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

    /// Matches a normalized path (no query).
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut i = 0;
        for segment in &self.segments {
            match segment {
                Segment::Literal(lit) => {
                    if parts.get(i) != Some(&lit.as_str()) {
                        return false;
                    }
                    i += 1;
                }
                Segment::One => {
                    if parts.get(i).is_none_or(|p| p.is_empty()) {
                        return false;
                    }
                    i += 1;
                }
                // One or more segments, then whatever literals follow it.
                Segment::Many => {
                    let after = &self.segments[self
                        .segments
                        .iter()
                        .position(|s| *s == Segment::Many)
                        .unwrap_or(0)
                        + 1..];
                    let rest = &parts[i.min(parts.len())..];
                    if rest.len() < after.len() + 1 {
                        return false;
                    }
                    let (middle, tail) = rest.split_at(rest.len() - after.len());
                    return middle.iter().all(|p| !p.is_empty())
                        && tail.iter().zip(after).all(|(p, s)| match s {
                            Segment::Literal(lit) => p == lit,
                            _ => !p.is_empty(),
                        });
                }
            }
        }
        i == parts.len()
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
    }

    #[test]
    fn many_segments() {
        assert!(m("/foo/{**}", "/foo/bar"));
        assert!(m("/foo/{**}", "/foo/bar/baz"));
        assert!(!m("/foo/{**}", "/foo"));
        assert!(!m("/foo/{**}", "/foo/"));
        assert!(m("/{**}", "/anything/at/all"));
    }

    #[test]
    fn literals_after_many() {
        assert!(m("/foo/{**}/bar", "/foo/a/b/bar"));
        assert!(m("/foo/{**}/bar", "/foo/a/bar"));
        assert!(!m("/foo/{**}/bar", "/foo/bar"));
        assert!(!m("/foo/{**}/bar", "/foo/a/baz"));
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
