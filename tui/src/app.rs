//! The dashboard's state and the one function that changes it. Messages come from the
//! keyboard and the fetchers; rates and recent percentiles are worked out here, from the
//! difference between two snapshots, so the view only formats.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use kiln_wire::{EventKind, Histogram, ServerEvent, Stats};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::fleet::ReplicaSample;

/// Samples kept for sparklines and the latency chart (60 s at the default refresh).
pub const HISTORY: usize = 60;
/// Events kept for the log.
const EVENTS: usize = 200;

#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    /// A snapshot and when it was taken (since start; differences give rates). Watching several
    /// replicas, it is their sum, and [`Msg::Replicas`] came just before it.
    Stats { stats: Box<Stats>, at: Duration },
    /// Each watched replica's own snapshot (or why there is none), taken at `at`.
    Replicas { samples: Vec<ReplicaSample>, at: Duration },
    Disconnected { error: String, retry_in: Duration },
    /// The event stream of replica `source` (0 for the one server) (re)connected: it replays
    /// its recent history next, which replaces what is shown of it.
    EventsReset { source: usize },
    Event { source: usize, event: Box<ServerEvent> },
    /// What an action on a model came to: the server's words, or why it failed.
    ActionDone(String),
    ActionFailed(String),
}

/// Something to do to a model through the admin API; `main` hands it to the controller thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub model: String,
    pub kind: ActionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Pause,
    Resume,
    /// Answer every queued request 503; asked to confirm first.
    Flush,
    /// Hold this many replicas (instances = N).
    Replicas(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    Connecting,
    Connected,
    Disconnected { error: String, retry_in: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Gpus,
    Models,
    Handlers,
    Events,
}

const PANELS: [Panel; 4] = [Panel::Gpus, Panel::Models, Panel::Handlers, Panel::Events];

/// Columns of the model table, in order; the sort key is one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Model,
    Queue,
    WaitP50,
    WaitP95,
    Batch,
    Rate,
    Replicas,
}

pub const COLUMNS: [Column; 7] =
    [Column::Model, Column::Queue, Column::WaitP50, Column::WaitP95, Column::Batch, Column::Rate, Column::Replicas];

/// One model row, with its recent rates.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    pub name: String,
    pub state: String,
    pub queue: u64,
    pub wait_p50_ms: f64,
    pub wait_p95_ms: f64,
    pub batch: f64,
    pub rate: f64,
    pub replicas: u32,
    pub max: u32,
    pub devices: String,
    /// Paused by an operator: requests queue, no batch runs.
    pub paused: bool,
    /// The learned batch size with the cheapest forward pass per row, and that cost in ms.
    pub best_batch: Option<(u32, f64)>,
}

/// One watched replica: its name, whether it answers, and its recent rates.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRow {
    pub name: String,
    /// Why it did not answer the last poll.
    pub error: Option<String>,
    /// It said it is shutting down (its last event).
    pub draining: bool,
    pub rate: f64,
    pub errors: u64,
    /// Requests waiting in its model queues now.
    pub queued: u64,
    /// Its process's CPU use over the interval, in cores.
    pub cpu: f64,
    pub rss_bytes: u64,
    pub uptime_seconds: f64,
}

/// One handler or tenant row, with its recent rates.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    pub name: String,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub throttled: u64,
    /// For a handler with a response cache: hits among its lookups over the last interval.
    pub cache_hit: Option<f64>,
}

