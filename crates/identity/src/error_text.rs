//! An error and its causes on one line, each said once.
//!
//! Errors nest: a context wraps a cause, which wraps its own. Printing every
//! level joined by `: ` (anyhow's `{:#}`) repeats a cause whenever a level
//! already writes its cause into its own message — a `thiserror` variant
//! with `{source}` in its text, or a wrapper that displays what it wraps
//! (tonic's `ConnectError` around hyper's "tcp connect error"). Such errors
//! come from crates meshward does not control, so the chain is printed here
//! without the repeats rather than fixed in each of them.

use std::error::Error;

/// `error: cause: cause's cause`, leaving out a cause whose text the level
/// printed before it already contains (and empty ones).
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut last = out.clone();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !last.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
            last = text;
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a message and an optional cause.
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn chain(levels: &[&'static str]) -> E {
        levels
            .iter()
            .rev()
            .fold(None, |cause, msg| Some(E(msg, cause.map(Box::new))))
            .unwrap()
    }

    #[test]
    fn every_distinct_cause_is_printed_in_order() {
        let e = chain(&["connecting to X", "transport error", "Connection refused"]);
        assert_eq!(
            error_chain(&e),
            "connecting to X: transport error: Connection refused"
        );
    }

    #[test]
    fn a_wrapper_that_displays_its_cause_is_said_once() {
        // tonic's ConnectError around hyper's: both display "tcp connect error".
        let e = chain(&[
            "transport error",
            "tcp connect error",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        let text = error_chain(&e);
        assert_eq!(
            text,
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(text.matches("tcp connect error").count(), 1);
    }

    #[test]
    fn a_cause_written_into_its_context_is_not_repeated() {
        // `#[error("the store in {path}: {source}")]` with `#[source]`.
        let e = chain(&[
            "opening the config store",
            "the store in /d/store.redb: Database already open. Cannot acquire lock.",
            "Database already open. Cannot acquire lock.",
        ]);
        assert_eq!(
            error_chain(&e),
            "opening the config store: the store in /d/store.redb: Database already open. Cannot acquire lock."
        );
    }

    #[test]
    fn the_cause_of_a_left_out_cause_is_still_printed() {
        // The left-out level said only its own message; what it wraps is new.
        let e = chain(&["reading key: tcp error", "tcp error", "timed out"]);
        assert_eq!(error_chain(&e), "reading key: tcp error: timed out");
    }

    #[test]
    fn empty_messages_add_nothing() {
        let e = chain(&["outer", "", "inner"]);
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
