//! `kiln serve`: the config found and adjusted by the command line, the server run until a
//! signal, and the signals (the first drains, a second exits at once).

use crate::cli::args::ServeArgs;

/// Runs the server of `args` until SIGTERM or Ctrl-C, then drains.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs { config, listen, admin_listen, grpc_listen, tls_cert, tls_key, allow_unpinned, stop_on_stdin_close } = args;
    if stop_on_stdin_close {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let (path, found) = crate::config::layers::locate(config.as_deref())?;
    tracing::info!(config = %path.display(), found = ?found, "config");
    // --tls-cert/--tls-key count as [server] tls_cert/tls_key, after the environment's, so
    // everything that needs a certificate (admin_client_ca, admin_tls = true) is checked with it.
    let mut overrides = crate::config::layers::server_overrides(crate::config::server_env())?;
    if let (Some(cert), Some(key)) = (&tls_cert, &tls_key) {
        for (flag, field, file) in [("--tls-cert", "tls_cert", cert), ("--tls-key", "tls_key", key)] {
            // A relative path is the working directory's, as for any command-line path.
            let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            overrides.push(crate::config::layers::Override {
                var: flag.to_owned(),
                field: field.to_owned(),
                value: toml::Value::String(file.display().to_string()),
            });
        }
    }
    let mut config = crate::config::Config::load_with(&path, &overrides)?;
    config.server.allow_unpinned_by_flag(allow_unpinned).map_err(anyhow::Error::msg)?;
    if let Some(text) = grpc_listen {
        config.server.grpc_listen = crate::config::parse_optional_listen(&text)
            .ok_or_else(|| anyhow::anyhow!("--grpc-listen: '{text}' is not an address like 127.0.0.1:8001, nor 'off'"))?;
    }
    let listen = listen.unwrap_or(config.server.listen);
    let admin_listen = admin_listen.unwrap_or(config.server.admin_listen);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-io")
        .build()?;
    runtime.block_on(crate::server::serve(&config, listen, admin_listen, shutdown_signal()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down; a second signal exits at once");
    tokio::spawn(async {
        second_signal().await;
        tracing::warn!("second signal: exiting without finishing the requests in flight");
        std::process::exit(1);
    });
}

/// The next SIGTERM or Ctrl-C.
async fn second_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
