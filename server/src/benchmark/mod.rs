//! `oxcd benchmark`: a load generator speaking the etcd v3 gRPC API, in the spirit of etcd's
//! `tools/benchmark`, so oxcd and etcd are measured by the same client. Workloads: `put`,
//! `range`, `txn-put` (compare-and-swap), `watch` (watchers + writers, event delivery
//! latency), `lease-keepalive` and `connect` (connection storms: connections per second).
//! Reports throughput, latency percentiles and errors by
//! gRPC code, as text and optionally JSON.

pub mod report;

use crate::mvcc::prefix_end;
use crate::pb::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    lease_client::LeaseClient,
    request_op,
    watch_client::WatchClient,
    watch_request, Compare, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use clap::{Parser, Subcommand};
use parking_lot::Mutex;
use report::{Recorder, Report};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser, Debug, Clone)]
#[command(name = "oxcd benchmark", about = "Load generator for the etcd v3 API")]
struct BenchCli {
    /// Client endpoints (host:port or URLs), comma separated.
    #[arg(
        long,
        default_value = "127.0.0.1:2379",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// gRPC connections (HTTP/2), spread over the endpoints.
    #[arg(long, default_value_t = 1, global = true)]
    conns: usize,
    /// Concurrent clients (requests in flight), spread over the connections.
    #[arg(long, default_value_t = 1, global = true)]
    clients: usize,
    /// Operations to run (default 10000 unless --duration is given).
    #[arg(long, global = true)]
    total: Option<u64>,
    /// Run for this long instead (Go-style: 10s, 1m).
    #[arg(long, global = true)]
    duration: Option<String>,
    #[arg(long = "key-size", default_value_t = 8, global = true)]
    key_size: usize,
    #[arg(long = "val-size", default_value_t = 8, global = true)]
    val_size: usize,
    /// Distinct keys the workload touches.
    #[arg(long = "key-space-size", default_value_t = 1, global = true)]
    key_space_size: u64,
    /// Walk the key space in order instead of at random.
    #[arg(long = "sequential-keys", global = true)]
    sequential_keys: bool,
    /// Reads: l (linearizable) or s (serializable).
    #[arg(long, default_value = "l", global = true)]
    consistency: String,
    /// Offered load in operations per second (open loop); unlimited when absent.
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Also write the report as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// No periodic progress line on stderr.
    #[arg(long = "no-progress", global = true)]
    no_progress: bool,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand, Debug, Clone)]
enum Workload {
    /// Put keys from the key space.
    Put,
    /// Range requests: one key of the key space, or --key (with --prefix: all keys under it).
    Range {
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        prefix: bool,
    },
    /// Compare-and-swap on keys of the key space: Txn(value == last seen ? put : get).
    TxnPut,
    /// Watchers on one prefix and writers putting under it; measures event delivery.
    Watch {
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Watch streams the watchers are spread over.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        #[arg(long, default_value = "watch/")]
        prefix: String,
    },
    /// Connection storms: waves of --clients new connections opened at once, each answering one
    /// serializable range; an operation is a TCP connect, the HTTP/2 handshake and that answer.
    Connect,
    /// Keep-alives of many leases over --clients streams.
    LeaseKeepalive {
        #[arg(long, default_value_t = 100)]
        leases: usize,
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
}

/// Shared run state: the op counter, the stop conditions and the rate limiter.
struct Run {
    total: Option<u64>,
    deadline: Option<Instant>,
    issued: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    /// Next free send slot under --rate.
    next_slot: Mutex<Option<Instant>>,
    interval: Option<Duration>,
}

impl Run {
    /// The next operation number, or None when the run is over.
    fn next(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        match self.total {
            Some(t) if i >= t => None,
            _ => Some(i),
        }
    }

