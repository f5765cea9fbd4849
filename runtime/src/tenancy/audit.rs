//! The audit log: one line for every deploy, delete, auth failure and quota refusal.
//!
//! Lines go to the server log (target `kiln::audit`) and, as JSON, to `audit.log` in the state
//! directory. They name the tenant, the handler and the reason; never a key or a request body.
//!
//! Anyone who can reach the port can cause auth failures, and a tenant over its quota causes
//! refusals at the rate it sends, so neither may cost the server a disk write per request:
//! [`Audit::record`] only queues the line (a bounded channel; a full queue drops and counts), a
//! dedicated thread writes, and the lines of a flood are limited per source (the client's
//! address for auth failures, the tenant for refusals) and per second, with one line saying how
//! many were left out. `audit.log` is rotated to `audit.log.1` past [`MAX_FILE_BYTES`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    Deploy,
    DeployRefused,
    Delete,
    AuthFailure,
    QuotaRefused,
    /// The log filter was changed through the admin API.
    LogFilter,
    /// A model was loaded, replaced or reloaded through the admin API.
    ModelLoad,
    /// A model load through the admin API was refused or failed.
    ModelLoadFailed,
    /// A model was unloaded (kept in the repository) or deleted from it.
    ModelUnload,
    ModelDelete,
    /// A served model was paused, resumed, flushed, reset or tuned.
    ModelControl,
    /// A request in flight was cancelled by its id.
    RequestCancel,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Deploy => "deploy",
            Event::DeployRefused => "deploy_refused",
            Event::Delete => "delete",
            Event::AuthFailure => "auth_failure",
            Event::QuotaRefused => "quota_refused",
            Event::LogFilter => "log_filter",
            Event::ModelLoad => "model_load",
            Event::ModelLoadFailed => "model_load_failed",
            Event::ModelUnload => "model_unload",
            Event::ModelDelete => "model_delete",
            Event::ModelControl => "model_control",
            Event::RequestCancel => "request_cancel",
        }
    }

    /// Events anyone (or any tenant) can cause at request rate: a tenant's own model loads and
    /// deletes among them, limited per tenant like its refusals.
    fn is_flood_prone(self) -> bool {
        matches!(
            self,
            Event::AuthFailure | Event::QuotaRefused | Event::ModelLoad | Event::ModelLoadFailed | Event::ModelDelete
        )
    }
}

/// Lines waiting for the writer; past this, lines are dropped and counted.
const QUEUE: usize = 4096;
/// Flood-prone lines written per source per second, and over all sources.
const PER_SOURCE_PER_SECOND: u32 = 50;
const ALL_SOURCES_PER_SECOND: u32 = 500;
/// `audit.log` is moved to `audit.log.1` (replacing it) when it grows past this.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Longest name (tenant, handler) written; names from URLs can be as long as the URL.
const MAX_NAME: usize = 64;

struct Line {
    event: Event,
    tenant: Option<String>,
    handler: Option<String>,
    reason: String,
    /// Who caused it, for the flood limit: an address or a tenant.
    source: Option<String>,
    time: SystemTime,
}

/// The audit log's front: cheap to call from any thread or task; never blocks.
#[derive(Debug)]
pub struct Audit {
    queue: SyncSender<Line>,
    /// Lines dropped because the queue was full, not yet reported.
    dropped: Arc<AtomicU64>,
}

