//! Test fixtures shared by the operator's unit tests: an `EtcdCluster` from a spec, and the
//! observation of a healthy cluster that each decision test starts from.

use crate::crd::EtcdCluster;
use crate::decide::{Bootstrap, ClusterState, EtcdObs, MemberObs, Observed, PodObs, VolumeObs};

/// An `EtcdCluster` named `demo` in namespace `prod` with this spec.
pub fn example(spec: serde_json::Value) -> EtcdCluster {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "oxcd.io/v1alpha1", "kind": "EtcdCluster",
        "metadata": {"name": "demo", "namespace": "prod", "uid": "1f2e3d4c-aaaa-bbbb-cccc-000000000000"},
        "spec": spec,
    }))
    .unwrap()
}

pub const NEW: &str = "template-2";
pub const OLD: &str = "template-1";

pub fn id(k: u32) -> u64 {
    0x1000 + k as u64
}

/// A healthy cluster of `n` members (ordinals 0..n), member 0 leading, all current.
pub fn healthy(n: u32) -> Observed {
    Observed {
        desired_replicas: n,
        desired_template: NEW.into(),
        preferred_leader: None,
        statefulset_replicas: Some(n),
        bootstrap: Some(Bootstrap {
            state: ClusterState::Existing,
            members: (0..n).collect(),
        }),
        pods: (0..n)
            .map(|k| {
                let pod = PodObs {
                    template: NEW.into(),
                    ready: true,
                    terminating: false,
                    age_secs: 1000,
                    lost_member: None,
                };
                (k, pod)
            })
            .collect(),
        volumes: (0..n)
            .map(|k| {
                (
                    k,
                    VolumeObs {
                        member_id: Some(id(k)),
                    },
                )
            })
            .collect(),
        etcd: Some(EtcdObs {
            leader: Some(id(0)),
            members: (0..n).map(member).collect(),
        }),
    }
}

pub fn member(k: u32) -> MemberObs {
    MemberObs {
        id: id(k),
        ordinal: Some(k),
        started: true,
        learner: false,
        healthy: true,
    }
}
