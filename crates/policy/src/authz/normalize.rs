//! Path normalization before authorization, as Istio configures Envoy.
//!
//! The same normalized path is used for matching and for forwarding, so what
//! normalization resolves cannot be used against a policy: under every mode
//! but `NONE`, a policy on `/admin` sees `/public/../admin` and `/%61dmin` as
//! `/admin`. What a mode leaves alone reaches the application as written and
//! does not match `/admin`: under `BASE`, Istio's default, that is `//admin`,
//! `/admin%2Fx`, `/x/..%2Fadmin` and `/admin%5Cx`, which an application that
//! merges slashes or decodes `%2F`/`%5C` serves as `/admin` — a bypass of a
//! DENY on `/admin` (CVE-2021-31920). `MERGE_SLASHES` closes `//admin`;
//! `DECODE_AND_MERGE_SLASHES` closes them all. `meshward validate` warns about
//! rules that `BASE` leaves open. The query and fragment are never part of
//! the matched path.

use crate::api::PathNormalizationMode;

/// Normalizes the path part of a request target for matching. Returns the path
/// without query or fragment.
pub fn normalize(target: &str, mode: PathNormalizationMode) -> std::borrow::Cow<'_, str> {
    let path = strip_query(target);
    let effective = mode.effective();
    if effective == PathNormalizationMode::None || is_normal(path, effective) {
        return std::borrow::Cow::Borrowed(path);
    }
    std::borrow::Cow::Owned(match effective {
        PathNormalizationMode::None => path.to_owned(),
        PathNormalizationMode::Default | PathNormalizationMode::Base => base(path),
        PathNormalizationMode::MergeSlashes => merge_slashes(&base(path)),
        PathNormalizationMode::DecodeAndMergeSlashes => merge_slashes(&base(&decode_slashes(path))),
    })
}

/// Whether normalizing would leave `path` as it is: no escapes, no
/// backslashes, no dot segments (and no empty segments when merging).
fn is_normal(path: &str, mode: PathNormalizationMode) -> bool {
    let merge = matches!(
        mode,
        PathNormalizationMode::MergeSlashes | PathNormalizationMode::DecodeAndMergeSlashes
    );
    let needs_work = !path.starts_with('/')
        || path.contains(['%', '\\'])
        || path.bytes().any(escaped_by_canonicalization)
        || (merge && path.contains("//"))
        || path.split('/').any(|seg| seg == "." || seg == "..");
    !needs_work
}

/// The request target without `?query` and `#fragment`.
pub fn strip_query(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

/// RFC 3986 normalization as Envoy's `normalize_path` does it (Chromium's
/// path canonicalization): percent-encoded unreserved characters are
/// decoded, other escapes are kept exactly as written, characters a path may
/// not hold as they are (controls, space, `"<>^`{|}`, DEL and every non-ASCII
/// byte) are percent-encoded, backslashes become slashes, and `.`/`..`
/// segments are removed. The encoding matters to policies: `/caf%C3%A9` is
/// what a rule on paths sees, and what the application gets, for `/café`.
fn base(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let slashed = decoded.replace('\\', "/");
    remove_dot_segments(&slashed)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push(bytes[i + 1] as char);
                out.push(bytes[i + 2] as char);
            }
            i += 3;
            continue;
        }
        if escaped_by_canonicalization(bytes[i]) {
            out.push_str(&format!("%{:02X}", bytes[i]));
        } else {
            out.push(bytes[i] as char);
        }
        i += 1;
    }
    out
}

