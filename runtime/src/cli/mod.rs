//! The operator commands beside `serve`: keys, signing, and deploying through the admin API.

pub mod args;
pub mod author;
pub mod bench;
pub mod connect;
pub mod oci;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::Config;

use crate::deploy::check_name;
use crate::deploy::sources::{self, ModelCache, Progress};
use crate::tenancy::keys::{self, Principal};
use crate::files::write_atomic;

/// `kiln tenant add-key` / `kiln admin add-key`: prints the new key once; only its hash is kept.
pub fn add_key(config: &Config, principal: &Principal) -> anyhow::Result<()> {
    check_principal(config, principal)?;
    let key = keys::add(&config.server.keys_dir, principal)?;
    let file = keys::keys_file(&config.server.keys_dir, principal);
    println!("{key}");
    eprintln!(
        "A new API key for {principal}: shown once, above. Only its hash is stored, in {}.\n\
         A running server picks it up within a second. Use it as: Authorization: Bearer <key>",
        file.display()
    );
    Ok(())
}

/// `kiln tenant keys` / `kiln admin keys`: ids and creation times, never secrets.
pub fn list_keys(config: &Config, principal: &Principal, json: bool) -> anyhow::Result<()> {
    check_principal(config, principal)?;
    let records = keys::list(&config.server.keys_dir, principal);
    if json {
        let list: Vec<Value> = records.iter().map(|r| serde_json::json!({ "id": r.id(), "created": r.created() })).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if records.is_empty() {
        eprintln!("{principal} has no keys");
    }
    for r in records {
        println!("{}  created {}", r.id(), r.created());
    }
    Ok(())
}

/// `kiln tenant ls`: the config's tenants, each with its key count, models, signing and the
/// quotas a caller meets first.
pub fn list_tenants(config: &Config, json: bool) -> anyhow::Result<()> {
    let rows: Vec<Value> = config
        .tenants
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "keys": keys::list(&config.server.keys_dir, &Principal::Tenant(t.name.clone())).len(),
                "models": t.models,
                "signed_deployments": t.signing_key.is_some(),
                "requests_per_second": t.quota.requests_per_second,
                "max_concurrent": t.quota.max_concurrent,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<20} {:>4} {:<7} {:>8} {:>9} MODELS", "TENANT", "KEYS", "SIGNED", "RATE/S", "IN-FLIGHT")?;
    for (t, row) in config.tenants.iter().zip(&rows) {
        writeln!(
            out,
            "{:<20} {:>4} {:<7} {:>8} {:>9} {}",
            t.name,
            row["keys"],
            if t.signing_key.is_some() { "yes" } else { "no" },
            t.quota.requests_per_second,
            t.quota.max_concurrent,
            t.models.join(",")
        )?;
    }
    Ok(())
}

/// `kiln tenant remove-key` / `kiln admin remove-key`.
pub fn remove_key(config: &Config, principal: &Principal, id: &str) -> anyhow::Result<()> {
    check_principal(config, principal)?;
    if !keys::remove(&config.server.keys_dir, principal, id)? {
        bail!("{principal} has no key with id {id} (see `kiln tenant keys`)");
    }
    eprintln!("removed key {id} of {principal}; a running server stops accepting it within a second");
    Ok(())
}

fn check_principal(config: &Config, principal: &Principal) -> anyhow::Result<()> {
    if let Principal::Tenant(name) = principal
        && config.tenant(name).is_none() {
            bail!(
                "tenant '{name}' is not declared in {}; add a [[tenant]] section first",
                config.source.display()
            );
        }
    Ok(())
}

