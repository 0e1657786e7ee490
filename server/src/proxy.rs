//! `oxcd gateway start`: etcd's gateway, a TCP proxy in front of a cluster's client URLs (etcd's
//! `proxy/tcpproxy`). Clients talk to one local address; each connection is relayed to a
//! member, and a member that refuses a connection is skipped until `--retry-delay` has passed.
//! It forwards bytes only, so gRPC, the JSON gateway and TLS all pass through unchanged.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "oxcd gateway",
    about = "gateway: a TCP proxy to the members of a cluster"
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the gateway.
    Start,
}

/// etcd's `gateway` flags (they may come before or after `start`).
#[derive(Args, Debug)]
struct Flags {
    /// Listen address.
    #[arg(long, global = true, default_value = "127.0.0.1:23790")]
    listen_addr: String,
    /// Comma-separated client URLs (or host:port) of the members.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    endpoints: Vec<String>,
    /// How long a member that refused a connection is skipped (Go duration: 1m, 30s, 500ms).
    #[arg(long, global = true, default_value = "1m0s")]
    retry_delay: String,
    /// DNS discovery is not supported: listing the endpoints is.
    #[arg(long, global = true, default_value = "")]
    discovery_srv: String,
}

/// A member to relay to, and until when it is skipped after refusing a connection.
struct Remote {
    addr: String,
    down_until: parking_lot::Mutex<Option<Instant>>,
}

struct Gateway {
    remotes: Vec<Remote>,
    next: AtomicUsize,
    retry_delay: Duration,
}

/// `oxcd gateway ...`; `args` is the whole command line.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args.into_iter().skip(1));
    let Command::Start = cli.command;
    if !cli.flags.discovery_srv.is_empty() {
        anyhow::bail!("--discovery-srv is not supported; list the members with --endpoints");
    }
    let retry_delay =
        crate::duration::parse_go_duration(&cli.flags.retry_delay).ok_or_else(|| {
            anyhow::anyhow!(
                "--retry-delay {:?} is not a duration",
                cli.flags.retry_delay
            )
        })?;
    let remotes: Vec<Remote> = cli
        .flags
        .endpoints
        .iter()
        .filter(|e| !e.is_empty())
        .map(|e| Remote {
            addr: strip_scheme(e),
            down_until: parking_lot::Mutex::new(None),
        })
        .collect();
    if remotes.is_empty() {
        anyhow::bail!("no endpoints to proxy to");
    }
    crate::log::init("info", false, crate::log::Output::Stderr);
    let gw = Arc::new(Gateway {
        remotes,
        next: AtomicUsize::new(0),
        retry_delay,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cli.flags.listen_addr).await?;
        crate::listener::widen_backlog(std::os::fd::AsRawFd::as_raw_fd(&listener))?;
        let endpoints: Vec<&str> = gw.remotes.iter().map(|r| r.addr.as_str()).collect();
        tracing::info!(address = %cli.flags.listen_addr, ?endpoints, "ready to proxy client requests");
        loop {
            let (conn, from) = listener.accept().await?;
            let gw = gw.clone();
            tokio::spawn(async move { gw.relay(conn, from).await });
        }
    })
}

/// `http://host:port` -> `host:port`, as etcd's gateway takes either.
fn strip_scheme(endpoint: &str) -> String {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    rest.trim_end_matches('/').to_string()
}

impl Gateway {
    /// Relays one client connection to the first member, in round-robin order, that accepts.
    async fn relay(&self, mut client: tokio::net::TcpStream, from: SocketAddr) {
        let n = self.remotes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let remote = &self.remotes[(start + i) % n];
            if remote.down_until.lock().is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let dial = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(&remote.addr),
            )
            .await;
            match dial {
                Ok(Ok(mut member)) => {
                    *remote.down_until.lock() = None;
                    let _ = member.set_nodelay(true);
                    let _ = client.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut member).await;
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(remote = %remote.addr, error = %e, "failed to connect, skipping it for the retry delay");
                }
                Err(_) => {
                    tracing::warn!(remote = %remote.addr, "connect timed out, skipping it for the retry delay");
                }
            }
            *remote.down_until.lock() = Some(Instant::now() + self.retry_delay);
        }
        tracing::warn!(client = %from, "no member accepts connections; closing the client's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_urls_or_addresses() {
        assert_eq!(strip_scheme("http://127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(strip_scheme("https://m1.example:2379/"), "m1.example:2379");
        assert_eq!(strip_scheme("127.0.0.1:2379"), "127.0.0.1:2379");
    }

    #[test]
    fn flags_may_come_before_or_after_start() {
        let a = Cli::parse_from(["gateway", "--endpoints=a:1,b:2", "start"]);
        let b = Cli::parse_from(["gateway", "start", "--endpoints", "a:1,b:2"]);
        assert_eq!(a.flags.endpoints, ["a:1", "b:2"]);
        assert_eq!(b.flags.endpoints, a.flags.endpoints);
        assert_eq!(a.flags.listen_addr, "127.0.0.1:23790");
    }
}
