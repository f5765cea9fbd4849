//! The whole screen at 80×24 and 120×40 from fixed data, as `insta` snapshots: connected with
//! GPUs, CPU-only, disconnected, paused, and with the help overlay. And the keys.

use std::time::Duration;

use kiln_top::app::{App, Connection, Msg, Panel};
use kiln_top::view;
use kiln_wire::*;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

fn histogram(counts: &[(usize, u64)]) -> Histogram {
    let mut h = Histogram { counts: vec![0; LATENCY_BOUNDS_US.len() + 1], sum_us: 0 };
    for &(bucket, n) in counts {
        h.counts[bucket] += n;
        h.sum_us += n * LATENCY_BOUNDS_US.get(bucket).copied().unwrap_or(10_000_000);
    }
    h
}

fn replica(id: u32, device: &str, batches: u64, busy_seconds: f64) -> ReplicaInfo {
    ReplicaInfo { id, device: device.into(), state: ReplicaState::Ready, busy: false, batches, rows: batches * 4, busy_seconds }
}

/// The server after `t` seconds of a steady load: 400 embeddings req/s and 1,200 digits req/s.
fn stats(t: u64, gpus: bool) -> Stats {
    let device = if gpus { "cuda:0" } else { "cpu" };
    let model = |name: &str, rate: u64, batch: u64, queued: u64, wait_bucket: usize, max: u32, replicas: Vec<ReplicaInfo>| ModelStats {
        name: name.into(),
        state: "ready".into(),
        device: "auto".into(),
        paused: false,
        instances: Bounds { min: 1, max },
        replica_target: replicas.len() as u32,
        replicas,
        max_batch_size: 32,
        latency_objective_ms: 50.0,
        queued,
        inferences: rate * t,
        executions: rate * t / batch,
        rows: rate * t,
        dropped: 0,
        overloaded: 0,
        timeouts: 0,
        isolated_batches: 0,
        ragged_batching: true,
        average_batch_size: batch as f64,
        batch_sizes: vec![0; BATCH_BOUNDS.len() + 1],
        queue_wait: histogram(&[(wait_bucket, rate * t * 9 / 10), (wait_bucket + 2, rate * t / 10)]),
        forward: histogram(&[(8, rate * t / batch)]),
        forward_curve: vec![
            CurvePoint { rows: 1, forward_ms: 0.3, samples: 40 },
            CurvePoint { rows: batch as u32, forward_ms: 0.3 + 0.05 * batch as f64, samples: 12 },
        ],
        precision: if name == "minilm" { "bf16 2.9×".into() } else { "fp32".into() },
    };
    let route = |name: &str, rate: u64, bucket: usize, errors: u64, throttled: u64| RouteStats {
        name: name.into(),
        requests: rate * t,
        errors: errors * t,
        throttled: throttled * t,
        latency: histogram(&[(bucket, rate * t * 98 / 100), (bucket + 3, rate * t * 2 / 100)]),
    };
    Stats {
        server: "kiln 0.1.0".into(),
        uptime_seconds: 3723.0 + t as f64,
        gpus: if gpus {
            vec![
                GpuInfo {
                    index: 0,
                    name: "NVIDIA H200".into(),
                    uuid: "GPU-0".into(),
                    memory_total_bytes: 141 << 30,
                    memory_used_bytes: 24 << 30,
                    memory_free_bytes: 117 << 30,
                    utilization_percent: 40 + 10 * t as u32,
                    temperature_celsius: 54,
                    power_watts: 310.0,
                    power_limit_watts: 700.0,
                    simulated: false,
                },
                GpuInfo {
                    index: 1,
                    name: "NVIDIA H200".into(),
                    uuid: "GPU-1".into(),
                    memory_total_bytes: 141 << 30,
                    memory_used_bytes: 130 << 30,
                    memory_free_bytes: 11 << 30,
                    utilization_percent: 92,
                    temperature_celsius: 83,
                    power_watts: 640.0,
                    power_limit_watts: 700.0,
                    simulated: false,
                },
            ]
        } else {
            Vec::new()
        },
        models: vec![
            model("digits", 1200, 24, 0, 5, 1, vec![replica(0, device, 50 * t, 0.3 * t as f64)]),
            model(
                "minilm",
                400,
                8,
                12,
                8,
                4,
                vec![replica(0, device, 30 * t, 0.9 * t as f64), replica(1, if gpus { "cuda:1" } else { "cpu" }, 20 * t, 0.6 * t as f64)],
            ),
        ],
        handlers: vec![route("digits", 1200, 6, 0, 0), route("embeddings", 400, 10, 1, 3)],
        tenants: vec![route("demo", 1600, 8, 1, 3)],
        process: Default::default(),
        caches: Vec::new(),
        replica: None,
    }
}