/// `kiln keygen`: writes `PREFIX.key` (private, PKCS#8, base64) and `PREFIX.pub`.
pub fn keygen(prefix: &Path) -> anyhow::Result<()> {
    let private = prefix.with_extension("key");
    let public_file = prefix.with_extension("pub");
    if private.exists() {
        bail!("{} exists; refusing to overwrite a private key", private.display());
    }
    let (pkcs8, public) = keys::keygen()?;
    write_atomic(&private, format!("{}\n", keys::encode_base64(&pkcs8)).as_bytes())
        .with_context(|| format!("cannot write {}", private.display()))?;
    let public = keys::encode_base64(&public);
    write_atomic(&public_file, format!("{public}\n").as_bytes())
        .with_context(|| format!("cannot write {}", public_file.display()))?;
    println!("signing_key = \"{public}\"");
    eprintln!(
        "wrote {} (keep it secret) and {}.\nPut the line above in the tenant's [[tenant]] section: \
         from then on its deployments must be signed (`kiln sign`).",
        private.display(),
        public_file.display()
    );
    Ok(())
}

/// What `kiln sign` signs: a component, as one handler of one tenant, with its models and
/// priorities (the same flags as `kiln handler deploy`).
#[derive(Debug, Clone, clap::Args)]
pub struct SignedDeployment {
    /// The component (.wasm).
    pub component: PathBuf,
    /// The handler name it will be deployed as.
    #[arg(long)]
    pub handler: String,
    /// The tenant it will be deployed for.
    #[arg(long)]
    pub tenant: String,
    /// Models it may load (default: all of the tenant's).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// The scheduling priority it will be deployed with (0-9).
    #[arg(long)]
    pub priority: Option<u8>,
    /// The highest priority its requests may ask for (0-9).
    #[arg(long)]
    pub max_priority: Option<u8>,
}

/// `kiln sign`: writes the signature (base64) of a deployment manifest: the component's SHA-256,
/// handler name, tenant, models and priorities.
pub fn sign(what: &SignedDeployment, key: &Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let component = &what.component;
    let bytes = std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let text = std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let pkcs8 = keys::decode_base64(&text)
        .with_context(|| format!("{} is not a key written by `kiln keygen`", key.display()))?;
    let models = (!what.models.is_empty()).then_some(what.models.as_slice());
    let manifest = keys::deployment_manifest(
        &what.handler,
        &what.tenant,
        &crate::files::sha256_hex(&bytes),
        models,
        what.priority,
        what.max_priority,
    );
    let signature = keys::sign(&pkcs8, manifest.as_bytes()).with_context(|| key.display().to_string())?;
    let out = out.unwrap_or_else(|| {
        let mut name = component.as_os_str().to_owned();
        name.push(".sig");
        PathBuf::from(name)
    });
    write_atomic(&out, format!("{}\n", keys::encode_base64(&signature)).as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {} (for handler '{}' of tenant '{}')", out.display(), what.handler, what.tenant);
    Ok(())
}

/// Where and how to reach the admin API.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    pub url: String,
    pub key: String,
    pub tls: crate::tls::ClientTls,
}

/// A deployment as the CLI sends it (`kiln handler deploy`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct DeployRequest {
    /// The component (.wasm).
    pub component: PathBuf,
    /// The handler's name (its URL is /v1/handlers/NAME).
    #[arg(long)]
    pub name: String,
    /// The tenant that owns it.
    #[arg(long)]
    pub tenant: String,
    /// Signature file from `kiln sign` (required when the tenant has a signing_key).
    #[arg(long)]
    pub signature: Option<PathBuf>,
    /// Models the handler may load (default: all of the tenant's).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Guest memory limit, at most the tenant's quota.
    #[arg(long)]
    pub memory_limit_mib: Option<u64>,
    /// Guest wall-clock deadline (like 2s), at most the tenant's quota.
    #[arg(long, value_parser = args::parse_duration)]
    pub deadline: Option<std::time::Duration>,
    /// The previous release's --deadline, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "deadline")]
    pub deadline_ms: Option<u64>,
    /// Scheduling priority of the handler's inference (0-9).
    #[arg(long)]
    pub priority: Option<u8>,
    /// The highest priority a request may ask for with kiln-priority.
    #[arg(long)]
    pub max_priority: Option<u8>,
    /// Give the handler a response cache: answers its guest marks `cache-control: public,
    /// max-age=N` are kept for at most this long (like 60s; any --cache-* turns the cache on).
    #[arg(long, value_parser = args::parse_duration)]
    pub cache_ttl: Option<std::time::Duration>,
    /// The previous release's --cache-ttl, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "cache_ttl")]
    pub cache_ttl_ms: Option<u64>,
    /// The response cache's most answers kept at once.
    #[arg(long)]
    pub cache_max_entries: Option<u64>,
    /// The response cache's most bytes of answers kept at once.
    #[arg(long)]
    pub cache_max_bytes: Option<u64>,
}

