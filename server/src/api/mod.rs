//! Thin gRPC services of the etcd v3 API: validate, call the server, fill the header.
//! Errors become etcd's gRPC statuses in one place (`status.rs`).

pub(crate) mod auth;
mod authority;
pub(crate) mod cluster;
mod concurrency;
pub(crate) mod election;
pub(crate) mod gateway;
mod grpc_errors;
pub(crate) mod grpc_metrics;
mod h2;
pub mod http;
mod keepalive;
pub mod key;
pub(crate) mod kv;
mod learner;
pub(crate) mod lease;
pub(crate) mod limits;
pub(crate) mod lock;
pub(crate) mod maintenance;
pub mod peer;
mod reply;
mod status;
mod watch;

use crate::etcdserver::EtcdServer;
use crate::listener::{ListenAddr, Listener, Socket};
use crate::pb::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use limits::{GRPC_OVERHEAD_BYTES, MAX_HEADER_LIST_BYTES};
use std::sync::Arc;

/// What a client listener serves: both protocols (etcd's cmux), or one of them when
/// --listen-client-http-urls gives HTTP its own listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    Both,
    GrpcOnly,
    HttpOnly,
}

/// Serves the client API on one listener until the process ends.
pub async fn serve(
    server: Arc<EtcdServer>,
    addr: ListenAddr,
    serves: Serves,
) -> anyhow::Result<()> {
    let max = server.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let cfg = &server.cfg;
    let mode = crate::tls::mode_for(
        &addr,
        &cfg.listen_client_plain,
        &cfg.listen_client_tls,
        &cfg.client_tls,
    )?;
    let listener = Listener::bind(&addr).await?;
    grpc_metrics::preregister();
    // etcd's lines: tools and tests wait for "ready to serve client requests".
    tracing::info!("ready to serve client requests");
    match mode {
        crate::tls::Mode::Plain => tracing::info!(
            address = %addr,
            "serving client traffic insecurely; this is strongly discouraged!"
        ),
        crate::tls::Mode::Both(_) => {
            tracing::info!(address = %addr, "serving client traffic securely");
            tracing::info!(
                address = %addr,
                "serving client traffic insecurely; this is strongly discouraged!"
            );
        }
        crate::tls::Mode::Tls(_) => {
            tracing::info!(address = %addr, "serving client traffic securely")
        }
    }
    let incoming = async_stream_incoming(server.clone(), listener, mode, serves);
    // grpc.health.v1 answers SERVING for the server as a whole (service ""), as etcd's does.
    let (_health, health_service) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(cfg.max_concurrent_streams))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(cfg.keepalive_interval)
        .http2_keepalive_timeout(cfg.keepalive_timeout)
        .layer(grpc_metrics::GrpcMetricsLayer {
            warn_unary: cfg.warning_unary_request_duration,
        })
        // Inside the metrics layer, so the counters see the codes clients get.
        .layer(grpc_errors::GrpcGoErrorsLayer)
        // Inside both: a learner's refusal is counted and worded like a handler's.
        .layer(learner::LearnerGateLayer(server.clone()))
        .add_service(
            KvServer::from_arc(Arc::new(kv::KvService(server.clone())))
                .max_decoding_message_size(max),
        )
        .add_service(
            WatchServer::new(watch::WatchService(server.clone())).max_decoding_message_size(max),
        )
        .add_service(
            LeaseServer::new(lease::LeaseService(server.clone())).max_decoding_message_size(max),
        )
        .add_service(
            ClusterServer::new(cluster::ClusterService(server.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            MaintenanceServer::new(maintenance::MaintenanceService(server.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            AuthServer::new(auth::AuthService(server.clone())).max_decoding_message_size(max),
        )
        .add_service(
            LockServer::new(lock::LockService(server.clone())).max_decoding_message_size(max),
        )
        .add_service(
            ElectionServer::new(election::ElectionService(server.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(health_service)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Accepted client connections that speak HTTP/2 (gRPC), each wrapped so that grpc-go's URL
/// authorities are accepted. Other connections are HTTP/1.1 and go to `http` (etcd's cmux):
/// a plain connection is told by its first bytes, a TLS one by the protocol ALPN chose.
fn async_stream_incoming(
    server: Arc<EtcdServer>,
    listener: Listener,
    mode: crate::tls::Mode,
    serves: Serves,
) -> impl futures::Stream<
    Item = std::io::Result<authority::AuthorityFix<keepalive::KeepaliveEnforced<crate::tls::Conn>>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mode = Arc::new(mode);
    let min_time = server.cfg.keepalive_min_time;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: etcd logs and keeps accepting.
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let grpc = tx.clone();
            let server = server.clone();
            let mode = mode.clone();
            tokio::spawn(async move {
                let Ok(conn) = mode.establish(stream).await else {
                    return;
                };
                let h2 = match &conn {
                    crate::tls::Conn::Plain(tcp) => starts_with_http2_preface(tcp).await,
                    tls => Ok(tls.negotiated_h2().unwrap_or(false)),
                };
                // A connection of the protocol this listener does not serve is closed.
                match h2 {
                    Ok(true) if serves == Serves::HttpOnly => {}
                    Ok(false) if serves == Serves::GrpcOnly => {}
                    Ok(true) => {
                        let conn = keepalive::KeepaliveEnforced::new(conn, min_time);
                        let _ = grpc.send(Ok(authority::AuthorityFix::new(conn))).await;
                    }
                    Ok(false) => {
                        http::serve_connection(server, conn, http::Endpoints::Client).await
                    }
                    Err(_) => {}
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether a connection's first bytes are HTTP/2's preface ("PRI "), read without consuming.
/// A silent connection is given a while, then dropped.
pub(crate) async fn starts_with_http2_preface(stream: &Socket) -> std::io::Result<bool> {
    const PRI: &[u8] = b"PRI ";
    let decide = async {
        let mut buf = [0u8; 4];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            if buf[..n] != PRI[..n] {
                return Ok(false);
            }
            if n == PRI.len() {
                return Ok(true);
            }
            // A partial preface: peek returns at once with the same bytes, so wait a little.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), decide)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))?
}
