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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::files::{sha256_hex, sync_dir};

/// Where `hf://` sources resolve, unless `HF_ENDPOINT` says otherwise (as Hugging Face's own
/// tools read it).
pub const HF_ENDPOINT: &str = "https://huggingface.co";

/// A download that sends nothing for this long is retried from where it stopped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries per download, each resuming the last.
const ATTEMPTS: u32 = 5;

/// A remote model file, as written in a model's `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The source as written: `https://…` or `hf://…`.
    pub text: String,
}

/// Reads a model's `source`: `Ok(None)` for a local path, the remote source otherwise, or why it
/// is neither.
pub fn parse_source(text: &str) -> Result<Option<Remote>, String> {
    let remote = Some(Remote { text: text.to_owned() });
    if let Some(rest) = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://")) {
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("'{text}' has no host"));
        }
        reqwest::Url::parse(text).map_err(|e| format!("'{text}' is not a valid URL: {e}"))?;
        return Ok(remote);
    }
    if let Some(rest) = text.strip_prefix("hf://") {
        hf_parts(rest).map_err(|e| format!("'{text}': {e}"))?;
        return Ok(remote);
    }
    match text.split_once("://") {
        Some((scheme, _)) => Err(format!(
            "'{text}': unsupported scheme '{scheme}://'; a source is a local path, https://HOST/FILE or hf://ORG/REPO/FILE@REVISION"
        )),
        None if text.is_empty() => Err("the source is empty".to_owned()),
        None => Ok(None),
    }
}

/// `ORG/REPO/FILE[@REVISION]` → (repository, file, revision); the revision defaults to `main`.
fn hf_parts(rest: &str) -> Result<(String, String, String), String> {
    let (path, revision) = match rest.rsplit_once('@') {
        Some((path, revision)) if !revision.is_empty() && !revision.contains('/') => (path, revision),
        Some(_) => return Err("the revision after '@' is empty or has a '/'".to_owned()),
        None => (rest, "main"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 3 || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err("expected hf://ORG/REPO/FILE@REVISION (FILE may be in folders)".to_owned());
    }
    Ok((format!("{}/{}", parts[0], parts[1]), parts[2..].join("/"), revision.to_owned()))
}

impl Remote {
    /// The URL fetched: an `hf://` source resolves to the hub's file URL.
    pub fn url(&self) -> String {
        match self.text.strip_prefix("hf://").and_then(|rest| hf_parts(rest).ok()) {
            Some((repo, file, revision)) => {
                let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| HF_ENDPOINT.to_owned());
                format!("{}/{repo}/resolve/{revision}/{file}", endpoint.trim_end_matches('/'))
            }
            None => self.text.clone(),
        }
    }

    fn is_hub(&self) -> bool {
        self.text.starts_with("hf://")
    }
}

/// Reads a `sha256` pin: 64 hex digits, any case; returned in lower case.
pub fn parse_digest(text: &str) -> Result<String, String> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!("'{text}' is not a SHA-256 digest (64 hex digits)"))
    }
}

/// Why a model file could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error(
        "source {origin} has no sha256 pin: add `sha256 = \"...\"` (kiln model pull {origin} --allow-unpinned prints it), or allow unpinned sources"
    )]
    Unpinned { origin: String },
    #[error("{origin}: its sha256 is {actual}, not the pinned {expected}; nothing was kept")]
    WrongDigest { origin: String, expected: String, actual: String },
    #[error("{origin}: {reason}")]
    Download { origin: String, reason: String },
    #[error("model cache {}: {error}", dir.display())]
    Cache { dir: PathBuf, error: io::Error },
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
}

/// One file of the cache, as `kiln model ls --cache` shows it.
#[derive(Debug, Clone)]
pub struct CachedFile {
    pub sha256: String,
    pub bytes: u64,
    /// When a load last used it.
    pub last_used: SystemTime,
    pub meta: CachedMeta,
}

