//! etcd's gRPC gateway: the v3 API as JSON over HTTP/1.1 under `/v3/` (and `/v3beta/`), on
//! the client URLs, so the `curl` recipes of etcd's docs work.
//!
//! Each call goes to the same service code as gRPC. JSON follows grpc-gateway's mapping as
//! etcd 3.4 configures it: field names as written in the .proto files (`create_revision`,
//! `ID`, `dbSize`), 64-bit integers as strings, bytes as base64, enums by name, default
//! values left out. The `Authorization` header carries the auth token. Streams (watch, lease
//! keep-alive, election observe, snapshot) answer one `{"result": ...}` line per message.
//!
//! A streaming request's body is read whole before its messages are sent on (curl sends one
//! request message); the response stream stays open until the client goes, as etcd's does.

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::kv::KvService;
use super::lease::LeaseService;
use super::lock::LockService;
use super::maintenance::MaintenanceService;
use crate::auth::Caller;
use crate::etcdserver::EtcdServer;
use crate::pb::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
    maintenance_server::Maintenance, LeaseKeepAliveRequest, WatchRequest,
};
use crate::pb::v3electionpb::election_server::Election;
use crate::pb::v3lockpb::lock_server::Lock;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use std::convert::Infallible;
use std::sync::{Arc, LazyLock};
use tonic::{Code, Status};

use super::reply::{response, Body};

static DESCRIPTORS: LazyLock<Option<DescriptorPool>> = LazyLock::new(|| {
    DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"))[..]).ok()
});

/// A JSON request body as the message `name` (an empty body is the empty message).
fn from_json<T: Message + Default>(name: &str, body: &[u8]) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let desc = DESCRIPTORS
        .as_ref()
        .and_then(|p| p.get_message_by_name(name))
        .ok_or_else(|| Status::internal(format!("no descriptor for {name}")))?;
    // Go's decoder calls a cut-off body "unexpected EOF"; other messages are serde's.
    let bad = |e: serde_json::Error| {
        Status::invalid_argument(if e.is_eof() {
            "unexpected EOF".to_string()
        } else {
            e.to_string()
        })
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        &mut de,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .map_err(bad)?;
    de.end().map_err(bad)?;
    T::decode(msg.encode_to_vec().as_slice()).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A message as grpc-gateway's JSON.
fn to_json<T: Message>(name: &str, msg: &T) -> Result<String, Status> {
    let desc = DESCRIPTORS
        .as_ref()
        .and_then(|p| p.get_message_by_name(name))
        .ok_or_else(|| Status::internal(format!("no descriptor for {name}")))?;
    let dm = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(e.to_string()))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    dm.serialize_with_options(
        &mut out,
        &SerializeOptions::new()
            .use_proto_field_name(true)
            .stringify_64_bit_integers(true)
            .skip_default_fields(true),
    )
    .map_err(|e| Status::internal(e.to_string()))?;
    String::from_utf8(out.into_inner()).map_err(|e| Status::internal(e.to_string()))
}

/// grpc-gateway's `HTTPStatusFromCode` (v1, which etcd 3.4 uses).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// grpc-gateway's error object, fields in its order (clients match the text).
/// grpc-gateway v2's error body (etcd 3.5+): code and message.
fn error_json(s: &Status) -> String {
    let msg = serde_json::Value::String(s.message().to_string());
    format!(r#"{{"code":{},"message":{msg}}}"#, s.code() as i32)
}

pub fn error_response(s: Status) -> Response<Body> {
    response(http_status(s.code()), "application/json", error_json(&s))
}

fn ok_json(body: String) -> Response<Body> {
    response(StatusCode::OK, "application/json", body)
}

/// A server stream as newline-separated `{"result": ...}` objects; an error ends it with
/// grpc-gateway's stream error object.
fn stream_response<T: Message + 'static>(
    name: &'static str,
    stream: impl futures::Stream<Item = Result<T, Status>> + Send + 'static,
    keep: impl Send + Sync + 'static,
) -> Response<Body> {
    let lines = stream.map(move |item| {
        // Held for as long as the response streams: dropping it ends the request side.
        let _ = &keep;
        let line = match item.and_then(|m| to_json(name, &m)) {
            Ok(json) => format!("{{\"result\":{json}}}\n"),
            Err(s) => {
                let code = s.code();
                serde_json::json!({"error": {
                    "grpc_code": code as i32,
                    "http_code": http_status(code).as_u16(),
                    "message": s.message(),
                    "http_status": http_status(code).canonical_reason().unwrap_or(""),
                }})
                .to_string()
                    + "\n"
            }
        };
        Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
    });
    let mut r = response(StatusCode::OK, "application/json", String::new());
    *r.body_mut() = BodyExt::boxed_unsync(StreamBody::new(lines));
    r
}

