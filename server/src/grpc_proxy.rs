//! `oxcd grpc-proxy start`: etcd's gRPC proxy (etcd's `proxy/grpcproxy`), a layer-7 proxy in
//! front of a cluster's client URLs. Clients use one address for every etcd gRPC service (KV,
//! Watch, Lease, Cluster, Maintenance, Auth, Lock, Election). Each call is forwarded as it came,
//! streams included and with its metadata (so auth tokens pass), to the member the proxy is
//! connected to; when that member fails, the proxy connects to the next endpoint. `/health`
//! is answered over HTTP/1.1 on the same port, as etcd's proxy does.
//!
//! As etcd's proxy does, it refuses a client certificate (`--cert`) with a CommonName for its
//! connections to the cluster: under client certificate auth a member would take that CN as
//! the user of every call, whoever the client is.
//!
//! Flags for what is not built are refused with a message rather than ignored: `--namespace`,
//! `--resolver-prefix`/`--resolver-ttl`, `--discovery-srv`, `--metrics-addr`, the
//! `--experimental-*` flags, and message limits other than etcd's defaults.

use crate::listener::{ListenAddr, Listener};
use crate::tls::{Conn, Mode, TlsInfo};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "oxcd grpc-proxy", about = "grpc-proxy: etcd's gRPC proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the gRPC proxy.
    Start(Flags),
}

const DEFAULT_MAX_SEND_BYTES: i64 = 1536 * 1024;
const DEFAULT_MAX_RECV_BYTES: i64 = i32::MAX as i64;

/// etcd 3.4's `grpc-proxy start` flags.
#[derive(Args, Debug)]
struct Flags {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:23790")]
    listen_addr: String,
    /// Comma-separated client URLs (or host:port) of the members.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// Advertise address to register (used with --resolver-prefix).
    #[arg(long, default_value = "127.0.0.1:23790")]
    advertise_client_url: String,
    #[arg(long, default_value = "")]
    resolver_prefix: String,
    #[arg(long, default_value_t = 0)]
    resolver_ttl: i64,
    #[arg(long, default_value = "")]
    namespace: String,
    #[arg(long, default_value = "")]
    metrics_addr: String,
    #[arg(long, default_value = "")]
    discovery_srv: String,
    #[arg(long, default_value = "")]
    discovery_srv_name: String,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    insecure_discovery: bool,
    /// Where --auto-tls keeps its generated pair.
    #[arg(long, default_value = "default.proxy")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = DEFAULT_MAX_SEND_BYTES)]
    max_send_bytes: i64,
    #[arg(long, default_value_t = DEFAULT_MAX_RECV_BYTES)]
    max_recv_bytes: i64,
    /// Client certificate for the connections to the members (its CommonName must be empty).
    #[arg(long, default_value = "")]
    cert: String,
    #[arg(long, default_value = "")]
    key: String,
    /// CA bundle that verifies the members' certificates.
    #[arg(long, default_value = "")]
    cacert: String,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    insecure_skip_tls_verify: bool,
    /// Certificate and key the proxy serves its clients with.
    #[arg(long, default_value = "")]
    cert_file: String,
    #[arg(long, default_value = "")]
    key_file: String,
    /// CA bundle that verifies the proxy's clients' certificates.
    #[arg(long, default_value = "")]
    trusted_ca_file: String,
    #[arg(long, value_delimiter = ',')]
    listen_cipher_suites: Vec<String>,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    auto_tls: bool,
    #[arg(long, default_value = "")]
    client_crl_file: String,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    experimental_serializable_ordering: bool,
    #[arg(long, default_value = "")]
    experimental_leasing_prefix: String,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    debug: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    enable_pprof: bool,
    #[arg(long, default_value_t = u32::MAX)]
    max_concurrent_streams: u32,
    /// How often to refresh the members' client URLs from the cluster's member list (a
    /// duration; 0 never does).
    #[arg(long, default_value = "0s")]
    endpoints_auto_sync_interval: String,
    /// Minimum TLS version towards the proxy's clients (TLS1.2 or TLS1.3).
    #[arg(long, default_value = "")]
    tls_min_version: String,
    /// Maximum TLS version towards the proxy's clients.
    #[arg(long, default_value = "")]
    tls_max_version: String,
}

