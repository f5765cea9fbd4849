//! `kiln-top [URL...]`: a live dashboard for a Kiln server, or for several replicas at once
//! (one row each, their queues and counters summed). It polls `/v1/stats` and follows
//! `/v1/events` with the admin key (`--key` or `KILN_ADMIN_KEY`), and pauses, flushes and scales
//! the selected model through the admin API (`--admin-url`).
//!
//! Shape: fetcher threads send [`Msg`]s; [`App::update`] changes the state; [`view::draw`] only
//! draws it. The terminal is restored on exit and on panic.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_top::app::{App, Msg};
use kiln_top::{client, view};
use ratatui::crossterm::event::{self, Event};

#[derive(Parser)]
#[command(version, about = "A live terminal dashboard for a Kiln server")]
struct Args {
    /// The server's address (its admin API's serves the same); several replicas' addresses to
    /// watch a fleet: one row each, queues, rates and latencies summed over them.
    #[arg(default_value = "http://127.0.0.1:8080", num_args = 1..)]
    url: Vec<String>,
    /// An admin key (`kiln admin add-key`).
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Milliseconds between snapshots (`>`/`<` change it while running).
    #[arg(long, default_value_t = 1000)]
    refresh_ms: u64,
    /// The admin API's address, for the model actions (pause, flush, replicas); one server's,
    /// also when watching several.
    #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Present this certificate (PEM) to an admin listener that asks for one.
    #[arg(long, env = "KILN_CLIENT_CERT", value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, env = "KILN_CLIENT_KEY", value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(key) = args.key.filter(|k| !k.trim().is_empty()) else {
        anyhow::bail!("an admin key is needed: --key KEY or KILN_ADMIN_KEY (make one with `kiln admin add-key`)");
    };
    let urls: Vec<String> = args.url.iter().map(|u| u.trim_end_matches('/').to_owned()).collect();
    let refresh = Arc::new(AtomicU64::new(args.refresh_ms.clamp(100, 60_000)));
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
