//! `kiln-top [--url URL]...`: a live dashboard for a Kiln server, or for several replicas at once
//! (one row each, their queues and counters summed). It polls `/v1/stats` and follows
//! `/v1/events` with the admin key (`--admin-key` or `KILN_ADMIN_KEY`), and pauses, flushes and scales
//! the selected model through the admin API (`--admin-url`).
//!
//! Shape: fetcher threads send [`Msg`]s; [`App::update`] changes the state; [`view::draw`] only
//! draws it. The terminal is restored on exit and on panic.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use kiln_top::app::{App, Msg};
use kiln_top::args::Args;
use kiln_top::{client, view};
use ratatui::crossterm::event::{self, Event};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let urls = args.urls();
    let refresh_ms = args.refresh().as_millis().clamp(100, 60_000) as u64;
    let Some(key) = args.admin_key.filter(|k| !k.trim().is_empty()) else {
        anyhow::bail!("an admin key is needed: --admin-key KEY or KILN_ADMIN_KEY (make one with `kiln admin add-key`)");
    };
    let refresh = Arc::new(AtomicU64::new(refresh_ms));
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let tls = client::Tls { cacert: args.cacert, identity: args.client_cert.zip(args.client_key) };
    client::spawn_stats(&tls, urls.clone(), key.clone(), Arc::clone(&refresh), started, tx.clone())?;
    for (source, url) in urls.iter().enumerate() {
        client::spawn_events(&tls, source, url.clone(), key.clone(), tx.clone())?;
    }
    let url = match urls.as_slice() {
        [one] => one.clone(),
        many => format!("{} replicas", many.len()),
    };
    let (actions, queued) = mpsc::channel();
    client::spawn_control(&tls, args.admin_url.trim_end_matches('/').to_owned(), key, queued, tx)?;

    let mut app = App::new(url, Duration::from_millis(refresh.load(Ordering::Relaxed)));
    app.sources = urls.len();
    // ratatui::init installs a panic hook that restores the terminal before the message prints.
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        while !app.quit {
            terminal.draw(|frame| view::draw(&app, frame))?;
            if event::poll(Duration::from_millis(50))?
                && let Event::Key(key) = event::read()?
            {
                app.update(Msg::Key(key));
            }
            while let Ok(msg) = rx.try_recv() {
                app.update(msg);
            }
            for action in app.actions.drain(..) {
                // The controller lives as long as this loop; a send cannot fail before it ends.
                let _ = actions.send(action);
            }
            refresh.store(app.refresh.as_millis() as u64, Ordering::Relaxed);
        }
        Ok(())
    })();
    ratatui::restore();
    result
}
