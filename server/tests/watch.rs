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
