//! Telemetry: requests and their latency by handler, tenant and status, guest traps, quota
//! refusals, and the event log behind `GET /v1/events` (scaling decisions, deployments, model
//! loads and unloads, guest traps), with a bounded history replayed to new followers.
//!
//! Labels are only ever configured names (handlers, tenants, models) or fixed words: a request
//! for a handler that does not exist is counted under `(unknown)`, so a client cannot grow the
//! metrics without bound.

pub mod access;
pub mod alloc;
pub mod histogram;
pub mod logging;
pub mod process;
pub mod spans;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use kiln_wire::{EventKind, RouteStats, ServerEvent};
use tokio::sync::broadcast;

use crate::telemetry::histogram::AtomicHistogram;
use crate::sync::{MutexExt, RwLockExt};

/// Longest guest-trap message kept in an event, in bytes.
const MAX_MESSAGE: usize = 500;

/// The label for requests whose handler is not one of this server's.
pub const UNKNOWN: &str = "(unknown)";
/// The label for requests without a valid tenant key.
pub const ANONYMOUS: &str = "(none)";

/// Milliseconds since the Unix epoch: the one clock every timestamp Kiln writes is read from.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    unix_ms() / 1000
}

/// Longest text from a client, a guest or a tenant's model kept in one log line, audit line or
/// event detail, in bytes.
pub const MAX_LOGGED: usize = 512;

