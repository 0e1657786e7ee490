//! The operator's etcd side: observing a cluster over the v3 API and performing membership
//! actions. Speaks only the etcd v3 API (etcd-client), so it works against oxcd and etcd alike.

use crate::crd::MemberStatus;
use crate::decide::{EtcdObs, MemberObs};
use crate::resources::Names;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, MemberAddOptions, TlsOptions};
use std::collections::BTreeMap;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Status of one member; a member slower than this counts as unhealthy.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no member reachable at {0:?}")]
    Unreachable(Vec<String>),
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("member {0:x} has no client URL")]
    NoClientUrl(u64),
}

/// Outcome of an etcd action the cluster may refuse for now.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// etcd said not yet (e.g. a learner not caught up); try again later.
    NotYet(String),
}

/// What the operator saw of the cluster: the decision's input and the status' members.
pub struct View {
    pub obs: EtcdObs,
    pub members: Vec<MemberStatus>,
}

/// How the operator reaches the members: in plain text, or over TLS trusting the cluster's CA
/// and presenting the operator's own certificate when the members ask for one.
#[derive(Clone, Debug, Default)]
pub struct Access {
    tls: Option<TlsOptions>,
}

impl Access {
    pub fn plain() -> Access {
        Access::default()
    }

    /// `ca`: PEM of the CA that signed the members' client certificates; `identity`: the
    /// operator's certificate and key (PEM).
    pub fn tls(ca: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>) -> Access {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Access { tls: Some(tls) }
    }

    pub async fn connect(&self, endpoints: &[String]) -> Result<Client, EtcdError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.clone());
        }
        tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| EtcdError::Unreachable(endpoints.to_vec()))?
            .map_err(EtcdError::from)
    }
}

/// Member list plus each member's own Status. None-free: an error means nobody answered.
pub async fn observe(
    access: &Access,
    names: &Names,
    endpoints: &[String],
) -> Result<View, EtcdError> {
    if endpoints.is_empty() {
        return Err(EtcdError::Unreachable(vec![]));
    }
    // One member at a time: a member that is restarting must not make the cluster look gone.
    let mut list = None;
    let mut last_err = EtcdError::Unreachable(endpoints.to_vec());
    for ep in endpoints {
        let attempt = async {
            let mut client = access.connect(std::slice::from_ref(ep)).await?;
            Ok::<_, EtcdError>(client.member_list().await?)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(l)) => {
                list = Some(l);
                break;
            }
            Ok(Err(e)) => last_err = e,
            Err(_) => last_err = EtcdError::Timeout("MemberList"),
        }
    }
    let Some(list) = list else {
        return Err(last_err);
    };
    let mut obs = EtcdObs {
        leader: None,
        members: Vec::new(),
    };
    let mut statuses = Vec::new();
    let mut leader_votes: BTreeMap<u64, usize> = BTreeMap::new();
    let checks = list.members().iter().map(|m| {
        let url = m.client_urls().first().cloned();
        async move {
            match url {
                Some(url) => member_status(access, &url).await.ok(),
                None => None,
            }
        }
    });
    let results = futures::future::join_all(checks).await;
    for (m, status) in list.members().iter().zip(results) {
        let ordinal = m
            .peer_urls()
            .first()
            .and_then(|u| names.ordinal_of_peer_url(u));
        let healthy = status
            .as_ref()
            .is_some_and(|s| s.leader() != 0 && s.errors().is_empty());
        if let Some(s) = &status {
            if s.leader() != 0 {
                *leader_votes.entry(s.leader()).or_default() += 1;
            }
        }
        obs.members.push(MemberObs {
            id: m.id(),
            ordinal,
            started: !m.name().is_empty(),
            learner: m.is_learner(),
            healthy,
        });
        statuses.push(MemberStatus {
            name: if m.name().is_empty() {
                ordinal.map(|k| names.pod(k)).unwrap_or_default()
            } else {
                m.name().to_string()
            },
            id: format!("{:x}", m.id()),
            client_url: m.client_urls().first().cloned().unwrap_or_default(),
            peer_url: m.peer_urls().first().cloned().unwrap_or_default(),
            learner: m.is_learner(),
            leader: false,
            healthy,
            version: status.as_ref().map(|s| s.version().to_string()),
            raft_index: status.as_ref().map(|s| s.raft_index()),
            db_size: status.as_ref().map(|s| s.db_size()),
        });
    }
    // The leader most members name (they agree unless an election is under way).
    obs.leader = leader_votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| id)
        .filter(|id| obs.members.iter().any(|m| m.id == *id));
    statuses.sort_by(|a, b| a.name.cmp(&b.name));
    for s in &mut statuses {
        s.leader = obs.leader.is_some_and(|l| format!("{l:x}") == s.id);
    }
    Ok(View {
        obs,
        members: statuses,
    })
}

async fn member_status(
    access: &Access,
    url: &str,
) -> Result<etcd_client::StatusResponse, EtcdError> {
    let probe = async {
        let mut c = access.connect(&[url.to_string()]).await?;
        Ok::<_, EtcdError>(c.status().await?)
    };
    tokio::time::timeout(STATUS_TIMEOUT, probe)
        .await
        .map_err(|_| EtcdError::Timeout("Status"))?
}

pub async fn add_learner(client: &mut Client, peer_url: &str) -> Result<u64, EtcdError> {
    let resp = client
        .member_add([peer_url], Some(MemberAddOptions::new().with_is_learner()))
        .await?;
    Ok(resp.member().map(|m| m.id()).unwrap_or_default())
}

pub async fn promote(client: &mut Client, id: u64) -> Result<Outcome, EtcdError> {
    match client.member_promote(id).await {
        Ok(_) => Ok(Outcome::Done),
        // etcd: "can only promote a learner member which is in sync with leader".
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("in sync with leader") => {
            Ok(Outcome::NotYet(s.message().to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn remove(client: &mut Client, id: u64) -> Result<Outcome, EtcdError> {
    match client.member_remove(id).await {
        Ok(_) => Ok(Outcome::Done),
        // Removed already (an earlier reconcile got this far before it was interrupted).
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("member not found") => {
            Ok(Outcome::Done)
        }
        Err(etcd_client::Error::GRpcStatus(s))
            if s.message().contains("unhealthy cluster")
                || s.message().contains("not enough started members") =>
        {
            Ok(Outcome::NotYet(s.message().to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// MoveLeader must be served by the leader itself.
pub async fn move_leader(access: &Access, leader_url: &str, to: u64) -> Result<(), EtcdError> {
    let mut c = access.connect(&[leader_url.to_string()]).await?;
    tokio::time::timeout(REQUEST_TIMEOUT * 2, c.move_leader(to))
        .await
        .map_err(|_| EtcdError::Timeout("MoveLeader"))??;
    Ok(())
}
