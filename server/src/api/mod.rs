//! Thin gRPC services of the etcd v3 API: validate, call the server, fill the header.
//! Errors become etcd's gRPC statuses in one place (`status.rs`).

mod authority;
mod cluster;
mod kv;
mod lease;
mod maintenance;
pub mod peer;
mod status;
mod watch;

use crate::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::server::EtcdServer;
use std::net::SocketAddr;
use std::sync::Arc;

/// The etcd version whose API and behaviour oxcd implements; clients gate features on it.
pub const ETCD_API_VERSION: &str = "3.4.23";

/// gRPC allows this much framing beyond --max-request-bytes, as etcd does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Serves the client API on one listener until the process ends.
pub async fn serve(server: Arc<EtcdServer>, addr: SocketAddr) -> anyhow::Result<()> {
    let max = server.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %addr, "serving client traffic");
    let incoming = async_stream_incoming(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
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
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Accepted client connections, each wrapped so that grpc-go's URL authorities are accepted.
fn async_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<authority::AuthorityFix<tokio::net::TcpStream>>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            authority::AuthorityFix::new(s)
        });
        Some((r, l))
    })
}
