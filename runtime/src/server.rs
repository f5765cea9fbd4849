//! Start-up: load the models, compile the handlers (from the config and the state directory),
//! then serve the API and the admin API until shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::tenancy::audit::Audit;
use crate::config::{Config, DEFAULT_MEMORY_LIMIT_MIB};
use crate::fleet::gpu::Gpus;
use crate::fleet::start_model;
use crate::model::spec::ModelConfig;
use crate::deploy::models::{ModelRepository, RepositoryParts};
use crate::deploy::sources::ModelCache;
use crate::fleet::placement::Placer;
use crate::fleet::scaler::{self, DecisionLog};
use crate::telemetry::{EventLog, Telemetry};
use crate::tenancy::keys::{KeyRing, LiveKeys, Principal};
use crate::sandbox::Sandbox;
use crate::deploy::registry::{Handlers, Registry};
use crate::deploy::store::Store;
use crate::tenancy::Tenant;
use crate::tls::{LiveTls, ServerTls, TlsListener};

/// Events kept for followers of `/v1/events` that connect later.
const EVENT_HISTORY: usize = 500;

/// How often the key and certificate files are checked for changes (`kiln tenant add-key` on a
/// running server, a renewed certificate).
const KEY_POLL: Duration = Duration::from_secs(1);

