//! Transport-level gRPC errors as grpc-go words them. etcd's clients see grpc-go's statuses
//! for what the gRPC library refuses before etcd's handlers run; tonic refuses the same
//! things with other codes. A tower layer around every client gRPC service rewrites them, in
//! the response headers (a call that fails before any message) and in the trailers (a
//! stream whose later message is refused).

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What tonic says of a message over the decoding limit (OUT_OF_RANGE).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// grpc-go's status for a message over the server's limit: RESOURCE_EXHAUSTED, "grpc:
/// received message larger than max (N vs. M)".
fn rewrite(headers: &mut HeaderMap) {
    let (Some(code), Some(msg)) = (headers.get("grpc-status"), headers.get("grpc-message")) else {
        return;
    };
    if code.as_bytes() != b"11" {
        return;
    }
    let msg = percent_decode(msg.as_bytes());
    let Some(rest) = msg.strip_prefix(TONIC_TOO_LARGE) else {
        return;
    };
    // "{len} bytes, the limit is: {limit} bytes"
    let mut numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let (Some(len), Some(limit)) = (numbers.next(), numbers.next()) else {
        return;
    };
    let go = format!("grpc: received message larger than max ({len} vs. {limit})");
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&go) {
        headers.insert("grpc-message", v);
    }
}

/// gRPC's percent-encoding of grpc-message (RFC 3986 style, %XX for bytes outside printable
/// ASCII and for '%').
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(v[i + 1]), hex(v[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Copy, Default)]
pub struct GrpcGoErrorsLayer;

impl<S> tower::Layer<S> for GrpcGoErrorsLayer {
    type Service = GrpcGoErrors<S>;
    fn layer(&self, inner: S) -> GrpcGoErrors<S> {
        GrpcGoErrors { inner }
    }
}

#[derive(Clone)]
pub struct GrpcGoErrors<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcGoErrors<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Rewritten<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite(resp.headers_mut());
            Ok(resp.map(|b| Rewritten { inner: Box::pin(b) }))
        })
    }
}

/// A response body whose trailers pass through `rewrite`.
pub struct Rewritten<B> {
    inner: Pin<Box<B>>,
}

impl<B: Body<Data = Bytes>> Body for Rewritten<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: &str, msg: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", code.parse().unwrap());
        h.insert("grpc-message", msg.parse().unwrap());
        h
    }

    #[test]
    fn a_message_over_the_limit_is_resource_exhausted_as_grpc_go_says() {
        let mut h = headers(
            "11",
            "Error, decoded message length too large: found 2097252 bytes, the limit is: 2097152 bytes",
        );
        rewrite(&mut h);
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(
            h["grpc-message"],
            "grpc: received message larger than max (2097252 vs. 2097152)"
        );
    }

    #[test]
    fn other_statuses_pass_unchanged() {
        for (code, msg) in [
            (
                "11",
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                "3",
                "Error, decoded message length too large: found 1 bytes, the limit is: 0 bytes",
            ),
        ] {
            let mut h = headers(code, msg);
            rewrite(&mut h);
            assert_eq!(
                (
                    h["grpc-status"].to_str().unwrap(),
                    h["grpc-message"].to_str().unwrap()
                ),
                (code, msg)
            );
        }
    }

    #[test]
    fn percent_encoded_messages_are_read() {
        assert_eq!(percent_decode(b"a%25b%C3%A9"), "a%bé");
        assert_eq!(percent_decode(b"trailing%2"), "trailing%2");
    }
}
