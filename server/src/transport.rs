//! Peer transport: Raft messages between members over gRPC on the peer URLs.
//!
//! Each peer has its own sender task and bounded queue, so a slow or dead peer never holds
//! up the leader's traffic to the others: when a queue is full the message is dropped (Raft
//! retransmits) and the peer is reported unreachable. Messages carry the sender's cluster ID;
//! a member of another cluster is refused.

use crate::pb::oxcdpb::{peer_client::PeerClient, PeerMessage, SnapshotChunk};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType, SnapshotMetadata};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PEER_QUEUE: usize = 4096;
const RETRY: Duration = Duration::from_millis(100);
/// etcd probes its peers every 4 s (its connection read timeout less a second).
const PROBE_INTERVAL: Duration = Duration::from_secs(4);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backend records per snapshot chunk, bounded by size too.
const CHUNK_BYTES: usize = 1024 * 1024;
/// After a failed snapshot, wait this long before copying the state for that peer again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(2);

/// Where a leader gets the state it sends to a follower that fell behind its log.
pub trait SnapshotSource: Send + Sync + 'static {
    /// A consistent copy of the whole state, and the Raft point (index, term, configuration)
    /// it is at.
    fn snapshot(&self) -> Result<(SnapshotMetadata, crate::mvcc::Records), String>;
}

/// Since when the stream to a peer has been up (None while it is down): etcd's
/// `ActiveSince`, which `--strict-reconfig-check` reads.
type ActiveSince = Arc<Mutex<Option<std::time::Instant>>>;

struct PeerHandle {
    urls: Vec<String>,
    tx: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
    active: ActiveSince,
}

/// What the transport tells the Raft node about its peers (etcd's `rafthttp.Raft`): the node
/// implements it, so the transport needs nothing of the node above it.
pub trait RaftReports: Send + Sync + 'static {
    /// The peer could not be reached: Raft stops optimistic replication to it.
    fn report_unreachable(&self, id: u64);
    /// A snapshot sent to the peer finished (or failed).
    fn report_snapshot(&self, id: u64, ok: bool);
}

/// What a member removed from the cluster is told when it still sends Raft messages (the
/// receiving side, `api::peer`, answers it; the sender, seeing it, stops itself).
pub const REMOVED_MEMBER: &str = "the sending member was removed from the cluster";

pub struct Transport {
    cluster_id: u64,
    /// This member's ID (the `Local` label of the peer metrics).
    local_id: u64,
    snapshots: Arc<dyn SnapshotSource>,
    /// Peers a snapshot is being sent to (one at a time each).
    sending: Arc<Mutex<HashSet<u64>>>,
    /// Peers whose last snapshot failed, and when to try again.
    backoff: Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    raft: Arc<dyn RaftReports>,
    rt: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, PeerHandle>>,
    /// How peers are dialed (`--peer-*` TLS flags).
    tls: Arc<crate::tls::TlsInfo>,
}

