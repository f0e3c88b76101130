//! Detection from a connection's first bytes: whether it is the mesh's
//! mutual TLS, some other TLS (an application's own), or plaintext; and, for
//! ports that declare no protocol, whether it is HTTP/1.x, HTTP/2 or TCP.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::identity::ALPN_MESH;

/// What a connection opens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TLS ClientHello offering the mesh's ALPN marker: another proxy.
    MeshTls,
    /// TLS without the marker: the application's own TLS, passed through.
    OtherTls,
    /// Anything else, or nothing before the detection timeout (a client of a
    /// server-first protocol).
    Plaintext,
}

/// The largest ClientHello looked at: one TLS record.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// Classifies `tcp` by peeking (nothing is consumed). Waits at most
/// `first_byte` for the peer to send anything, then up to `hello` for a
/// complete ClientHello. `None` when the peer closed.
pub async fn transport(
    tcp: &TcpStream,
    first_byte: Duration,
    hello: Duration,
) -> Option<Transport> {
    let mut buf = vec![0u8; MAX_HELLO];
    let n = match tokio::time::timeout(first_byte, tcp.peek(&mut buf[..1])).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(n)) => n,
        Err(_) => return Some(Transport::Plaintext),
    };
    if n == 0 || buf[0] != 0x16 {
        return Some(Transport::Plaintext);
    }
    let deadline = tokio::time::Instant::now() + hello;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
            // A ClientHello that never completes is not the mesh's.
            Err(_) => return Some(Transport::OtherTls),
        };
        let mut acceptor = rustls::server::Acceptor::default();
        let mut bytes = &buf[..n];
        if acceptor.read_tls(&mut bytes).is_err() {
            return Some(Transport::OtherTls);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let mesh = accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_MESH));
                return Some(if mesh {
                    Transport::MeshTls
                } else {
                    Transport::OtherTls
                });
            }
            Ok(None) if n < buf.len() => {
                // The rest of the hello is still in flight.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return Some(Transport::OtherTls),
        }
    }
}

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
