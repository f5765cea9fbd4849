//! Model files from elsewhere: an `https://` URL or `hf://ORG/REPO/FILE@REVISION`, pinned by
//! SHA-256 and kept in a content-addressed cache ([`ModelCache`]).
//!
//! A download streams to a partial file with the digest computed on the way; an interrupted one
//! resumes where it stopped with an HTTP range request (the bytes already there are hashed
//! again first); the finished file is checked against its pin and only then renamed into the
//! cache as `sha256/HEX`. A wrong digest is refused with both digests named, and nothing is
//! kept. Loads of the same file at once download it once: the second waits for the first and
//! finds it cached. Past the cache's size limit, the least recently used files that no served
//! model uses are removed.
//!
//! Fetches block: they run on their own thread (the server's blocking pool, or the CLI's main
//! thread), each with a small runtime of its own, so a download never takes time from the
//! threads that serve requests.
//!
//! A tenant's fetch ([`Requester::Tenant`]) is held apart from everyone else's: it is served a
//! cached file only if that tenant fetched the digest itself (so naming another tenant's digest
//! with a dead or private source gets nothing, and says nothing), it downloads into a partial
//! file of its own that is deleted whatever the outcome (nobody else's download can stall on it
//! or resume from it), it stops at the bytes its quota has left (refused up front when the
//! server announces more), within an overall deadline and as soon as its request ends, it never
//! carries the operator's `HF_TOKEN` or goes through the environment's proxy, and a wrong pin
//! does not tell it the file's real digest.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use kiln_codec::source::{Remote, parse_digest, parse_source};

use crate::files::{sha256_hex, sync_dir};
use crate::sync::MutexExt;

/// Where `hf://` sources resolve, unless `HF_ENDPOINT` says otherwise (as Hugging Face's own
/// tools read it).
pub const HF_ENDPOINT: &str = "https://huggingface.co";

/// The URL a remote source is fetched from: an `hf://` source at `HF_ENDPOINT`'s hub.
pub fn url_of(remote: &Remote) -> String {
    remote.url(&std::env::var("HF_ENDPOINT").unwrap_or_else(|_| HF_ENDPOINT.to_owned()))
}

/// A download that sends nothing for this long is retried from where it stopped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries per download, each resuming the last.
const ATTEMPTS: u32 = 5;

/// Why a model file could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error(
        "source {origin} has no sha256 pin: add `sha256 = \"...\"` (kiln model cache pull {origin} --allow-unpinned prints it), or allow unpinned sources"
    )]
    Unpinned { origin: String },
    #[error("{origin}: its sha256 is {actual}, not the pinned {expected}; nothing was kept")]
    WrongDigest { origin: String, expected: String, actual: String },
    /// A tenant's file did not match its pin. Its real digest is not told: it would let a
    /// tenant learn what a file it cannot otherwise see holds.
    #[error("{origin}: its content does not match the pinned sha256 {expected}; nothing was kept")]
    NotThePinnedFile { origin: String, expected: String },
    #[error("{origin}: {reason}")]
    Download { origin: String, reason: String },
    /// A tenant's file is larger than what its quota has left.
    #[error("{origin}: {reason}")]
    OverQuota { origin: String, reason: String },
    #[error("model cache {}: {error}", dir.display())]
    Cache { dir: PathBuf, error: io::Error },
}

/// Who a fetch is for, which decides what it may do.
#[derive(Debug, Clone)]
pub enum Requester {
    /// The operator: the config file, the admin API, `kiln model cache pull`. Loads of one digest at
    /// once share one download, an interrupted one is resumed by the next, hub sources carry
    /// `HF_TOKEN`, and the environment's proxy is used.
    Operator,
    Tenant(TenantFetch),
}

/// The bounds of one tenant's fetch.
#[derive(Debug, Clone)]
pub struct TenantFetch {
    pub tenant: String,
    /// The most bytes the file may have: what the tenant's `max_model_bytes` has left.
    pub max_bytes: u64,
    /// Every address connected to, redirects included, must be a public one (unless the
    /// operator allows private sources for tenants).
    pub public_only: bool,
    /// The tenant's own token for a hub source, from its request; kept nowhere.
    pub token: Option<String>,
    /// The whole download, every try included, ends by then.
    pub deadline: Duration,
    /// Set when the request that started the fetch ends: the download stops.
    pub cancelled: Arc<AtomicBool>,
}

/// A file in the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// Whether it was downloaded now (not already cached).
    pub downloaded: bool,
}

/// What a download reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// A transfer starts at byte `at` of `total` (when the server says).
    Started { at: u64, total: Option<u64> },
    Advanced(u64),
}

