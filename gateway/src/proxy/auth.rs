//! etcd's Auth service through the gateway: every call goes to the primary
//! region's leader, as a write does (a token it hands out is the primary's,
//! and the requests the gateway routes carry it on). The gateway remembers
//! whose each token it passed back is, so rate limits count per user.

use std::sync::Arc;

use meridian_proto::etcdserverpb::auth_client::AuthClient;
use meridian_proto::etcdserverpb::auth_server::Auth;
use meridian_proto::etcdserverpb::*;
use tonic::{Request, Response, Status};

use super::{rev, Gateway};
use crate::route::Class;

pub struct AuthProxy(pub Arc<Gateway>);

/// One Auth call, forwarded to the primary's leader.
macro_rules! to_primary {
    ($($method:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl Auth for AuthProxy {
            /// Also learns whose the token is, for per-user rate limits.
            async fn authenticate(
                &self,
                req: Request<AuthenticateRequest>,
            ) -> Result<Response<AuthenticateResponse>, Status> {
                let ask = req.get_ref().clone();
                let resp = self
                    .0
                    .unary(
                        Class::Write,
                        req,
                        |c, r| async move { AuthClient::new(c).authenticate(r).await },
                        |r| rev(&r.header),
                    )
                    .await?;
                let regions = self.0.authenticate_elsewhere(&ask).await;
                let identity = crate::proxy::Identity { user: ask.name, regions };
                self.0.learn_token(resp.get_ref().token.clone(), identity);
                Ok(resp)
            }
            $(
                async fn $method(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.0
                        .unary(
                            Class::Write,
                            req,
                            |c, r| async move { AuthClient::new(c).$method(r).await },
                            |r| rev(&r.header),
                        )
                        .await
                }
            )*
        }
    };
}

to_primary! {
    auth_enable(AuthEnableRequest) -> AuthEnableResponse;
    auth_disable(AuthDisableRequest) -> AuthDisableResponse;
    user_add(AuthUserAddRequest) -> AuthUserAddResponse;
    user_get(AuthUserGetRequest) -> AuthUserGetResponse;
    user_list(AuthUserListRequest) -> AuthUserListResponse;
    user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
    user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
    user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
    user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
    role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
    role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
    role_list(AuthRoleListRequest) -> AuthRoleListResponse;
    role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
    role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
    role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}
