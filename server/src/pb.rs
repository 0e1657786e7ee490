//! Generated protobuf types: etcd's wire API and oxcd's internal Raft payloads.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod leasepb {
    tonic::include_proto!("leasepb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod oxcdpb {
    tonic::include_proto!("oxcdpb");
}

/// The gRPC codec of every generated service: prost's, except that a `TxnRequest` is first
/// measured by [`nesting`]: one nested deeper than any server thread can decode gets etcd's
/// answer for too deep a Txn (`too many operations in txn request`, INVALID_ARGUMENT).
/// Every other undecodable message stays INTERNAL, as grpc-go answers it.
pub mod codec {
    use prost::Message;
    use std::marker::PhantomData;
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::Status;
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    #[derive(Debug, Clone)]
    pub struct EtcdCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for EtcdCodec<T, U> {
        fn default() -> Self {
            EtcdCodec(PhantomData)
        }
    }

    impl<T, U> Codec for EtcdCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = EtcdDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            EtcdDecoder(ProstDecoder::default())
        }
    }

    #[derive(Debug, Clone)]
    pub struct EtcdDecoder<U>(ProstDecoder<U>);

    impl<U: Message + Default> Decoder for EtcdDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            // prost decodes without a recursion limit (its `no-recursion-limit` feature), so
            // the one recursive request is measured, without recursion, before it is decoded.
            if std::any::type_name::<U>().ends_with("::TxnRequest") {
                use bytes::Buf;
                if super::nesting::too_deep(buf.chunk(), super::nesting::Root::Txn) {
                    return Err(Status::invalid_argument(
                        crate::error::EtcdError::TooManyOps.to_string(),
                    ));
                }
            }
            self.0.decode(buf)
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// How deep Txns nest in an encoded message, measured on the wire without recursion.
///
/// `TxnRequest` is etcd's one recursive message (a `RequestOp` may hold a Txn). prost is built
/// without its recursion limit (100 message levels, about 50 Txns, where etcd applies 128), so
/// every decoder of a message that may hold a Txn from outside (a client's request, a log
/// entry, an etcd data dir) measures the bytes first and refuses more than
/// [`MAX_TXN_DEPTH`] levels. The API and the applier use this same function, so an entry the
/// API accepted always decodes at apply.
pub mod nesting {
    /// The deepest Txn any decoder accepts. etcd's own rule (`--max-txn-ops`, 128 by default,
    /// less one per level) refuses deeper Txns before this unless the limit is raised; this
    /// bound keeps decoding, applying and answering within a server thread's stack.
    pub const MAX_TXN_DEPTH: usize = 1024;

    /// The message the bytes encode.
    #[derive(Clone, Copy, PartialEq, Debug)]
    pub enum Root {
        /// A `TxnRequest`.
        Txn,
        /// A Raft log entry: oxcd's `RaftRequest` or etcd's `InternalRaftRequest`, whose field
        /// 6 (the same number in both) is a `TxnRequest`.
        Entry,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Msg {
        Root,
        Txn,
        Op,
    }

    /// Whether the bytes nest Txns deeper than [`MAX_TXN_DEPTH`]. Malformed bytes are not
    /// too deep: the decoder that follows reports them.
    pub fn too_deep(buf: &[u8], root: Root) -> bool {
        depth(buf, root, MAX_TXN_DEPTH) > MAX_TXN_DEPTH
    }

