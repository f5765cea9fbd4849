//! The process's logger: its filter comes from `KILN_LOG` (an `EnvFilter`, `info` by default)
//! at start-up and can be changed while serving, through the admin API (`PUT /v1/log`), without
//! a restart. The logger is the process's one global subscriber, so the handle that changes its
//! filter is global too.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why a filter was not changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0:?} is not a log filter (like `info` or `info,kiln=debug`): {1}")]
    Invalid(String, String),
    #[error("this process's logger was not installed by kiln, so its filter cannot be changed")]
    NotInstalled,
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Installs the logger: human-readable lines on stderr (coloured on a terminal), filtered by
/// `KILN_LOG`.
pub fn init() {
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if tracing_subscriber::registry().with(filter).with(lines).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// The filter in force, as text; `None` when [`init`] did not install the logger.
pub fn filter() -> Option<String> {
    FILTER.get()?.with_current(ToString::to_string).ok()
}

/// Replaces the filter; answers the new one as text.
pub fn set_filter(text: &str) -> Result<String, LogError> {
    let filter = EnvFilter::try_new(text).map_err(|e| LogError::Invalid(text.to_owned(), e.to_string()))?;
    let handle = FILTER.get().ok_or(LogError::NotInstalled)?;
    let shown = filter.to_string();
    handle.reload(filter).map_err(|e| LogError::Reload(e.to_string()))?;
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_that_does_not_parse_is_refused_by_name_and_nothing_is_set_without_the_logger() {
        let message = set_filter("kiln=loud").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.starts_with("\"kiln=loud\" is not a log filter"), "{message}");
        // Unit tests do not install kiln's logger.
        assert!(filter().is_none());
        assert!(matches!(set_filter("info,kiln=debug"), Err(LogError::NotInstalled)));
    }
}
