//! Where a deployment's settings come from, in order: the config file (`--config`, else
//! `KILN_CONFIG`, else `./kiln.toml`, else the bundled examples of the source checkout the
//! binary was built from), then `KILN_SERVER__FIELD` environment variables over the file's
//! `[server]` table, then the defaults. An image or an orchestrator sets a listener, a state
//! directory or a timeout without a file of its own; `kiln config show` prints what took effect
//! and where each value came from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kiln_codec::config::RawServer;

use super::{Config, ConfigError, ServerConfig};

/// Names the config file when `--config` does not.
pub const CONFIG_ENV: &str = "KILN_CONFIG";

/// `KILN_SERVER__LISTEN=0.0.0.0:8080` sets `[server] listen`; the field's name in upper case.
pub const SERVER_ENV_PREFIX: &str = "KILN_SERVER__";

/// The file looked for in the working directory.
pub const WORKING_DIR_CONFIG: &str = "kiln.toml";

/// Every `[server]` field, in the order `kiln config show` prints them.
pub const SERVER_FIELDS: &[&str] = &[
    "listen",
    "admin_listen",
    "grpc_listen",
    "metrics_listen",
    "state_dir",
    "cache_dir",
    "cache_max_bytes",
    "max_body_bytes",
    "max_component_bytes",
    "max_instances",
    "oip_max_priority",
    "slot_reset",
    "drain_grace_ms",
    "drain_timeout_ms",
    "load_timeout_s",
    "tenant_fetch_timeout_s",
    "allow_unpinned",
    "tenant_private_sources",
    "registry_auth",
    "registry_ca",
    "cluster",
    "replica",
    "keys_dir",
    "tls_cert",
    "tls_key",
    "admin_tls",
    "admin_tls_cert",
    "admin_tls_key",
    "admin_client_ca",
    "grpc_tls",
    "grpc_tls_cert",
    "grpc_tls_key",
    "metrics_tls",
    "metrics_tls_cert",
    "metrics_tls_key",
    "otlp_endpoint",
    "otlp_sample_ratio",
    "spread_idle_cores",
];

/// How the config file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Flag,
    Env,
    WorkingDir,
    Examples,
}

impl Found {
    fn describe(self) -> &'static str {
        match self {
            Found::Flag => "--config",
            Found::Env => "$KILN_CONFIG",
            Found::WorkingDir => "./kiln.toml in the working directory",
            Found::Examples => "the bundled examples (no --config, $KILN_CONFIG or ./kiln.toml)",
        }
    }
}

/// The bundled examples' config: `examples/kiln.toml` from the working directory (a checkout),
/// else beside the sources this binary was built from.
pub fn examples_config() -> PathBuf {
    let local = PathBuf::from("examples/kiln.toml");
    if local.is_file() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kiln.toml"))
}

/// The config file to read: `flag`, else `$KILN_CONFIG`, else `./kiln.toml`, else the bundled
/// examples; or an error saying where it looked.
pub fn locate(flag: Option<&Path>) -> Result<(PathBuf, Found), ConfigError> {
    locate_in(flag, std::env::var_os(CONFIG_ENV).map(PathBuf::from), Path::new("."), &examples_config())
}

fn locate_in(flag: Option<&Path>, env: Option<PathBuf>, dir: &Path, examples: &Path) -> Result<(PathBuf, Found), ConfigError> {
    if let Some(file) = flag {
        return Ok((file.to_path_buf(), Found::Flag));
    }
    if let Some(file) = env.filter(|f| !f.as_os_str().is_empty()) {
        return Ok((file, Found::Env));
    }
    let here = dir.join(WORKING_DIR_CONFIG);
    if here.is_file() {
        return Ok((here, Found::WorkingDir));
    }
    if examples.is_file() {
        return Ok((examples.to_path_buf(), Found::Examples));
    }
    Err(ConfigError::NotFound {
        looked: format!("--config (not given), ${CONFIG_ENV} (not set), {} and {}", here.display(), examples.display()),
    })
}