    /// The Txn nesting depth of `buf` (a `TxnRequest` counts 1), counted up to `limit + 1`.
    pub fn depth(buf: &[u8], root: Root, limit: usize) -> usize {
        let first = if root == Root::Txn {
            Msg::Txn
        } else {
            Msg::Root
        };
        // Open messages: (end offset, kind). Only Txns and RequestOps are descended into.
        let mut open: Vec<(usize, Msg)> = vec![(buf.len(), first)];
        let mut txns = usize::from(first == Msg::Txn);
        let mut deepest = txns;
        let mut pos = 0;
        loop {
            while let Some(&(end, kind)) = open.last() {
                if pos < end {
                    break;
                }
                open.pop();
                if kind == Msg::Txn {
                    txns -= 1;
                }
            }
            let Some(&(end, kind)) = open.last() else {
                return deepest;
            };
            let Some(key) = varint(buf, &mut pos) else {
                return deepest;
            };
            let (field, wire_type) = (key >> 3, key & 7);
            let next = match wire_type {
                0 => varint(buf, &mut pos).map(|_| pos),
                1 => Some(pos + 8),
                5 => Some(pos + 4),
                2 => varint(buf, &mut pos).and_then(|n| pos.checked_add(usize::try_from(n).ok()?)),
                _ => None,
            };
            let Some(next) = next.filter(|&n| n <= end) else {
                return deepest;
            };
            let child = match (kind, wire_type, field) {
                (Msg::Root, 2, 6) if root == Root::Entry => Some(Msg::Txn),
                (Msg::Txn, 2, 2 | 3) => Some(Msg::Op),
                (Msg::Op, 2, 4) => Some(Msg::Txn),
                _ => None,
            };
            match child {
                Some(child) => {
                    open.push((next, child));
                    if child == Msg::Txn {
                        txns += 1;
                        deepest = deepest.max(txns);
                        if deepest > limit {
                            return deepest;
                        }
                    }
                }
                None => pos = next,
            }
        }
    }

    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *buf.get(*pos)?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::pb::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
        use crate::pb::oxcdpb::{raft_request, RaftRequest};
        use prost::Message;

        fn nested(depth: usize) -> TxnRequest {
            let put = request_op::Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                ..Default::default()
            });
            let mut t = TxnRequest {
                success: vec![RequestOp { request: Some(put) }],
                ..Default::default()
            };
            for i in 1..depth {
                let op = RequestOp {
                    request: Some(request_op::Request::RequestTxn(t)),
                };
                // Alternate branches so both success and failure are followed.
                t = if i % 2 == 0 {
                    TxnRequest {
                        success: vec![op],
                        ..Default::default()
                    }
                } else {
                    TxnRequest {
                        failure: vec![op],
                        ..Default::default()
                    }
                };
            }
            t
        }

        #[test]
        fn measures_txns_and_entries_holding_them() {
            for d in [1, 2, 50, 128, 129, 1024, 1025, 3000] {
                let t = nested(d);
                assert_eq!(depth(&t.encode_to_vec(), Root::Txn, usize::MAX), d);
                let entry = RaftRequest {
                    id: 7,
                    request: Some(raft_request::Request::Txn(t)),
                    username: "u".into(),
                    ..Default::default()
                };
                let bytes = entry.encode_to_vec();
                assert_eq!(depth(&bytes, Root::Entry, usize::MAX), d);
                assert_eq!(too_deep(&bytes, Root::Entry), d > MAX_TXN_DEPTH);
            }
            assert_eq!(depth(&[], Root::Txn, 5), 1);
            assert_eq!(depth(&[], Root::Entry, 5), 0);
        }

        #[test]
        fn stops_counting_past_the_limit_and_survives_garbage() {
            // A length prefix of 2^62 and a truncated varint are the decoder's to report.
            let huge = [0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
            assert_eq!(depth(&huge, Root::Txn, 10), 1);
            assert_eq!(depth(&[0x12, 0xff], Root::Txn, 10), 1);
            // A million levels of empty Txn frames, each claiming the rest of the buffer.
            let mut bytes = Vec::new();
            for _ in 0..100_000 {
                bytes.extend_from_slice(&[
                    0x12, 0x80, 0x80, 0x80, 0x01, 0x22, 0x80, 0x80, 0x80, 0x01,
                ]);
            }
            assert_eq!(depth(&bytes, Root::Txn, 10), 1);
            assert_eq!(depth(&nested(5000).encode_to_vec(), Root::Txn, 10), 11);
        }

        /// What the scanner lets through decodes, executes nothing here, and drops, on a
        /// thread with the stack tokio gives its workers (2 MiB).
        #[test]
        fn the_deepest_accepted_txn_decodes_on_a_worker_stack() {
            let bytes = nested(MAX_TXN_DEPTH).encode_to_vec();
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let t = TxnRequest::decode(bytes.as_slice()).expect("decodes");
                    assert_eq!(t.encode_to_vec(), bytes);
                })
                .unwrap()
                .join()
                .unwrap();
        }
    }
}
