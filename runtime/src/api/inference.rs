//! What the two Open Inference Protocol front ends ([`super::oip`] over HTTP, [`super::grpc`])
//! share beneath their encodings: readiness, a model's metadata, versioned names, the call's
//! options, admission and the call itself, and the choice of outputs. Each front end only
//! decodes its request and encodes these answers.

use std::time::Duration;

use super::http::{priority_header, timeout_header};
use super::{ApiError, AppState};
use crate::model::handle::{InferOptions, ModelHandle};
use crate::model::shared::ModelState;
use crate::model::spec::split_version;
use crate::model::tensor::HostTensor;
use crate::tenancy::Tenant;

/// What both front ends report as the models' platform (Triton's name for TorchScript).
pub(super) const PLATFORM: &str = "pytorch_libtorch";

/// Not draining, and every model of the config file ready (but those an operator unloaded):
/// models loaded through the admin API report their own readiness.
pub(super) fn server_ready(app: &AppState) -> bool {
    let draining = app.draining.load(std::sync::atomic::Ordering::Relaxed);
    !draining && app.repository.config_models_ready()
}

/// Whether a model answers now.
pub(super) fn model_ready(model: &ModelHandle) -> bool {
    matches!(model.state(), ModelState::Ready(_))
}

/// A model as its metadata call describes it.
pub(super) struct Metadata {
    pub(super) name: String,
    /// The versions the tenant may call, each as its number.
    pub(super) versions: Vec<String>,
    pub(super) inputs: Vec<TensorMetadata>,
    pub(super) outputs: Vec<TensorMetadata>,
}

/// One input or output. An output's type and shape are learnt at warm-up: until then they are
/// `None`, and only its name is known.
pub(super) struct TensorMetadata {
    pub(super) name: String,
    pub(super) datatype: Option<&'static str>,
    /// `-1` for a dimension that varies.
    pub(super) shape: Option<Vec<i64>>,
}

/// `model`'s metadata, with the versions `tenant` may call.
pub(super) fn metadata(app: &AppState, model: &ModelHandle, tenant: &Tenant) -> Metadata {
    let config = model.config();
    let name = config.model_name();
    let inputs = config
        .inputs
        .iter()
        .map(|i| TensorMetadata { name: i.name.clone(), datatype: Some(i.dtype.wire_name()), shape: Some(dims(&i.shape)) })
        .collect();
    let outputs = match model.state() {
        ModelState::Ready(meta) => meta
            .iter()
            .map(|m| TensorMetadata { name: m.name.clone(), datatype: Some(m.dtype.wire_name()), shape: Some(dims(&m.shape)) })
            .collect(),
        ModelState::Loading | ModelState::Failed(_) => config
            .outputs
            .iter()
            .map(|o| TensorMetadata { name: o.name.clone(), datatype: None, shape: None })
            .collect(),
    };
    Metadata {
        name: name.to_owned(),
        versions: app.models.versions(tenant.name(), name).iter().map(u64::to_string).collect(),
        inputs,
        outputs,
    }
}

fn dims(shape: &[Option<u32>]) -> Vec<i64> {
    shape.iter().map(|d| d.map_or(-1, i64::from)).collect()
}

/// A route's model and version as one name: `model` when `version` is empty, else `model@version`
/// (a model defined without versions has one, `1`). A version that is not a number of a model
/// named `model` is "not found", like a model that is not served.
pub(super) fn versioned(model: &str, version: &str) -> Result<String, ApiError> {
    if version.is_empty() {
        return Ok(model.to_owned());
    }
    let name = format!("{model}@{version}");
    match split_version(&name) {
        Some((base, Some(_))) if base == model => Ok(name),
        _ => Err(ApiError::NotFound(format!("model '{model}' has no version '{version}'"))),
    }
}

/// A direct model call's options from its headers: its priority, held to the operator's
/// `oip_max_priority`, and its `kiln-timeout-ms`, else `timeout` (the protocol's own deadline).
pub(super) fn options(app: &AppState, headers: &http::HeaderMap, timeout: Option<Duration>) -> Result<InferOptions, ApiError> {
    Ok(InferOptions {
        priority: priority_header(headers)?.map_or(0, |p| p.min(app.oip_max_priority)),
        timeout: timeout_header(headers)?.or(timeout),
    })
}

/// One direct model call for `tenant`: admitted under its quotas first, so the inputs are read
/// and decoded (`inputs`) under its permit; then arranged in the model's order and batched with
/// every other caller's.
pub(super) async fn infer(
    app: &AppState,
    tenant: &std::sync::Arc<Tenant>,
    model: &ModelHandle,
    options: InferOptions,
    inputs: impl Future<Output = Result<Vec<(String, HostTensor)>, ApiError>>,
) -> Result<Vec<HostTensor>, ApiError> {
    let _permit = app.admit(tenant, None)?;
    let arranged = model.arrange_inputs(inputs.await?)?;
    Ok(model.infer(arranged, options).await?)
}

/// The outputs to answer with, by their place in the model's outputs: all of them when none is
/// named, else those named, in the order named.
pub(super) fn select_outputs<'n>(
    model: &ModelHandle,
    requested: impl ExactSizeIterator<Item = &'n str>,
) -> Result<Vec<usize>, ApiError> {
    let names = &model.config().outputs;
    if requested.len() == 0 {
        return Ok((0..names.len()).collect());
    }
    requested
        .map(|name| {
            names.iter().position(|o| o.name == name).ok_or_else(|| {
                ApiError::BadRequest(format!("requested output '{name}' is not an output of model '{}'", model.name()))
            })
        })
        .collect()
}

/// The refusal of an answer of `size` bytes, over the tenant's `max_response_bytes`.
pub(super) fn too_large(size: impl std::fmt::Display, limit: u64) -> ApiError {
    ApiError::BadRequest(format!(
        "the answer would be {size} bytes, over the limit of {limit} bytes (max_response_bytes): \
         send fewer rows per request"
    ))
}
