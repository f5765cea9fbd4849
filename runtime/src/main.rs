//! `kiln`: serve models behind sandboxed WebAssembly handlers.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::config::{Config, layers};
use kiln::model::device::Device;
use kiln::model::spec::DeviceChoice;

/// The server's Rust heap, counted for `/v1/stats`: glibc's malloc, which served the sandbox path
/// faster here than mimalloc did (docs/BENCHMARKS.md, "Levers tried").
#[global_allocator]
static ALLOCATOR: kiln::telemetry::alloc::Counting<std::alloc::System> = kiln::telemetry::alloc::Counting(std::alloc::System);

const EXAMPLES: &str = "\
Examples:
  kiln serve
      Serve the bundled examples (digits, embeddings) on http://127.0.0.1:8080, on the CPU.
  KILN_KEY=$(cat build/demo.key) kiln bench --handler digits --body seven.png --concurrency 64 --duration 10s
      Load a handler for 10 s with 64 requests in flight; prints latency, throughput, batching.
  kiln bench --model digits --body request.json --rate 2000 --requests 20000 --json
      Open-loop load on a model's OIP infer endpoint, machine-readable report.
  kiln serve --config deploy/kiln.toml --listen 0.0.0.0:9000
      Serve your own deployment.
  kiln tenant add-key demo
      Make an API key for tenant 'demo' (printed once; only its hash is stored).
  curl -s -H \"Authorization: Bearer $KEY\" --data-binary @seven.png http://127.0.0.1:8080/v1/handlers/digits/
      Call a handler: the body goes to the guest, the guest's response comes back.
  KILN_ADMIN_KEY=$(kiln admin add-key) kiln deploy h.wasm --name h --tenant demo
      Deploy (or atomically replace) a handler on the running server through the admin API.
  curl -s -H \"Authorization: Bearer $KEY\" http://127.0.0.1:8080/v2/models/digits
      Open Inference Protocol metadata for a model.";

