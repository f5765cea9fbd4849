//! Drawing: a pure function of [`App`]. No I/O and no state changes happen here, so every
//! screen can be tested from fixed data.

use kiln_wire::{EventKind, ScaleAction};
use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, BorderType, Borders, Cell, Chart, Clear, Dataset, GraphType, List, ListItem, Paragraph, Row, Sparkline, Table, TableState, Wrap};

use crate::app::{App, COLUMNS, Connection, Panel};

pub fn draw(app: &App, frame: &mut Frame) {
    let area = frame.area();
    let [header, body, footer] = Layout::vertical([Constraint::Length(1), Constraint::Min(0), Constraint::Length(1)]).areas(area);
    draw_header(app, frame, header);
    draw_footer(app, frame, footer);
    if app.stats.is_none() {
        let text = match &app.connection {
            Connection::Disconnected { error, retry_in } => {
                format!("Cannot reach {}: {error}. Retrying in {:.0} s.", app.url, retry_in.as_secs_f64().ceil())
            }
            _ => format!("Connecting to {} ...", app.url),
        };
        frame.render_widget(Paragraph::new(text).alignment(Alignment::Center).wrap(Wrap { trim: true }).block(panel("kiln", false)), body);
    } else {
        let tall = body.height >= 30;
        // Watching several replicas: a row each, up to 8, above the models.
        let fleet = if app.replicas.is_empty() { 0 } else { app.replicas.len().min(8) as u16 + 3 };
        let [top, replicas, models, bottom] = Layout::vertical([
            Constraint::Length(if tall { 10 } else { 7 }),
            Constraint::Length(fleet),
            Constraint::Min(5),
            Constraint::Length(if tall { 14 } else { 7 }),
        ])
        .areas(body);
        if fleet > 0 {
            draw_replicas(app, frame, replicas);
        }
        let [devices, latency] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top);
        let [routes, decisions] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
        draw_devices(app, frame, devices);
        draw_latency(app, frame, latency);
        draw_models(app, frame, models);
        draw_routes(app, frame, routes);
        draw_decisions(app, frame, decisions);
    }
    if app.help {
        draw_help(frame, area);
    }
}

fn panel(title: &str, focused: bool) -> Block<'_> {
    let style = if focused { Style::new().fg(Color::Cyan) } else { Style::new().fg(Color::DarkGray) };
    Block::default()
        .borders(Borders::ALL)
        .border_type(if focused { BorderType::Thick } else { BorderType::Plain })
        .border_style(style)
        .title(Span::styled(format!(" {title} "), Style::new().add_modifier(Modifier::BOLD)))
}

fn draw_header(app: &App, frame: &mut Frame, area: Rect) {
    let mut spans = vec![Span::styled(" kiln-top ", Style::new().bold().fg(Color::Black).bg(Color::Cyan)), Span::raw(format!(" {}", app.url))];
    if let Some(stats) = &app.stats {
        if area.width >= 100 {
            spans.push(Span::raw(format!("  {}", stats.server)));
        }
        spans.push(Span::raw(format!("  up {}", uptime(stats.uptime_seconds))));
        spans.push(Span::styled(format!("  {} req/s", rate(app.req_rate)), Style::new().bold()));
        let err = Style::new().fg(if app.error_rate > 0.01 { Color::Red } else { Color::Green });
        spans.push(Span::styled(format!("  errors {:.1}%", app.error_rate * 100.0), err));
    }
    let marker = match (&app.connection, app.paused) {
        (Connection::Disconnected { error, retry_in }, _) => Some((
            format!(" DISCONNECTED: {error}, retry in {:.0}s ", retry_in.as_secs_f64().ceil()),
            Color::Red,
        )),
        _ if app.server_draining => Some((" SERVER SHUTTING DOWN ".to_owned(), Color::Magenta)),
        (_, true) => Some((" FROZEN ".to_owned(), Color::Yellow)),
        (Connection::Connecting, false) => Some((" CONNECTING ".to_owned(), Color::Blue)),
        _ => None,
    };
    let [left, right] = Layout::horizontal([Constraint::Min(0), Constraint::Length(marker.as_ref().map_or(0, |m| m.0.len() as u16))]).areas(area);
    frame.render_widget(Paragraph::new(Line::from(spans)), left);
    if let Some((text, color)) = marker {
        frame.render_widget(Paragraph::new(Span::styled(text, Style::new().bold().fg(Color::Black).bg(color))), right);
    }
}

