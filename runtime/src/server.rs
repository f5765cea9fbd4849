//! Start-up: load the models, compile the handlers (from the config and the state directory),
//! then serve the API and the admin API until shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::{Listener as _, ListenerExt as _};
use tokio::net::TcpListener;

use crate::api::admin::{AdminState, allowed_models};
use crate::api::{self, AppState};
use crate::audit::{Audit, Event};
use crate::config::{Config, DEFAULT_MEMORY_LIMIT_MIB};
use crate::executor::ModelHandle;
use crate::gpu::Gpus;
use crate::placement::Placer;
use crate::scaler::{self, DecisionLog};
use crate::telemetry::{EventLog, Telemetry};
use crate::keys::{self, KeyRing, Principal};
use crate::sandbox::{ComponentError, Origin, Sandbox};
use crate::state::Store;
use crate::tenancy::Tenant;

/// Events kept for followers of `/v1/events` that connect later.
const EVENT_HISTORY: usize = 500;

/// How often the key files are checked for changes (`kiln tenant add-key` on a running server).
const KEY_POLL: Duration = Duration::from_secs(1);

/// Builds everything `config` describes. Models keep loading in the background; the server is
/// live at once and ready when every model has warmed up.
pub fn build(config: &Config) -> anyhow::Result<AppState> {
    let gpus = Gpus::detect(&config.gpus);
    gpus.spawn_poller(config.gpus.poll_interval)
        .context("cannot start the GPU poller")?;
    let placer = Placer::new(Arc::clone(&gpus), config.scaler.max_gpu_utilization);
    let events = Arc::new(EventLog::new(EVENT_HISTORY));
    let mut models = HashMap::new();
    for model in &config.models {
        let handle = ModelHandle::spawn(model.clone(), placer.clone(), Arc::clone(&events)).map_err(|e| {
            anyhow::anyhow!("{}: cannot start model '{}': {e}", config.source.display(), model.name)
        })?;
        models.insert(model.name.clone(), handle);
    }
    let decisions = Arc::new(DecisionLog::new(config.scaler.history, Arc::clone(&events)));
    let telemetry = Arc::new(Telemetry::new(events));
    scaler::spawn(models.values().cloned().collect(), &config.scaler, Arc::clone(&decisions))
        .context("cannot start the scaler")?;
    let tenants: HashMap<String, Arc<Tenant>> = config
        .tenants
        .iter()
        .map(|t| (t.name.clone(), Arc::new(Tenant::new(t.clone()))))
        .collect();
    let state_dir = &config.server.state_dir;
    let store = Store::open(state_dir)
        .with_context(|| format!("cannot open the state directory {}", state_dir.display()))?;
    let keys = load_keys(state_dir, config);
    report_keys(&keys, config);

    let max_memory = config
        .tenants
        .iter()
        .map(|t| t.quota.limits.memory_limit_bytes)
        .max()
        .unwrap_or(DEFAULT_MEMORY_LIMIT_MIB << 20);
    let metered = config.tenants.iter().any(|t| t.quota.limits.fuel.is_some());
    let sandbox = Sandbox::new(config.server.max_instances, max_memory, metered)
        .map_err(|e| anyhow::anyhow!("cannot create the sandbox engine: {e}"))?;

    let audit = Audit::open(state_dir);
    // Every component is compiled up front, several at once: the engine compiles each one on a
    // single core.
    let deployed = store
        .load_all()
        .with_context(|| format!("cannot read deployed handlers in {}", state_dir.display()))?;
    let mut config_sources = Vec::with_capacity(config.handlers.len());
    for handler in &config.handlers {
        let bytes = std::fs::read(&handler.component).map_err(|e| {
            anyhow::anyhow!(
                "{}: handler '{}': cannot read component {}: {e}",
                config.source.display(),
                handler.name,
                handler.component.display()
            )
        })?;
        config_sources.push(bytes);
    }
    let sources: Vec<&[u8]> = config_sources
        .iter()
        .chain(deployed.iter().map(|(_, bytes)| bytes))
        .map(Vec::as_slice)
        .collect();
    let started = std::time::Instant::now();
    let mut compiled = compile_all(&sandbox, &sources).into_iter();
    tracing::info!(
        components = config.handlers.len() + deployed.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "handlers compiled"
    );

    let mut handlers = HashMap::new();
    for (handler, component) in config.handlers.iter().zip(compiled.by_ref()) {
        let loaded = component
            .and_then(|c| {
                sandbox.handler(handler, &c, allowed_models(&models, &handler.models), Origin::Config)
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: handler '{}': component {}: {e}",
                    config.source.display(),
                    handler.name,
                    handler.component.display()
                )
            })?;
        handlers.insert(handler.name.clone(), Arc::new(loaded));
    }
    for ((deployment, _), component) in deployed.into_iter().zip(compiled) {
        let name = deployment.name.clone();
        let loaded = (|| -> Result<_, String> {
            if handlers.contains_key(&name) {
                return Err("the config file now defines a handler of this name".to_owned());
            }
            let tenant = config
                .tenant(&deployment.tenant)
                .ok_or_else(|| format!("tenant '{}' is no longer in the config", deployment.tenant))?;
            if let Some(public) = &tenant.signing_key
                && !deployment.verifies(public)
            {
                // The tenant's key changed (or was added) since the deploy: the operator must
                // deploy a component signed by the current key. The files stay for inspection.
                let reason = "its signature does not verify against the tenant's current signing_key; kept out of \
                              service until it is deployed again, signed by that key";
                audit.record(Event::DeployRefused, Some(&deployment.tenant), Some(&name), reason);
                return Err(reason.to_owned());
            }
            let handler = deployment
                .settings
                .resolve(&name, tenant, store.dir().join("blobs"))
                .map_err(|(field, message)| format!("{field}: {message}"))?;
            let component = component.map_err(|e| e.to_string())?;
            let origin = Origin::Deployed {
                sha256: deployment.sha256.clone(),
                deployed_at: deployment.deployed_at,
                signed: deployment.signed,
            };
            sandbox
                .handler(&handler, &component, allowed_models(&models, &handler.models), origin)
                .map_err(|e| e.to_string())
        })();
        match loaded {
            Ok(handler) => {
                tracing::info!(handler = %name, tenant = %deployment.tenant, "deployed handler loaded");
                handlers.insert(name, Arc::new(handler));
            }
            Err(e) => tracing::error!(handler = %name, "deployed handler not loaded: {e}"),
        }
    }

    let mut models_for_metrics: Vec<ModelHandle> = models.values().cloned().collect();
    models_for_metrics.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(AppState {
        handlers: RwLock::new(handlers),
        models,
        tenants,
        keys: RwLock::new(Arc::new(keys)),
        max_body_bytes: config.server.max_body_bytes,
        oip_max_priority: config.server.oip_max_priority,
        audit,
        metrics: api::metrics::registry(&models_for_metrics, &gpus, &decisions, &telemetry),
        gpus,
        decisions,
        telemetry,
        started: std::time::Instant::now(),
        draining: std::sync::atomic::AtomicBool::new(false),
        admin: AdminState {
            sandbox,
            store,
            config_handlers: config.handlers.iter().map(|h| h.name.clone()).collect(),
            lock: tokio::sync::Mutex::new(()),
            max_component_bytes: config.server.max_component_bytes,
        },
    })
}

