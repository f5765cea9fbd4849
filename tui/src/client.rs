//! The fetchers: one thread polls `/v1/stats` (of every watched replica at once), one per
//! replica follows `/v1/events`; they reconnect with backoff and report what happened as
//! [`Msg`]s. And the controller, which carries out the model actions the keys ask for through
//! the admin API. The only I/O in `kiln-top`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln_wire::{ServerEvent, Stats};

use crate::app::{Action, ActionKind, Msg};
use crate::fleet::{ReplicaSample, merge};

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How kiln-top speaks to https:// servers: the system's roots or the CAs of `cacert`, and a
/// client certificate for an admin listener that asks for one.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub cacert: Option<PathBuf>,
    /// A certificate and its key (PEM files).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Tls {
    /// A client with this TLS, whose requests give up after `timeout` (never with `None`).
    pub fn client(&self, timeout: Option<Duration>) -> anyhow::Result<reqwest::blocking::Client> {
        let mut builder = reqwest::blocking::Client::builder().use_rustls_tls().timeout(timeout);
        if let Some(file) = &self.cacert {
            let pem = std::fs::read(file).with_context(|| format!("cannot read --cacert {}", file.display()))?;
            let cas = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--cacert {} is not a PEM certificate file", file.display()))?;
            if cas.is_empty() {
                anyhow::bail!("--cacert {} holds no certificate", file.display());
            }
            builder = builder.tls_built_in_root_certs(false);
            for ca in cas {
                builder = builder.add_root_certificate(ca);
            }
        }
        if let Some((cert, key)) = &self.identity {
            let mut pem = std::fs::read(cert).with_context(|| format!("cannot read --client-cert {}", cert.display()))?;
            // The key's PEM block must start on a line of its own.
            pem.push(b'\n');
            pem.extend(std::fs::read(key).with_context(|| format!("cannot read --client-key {}", key.display()))?);
            let identity = reqwest::Identity::from_pem(&pem).with_context(|| format!("--client-cert {} and --client-key {}", cert.display(), key.display()))?;
            builder = builder.identity(identity);
        }
        Ok(builder.build()?)
    }
}

fn fetch_stats(http: &reqwest::blocking::Client, url: &str, key: &str) -> reqwest::Result<Stats> {
    http.get(format!("{url}/v1/stats")).bearer_auth(key).send().and_then(reqwest::blocking::Response::error_for_status).and_then(|r| r.json::<Stats>())
}