fn path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl Flags {
    /// etcd's `checkArgs`, and the flags of what oxcd's proxy does not do.
    fn check(&self) -> anyhow::Result<()> {
        if !self.resolver_prefix.is_empty() && self.resolver_ttl < 1 {
            anyhow::bail!("invalid resolver-ttl {}", self.resolver_ttl);
        }
        if self.resolver_prefix.is_empty() && self.resolver_ttl > 0 {
            anyhow::bail!("invalid resolver-prefix {:?}", self.resolver_prefix);
        }
        let unsupported = [
            (!self.namespace.is_empty(), "--namespace"),
            (!self.resolver_prefix.is_empty(), "--resolver-prefix"),
            (!self.discovery_srv.is_empty(), "--discovery-srv"),
            (!self.metrics_addr.is_empty(), "--metrics-addr"),
            (
                self.experimental_serializable_ordering,
                "--experimental-serializable-ordering",
            ),
            (
                !self.experimental_leasing_prefix.is_empty(),
                "--experimental-leasing-prefix",
            ),
            (self.enable_pprof, "--enable-pprof"),
            (
                self.max_send_bytes != DEFAULT_MAX_SEND_BYTES,
                "--max-send-bytes",
            ),
            (
                self.max_recv_bytes != DEFAULT_MAX_RECV_BYTES,
                "--max-recv-bytes",
            ),
        ];
        if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
            anyhow::bail!(
                "{flag} is not supported by oxcd's grpc-proxy, which forwards every call unchanged"
            );
        }
        Ok(())
    }

    /// TLS towards the members: etcd's `newTLS` with `EmptyCN`.
    fn cluster_tls(&self) -> anyhow::Result<Option<TlsInfo>> {
        let info = TlsInfo {
            cert_file: path(&self.cert),
            key_file: path(&self.key),
            trusted_ca_file: path(&self.cacert),
            self_signed: self.insecure_skip_tls_verify,
            ..Default::default()
        };
        if info.cert_file.is_none() && info.key_file.is_none() && info.trusted_ca_file.is_none() {
            return Ok(self.insecure_skip_tls_verify.then_some(info));
        }
        if let Some(cert) = &info.cert_file {
            if let Some(cn) = common_name(cert)? {
                anyhow::bail!("cert has non empty Common Name ({cn})");
            }
        }
        Ok(Some(info))
    }

    /// TLS towards the proxy's clients.
    fn serving_tls(&self) -> anyhow::Result<Option<TlsInfo>> {
        let mut info = TlsInfo {
            cert_file: path(&self.cert_file),
            key_file: path(&self.key_file),
            trusted_ca_file: path(&self.trusted_ca_file),
            crl_file: path(&self.client_crl_file),
            cipher_suites: self.listen_cipher_suites.clone(),
            ..Default::default()
        };
        info.client_cert_auth = info.trusted_ca_file.is_some();
        info.only_version = crate::tls::versions_from_flags(
            &self.tls_min_version,
            &self.tls_max_version,
            &self.listen_cipher_suites,
        )
        .map_err(anyhow::Error::msg)?;
        if info.is_empty() && info.trusted_ca_file.is_none() {
            if !self.auto_tls {
                return Ok(None);
            }
            let dir = self.data_dir.join("fixtures").join("proxy");
            let (cert, key) =
                crate::tls::self_signed(&dir, &[format!("https://{}", self.listen_addr)])?;
            info.cert_file = Some(cert);
            info.key_file = Some(key);
            info.self_signed = true;
        }
        crate::tls::check_cipher_suites(&info.cipher_suites).map_err(anyhow::Error::msg)?;
        Ok(Some(info))
    }
}

/// The CommonName of the first certificate in a PEM file.
fn common_name(file: &std::path::Path) -> anyhow::Result<Option<String>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .find(|cn| !cn.is_empty())
        .map(str::to_string);
    Ok(cn)
}

