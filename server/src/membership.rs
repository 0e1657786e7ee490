//! Membership: member and cluster identity derived exactly as etcd derives them, and the
//! replicated member list (changed only by applied Raft entries, so every member agrees).

pub use crate::pb::etcdserverpb::Member;
use crate::pb::oxcdpb::ConfChangeContext;
use crate::schema::{MEMBER_PREFIX, REMOVED_PREFIX};
use prost::Message;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType};
use sha1::{Digest, Sha1};
use std::collections::{BTreeMap, BTreeSet};

/// etcd's `NewMember`: sha1 over the sorted peer URLs, the cluster token and, for members
/// added at run time, the time of the request.
pub fn member_id(peer_urls: &[String], token: &str, unix_time: Option<i64>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    for u in &urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
    if let Some(t) = unix_time {
        h.update(t.to_string().as_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

/// etcd's `genID`: sha1 over the sorted member IDs, big-endian.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

pub fn record_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The member list as of the applied index.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    members: BTreeMap<u64, Member>,
    removed: BTreeSet<u64>,
}

/// A backend record change that must be written with the entry that caused it.
pub enum RecordChange {
    Put(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

impl Membership {
    /// The member list as the backend holds it (on start, and after a snapshot is installed).
    pub fn load(store: &crate::mvcc::Store) -> crate::mvcc::Result<Self> {
        Ok(Self::from_records(
            &store.records(MEMBER_PREFIX)?,
            &store.records(REMOVED_PREFIX)?,
        ))
    }

    pub fn from_records(members: &[(Vec<u8>, Vec<u8>)], removed: &[(Vec<u8>, Vec<u8>)]) -> Self {
        let mut m = Membership::default();
        for (_, v) in members {
            if let Ok(mem) = Member::decode(v.as_slice()) {
                m.members.insert(mem.id, mem);
            }
        }
        for (k, _) in removed {
            if let Some(id) = k
                .get(REMOVED_PREFIX.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            {
                m.removed.insert(id);
            }
        }
        m
    }

    pub fn members(&self) -> Vec<Member> {
        self.members.values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<&Member> {
        self.members.get(&id)
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    pub fn removed(&self) -> Vec<u64> {
        self.removed.iter().copied().collect()
    }

    fn voters(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| !m.is_learner)
    }

    /// etcd's `IsStarted`: the member has published its name.
    fn started(m: &Member) -> bool {
        !m.name.is_empty()
    }

    /// etcd's `IsReadyToAddVotingMember`: after adding one voter, the started voters still
    /// make a quorum (adding a second member to a one-member cluster is allowed).
    pub fn ready_to_add_voter(&self) -> bool {
        let members = self.voters().count() + 1;
        let started = self.voters().filter(|m| Self::started(m)).count();
        (started == 1 && members == 2) || started > members / 2
    }

    /// etcd's `IsReadyToRemoveVotingMember`: without `id`, the started voters make a quorum.
    pub fn ready_to_remove_voter(&self, id: u64) -> bool {
        let rest: Vec<&Member> = self.voters().filter(|m| m.id != id).collect();
        let members = rest.len();
        let started = rest.iter().filter(|m| Self::started(m)).count();
        started > members / 2
    }

    /// etcd's `IsReadyToPromoteMember`: counting the learner as a started voter, the started
    /// voters make a quorum.
    pub fn ready_to_promote(&self) -> bool {
        let members = self.voters().count() + 1;
        let started = self.voters().filter(|m| Self::started(m)).count() + 1;
        started > members / 2
    }

    /// The member using any of these peer URLs, if one does.
    pub fn by_peer_urls(&self, urls: &[String]) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.peer_ur_ls.iter().any(|u| urls.contains(u)))
    }

    /// Adds a member, or promotes a learner (an add of an existing member as voter).
    pub fn add(&mut self, mut member: Member) -> RecordChange {
        if let Some(existing) = self.members.get(&member.id) {
            // A promotion keeps what the member already published.
            let learner = member.is_learner;
            member = existing.clone();
            member.is_learner = learner;
        }
        let rec = RecordChange::Put(record_key(MEMBER_PREFIX, member.id), member.encode_to_vec());
        self.members.insert(member.id, member);
        rec
    }

    pub fn remove(&mut self, id: u64) -> Vec<RecordChange> {
        self.members.remove(&id);
        self.removed.insert(id);
        vec![
            RecordChange::Remove(record_key(MEMBER_PREFIX, id)),
            RecordChange::Put(record_key(REMOVED_PREFIX, id), vec![]),
        ]
    }

    /// Updates a member's published attributes or peer URLs; None if it is not a member.
    pub fn update(&mut self, id: u64, f: impl FnOnce(&mut Member)) -> Option<RecordChange> {
        let m = self.members.get_mut(&id)?;
        f(m);
        Some(RecordChange::Put(
            record_key(MEMBER_PREFIX, id),
            m.encode_to_vec(),
        ))
    }
}

/// One membership change as Raft replicates it: a single change (never a joint configuration)
/// whose context carries the member and the ID of the request waiting for it (0: none).
pub fn conf_change(
    change: ConfChangeType,
    node_id: u64,
    member: Option<Member>,
    request_id: u64,
) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change);
    single.node_id = node_id;
    let mut cc = ConfChangeV2::default();
    cc.mut_changes().push(single);
    cc.context = ConfChangeContext { request_id, member }
        .encode_to_vec()
        .into();
    cc
}

/// A membership change as a log entry at `index`, `term` (bootstrap, import, recovery).
pub fn conf_change_entry(
    index: u64,
    term: u64,
    cc: &ConfChangeV2,
) -> protobuf::ProtobufResult<Entry> {
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e.index = index;
    e.term = term;
    e.data = protobuf::Message::write_to_bytes(cc)?.into();
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd_defaults() {
        // etcd 3.4 started with no flags reports member 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let id = member_id(&["http://localhost:2380".to_string()], "etcd-cluster", None);
        assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
    }

    fn member(id: u64, name: &str, learner: bool) -> Member {
        Member {
            id,
            name: name.into(),
            is_learner: learner,
            ..Default::default()
        }
    }

    #[test]
    fn reconfiguration_needs_a_started_quorum_as_in_etcd() {
        let mut m = Membership::default();
        m.add(member(1, "a", false));
        assert!(
            m.ready_to_add_voter(),
            "second member of a one-member cluster"
        );
        m.add(member(2, "", false)); // added, never started
        assert!(!m.ready_to_add_voter(), "1 started of 3 voters");
        assert!(m.ready_to_promote(), "2 of 3 counting the learner");
        assert!(
            m.ready_to_remove_voter(2),
            "removing the unstarted one leaves 1 of 1"
        );
        assert!(
            !m.ready_to_remove_voter(1),
            "removing the started one leaves 0 of 1"
        );
        m.add(member(3, "c", false));
        assert!(
            !m.ready_to_add_voter(),
            "2 started of 4 voters after the add"
        );
        assert!(m.ready_to_promote(), "3 of 4 counting the learner");
    }

    #[test]
    fn promotion_keeps_published_attributes() {
        let mut m = Membership::default();
        m.add(Member {
            id: 7,
            name: "a".into(),
            is_learner: true,
            ..Default::default()
        });
        m.add(Member {
            id: 7,
            is_learner: false,
            ..Default::default()
        });
        assert_eq!(m.get(7).unwrap().name, "a");
        assert!(!m.get(7).unwrap().is_learner);
        m.remove(7);
        assert!(m.is_removed(7) && m.get(7).is_none());
    }
}
