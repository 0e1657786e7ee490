//! etcd's Prometheus metrics, with etcd 3.4's names, types, labels and buckets, so etcd's
//! Grafana dashboard and alerting rules work unchanged. Served at `/metrics` on the client
//! URLs and on `--listen-metrics-urls`.
//!
//! Counters live in one process-wide registry (etcd's are package globals too); gauges that
//! mirror server state (leader, indexes, db size, keys) are set by the `/metrics` handler at
//! scrape time, and the gRPC method series by the API layer when it starts serving.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    registry: Registry,
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub is_learner: IntGauge,
    pub proposals_committed: IntGauge,
    pub proposals_applied: IntGauge,
    pub proposals_pending: IntGauge,
    pub proposals_failed: IntCounter,
    pub server_version: IntGaugeVec,
    pub cluster_version: IntGaugeVec,
    pub server_id: IntGaugeVec,
    pub quota_backend_bytes: IntGauge,
    pub health_success: IntCounter,
    pub health_failures: IntCounter,
    pub slow_apply: IntCounter,
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub db_total_size: IntGauge,
    pub db_total_size_in_use: IntGauge,
    pub debugging_db_total_size: IntGauge,
    pub put_total: IntCounter,
    pub range_total: IntCounter,
    pub delete_total: IntCounter,
    pub txn_total: IntCounter,
    pub keys_total: IntGauge,
    pub current_revision: IntGauge,
    pub compact_revision: IntGauge,
    pub auth_revision: IntGauge,
    pub peer_rtt: HistogramVec,
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub peer_sent_failures: IntCounterVec,
    pub active_peers: IntGaugeVec,
    pub disconnected_peers: IntCounterVec,
    pub lease_granted: IntCounter,
    pub lease_revoked: IntCounter,
    pub lease_renewed: IntCounter,
    pub lease_ttl: Histogram,
    pub watch_streams: IntGauge,
    pub watchers: IntGauge,
    pub watch_events: IntCounter,
    pub slow_watchers: IntGauge,
    pub pending_events: IntGauge,
    pub snapshot_send_success: IntCounterVec,
    pub snapshot_send_failures: IntCounterVec,
    pub snapshot_send_inflights: IntGaugeVec,
    pub snapshot_send_seconds: HistogramVec,
    pub snapshot_receive_success: IntCounterVec,
    pub snapshot_receive_failures: IntCounterVec,
    pub snapshot_receive_inflights: IntGaugeVec,
    pub snapshot_receive_seconds: HistogramVec,
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    pub grpc_msg_received: IntCounterVec,
    pub grpc_msg_sent: IntCounterVec,
    pub grpc_received_bytes: IntCounter,
    pub grpc_sent_bytes: IntCounter,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed and distinct, so registration cannot collide.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::warn!(error = %e, "metric registration failed");
    }
    c
}

fn gauge(r: &Registry, ns: &str, sub: &str, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace(ns).subsystem(sub));
    reg(r, g.expect("valid metric name"))
}

fn counter(r: &Registry, ns: &str, sub: &str, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(ns).subsystem(sub));
    reg(r, c.expect("valid metric name"))
}

fn gauge_vec(
    r: &Registry,
    ns: &str,
    sub: &str,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(ns).subsystem(sub), labels);
    reg(r, g.expect("valid metric name"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"),
    )
}

