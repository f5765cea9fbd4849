//! A handler's response cache (opt-in: `cache = { ttl_ms, max_entries, max_bytes }`). It lives in
//! the [`Handler`](super::Handler) it caches for, so it is never shared across handlers or
//! tenants (a handler is one tenant's), and a redeploy, which makes a new handler, starts with an
//! empty one. The key is the method, the path and query as sent, and the body's SHA-256.
//!
//! Only `200` answers to `GET` and `POST` that the guest marks `cache-control: public,
//! max-age=N` are stored, for N seconds capped by `ttl_ms`, and only when the whole body fits in
//! `max_bytes`. Past `max_entries` or `max_bytes`, the least recently used entries go.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::sync::MutexExt;
use crate::telemetry::Telemetry;

/// `cache = { ttl_ms, max_entries, max_bytes }` of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// The longest an answer is kept, whatever the guest's `max-age`.
    pub ttl: Duration,
    pub max_entries: usize,
    /// Bodies of every entry together.
    pub max_bytes: usize,
}

/// A stored answer.
#[derive(Debug, Clone)]
pub struct Cached {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored: Instant,
}

#[derive(Debug)]
struct Entry {
    answer: Cached,
    expires: Instant,
    /// A tick of the cache's clock: the least recent goes first.
    used: u64,
}

/// What a lookup or a store came to, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Store,
    Eviction,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Store => "store",
            Outcome::Eviction => "eviction",
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<[u8; 32], Entry>,
    bytes: usize,
    clock: u64,
}

#[derive(Debug)]
pub struct ResponseCache {
    policy: CachePolicy,
    entries: Mutex<Entries>,
}

/// The key of a request: what the guest sees of it that can change its answer.
pub fn key(method: &Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(method.as_str().as_bytes());
    context.update(b"\0");
    context.update(path_and_query.as_bytes());
    context.update(b"\0");
    context.update(ring::digest::digest(&ring::digest::SHA256, body).as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// Whether a request may be answered from the cache at all.
pub fn cacheable_request(method: &Method) -> bool {
    method == Method::GET || method == Method::POST
}

/// How long the guest allows its answer to be kept (`cache-control: public, max-age=N`, and no
/// `private` or `no-store`), capped by `ttl`; `None` when it may not be.
pub fn lifetime(status: StatusCode, headers: &HeaderMap, ttl: Duration) -> Option<Duration> {
    if status != StatusCode::OK {
        return None;
    }
    let mut public = false;
    let mut max_age = None;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        for directive in value.to_str().ok()?.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            match lower.as_str() {
                "public" => public = true,
                "private" | "no-store" | "no-cache" => return None,
                _ => {
                    if let Some(n) = lower.strip_prefix("max-age=") {
                        max_age = n.trim_matches('"').parse::<u64>().ok();
                    }
                }
            }
        }
    }
    let age = Duration::from_secs(max_age.filter(|&n| n > 0 && public)?);
    Some(age.min(ttl))
}

impl ResponseCache {
    pub fn new(policy: CachePolicy) -> ResponseCache {
        ResponseCache { policy, entries: Mutex::new(Entries::default()) }
    }

    pub fn policy(&self) -> &CachePolicy {
        &self.policy
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.locked()
    }

    /// The stored answer for `key`, if it has not expired.
    pub fn get(&self, key: &[u8; 32], now: Instant) -> Option<Cached> {
        let mut entries = self.entries();
        entries.clock += 1;
        let clock = entries.clock;
        match entries.map.get_mut(key) {
            Some(entry) if entry.expires > now => {
                entry.used = clock;
                Some(entry.answer.clone())
            }
            Some(_) => {
                if let Some(gone) = entries.map.remove(key) {
                    entries.bytes -= gone.answer.body.len();
                }
                None
            }
            None => None,
        }
    }