fn decision(at: u64, action: ScaleAction, from: u32, to: u32, reason: &str, device: Option<&str>) -> Msg {
    let d = ScalingDecision {
        at_unix_ms: at,
        model: "minilm".into(),
        action,
        from,
        to,
        reason: reason.into(),
        device: device.map(Into::into),
        inputs: ScalingInputs { queue_depth: 12, requests: 800, queue_wait_p95_ms: 80.0, latency_objective_ms: 50.0, utilization: 0.9, gpus: Vec::new() },
    };
    Msg::Event { source: 0, event: Box::new(ServerEvent { seq: at, at_unix_ms: at, kind: EventKind::Scaling(d) }) }
}

fn event(at: u64, kind: EventKind) -> Msg {
    Msg::Event { source: 0, event: Box::new(ServerEvent { seq: at, at_unix_ms: at, kind }) }
}

/// What `precision = "auto"` chose for MiniLM.
fn precision_chosen(at: u64) -> Msg {
    let choice = PrecisionChoice {
        model: "minilm".into(),
        device: "cpu".into(),
        precision: "bf16".into(),
        speedup: 2.9,
        worst_cosine: 0.99962,
        worst_abs: 0.02,
        search_ms: 3100,
        candidates: vec!["bf16: 2.90× fp32, worst cosine 0.9996".into(), "fp16: 0.40× fp32, not 1.1× or more (worst cosine 0.9999)".into()],
    };
    event(at, EventKind::PrecisionChosen(choice))
}

/// Two snapshots a second apart, a precision choice, a few scaling decisions, and a tenant's
/// model worker that crashed and was restarted.
fn app(gpus: bool) -> App {
    let mut app = App::new("http://127.0.0.1:8080".into(), Duration::from_secs(1));
    for t in 1..=3 {
        app.update(Msg::Stats { stats: Box::new(stats(t, gpus)), at: Duration::from_secs(t) });
    }
    app.update(precision_chosen(1_794_999_990_000));
    app.update(decision(1_795_000_000_000, ScaleAction::Up, 1, 2, "queue wait p95 80.0 ms over the 50 ms objective", Some("cuda:1")));
    app.update(decision(1_795_000_002_000, ScaleAction::Hold, 2, 2, "cooldown after the last scale-up", None));
    app.update(decision(1_795_000_040_000, ScaleAction::Down, 2, 1, "idle for 30 s", None));
    let (model, reason) = ("eve:mine".to_owned(), "exited (killed by signal 6 (SIGABRT))".to_owned());
    app.update(event(1_795_000_041_000, EventKind::WorkerExited { model: model.clone(), pid: 4242, reason, restart_in_ms: 100 }));
    app.update(event(1_795_000_041_900, EventKind::WorkerRestarted { model, pid: 4299, restarts: 1 }));
    app
}

fn screen(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
    terminal.draw(|frame| view::draw(app, frame)).expect("draw");
    terminal.backend().to_string()
}

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

#[test]
fn connected_with_gpus() {
    let app = app(true);
    insta::assert_snapshot!("gpus_80x24", screen(&app, 80, 24));
    insta::assert_snapshot!("gpus_120x40", screen(&app, 120, 40));
}

#[test]
fn cpu_only_shows_the_executors() {
    let app = app(false);
    let text = screen(&app, 120, 40);
    assert!(text.contains("CPU executors") && text.contains("minilm/1"), "{text}");
    assert!(text.contains("eve:mine ✗ worker 4242") && text.contains("eve:mine ⟳ worker 4299"), "{text}");
    insta::assert_snapshot!("cpu_120x40", text);
}

#[test]
fn disconnected_keeps_the_last_data_and_says_so() {
    let mut app = app(true);
    app.update(Msg::Disconnected { error: "cannot connect".into(), retry_in: Duration::from_secs(4) });
    let text = screen(&app, 80, 24);
    assert!(text.contains("DISCONNECTED: cannot connect, retry in 4s"), "{text}");
    insta::assert_snapshot!("disconnected_80x24", text);
    // Never connected at all: a plain message instead of empty panels.
    let mut fresh = App::new("http://127.0.0.1:8080".into(), Duration::from_secs(1));
    fresh.update(Msg::Disconnected { error: "cannot connect".into(), retry_in: Duration::from_secs(1) });
    insta::assert_snapshot!("never_connected_80x24", screen(&fresh, 80, 24));
}

