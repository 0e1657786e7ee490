//! HTTP responses as etcd's handlers write them (CORS headers, Go's `http.Error` details), for
//! the HTTP endpoints and the JSON gateway alike.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// etcd wraps its handlers in CORS headers for browser clients.
pub fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    use http_body_util::BodyExt;
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    use hyper::header::HeaderValue;
    h.insert("Content-Type", HeaderValue::from_static(content_type));
    h.insert("Access-Control-Allow-Origin", HeaderValue::from_static("*"));
    h.insert(
        "Access-Control-Allow-Methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert(
        "Access-Control-Allow-Headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    // Go's http.Error, which etcd uses for every failure, adds this.
    if !status.is_success() {
        h.insert(
            "X-Content-Type-Options",
            HeaderValue::from_static("nosniff"),
        );
    }
    r
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body.into())
}

pub fn json(status: StatusCode, body: String) -> Response<Body> {
    response(status, "application/json", body)
}
