//! `kiln`: serve models behind sandboxed WebAssembly handlers.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::config::Config;

const EXAMPLES: &str = "\
Examples:
  kiln serve
      Serve the bundled examples (digits, embeddings) on http://127.0.0.1:8080, on the CPU.
  kiln serve --config deploy/kiln.toml --listen 0.0.0.0:9000
      Serve your own deployment.
  curl -s --data-binary @seven.png http://127.0.0.1:8080/v1/handlers/digits/
      Call a handler: the body goes to the guest, the guest's response comes back.
  curl -s http://127.0.0.1:8080/v2/models/digits
      Open Inference Protocol metadata for a model.";

/// Kiln serves models behind WebAssembly request handlers: each request runs in a fresh
/// sandbox, and the handlers' wasi:nn calls run on libtorch.
#[derive(Parser)]
#[command(name = "kiln", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models and handlers of a config file (default: the bundled examples).
    #[command(after_help = EXAMPLES)]
    Serve {
        /// The deployment config (TOML with [server], [[model]] and [[handler]]).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on; overrides [server].listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Exit when standard input closes (lets a supervising process, such as the test
        /// harness, take the server down with it).
        #[arg(long, hide = true)]
        stop_on_stdin_close: bool,
    },
}

/// The bundled examples' config, next to the sources this binary was built from.
fn default_config() -> PathBuf {
    let local = PathBuf::from("examples/kiln.toml");
    if local.is_file() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kiln.toml"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            stop_on_stdin_close,
        } => {
            if stop_on_stdin_close {
                std::thread::spawn(|| {
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                    std::process::exit(0);
                });
            }
            let path = config.unwrap_or_else(default_config);
            let config = Config::load(&path)?;
            let listen = listen.unwrap_or(config.server.listen);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("kiln-io")
                .build()?;
            runtime.block_on(kiln::server::serve(&config, listen, shutdown_signal()))
        }
    }
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
    tracing::info!("shutting down");
}
