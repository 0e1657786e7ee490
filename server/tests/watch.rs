//! Watch stream semantics, each checked on real etcd 3.4 first and then on oxcd.

mod support;

use oxcd::pb::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
};
use std::time::Duration;

/// A client that sends its create request and half-closes its side (grpc-go's CloseSend, or a
/// request stream that simply ends) keeps receiving events: etcd ends a watch stream only when
/// the client goes away.
#[tokio::test(flavor = "multi_thread")]
async fn a_half_closed_watch_stream_keeps_delivering_events() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut w = WatchClient::connect(server.endpoint()).await.expect(l);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: b"half/closed".to_vec(),
                    ..Default::default()
                },
            )),
        };
        // The request stream ends after its one message.
        let mut stream = w
            .watch(futures::stream::iter([create]))
            .await
            .expect(l)
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{l}: no created response"))
            .expect(l)
            .unwrap_or_else(|| panic!("{l}: the stream ended before the created response"));
        assert!(first.created, "{l}: {first:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = server.client().await;
        c.put("half/closed", "v", None).await.expect(l);
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{l}: no event after the half-close"))
            .expect(l)
            .unwrap_or_else(|| panic!("{l}: the stream ended at the half-close"));
        assert_eq!(next.events.len(), 1, "{l}: {next:?}");
        assert_eq!(
            next.events[0].kv.as_ref().map(|kv| kv.key.clone()),
            Some(b"half/closed".to_vec()),
            "{l}"
        );
    }
}

type Responses = tonic::Streaming<oxcd::pb::etcdserverpb::WatchResponse>;

/// One watch stream whose requests the test sends as it goes.
struct Stream {
    tx: tokio::sync::mpsc::Sender<WatchRequest>,
    /// etcd (grpc-go) sends the response headers with its first message, and tonic's call
    /// returns only then: the call runs in a task until the first response is awaited.
    call: Option<tokio::task::JoinHandle<Responses>>,
    rx: Option<Responses>,
    label: &'static str,
}

impl Stream {
    async fn open(server: &support::Server) -> Stream {
        let label = server.kind.label();
        let mut w = WatchClient::connect(server.endpoint()).await.expect(label);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let call = tokio::spawn(async move {
            w.watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("watch call")
                .into_inner()
        });
        Stream {
            tx,
            call: Some(call),
            rx: None,
            label,
        }
    }

    /// The response stream, once the server has answered the call (within `wait`).
    async fn responses(&mut self, wait: Duration) -> Option<&mut Responses> {
        if let Some(call) = self.call.as_mut() {
            let rx = tokio::time::timeout(wait, call)
                .await
                .ok()?
                .expect(self.label);
            self.call = None;
            self.rx = Some(rx);
        }
        self.rx.as_mut()
    }

    async fn send(&self, r: watch_request::RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect(self.label);
    }

    /// Creates a watcher and returns its ID.
    async fn create(&mut self, c: WatchCreateRequest) -> i64 {
        self.send(watch_request::RequestUnion::CreateRequest(c))
            .await;
        let r = self.next(Duration::from_secs(5)).await.expect("created");
        assert!(r.created && !r.canceled, "{}: {r:?}", self.label);
        r.watch_id
    }

    async fn request_progress(&self) {
        self.send(watch_request::RequestUnion::ProgressRequest(
            oxcd::pb::etcdserverpb::WatchProgressRequest {},
        ))
        .await;
    }

    /// The next response, or None if none comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<oxcd::pb::etcdserverpb::WatchResponse> {
        let label = self.label;
        let deadline = tokio::time::Instant::now() + wait;
        let rx = self.responses(wait).await?;
        match tokio::time::timeout_at(deadline, rx.message()).await {
            Ok(r) => Some(r.expect(label).expect("the stream is open")),
            Err(_) => None,
        }
    }
}

fn is_progress(r: &oxcd::pb::etcdserverpb::WatchResponse) -> bool {
    r.events.is_empty() && !r.created && !r.canceled && r.compact_revision == 0
}

fn rev_of(r: &oxcd::pb::etcdserverpb::WatchResponse) -> i64 {
    r.header.as_ref().map_or(0, |h| h.revision)
}