/// What the cache keeps beside each file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CachedMeta {
    /// Every source this content was fetched from.
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub fetched_at: u64,
    /// The tenants that fetched this content themselves, and so may be handed it from the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetched_by: Vec<String>,
}

/// One file of the cache, as `kiln model cache ls` shows it.
#[derive(Debug, Clone)]
pub struct CachedFile {
    pub sha256: String,
    pub bytes: u64,
    /// When a load last used it.
    pub last_used: SystemTime,
    pub meta: CachedMeta,
}

/// The content-addressed cache of remote model files.
pub struct ModelCache {
    dir: PathBuf,
    /// Total bytes kept before least recently used files go; `None`: no limit.
    max_bytes: Option<u64>,
    allow_unpinned: bool,
    /// One gate per file being fetched, so that the operator's loads of the same file download
    /// it once.
    fetching: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Held while a file's side record is read and written again.
    meta_lock: Mutex<()>,
    /// Names tenants' partial files apart, one per fetch.
    next_fetch: AtomicU64,
    /// Files that a load has fetched and not yet started serving: eviction spares them.
    pending: Mutex<HashMap<PathBuf, usize>>,
    /// Resolves names for tenants' fetches; tests put names of their own in front of it.
    resolver: Arc<dyn reqwest::dns::Resolve>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache").field("dir", &self.dir).field("max_bytes", &self.max_bytes).finish_non_exhaustive()
    }
}

/// Prefix of a tenant's partial files: `partial/tenant-…` files are never resumed, and any left
/// by a stopped server are removed when the cache opens.
const TENANT_PARTIAL: &str = "tenant-";