#[derive(Debug)]
pub struct App {
    pub url: String,
    pub stats: Option<Stats>,
    previous: Option<(Stats, Duration)>,
    /// The watched replicas, one row each, when there are several (empty for one server).
    pub replicas: Vec<ReplicaRow>,
    /// Each replica's previous snapshot, for its rates.
    replica_previous: Vec<Option<(Stats, Duration)>>,
    /// Sources whose event stream ended with the server shutting down.
    draining: std::collections::BTreeSet<usize>,
    /// How many servers are watched (each a source of events).
    pub sources: usize,
    pub connection: Connection,
    pub paused: bool,
    /// The server (every watched replica) said it is shutting down (its last event); cleared on
    /// reconnect.
    pub server_draining: bool,
    pub help: bool,
    pub focus: Panel,
    pub selected: usize,
    pub sort: Option<(Column, bool)>,
    pub sort_column: Column,
    pub filter: String,
    pub editing_filter: bool,
    pub refresh: Duration,
    pub quit: bool,
    /// Newest last, with the replica each came from (0 for the one server).
    pub events: VecDeque<(usize, ServerEvent)>,
    pub req_rate: f64,
    pub error_rate: f64,
    /// Visible rows (filtered and sorted) and all of them.
    pub models: Vec<ModelRow>,
    pub handlers: Vec<RouteRow>,
    pub tenants: Vec<RouteRow>,
    all_models: Vec<ModelRow>,
    all_handlers: Vec<RouteRow>,
    /// Utilization per GPU index, newest last.
    pub gpu_history: BTreeMap<u32, VecDeque<u64>>,
    /// Busy percent per CPU replica (`model/replica`), newest last, where there is no GPU.
    pub cpu_history: BTreeMap<String, VecDeque<u64>>,
    /// Handler latency p50 and p99 (ms) over each interval, newest last.
    pub latency: VecDeque<(f64, f64)>,
    /// An action waiting for `y` (flush).
    pub confirm: Option<Action>,
    /// Actions to send, oldest first; `main` takes them.
    pub actions: Vec<Action>,
    /// The last action's outcome, for the footer.
    pub notice: Option<(String, bool)>,
}

impl App {
    pub fn new(url: String, refresh: Duration) -> App {
        App {
            url,
            stats: None,
            previous: None,
            replicas: Vec::new(),
            replica_previous: Vec::new(),
            draining: std::collections::BTreeSet::new(),
            sources: 1,
            connection: Connection::Connecting,
            paused: false,
            server_draining: false,
            help: false,
            focus: Panel::Models,
            selected: 0,
            sort: None,
            sort_column: Column::Model,
            filter: String::new(),
            editing_filter: false,
            refresh,
            quit: false,
            events: VecDeque::new(),
            req_rate: 0.0,
            error_rate: 0.0,
            models: Vec::new(),
            handlers: Vec::new(),
            tenants: Vec::new(),
            all_models: Vec::new(),
            all_handlers: Vec::new(),
            gpu_history: BTreeMap::new(),
            cpu_history: BTreeMap::new(),
            latency: VecDeque::new(),
            confirm: None,
            actions: Vec::new(),
            notice: None,
        }
    }

    pub fn update(&mut self, msg: Msg) {
        match msg {
            Msg::Key(key) => self.key(key),
            Msg::Stats { stats, at } => {
                self.connection = Connection::Connected;
                if !self.paused {
                    self.snapshot(*stats, at);
                }
            }
            Msg::Replicas { samples, at } => {
                self.connection = Connection::Connected;
                if !self.paused {
                    self.replica_rows(samples, at);
                }
            }
            Msg::Disconnected { error, retry_in } => self.connection = Connection::Disconnected { error, retry_in },
            Msg::EventsReset { source } => {
                self.events.retain(|(from, _)| *from != source);
                self.draining.remove(&source);
                self.server_draining = self.draining.len() >= self.sources;
                if let Some(row) = self.replicas.get_mut(source) {
                    row.draining = false;
                }
            }
            Msg::ActionDone(text) => self.notice = Some((text, true)),
            Msg::ActionFailed(text) => self.notice = Some((text, false)),
            Msg::Event { source, event } => {
                if matches!(event.kind, EventKind::Draining { .. }) {
                    self.draining.insert(source);
                    if let Some(row) = self.replicas.get_mut(source) {
                        row.draining = true;
                    }
                    self.server_draining = self.draining.len() >= self.sources;
                }
                if !self.paused {
                    if self.events.len() == EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back((source, *event));
                }
            }
        }
    }

