//! The learner gate (etcd's v3rpc interceptors): a learner serves Status, the Snapshot stream
//! and serializable Range only; every other client call is refused with `etcdserver: rpc not
//! supported for learner` before its handler runs. One tower layer on the gRPC services, and
//! the same rule for the JSON gateway's routes.

use crate::etcdserver::EtcdServer;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Whether a learner serves the call at this gRPC path (`/package.Service/Method`). A Range
/// passes, and its handler refuses a linearizable one (etcd looks into the request).
pub fn serves(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.Maintenance/Status"
            | "/etcdserverpb.Maintenance/Snapshot"
            | "/etcdserverpb.KV/Range"
            // The gRPC health service answers for the process, as before there was a gate.
            | "/grpc.health.v1.Health/Check"
            | "/grpc.health.v1.Health/Watch"
    )
}

/// The gateway's routes (`/v3/<route>`) a learner serves: those of `serves`.
pub fn serves_route(route: &str) -> bool {
    matches!(
        route,
        "maintenance/status" | "maintenance/snapshot" | "kv/range"
    )
}

#[derive(Clone)]
pub struct LearnerGateLayer(pub Arc<EtcdServer>);

impl<S> tower::Layer<S> for LearnerGateLayer {
    type Service = LearnerGate<S>;
    fn layer(&self, inner: S) -> LearnerGate<S> {
        LearnerGate {
            inner,
            server: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LearnerGate<S> {
    inner: S,
    server: Arc<EtcdServer>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for LearnerGate<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if !serves(req.uri().path()) {
            if let Err(e) = self.server.check_not_learner() {
                let status = tonic::Status::from(e);
                return futures::future::Either::Left(std::future::ready(Ok(status.into_http())));
            }
        }
        futures::future::Either::Right(self.inner.call(req))
    }
}