/// The members, and the connection to the one in use.
struct Cluster {
    /// Client URLs of the members (refreshed by `--endpoints-auto-sync-interval`).
    urls: parking_lot::RwLock<Vec<String>>,
    tls: TlsInfo,
    current: tokio::sync::Mutex<Option<(usize, tonic::transport::Channel)>>,
    /// The member to try first when connecting.
    next: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    fn new(endpoints: &[String], tls: Option<TlsInfo>) -> anyhow::Result<Cluster> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        if urls.is_empty() {
            anyhow::bail!("no endpoints to proxy to");
        }
        Ok(Cluster {
            urls: parking_lot::RwLock::new(urls),
            tls: tls.unwrap_or_default(),
            current: tokio::sync::Mutex::new(None),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The connection in use, or one to the first member (after the last one that failed)
    /// that accepts one.
    async fn channel(&self) -> Result<(usize, tonic::transport::Channel), tonic::Status> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let mut errors = Vec::new();
        let urls = self.urls.read().clone();
        let first = self.next.load(std::sync::atomic::Ordering::Relaxed);
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            let url = &urls[i];
            match crate::tls::client_url_channel(url, &self.tls, Duration::from_secs(5)).await {
                Ok(ch) => {
                    tracing::info!(endpoint = %url, "connected to a member");
                    *current = Some((i, ch.clone()));
                    return Ok((i, ch));
                }
                Err(e) => errors.push(e),
            }
        }
        Err(tonic::Status::unavailable(format!(
            "no member reachable: {}",
            errors.join("; ")
        )))
    }

    /// Drops the connection to member `i` after it failed; the next connection tries the
    /// members after it first.
    async fn failed(&self, i: usize) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(c, _)| *c == i) {
            *current = None;
            let urls = self.urls.read();
            self.next.store(
                (i + 1) % urls.len().max(1),
                std::sync::atomic::Ordering::Relaxed,
            );
            let url = urls.get(i).cloned().unwrap_or_default();
            tracing::warn!(endpoint = %url, "member failed; switching");
        }
    }

    /// etcd's `--endpoints-auto-sync-interval`: the members' client URLs from the member
    /// list, through the member in use, every `every`.
    async fn auto_sync(self: Arc<Self>, every: Duration) {
        use crate::pb::etcdserverpb::{cluster_client::ClusterClient, MemberListRequest};
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Ok((i, channel)) = self.channel().await else {
                continue;
            };
            let resp = ClusterClient::new(channel)
                .member_list(MemberListRequest {
                    linearizable: false,
                })
                .await;
            let members = match resp {
                Ok(r) => r.into_inner().members,
                Err(e) => {
                    tracing::warn!(error = %e, "endpoint auto-sync failed");
                    self.failed(i).await;
                    continue;
                }
            };
            let mut fresh: Vec<String> = members.into_iter().flat_map(|m| m.client_ur_ls).collect();
            fresh.sort();
            fresh.dedup();
            if fresh.is_empty() {
                continue;
            }
            // Some(the new place of the member in use, if still a member) when changed.
            let changed = {
                let mut urls = self.urls.write();
                let mut old = urls.clone();
                old.sort();
                (old != fresh).then(|| {
                    tracing::info!(endpoints = ?fresh, "resolved endpoints from the member list");
                    let in_use = urls.get(i).cloned();
                    *urls = fresh;
                    in_use.and_then(|u| urls.iter().position(|x| *x == u))
                })
            };
            if let Some(still) = changed {
                let mut current = self.current.lock().await;
                match (still, current.as_mut()) {
                    (Some(pos), Some((c, _))) => *c = pos,
                    (None, _) => *current = None,
                    _ => {}
                }
            }
        }
    }

    /// Forwards one gRPC call as it came.
    async fn forward(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<tonic::body::Body> {
        let (i, channel) = match self.channel().await {
            Ok(c) => c,
            Err(status) => return status.into_http(),
        };
        let req = req.map(tonic::body::Body::new);
        match tower::ServiceExt::oneshot(channel, req).await {
            Ok(resp) => resp,
            Err(e) => {
                self.failed(i).await;
                tonic::Status::unavailable(format!("proxy: {e}")).into_http()
            }
        }
    }

    /// etcd's proxy health: a read through the cluster answers (permission denied counts).
    async fn healthy(&self) -> bool {
        use crate::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
        let Ok((i, channel)) = self.channel().await else {
            return false;
        };
        let mut kv = KvClient::new(channel);
        let read = kv.range(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        });
        match tokio::time::timeout(Duration::from_secs(1), read).await {
            Ok(Ok(_)) => true,
            Ok(Err(s)) if s.message() == "etcdserver: permission denied" => true,
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                self.failed(i).await;
                false
            }
            _ => false,
        }
    }
}

