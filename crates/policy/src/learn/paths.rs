//! From observed paths to `paths` values: exact, `{*}` templates where a
//! segment varies, or prefixes. Every value written matches every path it
//! stands for, and a template never puts `{*}` where the paths it stands
//! for agree.

use std::collections::BTreeMap;

use crate::authz::path_template::{self, PathTemplate};

/// How `suggest` writes the paths it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathMode {
    /// Each path as seen.
    Exact,
    /// `{*}` where a segment varies between paths that agree on every
    /// other segment (`/reviews/0`, `/reviews/1` → `/reviews/{*}`).
    #[default]
    Templates,
    /// `/first-segment/*` for paths of two or more segments (wider than
    /// what was seen: asked for explicitly).
    Prefixes,
}

/// One `paths` value and the observed paths it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generalized {
    pub value: String,
    pub members: Vec<String>,
}

/// The `paths` values for `observed` (normalized paths without query), in
/// `mode`. Each observed path is a member of exactly one value, which
/// matches it as the engine matches `paths`.
pub fn generalize<'a>(
    observed: impl IntoIterator<Item = &'a str>,
    mode: PathMode,
) -> Vec<Generalized> {
    let mut exact: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut templatable: BTreeMap<usize, Vec<Item>> = BTreeMap::new();
    let observed: std::collections::BTreeSet<&str> = observed.into_iter().collect();
    for path in observed {
        match (mode, segments(path)) {
            (PathMode::Templates, Some(segs)) => {
                let item = Item {
                    segs: segs.into_iter().map(|s| Seg::Lit(s.to_owned())).collect(),
                    members: vec![path.to_owned()],
                };
                templatable.entry(item.segs.len()).or_default().push(item);
            }
            (PathMode::Prefixes, Some(segs)) if segs.len() >= 2 => {
                exact
                    .entry(format!("/{}/*", segs[0]))
                    .or_default()
                    .push(path.to_owned());
            }
            _ => exact
                .entry(literal(path))
                .or_default()
                .push(path.to_owned()),
        }
    }
    let mut out: Vec<Generalized> = exact
        .into_iter()
        .map(|(value, mut members)| {
            members.sort();
            members.dedup();
            Generalized { value, members }
        })
        .collect();
    for (_, items) in templatable {
        for item in merge(items) {
            let value = item.value();
            let mut members = item.members;
            members.sort();
            out.push(Generalized { value, members });
        }
    }
    out.sort_by(|a, b| a.value.cmp(&b.value));
    out
}

/// The segments of a path that templates can take apart: it starts with
/// `/`, and every segment is non-empty and a valid template literal (so
/// `{*}` matches it and it may stand beside `{*}`).
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let segs: Vec<&str> = rest.split('/').collect();
    let valid = segs
        .iter()
        .all(|s| path_template::check(&format!("/{s}/{{*}}")).is_ok() && !s.is_empty());
    valid.then_some(segs)
}

/// A path as an exact `paths` value. Istio reads braces as template
/// syntax (refused beyond `{*}`/`{**}`), so a path holding one (only under
/// normalization NONE, which leaves them unencoded) becomes the prefix
/// before it; a trailing `*` is read as a prefix match already. Both are
/// wider than the path, never narrower.
fn literal(path: &str) -> String {
    match path.find(['{', '}']) {
        Some(i) => format!("{}*", &path[..i]),
        None => path.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Seg {
    Lit(String),
    Any,
}

#[derive(Debug, Clone)]
struct Item {
    segs: Vec<Seg>,
    members: Vec<String>,
}

impl Item {
    fn value(&self) -> String {
        let mut out = String::new();
        for seg in &self.segs {
            out.push('/');
            match seg {
                Seg::Lit(s) => out.push_str(s),
                Seg::Any => out.push_str("{*}"),
            }
        }
        out
    }
}

/// Merges paths of one length: at each position in turn, items that agree
/// on every other segment and differ at this one become one item with
/// `{*}` there — unless that would leave no literal segment (`/a`, `/b`
/// never become `/{*}`). Repeated until nothing changes.
fn merge(mut items: Vec<Item>) -> Vec<Item> {
    let len = items.first().map_or(0, |i| i.segs.len());
    loop {
        let mut changed = false;
        for position in 0..len {
            let mut buckets: BTreeMap<Vec<Seg>, Vec<Item>> = BTreeMap::new();
            for item in items.drain(..) {
                let mut key = item.segs.clone();
                key[position] = Seg::Any;
                buckets.entry(key).or_default().push(item);
            }
            for (key, bucket) in buckets {
                let keeps_literal = key.iter().any(|s| matches!(s, Seg::Lit(_)));
                if bucket.len() < 2 || !keeps_literal {
                    items.extend(bucket);
                    continue;
                }
                changed = true;
                items.push(Item {
                    segs: key,
                    members: bucket.into_iter().flat_map(|i| i.members).collect(),
                });
            }
        }
        if !changed {
            return items;
        }
    }
}

/// Whether `value` (as [`generalize`] writes it) matches `path` as the
/// engine matches a `paths` value.
pub fn matches(value: &str, path: &str) -> bool {
    if path_template::is_template(value) {
        PathTemplate::parse(value).is_ok_and(|t| t.matches(path))
    } else {
        crate::authz::matcher::StringMatch::parse(value).matches(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(paths: &[&str], mode: PathMode) -> Vec<String> {
        generalize(paths.iter().copied(), mode)
            .into_iter()
            .map(|g| g.value)
            .collect()
    }

    #[test]
    fn ids_become_templates() {
        assert_eq!(
            values(
                &["/reviews/0", "/reviews/1", "/health"],
                PathMode::Templates
            ),
            ["/health", "/reviews/{*}"]
        );
        // One path: nothing varies, nothing is generalized.
        assert_eq!(values(&["/reviews/0"], PathMode::Templates), ["/reviews/0"]);
        // Segments that differ in two places are not merged.
        assert_eq!(
            values(&["/a/1/x", "/b/2/x"], PathMode::Templates),
            ["/a/1/x", "/b/2/x"]
        );
        assert_eq!(
            values(&["/a/1/x", "/a/2/x", "/a/3/y"], PathMode::Templates),
            ["/a/3/y", "/a/{*}/x"]
        );
        // Never a template without a literal segment.
        assert_eq!(values(&["/a", "/b"], PathMode::Templates), ["/a", "/b"]);
        // Root, trailing slashes, empty segments and `*` stay exact.
        assert_eq!(
            values(
                &["/", "/a/", "/a//b", "/a//c", "/x/a*", "/x/b"],
                PathMode::Templates
            ),
            ["/", "/a/", "/a//b", "/a//c", "/x/a*", "/x/b"]
        );
    }

    #[test]
    fn prefixes_and_exact() {
        assert_eq!(
            values(
                &["/reviews/0", "/reviews/1/x", "/health"],
                PathMode::Prefixes
            ),
            ["/health", "/reviews/*"]
        );
        assert_eq!(
            values(&["/reviews/0", "/reviews/1"], PathMode::Exact),
            ["/reviews/0", "/reviews/1"]
        );
        assert_eq!(values(&["/a{b}"], PathMode::Exact), ["/a*"]);
    }

    #[test]
    fn every_member_is_matched() {
        let paths = ["/reviews/0", "/reviews/1", "/a/", "/a{b", "/x/a*"];
        for mode in [PathMode::Exact, PathMode::Templates, PathMode::Prefixes] {
            for g in generalize(paths.iter().copied(), mode) {
                for m in &g.members {
                    assert!(matches(&g.value, m), "{mode:?}: {} ~ {m}", g.value);
                }
            }
        }
    }
}