/// Text from outside (a client, a guest, a tenant's source or model) made fit for one log line:
/// control characters escaped, so it cannot forge lines of its own, and cut at `max` bytes.
pub fn loggable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for c in text.chars() {
        if out.len() >= max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Events one tenant's actions may add per second: past it they are dropped (and counted), so a
/// tenant that fails loads at its request rate cannot push everyone else's events out of the
/// history.
const TENANT_EVENTS_PER_SECOND: u32 = 5;

/// Recent events and a feed of new ones.
#[derive(Debug)]
pub struct EventLog {
    recent: Mutex<(VecDeque<ServerEvent>, u64)>,
    capacity: usize,
    feed: broadcast::Sender<ServerEvent>,
    /// Per tenant: the second being counted, and its events in it.
    tenant_budget: Mutex<HashMap<String, (u64, u32)>>,
    /// Tenants' events dropped over their budget.
    pub dropped: AtomicU64,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            recent: Mutex::new((VecDeque::new(), 0)),
            capacity: capacity.max(1),
            feed: broadcast::channel(256).0,
            tenant_budget: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Emits an event caused by `tenant` (when one caused it), within its budget per second.
    pub fn emit_for(&self, tenant: Option<&str>, kind: EventKind) {
        if let Some(tenant) = tenant {
            let now = unix_seconds();
            let mut budget = self.tenant_budget.locked();
            budget.retain(|_, (second, _)| *second == now);
            let (_, used) = budget.entry(tenant.to_owned()).or_insert((now, 0));
            if *used >= TENANT_EVENTS_PER_SECOND {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *used += 1;
        }
        self.emit(kind);
    }

    pub fn emit(&self, kind: EventKind) {
        let mut recent = self.recent.locked();
        recent.1 += 1;
        let event = ServerEvent { seq: recent.1, at_unix_ms: unix_ms(), kind };
        // Sent under the lock, so a follower that subscribes under it misses nothing.
        let _ = self.feed.send(event.clone());
        if recent.0.len() == self.capacity {
            recent.0.pop_front();
        }
        recent.0.push_back(event);
    }

    /// The history, oldest first, and a feed of everything after it.
    pub fn follow(&self) -> (Vec<ServerEvent>, broadcast::Receiver<ServerEvent>) {
        let recent = self.recent.locked();
        (recent.0.iter().cloned().collect(), self.feed.subscribe())
    }
}

#[derive(Debug, Default)]
struct Route {
    requests: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
    latency: AtomicHistogram,
}

impl Route {
    fn record(&self, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if status == 429 {
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(elapsed);
    }

    fn stats(&self, name: &str) -> RouteStats {
        RouteStats {
            name: name.to_owned(),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// Everything counted about requests, shared by the API and the exporters.
#[derive(Debug)]
pub struct Telemetry {
    pub events: Arc<EventLog>,
    by_status: Mutex<HashMap<(String, String, u16), u64>>,
    handlers: RwLock<BTreeMap<String, Arc<Route>>>,
    tenants: RwLock<BTreeMap<String, Arc<Route>>>,
    traps: Mutex<BTreeMap<&'static str, u64>>,
    refusals: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Response cache outcomes by (handler, `hit` | `miss` | `store` | `eviction`).
    caches: Mutex<BTreeMap<(String, &'static str), u64>>,
}

fn route(map: &RwLock<BTreeMap<String, Arc<Route>>>, name: &str) -> Arc<Route> {
    if let Some(r) = map.reading().get(name) {
        return Arc::clone(r);
    }
    let mut map = map.writing();
    Arc::clone(map.entry(name.to_owned()).or_default())
}

impl Telemetry {
    pub fn new(events: Arc<EventLog>) -> Telemetry {
        Telemetry {
            events,
            by_status: Mutex::new(HashMap::new()),
            handlers: RwLock::new(BTreeMap::new()),
            tenants: RwLock::new(BTreeMap::new()),
            traps: Mutex::new(BTreeMap::new()),
            refusals: Mutex::new(BTreeMap::new()),
            caches: Mutex::new(BTreeMap::new()),
        }
    }

    /// One answered request: `handler` and `tenant` must be configured names (or [`UNKNOWN`],
    /// [`ANONYMOUS`]).
    pub fn record_request(&self, handler: &str, tenant: &str, status: u16, elapsed: Duration) {
        {
            let mut counts = self.by_status.locked();
            *counts.entry((handler.to_owned(), tenant.to_owned(), status)).or_default() += 1;
        }
        route(&self.handlers, handler).record(status, elapsed);
        if tenant != ANONYMOUS {
            route(&self.tenants, tenant).record(status, elapsed);
        }
    }

    pub fn record_trap(&self, handler: &str, tenant: &str, kind: &'static str, mut message: String) {
        // Part of it may come from the guest: kept short, so events stay small.
        if message.len() > MAX_MESSAGE {
            message.truncate(message.floor_char_boundary(MAX_MESSAGE));
            message.push('…');
        }
        *self.traps.locked().entry(kind).or_default() += 1;
        self.events.emit(EventKind::GuestTrap {
            handler: handler.to_owned(),
            tenant: tenant.to_owned(),
            kind: kind.to_owned(),
            message,
        });
    }

    pub fn record_refusal(&self, tenant: &str, kind: &'static str) {
        *self
            .refusals
            .locked()
            .entry((tenant.to_owned(), kind))
            .or_default() += 1;
    }

    /// Counts `n` response-cache outcomes of `handler`.
    pub fn record_cache(&self, handler: &str, outcome: &'static str, n: u64) {
        let mut caches = self.caches.locked();
        match caches.get_mut(&(handler.to_owned(), outcome)) {
            Some(count) => *count += n,
            None => {
                caches.insert((handler.to_owned(), outcome), n);
            }
        }
    }

    /// Response-cache outcomes by (handler, outcome).
    pub fn caches(&self) -> Vec<((String, &'static str), u64)> {
        self.caches.locked().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Requests by (handler, tenant, status).
    pub fn requests(&self) -> Vec<((String, String, u16), u64)> {
        let mut all: Vec<_> = self
            .by_status
            .locked()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        all.sort();
        all
    }

    pub fn handlers(&self) -> Vec<RouteStats> {
        let map = self.handlers.reading();
        map.iter().map(|(name, r)| r.stats(name)).collect()
    }

    pub fn tenants(&self) -> Vec<RouteStats> {
        let map = self.tenants.reading();
        map.iter().map(|(name, r)| r.stats(name)).collect()
    }

    pub fn traps(&self) -> Vec<(&'static str, u64)> {
        self.traps.locked().iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn refusals(&self) -> Vec<((String, &'static str), u64)> {
        self.refusals
            .locked()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_and_the_log_replays_then_follows() {
        let telemetry = Telemetry::new(Arc::new(EventLog::new(2)));
        telemetry.record_request("digits", "demo", 200, Duration::from_millis(2));
        telemetry.record_request("digits", "demo", 429, Duration::from_micros(30));
        telemetry.record_request(UNKNOWN, ANONYMOUS, 401, Duration::from_micros(30));
        let handlers = telemetry.handlers();
        let digits = handlers.iter().find(|h| h.name == "digits").expect("digits");
        assert_eq!((digits.requests, digits.throttled, digits.errors), (2, 1, 0));
        assert_eq!(telemetry.tenants().len(), 1, "anonymous calls have no tenant row");
        assert_eq!(telemetry.requests().len(), 3);

        for i in 0..3 {
            telemetry.record_trap("h", "t", "memory", format!("trap {i} {}", "é".repeat(400)));
        }
        assert_eq!(telemetry.traps(), vec![("memory", 3)]);
        let (history, mut feed) = telemetry.events.follow();
        assert_eq!(history.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3], "bounded history");
        match &history[0].kind {
            EventKind::GuestTrap { message, .. } => assert!(message.len() <= MAX_MESSAGE + 3 && message.ends_with('…')),
            other => panic!("{other:?}"),
        }
        telemetry.events.emit(EventKind::Undeployed { handler: "h".into(), tenant: "t".into() });
        assert_eq!(feed.try_recv().map(|e| e.seq).ok(), Some(4));
    }
}
