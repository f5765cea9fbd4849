//! Start-up: load the models, compile the handlers, then serve HTTP until shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::executor::ModelHandle;
use crate::sandbox::Sandbox;

/// Builds everything `config` describes. Models keep loading in the background; the server is
/// live at once and ready when every model has warmed up.
pub fn build(config: &Config) -> anyhow::Result<AppState> {
    let mut models = HashMap::new();
    for model in &config.models {
        let handle = ModelHandle::spawn(model.clone())
            .with_context(|| format!("cannot start the executor for model '{}'", model.name))?;
        models.insert(model.name.clone(), handle);
    }
    let max_memory = config
        .handlers
        .iter()
        .map(|h| h.memory_limit_bytes)
        .max()
        .unwrap_or(crate::config::DEFAULT_MEMORY_LIMIT_MIB << 20);
    let sandbox = Sandbox::new(config.server.max_instances, max_memory)
        .map_err(|e| anyhow::anyhow!("cannot create the sandbox engine: {e}"))?;
    let mut handlers = HashMap::new();
    for handler in &config.handlers {
        let allowed = handler
            .models
            .iter()
            .filter_map(|name| models.get(name).map(|m| (name.clone(), m.clone())))
            .collect();
        let started = std::time::Instant::now();
        let loaded = sandbox.load_handler(handler, allowed).map_err(|e| {
            anyhow::anyhow!(
                "{}: handler '{}': cannot load component {}: {e:#}",
                config.source.display(),
                handler.name,
                handler.component.display()
            )
        })?;
        tracing::info!(
            handler = %handler.name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "handler compiled"
        );
        handlers.insert(handler.name.clone(), Arc::new(loaded));
    }
    Ok(AppState {
        handlers,
        models,
        max_body_bytes: config.server.max_body_bytes,
        oip_max_priority: config.server.oip_max_priority,
    })
}

/// Serves `config` on `listen` until `shutdown` resolves.
pub async fn serve(
    config: &Config,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = Arc::new(build(config)?);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // Without TCP_NODELAY a response written in several segments waits on the client's
    // delayed ACK: 40 ms added to every embeddings answer.
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    tracing::info!(
        "listening on http://{local} ({} models, {} handlers)",
        state.models.len(),
        state.handlers.len()
    );
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")
}
