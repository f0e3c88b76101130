//! Prometheus text exposition read back into series, so a test compares a
//! metric by its name, its exact label set and its parsed value: `} 1`
//! never matches `} 10`, label order does not matter, and a malformed line
//! fails the test instead of being skipped.
//!
//! prometheus-client only encodes, so this is a small parser of the text
//! format, including what its OpenMetrics text adds (`# EOF`, exemplars).

use std::collections::BTreeMap;
use std::fmt;

/// A series' labels, by name.
pub type Labels = BTreeMap<String, String>;

/// A line that is not a comment, a blank line or a well-formed sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} of the scrape: {reason}: {text:?}")]
pub struct ScrapeError {
    pub line: usize,
    pub reason: String,
    pub text: String,
}

/// The samples of one scrape, by series (name and labels).
#[derive(Debug, Clone)]
pub struct Scrape {
    text: String,
    series: BTreeMap<(String, Labels), f64>,
}

impl Scrape {
    /// Parses every line; fails on the first that is not a comment, blank,
    /// or a sample (`name{label="value",..} value [timestamp] [# exemplar]`),
    /// and on a series given twice.
    pub fn parse(text: &str) -> Result<Scrape, ScrapeError> {
        let mut series = BTreeMap::new();
        let mut eof = false;
        for (i, line) in text.lines().enumerate() {
            let error = |reason: String| ScrapeError {
                line: i + 1,
                reason,
                text: line.to_owned(),
            };
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.is_empty() {
                continue;
            }
            if eof {
                return Err(error("text after # EOF".into()));
            }
            if let Some(comment) = trimmed.strip_prefix('#') {
                eof = comment.trim() == "EOF";
                continue;
            }
            let (name, labels, value) = sample(trimmed).map_err(error)?;
            if series.insert((name, labels), value).is_some() {
                return Err(error("the same series twice".into()));
            }
        }
        Ok(Scrape {
            text: text.to_owned(),
            series,
        })
    }

    /// The value of the series `name` whose labels are exactly `labels`
    /// (in any order); `None` when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(
            wanted.len(),
            labels.len(),
            "a label named twice: {labels:?}"
        );
        self.series.get(&(name.to_owned(), wanted)).copied()
    }

    /// Every series: name, labels and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Labels, f64)> {
        self.series
            .iter()
            .map(|((name, labels), value)| (name.as_str(), labels, *value))
    }
}

/// The text as scraped, for failure messages.
impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const BLANKS: [char; 2] = [' ', '\t'];

/// One sample line, leading blanks removed.
fn sample(line: &str) -> Result<(String, Labels, f64), String> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("a metric name expected".into());
    }
    let mut rest = &line[end..];
    let mut labels = Labels::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = label_set(inside, &mut labels)?;
    }
    if !rest.starts_with(BLANKS) {
        return Err("a blank expected before the value".into());
    }
    // OpenMetrics: an exemplar follows ` # `; it is not a sample.
    let values = rest.split_once(" # ").map_or(rest, |(values, _)| values);
    let mut tokens = values.split(BLANKS).filter(|t| !t.is_empty());
    let value = number(tokens.next().ok_or("no value")?)?;
    if let Some(timestamp) = tokens.next() {
        number(timestamp)?;
    }
    if tokens.next().is_some() {
        return Err("more than a value and a timestamp".into());
    }
    Ok((name.to_owned(), labels, value))
}

/// `label="value",..}` after the `{`: fills `labels`, returns what follows
/// the `}`.
fn label_set<'a>(mut s: &'a str, labels: &mut Labels) -> Result<&'a str, String> {
    loop {
        s = s.trim_start_matches(BLANKS);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let name = &s[..end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("a label name expected".into());
        }
        s = s[end..].trim_start_matches(BLANKS);
        s = s
            .strip_prefix('=')
            .ok_or(format!("`=` expected after label {name}"))?;
        s = s.trim_start_matches(BLANKS);
        s = s
            .strip_prefix('"')
            .ok_or(format!("a quoted value expected for label {name}"))?;
        let (value, rest) = quoted(s).ok_or(format!(
            "label {name}: unterminated value or unknown escape"
        ))?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        s = rest.trim_start_matches(BLANKS);
        match s.strip_prefix(',') {
            Some(rest) => s = rest,
            None if s.starts_with('}') => {}
            None => return Err("`,` or `}` expected after a label".into()),
        }
    }
}

/// A label value after its opening quote, unescaped (`\\`, `\"`, `\n`),
/// and what follows its closing quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => value.push(match chars.next()?.1 {
                '\\' => '\\',
                '"' => '"',
                'n' => '\n',
                _ => return None,
            }),
            c => value.push(c),
        }
    }
    None
}