    /// Waits for this operation's send slot under --rate.
    async fn pace(&self) {
        let Some(iv) = self.interval else { return };
        let slot = {
            let mut next = self.next_slot.lock();
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + iv);
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    fn record(&self, rec: &mut Recorder, t: Instant, r: Result<(), tonic::Status>) {
        match r {
            Ok(()) => {
                rec.ok(t.elapsed());
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(s) => {
                rec.err(&s);
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn key_bytes(n: u64, size: usize) -> Vec<u8> {
    let s = format!("{n:0size$}");
    s.as_bytes()[s.len().saturating_sub(size)..].to_vec()
}

impl BenchCli {
    fn key(&self, i: u64) -> Vec<u8> {
        let space = self.key_space_size.max(1);
        let n = if self.sequential_keys {
            i % space
        } else {
            rand::random::<u64>() % space
        };
        key_bytes(n, self.key_size)
    }

    fn run_state(&self) -> anyhow::Result<Arc<Run>> {
        let duration = match &self.duration {
            Some(d) => Some(
                crate::duration::parse_go_duration(d)
                    .ok_or_else(|| anyhow::anyhow!("invalid --duration {d:?}"))?,
            ),
            None => None,
        };
        let total = match (self.total, duration) {
            (None, None) => Some(10_000),
            (t, _) => t,
        };
        Ok(Arc::new(Run {
            total,
            deadline: duration.map(|d| Instant::now() + d),
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            next_slot: Mutex::new(None),
            interval: self
                .rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
        }))
    }
}

/// The i-th endpoint as a URL.
fn endpoint_url(cli: &BenchCli, i: usize) -> String {
    let ep = &cli.endpoints[i % cli.endpoints.len()];
    if ep.contains("://") {
        ep.clone()
    } else {
        format!("http://{ep}")
    }
}

/// One gRPC connection to `url`.
async fn dial(url: &str) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
}

async fn connect(cli: &BenchCli) -> anyhow::Result<Vec<Channel>> {
    anyhow::ensure!(!cli.endpoints.is_empty(), "no --endpoints");
    let mut out = Vec::new();
    for i in 0..cli.conns.max(1) {
        let url = endpoint_url(cli, i);
        let ch = dial(&url)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))?;
        out.push(ch);
    }
    Ok(out)
}

/// Waves of `--clients` connections opened at once; each connection lives until its wave
/// is over, so a wave is that many connections at the server together.
async fn connect_storm(cli: &Arc<BenchCli>) -> anyhow::Result<(Recorder, Duration)> {
    let run = cli.run_state()?;
    let progress = (!cli.no_progress).then(|| spawn_progress(run.clone(), "benchmark".into()));
    let start = Instant::now();
    let mut rec = Recorder::default();
    loop {
        let mut wave = Vec::new();
        for c in 0..cli.clients.max(1) {
            if run.next().is_none() {
                break;
            }
            let url = endpoint_url(cli, c);
            wave.push(tokio::spawn(async move {
                let t = Instant::now();
                let ch = match dial(&url).await {
                    Ok(ch) => ch,
                    Err(e) => return (t, Err(tonic::Status::unavailable(e.to_string())), None),
                };
                let req = RangeRequest {
                    key: b"connect".to_vec(),
                    serializable: true,
                    ..Default::default()
                };
                // A connection the server never answers is an error, not a stuck run.
                let mut kv = KvClient::new(ch.clone());
                let range = kv.range(req);
                let r = match tokio::time::timeout(Duration::from_secs(10), range).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 10 s")),
                };
                (t, r, Some(ch))
            }));
        }
        if wave.is_empty() {
            break;
        }
        let mut open = Vec::new();
        for task in wave {
            let (t, r, ch) = task.await?;
            run.record(&mut rec, t, r);
            open.push(ch);
        }
        drop(open);
    }
    if let Some(p) = progress {
        p.abort();
    }
    Ok((rec, start.elapsed()))
}

/// Prints a progress line every two seconds until the run ends.
fn spawn_progress(run: Arc<Run>, label: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let done = run.done.load(Ordering::Relaxed);
            eprintln!(
                "{label}: {done} ok, {} failed, {:.0}/s, {:.0}s",
                run.failed.load(Ordering::Relaxed),
                (done - last) as f64 / 2.0,
                start.elapsed().as_secs_f64()
            );
            last = done;
        }
    })
}

