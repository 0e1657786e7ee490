//! The member-to-member API on the peer URLs: Raft messages in, cluster identity for joining
//! members, and the leader's lease operations for members whose clients keep leases alive.

use crate::error::EtcdError;
use crate::etcdserver::EtcdServer;
use crate::pb::etcdserverpb::{
    HashKvRequest, HashKvResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::pb::oxcdpb::{peer_server::Peer, ClusterInfo, ClusterInfoRequest, PeerAck, PeerMessage};
use crate::raft_node::RaftInput;
use crate::transport::REMOVED_MEMBER;
use futures::StreamExt;
use protobuf::Message as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

pub struct PeerService(pub Arc<EtcdServer>);

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(
        &self,
        req: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut inbound = req.into_inner();
        let mut received: Option<(u64, prometheus::IntCounter)> = None;
        while let Some(m) = inbound.next().await {
            let m = m?;
            if m.cluster_id != self.0.cluster_id {
                tracing::warn!(
                    local = %format!("{:x}", self.0.cluster_id),
                    remote = %format!("{:x}", m.cluster_id),
                    "refusing raft messages from a member of another cluster"
                );
                return Err(Status::failed_precondition(format!(
                    "cluster ID mismatch: local {:x}, remote {:x} (the sender belongs to another cluster: check its --initial-cluster and --initial-cluster-token)",
                    self.0.cluster_id, m.cluster_id
                )));
            }
            let msg = raft::prelude::Message::parse_from_bytes(&m.message)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            if self.0.membership.read().is_removed(msg.from) {
                return Err(Status::failed_precondition(REMOVED_MEMBER));
            }
            // One sender per stream: look its counter up once.
            match &received {
                Some((from, c)) if *from == msg.from => c.inc_by(m.message.len() as u64),
                _ => {
                    let c = crate::metrics::METRICS
                        .peer_received_bytes
                        .with_label_values(&[&format!("{:x}", msg.from)]);
                    c.inc_by(m.message.len() as u64);
                    received = Some((msg.from, c));
                }
            }
            self.0.step(msg).map_err(Status::from)?;
        }
        Ok(Response::new(PeerAck {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<crate::pb::oxcdpb::SnapshotChunk>>,
    ) -> Result<Response<PeerAck>, Status> {
        let (msg, name, db) =
            crate::transport::receive_snapshot(self.0.cluster_id, &self.0.store, req.into_inner())
                .await?;
        tracing::info!(
            index = msg.get_snapshot().get_metadata().index,
            "received a snapshot from the leader"
        );
        self.0
            .raft_input(RaftInput::SnapshotReceived {
                msg: Box::new(msg),
                name,
                db,
            })
            .map_err(Status::from)?;
        Ok(Response::new(PeerAck {}))
    }

    async fn cluster(
        &self,
        _: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfo>, Status> {
        let ms = self.0.membership.read();
        Ok(Response::new(ClusterInfo {
            cluster_id: self.0.cluster_id,
            members: ms.members(),
            removed: ms.removed(),
        }))
    }

    async fn lease_renew(
        &self,
        req: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let r = req.into_inner();
        if !self.0.raft_status.is_leader.load(Ordering::Relaxed) {
            return Err(EtcdError::NotLeader.into());
        }
        let header = Some(self.0.header(self.0.store.current_rev()));
        let ttl = match self.0.lessor.renew(r.id) {
            Ok(ttl) => ttl,
            Err(EtcdError::LeaseNotFound) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(LeaseKeepAliveResponse {
            header,
            id: r.id,
            ttl,
        }))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        if !self.0.raft_status.is_leader.load(Ordering::Relaxed) {
            return Err(EtcdError::NotLeader.into());
        }
        Ok(Response::new(
            self.0.local_time_to_live(req.into_inner()).await?,
        ))
    }

    async fn probe(&self, _: Request<PeerAck>) -> Result<Response<PeerAck>, Status> {
        Ok(Response::new(PeerAck {}))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let resp = crate::corrupt::hash_kv(&self.0, req.into_inner().revision).await?;
        Ok(Response::new(resp))
    }
}

/// Serves the peer API on one listener until the process ends.
pub async fn serve(
    server: Arc<EtcdServer>,
    addr: crate::listener::ListenAddr,
) -> anyhow::Result<()> {
    let cfg = &server.cfg;
    let mode = Arc::new(crate::tls::mode_for(
        &addr,
        &cfg.listen_peer_plain,
        &cfg.listen_peer_tls,
        &cfg.peer_tls,
    )?);
    let listener = crate::listener::Listener::bind(&addr).await?;
    match *mode {
        crate::tls::Mode::Plain => tracing::info!(address = %addr, "serving peer traffic"),
        _ => tracing::info!(address = %addr, "serving peer traffic securely"),
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<crate::tls::Conn>>(64);
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (conns, mode) = (tx.clone(), mode.clone());
            tokio::spawn(async move {
                // A refused peer (a certificate that is not allowed) is logged by `establish`.
                if let Ok(conn) = mode.establish(tcp).await {
                    let _ = conns.send(Ok(conn)).await;
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            crate::pb::oxcdpb::peer_server::PeerServer::new(PeerService(server))
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

impl EtcdServer {
    pub fn step(&self, m: raft::prelude::Message) -> crate::error::Result<()> {
        self.raft_input(RaftInput::Step(Box::new(m)))
    }
}
