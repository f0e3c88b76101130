//! Protocol detection for ports that do not declare one: HTTP/1.x and
//! HTTP/2 are recognised by their first bytes; anything else is TCP.

/// Enough bytes to recognise every method and the HTTP/2 preface.
pub const MAX_PREFIX: usize = 24;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Whether `prefix` is HTTP.
pub fn is_http(prefix: &[u8]) -> bool {
    prefix.starts_with(H2_PREFACE) || METHODS.iter().any(|m| prefix.starts_with(m))
}

/// Whether more bytes could change the answer: stops reading as soon as the
/// prefix is HTTP or cannot become HTTP.
pub fn decided(prefix: &[u8]) -> bool {
    if is_http(prefix) {
        return true;
    }
    let could_be = |candidate: &[u8]| {
        let n = prefix.len().min(candidate.len());
        prefix[..n] == candidate[..n]
    };
    !(could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert!(is_http(b"GET / HTTP/1.1\r\n"));
        assert!(is_http(H2_PREFACE));
        assert!(!is_http(b"\x16\x03\x01"));
        assert!(!is_http(b"SSH-2.0-OpenSSH"));
        assert!(!decided(b"GE"));
        assert!(decided(b"SSH"));
        assert!(decided(b"POST "));
        assert!(!decided(b"PRI * HTTP/2"));
    }
}