fn draw_footer(app: &App, frame: &mut Frame, area: Rect) {
    let line = if let Some(action) = &app.confirm {
        Line::from(vec![
            Span::styled(format!(" flush the queue of {}? ", action.model), Style::new().bold().fg(Color::Black).bg(Color::Yellow)),
            Span::raw("  y flushes (queued requests get 503), any other key cancels"),
        ])
    } else if app.editing_filter {
        Line::from(vec![Span::styled(" filter: ", Style::new().bold()), Span::raw(format!("{}_", app.filter)), Span::raw("  (Enter keep, Esc clear)")])
    } else {
        let key = |k: &'static str| Span::styled(k, Style::new().bold().fg(Color::Cyan));
        let mut spans = vec![
            key(" q"), Span::raw(" quit "), key("?"), Span::raw(" help "), key("Tab"), Span::raw(" panel "),
            key("s"), Span::raw(" sort "), key("/"), Span::raw(" filter "), key("Space"), Span::raw(" freeze "),
            key("</>"), Span::raw(format!(" {:.2}s ", app.refresh.as_secs_f64())),
            key("p f +/-"), Span::raw(" model"),
        ];
        if let Some((notice, ok)) = &app.notice {
            spans.push(Span::styled(format!("  {notice}"), Style::new().fg(if *ok { Color::Green } else { Color::Red })));
        }
        if !app.filter.is_empty() {
            spans.push(Span::styled(format!("  filter: {}", app.filter), Style::new().fg(Color::Yellow)));
        }
        Line::from(spans)
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// Fixed-threshold colours (nvitop's): light, moderate, heavy.
fn load_color(percent: f64, moderate: f64, heavy: f64) -> Color {
    if percent >= heavy {
        Color::Red
    } else if percent >= moderate {
        Color::Yellow
    } else {
        Color::Green
    }
}

/// A bar `width` cells wide, filled to `percent`.
fn gauge(percent: f64, width: usize, color: Color) -> Vec<Span<'static>> {
    let filled = ((percent / 100.0) * width as f64).round().clamp(0.0, width as f64) as usize;
    vec![
        Span::styled("█".repeat(filled), Style::new().fg(color)),
        Span::styled("░".repeat(width - filled), Style::new().fg(Color::DarkGray)),
    ]
}

/// A gauge with its percentage.
fn bar(percent: f64, width: usize, color: Color) -> Vec<Span<'static>> {
    let mut spans = gauge(percent, width, color);
    spans.push(Span::styled(format!("{percent:>4.0}%"), Style::new().fg(color)));
    spans
}

fn draw_devices(app: &App, frame: &mut Frame, area: Rect) {
    let Some(stats) = &app.stats else { return };
    let focused = app.focus == Panel::Gpus;
    // What is left of a GPU line after its text, shared by the two bars.
    let text = if area.width >= 60 { 47 } else { 33 };
    let bar_width = (usize::from(area.width.saturating_sub(2)).saturating_sub(text) / 2).clamp(2, 12);
    // Each device: a line of gauges, then a second line (more gauges, then the 60 s sparkline).
    let mut lines: Vec<(Line, Line, Option<Vec<u64>>)> = Vec::new();
    let title;
    if stats.gpus.is_empty() {
        title = "CPU executors".to_owned();
        for model in &stats.models {
            for r in &model.replicas {
                let key = format!("{}/{}", model.name, r.id);
                let history: Vec<u64> = app.cpu_history.get(&key).map(|h| h.iter().copied().collect()).unwrap_or_default();
                let busy = history.last().copied().unwrap_or(0) as f64;
                let mut spans = vec![Span::raw(format!("{key:<12.12} {:<6} ", r.device))];
                spans.extend(bar(busy, bar_width, load_color(busy, 10.0, 75.0)));
                spans.push(Span::raw(format!(" {} batches", r.batches)));
                lines.push((Line::from(spans), Line::default(), Some(history)));
            }
        }
    } else {
        title = format!("GPUs ({})", stats.gpus.len());
        for g in &stats.gpus {
            let util = f64::from(g.utilization_percent);
            let mem = if g.memory_total_bytes == 0 { 0.0 } else { g.memory_used_bytes as f64 * 100.0 / g.memory_total_bytes as f64 };
            let temp = f64::from(g.temperature_celsius);
            let power = if g.power_limit_watts > 0.0 { g.power_watts * 100.0 / g.power_limit_watts } else { 0.0 };
            let name = if g.simulated { format!("{} (sim)", g.name) } else { g.name.clone() };
            let mut spans = vec![Span::styled(format!("{} ", g.index), Style::new().bold())];
            // The name only where there is room for it beside the gauges.
            if area.width >= 60 {
                spans.push(Span::raw(format!("{:<13.13} ", name)));
            }
            spans.push(Span::raw("util "));
            spans.extend(bar(util, bar_width, load_color(util, 10.0, 75.0)));
            spans.push(Span::raw(" mem "));
            spans.extend(bar(mem, bar_width, load_color(mem, 10.0, 80.0)));
            spans.push(Span::styled(format!(" {:.0}°C", temp), Style::new().fg(load_color(temp, 60.0, 80.0))));
            spans.push(Span::styled(format!(" {:.0}W", g.power_watts), Style::new().fg(load_color(power, 50.0, 85.0))));
            // Temperature against 100 °C and power against its limit, as gauges too.
            let mut second = vec![Span::raw("  temp ")];
            second.extend(gauge(temp, 4, load_color(temp, 60.0, 80.0)));
            second.push(Span::raw(" power "));
            second.extend(gauge(power, 4, load_color(power, 50.0, 85.0)));
            second.push(Span::raw(" "));
            let history = app.gpu_history.get(&g.index).map(|h| h.iter().copied().collect());
            lines.push((Line::from(spans), Line::from(second), history));
        }
    }
    let block = panel(&title, focused);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut y = inner.y;
    for (line, second, history) in lines {
        if y >= inner.bottom() {
            break;
        }
        frame.render_widget(Paragraph::new(line), Rect { y, height: 1, ..inner });
        y += 1;
        if let Some(history) = history.filter(|_| y < inner.bottom()) {
            let used = (second.width() as u16).min(inner.width);
            frame.render_widget(Paragraph::new(second), Rect { y, height: 1, width: used, ..inner });
            // The newest 60 samples that fit, right of the second line's gauges.
            let room = usize::from(inner.width - used);
            let recent = &history[history.len().saturating_sub(room)..];
            let sparkline = Sparkline::default().data(recent).max(100).style(Style::new().fg(Color::Cyan));
            frame.render_widget(sparkline, Rect { x: inner.x + used, y, height: 1, width: inner.width - used });
            y += 1;
        }
    }
}

