//! Byte streams: putting back bytes read for detection, the stream types
//! the upstream connection pool hands to hyper, and counting a TCP
//! connection's bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A stream whose first bytes were read to detect the protocol, and are
/// read again by whoever takes it next.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads the first bytes of `stream` (up to `max`) until `enough` says the
/// protocol is decided. If nothing arrives within `first_byte`, returns
/// nothing (a server-first protocol); once bytes flow, keeps reading until
/// decided, for at most `rest` — so a client cannot make an HTTP connection
/// look like TCP by pausing mid-method. An empty result also means the peer
/// closed.
pub async fn read_prefix<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
    enough: impl Fn(&[u8]) -> bool,
    first_byte: std::time::Duration,
    rest: std::time::Duration,
) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(max);
    let mut deadline = tokio::time::Instant::now() + first_byte;
    while buf.len() < max && !enough(&buf) {
        let mut chunk = [0u8; 256];
        let want = (max - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                if buf.is_empty() {
                    deadline = tokio::time::Instant::now() + rest;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(Bytes::from(buf))
}

/// A connection to an upstream endpoint: mutual TLS (watched for the
/// server's revocation while it lives) or, for `tls=DISABLE` destinations,
/// plaintext.
#[derive(Debug)]
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(
        Box<tokio_rustls::client::TlsStream<TcpStream>>,
        Option<crate::revocation::CutWhenRevoked>,
    ),
}

impl UpstreamStream {
    /// The ALPN protocol the server chose, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            UpstreamStream::Plain(_) => None,
            UpstreamStream::Tls(tls, _) => tls.get_ref().1.alpn_protocol(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls($s, _) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl Connection for UpstreamStream {
    /// HTTP/2 when the server chose it; the server's verified identity for
    /// the responses (Istio's `destination_principal`).
    fn connected(&self) -> Connected {
        let mut connected = Connected::new();
        if let UpstreamStream::Tls(tls, _) = self
            && let Some(server) = crate::identity::ServerIdentity::of(tls.get_ref().1)
        {
            connected = connected.extra(server);
        }
        if self.alpn() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

/// A downstream stream whose bytes are counted as they pass: read from the
/// peer into `received`, written to it into `sent` (Istio's TCP byte
/// counters, current while the connection lives).
pub struct Metered<S> {
    inner: S,
    received: prometheus_client::metrics::counter::Counter,
    sent: prometheus_client::metrics::counter::Counter,
}

impl<S> Metered<S> {
    pub fn new(inner: S, connection: &crate::metrics::istio::TcpConnection) -> Metered<S> {
        Metered {
            inner,
            received: connection.received.clone(),
            sent: connection.sent.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.received.inc_by((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.sent.inc_by(n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.sent.inc_by(n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"hello world").await.unwrap();
        drop(a);
        let mut b = b;
        let second = std::time::Duration::from_secs(1);
        let prefix = read_prefix(&mut b, 5, |_| false, second, second)
            .await
            .unwrap();
        assert_eq!(&prefix[..], b"hello");
        let mut all = String::new();
        Rewind::new(prefix, b)
            .read_to_string(&mut all)
            .await
            .unwrap();
        assert_eq!(all, "hello world");
    }
}
