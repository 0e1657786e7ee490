//! Watch: committed events fan out to watch streams without ever blocking the writer.
//!
//! The applier publishes each committed revision's events on a bounded broadcast channel.
//! Each gRPC watch stream runs one task holding all of its watchers. A watcher is either
//! synced (fed from the broadcast) or behind; a watcher behind — created with a past
//! start revision, or whose stream lagged past the channel's capacity — catches up from the
//! backend (like etcd's unsynced watcher group) and then rejoins. `next_rev` per watcher is
//! what guarantees no gaps and no duplicates: events below it are skipped, events from it
//! on are delivered in revision order.

use crate::auth::Caller;
use crate::error::EtcdError;
use crate::mvcc::{RangeEnd, Store};
use crate::pb::etcdserverpb::{
    watch_create_request::FilterType, watch_request, ResponseHeader, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, Event};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Events of one committed revision.
#[derive(Debug)]
pub struct RevisionEvents {
    pub rev: i64,
    pub events: Vec<Event>,
    /// The whole state was replaced (a snapshot was installed): every watcher catches up
    /// from the backend instead.
    pub resync: bool,
}

/// At most this many revisions go in one catch-up response (etcd's watchBatchMaxRevs).
const CATCH_UP_REVS: i64 = 1000;
const BROADCAST_CAPACITY: usize = 4096;

pub struct WatchHub {
    tx: broadcast::Sender<Arc<RevisionEvents>>,
}

impl Default for WatchHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        WatchHub { tx }
    }
}

impl WatchHub {
    /// Called by the applier after the revision is visible to readers; never blocks.
    pub fn publish(&self, rev: i64, events: Vec<Event>) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(RevisionEvents {
                rev,
                events,
                resync: false,
            }));
        }
    }

    /// After a snapshot install: streams re-read history from the new backend.
    pub fn resync(&self, rev: i64) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(RevisionEvents {
                rev,
                events: vec![],
                resync: true,
            }));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevisionEvents>> {
        self.tx.subscribe()
    }
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    next_rev: i64,
    /// The requested start revision (0: from now on).
    start_rev: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    fragment: bool,
    /// Sent something since the last progress notification.
    active: bool,
    _live: crate::metrics::Live,
}

impl Watcher {
    fn end(&self) -> RangeEnd<'_> {
        // etcd: an empty end watches one key, "\0" every key from `key` on.
        RangeEnd::from_request(&self.range_end)
    }

    /// etcd's synced watcher at store revision `rev`: nothing up to `rev` is left to send,
    /// and it does not wait for a future start revision. Only such watchers hear progress.
    fn synced(&self, rev: i64) -> bool {
        self.next_rev > rev && rev >= self.start_rev
    }

    fn wants(&self, ev: &Event) -> bool {
        let Some(kv) = &ev.kv else { return false };
        if !self.end().contains(&self.key, &kv.key) {
            return false;
        }
        let is_put = ev.r#type == EventType::Put as i32;
        !(is_put && self.no_put || !is_put && self.no_delete)
    }
}

/// What a watch stream needs from the server.
pub trait WatchContext: Send + Sync + 'static {
    fn store(&self) -> &Store;
    fn hub(&self) -> &WatchHub;
    fn header(&self, rev: i64) -> ResponseHeader;
    fn max_request_bytes(&self) -> usize;
    fn progress_interval(&self) -> Duration;
    /// Whether `caller` may watch [key, range_end) ("\0": to the end of the key space).
    fn watch_permitted(
        &self,
        _caller: &Caller,
        _key: &[u8],
        _range_end: &[u8],
    ) -> Result<(), EtcdError> {
        Ok(())
    }
}

type Out = mpsc::Sender<Result<WatchResponse, tonic::Status>>;

pub struct WatchStream<C: WatchContext> {
    ctx: Arc<C>,
    out: Out,
    caller: Caller,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    _live: crate::metrics::Live,
}

impl<C: WatchContext> WatchStream<C> {
    pub fn new(ctx: Arc<C>, out: Out, caller: Caller) -> Self {
        WatchStream {
            ctx,
            out,
            caller,
            watchers: BTreeMap::new(),
            next_id: 0,
            _live: crate::metrics::Live::new(&crate::metrics::METRICS.watch_streams),
        }
    }

