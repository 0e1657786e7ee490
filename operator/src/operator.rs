//! The operator process: logging, leader election between replicas, the health and metrics
//! endpoint, and one controller per watched namespace (or one for all).

use crate::controller::{self, Context};
use crate::crd::EtcdCluster;
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::Api;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Namespaces to watch (repeat or comma-separate); all namespaces when absent.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "OXCD_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "OXCD_OPERATOR_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Elect one active replica through a coordination Lease.
    #[arg(long, env = "OXCD_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "oxcd-operator")]
    pub identity: String,
    /// DNS suffix after `.svc` in member addresses (e.g. `.cluster.local`).
    #[arg(long, env = "OXCD_OPERATOR_DOMAIN_SUFFIX", default_value = "")]
    pub domain_suffix: String,
    /// This operator's image: restored clusters run it as an init container.
    #[arg(long, env = "OXCD_OPERATOR_IMAGE")]
    pub operator_image: Option<String>,
}

const LEASE_NAME: &str = "oxcd-operator-leader";
const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let client = kube::Client::try_default().await?;
    let ready = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "oxcd-operator".into(),
                instance: Some(args.identity.clone()),
            },
        ),
        domain_suffix: args.domain_suffix.clone(),
        metrics: Metrics::default(),
        failpoint: std::env::var("OXCD_OPERATOR_FAILPOINT").ok(),
        operator_image: args
            .operator_image
            .clone()
            .unwrap_or_else(crate::resources::default_operator_image),
    });
    tokio::spawn(serve_http(args.http_addr, ctx.clone(), ready.clone()));

    if args.leader_election {
        let leases = Api::<Lease>::namespaced(client.clone(), &args.lease_namespace);
        tracing::info!(identity = %args.identity, "waiting to become leader");
        while !try_lead(&leases, &args.identity).await {
            tokio::time::sleep(RENEW_EVERY).await;
        }
        tracing::info!(identity = %args.identity, "became leader");
        let identity = args.identity.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if !try_lead(&leases, &identity).await {
                    // Another replica may act now; stop at once rather than act twice.
                    tracing::error!("lost the leader lease; exiting");
                    std::process::exit(1);
                }
            }
        });
    }
    ready.store(true, Ordering::Relaxed);

    let namespaces: Vec<Option<String>> = if args.namespaces.is_empty() {
        vec![None]
    } else {
        args.namespaces.iter().cloned().map(Some).collect()
    };
    let controllers = namespaces.into_iter().map(|ns| {
        let (clusters, sets, configs) = match &ns {
            Some(ns) => (
                Api::<EtcdCluster>::namespaced(client.clone(), ns),
                Api::<StatefulSet>::namespaced(client.clone(), ns),
                Api::<ConfigMap>::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
        let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=oxcd-operator");
        Controller::new(clusters, watcher::Config::default())
            .owns(sets, owned.clone())
            .owns(configs, owned)
            .shutdown_on_signal()
            .run(controller::reconcile, controller::error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "controller event");
                }
            })
    });
    futures::future::join_all(controllers).await;
    tracing::info!("shut down");
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Takes or renews the leader Lease; false when another holder's lease is still valid or the
/// update lost a race (the API server's resourceVersion check decides).
async fn try_lead(leases: &Api<Lease>, identity: &str) -> bool {
    let now = jiff::Timestamp::now();
    let current = match leases.get_opt(LEASE_NAME).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "reading the leader lease failed");
            return false;
        }
    };
    let mut lease = current.clone().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(LEASE_NAME.into()),
            ..Default::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let secs = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        now.as_second() > t.0.as_second() + secs
    });
    if holder != identity && !holder.is_empty() && !expired {
        return false;
    }
    if holder != identity {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(identity.to_string());
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    let result = match current {
        Some(_) => {
            leases
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
        }
        None => leases.create(&PostParams::default(), &lease).await,
    };
    match result {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(error = %e, "leader lease not taken");
            false
        }
    }
}

/// /healthz (alive), /readyz (leading, or on standby when leader election is off), /metrics.
async fn serve_http(addr: SocketAddr, ctx: Arc<Context>, ready: Arc<AtomicBool>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve /healthz and /metrics");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = match req.uri().path() {
                        "/healthz" | "/livez" => (200, "ok\n".to_string()),
                        "/readyz" if ready.load(Ordering::Relaxed) => (200, "ok\n".to_string()),
                        "/readyz" => (503, "not leading yet\n".to_string()),
                        "/metrics" => (200, ctx.metrics.render()),
                        _ => (404, "404 page not found\n".to_string()),
                    };
                    let mut resp =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