/// Checks and compiles every component, as many at once as there are cores; results in order.
fn compile_all(
    sandbox: &Sandbox,
    sources: &[&[u8]],
) -> Vec<Result<wasmtime::component::Component, ComponentError>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(sources.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<_>>> = sources.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(bytes) = sources.get(i) else { break };
                    let result = sandbox.check_component(bytes);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err(ComponentError::Invalid("the compiler thread failed".to_owned())))
        })
        .collect()
}

fn load_keys(state_dir: &Path, config: &Config) -> KeyRing {
    KeyRing::load(state_dir, config.tenants.iter().map(|t| t.name.as_str()))
}

fn report_keys(keys: &KeyRing, config: &Config) {
    if !keys.has_admin_key() {
        tracing::warn!(
            "no admin key: the admin API refuses every call until `kiln admin add-key` makes one"
        );
    }
    for tenant in &config.tenants {
        let n = keys.count(&Principal::Tenant(tenant.name.clone()));
        if n == 0 {
            tracing::warn!(
                tenant = %tenant.name,
                "tenant has no API key: `kiln tenant add-key {}` makes one",
                tenant.name
            );
        } else {
            tracing::info!(tenant = %tenant.name, keys = n, "tenant keys loaded");
        }
    }
}

/// The SHA-256 of every key file: changes whenever a key is added or removed, even within one
/// timestamp tick and at the same size (a removal and an addition in one second).
fn key_files_fingerprint(state_dir: &Path, config: &Config) -> Vec<Option<String>> {
    std::iter::once(Principal::Admin)
        .chain(config.tenants.iter().map(|t| Principal::Tenant(t.name.clone())))
        .map(|p| std::fs::read(keys::keys_file(state_dir, &p)).ok().map(|bytes| crate::state::sha256_hex(&bytes)))
        .collect()
}

