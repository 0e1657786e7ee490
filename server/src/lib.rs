//! oxcd: an etcd v3 compatible key-value store. Each etcd concept has one module named after
//! it; `docs/ARCHITECTURE.md` follows a write and a read through them.

pub mod api;
pub mod auth;
pub mod benchmark;
pub mod config;
pub mod corrupt;
pub mod duration;
pub mod error;
pub mod etcdserver;
pub mod failpoint;
pub mod features;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc_proxy;
pub mod lease;
pub mod listener;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod mvcc;
pub mod pb;
pub mod proxy;
pub mod raft_node;
pub mod schema;
pub mod snapshot;
pub mod tls;
pub mod transport;
pub mod txn;
pub mod version;
pub mod wal;
pub mod watch;