    fn key(&mut self, key: KeyEvent) {
        if key.kind == KeyEventKind::Release {
            return;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return;
        }
        if let Some(action) = self.confirm.take() {
            if key.code == KeyCode::Char('y') {
                self.actions.push(action);
            } else {
                self.notice = Some((format!("flush of {} cancelled", action.model), true));
            }
            return;
        }
        if self.editing_filter {
            match key.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.order();
            return;
        }
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.help = !self.help,
            KeyCode::Esc => {
                if self.help {
                    self.help = false;
                } else {
                    self.filter.clear();
                    self.order();
                }
            }
            KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Char('p') => {
                if let Some(m) = self.selected_model() {
                    let kind = if m.paused { ActionKind::Resume } else { ActionKind::Pause };
                    let model = m.name.clone();
                    self.actions.push(Action { model, kind });
                }
            }
            KeyCode::Char('f') => {
                if let Some(m) = self.selected_model() {
                    self.confirm = Some(Action { model: m.name.clone(), kind: ActionKind::Flush });
                }
            }
            KeyCode::Char('+') => {
                if let Some(m) = self.selected_model() {
                    let action = Action { model: m.name.clone(), kind: ActionKind::Replicas(m.replicas + 1) };
                    self.actions.push(action);
                }
            }
            KeyCode::Char('-') => {
                if let Some(m) = self.selected_model().filter(|m| m.replicas > 1) {
                    let action = Action { model: m.name.clone(), kind: ActionKind::Replicas(m.replicas - 1) };
                    self.actions.push(action);
                }
            }
            KeyCode::Tab => self.cycle(1),
            KeyCode::BackTab => self.cycle(PANELS.len() - 1),
            KeyCode::Down | KeyCode::Char('j') => self.selected = (self.selected + 1).min(self.rows().saturating_sub(1)),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Right | KeyCode::Char('l') => self.sort_column = step(self.sort_column, 1),
            KeyCode::Left | KeyCode::Char('h') => self.sort_column = step(self.sort_column, COLUMNS.len() - 1),
            KeyCode::Char('s') => {
                // Descending first (largest queue on top); the same key again reverses.
                self.sort = match self.sort {
                    Some((c, descending)) if c == self.sort_column => Some((c, !descending)),
                    _ => Some((self.sort_column, true)),
                };
                self.order();
            }
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Char('>') => self.refresh = (self.refresh / 2).max(Duration::from_millis(250)),
            KeyCode::Char('<') => self.refresh = (self.refresh * 2).min(Duration::from_secs(10)),
            _ => {}
        }
    }

    /// The model row under the cursor, when the models panel has the focus.
    pub fn selected_model(&self) -> Option<&ModelRow> {
        (self.focus == Panel::Models).then(|| self.models.get(self.selected)).flatten()
    }

    fn cycle(&mut self, by: usize) {
        let at = PANELS.iter().position(|p| *p == self.focus).unwrap_or(0);
        self.focus = PANELS[(at + by) % PANELS.len()];
        self.selected = 0;
    }

    fn rows(&self) -> usize {
        match self.focus {
            Panel::Models => self.models.len(),
            Panel::Handlers => self.handlers.len() + self.tenants.len(),
            Panel::Events => self.decisions().count(),
            Panel::Gpus => self.stats.as_ref().map_or(0, |s| s.gpus.len()),
        }
    }

    /// One row per replica, with rates from its own previous snapshot. When the replicas that
    /// answer change, or one restarted (its counters began again), the fleet's sum jumps: the
    /// next snapshot starts its rates afresh.
    fn replica_rows(&mut self, samples: Vec<ReplicaSample>, at: Duration) {
        self.replica_previous.resize(samples.len(), None);
        let answered = |rows: &[ReplicaRow]| rows.iter().map(|r| r.error.is_none()).collect::<Vec<_>>();
        let before = answered(&self.replicas);
        let mut restarted = false;
        let mut rows = Vec::with_capacity(samples.len());
        for (i, sample) in samples.iter().enumerate() {
            let draining = self.draining.contains(&i);
            // A replica that stops answering keeps the name it last gave.
            let name = match (&sample.outcome, self.replicas.get(i)) {
                (Err(_), Some(known)) => known.name.clone(),
                _ => sample.name(),
            };
            let row = match &sample.outcome {
                Ok(stats) => {
                    let previous = self.replica_previous[i].take().filter(|(_, t)| at > *t);
                    restarted |= previous.as_ref().is_some_and(|(old, _)| old.uptime_seconds > stats.uptime_seconds);
                    let since = previous.as_ref().map_or(0.0, |(_, t)| (at - *t).as_secs_f64());
                    let requests = |s: &Stats| s.handlers.iter().map(|h| h.requests).sum::<u64>();
                    let (rate, cpu) = match &previous {
                        Some((old, _)) if since > 0.0 => (
                            requests(stats).saturating_sub(requests(old)) as f64 / since,
                            ((stats.process.cpu_seconds - old.process.cpu_seconds) / since).max(0.0),
                        ),
                        _ => (0.0, 0.0),
                    };
                    self.replica_previous[i] = Some((stats.clone(), at));
                    ReplicaRow {
                        name,
                        error: None,
                        draining,
                        rate,
                        errors: stats.handlers.iter().map(|h| h.errors).sum(),
                        queued: stats.models.iter().map(|m| m.queued).sum(),
                        cpu,
                        rss_bytes: stats.process.rss_bytes,
                        uptime_seconds: stats.uptime_seconds,
                    }
                }
                Err(error) => {
                    self.replica_previous[i] = None;
                    ReplicaRow { name, error: Some(error.clone()), draining, rate: 0.0, errors: 0, queued: 0, cpu: 0.0, rss_bytes: 0, uptime_seconds: 0.0 }
                }
            };
            rows.push(row);
        }
        if restarted || answered(&rows) != before {
            self.previous = None;
        }
        self.replicas = rows;
    }

    fn snapshot(&mut self, stats: Stats, at: Duration) {
        let (before, since) = match self.previous.take() {
            Some((s, t)) if at > t => (Some(s), (at - t).as_secs_f64()),
            _ => (None, 0.0),
        };
        let rate = |now: u64, then: u64| if since > 0.0 { now.saturating_sub(then) as f64 / since } else { 0.0 };

        let old_handler = |name: &str| before.as_ref().and_then(|b| b.handlers.iter().find(|h| h.name == name));
        let total = |s: &Stats| -> (u64, u64) { s.handlers.iter().fold((0, 0), |(r, e), h| (r + h.requests, e + h.errors)) };
        let (requests, errors) = total(&stats);
        let (requests0, errors0) = before.as_ref().map_or((requests, errors), total);
        self.req_rate = rate(requests, requests0);
        let new = requests.saturating_sub(requests0);
        self.error_rate = if new == 0 { 0.0 } else { errors.saturating_sub(errors0) as f64 / new as f64 };

        // Latency over the interval, all handlers together.
        let mut merged: Option<Histogram> = None;
        for h in &stats.handlers {
            let recent = old_handler(&h.name).map_or_else(|| h.latency.clone(), |o| h.latency.since(&o.latency));
            merged = Some(match merged {
                None => recent,
                Some(mut m) => {
                    m.add(&recent);
                    m
                }
            });
        }
        if let Some(m) = merged.filter(|_| before.is_some()) {
            push(&mut self.latency, (m.quantile_ms(0.5), m.quantile_ms(0.99)));
        }
        for gpu in &stats.gpus {
            push(self.gpu_history.entry(gpu.index).or_default(), u64::from(gpu.utilization_percent));
        }
        if stats.gpus.is_empty() {
            for model in &stats.models {
                for r in &model.replicas {
                    let old = before
                        .as_ref()
                        .and_then(|b| b.models.iter().find(|m| m.name == model.name))
                        .and_then(|m| m.replicas.iter().find(|o| o.id == r.id))
                        .map_or(r.busy_seconds, |o| o.busy_seconds);
                    let busy = if since > 0.0 { ((r.busy_seconds - old) / since * 100.0).clamp(0.0, 100.0) } else { 0.0 };
                    push(self.cpu_history.entry(format!("{}/{}", model.name, r.id)).or_default(), busy.round() as u64);
                }
            }
        }
        self.previous = Some((stats.clone(), at));
        self.stats = Some(stats);
        self.derive(before.as_ref(), since);
    }

    fn derive(&mut self, before: Option<&Stats>, since: f64) {
        let Some(stats) = &self.stats else { return };
        let rate = |now: u64, then: u64| if since > 0.0 { now.saturating_sub(then) as f64 / since } else { 0.0 };
        self.all_models = stats
            .models
            .iter()
            .map(|m| {
                let old = before.and_then(|b| b.models.iter().find(|o| o.name == m.name));
                let waits = old.map_or_else(|| m.queue_wait.clone(), |o| m.queue_wait.since(&o.queue_wait));
                let (inf, exe) = old.map_or((m.inferences, m.executions), |o| (m.inferences - o.inferences.min(m.inferences), m.executions - o.executions.min(m.executions)));
                let mut devices: Vec<&str> = m.replicas.iter().map(|r| r.device.as_str()).collect();
                devices.sort_unstable();
                devices.dedup();
                ModelRow {
                    name: m.name.clone(),
                    state: m.state.clone(),
                    queue: m.queued,
                    wait_p50_ms: waits.quantile_ms(0.5),
                    wait_p95_ms: waits.quantile_ms(0.95),
                    batch: if exe == 0 { 0.0 } else { inf as f64 / exe as f64 },
                    rate: old.map_or(0.0, |o| rate(m.inferences, o.inferences)),
                    replicas: m.replica_target,
                    max: m.instances.max,
                    // FP32 goes without saying; a reduced or searched precision is shown.
                    devices: match m.precision.as_str() {
                        "" | "fp32" => devices.join(","),
                        precision => format!("{} {precision}", devices.join(",")),
                    },
                    paused: m.paused,
                    best_batch: m.best_batch(),
                }
            })
            .collect();
        let routes = |now: &[kiln_wire::RouteStats], then: Option<&[kiln_wire::RouteStats]>| -> Vec<RouteRow> {
            now.iter()
                .map(|r| {
                    let old = then.and_then(|t| t.iter().find(|o| o.name == r.name));
                    let recent = old.map_or_else(|| r.latency.clone(), |o| r.latency.since(&o.latency));
                    RouteRow {
                        name: r.name.clone(),
                        rate: old.map_or(0.0, |o| rate(r.requests, o.requests)),
                        p50_ms: recent.quantile_ms(0.5),
                        p99_ms: recent.quantile_ms(0.99),
                        errors: r.errors,
                        throttled: r.throttled,
                        cache_hit: None,
                    }
                })
                .collect()
        };
        self.all_handlers = routes(&stats.handlers, before.map(|b| b.handlers.as_slice()));
        for handler in &mut self.all_handlers {
            let Some(cache) = stats.caches.iter().find(|c| c.handler == handler.name) else { continue };
            let old = before.and_then(|b| b.caches.iter().find(|c| c.handler == handler.name));
            let (hits, misses) = old.map_or((cache.hits, cache.misses), |o| {
                (cache.hits.saturating_sub(o.hits), cache.misses.saturating_sub(o.misses))
            });
            handler.cache_hit = Some(if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 });
        }
        self.tenants = routes(&stats.tenants, before.map(|b| b.tenants.as_slice()));
        self.order();
    }

    /// The visible rows: every row that matches the filter, in sort order.
    fn order(&mut self) {
        let f = self.filter.to_lowercase();
        let keep = |name: &str| f.is_empty() || name.to_lowercase().contains(&f);
        self.models = self.all_models.iter().filter(|m| keep(&m.name)).cloned().collect();
        self.handlers = self.all_handlers.iter().filter(|h| keep(&h.name)).cloned().collect();
        if let Some((column, descending)) = self.sort {
            self.models.sort_by(|a, b| {
                let order = match column {
                    Column::Model => a.name.cmp(&b.name),
                    Column::Queue => a.queue.cmp(&b.queue),
                    Column::WaitP50 => a.wait_p50_ms.total_cmp(&b.wait_p50_ms),
                    Column::WaitP95 => a.wait_p95_ms.total_cmp(&b.wait_p95_ms),
                    Column::Batch => a.batch.total_cmp(&b.batch),
                    Column::Rate => a.rate.total_cmp(&b.rate),
                    Column::Replicas => a.replicas.cmp(&b.replicas),
                };
                if descending { order.reverse() } else { order }
            });
        }
        self.selected = self.selected.min(self.rows().saturating_sub(1));
    }

    /// Scaling and precision decisions and model workers' exits and restarts among the events,
    /// newest first, each with the replica it came from (0 for the one server).
    pub fn decisions(&self) -> impl Iterator<Item = &(usize, ServerEvent)> {
        self.events.iter().rev().filter(|(_, e)| {
            matches!(
                e.kind,
                EventKind::Scaling(_) | EventKind::PrecisionChosen(_) | EventKind::WorkerExited { .. } | EventKind::WorkerRestarted { .. }
            )
        })
    }
}

fn step(c: Column, by: usize) -> Column {
    let at = COLUMNS.iter().position(|x| *x == c).unwrap_or(0);
    COLUMNS[(at + by) % COLUMNS.len()]
}

fn push<T>(history: &mut VecDeque<T>, value: T) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(value);
}