fn draw_latency(app: &App, frame: &mut Frame, area: Rect) {
    let p50: Vec<(f64, f64)> = app.latency.iter().enumerate().map(|(i, (p, _))| (i as f64, *p)).collect();
    let p99: Vec<(f64, f64)> = app.latency.iter().enumerate().map(|(i, (_, p))| (i as f64, *p)).collect();
    let top = p99.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.1;
    let last = app.latency.back().copied().unwrap_or((0.0, 0.0));
    let title = format!("Latency ms  p50 {:.1}  p99 {:.1}", last.0, last.1);
    let chart = Chart::new(vec![
        Dataset::default().name("p50").marker(symbols::Marker::Braille).graph_type(GraphType::Line).style(Style::new().fg(Color::Green)).data(&p50),
        Dataset::default().name("p99").marker(symbols::Marker::Braille).graph_type(GraphType::Line).style(Style::new().fg(Color::Magenta)).data(&p99),
    ])
    .block(panel(&title, false))
    .x_axis(Axis::default().bounds([0.0, crate::app::HISTORY as f64]))
    .y_axis(Axis::default().bounds([0.0, top]).labels([Span::raw("0"), Span::raw(format!("{top:.0}"))]));
    frame.render_widget(chart, area);
}

fn rate(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

fn ms(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else if v >= 10.0 { format!("{v:.1}") } else { format!("{v:.2}") }
}

fn draw_models(app: &App, frame: &mut Frame, area: Rect) {
    let focused = app.focus == Panel::Models;
    // The learned best batch size only where there is room for it beside the rest.
    let wide = area.width >= 110;
    let names = ["Model", "Queue", "Wait p50", "Wait p95", "Batch", "Req/s", "Replicas", "Devices", "Best batch"];
    let names = if wide { &names[..] } else { &names[..names.len() - 1] };
    let header = Row::new(names.iter().enumerate().map(|(i, n)| {
        let column = COLUMNS.get(i).copied();
        let mut text = (*n).to_owned();
        if let (Some(c), Some((sorted, descending))) = (column, app.sort)
            && c == sorted
        {
            text.push(if descending { '▼' } else { '▲' });
        }
        let mut style = Style::new().bold();
        if column == Some(app.sort_column) && focused {
            style = style.underlined();
        }
        Cell::from(text).style(style)
    }));
    let rows = app.models.iter().map(|m| {
        let wait = Style::new().fg(load_color(m.wait_p95_ms, 10.0, 100.0));
        let name = match (m.state.as_str(), m.paused) {
            (_, true) => format!("{} (paused)", m.name),
            ("ready", false) => m.name.clone(),
            (state, false) => format!("{} ({state})", m.name),
        };
        let mut cells = vec![
            Cell::from(name),
            Cell::from(m.queue.to_string()).style(Style::new().fg(if m.queue > 0 { Color::Yellow } else { Color::Reset })),
            Cell::from(ms(m.wait_p50_ms)),
            Cell::from(ms(m.wait_p95_ms)).style(wait),
            Cell::from(format!("{:.1}", m.batch)),
            Cell::from(rate(m.rate)),
            Cell::from(format!("{}/{}", m.replicas, m.max)),
            Cell::from(m.devices.clone()),
        ];
        if wide {
            cells.push(Cell::from(m.best_batch.map_or_else(String::new, |(rows, per_row)| format!("{rows} @ {} ms/row", ms(per_row)))));
        }
        Row::new(cells)
    });
    let widths = [
        Constraint::Min(10),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(14),
        Constraint::Length(20),
    ];
    let widths = if wide { &widths[..] } else { &widths[..widths.len() - 1] };
    let table = Table::new(rows, widths.iter().copied())
        .header(header)
        .block(panel("Model queues", focused))
        .row_highlight_style(Style::new().reversed());
    let mut state = TableState::default().with_selected(focused.then_some(app.selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_routes(app: &App, frame: &mut Frame, area: Rect) {
    let focused = app.focus == Panel::Handlers;
    let header = Row::new(["Route", "r/s", "p50", "p99", "Err", "429"].map(|h| Cell::from(h).style(Style::new().bold())));
    let row = |name: String, r: &crate::app::RouteRow| {
        Row::new(vec![
            Cell::from(name),
            Cell::from(rate(r.rate)),
            Cell::from(ms(r.p50_ms)),
            Cell::from(ms(r.p99_ms)),
            Cell::from(r.errors.to_string()).style(Style::new().fg(if r.errors > 0 { Color::Red } else { Color::Reset })),
            Cell::from(r.throttled.to_string()).style(Style::new().fg(if r.throttled > 0 { Color::Yellow } else { Color::Reset })),
        ])
    };
    let rows: Vec<Row> = app
        .handlers
        .iter()
        .map(|h| match h.cache_hit {
            Some(hit) => row(format!("{} ({:.0}% hit)", h.name, hit * 100.0), h),
            None => row(h.name.clone(), h),
        })
        .chain(app.tenants.iter().map(|t| row(format!("tenant {}", t.name), t).style(Style::new().fg(Color::Gray))))
        .collect();
    // Fits 80 columns exactly: an over-full table has no single layout, and the solver may pick
    // a different one from run to run.
    let widths = [Constraint::Min(10), Constraint::Length(5), Constraint::Length(5), Constraint::Length(5), Constraint::Length(3), Constraint::Length(3)];
    let table = Table::new(rows, widths).header(header).block(panel("Handlers & tenants", focused)).row_highlight_style(Style::new().reversed());
    let mut state = TableState::default().with_selected(focused.then_some(app.selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_replicas(app: &App, frame: &mut Frame, area: Rect) {
    let header = Row::new(["Replica", "state", "r/s", "Err", "Queue", "CPU", "RSS", "up"].map(|h| Cell::from(h).style(Style::new().bold())));
    let rows: Vec<Row> = app
        .replicas
        .iter()
        .map(|r| {
            let (state, color) = match (&r.error, r.draining) {
                (Some(error), _) => (error.clone(), Color::Red),
                (None, true) => ("draining".to_owned(), Color::Magenta),
                (None, false) => ("up".to_owned(), Color::Green),
            };
            let up = r.error.is_none();
            let number = |text: String| if up { text } else { "-".to_owned() };
            Row::new(vec![
                Cell::from(r.name.clone()),
                Cell::from(state).style(Style::new().fg(color)),
                Cell::from(number(rate(r.rate))),
                Cell::from(number(r.errors.to_string())).style(Style::new().fg(if r.errors > 0 { Color::Red } else { Color::Reset })),
                Cell::from(number(r.queued.to_string())),
                Cell::from(number(format!("{:.1}", r.cpu))),
                Cell::from(number(format!("{} MiB", r.rss_bytes >> 20))),
                Cell::from(number(uptime(r.uptime_seconds))),
            ])
        })
        .collect();
    let queued: u64 = app.replicas.iter().map(|r| r.queued).sum();
    let answering = app.replicas.iter().filter(|r| r.error.is_none()).count();
    let title = format!("Replicas: {answering} of {} answering, {queued} queued", app.replicas.len());
    let widths = [
        Constraint::Min(14),
        Constraint::Length(16),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(9),
        Constraint::Length(7),
    ];
    frame.render_widget(Table::new(rows, widths).header(header).block(panel(&title, false)), area);
}

fn clock(at_unix_ms: u64) -> String {
    let s = at_unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn draw_decisions(app: &App, frame: &mut Frame, area: Rect) {
    let focused = app.focus == Panel::Events;
    let items: Vec<ListItem> = app
        .decisions()
        .filter_map(|(source, e)| {
            let (text, color, detail) = match &e.kind {
                EventKind::Scaling(d) => {
                    let (arrow, color) = match d.action {
                        ScaleAction::Up => ("↑", Color::Green),
                        ScaleAction::Down => ("↓", Color::Blue),
                        ScaleAction::Hold => ("=", Color::Yellow),
                    };
                    let device = d.device.as_deref().map(|d| format!(" {d}")).unwrap_or_default();
                    (format!("{} {arrow} {}→{}{device}", d.model, d.from, d.to), color, d.reason.clone())
                }
                EventKind::PrecisionChosen(choice) => {
                    let speed = if choice.precision == "fp32" { String::new() } else { format!(" {:.1}×", choice.speedup) };
                    let detail = if choice.precision == "fp32" {
                        choice.candidates.join("; ")
                    } else {
                        format!("worst cosine {:.4}; searched {:.1} s", choice.worst_cosine, choice.search_ms as f64 / 1e3)
                    };
                    (format!("{} ◆ {} {}{speed}", choice.model, choice.device, choice.precision), Color::Cyan, detail)
                }
                EventKind::WorkerExited { model, pid, reason, restart_in_ms } => {
                    (format!("{model} ✗ worker {pid}"), Color::Red, format!("{reason}; restart in {restart_in_ms} ms"))
                }
                EventKind::WorkerRestarted { model, pid, restarts } => {
                    (format!("{model} ⟳ worker {pid}"), Color::Magenta, format!("restart {restarts}"))
                }
                _ => return None,
            };
            // Watching several replicas, each line says whose it is.
            let whose = app.replicas.get(*source).filter(|_| app.replicas.len() > 1).map(|r| format!(" {}", r.name)).unwrap_or_default();
            Some(ListItem::new(Line::from(vec![
                Span::styled(clock(e.at_unix_ms), Style::new().fg(Color::DarkGray)),
                Span::styled(whose, Style::new().fg(Color::Cyan)),
                Span::raw(" "),
                Span::styled(text, Style::new().fg(color).bold()),
                Span::raw(format!(" {detail}")),
            ])))
        })
        .collect();
    let list = if items.is_empty() {
        List::new([ListItem::new(Span::styled("no scaling or precision decisions or worker restarts yet", Style::new().fg(Color::DarkGray)))])
    } else {
        List::new(items).highlight_style(Style::new().reversed())
    };
    let mut state = ratatui::widgets::ListState::default().with_selected(focused.then_some(app.selected));
    frame.render_stateful_widget(list.block(panel("Decisions & workers", focused)), area, &mut state);
}

const HELP: [(&str, &str); 16] = [
    ("q, Ctrl-c", "quit"),
    ("?", "this help (again or Esc to close)"),
    ("Tab, BackTab", "next / previous panel"),
    ("↑ ↓, j k", "move in the panel"),
    ("← →, h l", "choose the column to sort models by"),
    ("s", "sort by it (again to reverse)"),
    ("/", "filter models and handlers by name"),
    ("Esc", "clear the filter"),
    ("Space", "freeze the screen (again to go on)"),
    ("> / <", "refresh faster / slower"),
    ("p", "pause / resume the selected model"),
    ("f", "flush its queue (asks to confirm)"),
    ("+ / -", "one replica more / fewer (fixed count)"),
    ("", "Model keys go to the admin API (--admin-url)"),
    ("", ""),
    ("", "Data: /v1/stats each refresh; /v1/events live (of each replica)"),
];

fn draw_help(frame: &mut Frame, area: Rect) {
    let width = area.width.min(60);
    let height = (HELP.len() as u16 + 2).min(area.height);
    let popup = Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, v)| Line::from(vec![Span::styled(format!(" {k:<13}"), Style::new().bold().fg(Color::Cyan)), Span::raw(*v)]))
        .collect();
    frame.render_widget(Clear, popup);
    frame.render_widget(Paragraph::new(lines).block(panel("Help", true)), popup);
}

fn uptime(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}