/// A requested progress notification as etcd 3.6 sends it (the fixes of etcd issues 15220
/// and 17507): watch ID -1, the store's current revision, after every event up to it, and
/// only when every watcher of the stream is synced: a stream with no watchers, or with a
/// watcher waiting for a future start revision, gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn requested_progress_carries_the_current_revision_once_every_watcher_is_synced() {
    let quiet = Duration::from_millis(1500);
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        let mut s = Stream::open(server).await;
        s.request_progress().await;
        assert_eq!(s.next(quiet).await, None, "{l}: progress with no watchers");

        let prefix = WatchCreateRequest {
            key: b"p/".to_vec(),
            range_end: b"p0".to_vec(),
            ..Default::default()
        };
        s.create(prefix.clone()).await;
        let mut last = 0;
        for i in 0..5 {
            let r = c.put(format!("p/{i}"), "v", None).await.expect(l);
            last = r.header().expect(l).revision();
        }
        c.put("elsewhere", "v", None).await.expect(l);
        let current = last + 1;
        s.request_progress().await;
        let mut events = 0;
        let progress = loop {
            let r = s.next(Duration::from_secs(5)).await.expect("progress");
            if is_progress(&r) {
                break r;
            }
            events += r.events.len();
        };
        assert_eq!(events, 5, "{l}: every event comes before the notification");
        assert_eq!(
            (progress.watch_id, rev_of(&progress)),
            (-1, current),
            "{l}: {progress:?}"
        );

        // A watcher waiting for a future revision is not synced: no notification.
        let future = s
            .create(WatchCreateRequest {
                key: b"f".to_vec(),
                start_revision: current + 100,
                ..Default::default()
            })
            .await;
        s.request_progress().await;
        assert_eq!(
            s.next(quiet).await,
            None,
            "{l}: progress with a future watcher"
        );
        s.send(watch_request::RequestUnion::CancelRequest(
            oxcd::pb::etcdserverpb::WatchCancelRequest { watch_id: future },
        ))
        .await;
        let r = s.next(Duration::from_secs(5)).await.expect("canceled");
        assert!(r.canceled, "{l}: {r:?}");
        s.request_progress().await;
        let r = s.next(Duration::from_secs(5)).await.expect("progress");
        assert_eq!(
            (r.watch_id, rev_of(&r), is_progress(&r)),
            (-1, current, true),
            "{l}"
        );
    }
}

/// Under writes, a requested notification never runs ahead of the events: every event sent
/// before it has a revision at or below it, every event after it a revision above it.
#[tokio::test(flavor = "multi_thread")]
async fn requested_progress_never_runs_ahead_of_the_events_under_writes() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut s = Stream::open(server).await;
        s.create(WatchCreateRequest {
            key: b"w/".to_vec(),
            range_end: b"w0".to_vec(),
            ..Default::default()
        })
        .await;
        let mut c = server.client().await;
        let writes = 300;
        let writer = tokio::spawn(async move {
            for i in 0..writes {
                let key = if i % 3 == 0 { "other" } else { "w/k" };
                c.put(key, format!("{i}"), None).await.expect("put");
            }
        });
        let mut seen_events = 0;
        let mut max_event_rev = 0;
        let mut progress_revs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut ask = tokio::time::interval(Duration::from_millis(20));
        let tx = s.tx.clone();
        let rx = s
            .responses(Duration::from_secs(5))
            .await
            .expect("the watch call");
        while seen_events < writes * 2 / 3 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = ask.tick() => tx
                    .send(WatchRequest {
                        request_union: Some(watch_request::RequestUnion::ProgressRequest(
                            oxcd::pb::etcdserverpb::WatchProgressRequest {},
                        )),
                    })
                    .await
                    .expect(l),
                r = rx.message() => {
                    let r = r.expect(l).expect("the stream is open");
                    if is_progress(&r) {
                        assert_eq!(r.watch_id, -1, "{l}");
                        assert!(rev_of(&r) >= max_event_rev, "{l}: progress {} after an event at {max_event_rev}", rev_of(&r));
                        progress_revs.push(rev_of(&r));
                    }
                    for e in &r.events {
                        let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                        let last_progress = progress_revs.last().copied().unwrap_or(0);
                        assert!(rev > last_progress, "{l}: event at {rev} after progress at {last_progress}");
                        max_event_rev = max_event_rev.max(rev);
                        seen_events += 1;
                    }
                }
            }
        }
        writer.await.expect(l);
        assert_eq!(seen_events, writes * 2 / 3, "{l}: every event arrives");
        assert!(!progress_revs.is_empty(), "{l}: some notification arrived");
    }
}