impl Transport {
    pub fn new(
        cluster_id: u64,
        local_id: u64,
        raft: Arc<dyn RaftReports>,
        rt: tokio::runtime::Handle,
        snapshots: Arc<dyn SnapshotSource>,
        tls: Arc<crate::tls::TlsInfo>,
    ) -> Self {
        Transport {
            tls,
            local_id,
            cluster_id,
            snapshots,
            sending: Arc::default(),
            backoff: Arc::default(),
            raft,
            rt,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a peer, or points an existing one at new URLs.
    pub fn set_peer(&self, id: u64, urls: Vec<String>) {
        let mut peers = self.peers.lock();
        if peers.get(&id).is_some_and(|p| p.urls == urls) {
            return;
        }
        if let Some(old) = peers.remove(&id) {
            old.task.abort();
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let active = ActiveSince::default();
        let link = PeerLink {
            id,
            local_id: self.local_id,
            urls: urls.clone(),
            cluster_id: self.cluster_id,
            tls: self.tls.clone(),
        };
        let task = self
            .rt
            .spawn(run_peer(link, rx, self.raft.clone(), active.clone()));
        peers.insert(
            id,
            PeerHandle {
                urls,
                tx,
                task,
                active,
            },
        );
    }

    /// Since when this member's stream to peer `id` has been up; None while it is down.
    pub fn active_since(&self, id: u64) -> Option<std::time::Instant> {
        self.peers.lock().get(&id).and_then(|p| *p.active.lock())
    }

    pub fn remove_peer(&self, id: u64) {
        if let Some(p) = self.peers.lock().remove(&id) {
            p.task.abort();
        }
    }

    pub fn peer_urls(&self, id: u64) -> Option<Vec<String>> {
        self.peers.lock().get(&id).map(|p| p.urls.clone())
    }

    /// Queues messages; never blocks the Raft thread.
    pub fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock();
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let to = m.to;
                match peers.get(&to) {
                    Some(_)
                        if self
                            .backoff
                            .lock()
                            .get(&to)
                            .is_some_and(|t| *t > std::time::Instant::now()) =>
                    {
                        // Failed recently: let Raft keep probing, but do not copy the state again yet.
                        self.raft.report_snapshot(to, false);
                    }
                    Some(p) if self.sending.lock().insert(to) => {
                        let (urls, cid, src, tx, sending, backoff, tls) = (
                            p.urls.clone(),
                            self.cluster_id,
                            self.snapshots.clone(),
                            self.raft.clone(),
                            self.sending.clone(),
                            self.backoff.clone(),
                            self.tls.clone(),
                        );
                        self.rt.spawn(async move {
                            let label = format!("{to:x}");
                            let metrics = &crate::metrics::METRICS;
                            let inflight = metrics.snapshot_send_inflights.with_label_values(&[&label]);
                            inflight.inc();
                            let start = std::time::Instant::now();
                            let ok = match send_snapshot(&urls, cid, m, src, &tls).await {
                                Ok(index) => {
                                    tracing::info!(to = %label, index, "snapshot sent");
                                    metrics.snapshot_send_success.with_label_values(&[&label]).inc();
                                    metrics
                                        .snapshot_send_seconds
                                        .with_label_values(&[&label])
                                        .observe(start.elapsed().as_secs_f64());
                                    true
                                }
                                Err(e) => {
                                    tracing::warn!(to = %label, error = %e, "sending a snapshot failed; raft will retry");
                                    metrics.snapshot_send_failures.with_label_values(&[&label]).inc();
                                    false
                                }
                            };
                            inflight.dec();
                            sending.lock().remove(&to);
                            if !ok {
                                backoff.lock().insert(to, std::time::Instant::now() + SNAPSHOT_RETRY);
                            }
                            tx.report_snapshot(to, ok);
                        });
                    }
                    _ => {}
                }
                continue;
            }
            let to = m.to;
            match peers.get(&to) {
                Some(p) => {
                    if p.tx.try_send(m).is_err() {
                        crate::metrics::METRICS
                            .peer_sent_failures
                            .with_label_values(&[&format!("{to:x}")])
                            .inc();
                        self.raft.report_unreachable(to);
                    }
                }
                None => tracing::debug!(to = %format!("{to:x}"), "message to unknown peer dropped"),
            }
        }
    }
}

/// Who a peer task talks to, and how.
struct PeerLink {
    id: u64,
    local_id: u64,
    urls: Vec<String>,
    cluster_id: u64,
    tls: Arc<crate::tls::TlsInfo>,
}