/// Reloads the key ring whenever a key file changes.
fn watch_keys(state: Arc<AppState>, config: Config) {
    tokio::spawn(async move {
        let state_dir = config.server.state_dir.clone();
        let mut seen = key_files_fingerprint(&state_dir, &config);
        loop {
            tokio::time::sleep(KEY_POLL).await;
            let now = key_files_fingerprint(&state_dir, &config);
            if now == seen {
                continue;
            }
            seen = now;
            let keys = load_keys(&state_dir, &config);
            tracing::info!("key files changed; keys reloaded");
            *api::write(&state.keys) = Arc::new(keys);
        }
    });
}

/// Serves `config`'s API on `listen` and its admin API on `admin_listen` until `shutdown`.
pub async fn serve(
    config: &Config,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = Arc::new(build(config)?);
    let listener = bind(listen).await?;
    let admin_listener = bind(admin_listen).await?;
    let (local, admin_local) = (listener.local_addr()?, admin_listener.local_addr()?);
    if !admin_local.ip().is_loopback() {
        tracing::warn!("the admin API listens on {admin_local}, which is not a loopback address");
    }
    watch_keys(Arc::clone(&state), config.clone());
    let handler_count = api::read(&state.handlers).len();
    tracing::info!(
        "listening on http://{local} ({} models, {} tenants, {handler_count} handlers); admin API on http://{admin_local}",
        state.models.len(),
        state.tenants.len(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (grace, timeout) = (config.server.drain_grace, config.server.drain_timeout);
    let (drain_started, drain_started_rx) = tokio::sync::oneshot::channel();
    let draining = Arc::clone(&state);
    tokio::spawn(async move {
        shutdown.await;
        // Readiness turns 503 at once; connections are still accepted for the grace period,
        // so a load balancer that probes readiness stops sending before the port closes.
        draining.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = drain_started.send(tokio::time::Instant::now());
        draining.telemetry.events.emit(kiln_wire::EventKind::Draining {
            grace_ms: grace.as_millis() as u64,
            timeout_ms: timeout.as_millis() as u64,
        });
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            timeout_ms = timeout.as_millis() as u64,
            "draining: readiness is 503; new connections are refused after the grace period"
        );
        tokio::time::sleep(grace).await;
        tracing::info!("no longer accepting connections; finishing the requests in flight");
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let main = axum::serve(listener, api::router(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(until_stopped(stopped.clone()));
    let admin = axum::serve(admin_listener, api::admin::router(state).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(until_stopped(stopped));
    // In-flight requests (and the batches they wait on) finish, bounded by the drain timeout
    // counted from the signal.
    let served = async { tokio::try_join!(main, admin).context("HTTP server failed") };
    let out_of_time = async {
        match drain_started_rx.await {
            Ok(started) => tokio::time::sleep_until(started + timeout).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = served => { served?; }
        () = out_of_time => {
            tracing::warn!("the drain timeout of {} ms passed with requests still in flight; exiting", timeout.as_millis());
        }
    }
    tracing::info!("drained");
    Ok(())
}

async fn bind(
    addr: SocketAddr,
) -> anyhow::Result<axum::serve::TapIo<TcpListener, impl FnMut(&mut tokio::net::TcpStream) + Send + 'static>>
{
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    // Without TCP_NODELAY a response written in several segments waits on the client's
    // delayed ACK: 40 ms added to every embeddings answer.
    Ok(listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    }))
}
