//! The `kiln` command line: every command, flag and example as `kiln --help` shows them (and as
//! docs/reference/cli.md repeats them, made from this by a test).
//!
//! One name per concept: `--url`/`KILN_URL` is the server, `--admin-url`/`KILN_ADMIN_URL` its
//! admin API, `--admin-key` and `--tenant-key` say which key, `-c` is only ever `--config`, and a
//! duration is written `10s`, `500ms` or `250us`. Commands group under the noun they act on
//! (`kiln handler deploy`, `kiln model cache rm`). The names of the previous release still parse,
//! hidden from `--help`, for one release.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
pub use kiln_wire::cli::parse_duration;

mod bench;
mod live;

pub use bench::{BenchArgs, BenchRawArgs};
pub use live::{CacheCommand, CachePull, HandlerCommand, ModelCommand, RequestCommand};

const TOP_EXAMPLES: &str = "\
With scripts/serve.sh running (it keeps a key for tenant 'demo' in build/demo.key and an admin
key in build/admin.key):

Examples:
  export KILN_KEY=$(cat build/demo.key) KILN_ADMIN_KEY=$(cat build/admin.key)
      Keys for the commands below: KILN_KEY calls handlers, KILN_ADMIN_KEY runs the admin API.
  kiln serve
      Serve the bundled examples (digits, embeddings) on http://127.0.0.1:8080, on the CPU.
  kiln handler ls
      The running server's handlers, their tenants and models.
  kiln model ls
      Its models: state, replicas, precision, tenants.
  kiln bench --handler digits --body build/holdout/digits/0001_4.png --concurrency 16 --duration 3s
      Load a handler for 3 s with 16 requests in flight: latency, throughput, batch sizes.
  curl -s -H \"Authorization: Bearer $KILN_KEY\" --data-binary @build/holdout/digits/0001_4.png http://127.0.0.1:8080/v1/handlers/digits/
      Call a handler: the body goes to the guest, the guest's answer comes back.

Each command's --help shows its own examples. Everything here, with every command's help:
docs/reference/cli.md.";

/// Kiln serves models behind WebAssembly request handlers: each request runs in a fresh
/// sandbox, and the handlers' wasi:nn calls run on libtorch, batched across requests.
#[derive(Parser)]
#[command(name = "kiln", version, after_help = top_after_help())]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text, or as one JSON object each (access lines, guests' lines, all).
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: crate::telemetry::logging::LogFormat,
}