/// Sends one peer's messages over a client stream, reconnecting when it breaks.
async fn run_peer(
    link: PeerLink,
    mut rx: mpsc::Receiver<Message>,
    raft: Arc<dyn RaftReports>,
    active: ActiveSince,
) {
    let PeerLink {
        id,
        local_id,
        urls,
        cluster_id,
        tls,
    } = link;
    let to = format!("{id:x}");
    let sent = crate::metrics::METRICS
        .peer_sent_bytes
        .with_label_values(&[&to]);
    let failed = crate::metrics::METRICS
        .peer_sent_failures
        .with_label_values(&[&to]);
    let rtt = crate::metrics::METRICS.peer_rtt.with_label_values(&[&to]);
    let mut attempt = 0usize;
    loop {
        *active.lock() = None;
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        // Keep-alive pings (set by `peer_channel`) notice a peer that vanished without
        // closing the connection (a partition), so it stops counting as active.
        let channel = match crate::tls::peer_channel(url, &tls, Duration::from_secs(1)).await {
            Ok(c) => c,
            Err(e) => {
                if let Some(alert) = crate::tls::remote_alert(&e) {
                    tracing::warn!(peer = %format!("{id:x}"), error = alert, "peer refused the connection");
                }
                tracing::debug!(peer = %format!("{id:x}"), error = %e, "peer unreachable");
                raft.report_unreachable(id);
                drain_for(&mut rx, RETRY, &failed).await;
                continue;
            }
        };
        active.lock().get_or_insert_with(std::time::Instant::now);
        let connection = crate::metrics::PeerConnection::up(local_id, id);
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        // etcd's prober: time an empty round trip on the same connection now and then.
        let prober = {
            let (mut client, rtt) = (client.clone(), rtt.clone());
            tokio::spawn(async move {
                loop {
                    let start = std::time::Instant::now();
                    let probe = client.probe(crate::pb::oxcdpb::PeerAck {});
                    if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                        rtt.observe(start.elapsed().as_secs_f64());
                    }
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
            })
        };
        let (tx2, rx2) = mpsc::channel::<PeerMessage>(256);
        let mut call = tokio::spawn(async move { client.raft(ReceiverStream::new(rx2)).await });
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { call.abort(); prober.abort(); return };
                    let bytes = match m.write_to_bytes() {
                        Ok(b) => b,
                        Err(e) => { tracing::error!(error = %e, "cannot encode raft message"); continue }
                    };
                    let n = bytes.len() as u64;
                    if tx2.send(PeerMessage { cluster_id, message: bytes }).await.is_err() {
                        failed.inc();
                        break;
                    }
                    sent.inc_by(n);
                }
                r = &mut call => {
                    if let Ok(Err(status)) = &r {
                        if let Some(alert) = crate::tls::remote_alert(&format!("{status:?}")) {
                            tracing::warn!(peer = %format!("{id:x}"), error = alert, "peer refused the connection");
                        }
                    }
                    if let Ok(Err(status)) = r {
                        if status.code() == tonic::Code::FailedPrecondition {
                            tracing::error!(peer = %format!("{id:x}"), error = %status.message(), "peer refused our messages");
                            if status.message() == REMOVED_MEMBER {
                                // etcd does the same when its peers answer "removed": this
                                // member missed its own removal (it was down or cut off).
                                tracing::warn!("this member has been permanently removed from the cluster; shutting down");
                                std::process::exit(0);
                            }
                        }
                    }
                    break;
                }
            }
        }
        prober.abort();
        drop(connection);
        raft.report_unreachable(id);
        drain_for(&mut rx, RETRY, &failed).await;
    }
}

/// While a peer is down, its queued messages are stale: drop them (counted as failed sends)
/// for a while.
async fn drain_for(rx: &mut mpsc::Receiver<Message>, d: Duration, failed: &prometheus::IntCounter) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        failed.inc();
    }
}

fn chunk_crc(keys: &[Vec<u8>], values: &[Vec<u8>]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (k, v) in keys.iter().zip(values) {
        h.update(&(k.len() as u32).to_le_bytes());
        h.update(k);
        h.update(&(v.len() as u32).to_le_bytes());
        h.update(v);
    }
    h.finalize()
}