#[test]
fn help_overlay() {
    let mut app = app(true);
    app.update(key(KeyCode::Char('?')));
    insta::assert_snapshot!("help_80x24", screen(&app, 80, 24));
    insta::assert_snapshot!("help_120x40", screen(&app, 120, 40));
    app.update(key(KeyCode::Esc));
    assert!(!app.help);
}

#[test]
fn keys_pause_sort_filter_refresh_move_and_quit() {
    let mut app = app(true);
    // Rates from the snapshots: 1,600 handler requests per second, minilm 400 inferences/s.
    assert!((app.req_rate - 1600.0).abs() < 1e-6, "{}", app.req_rate);
    let minilm = app.models.iter().find(|m| m.name == "minilm").expect("minilm");
    assert!((minilm.rate - 400.0).abs() < 1e-6 && (minilm.batch - 8.0).abs() < 1e-6);

    app.update(key(KeyCode::Char(' ')));
    assert!(app.paused);
    app.update(Msg::Stats { stats: Box::new(stats(10, true)), at: Duration::from_secs(10) });
    assert_eq!(app.stats.as_ref().map(|s| s.uptime_seconds), Some(3726.0), "a frozen screen stays still");
    assert!(screen(&app, 80, 24).contains("FROZEN"));
    app.update(key(KeyCode::Char(' ')));
    assert!(!app.paused);

    // Sort by queue, largest first, then reversed.
    app.update(key(KeyCode::Right));
    app.update(key(KeyCode::Char('s')));
    assert_eq!(app.models[0].name, "minilm");
    app.update(key(KeyCode::Char('s')));
    assert_eq!(app.models[0].name, "digits");

    app.update(key(KeyCode::Char('/')));
    for c in "mini".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Enter));
    assert_eq!(app.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["minilm"]);
    assert!(app.handlers.is_empty());
    app.update(key(KeyCode::Esc));
    assert_eq!(app.models.len(), 2, "Esc clears the filter");

    app.update(key(KeyCode::Char('>')));
    assert_eq!(app.refresh, Duration::from_millis(500));
    app.update(key(KeyCode::Char('<')));
    app.update(key(KeyCode::Char('<')));
    assert_eq!(app.refresh, Duration::from_secs(2));

    assert_eq!(app.focus, Panel::Models);
    app.update(key(KeyCode::Char('j')));
    assert_eq!(app.selected, 1);
    app.update(key(KeyCode::Char('j')));
    assert_eq!(app.selected, 1, "the selection stops at the last row");
    app.update(key(KeyCode::Tab));
    assert_eq!((app.focus, app.selected), (Panel::Handlers, 0));
    app.update(Msg::Key(KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT)));
    assert_eq!(app.focus, Panel::Models);

    assert_eq!(app.connection, Connection::Connected);
    app.update(Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)));
    assert!(app.quit);
    let mut other = App::new(String::new(), Duration::from_secs(1));
    other.update(key(KeyCode::Char('q')));
    assert!(other.quit);
}