/// etcd's disk latency buckets: 1 ms doubling 14 times (to about 8 s).
fn disk_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 14).unwrap_or_default()
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        if let Err(e) = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
        let wal_fsync = Histogram::with_opts(
            HistogramOpts::new(
                "wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
            )
            .namespace("etcd")
            .subsystem("disk")
            .buckets(disk_buckets()),
        );
        let backend_commit = Histogram::with_opts(
            HistogramOpts::new(
                "backend_commit_duration_seconds",
                "The latency distributions of commit called by backend.",
            )
            .namespace("etcd")
            .subsystem("disk")
            .buckets(disk_buckets()),
        );
        let peer_rtt = HistogramVec::new(
            HistogramOpts::new(
                "peer_round_trip_time_seconds",
                "Round-Trip-Time histogram between peers",
            )
            .namespace("etcd")
            .subsystem("network")
            .buckets(exponential_buckets(0.0001, 2.0, 14).unwrap_or_default()),
            &["To"],
        );
        let lease_ttl = Histogram::with_opts(
            HistogramOpts::new("ttl_total", "Bucketed histogram of lease TTLs.")
                .namespace("etcd_debugging")
                .subsystem("lease")
                .buckets(exponential_buckets(1.0, 2.0, 24).unwrap_or_default()),
        );
        let rpc = ["grpc_type", "grpc_service", "grpc_method"];
        let net = |name: &str, help: &str, label: &str| {
            counter_vec(&r, &format!("etcd_network_{name}"), help, &[label])
        };
        let local_remote = ["Local", "Remote"];
        // rafthttp's v3 snapshot transfer latency: 100 ms doubling 10 times.
        let snapshot_seconds = |name: &str, help: &str, label: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help)
                    .namespace("etcd")
                    .subsystem("network")
                    .buckets(exponential_buckets(0.1, 2.0, 10).unwrap_or_default()),
                &[label],
            )
            .map(|h| reg(&r, h))
        };
        let snapshot_send_seconds = snapshot_seconds(
            "snapshot_send_total_duration_seconds",
            "Total latency distributions of v3 snapshot sends",
            "To",
        );
        let snapshot_receive_seconds = snapshot_seconds(
            "snapshot_receive_total_duration_seconds",
            "Total latency distributions of v3 snapshot receives",
            "From",
        );
        let m = Metrics {
            has_leader: gauge(&r, "etcd", "server", "has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."),
            is_leader: gauge(&r, "etcd", "server", "is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."),
            leader_changes: counter(&r, "etcd", "server", "leader_changes_seen_total", "The number of leader changes seen."),
            is_learner: gauge(&r, "etcd", "server", "is_learner", "Whether or not this member is a learner. 1 if is, 0 otherwise."),
            proposals_committed: gauge(&r, "etcd", "server", "proposals_committed_total", "The total number of consensus proposals committed."),
            proposals_applied: gauge(&r, "etcd", "server", "proposals_applied_total", "The total number of consensus proposals applied."),
            proposals_pending: gauge(&r, "etcd", "server", "proposals_pending", "The current number of pending proposals to commit."),
            proposals_failed: counter(&r, "etcd", "server", "proposals_failed_total", "The total number of failed proposals seen."),
            server_version: gauge_vec(&r, "etcd", "server", "version", "Which version is running. 1 for 'server_version' label with current version.", &["server_version"]),
            cluster_version: gauge_vec(&r, "etcd", "cluster", "version", "Which version is running. 1 for 'cluster_version' label with current cluster version", &["cluster_version"]),
            server_id: gauge_vec(&r, "etcd", "server", "id", "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.", &["server_id"]),
            quota_backend_bytes: gauge(&r, "etcd", "server", "quota_backend_bytes", "Current backend storage quota size in bytes."),
            health_success: counter(&r, "etcd", "server", "health_success", "The total number of successful health checks"),
            health_failures: counter(&r, "etcd", "server", "health_failures", "The total number of failed health checks"),
            slow_apply: counter(&r, "etcd", "server", "slow_apply_total", "The total number of slow apply requests (likely overloaded from slow disk)."),
            wal_fsync: reg(&r, wal_fsync.expect("valid metric name")),
            backend_commit: reg(&r, backend_commit.expect("valid metric name")),
            db_total_size: gauge(&r, "etcd", "mvcc", "db_total_size_in_bytes", "Total size of the underlying database physically allocated in bytes."),
            db_total_size_in_use: gauge(&r, "etcd", "mvcc", "db_total_size_in_use_in_bytes", "Total size of the underlying database logically in use in bytes."),
            debugging_db_total_size: gauge(&r, "etcd_debugging", "mvcc", "db_total_size_in_bytes", "Total size of the underlying database physically allocated in bytes."),
            put_total: counter(&r, "etcd", "mvcc", "put_total", "Total number of puts seen by this member."),
            range_total: counter(&r, "etcd", "mvcc", "range_total", "Total number of ranges seen by this member."),
            delete_total: counter(&r, "etcd", "mvcc", "delete_total", "Total number of deletes seen by this member."),
            txn_total: counter(&r, "etcd", "mvcc", "txn_total", "Total number of txns seen by this member."),
            keys_total: gauge(&r, "etcd_debugging", "mvcc", "keys_total", "Total number of keys."),
            current_revision: gauge(&r, "etcd_debugging", "mvcc", "current_revision", "The current revision of store."),
            compact_revision: gauge(&r, "etcd_debugging", "mvcc", "compact_revision", "The revision of the last compaction in store."),
            auth_revision: gauge(&r, "etcd_debugging", "auth", "revision", "The current revision of auth store."),
            peer_rtt: reg(&r, peer_rtt.expect("valid metric name")),
            peer_sent_bytes: net("peer_sent_bytes_total", "The total number of bytes sent to peers.", "To"),
            peer_received_bytes: net("peer_received_bytes_total", "The total number of bytes received from peers.", "From"),
            peer_sent_failures: net("peer_sent_failures_total", "The total number of send failures from peers.", "To"),
            active_peers: gauge_vec(&r, "etcd", "network", "active_peers", "The current number of active peer connections.", &local_remote),
            disconnected_peers: reg(&r, IntCounterVec::new(Opts::new("disconnected_peers_total", "The total number of disconnected peers.").namespace("etcd").subsystem("network"), &local_remote).expect("valid metric name")),
            lease_granted: counter(&r, "etcd_debugging", "lease", "granted_total", "The total number of granted leases."),
            lease_revoked: counter(&r, "etcd_debugging", "lease", "revoked_total", "The total number of revoked leases."),
            lease_renewed: counter(&r, "etcd_debugging", "lease", "renewed_total", "The number of renewed leases seen by the leader."),
            lease_ttl: reg(&r, lease_ttl.expect("valid metric name")),
            watch_streams: gauge(&r, "etcd_debugging", "mvcc", "watch_stream_total", "Total number of watch streams."),
            watchers: gauge(&r, "etcd_debugging", "mvcc", "watcher_total", "Total number of watchers."),
            watch_events: counter(&r, "etcd_debugging", "mvcc", "events_total", "Total number of events sent by this member."),
            slow_watchers: gauge(&r, "etcd_debugging", "mvcc", "slow_watcher_total", "Total number of unsynced slow watchers."),
            pending_events: gauge(&r, "etcd_debugging", "mvcc", "pending_events_total", "Total number of pending events to be sent."),
            snapshot_send_success: net("snapshot_send_success", "Total number of successful snapshot sends", "To"),
            snapshot_send_failures: net("snapshot_send_failures", "Total number of snapshot send failures", "To"),
            snapshot_send_inflights: gauge_vec(&r, "etcd", "network", "snapshot_send_inflights_total", "Total number of inflight snapshot sends", &["To"]),
            snapshot_send_seconds: snapshot_send_seconds.expect("valid metric name"),
            snapshot_receive_success: net("snapshot_receive_success", "Total number of successful snapshot receives", "From"),
            snapshot_receive_failures: net("snapshot_receive_failures", "Total number of snapshot receive failures", "From"),
            snapshot_receive_inflights: gauge_vec(&r, "etcd", "network", "snapshot_receive_inflights_total", "Total number of inflight snapshot receives", &["From"]),
            snapshot_receive_seconds: snapshot_receive_seconds.expect("valid metric name"),
            grpc_started: counter_vec(&r, "grpc_server_started_total", "Total number of RPCs started on the server.", &rpc),
            grpc_handled: counter_vec(&r, "grpc_server_handled_total", "Total number of RPCs completed on the server, regardless of success or failure.", &["grpc_type", "grpc_service", "grpc_method", "grpc_code"]),
            grpc_msg_received: counter_vec(&r, "grpc_server_msg_received_total", "Total number of RPC stream messages received on the server.", &rpc),
            grpc_msg_sent: counter_vec(&r, "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", &rpc),
            grpc_received_bytes: counter(&r, "etcd", "network", "client_grpc_received_bytes_total", "The total number of bytes received from grpc clients."),
            grpc_sent_bytes: counter(&r, "etcd", "network", "client_grpc_sent_bytes_total", "The total number of bytes sent to grpc clients."),
            registry: r,
        };
        m.server_version
            .with_label_values(&[crate::version::SERVER_VERSION])
            .set(1);
        m.cluster_version
            .with_label_values(&[crate::version::CLUSTER_VERSION.short().as_str()])
            .set(1);
        m
    }

    /// The Prometheus text exposition of every metric. Gauges that mirror server state are set
    /// by the caller first (the `/metrics` handler reads the server: this module is a leaf that
    /// every layer records into).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Operations of one mvcc transaction, counted as etcd counts them (its `metricsTxnWrite`):
