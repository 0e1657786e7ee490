//! etcd's HTTP endpoints on the client URLs (etcd's `etcdhttp`): `/health`, `/version`, the
//! Kubernetes probe endpoints `/livez` and `/readyz` with etcd 3.6's named checks (each also at
//! `/livez/<check>`, `/readyz/<check>`), and `/metrics` (Prometheus, see `metrics.rs`).
//!
//! etcd serves HTTP/1.1 and gRPC on the same port (cmux). `api::serve` looks at the first bytes
//! of each connection: the HTTP/2 preface goes to gRPC, anything else comes here.

use super::reply::{json, response, text, Body};
use crate::error::EtcdError;
use crate::etcdserver::EtcdServer;
use crate::metrics::METRICS;
use crate::pb::etcdserverpb::AlarmType;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// etcd gives the health check's linearizable read one second.
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Which endpoints a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// A client URL: everything.
    Client,
    /// A `--listen-metrics-urls` listener: `/metrics` and `/health`, as etcd's.
    Metrics,
}

/// Serves `--listen-metrics-urls` on one address until the process ends.
pub async fn serve_metrics(
    server: Arc<EtcdServer>,
    addr: crate::listener::ListenAddr,
) -> anyhow::Result<()> {
    let cfg = &server.cfg;
    let mode = Arc::new(crate::tls::mode_for(
        &addr,
        &[],
        &cfg.listen_metrics_tls,
        &cfg.client_tls,
    )?);
    let listener = crate::listener::Listener::bind(&addr).await?;
    tracing::info!(address = %addr, "serving metrics");
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let (server, mode) = (server.clone(), mode.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = mode.establish(stream).await {
                        serve_connection(server, conn, Endpoints::Metrics).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one HTTP/1.1 connection.
pub async fn serve_connection<S>(server: Arc<EtcdServer>, stream: S, endpoints: Endpoints)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&server, req, endpoints).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(super::limits::MAX_HTTP1_HEAD_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "http connection ended");
    }
}

async fn handle(
    server: &Arc<EtcdServer>,
    req: Request<hyper::body::Incoming>,
    endpoints: Endpoints,
) -> Response<Body> {
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_string();
    let path = path.as_str();
    if endpoints == Endpoints::Client && (path.starts_with("/v3/") || path.starts_with("/v3beta/"))
    {
        return gateway(server, req).await;
    }
    let probe_path = Probe::of_path(path);
    let known = probe_path.is_some()
        || match endpoints {
            Endpoints::Client => {
                matches!(path, "/health" | "/version" | "/metrics" | "/debug/vars")
            }
            // etcd 3.6's metrics listener: /metrics and the health endpoints, so that kubelets
            // can probe a member whose client port requires TLS.
            Endpoints::Metrics => matches!(path, "/health" | "/metrics"),
        };
    if !known {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        r.headers_mut()
            .insert("Allow", hyper::header::HeaderValue::from_static("GET"));
        return r;
    }
    if let Some((probe, only)) = probe_path {
        return run_probe(server, probe, only, &query).await;
    }
    match path {
        "/version" => {
            // etcd 3.6's shape: the cluster and storage versions follow a downgrade job.
            let downgrade = server.downgrade_info();
            json(
                StatusCode::OK,
                format!(
                    r#"{{"etcdserver":"{}","etcdcluster":"{}","storage":"{}"}}"#,
                    crate::version::SERVER_VERSION,
                    downgrade.cluster_version().full(),
                    downgrade.storage_version()
                ),
            )
        }
        "/health" => {
            let check = check_health(server, &query.exclude, query.serializable).await;
            // etcd 3.6's body: the health and why not.
            let body = serde_json::json!({
                "health": check.is_ok().to_string(),
                "reason": check.as_ref().err().cloned().unwrap_or_default(),
            })
            .to_string();
            match check {
                Ok(()) => {
                    METRICS.health_success.inc();
                    text(StatusCode::OK, body)
                }
                Err(reason) => {
                    METRICS.health_failures.inc();
                    tracing::warn!(reason, "/health error");
                    // Go's http.Error: the body plus a newline.
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("{body}\n"))
                }
            }
        }
        // Alive: the process answers and its local store serves reads; no quorum needed, so a
        // partitioned member is not restarted for it.
        "/metrics" => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(server),
        ),
        "/debug/vars" => json(StatusCode::OK, debug_vars(server).await.to_string()),
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// `/metrics`: the state gauges drawn from the server at scrape time, then every metric.
fn metrics_text(server: &EtcdServer) -> String {
    use std::sync::atomic::Ordering;
    let m = &*METRICS;
    super::grpc_metrics::preregister();
    let leader = server.raft_status.leader.load(Ordering::Relaxed);
    m.has_leader.set((leader != 0) as i64);
    m.is_leader.set((leader != 0 && leader == server.id) as i64);
    m.is_learner.set(server.member().is_learner as i64);
    m.proposals_committed
        .set(server.raft_status.commit.load(Ordering::Relaxed) as i64);
    m.proposals_applied.set(server.applied_index() as i64);
    m.server_id
        .with_label_values(&[&format!("{:x}", server.id)])
        .set(1);
    m.quota_backend_bytes
        .set(server.cfg.quota_backend_bytes as i64);
    let size = server.store.size_on_disk() as i64;
    m.db_total_size.set(size);
    m.db_total_size_in_use.set(size);
    m.debugging_db_total_size.set(size);
    m.keys_total.set(server.store.live_keys() as i64);
    m.current_revision.set(server.store.current_rev());
    m.compact_revision.set(server.store.compact_rev());
    m.auth_revision.set(server.auth.revision() as i64);
    m.render()
}