fn top_after_help() -> String {
    format!("{TOP_EXAMPLES}\n\n{}", kiln_wire::cli::EXIT_CODES_HELP)
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the models and handlers of a config file: --config, else $KILN_CONFIG, else
    /// ./kiln.toml, else the bundled examples of a source checkout. KILN_SERVER__FIELD
    /// variables set [server] fields (KILN_SERVER__LISTEN=0.0.0.0:8080).
    #[command(after_help = "\
Examples:
  kiln serve
      Serve the bundled examples (or $KILN_CONFIG) until SIGTERM or Ctrl-C, then drain.
  kiln serve --config examples/kiln.toml --log-format json
      Serve a config file, logging one JSON object a line.")]
    Serve(ServeArgs),
    /// Exit 0 when the server is ready to serve (/v2/health/ready), 1 when it answers that it
    /// is not, 3 when it cannot be reached: a container's health check, where there is no curl.
    /// Without --url, the server of the config `kiln serve` would read here (its listen
    /// address, KILN_SERVER__LISTEN included).
    #[command(after_help = "\
Examples:
  kiln health
      Probe the server of the config found here.
  kiln health --url http://127.0.0.1:8080 --timeout 2s
      Probe a server by its address.")]
    Health {
        /// The server's address (default: the config's listen address, on loopback).
        #[arg(long, env = "KILN_URL")]
        url: Option<String>,
        /// Give up after this long (like 5s or 500ms).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// Trust the CA certificates of this PEM file for an https:// URL. Without --url and
        /// with TLS in the config, the certificate is not checked without --cacert: it names
        /// the server's public name, not the listen address probed here.
        #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
        cacert: Option<PathBuf>,
    },
    /// Show what libtorch and the GPU inventory see: CUDA, cuDNN and every GPU (NVML, or the
    /// config's simulated GPUs).
    #[command(after_help = "\
Examples:
  kiln devices
      CUDA as libtorch sees it, and each GPU's memory, load and power.
  kiln devices --json
      The same as JSON.")]
    Devices {
        /// Read [gpus] from this config (for simulated GPUs); NVML otherwise.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The deployment config as it takes effect.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// A tenant's API keys, and the tenants of the config (keys are stored as salted hashes in
    /// the state directory; a running server sees a change within a second).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// The admin API's keys.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Deploy, replace, remove and list a running server's handlers (admin API).
    Handler {
        #[command(subcommand)]
        command: HandlerCommand,
    },
    /// Load, replace, unload, delete and list a running server's models; pause, resume, flush,
    /// reset and tune a served one; manage the model cache (admin API).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The requests a running server is handling now; cancel one (admin API).
    Request {
        #[command(subcommand)]
        command: RequestCommand,
    },
    /// Make a new handler crate: standalone, built with `kiln build` (or cargo alone), with a
    /// README, tests of its own logic and a sample config that serves it.
    #[command(after_help = "\
Examples:
  kiln new hello --template json --dir /tmp
      A handler for the bundled digits model, in /tmp/hello; `kiln build /tmp/hello` builds it.")]
    New {
        /// The handler's name (also the crate's and the folder's).
        name: String,
        /// What it starts as.
        #[arg(long, value_enum, default_value = "json")]
        template: crate::cli::author::Template,
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
    #[command(after_help = "\
Examples:
  kiln build /tmp/hello
      Build the crate `kiln new hello --dir /tmp` made; prints its component's path, size and
      imports.
  kiln build /tmp/hello --init-timeout 2m
      Allow a pre-initialisation function two minutes.")]
    Build {
        /// The handler crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// How long the pre-initialisation function may run before the build fails (like 60s).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        init_timeout: Duration,
        /// The previous release's --init-timeout, in seconds.
        #[arg(long, hide = true, conflicts_with = "init_timeout")]
        init_timeout_s: Option<u64>,
    },
    /// Check that Kiln can serve a component, before deploying it: its size, its imports
    /// against Kiln's allow-list, its handler export, and that it compiles and links.
    #[command(after_help = "\
Examples:
  kiln check target/wasm32-wasip2/guest/digits.wasm
      Exits 1, naming the problem, where Kiln would refuse the component.")]
    Check {
        /// The component (.wasm).
        component: PathBuf,
    },
    /// Make an Ed25519 key pair for signing handlers: PREFIX.key (secret) and PREFIX.pub.
    #[command(after_help = "\
Examples:
  kiln keygen --out /tmp/acme
      Writes /tmp/acme.key and /tmp/acme.pub; prints the line for the tenant's [[tenant]] section.")]
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, default_value = "kiln-signing")]
        out: PathBuf,
    },
    /// Sign a component with a key from `kiln keygen`; writes FILE.sig.
    #[command(after_help = "\
