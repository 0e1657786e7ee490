use super::ETCD_API_VERSION;
use crate::auth::Caller;
use crate::error::EtcdError;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmRequest, AlarmResponse,
    AlarmType, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest,
    HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse,
    StatusRequest, StatusResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use crate::raft_node::RaftInput;
use crate::server::{Applied, EtcdServer};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct MaintenanceService(pub Arc<EtcdServer>);

/// Only root may defragment, hash or back up when auth is on. etcd 3.4 returns these refusals
/// as the auth store's raw errors: codes.Unknown with texts like "auth: permission denied".
async fn check_admin<T>(server: &EtcdServer, req: &Request<T>) -> Result<(), Status> {
    server
        .check_admin(&Caller::of(req))
        .await
        .map_err(|e| match e.auth_store_text() {
            Some(text) => Status::unknown(text),
            None => e.into(),
        })
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        self.0.check_not_learner()?;
        let caller = Caller::of(&req);
        let mut r = req.into_inner();
        if r.action == AlarmAction::Get as i32 {
            let alarms = self
                .0
                .alarms
                .lock()
                .iter()
                .map(|(m, a)| crate::pb::etcdserverpb::AlarmMember {
                    member_id: *m,
                    alarm: *a,
                })
                .collect();
            // etcd 3.4 answers alarm calls without a header.
            return Ok(Response::new(AlarmResponse {
                header: None,
                alarms,
            }));
        }
        if r.member_id == 0 {
            r.member_id = self.0.id;
        }
        match self.0.propose_as(Raft::Alarm(r), &caller).await? {
            Applied::Alarm(mut resp) => {
                resp.header = None;
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.0;
        let size = s.store.size_on_disk() as i64;
        let errors = s
            .alarms
            .lock()
            .iter()
            .map(|(m, a)| {
                let name = AlarmType::try_from(*a)
                    .map(|t| t.as_str_name())
                    .unwrap_or("UNKNOWN");
                format!("memberID:{m} alarm:{name} ")
            })
            .collect();
        let mut resp = StatusResponse {
            header: None,
            version: ETCD_API_VERSION.to_string(),
            db_size: size,
            leader: s.raft_status.leader.load(Ordering::Relaxed),
            raft_index: s.raft_status.commit.load(Ordering::Relaxed),
            raft_term: s.raft_status.term.load(Ordering::Relaxed),
            raft_applied_index: s.applied_index(),
            errors,
            db_size_in_use: size,
            is_learner: s.member().is_learner,
        };
        s.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// Rewrites this member's backend without the space compaction freed (not replicated:
    /// each member is defragmented on its own, as on etcd).
    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.0.check_not_learner()?;
        check_admin(&self.0, &req).await?;
        let store = self.0.store.clone();
        let before = store.size_on_disk();
        tracing::info!(size = before, "defragmenting");
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragment: {e}")))?
            .map_err(EtcdError::from)?;
        let after = self.0.store.size_on_disk();
        tracing::info!(
            size = after,
            freed = before.saturating_sub(after),
            took = ?started.elapsed(),
            "defragmented"
        );
        let mut resp = DefragmentResponse { header: None };
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.0.check_not_learner()?;
        check_admin(&self.0, &req).await?;
        let store = self.0.store.clone();
        let (hash, rev) = tokio::task::spawn_blocking(move || store.hash())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: hash: {e}")))?
            .map_err(EtcdError::from)?;
        let mut resp = HashResponse {
            header: Some(crate::pb::etcdserverpb::ResponseHeader {
                revision: rev,
                ..Default::default()
            }),
            hash,
        };
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.0.check_not_learner()?;
        check_admin(&self.0, &req).await?;
        let resp = crate::corrupt::hash_kv(&self.0, req.into_inner().revision).await?;
        Ok(Response::new(resp))
    }

    type SnapshotStream = ReceiverStream<Result<SnapshotResponse, Status>>;

    /// etcd's backup stream: the backend file (in etcd's bbolt format) in 32 KiB chunks,
    /// then one message with the sha256 of everything sent.
    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        check_admin(&self.0, &req).await?;
        let server = self.0.clone();
        let path = server.backup_scratch_path();
        let written = {
            let (store, path) = (server.store.clone(), path.clone());
            tokio::task::spawn_blocking(move || crate::snapshot::write_backend(&store, &path)).await
        };
        let total = match written {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&path);
                return Err(Status::internal(format!("etcdserver: snapshot: {e}")));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(Status::internal(format!("etcdserver: snapshot: {e}")));
            }
        };
        tracing::info!(size = total, "sending database snapshot to client");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let r = send_backup(&path, total, &tx).await;
            let _ = tokio::fs::remove_file(&path).await;
            if let Err(e) = r {
                let _ = tx
                    .send(Err(Status::internal(format!("etcdserver: snapshot: {e}"))))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.0.check_not_learner()?;
        let target = req.into_inner().target_id;
        let st = self.0.node_status().await?;
        if !st.is_leader {
            return Err(EtcdError::NotLeader.into());
        }
        if target == st.id {
            let mut resp = MoveLeaderResponse { header: None };
            self.0.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        if !st.voters.contains(&target) {
            return Err(EtcdError::BadLeaderTransferee.into());
        }
        self.0.raft_input(RaftInput::TransferLeader(target))?;
        // Wait for the transfer like etcd: until the target leads, within the request timeout.
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(5)
            + 2 * self.0.cfg.election_timeout();
        while self.0.raft_status.leader.load(Ordering::Relaxed) != target {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut resp = MoveLeaderResponse { header: None };
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// Streams a backend file and then its sha256; stops quietly when the client goes away.
async fn send_backup(
    path: &std::path::Path,
    total: u64,
    tx: &tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> std::io::Result<()> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    const CHUNK: usize = 32 * 1024;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = sha2::Sha256::new();
    let mut sent = 0u64;
    while sent < total {
        let n = (CHUNK as u64).min(total - sent) as usize;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf).await?;
        h.update(&buf);
        sent += n as u64;
        let msg = SnapshotResponse {
            header: None,
            remaining_bytes: total - sent,
            blob: buf,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(());
        }
    }
    let _ = tx
        .send(Ok(SnapshotResponse {
            header: None,
            remaining_bytes: 0,
            blob: h.finalize().to_vec(),
        }))
        .await;
    Ok(())
}