/// Every JSON value in a body, in order (a streaming call's request messages).
fn json_messages<T: Message + Default>(name: &str, body: &[u8]) -> Result<Vec<T>, Status> {
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>() {
        let v = v.map_err(|e| Status::invalid_argument(e.to_string()))?;
        out.push(from_json(name, v.to_string().as_bytes())?);
    }
    Ok(out)
}

/// Requests whose paths start with `/v3/` or `/v3beta/`; None for other paths.
pub async fn handle(
    server: &Arc<EtcdServer>,
    path: &str,
    caller: Caller,
    body: &[u8],
) -> Option<Response<Body>> {
    let route = path
        .strip_prefix("/v3/")
        .or_else(|| path.strip_prefix("/v3beta/"))?;
    // A stream slot for as long as the response lasts (a watch holds one until it ends).
    let slot = server.gateway_streams.clone().acquire_owned().await.ok();
    let response = match call(server, route, caller, body).await {
        Ok(r) => r,
        Err(s) => error_response(s),
    };
    let (parts, body) = response.into_parts();
    let body = body
        .map_frame(move |frame| {
            let _ = &slot;
            frame
        })
        .boxed_unsync();
    Some(Response::from_parts(parts, body))
}

macro_rules! unary {
    ($svc:expr, $method:ident, $req:literal, $resp:literal, $caller:expr, $body:expr) => {{
        let mut req = tonic::Request::new(from_json($req, $body)?);
        req.extensions_mut().insert($caller);
        let resp = $svc.$method(req).await?.into_inner();
        ok_json(to_json($resp, &resp)?)
    }};
}

