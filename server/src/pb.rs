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

/// The gRPC codec of every generated service: prost's, with one difference in what a client
/// is told. A Txn nested deeper than prost's recursion limit (100 levels of message, about
/// 50 Txns) is refused with etcd's answer for too deep a Txn (`too many operations in txn
/// request`, INVALID_ARGUMENT) instead of an INTERNAL decode error; every other undecodable
/// message stays INTERNAL, as grpc-go answers it.
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
            self.0.decode(buf).map_err(|s| {
                if s.message().contains("recursion limit reached")
                    && std::any::type_name::<U>().ends_with("::TxnRequest")
                {
                    Status::invalid_argument(crate::error::EtcdError::TooManyOps.to_string())
                } else {
                    s
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
