//! The text forms of API keys: the `Authorization` header a client sends, and the one line per
//! key the state directory keeps. Parsing only; hashing and checking stay with the runtime.
//!
//! A key is `kiln_<id>_<secret>`: a 16-digit lowercase hex id and a URL-safe secret. A record
//! line is `v1 <id> <salt, base64> <tag, base64> <created, unix seconds>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Every key starts with this.
pub const PREFIX: &str = "kiln_";
const RECORD_VERSION: &str = "v1";
/// Longest secret accepted; issued ones are 43 characters.
pub const MAX_SECRET: usize = 128;

/// Why an `Authorization` header names no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    Malformed,
}

/// The key id and secret of `Authorization: Bearer kiln_<id>_<secret>`.
pub fn parse_bearer(authorization: Option<&str>) -> Result<(&str, &str), TokenError> {
    let value = authorization.ok_or(TokenError::Missing)?.trim();
    let (scheme, key) = value.split_once(' ').ok_or(TokenError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed);
    }
    let rest = key.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed)?;
    if !is_key_id(id) || secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(TokenError::Malformed);
    }
    Ok((id, secret))
}

/// 16 lowercase hex digits.
pub fn is_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// One key as the state directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub salt: [u8; 16],
    /// HMAC-SHA256 of the secret under `salt`.
    pub tag: [u8; 32],
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Record {
    pub fn to_line(&self) -> String {
        format!(
            "{RECORD_VERSION} {} {} {} {}",
            self.id,
            STANDARD.encode(self.salt),
            STANDARD.encode(self.tag),
            self.created
        )
    }

    /// A record line, or `None` for anything else (a damaged or foreign line).
    pub fn parse_line(line: &str) -> Option<Record> {
        let mut parts = line.split_ascii_whitespace();
        if parts.next()? != RECORD_VERSION {
            return None;
        }
        let id = parts.next()?.to_owned();
        let salt = <[u8; 16]>::try_from(STANDARD.decode(parts.next()?).ok()?).ok()?;
        let tag = <[u8; 32]>::try_from(STANDARD.decode(parts.next()?).ok()?).ok()?;
        let created = parts.next()?.parse().ok()?;
        (is_key_id(&id) && parts.next().is_none()).then_some(Record { id, salt, tag, created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_parse_and_malformed_ones_are_refused() {
        let good = format!("Bearer {PREFIX}0123456789abcdef_secret");
        assert_eq!(parse_bearer(Some(&good)), Ok(("0123456789abcdef", "secret")));
        assert_eq!(parse_bearer(Some("bearer   kiln_0123456789abcdef_s  ")), Ok(("0123456789abcdef", "s")));
        assert_eq!(parse_bearer(None), Err(TokenError::Missing));
        for bad in ["Basic kiln_0123456789abcdef_s", "Bearer kiln_0123456789ABCDEF_s", "Bearer kiln_0123_s",
            "Bearer kiln_0123456789abcdef_", "Bearer", "Bearer x_0123456789abcdef_s"] {
            assert_eq!(parse_bearer(Some(bad)), Err(TokenError::Malformed), "{bad}");
        }
        let long = format!("Bearer kiln_0123456789abcdef_{}", "s".repeat(MAX_SECRET + 1));
        assert_eq!(parse_bearer(Some(&long)), Err(TokenError::Malformed));
    }

    #[test]
    fn record_lines_round_trip_and_damaged_ones_are_skipped() {
        let record = Record { id: "0123456789abcdef".into(), salt: [7; 16], tag: [9; 32], created: 42 };
        assert_eq!(Record::parse_line(&record.to_line()), Some(record.clone()));
        let line = record.to_line();
        assert_eq!(Record::parse_line(&format!("{line} extra")), None);
        assert_eq!(Record::parse_line(&line.replace("v1", "v2")), None);
        assert_eq!(Record::parse_line(&line[..line.len() - " 42".len()]), None, "no creation time");
        assert_eq!(Record::parse_line(&line.replace("0123456789abcdef", "0123456789ABCDEF")), None);
    }
}
