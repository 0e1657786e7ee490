use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::{Applied, EtcdServer};
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, downgrade_request::DowngradeAction,
    maintenance_server::Maintenance, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest,
    DefragmentResponse, DowngradeInfo, DowngradeRequest, DowngradeResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use crate::pb::oxcdpb::DowngradeInfoSet;
use crate::version::{self, Version};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct MaintenanceService(pub Arc<EtcdServer>);

/// Only root may defragment, hash, back up or raise alarms when auth is on (etcd 3.5+ answers
/// with its usual codes: PermissionDenied, or InvalidArgument for no user).
async fn check_admin<T>(server: &EtcdServer, req: &Request<T>) -> Result<(), Status> {
    Ok(server.check_admin(&Caller::of(req)).await?)
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let caller = Caller::of(&req);
        if req.get_ref().action == AlarmAction::Get as i32 {
            self.0.require_auth_info(&caller).await?;
        } else {
            check_admin(&self.0, &req).await?;
        }
        let r = req.into_inner();
        if r.action == AlarmAction::Get as i32 {
            // etcd 3.6 answers GET from the applied alarms with a full header; NONE lists all,
            // another type only its own alarms.
            self.0.read_barrier().await?;
            let alarms = self
                .0
                .alarms
                .lock()
                .iter()
                .filter(|(_, a)| r.alarm == AlarmType::None as i32 || *a == r.alarm)
                .map(|(m, a)| crate::pb::etcdserverpb::AlarmMember {
                    member_id: *m,
                    alarm: *a,
                })
                .collect();
            let mut resp = AlarmResponse {
                header: None,
                alarms,
            };
            self.0.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        // member_id 0 is stored as 0, as etcd does (it is not this member).
        match self.0.propose_as(Raft::Alarm(r), &caller).await? {
            Applied::Alarm(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.0;
        // etcd 3.6 asks for a valid user when auth is on (any user, not only root).
        s.require_auth_info(&Caller::of(&req)).await?;
        let size = s.store.size_on_disk() as i64;
        let leader = s.raft_status.leader.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        if leader == 0 {
            errors.push(EtcdError::NoLeader.to_string());
        }
        errors.extend(s.alarms.lock().iter().map(|(m, a)| {
            let name = AlarmType::try_from(*a)
                .map(|t| t.as_str_name())
                .unwrap_or("UNKNOWN");
            format!("memberID:{m} alarm:{name} ")
        }));
        let downgrade = s.downgrade_info();
        let mut resp = StatusResponse {
            header: None,
            version: version::SERVER_VERSION.to_string(),
            db_size: size,
            leader,
            raft_index: s.raft_status.commit.load(Ordering::Relaxed),
            raft_term: s.raft_status.term.load(Ordering::Relaxed),
            raft_applied_index: s.applied_index(),
            errors,
            // sled keeps no free-page list: the whole file counts as in use.
            db_size_in_use: size,
            is_learner: s.member().is_learner,
            storage_version: downgrade.storage_version(),
            db_size_quota: s.cfg.quota_backend_bytes as i64,
            downgrade_info: Some(DowngradeInfo {
                enabled: downgrade.enabled,
                target_version: downgrade.target,
            }),
        };
        s.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// etcd 3.6's downgrade job: VALIDATE checks a target, ENABLE starts the job (the cluster
    /// and storage versions drop to the target at once), CANCEL ends it. oxcd members cannot
    /// be replaced by older oxcd binaries, so a job ends only by CANCEL.
    async fn downgrade(
        &self,
        req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        check_admin(&self.0, &req).await?;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let action = DowngradeAction::try_from(r.action).map_err(|_| EtcdError::UnknownMethod)?;
        let answer = |v: Version| {
            let mut resp = DowngradeResponse {
                header: None,
                version: v.short(),
            };
            self.0.fill(&mut resp.header);
            Ok(Response::new(resp))
        };
        match action {
            DowngradeAction::Validate | DowngradeAction::Enable => {
                let target = Version::parse_target(&r.version)
                    .ok_or(EtcdError::WrongDowngradeVersionFormat)?;
                self.0.read_barrier().await?;
                let info = self.0.downgrade_info();
                let cluster = info.cluster_version();
                if cluster.allowed_downgrade() != Some(target) {
                    return Err(EtcdError::InvalidDowngradeTargetVersion.into());
                }
                if info.enabled {
                    return Err(EtcdError::DowngradeInProcess.into());
                }
                if action == DowngradeAction::Enable {
                    let set = DowngradeInfoSet {
                        enabled: true,
                        ver: target.full(),
                    };
                    self.0
                        .propose_as(Raft::DowngradeInfoSet(set), &caller)
                        .await?;
                }
                // etcd answers the cluster version as it was before the job.
                answer(cluster)
            }
            DowngradeAction::Cancel => {
                // etcd never fails a cancel: without a job it only logs. It answers the
                // cluster version as it is before the version monitor raises it again.
                self.0.read_barrier().await?;
                let before = self.0.downgrade_info();
                if before.enabled {
                    let set = DowngradeInfoSet {
                        enabled: false,
                        ver: String::new(),
                    };
                    self.0
                        .propose_as(Raft::DowngradeInfoSet(set), &caller)
                        .await?;
                } else {
                    tracing::warn!("etcdserver: no inflight downgrade job");
                }
                answer(before.cluster_version())
            }
        }
    }

    /// Rewrites this member's backend without the space compaction freed (not replicated:
    /// each member is defragmented on its own, as on etcd).
    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
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
        // etcd answers a defragment with no header (the gateway prints `{}`).
        Ok(Response::new(DefragmentResponse { header: None }))
    }
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
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
        // Every message carries the stored storage version (etcd 3.6); a backend downgraded
        // to 3.5 has none.
        let info = server.downgrade_info();
        let storage_version = match info.enabled {
            false => info.storage_version(),
            true => String::new(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let r = send_backup(&path, total, storage_version, &tx).await;
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
        // etcd's bound: its request timeout.
        let within = std::time::Duration::from_secs(5) + 2 * self.0.cfg.election_timeout();
        self.0.move_leader(target, within).await?;
        let mut resp = MoveLeaderResponse { header: None };
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// Streams a backend file and then its sha256; stops quietly when the client goes away.
async fn send_backup(
    path: &std::path::Path,
    total: u64,
    version: String,
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
            version: version.clone(),
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
            version,
        }))
        .await;
    Ok(())
}