impl Audit {
    /// Appends to `state_dir/audit.log` from a writer thread; if the file cannot be opened, lines
    /// go to the server log only.
    pub fn open(state_dir: &Path) -> Audit {
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut writer = Writer::new(state_dir.join("audit.log"), Arc::clone(&dropped));
        let spawned = std::thread::Builder::new().name("kiln-audit".into()).spawn(move || {
            loop {
                match lines.recv_timeout(Duration::from_secs(1)) {
                    Ok(line) => writer.write(line),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                writer.tick(Instant::now());
            }
            writer.tick(Instant::now() + Duration::from_secs(2));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the audit writer thread: {e}; audit lines are dropped");
        }
        Audit { queue, dropped }
    }

    /// Records one event.
    pub fn record(&self, event: Event, tenant: Option<&str>, handler: Option<&str>, reason: &str) {
        let source = tenant.filter(|_| event.is_flood_prone()).map(str::to_owned);
        self.queue(event, tenant, handler, reason, source);
    }

    /// Records an authentication failure from `peer` (the flood limit's source).
    pub fn auth_failure(&self, peer: Option<IpAddr>, tenant: Option<&str>, handler: Option<&str>, reason: &str) {
        let source = Some(peer.map_or_else(|| "unknown address".to_owned(), |ip| ip.to_string()));
        self.queue(Event::AuthFailure, tenant, handler, reason, source);
    }

    fn queue(&self, event: Event, tenant: Option<&str>, handler: Option<&str>, reason: &str, source: Option<String>) {
        let line = Line {
            event,
            tenant: tenant.map(bounded),
            handler: handler.map(bounded),
            // A reason can quote what a client sent: never more than a line's worth, and never
            // a line break of its own.
            reason: crate::telemetry::loggable(reason, crate::telemetry::MAX_LOGGED),
            source,
            time: SystemTime::now(),
        };
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A name cut to [`MAX_NAME`] bytes at a character boundary, marked when cut.
fn bounded(name: &str) -> String {
    crate::telemetry::loggable(name, MAX_NAME)
}

/// The writer thread's state: the file, and this second's flood counts.
struct Writer {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    dropped: Arc<AtomicU64>,
    window: Instant,
    per_source: HashMap<(Event, String), (u32, u64)>,
    all_sources: u32,
}

impl Writer {
    fn new(path: PathBuf, dropped: Arc<AtomicU64>) -> Writer {
        let file = open(&path);
        let written = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        Writer {
            path,
            file,
            written,
            dropped,
            window: Instant::now(),
            per_source: HashMap::new(),
            all_sources: 0,
        }
    }

    fn write(&mut self, line: Line) {
        if line.event.is_flood_prone()
            && let Some(source) = &line.source
        {
            let seen = self.per_source.entry((line.event, source.clone())).or_insert((0, 0));
            if seen.0 >= PER_SOURCE_PER_SECOND || self.all_sources >= ALL_SOURCES_PER_SECOND {
                seen.1 += 1;
                return;
            }
            seen.0 += 1;
            self.all_sources += 1;
        }
        self.emit(&line);
    }

    /// Closes the second: says what was left out, and starts counting again.
    fn tick(&mut self, now: Instant) {
        if now.duration_since(self.window) < Duration::from_secs(1) {
            return;
        }
        self.window = now;
        self.all_sources = 0;
        let mut suppressed: Vec<((Event, String), u64)> =
            self.per_source.drain().filter(|(_, (_, left_out))| *left_out > 0).map(|(k, (_, n))| (k, n)).collect();
        suppressed.sort();
        for ((event, source), n) in suppressed {
            self.emit(&Line {
                event,
                tenant: None,
                handler: None,
                reason: format!("{n} more {} lines from {source} in the last second were left out", event.as_str()),
                source: Some(source),
                time: SystemTime::now(),
            });
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(target: "kiln::audit", "{dropped} audit lines dropped: the audit queue was full");
            self.append(&json!({ "time": unix(SystemTime::now()), "event": "audit_dropped", "reason": format!("{dropped} lines dropped: the queue was full") }));
        }
    }

    fn emit(&mut self, line: &Line) {
        tracing::info!(
            target: "kiln::audit",
            event = %line.event.as_str(),
            tenant = %line.tenant.as_deref().unwrap_or("-"),
            handler = %line.handler.as_deref().unwrap_or("-"),
            "{}",
            line.reason
        );
        let mut value = json!({
            "time": unix(line.time),
            "event": line.event.as_str(),
            "tenant": line.tenant,
            "handler": line.handler,
            "reason": line.reason,
        });
        if line.event == Event::AuthFailure {
            value["source"] = json!(line.source);
        }
        self.append(&value);
    }

    fn append(&mut self, value: &serde_json::Value) {
        let text = format!("{value}\n");
        if self.written + text.len() as u64 > MAX_FILE_BYTES {
            self.rotate();
        }
        let Some(file) = &mut self.file else { return };
        match file.write_all(text.as_bytes()) {
            Ok(()) => self.written += text.len() as u64,
            Err(e) => tracing::error!("cannot write the audit log: {e}"),
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let old = self.path.with_extension("log.1");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::error!("cannot rotate the audit log to {}: {e}", old.display());
        }
        self.file = open(&self.path);
        self.written = 0;
    }
}

fn open(path: &Path) -> Option<File> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!("cannot open the audit log {}: {e}; auditing to the server log only", path.display());
            None
        }
    }
}

/// Seconds since the Unix epoch, to the millisecond.
fn unix(time: SystemTime) -> f64 {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Until every queued line is written: the writer is another thread.
    fn settle(path: &Path, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = lines(path);
            if got.len() >= at_least || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_flood_of_auth_failures_writes_a_bounded_number_of_lines_and_says_how_many_it_left_out() {
        let dir = crate::deploy::store::tests::temp_dir("audit-flood");
        let audit = Audit::open(&dir);
        let attacker: IpAddr = "10.1.2.3".parse().expect("ip");
        let long_name = "h".repeat(10_000);
        for _ in 0..2000 {
            audit.auth_failure(Some(attacker), None, Some(&long_name), "unknown API key");
        }
        audit.record(Event::Deploy, Some("t"), Some("h"), "deployed");
        // The flood's second closes after a second; its summary line follows.
        std::thread::sleep(Duration::from_millis(1200));
        audit.record(Event::Delete, Some("t"), Some("h"), "deleted");
        // The flood's first lines, the deploy, the summary and the delete.
        let written = settle(&dir.join("audit.log"), PER_SOURCE_PER_SECOND as usize + 3);
        let failures: Vec<_> = written.iter().filter(|l| l["event"] == "auth_failure" && l["handler"].is_string()).collect();
        assert_eq!(failures.len(), PER_SOURCE_PER_SECOND as usize, "{written:?}");
        assert!(failures.iter().all(|l| l["handler"].as_str().is_some_and(|h| h.len() <= MAX_NAME + 3)));
        assert!(failures.iter().all(|l| l["source"] == "10.1.2.3"));
        let dropped = audit.dropped.load(Ordering::Relaxed);
        let summary = written
            .iter()
            .find_map(|l| l["reason"].as_str().filter(|r| r.contains("were left out")).map(str::to_owned))
            .expect("a summary line");
        let left_out: u64 = summary.split(' ').next().and_then(|n| n.parse().ok()).expect("a count");
        assert_eq!(left_out + dropped + PER_SOURCE_PER_SECOND as u64, 2000, "{summary}");
        assert!(written.iter().any(|l| l["event"] == "deploy") && written.iter().any(|l| l["event"] == "delete"));
    }

    #[test]
    fn the_file_is_rotated_past_its_size() {
        let dir = crate::deploy::store::tests::temp_dir("audit-rotate");
        let path = dir.join("audit.log");
        let mut writer = Writer::new(path.clone(), Arc::new(AtomicU64::new(0)));
        writer.written = MAX_FILE_BYTES - 10;
        writer.write(Line {
            event: Event::Deploy,
            tenant: Some("t".into()),
            handler: Some("h".into()),
            reason: "deployed".into(),
            source: None,
            time: SystemTime::now(),
        });
        assert!(path.with_extension("log.1").exists(), "rotated away");
        assert_eq!(lines(&path).len(), 1, "the new file has the new line");
    }
}