/// Kiln serves models behind WebAssembly request handlers: each request runs in a fresh
/// sandbox, and the handlers' wasi:nn calls run on libtorch.
#[derive(Parser)]
#[command(name = "kiln", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as one JSON object each (access lines, guests' lines, all).
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", value_enum, default_value_t)]
    log_format: kiln::telemetry::logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// The deployment config as it takes effect (`kiln config show`).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Exit 0 when the server is ready to serve (/v2/health/ready), 1 otherwise: a container's
    /// health check, where there is no curl. Without --url, the server of the config `kiln
    /// serve` would read here (its listen address, KILN_SERVER__LISTEN included).
    Health {
        #[arg(long, env = "KILN_URL")]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// Trust the CA certificates of this PEM file for an https:// URL. Without --url and
        /// with TLS in the config, the certificate is not checked without --cacert: it names
        /// the server's public name, not the listen address probed here.
        #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
        cacert: Option<PathBuf>,
    },
    /// Show what libtorch and the GPU inventory see: CUDA, cuDNN and every GPU (NVML, or the
    /// config's simulated GPUs).
    Devices {
        /// Read [gpus] from this config (for simulated GPUs); NVML otherwise.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the models and handlers of a config file: --config, else $KILN_CONFIG, else
    /// ./kiln.toml, else the bundled examples of a source checkout. KILN_SERVER__FIELD
    /// variables set [server] fields (KILN_SERVER__LISTEN=0.0.0.0:8080).
    #[command(after_help = EXAMPLES)]
    Serve(kiln::serve::ServeArgs),
    /// Manage a tenant's API keys (stored as salted hashes in the state directory).
    Tenant {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage the admin API's keys.
    Admin {
        #[command(subcommand)]
        command: AdminKeyCommand,
    },
    /// Make an Ed25519 key pair for signing handlers: PREFIX.key (secret) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, default_value = "kiln-signing")]
        out: PathBuf,
    },
    /// Sign a component with a key from `kiln keygen`; writes FILE.sig.
    Sign {
        /// The component, and what it is signed to be deployed as: the signature covers the
        /// handler name, tenant, models and priorities too, which `kiln deploy` must repeat.
        #[command(flatten)]
        what: kiln::cli::SignedDeployment,
        /// The private key file.
        #[arg(long, default_value = "kiln-signing.key")]
        key: PathBuf,
        /// Where to write the signature (default: the component's path plus .sig).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Push a component to an OCI registry as a WebAssembly artifact (wkg and Spin read it),
    /// its signature attached; prints the oci://…@sha256 reference to pin in a config.
    Push(kiln::cli::oci::PushArgs),
    /// Pull a component from an OCI registry, verified against its digests; prints its pin.
    Pull(kiln::cli::oci::PullArgs),
    /// Make a new handler crate: standalone, built with `kiln build` (or cargo alone), with a
    /// README, tests of its own logic and a sample config that serves it.
    New {
        /// The handler's name (also the crate's and the folder's).
        name: String,
        /// What it starts as.
        #[arg(long, value_enum, default_value = "json")]
        template: kiln::cli::author::Template,
        /// The folder to make it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The kiln-guest SDK's folder (default: the one this kiln was built with, else the
        /// registry's kiln-guest).
        #[arg(long)]
        sdk: Option<PathBuf>,
        /// The text template's vocabulary (default: the bundled MiniLM's).
        #[arg(long)]
        vocab: Option<PathBuf>,
    },
    /// Build a handler crate for wasm32-wasip2 in release, pre-initialise it when it opts in
    /// (`export_handler!(H, init = f)`), then check it as `kiln check` does.
    Build {
        /// The handler crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// How long the pre-initialisation function may run before the build fails.
        #[arg(long, default_value_t = 60)]
        init_timeout_s: u64,
    },
    /// Check that Kiln can serve a component, before deploying it: its size, its imports
    /// against Kiln's allow-list, its handler export, and that it compiles and links.
    Check {
        /// The component (.wasm).
        component: PathBuf,
    },
    /// Deploy a handler to a running server, or atomically replace one.
    Deploy {
        #[command(flatten)]
        request: kiln::cli::DeployRequest,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a deployed handler from a running server.
    Undeploy {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a running server's handlers.
    Handlers {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the requests a running server is handling now, or cancel one by its id.
    Requests {
        /// Cancel this request (its kiln-request-id) instead of listing.
        #[arg(long)]
        cancel: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load, replace, unload, delete and list a running server's models; pause, resume, flush,
    /// reset and tune a served one.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Put load on a handler or a model's OIP endpoint and report latency, throughput, errors
    /// and the server's average batch size.
    #[command(after_help = EXAMPLES)]
    Bench(BenchArgs),
    /// Time a model's own forward pass at several batch sizes: the ceiling with no HTTP,
    /// sandbox or queue in the way.
    BenchRaw {
        /// The deployment config that declares the model.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The model's name in that config.
        #[arg(long)]
        model: String,
        /// Batch sizes to time.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
        batch_sizes: Vec<u32>,
        /// Size of every dynamic non-batch dimension (for example the sequence length).
        #[arg(long, default_value_t = 16)]
        dim: u32,
        /// Seconds to time each batch size.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// `cpu` or `cuda:N`; by default the model's first GPU, or cuda:0 for `auto` where
        /// libtorch sees a GPU, else the CPU.
        #[arg(long)]
        device: Option<String>,
        /// Run the model in a confined worker process, as a tenant's own model runs, instead of
        /// in this process: the difference is what the worker costs per batch.
        #[arg(long)]
        worker: bool,
        /// `fp32`, `fp16`, `bf16`, `bf16-autocast`, or `auto` (search as the server would, and
        /// time the choice); by default the model's own `precision`, searched when it is `auto`.
        #[arg(long)]
        precision: Option<String>,
        /// With a pinned --precision: lay 4-D weights and inputs out channels-last.
        #[arg(long)]
        channels_last: bool,
    },
    /// Internal: read a TorchScript archive on stdin and answer in JSON what its code can run,
    /// without running it. The server's load-time model check runs this as a confined child.
    #[command(name = kiln::model::graph_check::SUBCOMMAND, hide = true)]
    ScanTorchscript,
    /// Internal: run one model in a confined worker process, talking to the server on stdin (a
    /// Unix socket). The server starts these for tenants' own models.
    #[command(name = kiln::model::backend::worker::SUBCOMMAND, hide = true)]
    ModelWorker {
        /// The model's name, so that `ps` shows whose worker it is.
        model: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective config: every [server] value with where it came from (a
    /// KILN_SERVER__FIELD variable, the file, or the default), and the file's models, tenants
    /// and handlers.
    Show {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new key for tenant NAME; prints it once.
    AddKey {
        name: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List tenant NAME's key ids.
    Keys {
        name: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Remove one of tenant NAME's keys by id.
    RemoveKey {
        name: String,
        id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminKeyCommand {
    /// Make a new admin key; prints it once.
    AddKey {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List admin key ids.
    Keys {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Remove an admin key by id.
    RemoveKey {
        id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API's URL.
    #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// An admin key (from `kiln admin add-key`).
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    #[command(flatten)]
    tls: TlsArgs,
}

impl AdminArgs {
    fn target(self) -> anyhow::Result<kiln::cli::AdminTarget> {
        Ok(kiln::cli::AdminTarget { url: self.admin_url, key: self.admin_key, tls: self.tls.client()? })
    }
}

/// How a command speaks to an https:// server.
#[derive(clap::Args)]
struct TlsArgs {
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Present this certificate (PEM) to an admin listener that asks for one (admin_client_ca).
    #[arg(long, env = "KILN_CLIENT_CERT", value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, env = "KILN_CLIENT_KEY", value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl TlsArgs {
    fn client(self) -> anyhow::Result<kiln::tls::ClientTls> {
        kiln::tls::ClientTls::from_flags(self.cacert, self.client_cert, self.client_key)
    }
}

/// `--instances N` or `MIN..MAX`, as the admin API takes it.
fn parse_instances(text: &str) -> anyhow::Result<serde_json::Value> {
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("--instances: '{text}' is not N or MIN..MAX"));
    Ok(match text.split_once("..") {
        Some((min, max)) => serde_json::json!({ "min": number(min)?, "max": number(max)? }),
        None => serde_json::json!(number(text)?),
    })
}

#[derive(Subcommand)]
enum ModelAction {
    /// Load a model, or replace the one served under its name once the new one is ready. With
    /// --spec, from that file: a [[model]] section's fields (TOML or JSON) and `tenants = [...]`;
    /// without, again from the server's repository (a reload, or a load after `unload`).
    Load {
        name: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop serving a model; it stays in the repository, to be loaded again.
    Unload {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop serving a model loaded through the API and forget it.
    Delete {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List every model of the repository, served or not; with --cache, the files of the model
    /// cache instead (least recently used first).
    Ls {
        /// List the model cache of the config's server (read here, no server needed).
        #[arg(long)]
        cache: bool,
        /// The deployment config whose cache to list.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
        admin_url: String,
        #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
        admin_key: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Download a remote model file into the model cache ahead of its load, with a progress bar.
    /// SOURCE is https://HOST/FILE or hf://ORG/REPO/FILE@REVISION.
    Pull {
        source: String,
        /// The file's SHA-256; the download is refused if it does not match.
        #[arg(long)]
        sha256: Option<String>,
        /// Download without a pin, and print the digest to pin it with.
        #[arg(long)]
        allow_unpinned: bool,
        /// The deployment config whose cache to fill.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Remove a file from the model cache, by its SHA-256 (a model using it is fetched again at
    /// its next load).
    Rm {
        sha256: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Stop running batches: requests queue (up to the queue limit) until `resume`.
    Pause {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Resume {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Answer every queued request 503 `flushed`.
    Flush {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Zero the model's counters and histograms.
    ResetStats {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a served model's knobs while it serves (until it is reloaded).
    Set {
        name: String,
        #[arg(long)]
        max_batch_size: Option<u32>,
        #[arg(long)]
        max_queue_delay_us: Option<u64>,
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// `N`, or `MIN..MAX` for the scaler to move between.
        #[arg(long)]
        instances: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Load this handler (POST /v1/handlers/NAME/PATH).
    #[arg(long, conflicts_with_all = ["model", "url"])]
    handler: Option<String>,
    /// Path under the handler.
    #[arg(long, default_value = "")]
    path: String,
    /// Load this model's OIP infer endpoint (POST /v2/models/NAME/infer).
    #[arg(long, conflicts_with = "url")]
    model: Option<String>,
    /// Load any URL on the server.
    #[arg(long)]
    url: Option<String>,
    /// Request body, read from a file.
    #[arg(long)]
    body: Option<PathBuf>,
    /// With --model: send gRPC ModelInfer to this address (HOST:PORT, or https://HOST:PORT
    /// for TLS) instead; --body is then an OIP JSON request, sent as raw contents.
    #[arg(long, requires_all = ["model", "body"], value_name = "HOST:PORT")]
    grpc: Option<String>,
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Other bodies: every file in this folder, sent in turn by the requests that do not repeat
    /// --body (see --repeat-percent).
    #[arg(long, requires = "body")]
    vary: Option<PathBuf>,
    /// The percent of requests that repeat the same request exactly; each of the others is made
    /// unique with a `kiln-bench-unique=N` query parameter (a response cache's benchmark).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100))]
    repeat_percent: u32,
    /// HTTP method (default POST with a body, GET without).
    #[arg(long)]
    method: Option<String>,
    /// Content-Type of the body.
    #[arg(long)]
    content_type: Option<String>,
    /// Extra request header, NAME:VALUE (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A tenant's API key, sent as Authorization: Bearer KEY.
    #[arg(long, env = "KILN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// An admin key, to read the server's batch counters (/v1/stats) before and after.
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Requests in flight (closed loop).
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Requests per second (open loop) instead of a closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: the most requests in flight at once; a request due while this many are
    /// outstanding is not sent (and counted), so the client cannot run out of sockets first.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// How long to run, like 10s, 500ms or 2m.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<std::time::Duration>,
    /// How many requests to send.
    #[arg(long)]
    requests: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("'{s}' has an unknown unit; use ms, s or m")),
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{s}': {e}"))
}

/// Where this machine reaches the server of the config found here: its `listen` address, on
/// loopback when it listens on every address, over https when it has TLS; Kiln's default when
/// there is no config.
fn local_url() -> String {
    let server = layers::locate(None).ok().and_then(|(file, _)| Config::load(&file).ok()).map(|c| c.server);
    let mut addr = server.as_ref().map_or_else(|| ([127, 0, 0, 1], 8080).into(), |s| s.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let tls = server.is_some_and(|s| s.tls.serving().is_some());
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// The config file the command names, else the one [`layers::locate`] finds.
fn config_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(layers::locate(flag.as_deref())?.0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln::telemetry::logging::init(cli.log_format);
    // Before anything in libtorch asks about CUDA: libtorch keeps its first answer.
    kiln::model::backend::torch::cuda::load_at_start();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => kiln::serve::run(args),
        Command::Tenant { command } => {
            use kiln::tenancy::keys::Principal;
            match command {
                KeyCommand::AddKey { name, config } => {
                    kiln::cli::add_key(&load(config)?, &Principal::Tenant(name))
                }
                KeyCommand::Keys { name, config } => {
                    kiln::cli::list_keys(&load(config)?, &Principal::Tenant(name))
                }
                KeyCommand::RemoveKey { name, id, config } => {
                    kiln::cli::remove_key(&load(config)?, &Principal::Tenant(name), &id)
                }
            }
        }
        Command::Admin { command } => {
            use kiln::tenancy::keys::Principal;
            match command {
                AdminKeyCommand::AddKey { config } => kiln::cli::add_key(&load(config)?, &Principal::Admin),
                AdminKeyCommand::Keys { config } => kiln::cli::list_keys(&load(config)?, &Principal::Admin),
                AdminKeyCommand::RemoveKey { id, config } => {
                    kiln::cli::remove_key(&load(config)?, &Principal::Admin, &id)
                }
            }
        }
        Command::Config { command: ConfigCommand::Show { config } } => {
            let (path, found) = layers::locate(config.as_deref())?;
            let overrides = layers::server_overrides(kiln::config::server_env())?;
            print!("{}", layers::show(&path, found, &overrides)?);
            Ok(())
        }
        Command::Health { url, timeout, cacert } => {
            let trust = |fallback| cacert.clone().map_or(fallback, kiln::tls::Trust::CaFile);
            let (url, trust) = match url {
                Some(url) => (url, trust(kiln::tls::Trust::System)),
                None => (local_url(), trust(kiln::tls::Trust::Anything)),
            };
            kiln::cli::health(&url, &kiln::tls::ClientTls { trust, identity: None }, timeout)
        }
        Command::Devices { config, json } => {
            let gpus = match config {
                Some(file) => Config::load(&file)?.gpus,
                None => kiln::fleet::gpu::GpuConfig {
                    poll_interval: std::time::Duration::from_secs(1),
                    simulated: Vec::new(),
                },
            };
            kiln::cli::devices(&gpus, json)
        }
        Command::Keygen { out } => kiln::cli::keygen(&out),
        Command::Sign { what, key, out } => kiln::cli::sign(&what, &key, out),
        Command::Push(args) => kiln::cli::oci::push(&args),
        Command::Pull(args) => kiln::cli::oci::pull(&args),
        Command::Deploy { request, admin } => kiln::cli::deploy(&admin.target()?, &request),
        Command::Undeploy { name, admin } => kiln::cli::undeploy(&admin.target()?, &name),
        Command::Handlers { admin } => kiln::cli::list_handlers(&admin.target()?),
        Command::Model { action } => match action {
            ModelAction::Load { name, spec, admin } => kiln::cli::load_model(&admin.target()?, &name, spec.as_deref()),
            ModelAction::Unload { name, admin } => kiln::cli::unload_model(&admin.target()?, &name),
            ModelAction::Delete { name, admin } => kiln::cli::delete_model(&admin.target()?, &name),
            ModelAction::Ls { cache: true, config, .. } => kiln::cli::list_cache(&load(config)?),
            ModelAction::Ls { cache: false, admin_url, admin_key, tls, .. } => {
                let key = admin_key.ok_or_else(|| anyhow::anyhow!("give an admin key: --admin-key or KILN_ADMIN_KEY"))?;
                kiln::cli::list_models(&kiln::cli::AdminTarget { url: admin_url, key, tls: tls.client()? })
            }
            ModelAction::Pull { source, sha256, allow_unpinned, config } => {
                kiln::cli::pull_model(&load(config)?, &source, sha256.as_deref(), allow_unpinned)
            }
            ModelAction::Rm { sha256, config } => kiln::cli::remove_cached(&load(config)?, &sha256),
            ModelAction::Pause { name, admin } => kiln::cli::control_model(&admin.target()?, &name, "pause"),
            ModelAction::Resume { name, admin } => kiln::cli::control_model(&admin.target()?, &name, "resume"),
            ModelAction::Flush { name, admin } => kiln::cli::control_model(&admin.target()?, &name, "flush"),
            ModelAction::ResetStats { name, admin } => kiln::cli::control_model(&admin.target()?, &name, "reset-stats"),
            ModelAction::Set { name, max_batch_size, max_queue_delay_us, timeout_ms, instances, admin } => {
                let mut knobs = serde_json::Map::new();
                if let Some(n) = max_batch_size {
                    knobs.insert("max_batch_size".into(), n.into());
                }
                if let Some(n) = max_queue_delay_us {
                    knobs.insert("max_queue_delay_us".into(), n.into());
                }
                if let Some(n) = timeout_ms {
                    knobs.insert("timeout_ms".into(), n.into());
                }
                if let Some(text) = instances {
                    knobs.insert("instances".into(), parse_instances(&text)?);
                }
                kiln::cli::tune_model(&admin.target()?, &name, &serde_json::Value::Object(knobs))
            }
        },
        Command::Requests { cancel, admin } => kiln::cli::requests(&admin.target()?, cancel.as_deref()),
        Command::Bench(args) => bench(args),
        Command::Check { component } => kiln::cli::author::check(&component),
        Command::ScanTorchscript => Ok(kiln::model::graph_check::serve_scan()?),
        Command::ModelWorker { model: _ } => Ok(kiln::model::backend::worker::serve_worker()?),
        Command::New { name, template, dir, sdk, vocab } => {
            kiln::cli::author::new_handler(&name, template, &dir, sdk.as_deref(), vocab.as_deref())
        }
        Command::Build { dir, init_timeout_s } => kiln::cli::author::build(&dir, std::time::Duration::from_secs(init_timeout_s)).map(|_| ()),
        Command::BenchRaw {
            config,
            model,
            batch_sizes,
            dim,
            seconds,
            json,
            device,
            worker,
            precision,
            channels_last,
        } => {
            let config = Config::load(&config_path(config)?)?;
            let model = config
                .model(&model)
                .ok_or_else(|| anyhow::anyhow!("model '{model}' is not in {}", config.source.display()))?;
            let device = match device.as_deref() {
                None => match &model.device {
                    DeviceChoice::Cpu => Device::Cpu,
                    DeviceChoice::Gpus(list) => Device::Cuda(list[0]),
                    DeviceChoice::Auto if kiln::model::backend::torch::cuda::is_available() => Device::Cuda(0),
                    DeviceChoice::Auto => Device::Cpu,
                },
                Some(d) => d.parse::<Device>().map_err(|e| anyhow::anyhow!("--device: {e}"))?,
            };
            use kiln::cli::bench::RawPrecision;
            let precision = match precision.as_deref() {
                None | Some("auto") if channels_last => anyhow::bail!("--channels-last needs a pinned --precision (auto tries it itself)"),
                None => RawPrecision::Configured,
                Some("auto") => RawPrecision::Search,
                Some(name) => RawPrecision::Pinned(kiln::model::spec::Form {
                    precision: name.parse().map_err(|e: String| anyhow::anyhow!("--precision: {e}"))?,
                    channels_last,
                }),
            };
            let (precision, rows) = kiln::cli::bench::raw(model, device, &batch_sizes, dim, seconds, worker, precision)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let process = if worker { "a worker process" } else { "this process" };
                println!("model {} on {device} in {precision}, in {process} (dynamic dims = {dim})", model.name);
                println!("{:>6} {:>12} {:>14}", "batch", "forward ms", "rows/s");
                for r in rows {
                    println!("{:>6} {:>12.3} {:>14.1}", r.batch_size, r.forward_ms, r.rows_per_second);
                }
            }
            Ok(())
        }
    }
}

fn load(config: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(&config_path(config)?)?)
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let server = args.server.trim_end_matches('/').to_owned();
    let url = match (&args.handler, &args.model, &args.url) {
        (Some(h), _, _) => format!("{server}/v1/handlers/{h}/{}", args.path.trim_start_matches('/')),
        (_, Some(m), _) => format!("{server}/v2/models/{m}/infer"),
        (_, _, Some(u)) if u.starts_with("http") => u.clone(),
        (_, _, Some(u)) => format!("{server}/{}", u.trim_start_matches('/')),
        _ => anyhow::bail!("say what to load: --handler NAME, --model NAME or --url URL"),
    };
    let body = kiln::cli::bench::read_body(&args.body)?;
    let body_for_grpc = body.clone();
    let method = match &args.method {
        Some(m) => m.to_uppercase().parse()?,
        None if args.body.is_some() => http::Method::POST,
        None => http::Method::GET,
    };
    let mut headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--header '{h}' is not NAME:VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(key) = &args.key {
        headers.push(("authorization".to_owned(), format!("Bearer {}", key.trim())));
    }
    let url = match (&args.grpc, &args.model) {
        (Some(addr), Some(model)) => format!("grpc://{addr}/{model}"),
        _ => url,
    };
    let spec = kiln::cli::bench::LoadSpec {
        url,
        server,
        admin_key: args.admin_key.clone(),
        method,
        body,
        others: args.vary.as_deref().map(kiln::cli::bench::read_bodies).transpose()?.unwrap_or_default(),
        repeat_percent: args.repeat_percent,
        content_type: args.content_type.clone(),
        headers,
        concurrency: args.concurrency,
        rate: args.rate,
        max_in_flight: args.max_in_flight,
        duration: args
            .duration
            .or(if args.requests.is_none() { Some(std::time::Duration::from_secs(10)) } else { None }),
        requests: args.requests,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        grpc: match (&args.grpc, &args.model) {
            (Some(addr), Some(model)) => Some(kiln::cli::bench::GrpcLoad {
                addr: addr.clone(),
                request: kiln::cli::bench::grpc_request(model, body_for_grpc)?,
            }),
            _ => None,
        },
        tls: kiln::tls::ClientTls::from_flags(args.cacert.clone(), None, None)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(kiln::cli::bench::run(spec))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