/// The content-addressed cache of remote model files.
#[derive(Debug)]
pub struct ModelCache {
    dir: PathBuf,
    /// Total bytes kept before least recently used files go; `None`: no limit.
    max_bytes: Option<u64>,
    allow_unpinned: bool,
    /// One gate per file being fetched, so that loads of the same file download it once.
    fetching: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ModelCache {
    pub fn new(dir: PathBuf, max_bytes: Option<u64>, allow_unpinned: bool) -> ModelCache {
        ModelCache { dir, max_bytes, allow_unpinned, fetching: Mutex::new(HashMap::new()) }
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
    /// one the fetch is refused unless the cache allows unpinned sources.
    /// With `public_only` (a tenant's model), every address connected to, redirects included,
    /// must be a public one: a tenant cannot make the server fetch from its own network.
    pub fn fetch(
        &self,
        remote: &Remote,
        pin: Option<&str>,
        public_only: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Fetched, FetchError> {
        if pin.is_none() && !self.allow_unpinned {
            return Err(FetchError::Unpinned { origin: remote.text.clone() });
        }
        let url = remote.url();
        if public_only {
            public_url(&url).map_err(|reason| FetchError::Download { origin: remote.text.clone(), reason })?;
        }
        let key = pin.map_or_else(|| sha256_hex(url.as_bytes()), str::to_owned);
        let gate = Arc::clone(
            self.fetching.lock().unwrap_or_else(PoisonError::into_inner).entry(key.clone()).or_default(),
        );
        let result = {
            let _one_download = gate.lock().unwrap_or_else(PoisonError::into_inner);
            match pin.and_then(|d| self.cached(d)) {
                Some(hit) => Ok(hit),
                None => self.download(remote, &url, &key, pin, public_only, progress),
            }
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::strong_count(&gate) == 2 {
            fetching.remove(&key);
        }
        result
    }

    fn download(
        &self,
        remote: &Remote,
        url: &str,
        key: &str,
        pin: Option<&str>,
        public_only: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Fetched, FetchError> {
        let partial_dir = self.dir.join("partial");
        fs::create_dir_all(&partial_dir).and_then(|()| fs::create_dir_all(self.dir.join("sha256"))).map_err(|e| self.cache_error(e))?;
        let partial = partial_dir.join(format!("{key}.part"));
        let failed = |reason: String| FetchError::Download { origin: remote.text.clone(), reason };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start the download: {e}")))?;
        let token = if remote.is_hub() { std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) } else { None };
        let (actual, bytes) =
            runtime.block_on(download(url, token.as_deref(), public_only, &partial, progress)).map_err(failed)?;
        if let Some(expected) = pin
            && actual != expected
        {
            let _ = fs::remove_file(&partial);
            return Err(FetchError::WrongDigest { origin: remote.text.clone(), expected: expected.to_owned(), actual });
        }
        let path = self.file(&actual);
        let mut meta = read_meta(&self.meta_file(&actual)).unwrap_or_default();
        if !meta.sources.contains(&remote.text) {
            meta.sources.push(remote.text.clone());
        }
        meta.fetched_at = crate::telemetry::unix_seconds();
        let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| self.cache_error(io::Error::other(e)))?;
        crate::files::write_atomic(&self.meta_file(&actual), &meta_json).map_err(|e| self.cache_error(e))?;
        fs::rename(&partial, &path).and_then(|()| sync_dir(&self.dir.join("sha256"))).map_err(|e| self.cache_error(e))?;
        Ok(Fetched { path, sha256: actual, bytes, downloaded: true })
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
            if in_use.contains(&self.file(&file.sha256)) {
                continue;
            }
            self.remove(&file.sha256)?;
            total -= file.bytes;
            removed.push(file);
        }
        Ok(removed)
    }
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
}

/// Downloads `url` into `partial` (resuming what is there), up to [`ATTEMPTS`] tries; returns
/// the content's SHA-256 and size.
async fn download(
    url: &str,
    token: Option<&str>,
    public_only: bool,
    partial: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, u64), String> {
    let mut builder =
        reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if public_only {
        // Names resolve to public addresses only (so a name cannot be rebound to a private one
        // between a check and the connection), and redirects to private literals are refused.
        builder = builder.dns_resolver(Arc::new(PublicOnly)).redirect(reqwest::redirect::Policy::custom(|attempt| {
            match public_url(attempt.url().as_str()) {
                Err(reason) => attempt.error(reason),
                Ok(()) if attempt.previous().len() >= 10 => attempt.error("more than 10 redirects"),
                Ok(()) => attempt.follow(),
            }
        }));
    }
    let client = builder.build().map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let mut attempt = 1;
    loop {
        match try_download(&client, url, token, partial, progress).await {
            Ok(done) => return Ok(done),
            Err(Stop::Retry(reason)) if attempt < ATTEMPTS => {
                tracing::warn!(%url, "download interrupted ({reason}); resuming (try {} of {ATTEMPTS})", attempt + 1);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(Stop::Retry(reason)) => return Err(format!("{reason} (gave up after {ATTEMPTS} tries)")),
            Err(Stop::Fatal(reason)) => return Err(reason),
        }
    }
}

async fn try_download(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    partial: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, u64), Stop> {
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
    progress(Progress::Started { at: written, total });
    loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, response.chunk()).await {
            Err(_) => return Err(Stop::Retry(format!("no data for {} s", IDLE_TIMEOUT.as_secs()))),
            Ok(Err(e)) => return Err(Stop::Retry(format!("connection lost after {written} bytes: {}", reason(&e)))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        file.write_all(&chunk).map_err(io)?;
        context.update(&chunk);
        written += chunk.len() as u64;
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
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
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
    fn sources_parse_into_local_paths_urls_and_hub_files() {
        assert_eq!(parse_source("models/m.pt"), Ok(None));
        let url = parse_source("https://example.com/m.pt").expect("url").expect("remote");
        assert_eq!(url.url(), "https://example.com/m.pt");
        let hub = parse_source("hf://org/repo/dir/m.pt@abc123").expect("hub").expect("remote");
        assert!(hub.url().ends_with("/org/repo/resolve/abc123/dir/m.pt"), "{}", hub.url());
        let main = parse_source("hf://org/repo/m.pt").expect("hub").expect("remote");
        assert!(main.url().ends_with("/org/repo/resolve/main/m.pt"), "{}", main.url());
        for bad in ["s3://bucket/m.pt", "hf://org/m.pt", "hf://org/repo/../m.pt@x", "hf://org/repo/m.pt@", "https://", ""] {
            assert!(parse_source(bad).is_err(), "{bad} was accepted");
        }
    }

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
        let dir = std::env::temp_dir().join(format!("kiln-sources-{}", std::process::id()));
        let cache = ModelCache::new(dir.clone(), None, false);
        let remote = Remote { text: "http://127.0.0.1:9/m.pt".to_owned() };
        let e = cache.fetch(&remote, Some(&"0".repeat(64)), true, &mut |_| {}).expect_err("refused").to_string();
        assert!(e.contains("must be a public address"), "{e}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn digests_are_64_hex_digits() {
        let d = "AB".repeat(32);
        assert_eq!(parse_digest(&d), Ok("ab".repeat(32)));
        assert_eq!(parse_digest(&format!("sha256:{d}")), Ok("ab".repeat(32)));
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }
}
