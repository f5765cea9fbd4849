//! The commands that act on a running server through its admin API: `kiln handler`, `kiln
//! model` (with the model cache, which is read and written here) and `kiln request`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::{AdminArgs, ConfigArg, TlsArgs, parse_duration};

#[derive(Subcommand)]
pub enum HandlerCommand {
    /// Deploy a handler to a running server, or atomically replace one: requests in flight
    /// finish on the old version. Deployed handlers are kept in the state directory.
    #[command(after_help = "\
Examples:
  kiln handler deploy target/wasm32-wasip2/guest/digits.wasm --name digits2 --tenant demo --models digits --deadline 2s
      Serve digits.wasm again as /v1/handlers/digits2/, allowed only the digits model.
  kiln handler deploy target/wasm32-wasip2/guest/digits.wasm --name digits2 --tenant demo --cache-ttl 60s
      Replace it with one that keeps the answers its guest marks cacheable for up to 60 s.")]
    Deploy {
        #[command(flatten)]
        request: Box<crate::cli::DeployRequest>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a deployed handler from a running server.
    #[command(after_help = "\
Examples:
  kiln handler undeploy digits2")]
    Undeploy {
        /// The handler's name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a running server's handlers: name, tenant, where it came from, its models.
    #[command(after_help = "\
Examples:
  kiln handler ls
  kiln handler ls --json")]
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub enum RequestCommand {
    /// List the requests a running server is handling now, oldest first: id, age, method, path.
    #[command(after_help = "\
Examples:
  kiln request ls
  kiln request ls --json")]
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Cancel a request by its id: it answers 503 `cancelled`, its guest stops and its queued
    /// inference is withdrawn.
    #[command(after_help = "\
Examples:
  kiln request cancel REQUEST_ID
      REQUEST_ID is the request's kiln-request-id header, as `kiln request ls` lists it.")]
    Cancel {
        /// The request's id (its kiln-request-id).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Load a model, or replace the one served under its name once the new one is ready. With
    /// --spec, from that file: a [[model]] section's fields (TOML or JSON) and `tenants = [...]`;
    /// without, again from the server's repository (a reload, or a load after `unload`).
    #[command(after_help = "\
Examples:
  kiln model load digits-copy --spec examples/digits-copy.toml
      Load a second copy of the digits model for tenant demo; answers once it serves.
  kiln model load digits
      Load the config's digits model again from its file: the new one warms up beside the old
      one, then takes the traffic.")]
    Load {
        /// The model's name.
        name: String,
        /// Its definition: a [[model]] section's fields and `tenants`, TOML or JSON; a relative
        /// path in it is the spec file's.
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop serving a model; it stays in the repository, to be loaded again.
    #[command(after_help = "\
Examples:
  kiln model unload digits-copy
      Stop serving it; `kiln model load digits-copy` serves it again.")]
    Unload {
        /// The model's name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop serving a model loaded through the API and forget it.
    #[command(after_help = "\
Examples:
  kiln model delete digits-copy")]
    Delete {
        /// The model's name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List every model of the repository, served or not: origin, state, replicas, tenants,
    /// and why one is unavailable.
    #[command(after_help = "\
Examples:
  kiln model ls
  kiln model ls --json")]
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The previous release's `kiln model cache ls`.
        #[arg(long, hide = true)]
        cache: bool,
        /// With the hidden --cache: the config whose cache to list.
        #[arg(long, short, hide = true)]
        config: Option<PathBuf>,
        /// The admin API's address.
        #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
        admin_url: String,
        /// An admin key (from `kiln admin add-key`).
        #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
        admin_key: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Stop running batches: requests queue (up to the queue limit) until `resume`.
    #[command(after_help = "\
Examples:
  kiln model pause digits
      Requests for digits wait in its queue; `kiln model resume digits` runs them.")]
    Pause {
        /// The model's name (`m@2` for one version of a versioned model).
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run batches again after `pause`.
    #[command(after_help = "\
Examples:
  kiln model resume digits")]
    Resume {
        /// The model's name (`m@2` for one version of a versioned model).
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Answer every queued request 503 `flushed`.
    #[command(after_help = "\
Examples:
  kiln model flush digits")]
    Flush {
        /// The model's name (`m@2` for one version of a versioned model).
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Zero the model's counters and histograms.
    #[command(after_help = "\
Examples:
  kiln model reset-stats digits")]
    ResetStats {
        /// The model's name (`m@2` for one version of a versioned model).
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a served model's knobs while it serves (until it is reloaded).
    #[command(after_help = "\
Examples:
  kiln model set digits --max-batch-size 16 --max-queue-delay 500us --timeout 2s
      Smaller batches, a shorter wait to fill one, a 2 s limit per inference.
  kiln model set minilm --instances 2
      Two replicas (MIN..MAX lets the scaler move between them).")]
    Set {
        /// The model's name (`m@2` for one version of a versioned model).
        name: String,
        /// The most rows one forward pass takes.
        #[arg(long)]
        max_batch_size: Option<u32>,
        /// How long a batch may wait for more requests once it has one (like 500us or 2ms).
        #[arg(long, value_parser = parse_duration)]
        max_queue_delay: Option<Duration>,
        /// The previous release's --max-queue-delay, in microseconds.
        #[arg(long, hide = true, conflicts_with = "max_queue_delay")]
        max_queue_delay_us: Option<u64>,
        /// How long one inference may take, queue included, before it answers 504 (like 2s).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The previous release's --timeout, in milliseconds.
        #[arg(long, hide = true, conflicts_with = "timeout")]
        timeout_ms: Option<u64>,
        /// `N`, or `MIN..MAX` for the scaler to move between.
        #[arg(long)]
        instances: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The model cache: remote model files, downloaded once, verified by their SHA-256 (read
    /// and written here, in the config's state directory; no server needed).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Now `kiln model cache pull`.
    #[command(hide = true)]
    Pull(CachePull),
    /// Now `kiln model cache rm`.
    #[command(hide = true)]
    Rm {
        sha256: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List the cached files, least recently used first: digest, size, idle time, sources.
    #[command(after_help = "\
Examples:
  kiln model cache ls
  kiln model cache ls --json")]
    Ls {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download a remote model file into the cache ahead of its load, with a progress bar.
    #[command(after_help = "\
Examples:
  kiln model cache pull https://models.example/digits.pt --allow-unpinned
      Download it and print the sha256 to pin in the model's definition.
  kiln model cache pull https://models.example/digits.pt --sha256 SHA256
      Refused unless the file's digest is SHA256 (hf://ORG/REPO/FILE@REVISION for a Hugging
      Face file).")]
    Pull(CachePull),
    /// Remove a file from the cache by its SHA-256 (a model using it is fetched again at its
    /// next load).
    #[command(after_help = "\
Examples:
  kiln model cache rm SHA256
      SHA256 as `kiln model cache ls` lists it.")]
    Rm {
        /// The file's SHA-256 (64 hex digits, optionally `sha256:` before them).
        sha256: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(clap::Args)]
pub struct CachePull {
    /// https://HOST/FILE or hf://ORG/REPO/FILE@REVISION.
    pub source: String,
    /// The file's SHA-256; the download is refused if it does not match.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Download without a pin, and print the digest to pin it with.
    #[arg(long)]
    pub allow_unpinned: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}