impl ModelCache {
    pub fn new(dir: PathBuf, max_bytes: Option<u64>, allow_unpinned: bool) -> ModelCache {
        // A tenant's download never outlives its request: what a stopped server left goes. Its
        // files are named `tenant-PID-…`; another live kiln sharing this cache keeps its own.
        if let Ok(entries) = fs::read_dir(dir.join("partial")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(TENANT_PARTIAL) else { continue };
                let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
                let alive = pid.is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
                if !alive {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        ModelCache {
            dir,
            max_bytes,
            allow_unpinned,
            fetching: Mutex::new(HashMap::new()),
            meta_lock: Mutex::new(()),
            next_fetch: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            resolver: Arc::new(PublicOnly),
        }
    }

    pub fn allows_unpinned(&self) -> bool {
        self.allow_unpinned
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cache_error(&self, error: io::Error) -> FetchError {
        FetchError::Cache { dir: self.dir.clone(), error }
    }

    fn file(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256)
    }

    fn meta_file(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(format!("{sha256}.json"))
    }

    /// The cached file `sha256`, marked used now, if the cache has it.
    pub fn cached(&self, sha256: &str) -> Option<Fetched> {
        let path = self.file(sha256);
        let bytes = fs::metadata(&path).ok()?.len();
        touch(&path);
        Some(Fetched { path, sha256: sha256.to_owned(), bytes, downloaded: false })
    }

    /// The file of `remote`, from the cache or downloaded into it. `pin` is its SHA-256; without
    /// one the fetch is refused unless the cache allows unpinned sources (never for a tenant).
    /// A tenant's fetch is bounded and kept apart from everyone else's (see the module's doc).
    pub fn fetch(
        &self,
        remote: &Remote,
        pin: Option<&str>,
        requester: &Requester,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Fetched, FetchError> {
        let tenant = match requester {
            Requester::Operator => None,
            Requester::Tenant(tenant) => Some(tenant),
        };
        if pin.is_none() && (!self.allow_unpinned || tenant.is_some()) {
            return Err(FetchError::Unpinned { origin: remote.text.clone() });
        }
        let url = url_of(remote);
        if tenant.is_some_and(|t| t.public_only) {
            public_url(&url).map_err(|reason| FetchError::Download { origin: remote.text.clone(), reason })?;
        }
        if let (Some(tenant), Some(pin)) = (tenant, pin) {
            return match self.cached_for(pin, &tenant.tenant) {
                Some(hit) => Ok(hit),
                None => self.download(remote, &url, pin, Some(pin), requester, progress),
            };
        }
        let key = pin.map_or_else(|| sha256_hex(url.as_bytes()), str::to_owned);
        let gate = Arc::clone(
            self.fetching.locked().entry(key.clone()).or_default(),
        );
        let result = {
            let _one_download = gate.locked();
            match pin.and_then(|d| self.cached(d)) {
                Some(hit) => Ok(hit),
                None => self.download(remote, &url, &key, pin, requester, progress),
            }
        };
        let mut fetching = self.fetching.locked();
        if Arc::strong_count(&gate) == 2 {
            fetching.remove(&key);
        }
        result
    }

    /// The cached file `sha256` for `tenant`: only if it fetched that content itself.
    fn cached_for(&self, sha256: &str, tenant: &str) -> Option<Fetched> {
        let meta = read_meta(&self.meta_file(sha256))?;
        if meta.fetched_by.iter().any(|t| t == tenant) { self.cached(sha256) } else { None }
    }

    fn download(
        &self,
        remote: &Remote,
        url: &str,
        key: &str,
        pin: Option<&str>,
        requester: &Requester,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Fetched, FetchError> {
        let partial_dir = self.dir.join("partial");
        fs::create_dir_all(&partial_dir).and_then(|()| fs::create_dir_all(self.dir.join("sha256"))).map_err(|e| self.cache_error(e))?;
        let failed = |reason: String| FetchError::Download { origin: remote.text.clone(), reason };
        let download_failed = |failure: Failed| match failure {
            Failed::Stopped(reason) => FetchError::Download { origin: remote.text.clone(), reason },
            Failed::OverQuota(reason) => FetchError::OverQuota { origin: remote.text.clone(), reason },
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start the download: {e}")))?;
        let (actual, bytes, partial) = match requester {
            Requester::Operator => {
                let partial = partial_dir.join(format!("{key}.part"));
                let token = if remote.is_hub() { std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) } else { None };
                let client = client(None).map_err(failed)?;
                let (actual, bytes) =
                    runtime.block_on(download(&client, url, token.as_deref(), &partial, None, progress)).map_err(download_failed)?;
                (actual, bytes, Removed(partial))
            }
            Requester::Tenant(tenant) => {
                let n = self.next_fetch.fetch_add(1, Ordering::Relaxed);
                // Deleted when this fetch ends, however it ends.
                let partial = Removed(partial_dir.join(format!("{TENANT_PARTIAL}{}-{key}-{n}.part", std::process::id())));
                let resolver = tenant.public_only.then(|| Arc::clone(&self.resolver));
                let client = client(Some(resolver)).map_err(failed)?;
                let token = if remote.is_hub() { tenant.token.as_deref() } else { None };
                let bounded = Bounds { max_bytes: tenant.max_bytes, cancelled: &tenant.cancelled };
                let run = download(&client, url, token, &partial.0, Some(bounded), progress);
                let (actual, bytes) = runtime
                    .block_on(async {
                        tokio::select! {
                            done = tokio::time::timeout(tenant.deadline, run) => done.unwrap_or_else(|_| Err(Failed::Stopped(format!(
                                "not done within {} s, the deadline for a tenant's download", tenant.deadline.as_secs()
                            )))),
                            () = until_set(&tenant.cancelled) => Err(Failed::Stopped("stopped: the request that started it ended".to_owned())),
                        }
                    })
                    .map_err(download_failed)?;
                (actual, bytes, partial)
            }
        };
        if let Some(expected) = pin
            && actual != expected
        {
            let _ = fs::remove_file(&partial.0);
            return Err(match requester {
                Requester::Operator => {
                    FetchError::WrongDigest { origin: remote.text.clone(), expected: expected.to_owned(), actual }
                }
                Requester::Tenant(_) => FetchError::NotThePinnedFile { origin: remote.text.clone(), expected: expected.to_owned() },
            });
        }
        let path = self.file(&actual);
        {
            let _one_writer = self.meta_lock.locked();
            let mut meta = read_meta(&self.meta_file(&actual)).unwrap_or_default();
            if !meta.sources.contains(&remote.text) {
                meta.sources.push(remote.text.clone());
            }
            if let Requester::Tenant(tenant) = requester
                && !meta.fetched_by.contains(&tenant.tenant)
            {
                meta.fetched_by.push(tenant.tenant.clone());
            }
            meta.fetched_at = crate::telemetry::unix_seconds();
            let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| self.cache_error(io::Error::other(e)))?;
            crate::files::write_atomic(&self.meta_file(&actual), &meta_json).map_err(|e| self.cache_error(e))?;
            // The same content may be there already (another's fetch): either copy is it.
            fs::rename(&partial.0, &path).and_then(|()| sync_dir(&self.dir.join("sha256"))).map_err(|e| self.cache_error(e))?;
        }
        Ok(Fetched { path, sha256: actual, bytes, downloaded: true })
    }

    /// Spares `path` from eviction until the returned guard goes: a load holds it from its
    /// fetch until the model serves (or fails).
    pub fn hold(self: &Arc<Self>, path: &Path) -> Held {
        *self.pending.locked().entry(path.to_owned()).or_default() += 1;
        Held { cache: Arc::clone(self), path: path.to_owned() }
    }

    /// Every file of the cache, least recently used first.
    pub fn list(&self) -> io::Result<Vec<CachedFile>> {
        let dir = self.dir.join("sha256");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if parse_digest(&name).is_err() {
                continue;
            }
            let metadata = entry.metadata()?;
            files.push(CachedFile {
                meta: read_meta(&self.meta_file(&name)).unwrap_or_default(),
                sha256: name,
                bytes: metadata.len(),
                last_used: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        files.sort_by_key(|f| f.last_used);
        Ok(files)
    }

    /// Removes file `sha256` from the cache; false if it was not there.
    pub fn remove(&self, sha256: &str) -> io::Result<bool> {
        let _ = fs::remove_file(self.meta_file(sha256));
        match fs::remove_file(self.file(sha256)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Over the size limit, removes the least recently used files whose path is not in `in_use`
    /// until the cache fits (or only files in use are left). Returns what went.
    pub fn evict(&self, in_use: &HashSet<PathBuf>) -> io::Result<Vec<CachedFile>> {
        let Some(limit) = self.max_bytes else { return Ok(Vec::new()) };
        let files = self.list()?;
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        let mut removed = Vec::new();
        for file in files {
            if total <= limit {
                break;
            }
            let path = self.file(&file.sha256);
            if in_use.contains(&path) || self.pending.locked().contains_key(&path) {
                continue;
            }
            self.remove(&file.sha256)?;
            total -= file.bytes;
            removed.push(file);
        }
        Ok(removed)
    }
}

/// A cached file a load holds (see [`ModelCache::hold`]).
pub struct Held {
    cache: Arc<ModelCache>,
    path: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut pending = self.cache.pending.locked();
        if let Some(count) = pending.get_mut(&self.path) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.path);
            }
        }
    }
}

/// A partial file, removed when the fetch that wrote it is done with it (after a rename into
/// the cache there is nothing left to remove).
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        if self.0.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TENANT_PARTIAL)) {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// What bounds a tenant's download.
#[derive(Clone, Copy)]
struct Bounds<'a> {
    max_bytes: u64,
    cancelled: &'a AtomicBool,
}

/// Resolves once `flag` is set.
async fn until_set(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HTTP client of a download. `None`: the operator's (the environment's proxy applies).
/// `Some(resolver)`: a tenant's, which never uses a proxy (a proxy would resolve the name itself,
/// past the public-only check); with a resolver, it connects to public addresses only and
/// refuses redirects to private literals.
fn client(tenant: Option<Option<Arc<dyn reqwest::dns::Resolve>>>) -> Result<reqwest::Client, String> {
    let mut builder =
        reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if let Some(resolver) = tenant {
        builder = builder.no_proxy();
        if let Some(resolver) = resolver {
            // Names resolve to public addresses only (so a name cannot be rebound to a private
            // one between a check and the connection), and redirects to private literals are
            // refused.
            builder = builder.dns_resolver(Arc::new(Shared(resolver))).redirect(reqwest::redirect::Policy::custom(|attempt| {
                match public_url(attempt.url().as_str()) {
                    Err(reason) => attempt.error(reason),
                    Ok(()) if attempt.previous().len() >= 10 => attempt.error("more than 10 redirects"),
                    Ok(()) => attempt.follow(),
                }
            }));
        }
    }
    builder.build().map_err(|e| format!("cannot make an HTTP client: {e}"))
}

/// Checks a local file against its pin.
pub fn verify_local(path: &Path, pin: &str) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    let actual = hex(context.finish().as_ref());
    if actual == pin {
        Ok(())
    } else {
        Err(format!("{}: its sha256 is {actual}, not the pinned {pin}", path.display()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_meta(path: &Path) -> Option<CachedMeta> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Marks a cached file used now (its modification time is its last use).
fn touch(path: &Path) {
    if let Ok(file) = OpenOptions::new().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Why one try of a download stopped.
enum Stop {
    /// Worth another try, from where it stopped.
    Retry(String),
    Fatal(String),
    /// Past the bytes a tenant's quota has left.
    OverQuota(String),
}

/// Why a download failed.
enum Failed {
    Stopped(String),
    OverQuota(String),
}

/// Downloads `url` into `partial` (resuming what is there), up to [`ATTEMPTS`] tries; returns
/// the content's SHA-256 and size.
async fn download(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    partial: &Path,
    bounds: Option<Bounds<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, u64), Failed> {
    let mut attempt = 1;
    loop {
        match try_download(client, url, token, partial, bounds, progress).await {
            Ok(done) => return Ok(done),
            Err(Stop::OverQuota(reason)) => return Err(Failed::OverQuota(reason)),
            Err(Stop::Retry(reason)) if attempt < ATTEMPTS => {
                tracing::warn!(url = %crate::telemetry::loggable(url, crate::telemetry::MAX_LOGGED), "download interrupted ({reason}); resuming (try {} of {ATTEMPTS})", attempt + 1);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(Stop::Retry(reason)) => return Err(Failed::Stopped(format!("{reason} (gave up after {ATTEMPTS} tries)"))),
            Err(Stop::Fatal(reason)) => return Err(Failed::Stopped(reason)),
        }
    }
}

async fn try_download(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    partial: &Path,
    bounds: Option<Bounds<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, u64), Stop> {
    let over = |bytes: u64, max: u64| {
        Stop::OverQuota(format!("the file is {bytes} bytes or more, over the {max} bytes the tenant's quota.max_model_bytes has left"))
    };
    let io = |e: io::Error| Stop::Fatal(format!("cannot write {}: {e}", partial.display()));
    let have = fs::metadata(partial).map_or(0, |m| m.len());
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let mut response = match tokio::time::timeout(IDLE_TIMEOUT, request.send()).await {
        Err(_) => return Err(Stop::Retry(format!("no answer in {} s", IDLE_TIMEOUT.as_secs()))),
        // A refused redirect is refused again on every try.
        Ok(Err(e)) if e.is_redirect() => return Err(Stop::Fatal(reason(&e))),
        Ok(Err(e)) => return Err(Stop::Retry(reason(&e))),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0 && range_start(&response) == Some(have);
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        // What is there is not a prefix of the file (it changed, or is whole): start again.
        fs::remove_file(partial).map_err(io)?;
        return Err(Stop::Retry("the server refused to resume; starting again".to_owned()));
    }
    if !status.is_success() {
        let reason = format!("HTTP {status} from {url}");
        return Err(if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Stop::Retry(reason)
        } else {
            Stop::Fatal(reason)
        });
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut written = 0;
    let mut file = if resumed {
        // The bytes already there count toward the digest: hash them again.
        let mut existing = File::open(partial).map_err(io)?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = existing.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            context.update(&buffer[..n]);
            written += n as u64;
        }
        OpenOptions::new().append(true).open(partial).map_err(io)?
    } else {
        File::create(partial).map_err(io)?
    };
    let total = response.content_length().map(|len| len + written);
    if let (Some(bounds), Some(total)) = (bounds, total)
        && total > bounds.max_bytes
    {
        return Err(over(total, bounds.max_bytes));
    }
    progress(Progress::Started { at: written, total });
    loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, response.chunk()).await {
            Err(_) => return Err(Stop::Retry(format!("no data for {} s", IDLE_TIMEOUT.as_secs()))),
            Ok(Err(e)) => return Err(Stop::Retry(format!("connection lost after {written} bytes: {}", reason(&e)))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        written += chunk.len() as u64;
        if let Some(bounds) = bounds {
            if written > bounds.max_bytes {
                return Err(over(written, bounds.max_bytes));
            }
            if bounds.cancelled.load(Ordering::Relaxed) {
                return Err(Stop::Fatal("stopped: the request that started it ended".to_owned()));
            }
        }
        file.write_all(&chunk).map_err(io)?;
        context.update(&chunk);
        progress(Progress::Advanced(chunk.len() as u64));
    }
    if let Some(total) = total
        && written != total
    {
        return Err(Stop::Retry(format!("connection closed after {written} of {total} bytes")));
    }
    file.sync_all().map_err(io)?;
    Ok((hex(context.finish().as_ref()), written))
}

/// Refuses a URL whose host is `localhost` or a literal address that is not public.
pub fn public_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a valid URL: {e}"))?;
    let refused = || Err(format!("{url}: a tenant's model source must be a public address"));
    let Some(host) = parsed.host_str() else { return refused() };
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    match host.parse::<IpAddr>() {
        Ok(ip) if !is_public(ip) => refused(),
        Ok(_) => Ok(()),
        Err(_) if host == "localhost" || host.ends_with(".localhost") => refused(),
        Err(_) => Ok(()),
    }
}

/// Whether `ip` is on the public internet: not loopback, private, link-local, shared (CGNAT),
/// unique-local, multicast, unspecified or broadcast; an IPv4-mapped address by its IPv4 part.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                // Shared address space (carrier-grade NAT).
                || (a == 100 && (64..128).contains(&b))
                // IETF protocol assignments, and the 6to4 relay anycast.
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                // Benchmarking networks.
                || (a == 198 && (b == 18 || b == 19))
                // Reserved for future use, the broadcast address among them.
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // IPv4-compatible `::a.b.c.d` (deprecated; stacks may route it as IPv4).
                || s[..6] == [0; 6]
                // NAT64 (`64:ff9b::/96`, and the local-use `64:ff9b:1::/48`): an IPv4 address
                // of any kind behind a translator.
                || (s[0] == 0x64 && s[1] == 0xff9b)
                // Discard-only.
                || (s[0] == 0x100 && s[1..4] == [0; 3])
                // Teredo, 6to4 and documentation: tunnels to (or stand-ins for) other addresses.
                || (s[0] == 0x2001 && (s[1] == 0 || s[1] == 0xdb8))
                || s[0] == 0x2002
                // Unique local, link-local and the old site-local.
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0)
        }
    }
}

