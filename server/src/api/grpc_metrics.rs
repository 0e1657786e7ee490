//! go-grpc-prometheus's server metrics, which etcd exports and its dashboard graphs:
//! `grpc_server_started_total` when a call arrives, `grpc_server_handled_total` with the
//! call's status code when it ends (for streams, when the stream ends), plus etcd's client
//! byte counters. A tower layer around every client gRPC service.

use crate::metrics::METRICS;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Every method of the client API with its gRPC type, so the counters exist (at zero) before
/// the first call, as go-grpc-prometheus pre-registers them.
const METHODS: &[(&str, &[&str])] = &[
    (
        "etcdserverpb.KV",
        &[
            "Range",
            "RangeStream",
            "Put",
            "DeleteRange",
            "Txn",
            "Compact",
        ],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
            "Downgrade",
        ],
    ),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    (
        "v3electionpb.Election",
        &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
    ),
];

/// gRPC status code names as go-grpc-prometheus labels them (Go's `codes.Code.String()`).
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot")
        | ("etcdserverpb.KV", "RangeStream")
        | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

/// Every method's series at zero, as go-grpc-prometheus registers them when the server is
/// created (dashboards see a method before its first call). Once per process.
pub fn preregister() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let m = &*METRICS;
        for (service, methods) in METHODS {
            for method in *methods {
                let t = grpc_type(service, method);
                m.grpc_started.with_label_values(&[t, service, method]);
                m.grpc_msg_received.with_label_values(&[t, service, method]);
                m.grpc_msg_sent.with_label_values(&[t, service, method]);
                for code in CODES {
                    m.grpc_handled
                        .with_label_values(&[t, service, method, code]);
                }
            }
        }
    });
}

fn code_name(status: &[u8]) -> &'static str {
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .and_then(|n| CODES.get(n).copied())
        .unwrap_or("Unknown")
}

/// One call's labels: type, service, method.
#[derive(Clone)]
struct Call {
    labels: [String; 3],
}

impl Call {
    fn from_path(path: &str) -> Call {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or("").to_string();
        let method = parts.next().unwrap_or("").to_string();
        Call {
            labels: [grpc_type(&service, &method).to_string(), service, method],
        }
    }

    /// The code etcd counts when the client goes away first: Canceled, except for
    /// LeaseKeepAlive, whose handler turns the client's cancellation into ErrGRPCNoLeader
    /// (Unavailable).
    fn code_when_client_left(&self) -> &'static str {
        if self.labels[1] == "etcdserverpb.Lease" && self.labels[2] == "LeaseKeepAlive" {
            "Unavailable"
        } else {
            "Canceled"
        }
    }

    fn handled(&self, code: &str) {
        let [t, s, m] = &self.labels;
        METRICS
            .grpc_handled
            .with_label_values(&[t, s, m, code])
            .inc();
    }
}

/// The layer; `warn_unary` is `--warning-unary-request-duration`: a unary call that takes
/// longer is logged as etcd's "request stats" warning.
#[derive(Clone, Copy)]
pub struct GrpcMetricsLayer {
    pub warn_unary: std::time::Duration,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            warn_unary: self.warn_unary,
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    warn_unary: std::time::Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let call = Call::from_path(req.uri().path());
        {
            let [t, s, m] = &call.labels;
            METRICS.grpc_started.with_label_values(&[t, s, m]).inc();
        }
        let req = req.map(|b| {
            tonic::body::Body::new(Counted {
                inner: Box::pin(b),
                call: None,
                labels: call.labels.clone(),
                received: true,
                frames: Frames::default(),
            })
        });
        let fut = self.inner.call(req);
        let warn_unary = self.warn_unary;
        let start = std::time::Instant::now();
        Box::pin(async move {
            let resp = fut.await?;
            let took = start.elapsed();
            if took > warn_unary && call.labels[0] == "unary" {
                tracing::warn!(
                    time_spent = ?took,
                    expected_duration = ?warn_unary,
                    request = %format!("/{}/{}", call.labels[1], call.labels[2]),
                    "request stats"
                );
            }
            // A call that fails before any message is "trailers-only": the status is a header.
            let early = resp
                .headers()
                .get("grpc-status")
                .map(|v| code_name(v.as_bytes()));
            if let Some(code) = early {
                call.handled(code);
            }
            let labels = call.labels.clone();
            Ok(resp.map(|b| Counted {
                inner: Box::pin(b),
                call: early.is_none().then_some(call),
                labels,
                received: false,
                frames: Frames::default(),
            }))
        })
    }
}

/// A body that counts its bytes and, for a response, reports the call's status when its
/// trailers pass (or Canceled if the client goes away first).
pub struct Counted<B> {
    inner: Pin<Box<B>>,
    /// The call to report, until reported.
    call: Option<Call>,
    labels: [String; 3],
    /// Request body (bytes received) rather than response body (bytes sent).
    received: bool,
    frames: Frames,
}

/// Counts gRPC messages in a byte stream: each is a 5-byte prefix (flag, big-endian length)
/// and the message.
#[derive(Default)]
struct Frames {
    prefix: Vec<u8>,
    /// Message bytes still to pass before the next prefix.
    skip: u64,
}

impl Frames {
    /// Messages whose prefix is in `data`.
    fn count(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                data = &data[n as usize..];
                continue;
            }
            let take = (5 - self.prefix.len()).min(data.len());
            self.prefix.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.prefix.len() == 5 {
                messages += 1;
                let len = [
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ];
                self.skip = u32::from_be_bytes(len) as u64;
                self.prefix.clear();
            }
        }
        messages
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let data = data.clone();
                    let messages = self.frames.count(&data);
                    let [t, s, m] = &self.labels;
                    let labels = [t.as_str(), s.as_str(), m.as_str()];
                    if self.received {
                        METRICS.grpc_received_bytes.inc_by(n);
                        METRICS
                            .grpc_msg_received
                            .with_label_values(&labels)
                            .inc_by(messages);
                    } else {
                        METRICS.grpc_sent_bytes.inc_by(n);
                        METRICS
                            .grpc_msg_sent
                            .with_label_values(&labels)
                            .inc_by(messages);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .map(|v| code_name(v.as_bytes()))
                        .unwrap_or("Unknown");
                    if let Some(call) = self.call.take() {
                        call.handled(code);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.handled("Unknown");
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.handled("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.handled(call.code_when_client_left());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_go_grpc_prometheus() {
        let c = Call::from_path("/etcdserverpb.KV/Range");
        assert_eq!(c.labels, ["unary", "etcdserverpb.KV", "Range"]);
        let c = Call::from_path("/etcdserverpb.Watch/Watch");
        assert_eq!(c.labels[0], "bidi_stream");
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"1"), "Canceled");
        assert_eq!(code_name(b"14"), "Unavailable");
        assert_eq!(code_name(b"x"), "Unknown");
    }

    #[test]
    fn messages_are_counted_across_chunks() {
        let mut f = Frames::default();
        let msg = |len: u8| {
            let mut m = vec![0, 0, 0, 0, len];
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let mut stream = msg(3);
        stream.extend(msg(0));
        stream.extend(msg(10));
        assert_eq!(f.count(&stream), 3);
        let one = msg(4);
        assert_eq!(f.count(&one[..2]), 0);
        assert_eq!(f.count(&one[2..6]), 1);
        assert_eq!(f.count(&one[6..]), 0);
        assert_eq!(f.count(&msg(1)), 1);
    }
}