async fn call(
    server: &Arc<EtcdServer>,
    route: &str,
    caller: Caller,
    body: &[u8],
) -> Result<Response<Body>, Status> {
    let s = server.clone();
    let kv = KvService(s.clone());
    let lease = LeaseService(s.clone());
    let cluster = ClusterService(s.clone());
    let mnt = MaintenanceService(s.clone());
    let auth = AuthService(s.clone());
    let c = caller;
    if !super::learner::serves_route(route) {
        s.check_not_learner()?;
    }
    Ok(match route {
        "kv/range" => unary!(
            kv,
            range,
            "etcdserverpb.RangeRequest",
            "etcdserverpb.RangeResponse",
            c,
            body
        ),
        "kv/put" => unary!(
            kv,
            put,
            "etcdserverpb.PutRequest",
            "etcdserverpb.PutResponse",
            c,
            body
        ),
        "kv/deleterange" => unary!(
            kv,
            delete_range,
            "etcdserverpb.DeleteRangeRequest",
            "etcdserverpb.DeleteRangeResponse",
            c,
            body
        ),
        "kv/txn" => unary!(
            kv,
            txn,
            "etcdserverpb.TxnRequest",
            "etcdserverpb.TxnResponse",
            c,
            body
        ),
        "kv/compaction" => unary!(
            kv,
            compact,
            "etcdserverpb.CompactionRequest",
            "etcdserverpb.CompactionResponse",
            c,
            body
        ),
        "lease/grant" => unary!(
            lease,
            lease_grant,
            "etcdserverpb.LeaseGrantRequest",
            "etcdserverpb.LeaseGrantResponse",
            c,
            body
        ),
        "lease/revoke" | "kv/lease/revoke" => unary!(
            lease,
            lease_revoke,
            "etcdserverpb.LeaseRevokeRequest",
            "etcdserverpb.LeaseRevokeResponse",
            c,
            body
        ),
        "lease/timetolive" | "kv/lease/timetolive" => unary!(
            lease,
            lease_time_to_live,
            "etcdserverpb.LeaseTimeToLiveRequest",
            "etcdserverpb.LeaseTimeToLiveResponse",
            c,
            body
        ),
        "lease/leases" | "kv/lease/leases" => unary!(
            lease,
            lease_leases,
            "etcdserverpb.LeaseLeasesRequest",
            "etcdserverpb.LeaseLeasesResponse",
            c,
            body
        ),
        "cluster/member/add" => unary!(
            cluster,
            member_add,
            "etcdserverpb.MemberAddRequest",
            "etcdserverpb.MemberAddResponse",
            c,
            body
        ),
        "cluster/member/remove" => unary!(
            cluster,
            member_remove,
            "etcdserverpb.MemberRemoveRequest",
            "etcdserverpb.MemberRemoveResponse",
            c,
            body
        ),
        "cluster/member/update" => unary!(
            cluster,
            member_update,
            "etcdserverpb.MemberUpdateRequest",
            "etcdserverpb.MemberUpdateResponse",
            c,
            body
        ),
        "cluster/member/list" => unary!(
            cluster,
            member_list,
            "etcdserverpb.MemberListRequest",
            "etcdserverpb.MemberListResponse",
            c,
            body
        ),
        "cluster/member/promote" => unary!(
            cluster,
            member_promote,
            "etcdserverpb.MemberPromoteRequest",
            "etcdserverpb.MemberPromoteResponse",
            c,
            body
        ),
        "maintenance/alarm" => unary!(
            mnt,
            alarm,
            "etcdserverpb.AlarmRequest",
            "etcdserverpb.AlarmResponse",
            c,
            body
        ),
        "maintenance/status" => unary!(
            mnt,
            status,
            "etcdserverpb.StatusRequest",
            "etcdserverpb.StatusResponse",
            c,
            body
        ),
        "maintenance/defragment" => unary!(
            mnt,
            defragment,
            "etcdserverpb.DefragmentRequest",
            "etcdserverpb.DefragmentResponse",
            c,
            body
        ),
        // etcd 3.5+ gives HashKV a path of its own (in 3.4 it shared Hash's, which won).
        "maintenance/hashkv" => unary!(
            mnt,
            hash_kv,
            "etcdserverpb.HashKVRequest",
            "etcdserverpb.HashKVResponse",
            c,
            body
        ),
        "maintenance/downgrade" => unary!(
            mnt,
            downgrade,
            "etcdserverpb.DowngradeRequest",
            "etcdserverpb.DowngradeResponse",
            c,
            body
        ),
        "auth/status" => unary!(
            auth,
            auth_status,
            "etcdserverpb.AuthStatusRequest",
            "etcdserverpb.AuthStatusResponse",
            c,
            body
        ),
        "maintenance/hash" => unary!(
            mnt,
            hash,
            "etcdserverpb.HashRequest",
            "etcdserverpb.HashResponse",
            c,
            body
        ),
        "maintenance/transfer-leadership" => unary!(
            mnt,
            move_leader,
            "etcdserverpb.MoveLeaderRequest",
            "etcdserverpb.MoveLeaderResponse",
            c,
            body
        ),
        "auth/enable" => unary!(
            auth,
            auth_enable,
            "etcdserverpb.AuthEnableRequest",
            "etcdserverpb.AuthEnableResponse",
            c,
            body
        ),
        "auth/disable" => unary!(
            auth,
            auth_disable,
            "etcdserverpb.AuthDisableRequest",
            "etcdserverpb.AuthDisableResponse",
            c,
            body
        ),
        "auth/authenticate" => unary!(
            auth,
            authenticate,
            "etcdserverpb.AuthenticateRequest",
            "etcdserverpb.AuthenticateResponse",
            c,
            body
        ),
        "auth/user/add" => unary!(
            auth,
            user_add,
            "etcdserverpb.AuthUserAddRequest",
            "etcdserverpb.AuthUserAddResponse",
            c,
            body
        ),
        "auth/user/get" => unary!(
            auth,
            user_get,
            "etcdserverpb.AuthUserGetRequest",
            "etcdserverpb.AuthUserGetResponse",
            c,
            body
        ),
        "auth/user/list" => unary!(
            auth,
            user_list,
            "etcdserverpb.AuthUserListRequest",
            "etcdserverpb.AuthUserListResponse",
            c,
            body
        ),
        "auth/user/delete" => unary!(
            auth,
            user_delete,
            "etcdserverpb.AuthUserDeleteRequest",
            "etcdserverpb.AuthUserDeleteResponse",
            c,
            body
        ),
        "auth/user/changepw" => unary!(
            auth,
            user_change_password,
            "etcdserverpb.AuthUserChangePasswordRequest",
            "etcdserverpb.AuthUserChangePasswordResponse",
            c,
            body
        ),
        "auth/user/grant" => unary!(
            auth,
            user_grant_role,
            "etcdserverpb.AuthUserGrantRoleRequest",
            "etcdserverpb.AuthUserGrantRoleResponse",
            c,
            body
        ),
        "auth/user/revoke" => unary!(
            auth,
            user_revoke_role,
            "etcdserverpb.AuthUserRevokeRoleRequest",
            "etcdserverpb.AuthUserRevokeRoleResponse",
            c,
            body
        ),
        "auth/role/add" => unary!(
            auth,
            role_add,
            "etcdserverpb.AuthRoleAddRequest",
            "etcdserverpb.AuthRoleAddResponse",
            c,
            body
        ),
        "auth/role/get" => unary!(
            auth,
            role_get,
            "etcdserverpb.AuthRoleGetRequest",
            "etcdserverpb.AuthRoleGetResponse",
            c,
            body
        ),
        "auth/role/list" => unary!(
            auth,
            role_list,
            "etcdserverpb.AuthRoleListRequest",
            "etcdserverpb.AuthRoleListResponse",
            c,
            body
        ),
        "auth/role/delete" => unary!(
            auth,
            role_delete,
            "etcdserverpb.AuthRoleDeleteRequest",
            "etcdserverpb.AuthRoleDeleteResponse",
            c,
            body
        ),
        "auth/role/grant" => unary!(
            auth,
            role_grant_permission,
            "etcdserverpb.AuthRoleGrantPermissionRequest",
            "etcdserverpb.AuthRoleGrantPermissionResponse",
            c,
            body
        ),
        "auth/role/revoke" => unary!(
            auth,
            role_revoke_permission,
            "etcdserverpb.AuthRoleRevokePermissionRequest",
            "etcdserverpb.AuthRoleRevokePermissionResponse",
            c,
            body
        ),
        "lock/lock" => unary!(
            LockService(s.clone()),
            lock,
            "v3lockpb.LockRequest",
            "v3lockpb.LockResponse",
            c,
            body
        ),
        "lock/unlock" => unary!(
            LockService(s.clone()),
            unlock,
            "v3lockpb.UnlockRequest",
            "v3lockpb.UnlockResponse",
            c,
            body
        ),
        "election/campaign" => unary!(
            ElectionService(s.clone()),
            campaign,
            "v3electionpb.CampaignRequest",
            "v3electionpb.CampaignResponse",
            c,
            body
        ),
        "election/proclaim" => unary!(
            ElectionService(s.clone()),
            proclaim,
            "v3electionpb.ProclaimRequest",
            "v3electionpb.ProclaimResponse",
            c,
            body
        ),
        "election/leader" => unary!(
            ElectionService(s.clone()),
            leader,
            "v3electionpb.LeaderRequest",
            "v3electionpb.LeaderResponse",
            c,
            body
        ),
        "election/resign" => unary!(
            ElectionService(s.clone()),
            resign,
            "v3electionpb.ResignRequest",
            "v3electionpb.ResignResponse",
            c,
            body
        ),
        "election/observe" => {
            let mut req = tonic::Request::new(from_json("v3electionpb.LeaderRequest", body)?);
            req.extensions_mut().insert(c);
            let stream = ElectionService(s.clone()).observe(req).await?.into_inner();
            stream_response("v3electionpb.LeaderResponse", stream, ())
        }
        "maintenance/snapshot" => {
            let mut req = tonic::Request::new(from_json("etcdserverpb.SnapshotRequest", body)?);
            req.extensions_mut().insert(c);
            let stream = mnt.snapshot(req).await?.into_inner();
            stream_response("etcdserverpb.SnapshotResponse", stream, ())
        }
        "watch" => {
            let reqs: Vec<WatchRequest> = json_messages("etcdserverpb.WatchRequest", body)?;
            let (req_tx, req_rx) = tokio::sync::mpsc::channel(reqs.len().max(1));
            for r in reqs {
                let _ = req_tx.try_send(Ok(r));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(128);
            let stream = crate::watch::WatchStream::new(s.clone(), tx, c);
            tokio::spawn(stream.run(tokio_stream::wrappers::ReceiverStream::new(req_rx)));
            stream_response(
                "etcdserverpb.WatchResponse",
                tokio_stream::wrappers::ReceiverStream::new(rx),
                req_tx,
            )
        }
        "lease/keepalive" => {
            // etcd's keep-alive stream ends when the client's side does.
            let reqs: Vec<LeaseKeepAliveRequest> =
                json_messages("etcdserverpb.LeaseKeepAliveRequest", body)?;
            let inbound = futures::stream::iter(reqs.into_iter().map(Ok));
            let stream = super::lease::keep_alive(s.clone(), Box::pin(inbound));
            stream_response("etcdserverpb.LeaseKeepAliveResponse", stream, ())
        }
        _ => return Err(Status::not_found("Not Found")),
    })
}

/// The full body of a request: gateway requests are small; a body over the request limit is
/// refused as etcd refuses an oversized request.
pub async fn read_body(body: hyper::body::Incoming, limit: usize) -> Result<Bytes, Status> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(crate::error::EtcdError::RequestTooLarge.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
    use crate::pb::mvccpb::KeyValue;

    #[test]
    fn json_maps_as_grpc_gateway_does() {
        let r: RangeRequest = from_json(
            "etcdserverpb.RangeRequest",
            br#"{"key":"Zm9v","range_end":"Zm9w","limit":"2","sort_order":"DESCEND"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.key.as_slice(), r.range_end.as_slice(), r.limit),
            (&b"foo"[..], &b"fop"[..], 2)
        );
        assert_eq!(r.sort_order, 2);
        let camel: RangeRequest = from_json(
            "etcdserverpb.RangeRequest",
            br#"{"key":"Zm9v","rangeEnd":"Zm9w"}"#,
        )
        .unwrap();
        assert_eq!(camel.range_end, b"fop");
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                revision: 2,
                ..Default::default()
            }),
            kvs: vec![KeyValue {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            to_json("etcdserverpb.RangeResponse", &resp).unwrap(),
            r#"{"header":{"cluster_id":"1","revision":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
        assert!(from_json::<RangeRequest>("etcdserverpb.RangeRequest", b"{\"key\":").is_err());
        assert_eq!(
            from_json::<RangeRequest>("etcdserverpb.RangeRequest", b"").unwrap(),
            RangeRequest::default()
        );
    }
}