/// The JSON gateway: POST only, the body read whole, the token from `Authorization`.
async fn gateway(server: &Arc<EtcdServer>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    }
    let path = req.uri().path().to_string();
    // grpc-gateway v2 refuses a header gRPC metadata cannot carry.
    if let Some(v) = req.headers().get("authorization") {
        if v.as_bytes().iter().any(|b| !(0x20..=0x7e).contains(b)) {
            return super::gateway::error_response(tonic::Status::internal(
                "header key \"authorization\" contains value with non-printable ASCII characters",
            ));
        }
    }
    let caller = crate::auth::Caller {
        token: req
            .headers()
            .get("authorization")
            .map(|v| crate::auth::Caller::token_text(v.as_bytes())),
        // etcd ignores a client certificate's name on gateway requests.
        common_name: None,
    };
    let limit = server.cfg.max_request_bytes + super::limits::GRPC_OVERHEAD_BYTES;
    let body = match super::gateway::read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(s) => return super::gateway::error_response(s),
    };
    super::gateway::handle(server, &path, caller, &body)
        .await
        .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "Not Found\n"))
}

/// etcd's health rule: no alarm (except excluded ones), a known leader, and unless
/// `serializable=true`, a linearizable read that completes within a second.
async fn check_health(
    server: &EtcdServer,
    exclude: &HashSet<String>,
    serializable: bool,
) -> Result<(), String> {
    let alarms: Vec<String> = server
        .alarms
        .lock()
        .iter()
        .filter_map(|(_, a)| AlarmType::try_from(*a).ok())
        .map(|a| a.as_str_name().to_string())
        .filter(|name| !exclude.contains(name))
        .collect();
    // etcd 3.6's reasons, as /health reports them.
    if let Some(name) = alarms.first() {
        return Err(match name.as_str() {
            "NOSPACE" | "CORRUPT" => format!("ALARM {name}"),
            _ => "ALARM UNKNOWN".to_string(),
        });
    }
    let status = server.node_status().await.map_err(|e| e.to_string())?;
    if status.leader == 0 && !serializable {
        return Err("RAFT NO LEADER".to_string());
    }
    if !serializable {
        match tokio::time::timeout(HEALTH_READ_TIMEOUT, server.read_barrier()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("RANGE ERROR:{e}")),
            Err(_) => return Err(format!("RANGE ERROR:{}", EtcdError::Timeout)),
        }
    }
    Ok(())
}

/// etcd 3.6's probes: `/livez` (the process serves local reads) and `/readyz` (it also serves
/// linearizable reads, holds no CORRUPT alarm and is a voting member).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Probe {
    Livez,
    Readyz,
}

impl Probe {
    /// The checks of each probe. etcd runs them in Go's map order, which changes from request
    /// to request; oxcd keeps one fixed order.
    fn checks(self) -> &'static [&'static str] {
        match self {
            Probe::Livez => &["serializable_read"],
            Probe::Readyz => &[
                "data_corruption",
                "serializable_read",
                "linearizable_read",
                "non_learner",
            ],
        }
    }

    /// `/livez`, `/readyz`, or one check of theirs (`/readyz/non_learner`).
    fn of_path(path: &str) -> Option<(Probe, Option<&'static str>)> {
        let (root, rest) = match path.get(1..)?.split_once('/') {
            Some((root, rest)) => (root, Some(rest)),
            None => (path.get(1..)?, None),
        };
        let probe = match root {
            "livez" => Probe::Livez,
            "readyz" => Probe::Readyz,
            _ => return None,
        };
        match rest {
            None => Some((probe, None)),
            Some(name) => {
                let check = probe.checks().iter().find(|c| **c == name)?;
                Some((probe, Some(*check)))
            }
        }
    }
}

