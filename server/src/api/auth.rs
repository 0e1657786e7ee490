//! etcd's Auth service: changes go through Raft (checked at apply, see `etcdserver::apply`'s `Applier::check_auth`);
//! reads are served locally after a read barrier. Passwords are hashed and checked here, on a
//! blocking thread, never while applying.

use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::{Applied, EtcdServer};
use crate::pb::etcdserverpb::{
    auth_server::Auth, AuthDisableRequest, AuthDisableResponse, AuthEnableRequest,
    AuthEnableResponse, AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest,
    AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest,
    AuthRoleListResponse, AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse,
    AuthStatusRequest, AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse,
    AuthUserChangePasswordRequest, AuthUserChangePasswordResponse, AuthUserDeleteRequest,
    AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
    AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse,
    AuthUserRevokeRoleRequest, AuthUserRevokeRoleResponse, AuthenticateRequest,
    AuthenticateResponse, ResponseHeader,
};
use crate::pb::oxcdpb::{self, raft_request::Request as Raft};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AuthService(pub Arc<EtcdServer>);

/// How many times Authenticate retries when the auth store changed while the password was
/// being checked (etcd retries without a bound).
const AUTHENTICATE_ATTEMPTS: usize = 8;

impl AuthService {
    /// Proposes an auth store change; the header of its response.
    async fn change(
        &self,
        caller: &Caller,
        req: Raft,
    ) -> Result<(Option<ResponseHeader>, Option<String>), Status> {
        match self.0.propose_as(req, caller).await? {
            Applied::Auth(token) => Ok((self.header(), token)),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    fn header(&self) -> Option<ResponseHeader> {
        let mut h = None;
        self.0.fill(&mut h);
        h
    }

    /// A linearizable read of the auth store: what the log has committed so far is applied.
    async fn barrier(&self) -> Result<(), Status> {
        self.0.read_barrier().await?;
        Ok(())
    }

    async fn hash(&self, password: String) -> Result<Vec<u8>, Status> {
        let auth = self.0.auth.clone();
        tokio::task::spawn_blocking(move || auth.hash_password(&password))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    /// Whether auth is on and the auth store's revision (etcd 3.6 asks for root).
    async fn auth_status(
        &self,
        req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.barrier().await?;
        self.0.check_admin(&Caller::of(&req)).await?;
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: self.0.auth.is_enabled(),
            auth_revision: self.0.auth.revision(),
        }))
    }

    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::AuthEnable(req.into_inner()))
            .await?;
        tracing::info!("enabled authentication");
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::AuthDisable(req.into_inner()))
            .await?;
        tracing::info!("disabled authentication");
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (auth, name, password) = (self.0.auth.clone(), r.name.clone(), r.password.clone());
            let checked =
                tokio::task::spawn_blocking(move || auth.check_password(&name, &password))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            let checked = match checked {
                Ok(rev) => rev,
                Err(e) => {
                    if e != EtcdError::AuthNotEnabled {
                        tracing::warn!(user = %r.name, "invalid authentication was requested");
                    }
                    return Err(e.into());
                }
            };
            let internal = oxcdpb::Authenticate {
                name: r.name.clone(),
                simple_token: self.0.auth.tokens.prefix(),
            };
            let (header, token) = self.change(&caller, Raft::Authenticate(internal)).await?;
            // A token issued at a newer auth revision than the password was checked at could
            // outlive a password change: check again (etcd's loop).
            if checked == self.0.auth.revision() || attempts >= AUTHENTICATE_ATTEMPTS {
                return Ok(Response::new(AuthenticateResponse {
                    header,
                    token: token.unwrap_or_default(),
                }));
            }
        }
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(EtcdError::UserEmpty.into());
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        let hashed_password = if no_password {
            vec![]
        } else {
            self.hash(r.password).await?
        };
        let internal = oxcdpb::UserAdd {
            name: r.name,
            hashed_password,
            options: r.options,
        };
        let (header, _) = self.change(&caller, Raft::UserAdd(internal)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.barrier().await?;
        let ai = self.0.auth_info(&caller).await?.unwrap_or_default();
        // A user may read its own record.
        if let Err(e) = self.0.auth.is_admin_permitted(Some(&ai)) {
            if r.name != ai.username {
                return Err(e.into());
            }
        }
        let roles = self.0.auth.user_get(&r.name)?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles,
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.barrier().await?;
        self.0.check_admin(&Caller::of(&req)).await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: self.0.auth.user_list(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::UserDelete(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        // etcd 3.5+: a password is hashed here; without one, the client's own bcrypt hash
        // (base64, as etcdctl sends it) is stored as given.
        let hashed_password = if !r.password.is_empty() {
            self.hash(r.password).await?
        } else {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(r.hashed_password.as_bytes())
                .map_err(|_| EtcdError::NoPasswordUser)?
        };
        let internal = oxcdpb::UserChangePassword {
            name: r.name,
            hashed_password,
        };
        let (header, _) = self
            .change(&caller, Raft::UserChangePassword(internal))
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::UserGrantRole(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::UserRevokeRole(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::RoleAdd(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        self.barrier().await?;
        let ai = self.0.auth_info(&caller).await?.unwrap_or_default();
        // A user may read the roles it holds.
        if let Err(e) = self.0.auth.is_admin_permitted(Some(&ai)) {
            if !self.0.auth.has_role(&ai.username, &r.role) {
                return Err(e.into());
            }
        }
        let perm = self.0.auth.role_get(&r.role)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.barrier().await?;
        self.0.check_admin(&Caller::of(&req)).await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: self.0.auth.role_list(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::RoleDelete(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if r.perm.is_none() {
            return Err(EtcdError::PermissionNotGiven.into());
        }
        let (header, _) = self.change(&caller, Raft::RoleGrantPermission(r)).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let caller = Caller::of(&req);
        let (header, _) = self
            .change(&caller, Raft::RoleRevokePermission(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