pub fn deploy(target: &AdminTarget, request: &DeployRequest) -> anyhow::Result<()> {
    check_name(&request.name).map_err(|m| anyhow::anyhow!("--name {m}"))?;
    let bytes = std::fs::read(&request.component)
        .with_context(|| format!("cannot read {}", request.component.display()))?;
    let mut query = vec![format!("tenant={}", request.tenant)];
    if !request.models.is_empty() {
        query.push(format!("models={}", request.models.join(",")));
    }
    for (k, v) in [
        ("memory_limit_mib", request.memory_limit_mib),
        ("deadline_ms", request.deadline.map(millis).or(request.deadline_ms)),
        ("priority", request.priority.map(u64::from)),
        ("max_priority", request.max_priority.map(u64::from)),
        ("cache_ttl_ms", request.cache_ttl.map(millis).or(request.cache_ttl_ms)),
        ("cache_max_entries", request.cache_max_entries),
        ("cache_max_bytes", request.cache_max_bytes),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={v}"));
        }
    }
    let mut headers = Vec::new();
    if let Some(sig) = &request.signature {
        let text = std::fs::read_to_string(sig).with_context(|| format!("cannot read {}", sig.display()))?;
        headers.push((kiln_wire::headers::SIGNATURE, text.trim().to_owned()));
    }
    let path = format!("/v1/handlers/{}?{}", request.name, query.join("&"));
    let value = call(target, http::Method::PUT, &path, bytes, &headers)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// Whole milliseconds, at least 1 for any non-zero duration (the admin API counts in them).
fn millis(d: std::time::Duration) -> u64 {
    kiln_wire::cli::whole(d, std::time::Duration::from_millis(1))
}

pub fn undeploy(target: &AdminTarget, name: &str) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("handler name {m}"))?;
    let value = call(target, http::Method::DELETE, &format!("/v1/handlers/{name}"), Vec::new(), &[])?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

pub fn list_handlers(target: &AdminTarget, json: bool) -> anyhow::Result<()> {
    let value = call(target, http::Method::GET, "/v1/handlers", Vec::new(), &[])?;
    if json {
        return print_json(&value);
    }
    let list: kiln_wire::HandlerList =
        serde_json::from_value(value).context("the admin API answered something other than a handler list")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<24} {:<16} {:<9} MODELS", "HANDLER", "TENANT", "ORIGIN")?;
    for h in list.handlers {
        let origin = match h.origin {
            kiln_wire::HandlerOrigin::Config => "config",
            kiln_wire::HandlerOrigin::Deployed => "deployed",
        };
        writeln!(out, "{:<24} {:<16} {:<9} {}", h.name, h.tenant, origin, h.models.join(","))?;
    }
    Ok(())
}

/// `kiln model load NAME [--spec FILE]`: with a spec (a `[[model]]` section's fields, TOML or
/// JSON, and `tenants`), load or replace the model from it; without, load it again from the
/// repository. A relative `path` in the spec is made absolute against the spec's own folder.
pub fn load_model(target: &AdminTarget, name: &str, spec: Option<&Path>) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("model name {m}"))?;
    let Some(file) = spec else {
        call(target, http::Method::POST, &format!("/v2/repository/models/{name}/load"), Vec::new(), &[])?;
        return show_model(target, name);
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut fields: serde_json::Map<String, Value> = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", file.display()))?
    } else {
        let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.message()))?;
        serde_json::from_value(serde_json::to_value(table)?)?
    };
    if let Some(Value::String(path)) = fields.get("path")
        && Path::new(path).is_relative()
    {
        let folder = std::path::absolute(file)?.parent().map(Path::to_path_buf).unwrap_or_default();
        fields.insert("path".to_owned(), Value::String(folder.join(path).display().to_string()));
    }
    let body = serde_json::to_vec(&Value::Object(fields))?;
    let value = call(target, http::Method::PUT, &format!("/v1/models/{name}"), body, &[])?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `kiln model unload NAME`: stop serving it, keep it in the repository.
