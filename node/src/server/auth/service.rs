//! etcd's Auth service. Every call but Authenticate is root's once auth is
//! on. Changes go through raft (a password as its bcrypt hash, made here);
//! reads are served from this member's store after a read barrier, so they
//! see every change acknowledged before them.

use std::sync::Arc;

use meridian_proto::authpb::Permission;
use meridian_proto::etcdserverpb::auth_server::Auth;
use meridian_proto::etcdserverpb::*;
use meridian_proto::meridian::v1::auth_change::Change;
use meridian_proto::meridian::v1::internal_request::Request as Internal;
use meridian_proto::meridian::v1::{AuthChange, SimpleToken};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::store::AuthStore;
use super::{AuthState, PermKind};
use crate::error::{Error, Result};
use crate::server::apply::Applied;
use crate::server::EtcdServer;

pub struct AuthService {
    pub server: Arc<EtcdServer>,
}

impl AuthService {
    fn header(&self) -> ResponseHeader {
        self.server.header(self.server.mvcc.marks().current)
    }

    /// Proposes `change` for a caller who must be root (while auth is on).
    async fn change(&self, metadata: &MetadataMap, change: Change) -> Result<ResponseHeader> {
        let who = self.server.check_admin(metadata).await?;
        self.server.check_writable()?;
        Ok(self.propose(change, Some(&who)).await?.0)
    }

    /// Proposes `change`; the token it handed out, if any.
    async fn propose(
        &self,
        change: Change,
        who: Option<&super::store::AuthInfo>,
    ) -> Result<(ResponseHeader, Option<String>)> {
        let request = Internal::AuthChange(AuthChange { change: Some(change) });
        let applied = match who {
            Some(who) => self.server.propose_as(request, who).await?,
            None => self.server.propose(request).await?,
        };
        match applied {
            Applied::Auth(token) => Ok((self.header(), token)),
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }

    /// The store for a read, with everything acknowledged before it: root's,
    /// or the caller's own when `own` says the read is about them (etcd lets
    /// a user get themselves and the roles they hold).
    async fn read(&self, metadata: &MetadataMap, own: impl Fn(&AuthState, &str) -> bool) -> Result<Arc<AuthState>> {
        let who = self.server.auth_info(metadata).await?;
        let state = self.server.auth.state();
        if !(state.enabled && own(&state, &who.user)) {
            state.check_admin(&who.user)?;
        }
        self.server.read_barrier().await?;
        Ok(self.server.auth.state())
    }

    /// A password's bcrypt hash.
    async fn hashed(&self, password: &str) -> Result<String> {
        self.server.auth.hash(password.to_string()).await
    }
}

fn to_permission(p: &super::Perm) -> Permission {
    let perm_type = match p.kind {
        PermKind::Read => 0,
        PermKind::Write => 1,
        PermKind::ReadWrite => 2,
    };
    Permission { perm_type, key: p.key.clone(), range_end: p.range_end.clone() }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.change(req.metadata(), Change::Enable(AuthEnableRequest {})).await?;
        Ok(Response::new(AuthEnableResponse { header: Some(header) }))
    }

    async fn auth_disable(&self, req: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.change(req.metadata(), Change::Disable(AuthDisableRequest {})).await?;
        Ok(Response::new(AuthDisableResponse { header: Some(header) }))
    }

    async fn authenticate(&self, req: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        let r = req.into_inner();
        self.server.auth.check_password(&r.name, &r.password).await?;
        if let Some(jwt) = &self.server.auth.config.jwt {
            // Signed here, at the revision of everything acknowledged before.
            self.server.read_barrier().await?;
            let token = jwt.sign(&r.name, self.server.auth.state().revision)?;
            return Ok(Response::new(AuthenticateResponse { header: Some(self.header()), token }));
        }
        let prefix = AuthStore::new_token_prefix();
        let (header, token) =
            self.propose(Change::SimpleToken(SimpleToken { user: r.name, token: prefix }), None).await?;
        let token = token.ok_or_else(|| Error::Internal("no token was handed out".into()))?;
        Ok(Response::new(AuthenticateResponse { header: Some(header), token }))
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let metadata = req.metadata().clone();
        let mut r = req.into_inner();
        self.server.check_admin(&metadata).await?;
        if r.name.is_empty() {
            return Err(Error::UserEmpty.into());
        }
        if self.server.auth.state().users.contains_key(&r.name) {
            return Err(Error::UserExists.into());
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        r.password = if no_password { String::new() } else { self.hashed(&r.password).await? };
        let header = self.change(&metadata, Change::UserAdd(r)).await?;
        Ok(Response::new(AuthUserAddResponse { header: Some(header) }))
    }

    async fn user_get(&self, req: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let name = &req.get_ref().name;
        let state = self.read(req.metadata(), |_, who| who == name).await?;
        let user = state.users.get(name).ok_or(Error::UserNotFound)?;
        Ok(Response::new(AuthUserGetResponse { header: Some(self.header()), roles: user.roles.clone() }))
    }

    async fn user_list(&self, req: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        let state = self.read(req.metadata(), |_, _| false).await?;
        let users = state.users.keys().cloned().collect();
        Ok(Response::new(AuthUserListResponse { header: Some(self.header()), users }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self.change(req.metadata(), Change::UserDelete(req.get_ref().clone())).await?;
        Ok(Response::new(AuthUserDeleteResponse { header: Some(header) }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let metadata = req.metadata().clone();
        let mut r = req.into_inner();
        self.server.check_admin(&metadata).await?;
        if !self.server.auth.state().users.contains_key(&r.name) {
            return Err(Error::UserNotFound.into());
        }
        r.password = self.hashed(&r.password).await?;
        let header = self.change(&metadata, Change::UserChangePassword(r)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header: Some(header) }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self.change(req.metadata(), Change::UserGrantRole(req.get_ref().clone())).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header: Some(header) }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self.change(req.metadata(), Change::UserRevokeRole(req.get_ref().clone())).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header: Some(header) }))
    }

    async fn role_add(&self, req: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let header = self.change(req.metadata(), Change::RoleAdd(req.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleAddResponse { header: Some(header) }))
    }

    async fn role_get(&self, req: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let name = &req.get_ref().role;
        let holds = |state: &AuthState, who: &str| state.users.get(who).is_some_and(|u| u.roles.contains(name));
        let state = self.read(req.metadata(), holds).await?;
        let role = state.roles.get(name).ok_or(Error::RoleNotFound)?;
        let perm = role.perms.iter().map(to_permission).collect();
        Ok(Response::new(AuthRoleGetResponse { header: Some(self.header()), perm }))
    }

    async fn role_list(&self, req: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        let state = self.read(req.metadata(), |_, _| false).await?;
        let roles = state.roles.keys().cloned().collect();
        Ok(Response::new(AuthRoleListResponse { header: Some(self.header()), roles }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self.change(req.metadata(), Change::RoleDelete(req.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header: Some(header) }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self.change(req.metadata(), Change::RoleGrantPermission(req.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header: Some(header) }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self.change(req.metadata(), Change::RoleRevokePermission(req.get_ref().clone())).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header: Some(header) }))
    }
}
