//! Who may call the admin API: an admin key, checked before anything of the request is read.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::tenancy::keys::Principal;

/// Passes for an admin key; a tenant's key is refused (403) and the attempt audited, naming
/// `handler` when the call is about one.
pub(super) fn require_admin(app: &AppState, headers: &HeaderMap, handler: Option<&str>) -> Result<(), ApiError> {
    match app.authenticate(headers, handler)? {
        Principal::Admin => Ok(()),
        Principal::Tenant(t) => {
            app.audit.auth_failure(super::peer(), Some(&t), handler, "tenant key used on the admin API");
            Err(ApiError::Forbidden("the admin API needs an admin key".to_owned()))
        }
    }
}

/// A route handler that takes this runs only for an admin key: the key is checked from the
/// headers before any other extractor reads the path, the query or the body.
#[derive(Debug)]
pub(super) struct AdminKey;

impl FromRequestParts<Arc<AppState>> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<AdminKey, ApiError> {
        require_admin(app, &parts.headers, None).map(|()| AdminKey)
    }
}