/// Runs `oxcd benchmark ...`; `args` starts with the program name.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let args: Vec<String> = std::iter::once("oxcd benchmark".to_string())
        .chain(args.into_iter().skip(2))
        .collect();
    let cli = match BenchCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    anyhow::ensure!(
        cli.consistency == "l" || cli.consistency == "s",
        "--consistency must be l or s"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run_workload(cli.clone()))?;
    print!("{}", report.to_text());
    if let Some(path) = &cli.json {
        std::fs::write(path, format!("{:#}\n", report.to_json()))?;
    }
    Ok(())
}

async fn run_workload(cli: BenchCli) -> anyhow::Result<Report> {
    let channels = connect(&cli).await?;
    let cli = Arc::new(cli);
    let (name, (rec, took)) = match cli.workload.clone() {
        Workload::Put => ("put", closed_loop(&cli, &channels, put_op).await?),
        Workload::Range { .. } => ("range", closed_loop(&cli, &channels, range_op).await?),
        Workload::TxnPut => ("txn-put", closed_loop(&cli, &channels, cas_op).await?),
        Workload::Watch {
            watchers,
            streams,
            prefix,
        } => (
            "watch",
            watch(&cli, &channels, watchers, streams, &prefix).await?,
        ),
        Workload::Connect => ("connect", connect_storm(&cli).await?),
        Workload::LeaseKeepalive { leases, ttl } => (
            "lease-keepalive",
            lease_keepalive(&cli, &channels, leases, ttl).await?,
        ),
    };
    Ok(Report::new(name, rec, took))
}

/// Waits for every worker and merges what they recorded.
async fn merge_all(tasks: Vec<tokio::task::JoinHandle<Recorder>>) -> anyhow::Result<Recorder> {
    let mut all = Recorder::default();
    for t in tasks {
        all.merge(t.await?);
    }
    Ok(all)
}

/// Per-client state of the closed-loop workloads.
#[derive(Default)]
struct ClientState {
    /// txn-put: the value this client last saw per key.
    last_seen: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    counter: u64,
}

type OpFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'a>>;
type OpFn =
    for<'a> fn(&'a BenchCli, &'a mut KvClient<Channel>, &'a mut ClientState, u64) -> OpFuture<'a>;

/// `--clients` workers, each issuing one operation at a time until the run ends.
async fn closed_loop(
    cli: &Arc<BenchCli>,
    channels: &[Channel],
    op: OpFn,
) -> anyhow::Result<(Recorder, Duration)> {
    let run = cli.run_state()?;
    let progress = (!cli.no_progress).then(|| spawn_progress(run.clone(), "benchmark".into()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..cli.clients.max(1) {
        let mut kv = KvClient::new(channels[c % channels.len()].clone())
            .max_decoding_message_size(usize::MAX);
        let (cli, run) = (cli.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            let mut state = ClientState::default();
            while let Some(i) = run.next() {
                run.pace().await;
                let t = Instant::now();
                let r = op(&cli, &mut kv, &mut state, i).await;
                run.record(&mut rec, t, r);
            }
            rec
        }));
    }
    let all = merge_all(tasks).await?;
    let took = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    Ok((all, took))
}

fn put_op<'a>(
    cli: &'a BenchCli,
    kv: &'a mut KvClient<Channel>,
    _: &'a mut ClientState,
    i: u64,
) -> OpFuture<'a> {
    Box::pin(async move {
        let req = PutRequest {
            key: cli.key(i),
            value: vec![b'v'; cli.val_size],
            ..Default::default()
        };
        kv.put(req).await.map(|_| ())
    })
}

