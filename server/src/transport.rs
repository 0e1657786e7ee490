//! Peer transport: Raft messages between members over gRPC on the peer URLs.
//!
//! Each peer has its own sender task and bounded queue, so a slow or dead peer never holds
//! up the leader's traffic to the others: when a queue is full the message is dropped (Raft
//! retransmits) and the peer is reported unreachable. Messages carry the sender's cluster ID;
//! a member of another cluster is refused.

use crate::pb::oxcdpb::{peer_client::PeerClient, PeerMessage};
use crate::raft_node::RaftInput;
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use std::collections::HashMap;
use std::sync::mpsc::Sender as StdSender;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PEER_QUEUE: usize = 4096;
const RETRY: Duration = Duration::from_millis(100);

struct PeerHandle {
    urls: Vec<String>,
    tx: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Transport {
    cluster_id: u64,
    raft_tx: StdSender<RaftInput>,
    rt: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, PeerHandle>>,
}

impl Transport {
    pub fn new(cluster_id: u64, raft_tx: StdSender<RaftInput>, rt: tokio::runtime::Handle) -> Self {
        Transport {
            cluster_id,
            raft_tx,
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
        let task = self.rt.spawn(run_peer(
            id,
            urls.clone(),
            self.cluster_id,
            rx,
            self.raft_tx.clone(),
        ));
        peers.insert(id, PeerHandle { urls, tx, task });
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
                // Streaming a state snapshot to a follower is not built yet: refusing here
                // keeps the follower behind but never gives it an empty state.
                tracing::error!(to = %format!("{:x}", m.to), "peer needs a snapshot to catch up; snapshot transfer is not supported yet");
                let _ = self.raft_tx.send(RaftInput::SnapshotFailed(m.to));
                continue;
            }
            let to = m.to;
            match peers.get(&to) {
                Some(p) => {
                    if p.tx.try_send(m).is_err() {
                        let _ = self.raft_tx.send(RaftInput::Unreachable(to));
                    }
                }
                None => tracing::debug!(to = %format!("{to:x}"), "message to unknown peer dropped"),
            }
        }
    }
}

/// Sends one peer's messages over a client stream, reconnecting when it breaks.
async fn run_peer(
    id: u64,
    urls: Vec<String>,
    cluster_id: u64,
    mut rx: mpsc::Receiver<Message>,
    raft_tx: StdSender<RaftInput>,
) {
    let mut attempt = 0usize;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(e) => {
                tracing::error!(peer = %format!("{id:x}"), %url, error = %e, "bad peer URL");
                return;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(_) => {
                let _ = raft_tx.send(RaftInput::Unreachable(id));
                drain_for(&mut rx, RETRY).await;
                continue;
            }
        };
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let (tx2, rx2) = mpsc::channel::<PeerMessage>(256);
        let mut call = tokio::spawn(async move { client.raft(ReceiverStream::new(rx2)).await });
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { call.abort(); return };
                    let bytes = match m.write_to_bytes() {
                        Ok(b) => b,
                        Err(e) => { tracing::error!(error = %e, "cannot encode raft message"); continue }
                    };
                    if tx2.send(PeerMessage { cluster_id, message: bytes }).await.is_err() {
                        break;
                    }
                }
                r = &mut call => {
                    if let Ok(Err(status)) = r {
                        if status.code() == tonic::Code::FailedPrecondition {
                            tracing::error!(peer = %format!("{id:x}"), error = %status.message(), "peer refused our messages");
                        }
                    }
                    break;
                }
            }
        }
        let _ = raft_tx.send(RaftInput::Unreachable(id));
        drain_for(&mut rx, RETRY).await;
    }
}

/// While a peer is down, its queued messages are stale: drop them for a while.
async fn drain_for(rx: &mut mpsc::Receiver<Message>, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, rx.recv()).await {}
}