async fn run_check(server: &EtcdServer, check: &str) -> Result<(), String> {
    let local_read = || {
        let r = crate::pb::etcdserverpb::RangeRequest {
            keys_only: true,
            limit: 1,
            ..Default::default()
        };
        crate::txn::range(&server.store.read(), &r)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match check {
        "data_corruption" => {
            let corrupt = AlarmType::Corrupt as i32;
            if server.alarms.lock().iter().any(|(_, a)| *a == corrupt) {
                return Err("alarm activated: CORRUPT".to_string());
            }
            Ok(())
        }
        "serializable_read" => local_read(),
        "linearizable_read" => {
            server.read_barrier().await.map_err(|e| e.to_string())?;
            local_read()
        }
        "non_learner" => match server.check_not_learner() {
            Ok(()) => Ok(()),
            Err(_) => Err("not supported for learner".to_string()),
        },
        _ => Ok(()),
    }
}

/// etcd 3.6's `runHealthChecks`: one line per check, `ok\n` on success (after the lines when
/// `verbose` is asked for), the lines as the error otherwise. `exclude` drops checks of the
/// whole probe by name.
async fn run_probe(
    server: &EtcdServer,
    probe: Probe,
    only: Option<&'static str>,
    query: &Query,
) -> Response<Body> {
    let checks: Vec<&str> = match only {
        Some(c) => vec![c],
        None => probe
            .checks()
            .iter()
            .copied()
            .filter(|c| !query.exclude.contains(*c))
            .collect(),
    };
    let mut lines = String::new();
    let mut failed = false;
    for check in checks {
        match run_check(server, check).await {
            Ok(()) => lines.push_str(&format!("[+]{check} ok\n")),
            Err(e) => {
                failed = true;
                lines.push_str(&format!("[-]{check} failed: {e}\n"));
            }
        }
    }
    if failed {
        tracing::error!(?probe, reason = %lines, "Health check error");
        // Go's http.Error: the text plus a newline.
        return text(StatusCode::SERVICE_UNAVAILABLE, format!("{lines}\n"));
    }
    let body = if query.verbose {
        format!("{lines}ok\n")
    } else {
        "ok\n".to_string()
    };
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        "X-Content-Type-Options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    r
}

#[derive(Default, Debug, PartialEq)]
struct Query {
    exclude: HashSet<String>,
    serializable: bool,
    verbose: bool,
}

impl Query {
    fn parse(q: &str) -> Query {
        let mut out = Query::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "exclude" => {
                    out.exclude.insert(v.to_string());
                }
                "serializable" => out.serializable = v == "true",
                "verbose" => out.verbose = true,
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_reads_exclude_and_serializable() {
        let q = Query::parse("exclude=NOSPACE&serializable=true&exclude=CORRUPT&x");
        assert!(q.serializable);
        assert!(q.exclude.contains("NOSPACE") && q.exclude.contains("CORRUPT"));
        assert_eq!(Query::parse(""), Query::default());
        assert!(!Query::parse("serializable=1").serializable);
        assert!(Query::parse("verbose").verbose);
    }

    #[test]
    fn probe_paths_are_the_probes_and_their_checks() {
        assert_eq!(Probe::of_path("/livez"), Some((Probe::Livez, None)));
        assert_eq!(
            Probe::of_path("/readyz/non_learner"),
            Some((Probe::Readyz, Some("non_learner")))
        );
        assert_eq!(Probe::of_path("/livez/non_learner"), None);
        assert_eq!(Probe::of_path("/readyz/"), None);
        assert_eq!(Probe::of_path("/health"), None);
        assert_eq!(Probe::of_path(""), None);
    }
}

/// etcd's expvar page (`/debug/vars`): the command line, the descriptor limit and Raft's
/// status as etcd publishes it (`raft.status`). Go's `memstats` has no counterpart here.
async fn debug_vars(server: &Arc<EtcdServer>) -> serde_json::Value {
    let hex = |id: u64| format!("{id:x}");
    let st = server.node_status().await.unwrap_or_default();
    let raft = &server.raft_status;
    let progress: serde_json::Map<String, serde_json::Value> = st
        .progress
        .iter()
        .map(|(id, (matched, _))| {
            (
                hex(*id),
                serde_json::json!({"match": matched, "next": matched + 1}),
            )
        })
        .collect();
    // (A member between terms reports as a follower.)
    let state = if st.is_leader {
        "StateLeader"
    } else {
        "StateFollower"
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let fd_limit = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur,
        _ => 0,
    };
    serde_json::json!({
        "cmdline": std::env::args().collect::<Vec<_>>(),
        "file_descriptor_limit": fd_limit,
        "raft.status": {
            "id": hex(server.id),
            "term": raft.term.load(std::sync::atomic::Ordering::Relaxed),
            "commit": raft.commit.load(std::sync::atomic::Ordering::Relaxed),
            "lead": hex(st.leader),
            "raftState": state,
            "applied": server.applied_index(),
            "progress": progress,
        },
    })
}