fn range_op<'a>(
    cli: &'a BenchCli,
    kv: &'a mut KvClient<Channel>,
    _: &'a mut ClientState,
    i: u64,
) -> OpFuture<'a> {
    Box::pin(async move {
        let (key, range_end) = match &cli.workload {
            Workload::Range {
                key: Some(k),
                prefix,
            } => {
                let k = k.as_bytes().to_vec();
                let end = if *prefix { prefix_end(&k) } else { vec![] };
                (k, end)
            }
            _ => (cli.key(i), vec![]),
        };
        let req = RangeRequest {
            key,
            range_end,
            serializable: cli.consistency == "s",
            ..Default::default()
        };
        kv.range(req).await.map(|_| ())
    })
}

fn cas_op<'a>(
    cli: &'a BenchCli,
    kv: &'a mut KvClient<Channel>,
    state: &'a mut ClientState,
    i: u64,
) -> OpFuture<'a> {
    Box::pin(async move {
        let key = cli.key(i);
        state.counter += 1;
        let mut value = format!("{:x}-{}", rand::random::<u32>(), state.counter).into_bytes();
        value.resize(cli.val_size.max(value.len()), b'v');
        let compare = match state.last_seen.get(&key) {
            Some(v) => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: key.clone(),
                target_union: Some(TargetUnion::Value(v.clone())),
                range_end: vec![],
            },
            None => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: key.clone(),
                target_union: Some(TargetUnion::Version(0)),
                range_end: vec![],
            },
        };
        let req = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let resp = kv.txn(req).await?.into_inner();
        if resp.succeeded {
            state.last_seen.insert(key, value);
        } else {
            let seen = resp.responses.first().and_then(|r| match &r.response {
                Some(crate::pb::etcdserverpb::response_op::Response::ResponseRange(rr)) => {
                    rr.kvs.first().map(|kv| kv.value.clone())
                }
                _ => None,
            });
            match seen {
                Some(v) => state.last_seen.insert(key, v),
                None => state.last_seen.remove(&key),
            };
        }
        Ok(())
    })
}

/// Watchers on a prefix, `--clients` writers putting `--total` keys under it with their send
/// time in the value. The report is about events: every delivered event's latency (from the
/// write being sent to the event arriving) and the delivery rate.
async fn watch(
    cli: &Arc<BenchCli>,
    channels: &[Channel],
    watchers: usize,
    streams: usize,
    prefix: &str,
) -> anyhow::Result<(Recorder, Duration)> {
    let t0 = Instant::now();
    let prefix = prefix.as_bytes().to_vec();
    let streams = streams.clamp(1, watchers.max(1));
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    let mut created = Vec::new();
    for s in 0..streams {
        let mut client = WatchClient::new(channels[s % channels.len()].clone())
            .max_decoding_message_size(usize::MAX);
        let n = (watchers / streams) + usize::from(s < watchers % streams);
        let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
        for _ in 0..n {
            tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: prefix.clone(),
                        range_end: prefix_end(&prefix),
                        ..Default::default()
                    },
                )),
            })
            .await?;
        }
        let mut inbound = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        created.push(ready_rx);
        let (delivered, mut stop) = (delivered.clone(), stop_rx.clone());
        readers.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut rec = Recorder::default();
            let mut pending_creates = n;
            let mut ready = Some(ready_tx);
            loop {
                let resp = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(resp)) => resp,
                        Ok(None) => break,
                        Err(s) => { rec.err(&s); break }
                    },
                    _ = stop.changed() => break,
                };
                if resp.created {
                    pending_creates = pending_creates.saturating_sub(1);
                    if pending_creates == 0 {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                }
                for ev in resp.events {
                    let Some(kv) = ev.kv else { continue };
                    if let Some(sent) = kv.value.get(..8).and_then(|b| b.try_into().ok()) {
                        let sent = u64::from_be_bytes(sent);
                        let now = t0.elapsed().as_nanos() as u64;
                        rec.ok(Duration::from_nanos(now.saturating_sub(sent)));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            rec
        }));
    }
    for r in created {
        r.await.map_err(|_| {
            anyhow::anyhow!("a watch stream closed before its watchers were created")
        })?;
    }
    let run = cli.run_state()?;
    let progress = (!cli.no_progress).then(|| spawn_progress(run.clone(), "writes".into()));
    let start = Instant::now();
    let mut writers = Vec::new();
    for c in 0..cli.clients.max(1) {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let (cli, run, prefix) = (cli.clone(), run.clone(), prefix.clone());
        writers.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            while let Some(i) = run.next() {
                run.pace().await;
                let mut key = prefix.clone();
                key.extend_from_slice(&cli.key(i));
                let mut value = (t0.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
                value.resize(cli.val_size.max(8), b'v');
                let t = Instant::now();
                let r = kv
                    .put(PutRequest {
                        key,
                        value,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ());
                run.record(&mut rec, t, r);
            }
            rec
        }));
    }
    let writes = merge_all(writers).await?;
    // Wait for the events of every acknowledged write, at most 10 s more.
    let expected = writes.latencies_us.len() as u64 * watchers as u64;
    let wait_until = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    let _ = stop_tx.send(true);
    let mut events = merge_all(readers).await?;
    for (code, n) in writes.errors {
        *events.errors.entry(format!("write {code}")).or_default() += n;
    }
    let missing = expected.saturating_sub(delivered.load(Ordering::Relaxed));
    if missing > 0 {
        events.errors.insert("events not delivered".into(), missing);
    }
    Ok((events, took))
}