/// A sample value or timestamp: a float, `+Inf`, `-Inf` or `NaN`.
fn number(token: &str) -> Result<f64, String> {
    token
        .parse()
        .map_err(|_| format!("{token:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{DecisionLabels, Direction, Metrics};

    #[test]
    fn reads_back_what_the_proxy_serves() {
        let metrics = Metrics::default();
        let allow = DecisionLabels {
            direction: Direction::Inbound,
            decision: "allow",
            policy: "web/allow \"public\"".into(),
        };
        metrics.requests.get_or_create(&allow).inc_by(10);
        metrics.handshake(Direction::Inbound, "ok");
        metrics.config_version.set(7);
        let scrape = Scrape::parse(&metrics.encode()).unwrap();
        let requests = [
            ("direction", "inbound"),
            ("decision", "allow"),
            ("policy", "web/allow \"public\""),
        ];
        assert_eq!(scrape.get("meshward_requests_total", &requests), Some(10.0));
        assert_eq!(
            scrape.get(
                "meshward_tls_handshakes_total",
                &[("result", "ok"), ("direction", "inbound")]
            ),
            Some(1.0),
            "label order does not matter"
        );
        assert_eq!(scrape.get("meshward_config_version", &[]), Some(7.0));
        assert_eq!(
            scrape.get(
                "meshward_tls_handshakes_total",
                &[("direction", "inbound"), ("result", "unknown_ca")]
            ),
            None,
            "a label set never counted is absent"
        );
    }

    #[test]
    fn a_series_is_its_name_and_its_exact_labels() {
        let scrape =
            Scrape::parse("x_total{a=\"1\",b=\"2\"} 10\nx_total{a=\"1\"} 1\nx_total 100\ny 3\n")
                .unwrap();
        assert_eq!(scrape.get("x_total", &[("a", "1"), ("b", "2")]), Some(10.0));
        assert_eq!(scrape.get("x_total", &[("a", "1")]), Some(1.0));
        assert_eq!(scrape.get("x_total", &[]), Some(100.0));
        assert_eq!(scrape.get("x_total", &[("b", "2")]), None, "a subset");
        assert_eq!(
            scrape.get("x_total", &[("a", "1"), ("b", "2"), ("c", "3")]),
            None,
            "a superset"
        );
        assert_eq!(scrape.get("x", &[]), None, "a prefix of a name");
        assert_eq!(scrape.iter().count(), 4);
    }

    #[test]
    fn label_values_are_unescaped_and_may_hold_any_character() {
        let scrape =
            Scrape::parse("m{ a = \"q\\\"b\\\\s\\nn\" , b=\"{},= #x\", c=\"\",} 1\n").unwrap();
        assert_eq!(
            scrape.get("m", &[("a", "q\"b\\s\nn"), ("b", "{},= #x"), ("c", "")]),
            Some(1.0)
        );
    }

    #[test]
    fn values_timestamps_exemplars_comments_and_eof() {
        let text = "# HELP a A thing.\n# TYPE a counter\n\n\
                    a_total 1.5e3 1700000000000\n\
                    b{le=\"+Inf\"} +Inf\n\
                    c -Inf\n\
                    d NaN\n\
                    e_bucket{le=\"0.1\"} 4 # {trace_id=\"a b\"} 0.05 1.7e9\n\
                    \t f:g 2\n\
                    # EOF\n";
        let scrape = Scrape::parse(text).unwrap();
        assert_eq!(scrape.get("a_total", &[]), Some(1500.0));
        assert_eq!(scrape.get("b", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert_eq!(scrape.get("c", &[]), Some(f64::NEG_INFINITY));
        assert!(scrape.get("d", &[]).unwrap().is_nan());
        assert_eq!(scrape.get("e_bucket", &[("le", "0.1")]), Some(4.0));
        assert_eq!(scrape.get("f:g", &[]), Some(2.0));
        assert_eq!(scrape.to_string(), text);
    }

    #[test]
    fn a_malformed_line_fails_with_its_number() {
        let refused = [
            ("m", "a blank expected before the value"),
            ("m ", "no value"),
            ("m one", "\"one\" is not a number"),
            ("m 1 2 3", "more than a value and a timestamp"),
            ("m{a=\"1\"}1", "a blank expected before the value"),
            (
                "m{a=\"1} 1",
                "label a: unterminated value or unknown escape",
            ),
            (
                "m{a=\"\\t\"} 1",
                "label a: unterminated value or unknown escape",
            ),
            ("m{a=1} 1", "a quoted value expected for label a"),
            ("m{a} 1", "`=` expected after label a"),
            ("m{a=\"1\" b=\"2\"} 1", "`,` or `}` expected after a label"),
            ("m{,} 1", "a label name expected"),
            ("m{1a=\"1\"} 1", "a label name expected"),
            ("m{a=\"1\",a=\"2\"} 1", "label a twice"),
            ("1m 1", "a metric name expected"),
            ("{a=\"1\"} 1", "a metric name expected"),
            ("m-n 1", "a blank expected before the value"),
            ("m{a=\"1\"} 1\nm{a=\"1\"} 2", "the same series twice"),
            ("# EOF\nm 1", "text after # EOF"),
        ];
        for (text, reason) in refused {
            let e = Scrape::parse(&format!("ok 1\n{text}\n")).unwrap_err();
            assert_eq!(e.reason, reason, "{text:?}");
            assert_eq!(e.line, 1 + text.lines().count(), "{text:?}");
        }
    }
}