/// Streams a consistent copy of the state to a peer: the snapshot message first, then the
/// records in checksummed chunks, then a sha256 over all of them. A failure anywhere is
/// reported to Raft, which sends a new snapshot later (restartable).
async fn send_snapshot(
    urls: &[String],
    cluster_id: u64,
    mut msg: Message,
    src: Arc<dyn SnapshotSource>,
    tls: &crate::tls::TlsInfo,
) -> Result<u64, String> {
    // Reach the peer first: copying the state holds up writers, so only copy for a live peer.
    let mut client = None;
    let mut last_err = String::from("no peer URL");
    for url in urls {
        match crate::tls::peer_channel(url, tls, Duration::from_secs(2)).await {
            Ok(ch) => {
                client = Some(
                    PeerClient::new(ch)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                );
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let Some(mut client) = client else {
        return Err(last_err);
    };
    let (meta, records) = tokio::task::spawn_blocking(move || src.snapshot())
        .await
        .map_err(|e| e.to_string())??;
    let index = meta.index;
    msg.mut_snapshot().set_metadata(meta);
    msg.mut_snapshot().data = Default::default();
    let first = SnapshotChunk {
        cluster_id,
        message: msg.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    };
    let mut chunks = vec![first];
    let mut sha = Sha256::new();
    let (mut keys, mut values, mut size) = (Vec::new(), Vec::new(), 0usize);
    let total = records.len();
    for (i, (k, v)) in records.into_iter().enumerate() {
        sha.update((k.len() as u32).to_le_bytes());
        sha.update(&k);
        sha.update((v.len() as u32).to_le_bytes());
        sha.update(&v);
        size += k.len() + v.len();
        keys.push(k);
        values.push(v);
        if size >= CHUNK_BYTES || i + 1 == total {
            let crc32 = chunk_crc(&keys, &values);
            chunks.push(SnapshotChunk {
                keys: std::mem::take(&mut keys),
                values: std::mem::take(&mut values),
                crc32,
                ..Default::default()
            });
            size = 0;
        }
    }
    chunks.push(SnapshotChunk {
        last: true,
        sha256: sha.finalize().to_vec(),
        crc32: chunk_crc(&[], &[]),
        ..Default::default()
    });
    client
        .snapshot(futures::stream::iter(chunks))
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(index)
}

/// Receives a snapshot stream into a staged backend, verifying every checksum. Returns the
/// Raft message and the staged backend, ready for the Raft node to install. Counted in
/// rafthttp's snapshot receive metrics (a sender not known yet is etcd's
/// `UNKNOWN_SNAPSHOT_SENDER`).
pub async fn receive_snapshot(
    cluster_id: u64,
    store: &crate::mvcc::Store,
    mut inbound: impl futures::Stream<Item = Result<SnapshotChunk, tonic::Status>> + Unpin,
) -> Result<(Message, String, sled::Db), tonic::Status> {
    use futures::StreamExt;
    let metrics = &crate::metrics::METRICS;
    let unknown = |e: tonic::Status| {
        metrics
            .snapshot_receive_failures
            .with_label_values(&["UNKNOWN_SNAPSHOT_SENDER"])
            .inc();
        e
    };
    let first = inbound
        .next()
        .await
        .ok_or_else(|| tonic::Status::invalid_argument("empty snapshot stream"))
        .map_err(unknown)?
        .map_err(unknown)?;
    if first.cluster_id != cluster_id {
        return Err(unknown(tonic::Status::failed_precondition(format!(
            "cluster ID mismatch: local {cluster_id:x}, remote {:x}",
            first.cluster_id
        ))));
    }
    let msg = Message::parse_from_bytes(&first.message)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad snapshot message: {e}")))
        .map_err(unknown)?;
    let from = format!("{:x}", msg.from);
    let inflight = metrics
        .snapshot_receive_inflights
        .with_label_values(&[&from]);
    inflight.inc();
    let start = std::time::Instant::now();
    let received = receive_snapshot_body(store, msg, inbound).await;
    inflight.dec();
    match &received {
        Ok(_) => {
            metrics
                .snapshot_receive_success
                .with_label_values(&[&from])
                .inc();
            metrics
                .snapshot_receive_seconds
                .with_label_values(&[&from])
                .observe(start.elapsed().as_secs_f64());
        }
        Err(_) => metrics
            .snapshot_receive_failures
            .with_label_values(&[&from])
            .inc(),
    }
    received
}

async fn receive_snapshot_body(
    store: &crate::mvcc::Store,
    msg: Message,
    mut inbound: impl futures::Stream<Item = Result<SnapshotChunk, tonic::Status>> + Unpin,
) -> Result<(Message, String, sled::Db), tonic::Status> {
    use futures::StreamExt;
    let index = msg.get_snapshot().get_metadata().index;
    let (name, db) = store
        .stage(index)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut sha = Sha256::new();
    loop {
        let c = inbound
            .next()
            .await
            .ok_or_else(|| tonic::Status::data_loss("snapshot stream ended early"))??;
        if c.keys.len() != c.values.len() || chunk_crc(&c.keys, &c.values) != c.crc32 {
            return Err(tonic::Status::data_loss("snapshot chunk checksum mismatch"));
        }
        let mut batch = sled::Batch::default();
        for (k, v) in c.keys.iter().zip(&c.values) {
            sha.update((k.len() as u32).to_le_bytes());
            sha.update(k);
            sha.update((v.len() as u32).to_le_bytes());
            sha.update(v);
            batch.insert(k.as_slice(), v.as_slice());
        }
        db.apply_batch(batch)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        if c.last {
            if sha.finalize().as_slice() != c.sha256.as_slice() {
                return Err(tonic::Status::data_loss("snapshot sha256 mismatch"));
            }
            break;
        }
    }
    db.flush_async()
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok((msg, name, db))
}

/// A client of the peer API of the member at `urls` (the first that answers).
pub async fn connect_peer(
    urls: &[String],
    tls: &crate::tls::TlsInfo,
) -> Option<PeerClient<tonic::transport::Channel>> {
    for url in urls {
        if let Ok(ch) = crate::tls::peer_channel(url, tls, Duration::from_secs(1)).await {
            return Some(PeerClient::new(ch));
        }
    }
    None
}