/// `--watch-progress-notify-interval` (kubeadm sets 5s; 1s here): a watcher that asked for
/// progress and was sent no events since the last tick gets a notification with its own ID
/// and the current revision; one that had events, or did not ask, gets none.
#[tokio::test(flavor = "multi_thread")]
async fn periodic_progress_goes_to_quiet_watchers_that_asked_for_it() {
    for server in &support::both(&["--watch-progress-notify-interval=1s"]).await {
        let l = server.kind.label();
        let mut s = Stream::open(server).await;
        let watch = |key: &str, progress_notify| WatchCreateRequest {
            key: key.as_bytes().to_vec(),
            progress_notify,
            ..Default::default()
        };
        let quiet = s.create(watch("quiet", true)).await;
        let silent = s.create(watch("silent", false)).await;
        let busy = s.create(watch("busy", true)).await;
        let mut c = server.client().await;
        let writer = tokio::spawn(async move {
            // 3.6 s of writes, one every 200 ms: busy always has events between two ticks.
            for i in 0..18 {
                c.put("busy", format!("{i}"), None).await.expect("put");
                c.put("other", format!("{i}"), None).await.expect("put");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut notified = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_millis(3600);
        while let Some(r) = s
            .next(end.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            if is_progress(&r) {
                notified.push((r.watch_id, rev_of(&r)));
            }
        }
        writer.await.expect(l);
        assert!(
            notified.iter().all(|(id, _)| *id == quiet),
            "{l}: only the quiet watcher ({quiet}; silent {silent}, busy {busy}): {notified:?}"
        );
        assert!(notified.len() >= 2, "{l}: {notified:?}");
        let revs: Vec<i64> = notified.iter().map(|(_, r)| *r).collect();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "{l}: each notification has the current revision, which grew: {revs:?}"
        );
    }
}

/// Watch creates that etcd refuses get its answer: created and canceled at once, watch ID -1
/// and the reason (an empty range, a watch ID already in use on the stream, a negative start
/// revision as compacted away); a refused create leaves the stream and its watchers working.
#[tokio::test(flavor = "multi_thread")]
async fn refused_watch_creates_get_etcds_answer() {
    let mut answers = Vec::new();
    for server in &support::both(&[]).await {
        let mut s = Stream::open(server).await;
        let create = |key: &str, range_end: &str, watch_id: i64, start_revision: i64| {
            watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.into(),
                range_end: range_end.into(),
                watch_id,
                start_revision,
                ..Default::default()
            })
        };
        let mut seen = Vec::new();
        for req in [
            create("b", "a", 0, 0),
            create("x", "", 5, 0),
            create("y", "", 5, 0),
            create("z", "", 0, -5),
            create("w", "", 0, 0),
        ] {
            s.send(req).await;
            let r = s.next(Duration::from_secs(5)).await.expect("an answer");
            seen.push((r.watch_id, r.created, r.canceled, r.cancel_reason));
        }
        // Nothing else arrives for the refused ones (no late cancel).
        let late = s.next(Duration::from_millis(500)).await;
        assert!(late.is_none(), "{}: {late:?}", server.kind.label());
        answers.push(seen);
    }
    let compacted = "etcdserver: mvcc: required revision has been compacted";
    assert_eq!(
        answers[0],
        [
            (-1, true, true, "mvcc: watcher range is empty".to_string()),
            (5, true, false, String::new()),
            (
                -1,
                true,
                true,
                "mvcc: duplicate watch ID provided on the WatchStream".to_string()
            ),
            (-1, true, true, compacted.to_string()),
            (0, true, false, String::new()),
        ],
        "etcd"
    );
    assert_eq!(answers[0], answers[1], "etcd, then oxcd");
}