/// Builds everything `config` describes. Models keep loading in the background; the server is
/// live at once and ready when every model has warmed up.
pub fn build(config: &Config) -> anyhow::Result<AppState> {
    let gpus = Gpus::detect(&config.gpus);
    gpus.spawn_poller(config.gpus.poll_interval)
        .context("cannot start the GPU poller")?;
    let placer = Placer::new(Arc::clone(&gpus), config.scaler.max_gpu_utilization);
    let events = Arc::new(EventLog::new(EVENT_HISTORY));
    // Each model's served versions, together, in the config's order.
    let mut grouped: Vec<Vec<ModelConfig>> = Vec::new();
    for model in &config.models {
        match grouped.last_mut() {
            Some(versions) if versions[0].key() == model.key() => versions.push(model.clone()),
            _ => grouped.push(vec![model.clone()]),
        }
    }
    let mut config_models = Vec::with_capacity(grouped.len());
    for versions in grouped {
        // A remote file is fetched, and a pinned one checked, by the repository before it starts.
        let deferred = versions.iter().any(|m| m.source.is_some() || m.sha256.is_some());
        let handles = match deferred {
            true => None,
            false => Some(
                versions
                    .iter()
                    .map(|model| {
                        start_model(model, &placer, Arc::clone(&events), config.server.load_timeout).map_err(|e| {
                            anyhow::anyhow!("{}: cannot start model '{}': {e}", config.source.display(), model.name)
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        };
        let name = versions[0].key().to_owned();
        let users: Vec<String> =
            config.tenants.iter().filter(|t| t.models.contains(&name)).map(|t| t.name.clone()).collect();
        config_models.push((versions, handles, users));
    }
    let decisions = Arc::new(DecisionLog::new(config.scaler.history, Arc::clone(&events)));
    let telemetry = Arc::new(Telemetry::new(Arc::clone(&events)));
    let tenants: HashMap<String, Arc<Tenant>> = config
        .tenants
        .iter()
        .map(|t| (t.name.clone(), Arc::new(Tenant::new(t.clone()))))
        .collect();
    let state_dir = &config.server.state_dir;
    let store = Store::open(state_dir)
        .with_context(|| format!("cannot open the state directory {}", state_dir.display()))?;
    let keys = Arc::new(LiveKeys::load(&config.server.keys_dir, config.tenants.iter().map(|t| t.name.clone()).collect()));
    report_keys(&keys.current(), config);

    let max_memory = config
        .tenants
        .iter()
        .map(|t| t.quota.limits.memory_limit_bytes)
        .max()
        .unwrap_or(DEFAULT_MEMORY_LIMIT_MIB << 20);
    let metered = config.tenants.iter().any(|t| t.quota.limits.fuel.is_some());
    let sandbox = Sandbox::new(config.server.max_instances, max_memory, metered, config.server.slot_reset)
        .map_err(|e| anyhow::anyhow!("cannot create the sandbox engine: {e}"))?;

    let audit = Arc::new(Audit::open(state_dir));
    let base = config.base().to_path_buf();
    let repository = Arc::new(
        ModelRepository::restore(RepositoryParts {
            config_models,
            placer: placer.clone(),
            store: store.clone(),
            cache: Arc::new(ModelCache::new(
                config.server.cache_dir.clone(),
                config.server.cache_max_bytes,
                config.server.allow_unpinned,
            )),
            tenant_private_sources: config.server.tenant_private_sources,
            load_timeout: config.server.load_timeout,
            tenant_fetch_timeout: config.server.tenant_fetch_timeout,
            base,
            tenants: config.tenants.iter().map(|t| (t.name.clone(), t.quota.clone())).collect(),
            audit: Arc::clone(&audit),
            events: Arc::clone(&events),
            restore_kept: config.server.cluster.is_none(),
        })
        .with_context(|| format!("cannot read the models kept in {}", state_dir.display()))?,
    );
    repository.start_fetches();
    let models = Arc::clone(repository.table());
    scaler::spawn(Arc::clone(&models), placer.clone(), &config.scaler, Arc::clone(&decisions))
        .context("cannot start the scaler")?;
    let activity = Arc::clone(sandbox.activity());
    let restore = Handlers {
        source: &config.source,
        handlers: &config.handlers,
        tenants: &config.tenants,
        restore_deployed: config.server.cluster.is_none(),
    };
    let registry = Registry::restore(&restore, sandbox, store, Arc::clone(&models), Arc::clone(&audit), Arc::clone(&events))?;
    let requests = Arc::new(api::requests::Requests::new(config.server.cluster.clone()));
    let metrics = api::metrics::registry(&models, &gpus, &decisions, &telemetry, &activity, &requests);
    Ok(AppState {
        registry,
        repository,
        models,
        tenants,
        keys,
        requests,
        cluster: config.server.cluster.clone(),
        max_body_bytes: config.server.max_body_bytes,
        oip_max_priority: config.server.oip_max_priority,
        audit,
        metrics,
        gpus,
        decisions,
        telemetry,
        started: std::time::Instant::now(),
        draining: std::sync::atomic::AtomicBool::new(false),
        max_component_bytes: config.server.max_component_bytes,
    })
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

/// `config` with every `oci://` handler's component fetched (or found in the cache) and
/// checked, and its `component` pointing at the file: before anything compiles or listens, so
/// a replica is not ready until its handlers are here.
async fn fetch_oci_handlers(config: &Config) -> anyhow::Result<Config> {
    use crate::deploy::oci::{Access, HandlerCache, fetch_for_config};
    let access = Access::load(config.server.registry_auth.as_deref(), config.server.registry_ca.as_deref())?;
    let cache = HandlerCache::new(config.server.cache_dir.join("oci"));
    let mut fetched = config.clone();
    for oci in &config.oci_handlers {
        let tenant = config.tenants.iter().find(|t| t.name == oci.tenant).context("a handler's tenant is declared")?;
        let path = fetch_for_config(&cache, &access, &oci.name, tenant, &oci.reference, &oci.settings, config.server.allow_unpinned)
            .await
            .with_context(|| config.source.display().to_string())?;
        if let Some(handler) = fetched.handlers.iter_mut().find(|h| h.name == oci.name) {
            handler.component = path;
        }
    }
    Ok(fetched)
}

/// Serves `config`'s API on `listen`, its gRPC API on `[server].grpc_listen` (unless off) and its
/// admin API on `admin_listen` until `shutdown`.
pub async fn serve(
    config: &Config,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let fetched;
    let config = if config.oci_handlers.is_empty() {
        config
    } else {
        fetched = fetch_oci_handlers(config).await?;
        &fetched
    };
    // Certificates are read before anything else starts, so that a wrong file stops the
    // server at once; each listener's are read again when they change.
    let tls = &config.server.tls;
    let serving_tls = live_tls(tls.serving(), true)?;
    let admin_tls = live_tls(tls.admin(), true)?;
    // A listener that is off reads no certificate.
    let grpc_tls = live_tls(tls.grpc().filter(|_| config.server.grpc_listen.is_some()), false)?;
    let metrics_tls = live_tls(tls.metrics().filter(|_| config.server.metrics_listen.is_some()), true)?;
    start_traces(config)?;
    crate::model::cores::machine().set_spreading(config.server.spread_idle_cores);
    let state = Arc::new(build(config)?);
    let scheme = |tls: &Option<Arc<LiveTls>>| if tls.is_some() { "https" } else { "http" };
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let admin_listener = TcpListener::bind(admin_listen).await.with_context(|| format!("cannot listen on {admin_listen} (admin_listen)"))?;
    let grpc_listener = match config.server.grpc_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (grpc_listen)"))?),
        None => None,
    };
    let grpc_local = grpc_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let metrics_listener = match config.server.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?),
        None => None,
    };
    if let Some(listener) = &metrics_listener {
        tracing::info!("metrics without a key on {}://{}/metrics", scheme(&metrics_tls), listener.local_addr()?);
    }
    let (local, admin_local) = (listener.local_addr()?, admin_listener.local_addr()?);
    if !admin_local.ip().is_loopback() {
        tracing::warn!("the admin API listens on {admin_local}, which is not a loopback address");
    }
    state.keys.watch(KEY_POLL);
    let handler_count = state.registry.list().len();
    let grpc_text = grpc_local.map_or_else(|| "off".to_owned(), |a| format!("{a}{}", if grpc_tls.is_some() { " (TLS)" } else { "" }));
    let (models, tenants) = (state.models.snapshot().len(), state.tenants.len());
    let (scheme_main, scheme_admin) = (scheme(&serving_tls), scheme(&admin_tls));
    let client_certs = if tls.admin_client_ca.is_some() { " (client certificates required)" } else { "" };
    tracing::info!(
        "listening on {scheme_main}://{local} ({models} models, {tenants} tenants, {handler_count} handlers); gRPC on {grpc_text}; admin API on {scheme_admin}://{admin_local}{client_certs}"
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
    let main = serve_http(listener, serving_tls, api::routes::serving(Arc::clone(&state)), until_stopped(stopped.clone()))?;
    let grpc_stopped = stopped.clone();
    let grpc_state = Arc::clone(&state);
    let grpc = async move {
        let Some(listener) = grpc_listener else { return Ok(()) };
        let mut server = tonic::transport::Server::builder();
        let server = server.add_service(api::grpc::service(grpc_state));
        match grpc_tls {
            Some(live) => {
                let incoming = TlsListener::new(listener, live)?.into_stream();
                server.serve_with_incoming_shutdown(incoming, until_stopped(grpc_stopped)).await
            }
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                server.serve_with_incoming_shutdown(incoming, until_stopped(grpc_stopped)).await
            }
        }
        .context("gRPC server failed")
    };
    let metrics_stopped = stopped.clone();
    let metrics_state = Arc::clone(&state);
    let metrics: Serving = match metrics_listener {
        Some(listener) => serve_http(listener, metrics_tls, api::routes::metrics(metrics_state), until_stopped(metrics_stopped))?,
        None => Box::pin(std::future::ready(Ok(()))),
    };
    let admin = serve_http(admin_listener, admin_tls, api::routes::admin(state), until_stopped(stopped))?;
    // In-flight requests (and the batches they wait on) finish, bounded by the drain timeout
    // counted from the signal.
    let served = async {
        let http = async { tokio::try_join!(main, admin, metrics).context("HTTP server failed") };
        tokio::try_join!(http, grpc)
    };
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

type Serving = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// Exports traces to `[server] otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, when set.
fn start_traces(config: &Config) -> anyhow::Result<()> {
    let from_env = || std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.trim().is_empty());
    let endpoint = match (&config.server.otlp_endpoint, from_env()) {
        (Some(endpoint), _) => endpoint.clone(),
        (None, Some(endpoint)) => crate::config::validate::check_otlp_endpoint(&endpoint).map_err(|m| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {m}"))?,
        (None, None) => return Ok(()),
    };
    let instance = config.server.cluster.clone().unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "kiln".to_owned()));
    crate::telemetry::spans::start(&crate::telemetry::spans::OtlpConfig { endpoint, sample_ratio: config.server.otlp_sample_ratio, instance })
}

/// `tls` read and watched, when a listener has it.
fn live_tls(tls: Option<ServerTls>, http1: bool) -> anyhow::Result<Option<Arc<LiveTls>>> {
    let Some(tls) = tls else { return Ok(None) };
    let live = LiveTls::load(&tls, http1)?;
    live.watch(KEY_POLL);
    Ok(Some(live))
}

/// `router` on `listener` until `stop`, over TLS when `tls` is given; callers' addresses reach
/// the handlers as connect info either way.
fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<LiveTls>>,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Serving> {
    use std::future::IntoFuture as _;
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    Ok(match tls {
        Some(live) => {
            // A tap that does nothing: axum gives connect info for tapped listeners of any kind.
            let listener = TlsListener::new(listener, live)?.tap_io(|_| {});
            Box::pin(axum::serve(listener, service).with_graceful_shutdown(stop).into_future())
        }
        None => {
            // Without TCP_NODELAY a response written in several segments waits on the client's
            // delayed ACK: 40 ms added to every embeddings answer.
            let listener = listener.tap_io(|stream| {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
            });
            Box::pin(axum::serve(listener, service).with_graceful_shutdown(stop).into_future())
        }
    })
}