type HttpBody = http_body_util::Full<bytes::Bytes>;

async fn health(
    cluster: &Cluster,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<HttpBody> {
    let respond = |status: u16, body: &str| {
        http::Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(HttpBody::from(body.to_string()))
            .unwrap_or_default()
    };
    // etcd's grpc-proxy answers its own health on /proxy/health, the same check as /health.
    if !matches!(req.uri().path(), "/health" | "/proxy/health") {
        return respond(404, "404 page not found\n");
    }
    if cluster.healthy().await {
        respond(200, r#"{"health":"true"}"#)
    } else {
        respond(503, r#"{"health":"false"}"#)
    }
}

/// One client connection: HTTP/2 is gRPC (by ALPN under TLS, by the preface otherwise), and
/// anything else HTTP/1.1.
async fn serve_connection(cluster: Arc<Cluster>, conn: Conn, max_streams: u32) {
    let h2 = match &conn {
        Conn::Plain(s) => crate::api::starts_with_http2_preface(s)
            .await
            .unwrap_or(false),
        tls => tls.negotiated_h2().unwrap_or(false),
    };
    let io = hyper_util::rt::TokioIo::new(conn);
    if h2 {
        let c = cluster.clone();
        let svc = hyper::service::service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, std::convert::Infallible>(c.forward(req).await) }
        });
        let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(max_streams)
            .max_header_list_size(crate::api::limits::MAX_HEADER_LIST_BYTES)
            .serve_connection(io, svc)
            .await;
        if let Err(e) = served {
            tracing::debug!(error = %e, "client connection ended");
        }
    } else {
        let svc = hyper::service::service_fn(move |req| {
            let c = cluster.clone();
            async move { Ok::<_, std::convert::Infallible>(health(&c, &req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(crate::api::limits::MAX_HTTP1_HEAD_BYTES)
            .serve_connection(io, svc)
            .await;
    }
}

/// `oxcd grpc-proxy ...`; `args` is the whole command line.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let Command::Start(flags) = Cli::parse_from(args.into_iter().skip(1)).command;
    flags.check()?;
    crate::log::init(
        if flags.debug { "debug" } else { "info" },
        false,
        crate::log::Output::Stderr,
    );
    let cluster = Arc::new(Cluster::new(&flags.endpoints, flags.cluster_tls()?)?);
    let auto_sync = crate::duration::parse_go_duration(&flags.endpoints_auto_sync_interval)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "invalid --endpoints-auto-sync-interval {:?}",
                flags.endpoints_auto_sync_interval
            )
        })?;
    let serving = flags.serving_tls()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(flags.listen_addr.as_str())?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--listen-addr {:?} names no address", flags.listen_addr))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mode = Arc::new(match &serving {
            Some(info) => Mode::Tls(Arc::new(crate::tls::Acceptor::new(info.clone())?)),
            None => Mode::Plain,
        });
        let listener = Listener::bind(&ListenAddr::Tcp(addr)).await?;
        if !auto_sync.is_zero() {
            tokio::spawn(cluster.clone().auto_sync(auto_sync));
        }
        tracing::info!(address = %flags.listen_addr, "listening for gRPC proxy client requests");
        tracing::info!(address = %flags.listen_addr, "started gRPC proxy");
        loop {
            let socket = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (cluster, mode) = (cluster.clone(), mode.clone());
            let max_streams = flags.max_concurrent_streams;
            tokio::spawn(async move {
                if let Ok(conn) = mode.establish(socket).await {
                    serve_connection(cluster, conn, max_streams).await;
                }
            });
        }
    })
}