/// The bytes Chromium's path canonicalization (which Envoy's
/// `normalize_path` runs) writes percent-encoded: controls, space, `"`, `#`,
/// `<`, `>`, `?`, `^`, `` ` ``, `{`, `|`, `}`, DEL and every byte of a
/// non-ASCII character. (`#` and `?` never reach here: the query is
/// stripped first.)
fn escaped_by_canonicalization(b: u8) -> bool {
    matches!(
        b,
        0x01..=0x20 | b'"' | b'#' | b'<' | b'>' | b'?' | b'^' | b'`' | b'{' | b'|' | b'}' | 0x7F..=0xFF
    )
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `%2F` and `%5C` (either case) decoded to `/` and `\`.
fn decode_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3).unwrap_or("");
        match esc.to_ascii_uppercase().as_str() {
            "%2F" => {
                out.push('/');
                rest = &rest[i + 3..];
            }
            "%5C" => {
                out.push('\\');
                rest = &rest[i + 3..];
            }
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 section 5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        if i == 0 && absolute {
            continue;
        }
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    if absolute {
        result.push('/');
    }
    result.push_str(&out.join("/"));
    if trailing_slash && !result.ends_with('/') {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalizationMode::*;

    #[test]
    fn query_and_fragment_are_stripped() {
        assert_eq!(normalize("/a?b=1", Base), "/a");
        assert_eq!(normalize("/a#frag", Base), "/a");
        assert_eq!(normalize("/a?x=/../b", None), "/a");
    }

    #[test]
    fn dot_segments() {
        assert_eq!(normalize("/a/../b", Base), "/b");
        assert_eq!(normalize("/a/./b", Base), "/a/b");
        assert_eq!(normalize("/../a", Base), "/a");
        assert_eq!(normalize("/a/b/..", Base), "/a/");
        assert_eq!(normalize("/a/.", Base), "/a/");
        assert_eq!(normalize("/a/../b", None), "/a/../b");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(normalize("/%61dmin", Base), "/admin");
        assert_eq!(normalize("/a%2fb", Base), "/a%2fb");
        assert_eq!(normalize("/a%2fb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(normalize("/a%5cb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(normalize("/%2e%2e/admin", Base), "/admin");
        assert_eq!(normalize("/a%20b", Base), "/a%20b");
        assert_eq!(normalize("/bad%zz", Base), "/bad%zz");
        assert_eq!(normalize("/trunc%4", Base), "/trunc%4");
    }

    #[test]
    fn slashes() {
        assert_eq!(normalize("//admin", Base), "//admin");
        assert_eq!(normalize("//admin", MergeSlashes), "/admin");
        assert_eq!(normalize("/a\\..\\admin", Base), "/admin");
    }

    /// The expectations of Istio's normalization integration test.
    #[test]
    fn istio_normalization_table() {
        let table: [(&str, [&str; 4]); 8] = [
            (
                "/app/../admin",
                ["/app/../admin", "/admin", "/admin", "/admin"],
            ),
            ("/app//", ["/app//", "/app//", "/app/", "/app/"]),
            ("/app/%2f", ["/app/%2f", "/app/%2f", "/app/%2f", "/app/"]),
            (
                "/xyz%30..//abc",
                [
                    "/xyz%30..//abc",
                    "/xyz0..//abc",
                    "/xyz0../abc",
                    "/xyz0../abc",
                ],
            ),
            (
                "/app/%2E./admin",
                ["/app/%2E./admin", "/admin", "/admin", "/admin"],
            ),
            (
                "/app\\/\\/\\admin",
                [
                    "/app\\/\\/\\admin",
                    "/app/////admin",
                    "/app/admin",
                    "/app/admin",
                ],
            ),
            (
                "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
                [
                    "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
                    "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                    "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                    "/app/admin/abc",
                ],
            ),
            (
                "/app//../admin",
                ["/app//../admin", "/app/admin", "/app/admin", "/app/admin"],
            ),
        ];
        for (input, want) in table {
            for (mode, want) in [None, Base, MergeSlashes, DecodeAndMergeSlashes]
                .into_iter()
                .zip(want)
            {
                assert_eq!(normalize(input, mode), want, "{input} under {mode:?}");
            }
        }
    }

    #[test]
    fn what_a_path_may_not_hold_is_percent_encoded_as_envoy_does() {
        assert_eq!(normalize("/café/x", Base), "/caf%C3%A9/x");
        assert_eq!(normalize("/a|b/{c}/d^e", Base), "/a%7Cb/%7Bc%7D/d%5Ee");
        assert_eq!(normalize("/a b\"c<d>`", Base), "/a%20b%22c%3Cd%3E%60");
        // Kept: what a path may hold as it is, and escapes as written.
        assert_eq!(normalize("/[a]:@!$&'()*+,;=", Base), "/[a]:@!$&'()*+,;=");
        assert_eq!(normalize("/caf%c3%a9", Base), "/caf%c3%a9");
        // Every mode but NONE canonicalizes; NONE leaves the path alone.
        assert_eq!(normalize("/café", MergeSlashes), "/caf%C3%A9");
        assert_eq!(normalize("/café", DecodeAndMergeSlashes), "/caf%C3%A9");
        assert_eq!(normalize("/café", None), "/café");
    }
}
