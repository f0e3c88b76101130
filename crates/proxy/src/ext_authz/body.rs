//! Request bodies for CUSTOM checks (`includeRequestBodyInCheck`), as
//! Envoy's `with_request_body` buffers them: up to `maxRequestBytes` are
//! held and checked; a longer body is refused with 413 unless
//! `allowPartialMessage`, which checks the first `maxRequestBytes` and
//! streams the rest. The application receives exactly the bytes that
//! arrived, the held ones first, so what was checked is what it gets.
//!
//! At most `maxRequestBytes` plus one frame is held: a streaming request
//! longer than that is never read further before the check.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshward_policy::api::RequestBodyInCheck;

use crate::http::{Body, BoxError};

/// The body a check carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedBody {
    pub bytes: Bytes,
    /// Only the first `maxRequestBytes` of a longer body.
    pub partial: bool,
}

/// The outcome of holding a request body for a check.
pub enum Held {
    /// The bytes to check, and the body to forward if allowed.
    Ready(CheckedBody, Body),
    /// Longer than `maxRequestBytes`, without `allowPartialMessage`: 413.
    TooLarge,
    /// The client's body failed (reset, malformed) before the check.
    Failed(String),
}

/// Holds up to `settings.max_request_bytes` of `body`.
pub async fn hold<B>(headers: &HeaderMap, mut body: B, settings: &RequestBodyInCheck) -> Held
where
    B: HttpBody<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let max = usize::try_from(settings.max_request_bytes).unwrap_or(usize::MAX);
    // A declared length over the limit is refused before reading any of it.
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !settings.allow_partial_message && declared.is_some_and(|n| n > max as u64) {
        return Held::TooLarge;
    }
    let mut held = BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    // Partial messages are checked once `max` bytes are in; whole ones need
    // one byte more to tell "exactly max" from "longer".
    while !ended && (held.len() < max || (!settings.allow_partial_message && held.len() == max)) {
        match body.frame().await {
            None => ended = true,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => held.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
            Some(Err(e)) => return Held::Failed(e.into().to_string()),
        }
        if held.len() > max && !settings.allow_partial_message {
            return Held::TooLarge;
        }
    }
    let held = held.freeze();
    let checked = CheckedBody {
        // As Envoy's `x-envoy-auth-partial-body`: more arrived than is checked.
        partial: held.len() > max,
        bytes: held.slice(..held.len().min(max)),
    };
    let rest = (!ended).then_some(body);
    let forward = Replay {
        held: (!held.is_empty()).then_some(held),
        trailers,
        rest,
    };
    Held::Ready(checked, forward.boxed())
}

/// What was held, then what was not read yet.
struct Replay<B> {
    held: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<B>,
}

impl<B> HttpBody for Replay<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(held))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx).map_err(Into::into);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(held),
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + held);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    type Chunks = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn chunks(parts: &[&'static str]) -> Chunks {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(tokio_stream::iter(frames))
    }

    fn settings(max: u32, partial: bool) -> RequestBodyInCheck {
        RequestBodyInCheck {
            max_request_bytes: max,
            allow_partial_message: partial,
            pack_as_bytes: false,
        }
    }

    async fn run(parts: &[&'static str], max: u32, partial: bool) -> Option<(CheckedBody, Bytes)> {
        match hold(&HeaderMap::new(), chunks(parts), &settings(max, partial)).await {
            Held::Ready(checked, body) => {
                let forwarded = body.collect().await.unwrap().to_bytes();
                Some((checked, forwarded))
            }
            Held::TooLarge => None,
            Held::Failed(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_checked_whole_and_forwarded_unchanged() {
        let (checked, forwarded) = run(&["ab", "cd"], 4, false).await.unwrap();
        assert_eq!(checked.bytes, "abcd");
        assert!(!checked.partial);
        assert_eq!(forwarded, "abcd");
    }

    #[tokio::test]
    async fn a_longer_body_is_refused_without_partial_messages() {
        assert!(run(&["ab", "cd", "e"], 4, false).await.is_none());
        let mut headers = HeaderMap::new();
        headers.insert("content-length", "5".parse().unwrap());
        let held = hold(&headers, chunks(&[]), &settings(4, false)).await;
        assert!(
            matches!(held, Held::TooLarge),
            "refused by its declared length"
        );
    }

    #[tokio::test]
    async fn a_partial_message_checks_the_first_bytes_and_forwards_all() {
        let (checked, forwarded) = run(&["abc", "def", "gh"], 4, true).await.unwrap();
        assert_eq!(checked.bytes, "abcd");
        assert!(checked.partial);
        assert_eq!(forwarded, "abcdefgh");
        let (checked, _) = run(&["ab"], 4, true).await.unwrap();
        assert!(!checked.partial);
    }

    #[tokio::test]
    async fn trailers_held_with_the_body_are_forwarded_after_it() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = StreamBody::new(tokio_stream::iter(frames));
        let Held::Ready(checked, forward) =
            hold(&HeaderMap::new(), body, &settings(64, false)).await
        else {
            panic!("held")
        };
        assert_eq!(checked.bytes.len(), 6);
        let collected = forward.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x01x"[..]);
    }

    #[tokio::test]
    async fn an_empty_body_is_checked_empty() {
        let (checked, forwarded) = run(&[], 4, false).await.unwrap();
        assert!(checked.bytes.is_empty() && !checked.partial && forwarded.is_empty());
    }
}
