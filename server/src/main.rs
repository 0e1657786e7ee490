//! The `oxcd` binary: an etcd-compatible server.

use oxcd::config::Flags;
use oxcd::server::EtcdServer;

// glibc's malloc spent about 12% of the gRPC threads' time under a put load (per-thread arenas
// contending and consolidating); jemalloc, as TiKV runs raft-rs with.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    oxcd::listener::raise_fd_limit();
    // Started as `etcdutl` (a link to this binary), oxcd is etcd's offline tool.
    let program = args.first().map(std::path::Path::new);
    if program
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "etcdutl")
    {
        if let Err(e) = oxcd::snapshot::cli::run_etcdutl(args) {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    // Tools: the offline backup tools, the load generator, the TCP gateway and the gRPC proxy.
    let tool: Option<fn(Vec<String>) -> anyhow::Result<()>> = match args.get(1).map(String::as_str)
    {
        Some("snapshot") => Some(oxcd::snapshot::cli::run),
        Some("benchmark") => Some(oxcd::benchmark::run),
        Some("gateway") => Some(oxcd::proxy::run),
        Some("grpc-proxy") => Some(oxcd::grpc_proxy::run),
        _ => None,
    };
    if let Some(tool) = tool {
        if let Err(e) = tool(args) {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let flags = match Flags::load() {
        Ok(f) => f,
        Err(oxcd::config::LoadError::Usage(e)) => e.exit(),
        Err(oxcd::config::LoadError::Config(e)) => {
            eprintln!("oxcd: {e}");
            std::process::exit(2);
        }
    };
    if flags.version {
        // `etcd --version`'s lines, which tools parse (etcd's e2e framework reads "etcd
        // Version:"), naming the etcd release whose behaviour oxcd matches, as Status does.
        println!("oxcd Version: {}", env!("CARGO_PKG_VERSION"));
        println!("etcd Version: {}", oxcd::version::SERVER_VERSION);
        return Ok(());
    }
    let cfg = match flags.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxcd: {e}");
            std::process::exit(2);
        }
    };
    oxcd::log::init(&cfg.log_level, cfg.log_json, cfg.log_output);
    for warning in &cfg.deprecations {
        tracing::warn!("{warning}");
    }
    cfg.log_starting();
    #[cfg(feature = "failpoints")]
    if let Err(e) = oxcd::failpoint::start() {
        eprintln!("oxcd: failpoints: {e}");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = match EtcdServer::start(cfg.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "failed to start");
                eprintln!("oxcd: failed to start: {e:#}");
                std::process::exit(1);
            }
        };
        if cfg.initial_corrupt_check {
            if let Err(e) = oxcd::corrupt::initial_check(&server).await {
                tracing::error!(error = %e, "initial corruption check failed");
                eprintln!("oxcd: {e:#}");
                std::process::exit(1);
            }
        }
        let mut tasks = Vec::new();
        for addr in cfg.listen_peer.clone() {
            tasks.push(tokio::spawn(oxcd::api::peer::serve(server.clone(), addr)));
        }
        // Like etcd, clients are served once this member is in the member list with its
        // name and client URLs.
        server.ready().await;
        // etcd serves gRPC and HTTP on each client URL, unless HTTP has URLs of its own.
        let grpc_serves = if cfg.listen_client_http.is_empty() {
            oxcd::api::Serves::Both
        } else {
            oxcd::api::Serves::GrpcOnly
        };
        for addr in cfg.listen_client.clone() {
            tasks.push(tokio::spawn(oxcd::api::serve(
                server.clone(),
                addr,
                grpc_serves,
            )));
        }
        for addr in cfg.listen_client_http.clone() {
            let serves = oxcd::api::Serves::HttpOnly;
            tasks.push(tokio::spawn(oxcd::api::serve(server.clone(), addr, serves)));
        }
        if let Some(interval) = cfg.corrupt_check_interval {
            tokio::spawn(oxcd::corrupt::periodic_check(server.clone(), interval));
        }
        for addr in cfg.listen_metrics.clone() {
            tasks.push(tokio::spawn(oxcd::http::serve_metrics(
                server.clone(),
                addr,
            )));
        }
        tokio::select! {
            r = futures::future::select_all(tasks) => {
                if let (Ok(Err(e)), _, _) = r {
                    eprintln!("oxcd: client listener failed: {e:#}");
                    std::process::exit(1);
                }
            }
            _ = stop_signal() => {
                tracing::info!("received signal; shutting down");
                server.transfer_leadership().await;
            }
        }
        Ok(())
    })
}

/// SIGINT or SIGTERM (what a pod's stop sends), on which etcd stops gracefully.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