    /// Stores an answer for `lifetime`; returns how many entries were evicted to make room.
    /// A body larger than the whole cache is not stored (`None`).
    pub fn put(&self, key: [u8; 32], answer: Cached, lifetime: Duration) -> Option<usize> {
        let size = answer.body.len();
        if size > self.policy.max_bytes || self.policy.max_entries == 0 {
            return None;
        }
        let mut entries = self.entries();
        entries.clock += 1;
        let used = entries.clock;
        let expires = answer.stored + lifetime;
        if let Some(old) = entries.map.insert(key, Entry { answer, expires, used }) {
            entries.bytes -= old.answer.body.len();
        }
        entries.bytes += size;
        let mut evicted = 0;
        while entries.map.len() > self.policy.max_entries || entries.bytes > self.policy.max_bytes {
            // Expired entries first, then the least recently used.
            let now = Instant::now();
            let victim = entries
                .map
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, e)| (e.expires > now, e.used))
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some(gone) = entries.map.remove(&victim) {
                entries.bytes -= gone.answer.body.len();
                evicted += 1;
            }
        }
        Some(evicted)
    }

    /// Entries and their body bytes now.
    pub fn size(&self) -> (usize, usize) {
        let entries = self.entries();
        (entries.map.len(), entries.bytes)
    }
}

/// Says on a handler's answer whether its response cache gave it (`hit`) or it was kept for the
/// next one (`miss`).
pub const CACHE_HEADER: &str = "kiln-cache";

/// What a handler's cache says of a request before its guest runs.
pub enum Lookup {
    /// The handler has no cache, or the method is never cached: run the guest, keep nothing.
    Uncached,
    /// A kept answer, as it was first sent, with its age.
    Hit(http::Response<Bytes>),
    /// Not kept yet: run the guest, and [`capture`] its answer under this key.
    Miss([u8; 32]),
}

/// Looks a request up in the cache of `handler` (`None` for a handler without one), counting
/// the hit or the miss.
pub fn lookup(
    cache: Option<&ResponseCache>,
    handler: &str,
    telemetry: &Telemetry,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
) -> Lookup {
    let Some(cache) = cache.filter(|_| cacheable_request(method)) else {
        return Lookup::Uncached;
    };
    let key = key(method, path_and_query, body);
    match cache.get(&key, Instant::now()) {
        Some(kept) => {
            telemetry.record_cache(handler, Outcome::Hit.as_str(), 1);
            let mut response = http::Response::new(kept.body);
            *response.headers_mut() = kept.headers;
            response.headers_mut().insert(CACHE_HEADER, HeaderValue::from_static("hit"));
            if let Ok(age) = HeaderValue::from_str(&kept.stored.elapsed().as_secs().to_string()) {
                response.headers_mut().insert(http::header::AGE, age);
            }
            Lookup::Hit(response)
        }
        None => {
            telemetry.record_cache(handler, Outcome::Miss.as_str(), 1);
            Lookup::Miss(key)
        }
    }
}

/// The guest's answer on its way to the client. When the request missed the cache (`key`) and
/// the guest allows its answer to be kept, it is tagged `kiln-cache: miss` and its body copied
/// as it streams, to be stored once it has ended whole within the cache's byte limit.
pub fn capture<B>(
    cache: Option<&Arc<ResponseCache>>,
    handler: &Arc<str>,
    telemetry: &Arc<Telemetry>,
    key: Option<[u8; 32]>,
    response: http::Response<B>,
) -> http::Response<Capture<B>> {
    let lifetime = key.zip(cache).and_then(|(key, cache)| {
        lifetime(response.status(), response.headers(), cache.policy().ttl).map(|lifetime| (key, lifetime))
    });
    let (mut head, body) = response.into_parts();
    let store = lifetime.zip(cache).map(|((key, lifetime), cache)| {
        head.headers.insert(CACHE_HEADER, HeaderValue::from_static("miss"));
        Store {
            kept: Vec::new(),
            length: head
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            headers: head.headers.clone(),
            key,
            lifetime,
            cache: Arc::clone(cache),
            handler: Arc::clone(handler),
            telemetry: Arc::clone(telemetry),
        }
    });
    // An empty answer of declared length is whole already: its body may never be polled.
    let store = match store {
        Some(store) if store.length == Some(0) => {
            store.finish();
            None
        }
        store => store,
    };
    http::Response::from_parts(head, Capture { body, store })
}

