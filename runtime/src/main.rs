//! `kiln`: serve models behind sandboxed WebAssembly handlers.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use kiln::cli::args::{
    AdminCommand, BenchArgs, BenchRawArgs, CacheCommand, Cli, Command, ConfigArg, ConfigCommand, HandlerCommand, ModelCommand,
    RequestCommand, TenantCommand, TlsArgs,
};
use kiln::config::{Config, layers};
use kiln::model::device::Device;
use kiln::model::spec::DeviceChoice;

/// The server's Rust heap, counted for `/v1/stats`: glibc's malloc, which served the sandbox path
/// faster here than mimalloc did (docs/BENCHMARKS.md, "Levers tried").
#[global_allocator]
static ALLOCATOR: kiln::telemetry::alloc::Counting<std::alloc::System> = kiln::telemetry::alloc::Counting(std::alloc::System);

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
            ExitCode::from(kiln::cli::exit_code(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    use kiln::tenancy::keys::Principal;
    match cli.command {
        Command::Serve(args) => kiln::serve::run(args),
        Command::Tenant { command } => match command {
            TenantCommand::Ls { config, json } => kiln::cli::list_tenants(&load(config)?, json),
            TenantCommand::AddKey { name, config } => kiln::cli::add_key(&load(config)?, &Principal::Tenant(name)),
            TenantCommand::Keys { name, config, json } => kiln::cli::list_keys(&load(config)?, &Principal::Tenant(name), json),
            TenantCommand::RemoveKey { name, id, config } => kiln::cli::remove_key(&load(config)?, &Principal::Tenant(name), &id),
        },
        Command::Admin { command } => match command {
            AdminCommand::AddKey { config } => kiln::cli::add_key(&load(config)?, &Principal::Admin),
            AdminCommand::Keys { config, json } => kiln::cli::list_keys(&load(config)?, &Principal::Admin, json),
            AdminCommand::RemoveKey { id, config } => kiln::cli::remove_key(&load(config)?, &Principal::Admin, &id),
        },
        Command::Config { command: ConfigCommand::Show { config } } => {
            let (path, found) = layers::locate(config.config.as_deref())?;
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
        Command::Sign { what, signing_key, out } => kiln::cli::sign(&what, &signing_key, out),
        Command::Push(args) => kiln::cli::oci::push(&args),
        Command::Pull(args) => kiln::cli::oci::pull(&args),
        Command::Handler { command } => match command {
            HandlerCommand::Deploy { request, admin } => kiln::cli::deploy(&admin_target(admin)?, &request),
            HandlerCommand::Undeploy { name, admin } => kiln::cli::undeploy(&admin_target(admin)?, &name),
            HandlerCommand::Ls { json, admin } => kiln::cli::list_handlers(&admin_target(admin)?, json),
        },
        Command::Deploy { request, admin } => kiln::cli::deploy(&admin_target(admin)?, &request),
        Command::Undeploy { name, admin } => kiln::cli::undeploy(&admin_target(admin)?, &name),
        Command::Handlers { admin } => kiln::cli::list_handlers(&admin_target(admin)?, false),
        Command::Request { command } => match command {
            RequestCommand::Ls { json, admin } => kiln::cli::list_requests(&admin_target(admin)?, json),
            RequestCommand::Cancel { id, admin } => kiln::cli::cancel_request(&admin_target(admin)?, &id),
        },
        Command::Requests { cancel: Some(id), admin } => kiln::cli::cancel_request(&admin_target(admin)?, &id),
        Command::Requests { cancel: None, admin } => kiln::cli::list_requests(&admin_target(admin)?, false),
        Command::Model { command } => model(command),
        Command::Bench(args) => bench(args),
        Command::BenchRaw(args) => bench_raw(args),
        Command::Check { component } => kiln::cli::author::check(&component),
        Command::ScanTorchscript => Ok(kiln::model::graph_check::serve_scan()?),
        Command::ModelWorker { model: _ } => Ok(kiln::model::backend::worker::serve_worker()?),
        Command::New { name, template, dir, sdk, vocab } => {
            kiln::cli::author::new_handler(&name, template, &dir, sdk.as_deref(), vocab.as_deref())
        }
        Command::Build { dir, init_timeout, init_timeout_s } => {
            let limit = init_timeout_s.map_or(init_timeout, std::time::Duration::from_secs);
            kiln::cli::author::build(&dir, limit).map(|_| ())
        }
    }
}

fn model(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Load { name, spec, admin } => kiln::cli::load_model(&admin_target(admin)?, &name, spec.as_deref()),
        ModelCommand::Unload { name, admin } => kiln::cli::unload_model(&admin_target(admin)?, &name),
        ModelCommand::Delete { name, admin } => kiln::cli::delete_model(&admin_target(admin)?, &name),
        ModelCommand::Ls { cache: true, config, json, .. } => kiln::cli::list_cache(&load(ConfigArg { config })?, json),
        ModelCommand::Ls { cache: false, json, admin_url, admin_key, tls, .. } => {
            let key = admin_key.ok_or_else(|| anyhow::anyhow!("give an admin key: --admin-key or KILN_ADMIN_KEY"))?;
            kiln::cli::list_models(&kiln::cli::AdminTarget { url: admin_url, key, tls: client_tls(tls)? }, json)
        }
        ModelCommand::Cache { command: CacheCommand::Ls { config, json } } => kiln::cli::list_cache(&load(config)?, json),
        ModelCommand::Cache { command: CacheCommand::Pull(pull) } | ModelCommand::Pull(pull) => {
            kiln::cli::pull_model(&load(pull.config)?, &pull.source, pull.sha256.as_deref(), pull.allow_unpinned)
        }
        ModelCommand::Cache { command: CacheCommand::Rm { sha256, config } } | ModelCommand::Rm { sha256, config } => {
            kiln::cli::remove_cached(&load(config)?, &sha256)
        }
        ModelCommand::Pause { name, admin } => kiln::cli::control_model(&admin_target(admin)?, &name, "pause"),
        ModelCommand::Resume { name, admin } => kiln::cli::control_model(&admin_target(admin)?, &name, "resume"),
        ModelCommand::Flush { name, admin } => kiln::cli::control_model(&admin_target(admin)?, &name, "flush"),
        ModelCommand::ResetStats { name, admin } => kiln::cli::control_model(&admin_target(admin)?, &name, "reset-stats"),
        ModelCommand::Set { name, max_batch_size, max_queue_delay, max_queue_delay_us, timeout, timeout_ms, instances, admin } => {
            let mut knobs = serde_json::Map::new();
            if let Some(n) = max_batch_size {
                knobs.insert("max_batch_size".into(), n.into());
            }
            let whole = kiln_wire::cli::whole;
            if let Some(us) = max_queue_delay.map(|d| whole(d, Duration::from_micros(1))).or(max_queue_delay_us) {
                knobs.insert("max_queue_delay_us".into(), us.into());
            }
            if let Some(ms) = timeout.map(|d| whole(d, Duration::from_millis(1))).or(timeout_ms) {
                knobs.insert("timeout_ms".into(), ms.into());
            }
            if let Some(text) = instances {
                knobs.insert("instances".into(), kiln::cli::args::parse_instances(&text)?);
            }
            kiln::cli::tune_model(&admin_target(admin)?, &name, &serde_json::Value::Object(knobs))
        }
    }
}

fn admin_target(admin: kiln::cli::args::AdminArgs) -> anyhow::Result<kiln::cli::AdminTarget> {
    Ok(kiln::cli::AdminTarget { url: admin.admin_url, key: admin.admin_key, tls: client_tls(admin.tls)? })
}

fn client_tls(tls: TlsArgs) -> anyhow::Result<kiln::tls::ClientTls> {
    kiln::tls::ClientTls::from_flags(tls.cacert, tls.client_cert, tls.client_key)
}

fn bench_raw(args: BenchRawArgs) -> anyhow::Result<()> {
    let BenchRawArgs { config, model, batch_sizes, dim, duration, seconds, json, device, worker, precision, channels_last } = args;
    let seconds = seconds.unwrap_or(duration.as_secs_f64());
    let config = load(config)?;
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

fn load(config: ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(&config_path(config.config)?)?)
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let server = args.url.trim_end_matches('/').to_owned();
    let url = match (&args.handler, &args.model, &args.endpoint) {
        (Some(h), _, _) => format!("{server}/v1/handlers/{h}/{}", args.path.trim_start_matches('/')),
        (_, Some(m), _) => format!("{server}/v2/models/{m}/infer"),
        (_, _, Some(u)) if u.starts_with("http") => u.clone(),
        (_, _, Some(u)) => format!("{server}/{}", u.trim_start_matches('/')),
        _ => anyhow::bail!("say what to load: --handler NAME, --model NAME or --endpoint PATH (--url is the server's address)"),
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
    if let Some(key) = &args.tenant_key {
        headers.push(("authorization".to_owned(), format!("Bearer {}", key.trim())));
    }
    let url = match (&args.grpc, &args.model) {
        (Some(addr), Some(model)) => format!("grpc://{addr}/{model}"),
        _ => url,
    };
    let spec = kiln::cli::bench::LoadSpec {
        url,
        server: server.clone(),
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
    // A run in which nothing succeeded measured nothing: say so in the exit code too (3 when
    // no request could connect).
    if report.ok == 0 && !report.errors.is_empty() && report.errors.keys().all(|k| k.starts_with("connect")) {
        let why = report.errors.keys().next().cloned().unwrap_or_default();
        return Err(kiln::cli::Unreachable(format!("cannot reach {}: {why}", report.url)).into());
    }
    if report.ok == 0 {
        anyhow::bail!("no request succeeded ({} sent): see the errors in the report", report.requests);
    }
    Ok(())
}