/// One `KILN_SERVER__FIELD` variable.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The variable's name, for messages and `kiln config show`.
    pub var: String,
    pub field: String,
    pub value: toml::Value,
}

/// The `KILN_SERVER__FIELD` variables among `vars`, each checked against `[server]`'s fields
/// and types; a wrong one is an error naming the variable.
pub fn server_overrides(vars: impl IntoIterator<Item = (String, String)>) -> Result<Vec<Override>, ConfigError> {
    let mut overrides = Vec::new();
    for (var, text) in vars {
        let Some(name) = var.strip_prefix(SERVER_ENV_PREFIX) else { continue };
        let field = name.to_ascii_lowercase();
        let invalid = |message: String| ConfigError::Invalid {
            file: PathBuf::from("<environment>"),
            field: var.clone(),
            message,
        };
        if !SERVER_FIELDS.contains(&field.as_str()) {
            return Err(invalid(format!("[server] has no field '{field}'; it has {}", SERVER_FIELDS.join(", "))));
        }
        let value = value_for(&field, &text).map_err(|e| invalid(format!("'{text}': {e}")))?;
        overrides.push(Override { var, field, value });
    }
    overrides.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(overrides)
}

/// A variable's text as the value of `field`: the text itself where the field takes a string
/// (an address, `off`, a path, even `2024`), else the text read as a TOML number or boolean.
fn value_for(field: &str, text: &str) -> Result<toml::Value, String> {
    let accepts = |value: &toml::Value| {
        let mut alone = toml::Table::new();
        alone.insert(field.to_owned(), value.clone());
        toml::Value::Table(alone).try_into::<RawServer>().map(drop).map_err(|e| e.message().to_owned())
    };
    let as_text = toml::Value::String(text.to_owned());
    if accepts(&as_text).is_ok() {
        return Ok(as_text);
    }
    // One bare TOML value: no comment, no second line, nothing after it.
    let parsed = (!text.contains(['#', '\n', '\r']))
        .then(|| format!("v = {text}").parse::<toml::Table>().ok())
        .flatten()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(value) => accepts(&value).map(|()| value),
        None => accepts(&as_text).map(|()| as_text),
    }
}

/// `server` with `overrides` set over it.
pub(super) fn apply(server: RawServer, overrides: &[Override]) -> Result<RawServer, ConfigError> {
    if overrides.is_empty() {
        return Ok(server);
    }
    let internal = |message: String| ConfigError::Invalid { file: PathBuf::from("<environment>"), field: SERVER_ENV_PREFIX.to_owned(), message };
    let mut table = match toml::Value::try_from(&server).map_err(|e| internal(e.to_string()))? {
        toml::Value::Table(table) => table,
        _ => toml::Table::new(),
    };
    for o in overrides {
        table.insert(o.field.clone(), o.value.clone());
    }
    toml::Value::Table(table).try_into::<RawServer>().map_err(|e| internal(e.message().to_owned()))
}

/// A validation error about a `[server]` field a variable set, told as the variable's.
pub(super) fn blame(error: ConfigError, overrides: &[Override]) -> ConfigError {
    match error {
        ConfigError::Invalid { field, message, file } => match overrides.iter().find(|o| field == format!("server.{}", o.field)) {
            Some(o) => ConfigError::Invalid { file: PathBuf::from("<environment>"), field: o.var.clone(), message },
            None => ConfigError::Invalid { file, field, message },
        },
        other => other,
    }
}

