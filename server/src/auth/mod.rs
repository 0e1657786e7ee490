//! etcd's auth store (`auth/store.go`): users, roles and their key permissions, whether auth
//! is enabled, and the auth revision, all replicated through Raft and kept as backend records
//! beside the key space. Every member applies the same changes, so every member answers
//! permission checks alike.
//!
//! Passwords are bcrypt hashes; hashing and checking happen before a request is proposed,
//! never while applying.

mod perms;
pub mod token;

use crate::error::{EtcdError, Result};
use crate::membership::RecordChange;
use crate::pb::authpb::{permission::Type as PermType, Permission, Role, User, UserAddOptions};
use crate::schema::{ENABLED_KEY, REVISION_KEY, ROLE_PREFIX, USER_PREFIX};
use parking_lot::RwLock;
use perms::UnifiedPerms;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
pub use token::Tokens;

const ROOT: &str = "root";

/// Who a request comes from, as a token or client certificate tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    /// The auth revision the credentials were issued at (0: no credentials).
    pub revision: u64,
}

/// What a client request carries that says who sent it: the `token` (or `authorization`)
/// metadata, and the CommonName of its verified client certificate.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub token: Option<String>,
    pub common_name: Option<String>,
}

impl Caller {
    /// A token as sent (gRPC metadata or the gateway's `Authorization`). A token is bytes to
    /// etcd: one that is not text is an invalid token, never no token.
    pub fn token_text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        // Calls made inside the server for a client (lock, election) carry that client's.
        if let Some(c) = req.extensions().get::<Caller>() {
            return c.clone();
        }
        let md = req.metadata();
        let token = md
            .get("token")
            .or_else(|| md.get("authorization"))
            .map(|v| Caller::token_text(v.as_bytes()));
        let common_name = req
            .extensions()
            .get::<crate::tls::ClientInfo>()
            .and_then(|i| i.common_name.clone());
        Caller { token, common_name }
    }
}

#[derive(Default, Clone)]
struct State {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    perms: HashMap<String, UnifiedPerms>,
}

impl State {
    fn refresh_perms(&mut self) {
        let roles = &self.roles;
        self.perms = self
            .users
            .iter()
            .map(|(n, u)| (n.clone(), UnifiedPerms::merge(u, |r| roles.get(r).cloned())))
            .collect();
    }
}

fn has_root_role(u: &User) -> bool {
    u.roles.binary_search_by(|r| r.as_str().cmp(ROOT)).is_ok()
}

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

pub struct AuthStore {
    state: RwLock<State>,
    pub tokens: Tokens,
    bcrypt_cost: u32,
}

/// The record changes one applied auth request makes, to be written with its entry.
pub type Changes = Vec<RecordChange>;

/// `--bcrypt-cost` as used: etcd falls back to bcrypt's default for a cost out of bcrypt's
/// range.
pub fn effective_bcrypt_cost(flag: u32) -> u32 {
    if (4..=31).contains(&flag) {
        flag
    } else {
        bcrypt::DEFAULT_COST
    }
}

/// A bcrypt hash as etcd stores it. Go's bcrypt writes "$2a$": keep backends interchangeable
/// with etcd's.
pub fn hash_password(password: &str, cost: u32) -> Result<Vec<u8>> {
    let h =
        bcrypt::hash_with_result(password, cost).map_err(|e| EtcdError::Internal(e.to_string()))?;
    Ok(h.format_for_version(bcrypt::Version::TwoA).into_bytes())
}

impl AuthStore {
    pub fn new(tokens: Tokens, bcrypt_cost: u32) -> Self {
        let bcrypt_cost = effective_bcrypt_cost(bcrypt_cost);
        AuthStore {
            state: RwLock::new(State {
                revision: 1,
                ..Default::default()
            }),
            tokens,
            bcrypt_cost,
        }
    }

