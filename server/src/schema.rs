//! The backend's schema: every record a member keeps beside the key space (etcd's
//! `server/storage/schema`), each key named once here. The key space itself is MVCC's
//! (`mvcc`); `snapshot::bolt` maps these records to etcd's bbolt buckets and keys.

// Member and Raft state (etcd's `meta` and `cluster` buckets).
/// This member's identity: records of this member alone, beside the replicated state. A Raft
/// snapshot never carries them to another member, and installing one keeps the receiver's
/// (etcd keeps them in its WAL metadata, outside the backend it sends).
pub const META_MEMBER_ID: &[u8] = b"m/member_id";
pub const META_CLUSTER_ID: &[u8] = b"m/cluster_id";
pub const LOCAL_RECORDS: [&[u8]; 2] = [META_MEMBER_ID, META_CLUSTER_ID];

/// The Raft configuration at the applied index (replicated state).
pub const META_CONF_STATE: &[u8] = b"m/conf_state";
/// The cluster's downgrade job (`version::Downgrade`), replicated like the key space.
pub const META_DOWNGRADE: &[u8] = b"m/downgrade";
pub const META_CONSISTENT_INDEX: &[u8] = b"m/consistent_index";
/// The Raft point of the last snapshot installed from the leader.
pub const META_SNAPSHOT_INDEX: &[u8] = b"m/snapshot_index";
pub const META_SNAPSHOT_TERM: &[u8] = b"m/snapshot_term";
pub const META_SCHEDULED_COMPACT: &[u8] = b"m/scheduled_compact_rev";
pub const META_FINISHED_COMPACT: &[u8] = b"m/finished_compact_rev";
/// Prefix of other replicated records kept beside the key space (leases, alarms, members).
pub const LEASE_PREFIX: &[u8] = b"l/";
pub const ALARM_PREFIX: &[u8] = b"a/";

// Authentication (etcd's `auth`, `authUsers` and `authRoles` buckets).
/// Backend records: `au/enabled` ([1] or [0]), `au/revision` (u64 big-endian), and one
/// authpb.User / authpb.Role per name, the encodings of etcd's `auth*` buckets.
pub const AUTH_PREFIX: &[u8] = b"au/";
pub const ENABLED_KEY: &[u8] = b"au/enabled";
pub const REVISION_KEY: &[u8] = b"au/revision";
pub const USER_PREFIX: &[u8] = b"au/u/";
pub const ROLE_PREFIX: &[u8] = b"au/r/";

// The member list (etcd's `members` and `members_removed` buckets).
/// Backend record prefixes of the member list.
pub const MEMBER_PREFIX: &[u8] = b"mem/";
pub const REMOVED_PREFIX: &[u8] = b"rmv/";