#[test]
fn model_keys_pause_flush_after_confirming_and_scale_the_selected_model() {
    use kiln_top::app::{Action, ActionKind};
    let mut app = app(true);
    let first = app.models[0].clone();
    let action = |kind| Action { model: first.name.clone(), kind };

    app.update(key(KeyCode::Char('p')));
    app.update(key(KeyCode::Char('+')));
    app.update(key(KeyCode::Char('-')));
    let expected_down = (first.replicas > 1).then(|| action(ActionKind::Replicas(first.replicas - 1)));
    let mut expected = vec![action(ActionKind::Pause), action(ActionKind::Replicas(first.replicas + 1))];
    expected.extend(expected_down);
    assert_eq!(std::mem::take(&mut app.actions), expected);

    // Flush asks first: any key but y cancels, y sends it.
    app.update(key(KeyCode::Char('f')));
    let asking = screen(&app, 80, 24);
    assert!(asking.contains(&format!("flush the queue of {}?", first.name)), "{asking}");
    insta::assert_snapshot!("confirm_flush_80x24", asking);
    app.update(key(KeyCode::Char('n')));
    assert!(app.actions.is_empty() && app.confirm.is_none());
    app.update(key(KeyCode::Char('f')));
    app.update(key(KeyCode::Char('y')));
    assert_eq!(std::mem::take(&mut app.actions), vec![action(ActionKind::Flush)]);

    // The server's answer shows in the footer; a paused model says so in its row, and p resumes.
    app.update(Msg::ActionDone(format!("{}: flushed 3 queued requests", first.name)));
    let mut paused = stats(8, true);
    paused.models.iter_mut().for_each(|m| m.paused = m.name == first.name);
    app.update(Msg::Stats { stats: Box::new(paused), at: Duration::from_secs(8) });
    let shown = screen(&app, 120, 40);
    assert!(shown.contains(&format!("{} (paused)", first.name)) && shown.contains("flushed 3 queued requests"), "{shown}");
    insta::assert_snapshot!("model_paused_120x40", shown);
    app.update(key(KeyCode::Char('p')));
    assert_eq!(std::mem::take(&mut app.actions), vec![action(ActionKind::Resume)]);

    // A handler with a response cache shows its hit ratio over the last interval.
    let cache = |t: u64| CacheStats { handler: "digits".into(), hits: 90 * t, misses: 10 * t, stores: 10 * t, evictions: 0, entries: 5, bytes: 500 };
    for t in [9, 10] {
        let mut cached = stats(t, true);
        cached.caches = vec![cache(t)];
        app.update(Msg::Stats { stats: Box::new(cached), at: Duration::from_secs(t) });
    }
    assert!(screen(&app, 120, 40).contains("digits (90% hit)"), "{}", screen(&app, 120, 40));

    // Model keys do nothing outside the models panel.
    app.update(key(KeyCode::Tab));
    app.update(key(KeyCode::Char('p')));
    app.update(key(KeyCode::Char('f')));
    assert!(app.actions.is_empty() && app.confirm.is_none());
}

/// Two replicas of a fleet, the second one's snapshot `scale` times the first's load, named as
/// cluster mode names them; a third address that does not answer.
fn fleet_samples(t: u64, scale: u64) -> Vec<kiln_top::fleet::ReplicaSample> {
    use kiln_top::fleet::ReplicaSample;
    let named = |name: &str, mut stats: Stats| {
        stats.replica = Some(name.into());
        stats
    };
    vec![
        ReplicaSample { url: "http://10.0.0.1:8080".into(), outcome: Ok(named("kiln-a", stats(t, false))) },
        ReplicaSample { url: "http://10.0.0.2:8080".into(), outcome: Ok(named("kiln-b", stats(t * scale, false))) },
        ReplicaSample { url: "http://10.0.0.3:8080".into(), outcome: Err("cannot connect".into()) },
    ]
}