    /// Replaces the whole state with the one in `records` (startup, snapshot install).
    pub fn recover(&self, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut st = State {
            revision: 1,
            ..Default::default()
        };
        for (k, v) in records {
            if k.as_slice() == ENABLED_KEY {
                st.enabled = v.as_slice() == [1];
            } else if k.as_slice() == REVISION_KEY {
                if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
                    st.revision = u64::from_be_bytes(b);
                }
            } else if k.starts_with(USER_PREFIX) {
                if let Ok(u) = User::decode(v.as_slice()) {
                    st.users
                        .insert(String::from_utf8_lossy(&u.name).into_owned(), u);
                }
            } else if k.starts_with(ROLE_PREFIX) {
                if let Ok(r) = Role::decode(v.as_slice()) {
                    st.roles
                        .insert(String::from_utf8_lossy(&r.name).into_owned(), r);
                }
            }
        }
        st.refresh_perms();
        if st.enabled {
            self.tokens.enable();
        } else {
            self.tokens.disable();
        }
        *self.state.write() = st;
    }

    pub fn is_enabled(&self) -> bool {
        self.state.read().enabled
    }

    pub fn revision(&self) -> u64 {
        self.state.read().revision
    }

    pub fn hash_password(&self, password: &str) -> Result<Vec<u8>> {
        hash_password(password, self.bcrypt_cost)
    }

    /// etcd's `CheckPassword`: the auth revision the check passed at. Slow by design (bcrypt):
    /// call it off the async runtime.
    pub fn check_password(&self, name: &str, password: &str) -> Result<u64> {
        let (hash, revision) = {
            let st = self.state.read();
            if !st.enabled {
                return Err(EtcdError::AuthNotEnabled);
            }
            let u = st.users.get(name).ok_or(EtcdError::AuthFailed)?;
            if u.options.as_ref().is_some_and(|o| o.no_password) {
                return Err(EtcdError::NoPasswordUser);
            }
            (u.password.clone(), st.revision)
        };
        let hash = String::from_utf8(hash).map_err(|_| EtcdError::AuthFailed)?;
        match bcrypt::verify(password, &hash) {
            Ok(true) => Ok(revision),
            _ => Err(EtcdError::AuthFailed),
        }
    }

    // ---- checks (etcd's isOpPermitted and IsAdminPermitted) ----

    fn is_op_permitted(&self, ai: &AuthInfo, key: &[u8], end: &[u8], write: bool) -> Result<()> {
        let st = self.state.read();
        if !st.enabled {
            return Ok(());
        }
        if ai.revision == 0 {
            return Err(EtcdError::UserEmpty);
        }
        if ai.revision < st.revision {
            return Err(EtcdError::AuthOldRevision);
        }
        let Some(u) = st.users.get(&ai.username) else {
            return Err(EtcdError::PermissionDenied);
        };
        if has_root_role(u) {
            return Ok(());
        }
        match st.perms.get(&ai.username) {
            Some(p) if p.allows(write, key, end) => Ok(()),
            _ => Err(EtcdError::PermissionDenied),
        }
    }

    pub fn is_range_permitted(&self, ai: &AuthInfo, key: &[u8], end: &[u8]) -> Result<()> {
        self.is_op_permitted(ai, key, end, false)
    }

    pub fn is_put_permitted(&self, ai: &AuthInfo, key: &[u8]) -> Result<()> {
        self.is_op_permitted(ai, key, &[], true)
    }

    pub fn is_delete_range_permitted(&self, ai: &AuthInfo, key: &[u8], end: &[u8]) -> Result<()> {
        self.is_op_permitted(ai, key, end, true)
    }

    pub fn is_admin_permitted(&self, ai: Option<&AuthInfo>) -> Result<()> {
        let st = self.state.read();
        if !st.enabled {
            return Ok(());
        }
        let ai = ai
            .filter(|a| !a.username.is_empty())
            .ok_or(EtcdError::UserEmpty)?;
        let u = st.users.get(&ai.username).ok_or(EtcdError::UserNotFound)?;
        if !has_root_role(u) {
            return Err(EtcdError::PermissionDenied);
        }
        Ok(())
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.state
            .read()
            .users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    // ---- reads ----

    pub fn user_get(&self, name: &str) -> Result<Vec<String>> {
        let st = self.state.read();
        Ok(st
            .users
            .get(name)
            .ok_or(EtcdError::UserNotFound)?
            .roles
            .clone())
    }

    pub fn user_list(&self) -> Vec<String> {
        self.state.read().users.keys().cloned().collect()
    }

    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>> {
        let st = self.state.read();
        Ok(st
            .roles
            .get(name)
            .ok_or(EtcdError::RoleNotFound)?
            .key_permission
            .clone())
    }

    pub fn role_list(&self) -> Vec<String> {
        self.state.read().roles.keys().cloned().collect()
    }

    // ---- changes, applied from the log ----

    /// Runs `f` on a copy of the state; on success the copy becomes the state and the returned
    /// changes carry the records to write (with the revision bumped when `f` asks for it).
    fn change(&self, f: impl FnOnce(&mut State, &mut Changes) -> Result<bool>) -> Result<Changes> {
        let mut st = self.state.read().clone();
        let mut changes = Vec::new();
        if f(&mut st, &mut changes)? {
            st.revision += 1;
            changes.push(RecordChange::Put(
                REVISION_KEY.to_vec(),
                st.revision.to_be_bytes().to_vec(),
            ));
            st.refresh_perms();
        }
        *self.state.write() = st;
        Ok(changes)
    }

    pub fn enable(&self) -> Result<Changes> {
        let changes = self.change(|st, ch| {
            if st.enabled {
                return Ok(false);
            }
            let u = st.users.get(ROOT).ok_or(EtcdError::RootUserNotExist)?;
            if !has_root_role(u) {
                return Err(EtcdError::RootRoleNotExist);
            }
            st.enabled = true;
            ch.push(RecordChange::Put(ENABLED_KEY.to_vec(), vec![1]));
            // etcd 3.4 does not move the revision on enable.
            Ok(false)
        })?;
        self.tokens.enable();
        Ok(changes)
    }

    pub fn disable(&self) -> Result<Changes> {
        let changes = self.change(|st, ch| {
            if !st.enabled {
                return Ok(false);
            }
            st.enabled = false;
            ch.push(RecordChange::Put(ENABLED_KEY.to_vec(), vec![0]));
            Ok(true)
        })?;
        self.tokens.disable();
        Ok(changes)
    }

    /// etcd's `Authenticate` at apply time: the password was checked before proposing.
    pub fn authenticate(&self, name: &str, prefix: &str, index: u64) -> Result<String> {
        let revision = {
            let st = self.state.read();
            if !st.enabled {
                return Err(EtcdError::AuthNotEnabled);
            }
            let u = st.users.get(name).ok_or(EtcdError::AuthFailed)?;
            if u.options.as_ref().is_some_and(|o| o.no_password) {
                return Err(EtcdError::AuthFailed);
            }
            st.revision
        };
        self.tokens
            .assign(name, revision, prefix, index)
            .map_err(|e| EtcdError::Internal(e.to_string()))
    }

    pub fn user_add(
        &self,
        name: &str,
        hashed: Vec<u8>,
        options: Option<UserAddOptions>,
    ) -> Result<Changes> {
        if name.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        self.change(|st, ch| {
            if st.users.contains_key(name) {
                return Err(EtcdError::UserAlreadyExist);
            }
            let u = User {
                name: name.as_bytes().to_vec(),
                password: hashed,
                roles: vec![],
                options: Some(options.unwrap_or_default()),
            };
            ch.push(RecordChange::Put(user_key(name), u.encode_to_vec()));
            st.users.insert(name.to_string(), u);
            Ok(true)
        })
    }

    pub fn user_delete(&self, name: &str) -> Result<Changes> {
        let changes = self.change(|st, ch| {
            if st.enabled && name == ROOT {
                return Err(EtcdError::InvalidAuthMgmt);
            }
            st.users.remove(name).ok_or(EtcdError::UserNotFound)?;
            ch.push(RecordChange::Remove(user_key(name)));
            Ok(true)
        })?;
        self.tokens.invalidate_user(name);
        Ok(changes)
    }

    pub fn user_change_password(&self, name: &str, hashed: Vec<u8>) -> Result<Changes> {
        let changes = self.change(|st, ch| {
            let u = st.users.get_mut(name).ok_or(EtcdError::UserNotFound)?;
            u.password = hashed;
            ch.push(RecordChange::Put(user_key(name), u.encode_to_vec()));
            Ok(true)
        })?;
        self.tokens.invalidate_user(name);
        Ok(changes)
    }

    pub fn user_grant_role(&self, name: &str, role: &str) -> Result<Changes> {
        self.change(|st, ch| {
            if !st.users.contains_key(name) {
                return Err(EtcdError::UserNotFound);
            }
            // The root role need not exist to be granted.
            if role != ROOT && !st.roles.contains_key(role) {
                return Err(EtcdError::RoleNotFound);
            }
            let Some(u) = st.users.get_mut(name) else {
                return Err(EtcdError::UserNotFound);
            };
            match u.roles.binary_search_by(|r| r.as_str().cmp(role)) {
                Ok(_) => Ok(false),
                Err(i) => {
                    u.roles.insert(i, role.to_string());
                    ch.push(RecordChange::Put(user_key(name), u.encode_to_vec()));
                    Ok(true)
                }
            }
        })
    }

    pub fn user_revoke_role(&self, name: &str, role: &str) -> Result<Changes> {
        self.change(|st, ch| {
            if st.enabled && name == ROOT && role == ROOT {
                return Err(EtcdError::InvalidAuthMgmt);
            }
            let u = st.users.get_mut(name).ok_or(EtcdError::UserNotFound)?;
            let before = u.roles.len();
            u.roles.retain(|r| r != role);
            if u.roles.len() == before {
                return Err(EtcdError::RoleNotGranted);
            }
            ch.push(RecordChange::Put(user_key(name), u.encode_to_vec()));
            Ok(true)
        })
    }

    pub fn role_add(&self, name: &str) -> Result<Changes> {
        if name.is_empty() {
            return Err(EtcdError::RoleEmpty);
        }
        self.change(|st, ch| {
            if st.roles.contains_key(name) {
                return Err(EtcdError::RoleAlreadyExist);
            }
            let r = Role {
                name: name.as_bytes().to_vec(),
                key_permission: vec![],
            };
            ch.push(RecordChange::Put(role_key(name), r.encode_to_vec()));
            st.roles.insert(name.to_string(), r);
            Ok(true)
        })
    }

    pub fn role_delete(&self, name: &str) -> Result<Changes> {
        self.change(|st, ch| {
            if st.enabled && name == ROOT {
                return Err(EtcdError::InvalidAuthMgmt);
            }
            st.roles.remove(name).ok_or(EtcdError::RoleNotFound)?;
            ch.push(RecordChange::Remove(role_key(name)));
            for (uname, u) in st.users.iter_mut() {
                let before = u.roles.len();
                u.roles.retain(|r| r != name);
                if u.roles.len() != before {
                    ch.push(RecordChange::Put(user_key(uname), u.encode_to_vec()));
                }
            }
            Ok(true)
        })
    }

    pub fn role_grant_permission(&self, name: &str, perm: Permission) -> Result<Changes> {
        self.change(|st, ch| {
            let r = st.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
            // etcd keeps permissions sorted by key and replaces the type of an exact match.
            let i = r.key_permission.partition_point(|p| p.key < perm.key);
            match r.key_permission.get_mut(i) {
                Some(p) if p.key == perm.key && p.range_end == perm.range_end => {
                    p.perm_type = perm.perm_type
                }
                _ => {
                    r.key_permission.push(perm);
                    r.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            ch.push(RecordChange::Put(role_key(name), r.encode_to_vec()));
            Ok(true)
        })
    }

    pub fn role_revoke_permission(&self, name: &str, key: &[u8], end: &[u8]) -> Result<Changes> {
        self.change(|st, ch| {
            let r = st.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
            let before = r.key_permission.len();
            r.key_permission
                .retain(|p| !(p.key == key && p.range_end == end));
            if r.key_permission.len() == before {
                return Err(EtcdError::PermissionNotGranted);
            }
            ch.push(RecordChange::Put(role_key(name), r.encode_to_vec()));
            Ok(true)
        })
    }
}

/// A permission type's etcd name, for logs.
pub fn perm_type_name(t: i32) -> &'static str {
    match PermType::try_from(t) {
        Ok(PermType::Read) => "READ",
        Ok(PermType::Write) => "WRITE",
        _ => "READWRITE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store() -> AuthStore {
        AuthStore::new(Tokens::from_flag("simple", Duration::ZERO).unwrap(), 4)
    }

    fn apply(records: &mut BTreeMap<Vec<u8>, Vec<u8>>, changes: Changes) {
        for c in changes {
            match c {
                RecordChange::Put(k, v) => {
                    records.insert(k, v);
                }
                RecordChange::Remove(k) => {
                    records.remove(&k);
                }
            }
        }
    }

    #[test]
    fn enable_needs_root_with_the_root_role_and_survives_recovery() {
        let s = store();
        let mut rec = BTreeMap::new();
        assert_eq!(s.enable().err(), Some(EtcdError::RootUserNotExist));
        apply(
            &mut rec,
            s.user_add("root", s.hash_password("pw").unwrap(), None)
                .unwrap(),
        );
        assert_eq!(s.enable().err(), Some(EtcdError::RootRoleNotExist));
        apply(&mut rec, s.user_grant_role("root", "root").unwrap());
        assert_eq!(
            s.user_grant_role("root", "nope").err(),
            Some(EtcdError::RoleNotFound)
        );
        apply(&mut rec, s.enable().unwrap());
        assert!(s.is_enabled());
        assert_eq!(s.revision(), 3);
        assert_eq!(
            s.user_delete("root").err(),
            Some(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(
            s.user_revoke_role("root", "root").err(),
            Some(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(s.check_password("root", "pw"), Ok(3));
        assert_eq!(s.check_password("root", "bad"), Err(EtcdError::AuthFailed));

        let again = store();
        let records: Vec<_> = rec.into_iter().collect();
        again.recover(&records);
        assert!(again.is_enabled());
        assert_eq!(again.revision(), 3);
        assert_eq!(again.user_get("root"), Ok(vec!["root".to_string()]));
    }

    #[test]
    fn role_permissions_decide_and_old_revisions_are_refused() {
        let s = store();
        s.user_add("root", vec![], None).unwrap();
        s.user_grant_role("root", "root").unwrap();
        s.user_add("u", vec![], None).unwrap();
        s.role_add("r").unwrap();
        s.user_grant_role("u", "r").unwrap();
        let perm = |k: &str, e: &str, t: PermType| Permission {
            perm_type: t as i32,
            key: k.into(),
            range_end: e.into(),
        };
        s.role_grant_permission("r", perm("k", "l", PermType::Read))
            .unwrap();
        s.role_grant_permission("r", perm("a", "", PermType::Write))
            .unwrap();
        // Same key and end: the type is replaced, not added.
        s.role_grant_permission("r", perm("k", "l", PermType::Readwrite))
            .unwrap();
        let perms = s.role_get("r").unwrap();
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"a");
        s.enable().unwrap();
        let u = AuthInfo {
            username: "u".into(),
            revision: s.revision(),
        };
        assert_eq!(s.is_put_permitted(&u, b"k1"), Ok(()));
        assert_eq!(s.is_range_permitted(&u, b"k", b"l"), Ok(()));
        assert_eq!(
            s.is_range_permitted(&u, b"a", b""),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            s.is_range_permitted(&AuthInfo::default(), b"k", b""),
            Err(EtcdError::UserEmpty)
        );
        assert_eq!(
            s.is_admin_permitted(Some(&u)),
            Err(EtcdError::PermissionDenied)
        );
        s.role_revoke_permission("r", b"k", b"l").unwrap();
        assert_eq!(
            s.is_put_permitted(&u, b"k1"),
            Err(EtcdError::AuthOldRevision)
        );
        let u = AuthInfo {
            revision: s.revision(),
            ..u
        };
        assert_eq!(
            s.is_put_permitted(&u, b"k1"),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            s.role_revoke_permission("r", b"k", b"l").err(),
            Some(EtcdError::PermissionNotGranted)
        );
        s.role_delete("r").unwrap();
        assert_eq!(s.user_get("u"), Ok(vec![]));
    }
}
