//! Who is calling, and what they may reach: the caller's key checked and audited, the tenant it
//! acts as admitted under its quotas, the models that tenant may use; and on the admin API an
//! admin key, checked before anything of the request is read.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use super::requests::peer;
use super::{ApiError, AppState};
use crate::model::handle::ModelHandle;
use crate::tenancy::audit::Event;
use crate::tenancy::keys::Principal;
use crate::tenancy::{Permit, QuotaRefusal, Tenant};

impl AppState {
    /// The caller's principal, or 401. Failures are audited with `handler` when known.
    pub(super) fn authenticate(&self, headers: &HeaderMap, handler: Option<&str>) -> Result<Principal, ApiError> {
        let keys = self.keys.current();
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match keys.verify(authorization) {
            Ok(principal) => Ok(principal.clone()),
            Err(failure) => {
                let tenant = match failure.principal() {
                    Some(Principal::Tenant(t)) => Some(t.as_str()),
                    Some(Principal::Admin) => Some("admin"),
                    None => None,
                };
                self.audit.auth_failure(peer(), tenant, handler, failure.reason());
                Err(ApiError::Unauthorized(failure.public_message().to_owned()))
            }
        }
    }

    /// The tenant a principal acts as on the data routes; admin keys manage, they do not call.
    pub(super) fn tenant_of(&self, principal: &Principal) -> Result<&Arc<Tenant>, ApiError> {
        match principal {
            Principal::Tenant(name) => self
                .tenants
                .get(name)
                .ok_or_else(|| ApiError::Unauthorized("invalid API key".to_owned())),
            Principal::Admin => Err(ApiError::Forbidden(
                "admin keys are for the admin API; call handlers and models with a tenant's key".to_owned(),
            )),
        }
    }

    /// Admits one request under the tenant's quotas, auditing a refusal.
    pub(super) fn admit(&self, tenant: &Arc<Tenant>, handler: Option<&str>) -> Result<Permit, ApiError> {
        tenant.admit().map_err(|refusal| self.refused(tenant, handler, refusal))
    }

    /// Counts and audits a quota refusal.
    pub(super) fn refused(&self, tenant: &Tenant, handler: Option<&str>, refusal: QuotaRefusal) -> ApiError {
        self.telemetry.record_refusal(tenant.name(), refusal.kind());
        self.audit.record(Event::QuotaRefused, Some(tenant.name()), handler, &refusal.to_string());
        ApiError::Quota(refusal)
    }

    /// A model the caller's tenant may use; any other name is "not found", whether or not it
    /// exists.
    pub(super) fn authorized_model(
        &self,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<(ModelHandle, &Arc<Tenant>), ApiError> {
        let principal = self.authenticate(headers, None)?;
        // Admin keys manage; model calls go through a tenant and its quotas.
        let tenant = self.tenant_of(&principal)?;
        Ok((self.tenant_model(tenant, name)?, tenant))
    }

    /// A model `tenant` may use; any other name is "not found", whether or not it exists.
    pub(super) fn tenant_model(&self, tenant: &Tenant, name: &str) -> Result<ModelHandle, ApiError> {
        self.models.usable(tenant.name(), name).ok_or_else(|| match name.split_once('@') {
            Some((model, version)) => ApiError::NotFound(format!("model '{model}' has no version '{version}'")),
            None => ApiError::NotFound(format!("model '{name}' not found")),
        })
    }
}

/// Passes for an admin key; a tenant's key is refused (403) and the attempt audited, naming
/// `handler` when the call is about one.
pub(super) fn require_admin(app: &AppState, headers: &HeaderMap, handler: Option<&str>) -> Result<(), ApiError> {
    match app.authenticate(headers, handler)? {
        Principal::Admin => Ok(()),
        Principal::Tenant(t) => {
            app.audit.auth_failure(peer(), Some(&t), handler, "tenant key used on the admin API");
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
