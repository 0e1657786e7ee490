//! The `oxcd` binary: an etcd-compatible server.

use oxcd::config::Flags;
use oxcd::etcdserver::EtcdServer;

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
    // Registered before anything else runs: a stop that arrives while the member bootstraps, or
    // just after it says it is ready, must not be lost (nor ignored, when the parent started us
    // with SIGINT ignored, as shells do for background jobs).
    let stop = match watch_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("oxcd: cannot watch for stop signals: {e}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut stopped = stop.clone();
        let started = async {
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
            (server, tasks)
        };
        let (server, mut tasks) = tokio::select! {
            s = started => s,
            _ = stopped.wait_for(|s| *s) => {
                // Not serving yet: nothing to hand over.
                tracing::info!("received signal before serving; shutting down");
                return Ok(());
            }
        };
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
            tasks.push(tokio::spawn(oxcd::api::http::serve_metrics(
                server.clone(),
                addr,
            )));
        }
        let mut stopped = stop;
        tokio::select! {
            r = futures::future::select_all(tasks) => {
                if let (Ok(Err(e)), _, _) = r {
                    eprintln!("oxcd: client listener failed: {e:#}");
                    std::process::exit(1);
                }
            }
            _ = stopped.wait_for(|s| *s) => {
                tracing::info!("received signal; shutting down");
                server.transfer_leadership().await;
            }
        }
        Ok(())
    })
}

/// How long a graceful stop (handing leadership over) may take before the process exits anyway.
const GRACEFUL_STOP: std::time::Duration = std::time::Duration::from_secs(15);

/// Watches for SIGINT and SIGTERM (what a pod's stop sends), on which etcd stops gracefully, on a
/// thread and runtime of its own, so that a signal is seen even while the server's runtime is
/// busy. The returned channel turns true on the first signal; if the process has not exited
/// `GRACEFUL_STOP` later (or on a second signal), it exits from here.
fn watch_stop_signals() -> std::io::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _in_runtime = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                let _ = tx.send(true);
                tokio::select! {
                    _ = tokio::time::sleep(GRACEFUL_STOP) => {
                        tracing::warn!(timeout = ?GRACEFUL_STOP, "graceful stop did not finish; exiting");
                    }
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                std::process::exit(0);
            })
        })?;
    Ok(rx)
}
