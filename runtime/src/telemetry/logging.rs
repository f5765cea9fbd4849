//! The process's logger: its filter comes from `KILN_LOG` (an `EnvFilter`, `info` by default)
//! at start-up and can be changed while serving, through the admin API (`PUT /v1/log`), without
//! a restart. The logger is the process's one global subscriber, so the handle that changes its
//! filter is global too. Its lines are text, or one JSON object each (`--log-format json`).

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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the line's fields.
    Json,
}

/// Installs the logger: lines on stderr in `format`, filtered by `KILN_LOG`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// `text` for a log line: control characters (a guest's escape sequences, carriage returns,
/// NULs) written as `\u{..}` escapes, so nothing can start a line of its own or recolour the
/// terminal, and cut to at most `max` bytes (at a character boundary, marked with `…`).
pub fn printable(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max && !text.chars().any(unprintable) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for c in text.chars() {
        let before = out.len();
        if unprintable(c) {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    std::borrow::Cow::Owned(out)
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

/// Control characters, and those that reorder or break a line on screen: bidirectional
/// overrides and isolates, and the Unicode line and paragraph separators.
fn unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_escapes_controls_and_is_cut_at_a_character() {
        assert!(matches!(printable("plain words", 64), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable("a\nb\r\u{1b}[31mc\0", 64), "a\\u{a}b\\u{d}\\u{1b}[31mc\\u{0}");
        assert_eq!(printable("x\u{202e}y\u{2028}z", 64), "x\\u{202e}y\\u{2028}z");
        let cut = printable("ééééé", 5);
        assert_eq!(cut, "éé…");
        assert!(printable(&"x".repeat(100), 10).len() <= 10 + '…'.len_utf8());
    }

    #[test]
    fn a_filter_that_does_not_parse_is_refused_by_name_and_nothing_is_set_without_the_logger() {
        let message = set_filter("kiln=loud").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.starts_with("\"kiln=loud\" is not a log filter"), "{message}");
        // Unit tests do not install kiln's logger.
        assert!(filter().is_none());
        assert!(matches!(set_filter("info,kiln=debug"), Err(LogError::NotInstalled)));
    }
}