impl ServerConfig {
    /// Each field's value as it took effect, in [`SERVER_FIELDS`]' order; `None` for a field
    /// left unset that has no value (`cache_max_bytes`: no limit).
    pub fn effective(&self) -> Vec<(&'static str, Option<toml::Value>)> {
        use toml::Value::{Boolean, Integer, String as Text};
        let int = |n: u64| Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let text = |s: &dyn std::fmt::Display| Text(s.to_string());
        let own = |listener: &super::ListenerTls| match listener {
            super::ListenerTls::Own(files) => Some(files.clone()),
            _ => None,
        };
        let ms = |d: std::time::Duration| int(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let values: Vec<(&'static str, Option<toml::Value>)> = vec![
            ("listen", Some(text(&self.listen))),
            ("admin_listen", Some(text(&self.admin_listen))),
            ("grpc_listen", Some(self.grpc_listen.map_or_else(|| Text("off".to_owned()), |a| text(&a)))),
            ("metrics_listen", Some(self.metrics_listen.map_or_else(|| Text("off".to_owned()), |a| text(&a)))),
            ("state_dir", Some(text(&self.state_dir.display()))),
            ("cache_dir", Some(text(&self.cache_dir.display()))),
            ("cache_max_bytes", self.cache_max_bytes.map(int)),
            ("max_body_bytes", Some(int(self.max_body_bytes as u64))),
            ("max_component_bytes", Some(int(self.max_component_bytes as u64))),
            ("max_instances", Some(int(self.max_instances.into()))),
            ("oip_max_priority", Some(int(self.oip_max_priority.into()))),
            ("slot_reset", Some(Text(self.slot_reset.name().to_owned()))),
            ("drain_grace_ms", Some(ms(self.drain_grace))),
            ("drain_timeout_ms", Some(ms(self.drain_timeout))),
            ("load_timeout_s", Some(int(self.load_timeout.as_secs()))),
            ("tenant_fetch_timeout_s", Some(int(self.tenant_fetch_timeout.as_secs()))),
            ("allow_unpinned", Some(Boolean(self.allow_unpinned))),
            ("tenant_private_sources", Some(Boolean(self.tenant_private_sources))),
            ("registry_auth", self.registry_auth.as_ref().map(|p| text(&p.display()))),
            ("registry_ca", self.registry_ca.as_ref().map(|p| text(&p.display()))),
            ("cluster", Some(Boolean(self.cluster.is_some()))),
            ("replica", self.cluster.as_ref().map(|r| text(r))),
            ("keys_dir", Some(text(&self.keys_dir.display()))),
            ("tls_cert", self.tls.default.as_ref().map(|t| text(&t.cert.display()))),
            ("tls_key", self.tls.default.as_ref().map(|t| text(&t.key.display()))),
            ("admin_tls", Some(Boolean(self.tls.admin().is_some()))),
            ("admin_tls_cert", own(&self.tls.admin).map(|t| text(&t.cert.display()))),
            ("admin_tls_key", own(&self.tls.admin).map(|t| text(&t.key.display()))),
            ("admin_client_ca", self.tls.admin_client_ca.as_ref().map(|p| text(&p.display()))),
            ("grpc_tls", Some(Boolean(self.tls.grpc().is_some()))),
            ("grpc_tls_cert", own(&self.tls.grpc).map(|t| text(&t.cert.display()))),
            ("grpc_tls_key", own(&self.tls.grpc).map(|t| text(&t.key.display()))),
            ("metrics_tls", Some(Boolean(self.tls.metrics().is_some()))),
            ("metrics_tls_cert", own(&self.tls.metrics).map(|t| text(&t.cert.display()))),
            ("metrics_tls_key", own(&self.tls.metrics).map(|t| text(&t.key.display()))),
            ("otlp_endpoint", self.otlp_endpoint.as_ref().map(|e| text(e))),
            ("otlp_sample_ratio", Some(toml::Value::Float(self.otlp_sample_ratio))),
            ("spread_idle_cores", Some(Boolean(self.spread_idle_cores))),
        ];
        values
    }
}

/// `kiln config show`: the effective config read from `file` (found as `found`) under
/// `overrides`, as TOML, each `[server]` value followed by where it came from: the variable
/// that set it, the file, or the default.
pub fn show(file: &Path, found: Found, overrides: &[Override]) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_path_buf(), source })?;
    let in_file: toml::Table = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("server"))
        .and_then(|s| s.as_table().cloned())
        .unwrap_or_default();
    let config = Config::parse_with(&text, file, file.parent().unwrap_or(Path::new(".")), overrides)?;
    let mut out = String::new();
    let _ = writeln!(out, "# {} (found through {})", file.display(), found.describe());
    let _ = writeln!(out, "[server]");
    for (field, value) in config.server.effective() {
        let origin = match overrides.iter().find(|o| o.field == field) {
            Some(o) => o.var.clone(),
            None if in_file.contains_key(field) => "file".to_owned(),
            None => "default".to_owned(),
        };
        match value {
            Some(value) => {
                let line = format!("{field} = {value}");
                let _ = writeln!(out, "{line:<48} # {origin}");
            }
            None => {
                let _ = writeln!(out, "{:<48} # {origin}: unset", format!("# {field}"));
            }
        }
    }
    let names = |list: Vec<&str>| if list.is_empty() { "none".to_owned() } else { list.join(", ") };
    let _ = writeln!(out, "\n# from the file:");
    let _ = writeln!(out, "# models: {}", names(config.models.iter().map(|m| m.name.as_str()).collect()));
    let _ = writeln!(out, "# tenants: {}", names(config.tenants.iter().map(|t| t.name.as_str()).collect()));
    let _ = writeln!(out, "# handlers: {}", names(config.handlers.iter().map(|h| h.name.as_str()).collect()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_config_is_looked_for_in_order_and_a_miss_says_where() {
        let dir = std::env::temp_dir().join(format!("kiln-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let examples = dir.join("examples.toml");
        let none = Path::new("/nonexistent/kiln-examples.toml");
        let flag = Path::new("given.toml");
        assert_eq!(locate_in(Some(flag), Some("env.toml".into()), &dir, none).expect("flag"), (flag.to_path_buf(), Found::Flag));
        assert_eq!(locate_in(None, Some("env.toml".into()), &dir, none).expect("env"), ("env.toml".into(), Found::Env));
        let error = locate_in(None, Some("".into()), &dir, none).expect_err("nothing").to_string();
        assert!(error.contains("KILN_CONFIG (not set)") && error.contains("kiln.toml") && error.contains("kiln-examples.toml"), "{error}");
        std::fs::write(&examples, "").expect("examples");
        assert_eq!(locate_in(None, None, &dir, &examples).expect("examples"), (examples.clone(), Found::Examples));
        std::fs::write(dir.join("kiln.toml"), "").expect("kiln.toml");
        assert_eq!(locate_in(None, None, &dir, &examples).expect("here"), (dir.join("kiln.toml"), Found::WorkingDir));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn server_variables_are_typed_by_their_field_and_a_wrong_one_names_itself() {
        let set = server_overrides(vars(&[
            ("KILN_SERVER__LISTEN", "0.0.0.0:9000"),
            ("KILN_SERVER__MAX_INSTANCES", "12"),
            ("KILN_SERVER__ALLOW_UNPINNED", "true"),
            ("KILN_SERVER__GRPC_LISTEN", "off"),
            ("HOME", "/root"),
        ]))
        .expect("overrides");
        let got: Vec<(&str, &toml::Value)> = set.iter().map(|o| (o.field.as_str(), &o.value)).collect();
        assert_eq!(
            got,
            [
                ("allow_unpinned", &toml::Value::Boolean(true)),
                ("grpc_listen", &toml::Value::String("off".into())),
                ("listen", &toml::Value::String("0.0.0.0:9000".into())),
                ("max_instances", &toml::Value::Integer(12)),
            ]
        );
        let e = server_overrides(vars(&[("KILN_SERVER__LISTN", "x")])).expect_err("unknown").to_string();
        assert!(e.starts_with("<environment>: KILN_SERVER__LISTN: [server] has no field 'listn'"), "{e}");
        let e = server_overrides(vars(&[("KILN_SERVER__MAX_INSTANCES", "many")])).expect_err("type").to_string();
        assert!(e.starts_with("<environment>: KILN_SERVER__MAX_INSTANCES: 'many': invalid type"), "{e}");
        // The field's type decides how the text reads: a path that looks like a number stays a
        // path, and a number with a comment after it is refused, not cut short.
        let dir = server_overrides(vars(&[("KILN_SERVER__STATE_DIR", "2024")])).expect("a path");
        assert_eq!(dir[0].value, toml::Value::String("2024".into()));
        assert!(server_overrides(vars(&[("KILN_SERVER__MAX_INSTANCES", "12 # note")])).is_err());
    }

    #[test]
    fn every_server_field_is_listed_and_shown() {
        // A field RawServer lacks is refused by its `deny_unknown_fields`.
        for field in SERVER_FIELDS {
            let mut table = toml::Table::new();
            let value = match *field {
                f if f.ends_with("_bytes") || f.ends_with("_ms") || f.ends_with("_s") || f == "max_instances" || f == "oip_max_priority" => toml::Value::Integer(1),
                f if f.ends_with("_tls") => toml::Value::Boolean(true),
                f if f.ends_with("_ratio") => toml::Value::Float(0.5),
                "allow_unpinned" | "tenant_private_sources" | "cluster" | "spread_idle_cores" => toml::Value::Boolean(true),
                _ => toml::Value::String("x".into()),
            };
            table.insert((*field).to_owned(), value);
            toml::Value::Table(table).try_into::<RawServer>().unwrap_or_else(|e| panic!("[server] {field}: {e}"));
        }
        // And a field RawServer has is listed here.
        let raw = serde_json::to_value(RawServer::default()).expect("RawServer as JSON");
        let mut fields: Vec<&str> = raw.as_object().expect("an object").keys().map(String::as_str).collect();
        let mut listed = SERVER_FIELDS.to_vec();
        fields.sort_unstable();
        listed.sort_unstable();
        assert_eq!(fields, listed, "SERVER_FIELDS and [server]'s fields differ");
        let config = Config::parse("", Path::new("t.toml"), Path::new(".")).expect("defaults");
        let shown: Vec<&str> = config.server.effective().into_iter().map(|(f, _)| f).collect();
        assert_eq!(shown, SERVER_FIELDS);
    }

    #[test]
    fn variables_win_over_the_file_and_show_says_which_set_what() {
        let dir = std::env::temp_dir().join(format!("kiln-show-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("kiln.toml");
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:7000\"\nmax_instances = 8\n").expect("write");
        let overrides = server_overrides(vars(&[("KILN_SERVER__MAX_INSTANCES", "16"), ("KILN_SERVER__STATE_DIR", "/data")])).expect("overrides");
        let config = Config::load_with(&file, &overrides).expect("load");
        assert_eq!(config.server.max_instances, 16);
        assert_eq!(config.server.state_dir, PathBuf::from("/data"));
        assert_eq!(config.server.listen.port(), 7000);
        let shown = show(&file, Found::Flag, &overrides).expect("show");
        let line = |field: &str| shown.lines().find(|l| l.starts_with(&format!("{field} ="))).unwrap_or_else(|| panic!("{field} in {shown}")).to_owned();
        assert!(line("listen").ends_with("# file"), "{shown}");
        assert!(line("max_instances").contains("= 16") && line("max_instances").ends_with("# KILN_SERVER__MAX_INSTANCES"), "{shown}");
        assert!(line("state_dir").contains("\"/data\""), "{shown}");
        // A value of the right type that validation refuses is the variable's fault, not the file's.
        let port_less = server_overrides(vars(&[("KILN_SERVER__LISTEN", "0.0.0.0")])).expect("a string");
        let e = Config::load_with(&file, &port_less).expect_err("no port").to_string();
        assert!(e.starts_with("<environment>: KILN_SERVER__LISTEN: "), "{e}");
        // And the file's own errors keep their lines under overrides.
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:7000\"\n\n[[model]]\nnom = 1\n").expect("write");
        let e = Config::load_with(&file, &overrides).expect_err("bad model").to_string();
        assert!(e.contains("line 5"), "{e}");
        assert!(line("max_body_bytes").ends_with("# default"), "{shown}");
        assert!(shown.contains("# cache_max_bytes") && shown.contains("default: unset"), "{shown}");
        // What `kiln config show` prints is a config Kiln reads back to the same values.
        let again = Config::parse(&shown, &file, &dir).expect("show's output is a config");
        assert_eq!(again.server.max_instances, 16);
        let _ = std::fs::remove_dir_all(dir);
    }
}
