use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::EtcdServer;
use crate::mvcc::Store;
use crate::pb::etcdserverpb::{watch_server::Watch, ResponseHeader, WatchRequest, WatchResponse};
use crate::watch::{WatchContext, WatchHub, WatchStream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct WatchService(pub Arc<EtcdServer>);

impl WatchContext for EtcdServer {
    fn store(&self) -> &Store {
        &self.store
    }
    fn hub(&self) -> &WatchHub {
        &self.hub
    }
    fn header(&self, rev: i64) -> ResponseHeader {
        EtcdServer::header(self, rev)
    }
    fn max_request_bytes(&self) -> usize {
        self.cfg.max_request_bytes
    }
    fn progress_interval(&self) -> Duration {
        // etcd adds up to a tenth as jitter, so that watchers created together (a client
        // restarting) are not all notified at once.
        let interval = self.cfg.watch_progress_interval;
        let tenth = (interval.as_nanos() / 10) as u64;
        let jitter = if tenth > 0 {
            rand::random_range(0..tenth)
        } else {
            0
        };
        interval + Duration::from_nanos(jitter)
    }
    fn watch_permitted(
        &self,
        caller: &Caller,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        // etcd 3.4 checks a from-key watch ("\0" end) as the single key, letting a user watch
        // keys it may not read; oxcd checks the whole range.
        let ai = self.auth_info_now(caller)?.unwrap_or_default();
        self.auth.is_range_permitted(&ai, key, range_end)
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&req);
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(128);
        let stream = WatchStream::new(self.0.clone(), tx, caller);
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
