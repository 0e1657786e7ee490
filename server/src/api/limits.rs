//! The client API's size limits, shared by the gRPC and HTTP sides of a client listener.

/// gRPC allows this much framing beyond --max-request-bytes, as etcd does.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The largest request header list a gRPC connection takes: grpc-go's server default (16 MiB),
/// so a request etcd serves (a 1 MiB header) is served. Past it, h2 refuses that one stream
/// (the connection's other streams go on) up to about 20 MiB, and beyond that ends the
/// connection (its CONTINUATION-flood guard); etcd ends the connection at once.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 20;

/// The largest HTTP/1.1 request head (request line and headers): Go's net/http default
/// (`DefaultMaxHeaderBytes`, 1 MiB) plus the 4 KiB it allows over; larger gets 431.
pub const MAX_HTTP1_HEAD_BYTES: usize = (1 << 20) + 4096;
