//! Protobuf duration strings (`"5s"`, `"0.5s"`, `"100ms"`) as Istio accepts them.

use std::time::Duration;

/// Parses `<decimal>s` (protobuf JSON form) or `<integer>ms`.
pub fn parse(value: &str) -> Option<Duration> {
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse::<u64>().ok().map(Duration::from_millis);
    }
    let secs = value.strip_suffix('s')?;
    if secs.is_empty() || secs.starts_with(['-', '+']) {
        return None;
    }
    secs.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 315_576_000_000.0)
        .map(Duration::from_secs_f64)
}

/// Istio's `ValidateDuration` for timeouts: at least 1ms, millisecond precision.
pub fn parse_timeout(value: &str) -> Result<Duration, String> {
    let d = parse(value).ok_or_else(|| {
        format!("invalid duration {value:?}: use e.g. \"5s\", \"0.5s\" or \"500ms\"")
    })?;
    if d < Duration::from_millis(1) {
        return Err("duration must be greater than 1ms".into());
    }
    if d.as_nanos() % 1_000_000 != 0 {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("5"), None);
        assert_eq!(parse("-1s"), None);
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("0.0001s").is_err());
        assert!(parse_timeout("1.5s").is_ok());
    }
}