pub fn unload_model(target: &AdminTarget, name: &str) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("model name {m}"))?;
    call(target, http::Method::POST, &format!("/v2/repository/models/{name}/unload"), Vec::new(), &[])?;
    show_model(target, name)
}

/// `kiln model delete NAME`: stop serving a model loaded through the API and forget it.
pub fn delete_model(target: &AdminTarget, name: &str) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("model name {m}"))?;
    let value = call(target, http::Method::DELETE, &format!("/v1/models/{name}"), Vec::new(), &[])?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `kiln model pause|resume|flush|reset-stats NAME`.
pub fn control_model(target: &AdminTarget, name: &str, action: &str) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("model name {m}"))?;
    let value = call(target, http::Method::POST, &format!("/v1/models/{name}/{action}"), Vec::new(), &[])?;
    println!("{}", value["done"].as_str().unwrap_or("done"));
    Ok(())
}

/// `kiln model set NAME ...`: change a served model's knobs (a JSON object of them).
pub fn tune_model(target: &AdminTarget, name: &str, knobs: &Value) -> anyhow::Result<()> {
    check_name(name).map_err(|m| anyhow::anyhow!("model name {m}"))?;
    let value = call(target, http::Method::PATCH, &format!("/v1/models/{name}"), serde_json::to_vec(knobs)?, &[])?;
    println!("{}", value["done"].as_str().unwrap_or("done"));
    Ok(())
}

/// `kiln request cancel ID`.
pub fn cancel_request(target: &AdminTarget, id: &str) -> anyhow::Result<()> {
    call(target, http::Method::DELETE, &format!("/v1/requests/{id}"), Vec::new(), &[])?;
    println!("cancelled {id}");
    Ok(())
}

/// `kiln request ls`: every request in flight, oldest first.
pub fn list_requests(target: &AdminTarget, json: bool) -> anyhow::Result<()> {
    let value = call(target, http::Method::GET, "/v1/requests", Vec::new(), &[])?;
    if json {
        return print_json(&value["requests"]);
    }
    let list: Vec<kiln_wire::RequestInFlight> =
        serde_json::from_value(value["requests"].clone()).context("the admin API answered something other than a request list")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<24} {:>10} {:<7} PATH", "ID", "AGE_MS", "METHOD")?;
    for r in list {
        writeln!(out, "{:<24} {:>10.1} {:<7} {}", r.id, r.age_ms, r.method, r.path)?;
    }
    Ok(())
}

fn show_model(target: &AdminTarget, name: &str) -> anyhow::Result<()> {
    let value = call(target, http::Method::GET, &format!("/v1/models/{name}"), Vec::new(), &[])?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `kiln model ls`: every model of the repository, served or not.
pub fn list_models(target: &AdminTarget, json: bool) -> anyhow::Result<()> {
    let value = call(target, http::Method::GET, "/v1/models", Vec::new(), &[])?;
    if json {
        return print_json(&value);
    }
    let list: kiln_wire::ModelList =
        serde_json::from_value(value).context("the admin API answered something other than a model list")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<24} {:<7} {:<12} {:<9} {:<20} REASON", "MODEL", "ORIGIN", "STATE", "REPLICAS", "TENANTS")?;
    for m in list.models {
        writeln!(
            out,
            "{:<24} {:<7} {:<12} {:<9} {:<20} {}",
            m.name,
            m.origin,
            m.state,
            m.replicas.len(),
            m.tenants.join(","),
            m.reason
        )?;
    }
    Ok(())
}