/// each range (compares included), put and delete; a transaction with more than one is a txn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxnOps {
    pub ranges: u64,
    pub puts: u64,
    pub deletes: u64,
}

impl TxnOps {
    pub fn record(self) {
        let m = &*METRICS;
        if self.ranges + self.puts + self.deletes > 1 {
            m.txn_total.inc();
        }
        m.range_total.inc_by(self.ranges);
        m.put_total.inc_by(self.puts);
        m.delete_total.inc_by(self.deletes);
    }
}

/// Counts a proposal as pending until dropped (also when its caller goes away).
pub struct PendingProposal(());

impl PendingProposal {
    pub fn start() -> Self {
        METRICS.proposals_pending.inc();
        PendingProposal(())
    }
}

impl Drop for PendingProposal {
    fn drop(&mut self) {
        METRICS.proposals_pending.dec();
    }
}

/// Counts one live thing in a gauge until dropped (a watch stream, a watcher).
pub struct Live(&'static IntGauge);

impl Live {
    pub fn new(gauge: &'static IntGauge) -> Live {
        gauge.inc();
        Live(gauge)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection to a peer, counted in `etcd_network_active_peers` while it lasts and in
/// `etcd_network_disconnected_peers_total` when it ends.
pub struct PeerConnection {
    labels: [String; 2],
}

impl PeerConnection {
    pub fn up(local: u64, remote: u64) -> PeerConnection {
        let labels = [format!("{local:x}"), format!("{remote:x}")];
        METRICS
            .active_peers
            .with_label_values(&[&labels[0], &labels[1]])
            .inc();
        PeerConnection { labels }
    }
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        let l = [self.labels[0].as_str(), self.labels[1].as_str()];
        METRICS.active_peers.with_label_values(&l).dec();
        METRICS.disconnected_peers.with_label_values(&l).inc();
    }
}

/// Counts a new leader as etcd does: a change to a known leader other than the last one seen.
pub fn on_leader(old: u64, new: u64) {
    if new != 0 && new != old {
        METRICS.leader_changes.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_buckets_are_etcds() {
        let b = disk_buckets();
        assert_eq!(b.len(), 14);
        assert_eq!(b[0], 0.001);
        assert!((b[13] - 8.192).abs() < 1e-9);
    }

    #[test]
    fn a_single_op_is_not_a_txn() {
        let before = METRICS.txn_total.get();
        TxnOps {
            ranges: 1,
            ..Default::default()
        }
        .record();
        assert_eq!(METRICS.txn_total.get(), before);
        TxnOps {
            ranges: 1,
            puts: 1,
            deletes: 0,
        }
        .record();
        assert_eq!(METRICS.txn_total.get(), before + 1);
    }
}