Examples:
  kiln sign target/wasm32-wasip2/guest/digits.wasm --handler digits2 --tenant demo --signing-key /tmp/acme.key --out /tmp/digits.sig
      Sign digits.wasm to be deployed as handler 'digits2' of tenant 'demo'.")]
    Sign {
        /// The component, and what it is signed to be deployed as: the signature covers the
        /// handler name, tenant, models and priorities too, which `kiln handler deploy` must
        /// repeat.
        #[command(flatten)]
        what: crate::cli::SignedDeployment,
        /// The private key file, from `kiln keygen`.
        #[arg(long = "signing-key", alias = "key", default_value = "kiln-signing.key", value_name = "FILE")]
        signing_key: PathBuf,
        /// Where to write the signature (default: the component's path plus .sig).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Push a component to an OCI registry as a WebAssembly artifact (wkg and Spin read it),
    /// its signature attached; prints the oci://…@sha256 reference to pin in a config.
    #[command(after_help = "\
Examples:
  kiln push target/wasm32-wasip2/guest/digits.wasm oci://registry.example:5000/acme/digits:1
      Prints oci://registry.example:5000/acme/digits@sha256:…, the pin for a handler's component
      (credentials: --registry-auth or $DOCKER_CONFIG/config.json).")]
    Push(crate::cli::oci::PushArgs),
    /// Pull a component from an OCI registry, verified against its digests; prints its pin.
    #[command(after_help = "\
Examples:
  kiln pull oci://registry.example:5000/acme/digits:1 --out /tmp/digits.wasm
      Writes the component, and prints the tag's pin (oci://…@sha256:…).")]
    Pull(crate::cli::oci::PullArgs),
    /// Put load on a handler or a model's OIP endpoint and report latency, throughput, errors
    /// and the server's average batch size.
    #[command(after_help = "\
Examples:
  kiln bench --handler digits --body build/holdout/digits/0001_4.png --concurrency 16 --duration 3s
      Closed loop: 16 requests in flight for 3 s (KILN_KEY is the tenant's key).
  kiln bench --handler digits --body build/holdout/digits/0001_4.png --rate 200 --requests 400 --json
      Open loop at 200 requests a second, as JSON; with KILN_ADMIN_KEY set, the server's batch
      sizes and CPU per request too.")]
    Bench(BenchArgs),
    /// Time a model's own forward pass at several batch sizes: the ceiling with no HTTP,
    /// sandbox or queue in the way.
    #[command(after_help = "\
Examples:
  kiln bench-raw --model digits --batch-sizes 1,16 --duration 500ms
      The bundled digits model's forward pass at batch 1 and 16, in its configured precision.
  kiln bench-raw --model minilm --batch-sizes 8 --precision bf16 --duration 1s --json
      MiniLM in bf16 at batch 8, as JSON.")]
    BenchRaw(BenchRawArgs),

    // The previous release's names, hidden: they run as the commands that replace them.
    /// Now `kiln handler deploy`.
    #[command(hide = true)]
    Deploy {
        #[command(flatten)]
        request: Box<crate::cli::DeployRequest>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Now `kiln handler undeploy`.
    #[command(hide = true)]
    Undeploy {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Now `kiln handler ls`.
    #[command(hide = true)]
    Handlers {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Now `kiln request ls` and `kiln request cancel ID`.
    #[command(hide = true)]
    Requests {
        #[arg(long)]
        cancel: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },

    /// Internal: read a TorchScript archive on stdin and answer in JSON what its code can run,
    /// without running it. The server's load-time model check runs this as a confined child.
    #[command(name = crate::model::graph_check::SUBCOMMAND, hide = true)]
    ScanTorchscript,
    /// Internal: run one model in a confined worker process, talking to the server on stdin (a
    /// Unix socket). The server starts these for tenants' own models.
    #[command(name = crate::model::backend::worker::SUBCOMMAND, hide = true)]
    ModelWorker {
        /// The model's name, so that `ps` shows whose worker it is.
        model: String,
    },
}

/// `kiln serve`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The deployment config (TOML with [server], [[model]], [[tenant]], [[handler]], [scaler] and [gpus]).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on; overrides [server].listen.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Address of the admin API; overrides [server].admin_listen.
    #[arg(long)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Address of the gRPC API, or `off`; overrides [server].grpc_listen.
    #[arg(long, value_name = "ADDR|off")]
    pub grpc_listen: Option<String>,
    /// Serve TLS on every listener with this certificate chain (PEM, read again when it
    /// changes), unless a listener's own [server] fields say otherwise; with --tls-key,
    /// overrides [server].tls_cert and tls_key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Load remote model sources that have no sha256 pin (each one's digest is logged, to
    /// pin it); overrides [server].allow_unpinned.
    #[arg(long)]
    pub allow_unpinned: bool,
    /// Exit when standard input closes (lets a supervising process, such as the test
    /// harness, take the server down with it).
    #[arg(long, hide = true)]
    pub stop_on_stdin_close: bool,
}

/// The config file, for the commands that read one: --config, else $KILN_CONFIG, else
/// ./kiln.toml, else the bundled examples of a source checkout.
#[derive(clap::Args, Clone)]
pub struct ConfigArg {
    /// The deployment config (default: $KILN_CONFIG, else ./kiln.toml, else the bundled
    /// examples of a source checkout).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the effective config: every [server] value with where it came from (a
    /// KILN_SERVER__FIELD variable, the file, or the default), and the file's models, tenants
    /// and handlers.
    #[command(after_help = "\
Examples:
  kiln config show
      The config `kiln serve` would read here, as it would take effect.
  KILN_SERVER__MAX_BODY_BYTES=1048576 kiln config show
      What a variable changes (and the name of any variable that names no field).")]
    Show {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// List the config's tenants with their key counts, quotas and signing.
    #[command(after_help = "\
Examples:
  kiln tenant ls
  kiln tenant ls --json")]
    Ls {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a new key for tenant NAME; prints it once (only its hash is kept).
    #[command(after_help = "\
Examples:
  kiln tenant add-key demo
      Prints the key once, on standard output; only its hash is kept.")]
    AddKey {
        /// The tenant, as its [[tenant]] section names it.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List tenant NAME's key ids and when each was made (never the keys).
    #[command(after_help = "\
Examples:
  kiln tenant keys demo
  kiln tenant keys demo --json")]
    Keys {
        /// The tenant.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one of tenant NAME's keys by its id.
    #[command(after_help = "\
Examples:
  kiln tenant remove-key demo KEY_ID
      KEY_ID as `kiln tenant keys demo` lists it; a running server refuses the key within a
      second.")]
    RemoveKey {
        /// The tenant.
        name: String,
        /// The key's id, from `kiln tenant keys NAME`.
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Make a new admin key; prints it once (only its hash is kept).
    #[command(after_help = "\
Examples:
  kiln admin add-key
  export KILN_ADMIN_KEY=$(kiln admin add-key)
      Make one and use it for the commands that follow.")]
    AddKey {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List admin key ids and when each was made (never the keys).
    #[command(after_help = "\
Examples:
  kiln admin keys --json")]
    Keys {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an admin key by its id.
    #[command(after_help = "\
Examples:
  kiln admin remove-key KEY_ID
      KEY_ID as `kiln admin keys` lists it.")]
    RemoveKey {
        /// The key's id, from `kiln admin keys`.
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(clap::Args)]
pub struct AdminArgs {
    /// The admin API's address.
    #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    pub admin_url: String,
    /// An admin key (from `kiln admin add-key`).
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How a command speaks to an https:// server.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Present this certificate (PEM) to an admin listener that asks for one (admin_client_ca).
    #[arg(long, env = "KILN_CLIENT_CERT", value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, env = "KILN_CLIENT_KEY", value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// `--instances N` or `MIN..MAX`, as the admin API takes it.
pub fn parse_instances(text: &str) -> anyhow::Result<serde_json::Value> {
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("--instances: '{text}' is not N or MIN..MAX"));
    Ok(match text.split_once("..") {
        Some((min, max)) => serde_json::json!({ "min": number(min)?, "max": number(max)? }),
        None => serde_json::json!(number(text)?),
    })
}

/// docs/reference/cli.md: what every command's `--help` says.
pub fn reference() -> String {
    use clap::CommandFactory as _;
    let preface = format!(
        "Every command's `--help`, made from the binary by `KILN_BLESS=1 cargo test --release -p kiln --lib \
         cli_reference` (a test fails when this file and the binary differ). `kiln-top`'s is in \
         [kiln-top.md](kiln-top.md). A test runs every example below against a test server \
         (tests/e2e/examples.rs).\n\n## Exit codes\n\n```text\n{}\n```\n",
        kiln_wire::cli::EXIT_CODES_HELP
    );
    kiln_wire::cli::reference(&Cli::command(), "CLI reference: kiln", &preface)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn clap_accepts_the_definitions() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_flag_and_argument_has_help() {
        let missing = kiln_wire::cli::undocumented(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    #[test]
    fn every_command_shows_its_own_examples() {
        let missing = kiln_wire::cli::without_examples(&Cli::command());
        assert!(missing.is_empty(), "without examples in their --help: {missing:#?}");
        let bare = clap::Command::new("x")
            .subcommand(clap::Command::new("shown").after_help("Examples:\n  x shown"))
            .subcommand(clap::Command::new("bare").about("no examples"));
        assert_eq!(kiln_wire::cli::without_examples(&bare), ["x bare"]);
        assert_eq!(kiln_wire::cli::undocumented(&bare), ["x", "x shown"]);
    }

    /// `-c` means `--config` wherever it is shown.
    #[test]
    fn dash_c_is_only_ever_config() {
        fn walk(command: &clap::Command, line: &str) {
            for arg in command.get_arguments() {
                if arg.get_short() == Some('c') {
                    assert_eq!(arg.get_long(), Some("config"), "{line}: -c is --{:?}", arg.get_long());
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{line} {}", sub.get_name()));
            }
        }
        walk(&Cli::command(), "kiln");
    }

    #[test]
    fn old_names_still_parse() {
        for line in [
            "kiln deploy x.wasm --name h --tenant t --admin-key k --deadline-ms 100",
            "kiln undeploy h --admin-key k",
            "kiln handlers --admin-key k",
            "kiln requests --cancel abc --admin-key k",
            "kiln model ls --cache",
            "kiln model rm 0123",
            "kiln model pull https://x/y.pt --allow-unpinned",
            "kiln model set m --max-queue-delay-us 500 --timeout-ms 2000 --admin-key k",
            "kiln bench --server http://h:1 --key t -c 4 --handler d",
            "kiln bench-raw --model m --seconds 1",
            "kiln build . --init-timeout-s 5",
            "kiln sign x.wasm --handler h --tenant t --key k.key",
        ] {
            Cli::try_parse_from(line.split(' ')).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn durations_are_one_flag_each() {
        let cli = Cli::try_parse_from(["kiln", "model", "set", "m", "--max-queue-delay", "250us", "--timeout", "2s", "--admin-key", "k"]).expect("parses");
        let Command::Model { command: ModelCommand::Set { max_queue_delay, timeout, .. } } = cli.command else { panic!("not model set") };
        assert_eq!(max_queue_delay, Some(Duration::from_micros(250)));
        assert_eq!(timeout, Some(Duration::from_secs(2)));
        let both = Cli::try_parse_from(["kiln", "model", "set", "m", "--timeout", "2s", "--timeout-ms", "5", "--admin-key", "k"]);
        assert!(both.is_err(), "the old and new spelling of one flag together are refused");
    }

    /// docs/reference/cli.md is this binary's help; `KILN_BLESS=1` writes it.
    #[test]
    fn cli_reference() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/cli.md");
        kiln_wire::cli::check_reference(&file, &reference(), "KILN_BLESS=1 cargo test --release -p kiln --lib cli_reference");
    }

    #[test]
    fn instances_take_a_number_or_a_range() {
        assert_eq!(parse_instances("3").expect("parses"), serde_json::json!(3));
        assert_eq!(parse_instances("1..4").expect("parses"), serde_json::json!({"min": 1, "max": 4}));
        assert_eq!(parse_instances("x").expect_err("refused").to_string(), "--instances: 'x' is not N or MIN..MAX");
    }
}