fn model_cache(config: &Config, allow_unpinned: bool) -> ModelCache {
    ModelCache::new(config.server.cache_dir.clone(), config.server.cache_max_bytes, allow_unpinned)
}

/// `kiln model cache pull`: downloads `source` into the config's model cache, with a progress bar on a
/// terminal; prints the file's digest and path.
pub fn pull_model(config: &Config, source: &str, sha256: Option<&str>, allow_unpinned: bool) -> anyhow::Result<()> {
    let remote = sources::parse_source(source)
        .map_err(anyhow::Error::msg)?
        .ok_or_else(|| anyhow::anyhow!("'{source}' is a local path: it needs no pull"))?;
    let pin = sha256.map(sources::parse_digest).transpose().map_err(anyhow::Error::msg)?;
    let cache = model_cache(config, allow_unpinned || config.server.allow_unpinned);
    let bar = indicatif::ProgressBar::no_length();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let fetched = cache.fetch(&remote, pin.as_deref(), &crate::deploy::sources::Requester::Operator, &mut |progress| match progress {
        Progress::Started { at, total } => {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(at);
            bar.reset_eta();
        }
        Progress::Advanced(n) => bar.inc(n),
    });
    bar.finish_and_clear();
    let fetched = fetched?;
    let mut out = std::io::stdout().lock();
    let how = if fetched.downloaded { "downloaded" } else { "already cached" };
    writeln!(out, "{how}: {} bytes\nsha256 {}\n{}", fetched.bytes, fetched.sha256, fetched.path.display())?;
    if pin.is_none() {
        writeln!(out, "pin it in the model's definition: sha256 = \"{}\"", fetched.sha256)?;
    }
    Ok(())
}

/// `kiln model cache ls`: the model cache's files, least recently used first.
pub fn list_cache(config: &Config, json: bool) -> anyhow::Result<()> {
    let cache = model_cache(config, false);
    let files = cache.list().with_context(|| format!("cannot read the model cache {}", cache.dir().display()))?;
    if json {
        let list: Vec<Value> = files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "sha256": f.sha256,
                    "bytes": f.bytes,
                    "idle_seconds": f.last_used.elapsed().map_or(0, |d| d.as_secs()),
                    "sources": f.meta.sources,
                })
            })
            .collect();
        return print_json(&Value::Array(list));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<64} {:>12} {:>10} SOURCES", "SHA256", "BYTES", "IDLE")?;
    for file in files {
        let idle = file.last_used.elapsed().map_or(0, |d| d.as_secs());
        writeln!(out, "{:<64} {:>12} {:>9}s {}", file.sha256, file.bytes, idle, file.meta.sources.join(" "))?;
    }
    Ok(())
}

/// `kiln model cache rm`: removes one file from the model cache.
pub fn remove_cached(config: &Config, sha256: &str) -> anyhow::Result<()> {
    let digest = sources::parse_digest(sha256).map_err(anyhow::Error::msg)?;
    let cache = model_cache(config, false);
    if !cache.remove(&digest).with_context(|| format!("cannot remove {digest} from {}", cache.dir().display()))? {
        bail!("{digest} is not in the model cache {}", cache.dir().display());
    }
    println!("removed {digest}");
    Ok(())
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub use kiln_wire::cli::Unreachable;

/// `error` as an [`Unreachable`] when it is a failure to connect, else as it is.
fn unreachable_or(what: &str, error: hyper_util::client::legacy::Error) -> anyhow::Error {
    if error.is_connect() {
        let why = std::error::Error::source(&error).map_or_else(|| error.to_string(), ToString::to_string);
        return Unreachable(format!("cannot reach {what}: {why}")).into();
    }
    anyhow::Error::new(error).context(format!("no answer from {what}"))
}

/// The exit code for an error: 3 when a server could not be reached, else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|e| e.is::<Unreachable>()) {
        kiln_wire::cli::EXIT_UNREACHABLE
    } else {
        kiln_wire::cli::EXIT_FAILED
    }
}