/// A resolver chosen at run time, as reqwest wants a sized one.
struct Shared(Arc<dyn reqwest::dns::Resolve>);

impl reqwest::dns::Resolve for Shared {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.0.resolve(name)
    }
}

/// A resolver that answers with a name's public addresses only.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} has no public address: a tenant's model source must be public").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Where a 206 answer starts, from `Content-Range: bytes START-END/TOTAL`.
fn range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// An HTTP error with its causes, which reqwest keeps apart.
fn reason(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_sources_must_be_public_addresses() {
        for private in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1"] {
            assert!(!is_public(private.parse().expect("address")), "{private} counted as public");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(public.parse().expect("address")), "{public} counted as private");
        }
        for url in ["http://127.0.0.1:8081/v1/models", "http://[::1]/m.pt", "http://localhost/m.pt", "https://169.254.169.254/latest"] {
            assert!(public_url(url).is_err(), "{url} allowed");
        }
        assert!(public_url("https://huggingface.co/org/repo/resolve/main/m.pt").is_ok());
        // A name that resolves to loopback only has no address to connect to.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        let resolved = runtime.block_on(reqwest::dns::Resolve::resolve(&PublicOnly, name));
        assert!(resolved.is_err_and(|e| e.to_string().contains("no public address")));
        // And a tenant's fetch from a private literal stops before any connection.
        let dir = scratch("literal");
        let cache = ModelCache::new(dir.clone(), None, false);
        let remote = Remote { text: "http://127.0.0.1:9/m.pt".to_owned() };
        let e = cache.fetch(&remote, Some(&"0".repeat(64)), &tenant("t", 1 << 20, true), &mut |_| {}).expect_err("refused").to_string();
        assert!(e.contains("must be a public address"), "{e}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn tunnels_translators_and_reserved_ranges_are_not_public() {
        for private in [
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "::127.0.0.1",
            "::10.0.0.1",
            "100::1",
            "fec0::1",
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "192.88.99.1",
        ] {
            assert!(!is_public(private.parse().expect("address")), "{private} counted as public");
        }
        for public in ["198.20.0.1", "223.0.0.1", "2a00:1450::1"] {
            assert!(is_public(public.parse().expect("address")), "{public} counted as private");
        }
    }

    /// A scratch folder of this test process's.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-sources-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// A tenant's fetch of at most `max_bytes`.
    fn tenant(name: &str, max_bytes: u64, public_only: bool) -> Requester {
        Requester::Tenant(TenantFetch {
            tenant: name.to_owned(),
            max_bytes,
            public_only,
            token: None,
            deadline: Duration::from_secs(20),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A loopback HTTP server answering every request with `answer(path)` (the whole response,
    /// head and body), counting the requests.
    struct Web {
        port: u16,
        hits: Arc<AtomicU64>,
    }

    impl Web {
        fn start(answer: impl Fn(&str, u16) -> Vec<u8> + Send + Sync + 'static) -> Web {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("address").port();
            let hits = Arc::new(AtomicU64::new(0));
            let (answer, counted) = (Arc::new(answer), Arc::clone(&hits));
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (answer, counted) = (Arc::clone(&answer), Arc::clone(&counted));
                    std::thread::spawn(move || {
                        let mut stream = stream;
                        let mut reader = io::BufReader::new(stream.try_clone().expect("clone"));
                        let mut line = String::new();
                        let _ = io::BufRead::read_line(&mut reader, &mut line);
                        loop {
                            let mut header = String::new();
                            if io::BufRead::read_line(&mut reader, &mut header).map_or(true, |n| n == 0) || header.trim().is_empty() {
                                break;
                            }
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
                        let _ = stream.write_all(&answer(&path, port));
                        if path.contains("stall") {
                            // Holds the connection open, sending nothing more.
                            std::thread::sleep(Duration::from_secs(20));
                        }
                    });
                }
            });
            Web { port, hits }
        }
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(body);
        out
    }

    fn partial_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir.join("partial")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    #[test]
    fn a_stopped_server_s_tenant_partial_files_go_and_a_live_one_s_stay() {
        let dir = scratch("leftovers");
        fs::create_dir_all(dir.join("partial")).expect("mkdir");
        // pid 1 is alive in any namespace; no process has pid 0.
        let (live, dead, operators) = ("tenant-1-abc-0.part", "tenant-0-abc-0.part", "abc.part");
        for name in [live, dead, operators] {
            fs::write(dir.join("partial").join(name), b"partial").expect("write");
        }
        let _cache = ModelCache::new(dir.clone(), None, false);
        let mut left: Vec<String> = partial_files(&dir).iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [operators, live], "an operator's partial file is resumed later; a live server's is its own");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn eviction_spares_files_held_by_a_load_in_progress() {
        let web = Web::start(|path, _| ok(path.as_bytes()));
        let dir = scratch("evict");
        // Room for one file of the two: the one no load holds goes.
        let cache = Arc::new(ModelCache::new(dir.clone(), Some(12), false));
        let fetch = |path: &str| {
            let remote = Remote { text: format!("http://127.0.0.1:{}{path}", web.port) };
            cache.fetch(&remote, Some(&sha256_hex(path.as_bytes())), &Requester::Operator, &mut |_| {}).expect("fetched")
        };
        let (first, second) = (fetch("/first-file"), fetch("/second-file"));
        let held = cache.hold(&first.path);
        let removed = cache.evict(&HashSet::new()).expect("evict");
        assert_eq!(removed.iter().map(|f| f.sha256.as_str()).collect::<Vec<_>>(), [second.sha256.as_str()]);
        assert!(first.path.exists(), "a file a load holds stays");
        drop(held);
        let removed = cache.evict(&HashSet::new()).expect("evict");
        assert_eq!(removed.len(), 0, "within the limit now");
        fetch("/second-file");
        let removed = cache.evict(&HashSet::new()).expect("evict");
        assert_eq!(removed.len(), 1, "once released, it may go like any other");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_tenant_is_refused_a_file_past_its_bytes_and_keeps_no_partial_file() {
        let body = vec![7u8; 64 * 1024];
        let digest = sha256_hex(&body);
        let (whole, streamed) = (body.clone(), body.clone());
        let web = Web::start(move |path, _| match path {
            // No length announced: the stream itself must be stopped.
            "/chunked" => {
                let mut out = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
                out.extend_from_slice(&streamed);
                out
            }
            _ => ok(&whole),
        });
        let dir = scratch("bytes");
        let cache = ModelCache::new(dir.clone(), None, false);
        for path in ["/announced", "/chunked"] {
            let remote = Remote { text: format!("http://127.0.0.1:{}{path}", web.port) };
            let e = cache.fetch(&remote, Some(&digest), &tenant("t", 1000, false), &mut |_| {}).expect_err("over").to_string();
            assert!(e.contains("over the 1000 bytes the tenant's quota.max_model_bytes has left"), "{path}: {e}");
            assert_eq!(partial_files(&dir), Vec::<PathBuf>::new(), "{path}: nothing left behind");
            assert!(cache.list().expect("list").is_empty(), "{path}: nothing cached");
        }
        // Within its bytes it is fetched, and cached for it.
        let remote = Remote { text: format!("http://127.0.0.1:{}/announced", web.port) };
        let fetched = cache.fetch(&remote, Some(&digest), &tenant("t", 1 << 20, false), &mut |_| {}).expect("fetched");
        assert_eq!((fetched.bytes, fetched.downloaded), (body.len() as u64, true));
        assert_eq!(partial_files(&dir), Vec::<PathBuf>::new());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_tenant_gets_a_cached_file_only_if_it_fetched_it_itself_and_never_learns_a_real_digest() {
        let body = b"the operator's private weights".to_vec();
        let digest = sha256_hex(&body);
        let served = body.clone();
        let web = Web::start(move |path, _| match path {
            "/weights" => ok(&served),
            "/other" => ok(b"something else"),
            _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        });
        let dir = scratch("cached");
        let cache = ModelCache::new(dir.clone(), None, false);
        let url = |path: &str| Remote { text: format!("http://127.0.0.1:{}{path}", web.port) };
        cache.fetch(&url("/weights"), Some(&digest), &Requester::Operator, &mut |_| {}).expect("the operator's fetch");
        let before = web.hits.load(Ordering::SeqCst);

        // Another's digest behind a dead source: a download is tried, and fails; nothing handed.
        let e = cache.fetch(&url("/gone"), Some(&digest), &tenant("mallory", 1 << 20, false), &mut |_| {}).expect_err("dead");
        assert!(e.to_string().contains("404"), "{e}");
        assert_eq!(web.hits.load(Ordering::SeqCst), before + 1, "it went to its own source");
        // A wrong pin does not tell the tenant what the file's digest is.
        let other = sha256_hex(b"something else");
        let e = cache.fetch(&url("/other"), Some(&digest), &tenant("mallory", 1 << 20, false), &mut |_| {}).expect_err("wrong");
        assert!(matches!(e, FetchError::NotThePinnedFile { .. }) && !e.to_string().contains(&other), "{e}");
        // The same for the operator names both.
        let e = cache.fetch(&url("/other"), Some(&"1".repeat(64)), &Requester::Operator, &mut |_| {}).expect_err("wrong");
        assert!(e.to_string().contains(&other), "{e}");

        // A tenant that fetches the content itself has it, and from then on from the cache.
        cache.fetch(&url("/weights"), Some(&digest), &tenant("acme", 1 << 20, false), &mut |_| {}).expect("its own");
        let hits = web.hits.load(Ordering::SeqCst);
        let again = cache.fetch(&url("/weights"), Some(&digest), &tenant("acme", 1 << 20, false), &mut |_| {}).expect("cached");
        assert!(!again.downloaded);
        assert_eq!(web.hits.load(Ordering::SeqCst), hits);
        let meta = read_meta(&cache.meta_file(&digest)).expect("meta");
        assert_eq!(meta.fetched_by, ["acme"]);
        assert_eq!(partial_files(&dir), Vec::<PathBuf>::new());
        let _ = fs::remove_dir_all(dir);
    }

    /// Resolves `name` to loopback as if it were public, and every other name as tenants' fetches
    /// do: a stand-in for a public host that redirects.
    struct PretendPublic {
        name: &'static str,
    }

    impl reqwest::dns::Resolve for PretendPublic {
        fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
            if name.as_str() == self.name {
                let addrs: Vec<SocketAddr> = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
                return Box::pin(async move { Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs) });
            }
            PublicOnly.resolve(name)
        }
    }

    #[test]
    fn a_tenant_s_download_follows_no_redirect_to_a_private_address() {
        let web = Web::start(|path, port| {
            let to = match path {
                "/to-literal" => format!("http://127.0.0.1:{port}/file"),
                "/to-name" => format!("http://localhost:{port}/file"),
                "/to-mapped" => format!("http://[::ffff:127.0.0.1]:{port}/file"),
                "/to-nat64" => format!("http://[64:ff9b::7f00:1]:{port}/file"),
                _ => return ok(b"private"),
            };
            format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").into_bytes()
        });
        let dir = scratch("redirects");
        let mut cache = ModelCache::new(dir.clone(), None, false);
        cache.resolver = Arc::new(PretendPublic { name: "public.test" });
        for hop in ["/to-literal", "/to-name", "/to-mapped", "/to-nat64"] {
            let remote = Remote { text: format!("http://public.test:{}{hop}", web.port) };
            let before = web.hits.load(Ordering::SeqCst);
            let e = cache.fetch(&remote, Some(&"0".repeat(64)), &tenant("t", 1 << 20, true), &mut |_| {}).expect_err("refused");
            let e = format!("{e:?} {e}");
            assert!(e.contains("public address"), "{hop}: {e}");
            assert_eq!(web.hits.load(Ordering::SeqCst), before + 1, "{hop}: the private address was never asked");
        }
        // The same hop fetched for the operator is followed.
        let remote = Remote { text: format!("http://127.0.0.1:{}/to-literal", web.port) };
        let e = cache.fetch(&remote, Some(&"0".repeat(64)), &Requester::Operator, &mut |_| {}).expect_err("wrong digest");
        assert!(matches!(e, FetchError::WrongDigest { .. }), "{e}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_tenant_s_download_stops_when_its_request_ends_or_its_deadline_passes() {
        // Sends a little, then nothing for long: only the deadline or a cancel ends it early.
        let web = Web::start(|_, _| {
            std::thread::sleep(Duration::from_millis(100));
            b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\nconnection: close\r\n\r\nstart".to_vec()
        });
        let dir = scratch("deadline");
        let cache = ModelCache::new(dir.clone(), None, false);
        let remote = Remote { text: format!("http://127.0.0.1:{}/stall", web.port) };
        let Requester::Tenant(mut bounds) = tenant("t", 1 << 20, false) else { unreachable!() };
        bounds.deadline = Duration::from_millis(600);
        let started = std::time::Instant::now();
        let e = cache.fetch(&remote, Some(&"0".repeat(64)), &Requester::Tenant(bounds.clone()), &mut |_| {}).expect_err("deadline");
        assert!(e.to_string().contains("deadline for a tenant's download"), "{e}");
        assert!(started.elapsed() < IDLE_TIMEOUT, "ended by the deadline, not the idle timeout");
        bounds.deadline = Duration::from_secs(60);
        let cancelled = Arc::clone(&bounds.cancelled);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            cancelled.store(true, Ordering::Relaxed);
        });
        let e = cache.fetch(&remote, Some(&"0".repeat(64)), &Requester::Tenant(bounds), &mut |_| {}).expect_err("cancelled");
        assert!(e.to_string().contains("the request that started it ended"), "{e}");
        assert_eq!(partial_files(&dir), Vec::<PathBuf>::new());
        let _ = fs::remove_dir_all(dir);
    }
}
