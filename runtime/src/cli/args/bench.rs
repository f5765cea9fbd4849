//! `kiln bench` and `kiln bench-raw`'s flags.

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigArg, parse_duration};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The server's address.
    #[arg(long, alias = "server", env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Load this handler (POST /v1/handlers/NAME/PATH).
    #[arg(long, conflicts_with_all = ["model", "endpoint"])]
    pub handler: Option<String>,
    /// Path under the handler.
    #[arg(long, default_value = "")]
    pub path: String,
    /// Load this model's OIP infer endpoint (POST /v2/models/NAME/infer).
    #[arg(long, conflicts_with = "endpoint")]
    pub model: Option<String>,
    /// Load any path on the server (or a full URL).
    #[arg(long, value_name = "PATH")]
    pub endpoint: Option<String>,
    /// Request body, read from a file.
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// With --model: send gRPC ModelInfer to this address (HOST:PORT, or https://HOST:PORT
    /// for TLS) instead; --body is then an OIP JSON request, sent as raw contents.
    #[arg(long, requires_all = ["model", "body"], value_name = "HOST:PORT")]
    pub grpc: Option<String>,
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Other bodies: every file in this folder, sent in turn by the requests that do not repeat
    /// --body (see --repeat-percent).
    #[arg(long, requires = "body", value_name = "DIR")]
    pub vary: Option<PathBuf>,
    /// The percent of requests that repeat the same request exactly; each of the others is made
    /// unique with a `kiln-bench-unique=N` query parameter (a response cache's benchmark).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub repeat_percent: u32,
    /// HTTP method (default POST with a body, GET without).
    #[arg(long)]
    pub method: Option<String>,
    /// Content-Type of the body.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Extra request header, NAME:VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// A tenant's API key, sent as Authorization: Bearer KEY.
    #[arg(long, alias = "key", env = "KILN_KEY", hide_env_values = true)]
    pub tenant_key: Option<String>,
    /// An admin key, to read the server's batch counters and CPU (/v1/stats) before and after.
    #[arg(long, env = "KILN_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Requests in flight (closed loop).
    #[arg(long, short_alias = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Requests per second (open loop) instead of a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With --rate: the most requests in flight at once; a request due while this many are
    /// outstanding is not sent (and counted), so the client cannot run out of sockets first.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// How long to run, like 10s, 500ms or 2m (default 10s unless --requests is given).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// How many requests to send.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct BenchRawArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The model's name in that config.
    #[arg(long)]
    pub model: String,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub batch_sizes: Vec<u32>,
    /// Size of every dynamic non-batch dimension (for example the sequence length).
    #[arg(long, default_value_t = 16)]
    pub dim: u32,
    /// How long to time each batch size (like 2s or 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub duration: Duration,
    /// The previous release's --duration, in seconds.
    #[arg(long, hide = true, conflicts_with = "duration")]
    pub seconds: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `cpu` or `cuda:N`; by default the model's first GPU, or cuda:0 for `auto` where
    /// libtorch sees a GPU, else the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// Run the model in a confined worker process, as a tenant's own model runs, instead of
    /// in this process: the difference is what the worker costs per batch.
    #[arg(long)]
    pub worker: bool,
    /// `fp32`, `fp16`, `bf16`, `bf16-autocast`, or `auto` (search as the server would, and
    /// time the choice); by default the model's own `precision`, searched when it is `auto`.
    #[arg(long)]
    pub precision: Option<String>,
    /// With a pinned --precision: lay 4-D weights and inputs out channels-last.
    #[arg(long)]
    pub channels_last: bool,
}