/// Grants `leases` leases, then `--clients` keep-alive streams renew them round-robin.
async fn lease_keepalive(
    cli: &Arc<BenchCli>,
    channels: &[Channel],
    leases: usize,
    ttl: i64,
) -> anyhow::Result<(Recorder, Duration)> {
    let mut ids = Vec::with_capacity(leases);
    let mut lc = LeaseClient::new(channels[0].clone());
    for _ in 0..leases {
        let r = lc
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await?
            .into_inner();
        ids.push(r.id);
    }
    let ids = Arc::new(ids);
    let run = cli.run_state()?;
    let progress = (!cli.no_progress).then(|| spawn_progress(run.clone(), "keep-alives".into()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..cli.clients.max(1) {
        let mut client = LeaseClient::new(channels[c % channels.len()].clone());
        let (run, ids) = (run.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            // The first request goes out with the call: a grpc-go server (etcd) sends no
            // response headers before it has a message to answer.
            let Some(mut i) = run.next() else { return rec };
            run.pace().await;
            let mut t = Instant::now();
            let _ = tx
                .send(LeaseKeepAliveRequest {
                    id: ids[(i as usize) % ids.len().max(1)],
                })
                .await;
            let mut inbound = match client
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    rec.err(&s);
                    return rec;
                }
            };
            loop {
                let r = match inbound.message().await {
                    Ok(Some(resp)) if resp.ttl > 0 => Ok(()),
                    Ok(Some(_)) => Err(tonic::Status::not_found("lease expired")),
                    Ok(None) => Err(tonic::Status::unavailable("keep-alive stream ended")),
                    Err(s) => Err(s),
                };
                let stop = r.is_err();
                run.record(&mut rec, t, r);
                if stop {
                    break;
                }
                let Some(next) = run.next() else { break };
                i = next;
                run.pace().await;
                t = Instant::now();
                let id = ids[(i as usize) % ids.len().max(1)];
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    rec.err(&tonic::Status::unavailable("keep-alive stream closed"));
                    break;
                }
            }
            rec
        }));
    }
    let all = merge_all(tasks).await?;
    let took = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    Ok((all, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(key_bytes(42, 8), b"00000042");
        assert_eq!(key_bytes(123_456_789, 4), b"6789");
        assert_eq!(prefix_end(b"watch/"), b"watch0");
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
