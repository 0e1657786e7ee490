//! oxcd-operator: reconciles `EtcdCluster` resources into StatefulSets of oxcd members.
//!
//! Each reconcile observes (`observe`), takes one pure decision (`decide`) and performs that
//! one action (`act`). `docs/OPERATOR.md` explains every action and its safety rule.

pub mod backup;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod etcd;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod operator;
pub mod resources;
pub mod restore;
pub mod status;
