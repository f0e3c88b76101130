//! Open connections with a peer that is revoked while connected are cut.
//!
//! New connections are refused at the handshake by the TLS verifiers. A
//! connection already open is watched: a task waits on the revocation list
//! (the same watch channel the verifiers read) and, the moment it names the
//! peer's identity or certificate serial, shuts the socket down both ways.
//! That ends the connection whoever holds it and whatever it is doing —
//! TCP being copied, an HTTP/1.1 or HTTP/2 connection between requests or
//! in the middle of one, an upstream connection idle in a pool — and the
//! peer sees it closed at once.

use std::os::fd::AsFd;
use std::sync::Arc;

use meshward_identity::revocation::Revocations;
use tokio::net::TcpStream;

use crate::identity::Peer;
use crate::metrics::{Direction, DirectionLabels, Metrics};

/// Watches one connection; dropped with it, which ends the watch.
#[derive(Debug)]
pub struct CutWhenRevoked(tokio::task::JoinHandle<()>);

impl Drop for CutWhenRevoked {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching `tcp`, the socket under a mutual TLS session with `peer`.
/// `None` if the socket cannot be shared (out of file descriptors): the
/// connection then lives on unwatched, as it would have before revocation
/// existed, and the handshake checks still apply to every new one.
pub fn watch(
    tcp: &TcpStream,
    peer: &Peer,
    revocations: &Revocations,
    direction: Direction,
    metrics: &Arc<Metrics>,
) -> Option<CutWhenRevoked> {
    // A second handle on the same socket: shutting it down shuts the
    // connection down for its owner too.
    let socket = match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => std::net::TcpStream::from(fd),
        Err(e) => {
            tracing::warn!(peer = %peer.id, "cannot watch this connection for revocation: {e}");
            return None;
        }
    };
    let (id, serial) = (peer.id.clone(), peer.serial.clone());
    let revocations = revocations.clone();
    let metrics = metrics.clone();
    Some(CutWhenRevoked(tokio::spawn(async move {
        let revoked = revocations.until_revoked(Some(&id), &serial).await;
        tracing::warn!(peer = %id, ?direction, %revoked, "closing a connection: the peer was revoked");
        metrics
            .revoked_peers_cut
            .get_or_create(&DirectionLabels { direction })
            .inc();
        let _ = socket.shutdown(std::net::Shutdown::Both);
    })))
}

#[cfg(test)]
mod tests {
    use meshward_api::resources::{Revocation, RevocationKind};
    use meshward_identity::revocation::RevocationList;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_connection_is_shut_when_its_peer_is_revoked_and_not_before() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let peer = Peer {
            id: Arc::from("spiffe://cluster.local/ns/a/sa/b"),
            cert_sha256: String::new(),
            serial: Arc::from("01:02"),
        };
        let revocations = Revocations::new();
        let metrics = Arc::new(Metrics::default());
        let _watch = watch(&server, &peer, &revocations, Direction::Inbound, &metrics).unwrap();
        let revoke = |kind, value: &str| {
            revocations.replace(
                RevocationList::new(&[Revocation {
                    kind,
                    value: value.into(),
                    reason: String::new(),
                    revoked_at: "t".into(),
                }])
                .unwrap(),
            );
        };

        // Someone else revoked: the connection carries on.
        revoke(RevocationKind::Serial, "09");
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // The peer's serial revoked: both ends see the connection end,
        // though nobody on the server side was reading.
        revoke(RevocationKind::Serial, "01:02");
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_end(&mut rest),
        )
        .await
        .expect("the client sees the connection closed");
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?} {rest:?}");
        let n = server.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the owner's reads end too");
        assert!(
            metrics.encode().contains(
                "meshward_revoked_peer_connections_closed_total{direction=\"inbound\"} 1"
            ),
            "{}",
            metrics.encode()
        );
    }
}