/// Polls the snapshot every `refresh` milliseconds; failures back off from 0.5 s to 10 s. With
/// several `urls`, every replica is asked at once each round: [`Msg::Replicas`] says what each
/// answered, and the [`Msg::Stats`] after it is their sum; only when none answers is it a
/// disconnection.
pub fn spawn_stats(tls: &Tls, urls: Vec<String>, key: String, refresh: Arc<AtomicU64>, started: Instant, tx: Sender<Msg>) -> anyhow::Result<()> {
    let http = tls.client(Some(Duration::from_secs(5)))?;
    thread::Builder::new().name("stats".into()).spawn(move || {
        let mut backoff = Duration::from_millis(500);
        loop {
            let fetched = if let [url] = urls.as_slice() {
                fetch_stats(&http, url, &key).map_err(|e| describe(&e))
            } else {
                let samples: Vec<ReplicaSample> = thread::scope(|scope| {
                    let asked: Vec<_> = urls.iter().map(|url| (url, scope.spawn(|| fetch_stats(&http, url, &key)))).collect();
                    asked
                        .into_iter()
                        .map(|(url, answer)| {
                            let outcome = match answer.join() {
                                Ok(answer) => answer.map_err(|e| describe(&e)),
                                Err(_) => Err("the poll failed".to_owned()),
                            };
                            ReplicaSample { url: url.clone(), outcome }
                        })
                        .collect()
                });
                let fleet = merge(&samples).ok_or_else(|| {
                    let errors: Vec<String> = samples.iter().filter_map(|s| s.outcome.as_ref().err().map(|e| format!("{}: {e}", s.url))).collect();
                    format!("no replica answered ({})", errors.join("; "))
                });
                if tx.send(Msg::Replicas { samples, at: started.elapsed() }).is_err() {
                    return;
                }
                fleet
            };
            let wait = match fetched {
                Ok(stats) => {
                    backoff = Duration::from_millis(500);
                    if tx.send(Msg::Stats { stats: Box::new(stats), at: started.elapsed() }).is_err() {
                        return;
                    }
                    Duration::from_millis(refresh.load(Ordering::Relaxed))
                }
                Err(error) => {
                    if tx.send(Msg::Disconnected { error, retry_in: backoff }).is_err() {
                        return;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            thread::sleep(wait);
        }
    })?;
    Ok(())
}

/// Follows the event stream of replica `source` at `url`, reconnecting with backoff. The server
/// replays its recent history on every connect, so each connect starts its shown events afresh
/// (a restarted server counts from 1 again; a sequence number alone cannot tell the two apart).
pub fn spawn_events(tls: &Tls, source: usize, url: String, key: String, tx: Sender<Msg>) -> anyhow::Result<()> {
    let http = tls.client(None)?;
    thread::Builder::new().name(format!("events-{source}")).spawn(move || {
        let mut backoff = Duration::from_millis(500);
        loop {
            let response = http.get(format!("{url}/v1/events")).bearer_auth(&key).send().and_then(reqwest::blocking::Response::error_for_status);
            if let Ok(response) = response {
                backoff = Duration::from_millis(500);
                if tx.send(Msg::EventsReset { source }).is_err() {
                    return;
                }
                for line in BufReader::new(response).lines() {
                    let Ok(line) = line else { break };
                    let Some(data) = line.strip_prefix("data:") else { continue };
                    let Ok(event) = serde_json::from_str::<ServerEvent>(data.trim()) else { continue };
                    if tx.send(Msg::Event { source, event: Box::new(event) }).is_err() {
                        return;
                    }
                }
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })?;
    Ok(())
}

/// Carries out each action sent on `actions` against the admin API at `admin_url`, one at a
/// time, and reports the server's words (or why it failed).
pub fn spawn_control(tls: &Tls, admin_url: String, key: String, actions: std::sync::mpsc::Receiver<Action>, tx: Sender<Msg>) -> anyhow::Result<()> {
    let http = tls.client(Some(Duration::from_secs(60)))?;
    thread::Builder::new().name("control".into()).spawn(move || {
        for Action { model, kind } in actions {
            let models = format!("{admin_url}/v1/models/{model}");
            let request = match kind {
                ActionKind::Pause => http.post(format!("{models}/pause")),
                ActionKind::Resume => http.post(format!("{models}/resume")),
                ActionKind::Flush => http.post(format!("{models}/flush")),
                ActionKind::Replicas(n) => http.patch(&models).json(&serde_json::json!({ "instances": n })),
            };
            let answer = request.bearer_auth(&key).send().and_then(|r| {
                let status = r.status();
                r.json::<serde_json::Value>().map(|body| (status, body))
            });
            let msg = match answer {
                Ok((status, body)) if status.is_success() => {
                    Msg::ActionDone(format!("{model}: {}", body["done"].as_str().unwrap_or("done")))
                }
                Ok((status, body)) => {
                    Msg::ActionFailed(format!("{model}: {}: {}", status.as_u16(), body["error"].as_str().unwrap_or("failed")))
                }
                Err(e) => Msg::ActionFailed(format!("{model}: {} (admin API at {admin_url})", describe(&e))),
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

fn describe(e: &reqwest::Error) -> String {
    if let Some(status) = e.status() {
        return match status.as_u16() {
            401 => "401: the admin key is wrong".to_owned(),
            403 => "403: that is not an admin key".to_owned(),
            s => format!("HTTP {s}"),
        };
    }
    // The innermost cause says what was wrong: refused, or a certificate not trusted, expired,
    // or one the server asked for and did not get.
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let cause = cause.to_string();
    let tls = ["certificate", "Certificate", "handshake", "alert"].iter().any(|word| cause.contains(word));
    if e.is_connect() {
        if tls { format!("cannot connect: {cause}") } else { "cannot connect".to_owned() }
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_decode() {
        "unexpected answer (not a Kiln server of this version?)".to_owned()
    } else {
        format!("failed: {cause}")
    }
}
