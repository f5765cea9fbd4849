//! What `kiln` and `kiln-top` share on the command line: durations written one way (`10s`,
//! `500ms`, `250us`, `2m`), the exit codes, and (with the `clap` feature) the CLI reference made
//! from the commands' own `--help`, so that the document cannot drift from the binary.

use std::time::Duration;

/// The command did what it was asked.
pub const EXIT_OK: u8 = 0;
/// It failed: the server refused, a file was unreadable, a check did not pass.
pub const EXIT_FAILED: u8 = 1;
/// The command line was wrong: an unknown flag, a missing argument, a value that does not parse
/// (clap's own code for these).
pub const EXIT_USAGE: u8 = 2;
/// The server could not be reached at all: nothing listens there, the name does not resolve, or
/// the TLS handshake failed. A script can tell "try again later" from "it said no".
pub const EXIT_UNREACHABLE: u8 = 3;

/// The exit codes as `--help` and the reference state them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  failed (the server refused, a check did not pass, a file could not be read)
  2  usage (an unknown flag, a missing argument, a value that does not parse)
  3  the server could not be reached (refused, no such host, TLS handshake failed, no answer
     in time)";

/// A server (or a registry) could not be reached at all: nothing listens there, the name does
/// not resolve, the TLS handshake failed, or nothing answered in time. The commands exit with
/// [`EXIT_UNREACHABLE`] for an error whose chain holds one. The text is the whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Whole units of `unit` in `d`, at least 1 when `d` is not zero: a small duration never turns
/// into 0, which the admin API reads as "none" or refuses.
pub fn whole(d: Duration, unit: Duration) -> u64 {
    let n = (d.as_nanos() / unit.as_nanos().max(1)) as u64;
    if n == 0 && !d.is_zero() { 1 } else { n }
}

/// A duration as the command lines take it: a number and a unit, `us`, `ms`, `s` or `m`
/// (`250us`, `500ms`, `10s`, `1.5m`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let (number, unit) = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number.parse().map_err(|_| format!("'{s}' is not a duration like 10s, 500ms or 250us"))?;
    let seconds = match unit {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("'{s}' has an unknown unit; use us, ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{s}': {e}"))
}

#[cfg(feature = "clap")]
mod reference {
    use clap::Command;

    /// Markdown of every visible command's long `--help`, depth first, each under a heading
    /// naming its command line. Environment values never show (they are the reader's, not the
    /// binary's), so the text is the same wherever it is made.
    pub fn reference(root: &Command, title: &str, preface: &str) -> String {
        let mut root = quiet(root.clone());
        root.build();
        let mut out = format!("# {title}\n\n{preface}\n");
        section(&root, root.get_name(), &mut out);
        out
    }

    fn quiet(command: Command) -> Command {
        command.mut_args(|a| a.hide_env_values(true)).mut_subcommands(quiet)
    }

    fn section(command: &Command, line: &str, out: &mut String) {
        let help = command.clone().render_long_help().to_string();
        let help: Vec<&str> = help.lines().map(str::trim_end).collect();
        out.push_str(&format!("\n## `{line}`\n\n```text\n{}\n```\n", help.join("\n").trim_end()));
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            section(sub, &format!("{line} {}", sub.get_name()), out);
        }
    }

    /// Each visible command without a description and each visible flag or argument without help
    /// text, as `kiln model set --instances`.
    pub fn undocumented(root: &Command) -> Vec<String> {
        let mut root = root.clone();
        root.build();
        let mut missing = Vec::new();
        walk(&root, root.get_name(), &mut missing);
        missing
    }

    /// Each visible command that runs something (one without subcommands) whose help shows no
    /// `Examples:` of its own.
    pub fn without_examples(root: &Command) -> Vec<String> {
        fn leaves(command: &Command, line: &str, out: &mut Vec<String>) {
            let subcommands: Vec<&Command> = command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").collect();
            if subcommands.is_empty() {
                let help = command.get_after_help().or(command.get_after_long_help()).map(ToString::to_string).unwrap_or_default();
                if !help.lines().any(|l| l == "Examples:") {
                    out.push(line.to_owned());
                }
            }
            for sub in subcommands {
                leaves(sub, &format!("{line} {}", sub.get_name()), out);
            }
        }
        let mut root = root.clone();
        root.build();
        let mut out = Vec::new();
        leaves(&root, root.get_name(), &mut out);
        out
    }

    fn walk(command: &Command, line: &str, missing: &mut Vec<String>) {
        if command.get_about().is_none() && command.get_long_about().is_none() {
            missing.push(line.to_owned());
        }
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                let name = arg.get_long().map_or_else(|| id.to_uppercase(), |l| format!("--{l}"));
                missing.push(format!("{line} {name}"));
            }
        }
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            walk(sub, &format!("{line} {}", sub.get_name()), missing);
        }
    }
}

#[cfg(feature = "clap")]
pub use reference::{reference, undocumented, without_examples};

/// For a test: `file` (a generated reference page) holds `made`; with `KILN_BLESS` set, it is
/// written first. A page that differs fails, naming `bless`, the command that rewrites it.
pub fn check_reference(file: &std::path::Path, made: &str, bless: &str) {
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(file, made).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    }
    let kept = std::fs::read_to_string(file).unwrap_or_default();
    assert!(kept == made, "{} differs from the binary's --help: run {bless}", file.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_every_unit() {
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn whole_units_never_round_a_small_duration_to_zero() {
        assert_eq!(whole(Duration::from_micros(1500), Duration::from_millis(1)), 1);
        assert_eq!(whole(Duration::from_nanos(300), Duration::from_micros(1)), 1);
        assert_eq!(whole(Duration::from_secs(2), Duration::from_millis(1)), 2000);
        assert_eq!(whole(Duration::ZERO, Duration::from_millis(1)), 0);
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert_eq!(parse_duration("ten").expect_err("refused"), "'ten' is not a duration like 10s, 500ms or 250us");
        assert_eq!(parse_duration("3h").expect_err("refused"), "'3h' has an unknown unit; use us, ms, s or m");
        assert!(parse_duration("-1s").is_err());
    }
}