    /// Serves one gRPC watch stream until the client goes away. A client that half-closes
    /// (sends no more requests) keeps receiving its watchers' events, as from etcd.
    pub async fn run(
        mut self,
        mut inbound: impl futures::Stream<Item = Result<WatchRequest, tonic::Status>> + Unpin,
    ) {
        use futures::StreamExt;
        let mut events = self.ctx.hub().subscribe();
        let mut progress = tokio::time::interval(self.ctx.progress_interval());
        progress.tick().await;
        let mut requests_open = true;
        loop {
            tokio::select! {
                req = inbound.next(), if requests_open => {
                    match req {
                        Some(Ok(req)) => {
                            if self.on_request(req, &mut events).await.is_err() {
                                return;
                            }
                        }
                        None => requests_open = false,
                        Some(Err(_)) => return,
                    }
                }
                _ = self.out.closed() => return,
                item = events.recv() => {
                    let ok = match item {
                        Ok(batch) if batch.resync => self.catch_up_all().await,
                        Ok(batch) => self.on_events(&batch).await,
                        Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up_all().await,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if ok.is_err() {
                        return;
                    }
                }
                _ = progress.tick() => {
                    if self.on_progress_tick().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), ()> {
        crate::failpoint::hit_async("beforeSendWatchResponse");
        self.out.send(Ok(resp)).await.map_err(|_| ())
    }

    async fn on_request(
        &mut self,
        req: WatchRequest,
        events: &mut broadcast::Receiver<Arc<RevisionEvents>>,
    ) -> Result<(), ()> {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    let rev = self.ctx.store().current_rev();
                    self.send(WatchResponse {
                        header: Some(self.ctx.header(rev)),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                self.on_progress_request(events).await
            }
            None => Ok(()),
        }
    }

    /// A requested progress notification, as etcd sends it since 3.4.31/3.5.13 (etcd issues
    /// 15220 and 17507): the store's current revision, on behalf of every watcher of the
    /// stream (watch ID -1), and only when every watcher has been sent everything up to that
    /// revision; otherwise (and on a stream with no watchers) nothing, and the client asks
    /// again. A notification must never claim a revision whose events are still to come.
    async fn on_progress_request(
        &mut self,
        events: &mut broadcast::Receiver<Arc<RevisionEvents>>,
    ) -> Result<(), ()> {
        // Revisions already queued for this stream are sent first: in etcd a watcher is
        // synced once its events are in its channel, ahead of the notification.
        loop {
            match events.try_recv() {
                Ok(batch) if batch.resync => self.catch_up_all().await?,
                Ok(batch) => self.on_events(&batch).await?,
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.catch_up_all().await?,
                Err(_) => break,
            }
        }
        let rev = self.ctx.store().current_rev();
        if self.watchers.is_empty() || !self.watchers.values().all(|w| w.synced(rev)) {
            return Ok(());
        }
        self.send(WatchResponse {
            header: Some(self.ctx.header(rev)),
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    /// A create request refused: created and canceled at once, with the reason, and watch ID
    /// -1, as etcd 3.4 and 3.6 answer (etcd 3.5 answered a permission refusal with the
    /// requested ID).
    async fn refuse(&self, rev: i64, reason: String) -> Result<(), ()> {
        self.send(WatchResponse {
            header: Some(self.ctx.header(rev)),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        })
        .await
    }

    async fn create(&mut self, mut c: WatchCreateRequest) -> Result<(), ()> {
        if c.key.is_empty() {
            c.key = vec![0];
        }
        let cur = self.ctx.store().current_rev();
        // etcd 3.6 refuses a negative start revision first, as compacted away.
        if c.start_revision < 0 {
            let s = tonic::Status::from(crate::error::EtcdError::Compacted);
            return self.refuse(cur, s.message().to_string()).await;
        }
        if let Err(e) = self.ctx.watch_permitted(&self.caller, &c.key, &c.range_end) {
            // etcd puts the gRPC error's text in the cancel reason.
            let s = tonic::Status::from(e);
            let reason = format!("rpc error: code = {:?} desc = {}", s.code(), s.message());
            return self.refuse(cur, reason).await;
        }
        let start = if c.start_revision == 0 {
            cur + 1
        } else {
            c.start_revision
        };
        let err = if c.range_end.len() > 1 || (c.range_end.len() == 1 && c.range_end[0] != 0) {
            (c.key.as_slice() >= c.range_end.as_slice()).then_some("mvcc: watcher range is empty")
        } else {
            None
        };
        let err = err.or_else(|| {
            (c.watch_id != 0 && self.watchers.contains_key(&c.watch_id))
                .then_some("mvcc: duplicate watch ID provided on the WatchStream")
        });
        if let Some(reason) = err {
            return self.refuse(cur, reason.to_string()).await;
        }
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let filters: Vec<i32> = c.filters.clone();
        let w = Watcher {
            key: c.key,
            range_end: c.range_end,
            next_rev: start,
            start_rev: c.start_revision,
            no_put: filters.contains(&(FilterType::Noput as i32)),
            no_delete: filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
            fragment: c.fragment,
            active: false,
            _live: crate::metrics::Live::new(&crate::metrics::METRICS.watchers),
        };
        self.watchers.insert(id, w);
        self.send(WatchResponse {
            header: Some(self.ctx.header(cur)),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        if start <= cur {
            self.catch_up(id, cur).await?;
        }
        Ok(())
    }

    /// Replays history [next_rev, to] of one watcher from the backend. Meanwhile the watcher is
    /// one of etcd's unsynced slow watchers, and the events read and not yet sent are pending.
    async fn catch_up(&mut self, id: i64, to: i64) -> Result<(), ()> {
        let behind = self.watchers.get(&id).is_some_and(|w| w.next_rev <= to);
        if !behind {
            return Ok(());
        }
        let metrics = &crate::metrics::METRICS;
        metrics.slow_watchers.inc();
        let r = self.catch_up_from_backend(id, to).await;
        metrics.slow_watchers.dec();
        r
    }

    async fn catch_up_from_backend(&mut self, id: i64, to: i64) -> Result<(), ()> {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            if w.next_rev > to {
                return Ok(());
            }
            let compact = self.ctx.store().compact_rev();
            if w.next_rev < compact {
                self.watchers.remove(&id);
                // etcd answers a compacted watcher with a header of revision 0.
                return self
                    .send(WatchResponse {
                        header: Some(self.ctx.header(0)),
                        watch_id: id,
                        compact_revision: compact,
                        canceled: true,
                        ..Default::default()
                    })
                    .await;
            }
            let upto = to.min(w.next_rev + CATCH_UP_REVS - 1);
            let evs = match self.ctx.store().events(&w.key, w.end(), w.next_rev, upto) {
                Ok(evs) => evs,
                Err(e) => {
                    tracing::error!(error = %e, "watch catch-up read failed");
                    return Err(());
                }
            };
            let evs: Vec<Event> = evs.into_iter().filter(|e| w.wants(e)).collect();
            let prev_kv = w.prev_kv;
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next_rev = upto + 1;
            }
            if !evs.is_empty() {
                let pending = &crate::metrics::METRICS.pending_events;
                let n = evs.len() as i64;
                pending.add(n);
                let sent = self.deliver(id, to, evs, prev_kv).await;
                pending.sub(n);
                sent?;
            }
        }
    }

    async fn catch_up_all(&mut self) -> Result<(), ()> {
        let cur = self.ctx.store().current_rev();
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.catch_up(id, cur).await?;
        }
        Ok(())
    }

    async fn on_events(&mut self, batch: &RevisionEvents) -> Result<(), ()> {
        let mut sends = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if batch.rev < w.next_rev {
                continue;
            }
            w.next_rev = batch.rev + 1;
            let evs: Vec<Event> = batch
                .events
                .iter()
                .filter(|e| w.wants(e))
                .cloned()
                .collect();
            if !evs.is_empty() {
                sends.push((*id, evs, w.prev_kv));
            }
        }
        for (id, evs, prev) in sends {
            self.deliver(id, batch.rev, evs, prev).await?;
        }
        Ok(())
    }

    async fn deliver(
        &mut self,
        id: i64,
        rev: i64,
        mut evs: Vec<Event>,
        prev_kv: bool,
    ) -> Result<(), ()> {
        if prev_kv {
            for e in &mut evs {
                if let Some(kv) = &e.kv {
                    // A create event has no previous version, whatever came before (etcd).
                    let create =
                        e.r#type == EventType::Put as i32 && kv.create_revision == kv.mod_revision;
                    if !create {
                        e.prev_kv = self.ctx.store().prev_kv(&kv.key, kv.mod_revision);
                    }
                }
            }
        }
        let fragment = match self.watchers.get_mut(&id) {
            Some(w) => {
                w.active = true;
                w.fragment
            }
            None => return Ok(()),
        };
        crate::metrics::METRICS
            .watch_events
            .inc_by(evs.len() as u64);
        let resp = WatchResponse {
            header: Some(self.ctx.header(rev)),
            watch_id: id,
            events: evs,
            ..Default::default()
        };
        let limit = self.ctx.max_request_bytes();
        if !fragment || resp.encoded_len() <= limit || resp.events.len() <= 1 {
            return self.send(resp).await;
        }
        // Split into fragments under the request size limit; all but the last are marked.
        let mut chunks: Vec<Vec<Event>> = vec![vec![]];
        let mut size = 0;
        for e in resp.events {
            let n = e.encoded_len() + 8;
            if size + n > limit && !chunks.last().is_some_and(|c| c.is_empty()) {
                chunks.push(vec![]);
                size = 0;
            }
            size += n;
            if let Some(c) = chunks.last_mut() {
                c.push(e);
            }
        }
        let total = chunks.len();
        for (i, events) in chunks.into_iter().enumerate() {
            self.send(WatchResponse {
                header: resp.header,
                watch_id: id,
                events,
                fragment: i + 1 < total,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Periodic progress (`--watch-progress-notify-interval`) for each synced watcher that
    /// asked for it and was sent no events since the last tick, with its own watch ID.
    async fn on_progress_tick(&mut self) -> Result<(), ()> {
        let rev = self.ctx.store().current_rev();
        let mut ids = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !std::mem::take(&mut w.active) && w.synced(rev) {
                ids.push(*id);
            }
        }
        for id in ids {
            self.send(WatchResponse {
                header: Some(self.ctx.header(rev)),
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}