/// A body passed through as it is, copied on the way when it is to be kept (see [`capture`]).
pub struct Capture<B> {
    body: B,
    /// `None` when nothing is to be kept, or once the body outgrew the cache or failed.
    store: Option<Store>,
}

/// What is needed to keep an answer once its body has ended.
struct Store {
    kept: Vec<u8>,
    /// The length the answer declares: once that much is kept the answer is whole, and it is
    /// stored then, as the server stops polling a body of known length at its last byte.
    length: Option<usize>,
    headers: HeaderMap,
    key: [u8; 32],
    lifetime: Duration,
    cache: Arc<ResponseCache>,
    /// The handler's name, for the counters.
    handler: Arc<str>,
    telemetry: Arc<Telemetry>,
}

impl Store {
    /// Puts the whole answer into the handler's cache, counting the store and any evictions.
    fn finish(self) {
        let kept = Cached { headers: self.headers, body: Bytes::from(self.kept), stored: Instant::now() };
        if let Some(evicted) = self.cache.put(self.key, kept, self.lifetime) {
            let name = &*self.handler;
            self.telemetry.record_cache(name, Outcome::Store.as_str(), 1);
            if evicted > 0 {
                self.telemetry.record_cache(name, Outcome::Eviction.as_str(), evicted as u64);
            }
        }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Capture<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let this = &mut *self;
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(store), Some(data)) = (&mut this.store, frame.data_ref()) {
                    if store.kept.len() + data.len() <= store.cache.policy().max_bytes {
                        store.kept.extend_from_slice(data);
                        if store.length == Some(store.kept.len())
                            && let Some(store) = this.store.take()
                        {
                            store.finish();
                        }
                    } else {
                        this.store = None;
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.store = None,
            Poll::Ready(None) => {
                // An end short of the declared length is not an answer to keep.
                if let Some(store) = this.store.take().filter(|s| s.length.is_none_or(|n| n == s.kept.len())) {
                    store.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Until the copy is stored, ask to be polled to the end: the store happens on `None`.
        self.store.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &'static [u8]) -> Cached {
        Cached { headers: HeaderMap::new(), body: Bytes::from_static(body), stored: Instant::now() }
    }

    fn headers(cache_control: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CACHE_CONTROL, cache_control.parse().expect("header"));
        h
    }

    #[test]
    fn only_public_answers_with_a_max_age_are_kept_for_at_most_the_ttl() {
        let ttl = Duration::from_secs(60);
        let ok = StatusCode::OK;
        assert_eq!(lifetime(ok, &headers("public, max-age=10"), ttl), Some(Duration::from_secs(10)));
        assert_eq!(lifetime(ok, &headers("max-age=600, public"), ttl), Some(ttl));
        for refused in ["max-age=10", "public", "public, max-age=0", "public, max-age=10, no-store", "private, max-age=9"] {
            assert_eq!(lifetime(ok, &headers(refused), ttl), None, "{refused}");
        }
        assert_eq!(lifetime(StatusCode::CREATED, &headers("public, max-age=10"), ttl), None);
        assert_eq!(lifetime(ok, &HeaderMap::new(), ttl), None);
    }

    /// `frames` as a body behind a public, cacheable head declaring `length`, captured under
    /// key [7; 32]; the cache it goes to.
    fn captured(frames: &[&'static [u8]], length: Option<usize>) -> (Arc<ResponseCache>, http::Response<Capture<impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin>>) {
        use http_body_util::StreamBody;
        let cache = Arc::new(ResponseCache::new(CachePolicy { ttl: Duration::from_secs(60), max_entries: 8, max_bytes: 1024 }));
        let telemetry = Arc::new(Telemetry::new(Arc::new(crate::telemetry::EventLog::new(8))));
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
            frames.iter().map(|f| Ok(http_body::Frame::data(Bytes::from_static(f)))).collect();
        let mut head = http::Response::builder().header(http::header::CACHE_CONTROL, "public, max-age=60");
        if let Some(n) = length {
            head = head.header(http::header::CONTENT_LENGTH, n);
        }
        let response = head.body(StreamBody::new(futures::stream::iter(frames))).expect("response");
        let handler: Arc<str> = Arc::from("h");
        let response = capture(Some(&cache), &handler, &telemetry, Some([7; 32]), response);
        (cache, response)
    }

    fn kept(cache: &ResponseCache) -> Option<Bytes> {
        cache.get(&[7; 32], Instant::now()).map(|c| c.body)
    }

    #[test]
    fn an_answer_of_declared_length_is_kept_at_its_last_byte_and_only_whole() {
        use http_body_util::BodyExt as _;
        use futures::executor::block_on;
        // The server stops polling at the last declared byte: the end never comes.
        let (cache, mut response) = captured(&[b"abc", b"def"], Some(6));
        block_on(response.body_mut().frame()).expect("frame").expect("data");
        assert_eq!(kept(&cache), None, "half an answer is not kept");
        block_on(response.body_mut().frame()).expect("frame").expect("data");
        assert_eq!(kept(&cache).as_deref(), Some(&b"abcdef"[..]));
        // An empty answer of declared length is kept at once, its body never polled.
        let (cache, _response) = captured(&[], Some(0));
        assert_eq!(kept(&cache).as_deref(), Some(&b""[..]));
        // A body that ends short of its declared length is not kept.
        let (cache, response) = captured(&[b"abc"], Some(10));
        let _ = block_on(response.into_body().collect());
        assert_eq!(kept(&cache), None);
        // Of unknown length, it is kept when it ends.
        let (cache, response) = captured(&[b"ab", b"c"], None);
        let _ = block_on(response.into_body().collect());
        assert_eq!(kept(&cache).as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn keys_differ_by_method_path_and_body() {
        let k = key(&Method::POST, "/a?x=1", b"body");
        assert_ne!(k, key(&Method::GET, "/a?x=1", b"body"));
        assert_ne!(k, key(&Method::POST, "/a?x=2", b"body"));
        assert_ne!(k, key(&Method::POST, "/a?x=1", b"bodY"));
        // No ambiguity where one field ends and the next begins.
        assert_ne!(key(&Method::POST, "/a", b"b"), key(&Method::POST, "/a\0", b"b"));
        assert_eq!(k, key(&Method::POST, "/a?x=1", b"body"));
    }

    #[test]
    fn entries_expire_and_the_least_recently_used_go_first() {
        let cache = ResponseCache::new(CachePolicy { ttl: Duration::from_secs(60), max_entries: 2, max_bytes: 10 });
        let now = Instant::now();
        let long = Duration::from_secs(60);
        assert_eq!(cache.put([1; 32], answer(b"aaaa"), long), Some(0));
        assert_eq!(cache.put([2; 32], answer(b"bbbb"), long), Some(0));
        assert!(cache.get(&[1; 32], now).is_some(), "1 is now the most recently used");
        assert_eq!(cache.put([3; 32], answer(b"cc"), long), Some(1));
        assert!(cache.get(&[2; 32], now).is_none(), "2 was the least recently used");
        assert!(cache.get(&[1; 32], now).is_some() && cache.get(&[3; 32], now).is_some());
        assert_eq!(cache.size(), (2, 6));
        // Over the byte limit: room is made; a body larger than the cache is not kept.
        assert_eq!(cache.put([4; 32], answer(b"dddddd"), long), Some(1));
        assert_eq!(cache.size().1, 8);
        assert_eq!(cache.put([5; 32], answer(b"eeeeeeeeeee"), long), None);
        // Expired: gone at the next look.
        assert_eq!(cache.put([6; 32], answer(b"f"), Duration::ZERO), Some(1));
        assert!(cache.get(&[6; 32], Instant::now()).is_none());
    }
}
