//! `kiln-top`'s command line, with the names `kiln` uses for the same things: `--url` (or
//! `KILN_URL`) for a server, `--admin-url`, `--admin-key`, and durations written `500ms` or `2s`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kiln_wire::cli::parse_duration;

const EXAMPLES: &str = "\
Examples:
  kiln-top
      Watch the server on http://127.0.0.1:8080 (KILN_ADMIN_KEY holds an admin key).
  kiln-top --url http://127.0.0.1:8080 --refresh 500ms
      Watch one server by its address, refreshing twice a second.
  kiln-top --url http://10.0.0.5:8080,http://10.0.0.6:8080 --admin-url http://10.0.0.5:8081
      Watch two replicas as one fleet; the model actions go to the first one's admin API.";

/// A live terminal dashboard for a Kiln server or a fleet of replicas: queues, batches, GPUs,
/// the scaler's decisions and the event stream. Pauses, flushes and scales the selected model
/// through the admin API.
#[derive(Parser)]
#[command(name = "kiln-top", version, after_help = EXAMPLES)]
pub struct Args {
    /// The server's address (its admin API's serves the same); repeat it, or separate with
    /// commas, to watch a fleet: one row each, queues, rates and latencies summed over them.
    /// Without it, KILN_URL (commas too), else http://127.0.0.1:8080.
    #[arg(long, value_delimiter = ',')]
    pub url: Vec<String>,
    /// The previous release's way to give --url: as arguments.
    #[arg(hide = true, conflicts_with = "url")]
    pub urls: Vec<String>,
    /// An admin key (`kiln admin add-key`).
    #[arg(long, alias = "key", env = "KILN_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Time between snapshots, like 1s or 500ms (`>`/`<` change it while running).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub refresh: Duration,
    /// The previous release's --refresh, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "refresh")]
    pub refresh_ms: Option<u64>,
    /// The admin API's address, for the model actions (pause, flush, replicas); one server's,
    /// also when watching several.
    #[arg(long, env = "KILN_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    pub admin_url: String,
    /// Trust the CA certificates of this PEM file, instead of the system's, for https:// URLs.
    #[arg(long, env = "KILN_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Present this certificate (PEM) to an admin listener that asks for one.
    #[arg(long, env = "KILN_CLIENT_CERT", value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, env = "KILN_CLIENT_KEY", value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl Args {
    /// The servers to watch, without trailing slashes: those the command line names (--url, or
    /// the old arguments), else KILN_URL's, else the default server.
    pub fn urls(&self) -> Vec<String> {
        self.urls_with(std::env::var("KILN_URL").ok().as_deref())
    }

    fn urls_with(&self, env: Option<&str>) -> Vec<String> {
        let clean = |list: Vec<&str>| -> Vec<String> {
            list.into_iter().map(|u| u.trim().trim_end_matches('/').to_owned()).filter(|u| !u.is_empty()).collect()
        };
        let given = if self.url.is_empty() { &self.urls } else { &self.url };
        let mut urls = clean(given.iter().map(String::as_str).collect());
        if urls.is_empty() {
            urls = clean(env.unwrap_or_default().split(',').collect());
        }
        if urls.is_empty() { vec!["http://127.0.0.1:8080".to_owned()] } else { urls }
    }

    /// The time between snapshots, --refresh-ms included.
    pub fn refresh(&self) -> Duration {
        self.refresh_ms.map_or(self.refresh, Duration::from_millis)
    }
}

/// docs/reference/kiln-top.md: `kiln-top --help`.
pub fn reference() -> String {
    use clap::CommandFactory as _;
    kiln_wire::cli::reference(
        &Args::command(),
        "CLI reference: kiln-top",
        "`kiln-top --help`, made from the binary by `KILN_BLESS=1 cargo test --release -p kiln-top --lib \
         cli_reference` (a test fails when this file and the binary differ). `kiln`'s is in [cli.md](cli.md).\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn clap_accepts_the_definitions() {
        Args::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help() {
        let missing = kiln_wire::cli::undocumented(&Args::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    #[test]
    fn its_help_shows_examples() {
        assert!(kiln_wire::cli::without_examples(&Args::command()).is_empty());
    }

    #[test]
    fn urls_come_from_flags_commas_or_the_old_arguments() {
        let parse = |line: &[&str]| Args::try_parse_from(line).expect("parses").urls_with(None);
        assert_eq!(parse(&["kiln-top"]), ["http://127.0.0.1:8080"]);
        assert_eq!(parse(&["kiln-top", "--url", "http://a:1/", "--url", "http://b:2"]), ["http://a:1", "http://b:2"]);
        assert_eq!(parse(&["kiln-top", "--url", "http://a:1,http://b:2"]), ["http://a:1", "http://b:2"]);
        assert_eq!(parse(&["kiln-top", "http://a:1", "http://b:2"]), ["http://a:1", "http://b:2"]);
        // The command line wins over KILN_URL, which wins over the default.
        let with_env = |line: &[&str]| Args::try_parse_from(line).expect("parses").urls_with(Some("http://e:1,http://e:2/"));
        assert_eq!(with_env(&["kiln-top"]), ["http://e:1", "http://e:2"]);
        assert_eq!(with_env(&["kiln-top", "http://a:1"]), ["http://a:1"]);
        assert_eq!(with_env(&["kiln-top", "--url", "http://b:2"]), ["http://b:2"]);
        assert!(Args::try_parse_from(["kiln-top", "--url", "http://a:1", "http://b:2"]).is_err(), "both ways at once are refused");
    }

    #[test]
    fn old_names_still_parse() {
        let args = Args::try_parse_from(["kiln-top", "--key", "k", "--refresh-ms", "250"]).expect("parses");
        assert_eq!(args.admin_key.as_deref(), Some("k"));
        assert_eq!(args.refresh(), Duration::from_millis(250));
        let args = Args::try_parse_from(["kiln-top", "--refresh", "2s"]).expect("parses");
        assert_eq!(args.refresh(), Duration::from_secs(2));
    }

    /// docs/reference/kiln-top.md is this binary's help; `KILN_BLESS=1` writes it.
    #[test]
    fn cli_reference() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/kiln-top.md");
        kiln_wire::cli::check_reference(&file, &reference(), "KILN_BLESS=1 cargo test --release -p kiln-top --lib cli_reference");
    }
}