#[test]
fn a_fleet_is_the_sum_of_its_replicas_with_a_row_each() {
    use kiln_top::fleet::merge;
    let samples = fleet_samples(2, 3);
    let fleet = merge(&samples).expect("two answered");
    let (a, b) = (stats(2, false), stats(6, false));
    // Queues, counters and histograms add up by name; replicas keep apart.
    for (m, (ma, mb)) in fleet.models.iter().zip(a.models.iter().zip(&b.models)) {
        assert_eq!(m.name, ma.name);
        assert_eq!(m.queued, ma.queued + mb.queued);
        assert_eq!(m.inferences, ma.inferences + mb.inferences);
        assert_eq!(m.queue_wait.count(), ma.queue_wait.count() + mb.queue_wait.count());
        assert_eq!(m.replicas.len(), ma.replicas.len() + mb.replicas.len());
        // Each address's replicas keep their ids, offset by its place in the list.
        let ids: Vec<u32> = m.replicas.iter().map(|r| r.id).collect();
        let want: Vec<u32> = ma.replicas.iter().map(|r| r.id).chain(mb.replicas.iter().map(|r| r.id + kiln_top::fleet::ID_STRIDE)).collect();
        assert_eq!(ids, want);
    }
    assert_eq!(fleet.handlers[0].requests, a.handlers[0].requests + b.handlers[0].requests);
    assert_eq!(fleet.tenants[0].latency.count(), a.tenants[0].latency.count() + b.tenants[0].latency.count());
    assert!(merge(&samples[2..]).is_none(), "no answer, no snapshot");

    // The dashboard: a row per replica with its own rate, the summed rate in the header.
    let mut app = App::new("3 replicas".into(), Duration::from_secs(1));
    app.sources = 3;
    for t in 1..=3 {
        let samples = fleet_samples(t, 3);
        let fleet = merge(&samples).expect("fleet");
        app.update(Msg::Replicas { samples, at: Duration::from_secs(t) });
        app.update(Msg::Stats { stats: Box::new(fleet), at: Duration::from_secs(t) });
    }
    assert_eq!(app.replicas.len(), 3);
    // kiln-a: 1,600 req/s over its handlers; kiln-b three times that; the fleet both.
    assert!((app.replicas[0].rate - 1600.0).abs() < 1.0, "{:?}", app.replicas[0]);
    assert!((app.replicas[1].rate - 4800.0).abs() < 1.0, "{:?}", app.replicas[1]);
    assert!((app.req_rate - 6400.0).abs() < 1.0, "{}", app.req_rate);
    assert_eq!(app.replicas[2].error.as_deref(), Some("cannot connect"));
    let text = screen(&app, 120, 40);
    assert!(text.contains("Replicas: 2 of 3 answering"), "{text}");
    for row in ["kiln-a", "kiln-b", "10.0.0.3:8080"] {
        assert!(text.contains(row), "{row}:\n{text}");
    }
    assert!(text.contains("cannot connect") && text.contains("6400 req/s"), "{text}");

    // A replica that stops answering changes the sum: the next snapshot's rates start afresh
    // rather than count its requests as gone.
    let mut samples = fleet_samples(4, 3);
    samples[1].outcome = Err("timed out".into());
    let fleet = merge(&samples).expect("fleet");
    app.update(Msg::Replicas { samples, at: Duration::from_secs(4) });
    app.update(Msg::Stats { stats: Box::new(fleet), at: Duration::from_secs(4) });
    assert_eq!(app.req_rate, 0.0);
    let samples = fleet_samples(5, 3).into_iter().enumerate().map(|(i, mut s)| {
        if i == 1 {
            s.outcome = Err("timed out".into());
        }
        s
    });
    let samples: Vec<_> = samples.collect();
    let fleet = merge(&samples).expect("fleet");
    app.update(Msg::Replicas { samples, at: Duration::from_secs(5) });
    app.update(Msg::Stats { stats: Box::new(fleet), at: Duration::from_secs(5) });
    assert!((app.req_rate - 1600.0).abs() < 1.0, "{}", app.req_rate);

    // A replica that restarted between two polls (its counters began again): rates start afresh
    // rather than read its lost counts as no traffic.
    let restarted = |t: u64| {
        let mut samples = fleet_samples(t, 3);
        samples[1].outcome = Err("timed out".into());
        if let Ok(stats) = &mut samples[0].outcome {
            stats.uptime_seconds = (t - 5) as f64;
            for h in stats.handlers.iter_mut().chain(stats.tenants.iter_mut()) {
                h.requests = h.requests / t * (t - 5);
            }
        }
        samples
    };
    for t in [6, 7] {
        let points = app.latency.len();
        let samples = restarted(t);
        let fleet = merge(&samples).expect("fleet");
        app.update(Msg::Replicas { samples, at: Duration::from_secs(t) });
        app.update(Msg::Stats { stats: Box::new(fleet), at: Duration::from_secs(t) });
        // No latency point from counters that went down; the next interval is measured again.
        let (rate, new_points) = if t == 6 { (0.0, 0) } else { (1600.0, 1) };
        assert!((app.req_rate - rate).abs() < 1.0, "at {t}: {}", app.req_rate);
        assert_eq!(app.latency.len(), points + new_points, "at {t}");
    }

    // One replica shutting down is that replica's state, not the fleet's.
    app.update(Msg::Event { source: 1, event: Box::new(ServerEvent { seq: 1, at_unix_ms: 1_795_000_000_000, kind: EventKind::Draining { grace_ms: 5000, timeout_ms: 30000 } }) });
    assert!(app.replicas[1].draining && !app.server_draining);
    // A scaling decision says which replica made it.
    let Msg::Event { event, .. } = decision(1_795_000_001_000, ScaleAction::Up, 1, 2, "queue wait", None) else { panic!("decision() makes an event") };
    app.update(Msg::Event { source: 0, event });
    let text = screen(&app, 120, 40);
    assert!(text.contains("kiln-a minilm ↑ 1→2"), "{text}");
}