/// One admin API call; a non-2xx answer becomes an error carrying the server's message.
fn call(
    target: &AdminTarget,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> anyhow::Result<Value> {
    let url = format!("{}{path}", target.url.trim_end_matches('/'));
    let mut builder = http::Request::builder()
        .method(method)
        .uri(&url)
        .header(http::header::AUTHORIZATION, format!("Bearer {}", target.key));
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let request = builder.body(Full::new(Bytes::from(body)))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = runtime.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connect::http(&target.tls, connect::is_https(&url))?);
        let response = client
            .request(request)
            .await
            .map_err(|e| unreachable_or(&format!("the admin API at {}", target.url), e))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })?;
    if !status.is_success() {
        let message = match serde_json::from_slice::<kiln_wire::ErrorBody>(&body) {
            Ok(error) => error.error,
            Err(_) => String::from_utf8_lossy(&body).into_owned(),
        };
        bail!("{url}: {status}: {message}");
    }
    let value: Value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok(value)
}

/// `kiln health`: whether the server at `url` answers its readiness probe with 200 within
/// `timeout`; an error saying what it answered, or why it could not be reached, otherwise.
pub fn health(url: &str, tls: &crate::tls::ClientTls, timeout: std::time::Duration) -> anyhow::Result<()> {
    let probe = format!("{}/v2/health/ready", url.trim_end_matches('/'));
    let request = http::Request::get(&probe).body(Full::new(Bytes::new()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let probe_it = async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connect::http(tls, connect::is_https(&probe))?);
        let response = client.request(request).await.map_err(|e| unreachable_or(&probe, e))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let answer = runtime.block_on(async { tokio::time::timeout(timeout, probe_it).await });
    let (status, body) = answer.map_err(|_| Unreachable(format!("cannot reach {probe}: no answer within {timeout:?}")))??;
    if status != http::StatusCode::OK {
        bail!("{probe}: not ready ({status}): {}", String::from_utf8_lossy(&body).chars().take(200).collect::<String>());
    }
    println!("ready");
    Ok(())
}

/// `kiln devices`: CUDA as libtorch sees it (this is what proves libtorch_cuda is linked), and
/// the GPU inventory.
pub fn devices(config: &crate::fleet::gpu::GpuConfig, json: bool) -> anyhow::Result<()> {
    use crate::model::backend::torch::cuda;
    let cuda_devices = cuda::device_count();
    let cuda_available = cuda::is_available();
    let cudnn = cuda::cudnn_is_available();
    let cuda_library = cuda::load().as_ref().err();
    let gpus = crate::fleet::gpu::Gpus::detect(config).latest();
    if json {
        let report = serde_json::json!({
            "cuda_available": cuda_available,
            "cuda_devices": cuda_devices,
            "cudnn": cudnn,
            // Why libtorch's CUDA library did not load (a CPU-only install or image); null when it did.
            "cuda_library_error": cuda_library,
            "gpus": *gpus,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let cuda_line = match (cuda_available, cuda_library) {
        (true, _) => format!("yes, {cuda_devices} devices, cuDNN {}", if cudnn { "yes" } else { "no" }),
        (false, Some(why)) => format!("no (a CPU-only libtorch: {why})"),
        (false, None) => "no (the CUDA library is loaded, but it sees no device)".to_owned(),
    };
    println!("libtorch CUDA: {cuda_line}");
    if gpus.is_empty() {
        println!("GPUs: none (models run on the CPU)");
    }
    for g in gpus.iter() {
        println!(
            "cuda:{}  {}{}  {} / {} MiB used  {}% busy  {} C  {:.0} / {:.0} W  {}",
            g.index,
            g.name,
            if g.simulated { " (simulated)" } else { "" },
            g.memory_used_bytes >> 20,
            g.memory_total_bytes >> 20,
            g.utilization_percent,
            g.temperature_celsius,
            g.power_watts,
            g.power_limit_watts,
            g.uuid
        );
    }
    Ok(())
}
