//! Where a model's file comes from, as written in its `source`: a local path, an `https://` URL
//! or `hf://ORG/REPO/FILE@REVISION` on the Hugging Face hub; and its `sha256` pin. Read here,
//! for the config file, the repository API and the CLI alike; fetched by the runtime.

/// A remote model file, as written in a model's `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The source as written: `https://…` or `hf://…`.
    pub text: String,
}

/// A file on the Hugging Face hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// `ORG/REPO`.
    pub repository: String,
    /// The file's path in the repository (it may be in folders).
    pub file: String,
    /// The branch, tag or commit; `main` when none is given.
    pub revision: String,
}

/// Why a `source` or a `sha256` pin cannot be read. Each names the text it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("the source is empty")]
    Empty,
    #[error("'{0}' has no host")]
    NoHost(String),
    #[error("'{text}' is not a valid URL: {reason}")]
    Url { text: String, reason: String },
    #[error("'{text}': {reason}")]
    Hub { text: String, reason: String },
    #[error(
        "'{text}': unsupported scheme '{scheme}://'; a source is a local path, https://HOST/FILE or hf://ORG/REPO/FILE@REVISION"
    )]
    Scheme { text: String, scheme: String },
    #[error("'{0}' is not a SHA-256 digest (64 hex digits)")]
    Digest(String),
}

/// Reads a model's `source`: `Ok(None)` for a local path, the remote source otherwise, or why it
/// is neither.
pub fn parse_source(text: &str) -> Result<Option<Remote>, SourceError> {
    let remote = Some(Remote { text: text.to_owned() });
    if let Some(rest) = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://")) {
        if rest.is_empty() || rest.starts_with('/') {
            return Err(SourceError::NoHost(text.to_owned()));
        }
        url::Url::parse(text).map_err(|e| SourceError::Url { text: text.to_owned(), reason: e.to_string() })?;
        return Ok(remote);
    }
    if let Some(rest) = text.strip_prefix("hf://") {
        hub_file(rest).map_err(|reason| SourceError::Hub { text: text.to_owned(), reason })?;
        return Ok(remote);
    }
    match text.split_once("://") {
        Some((scheme, _)) => Err(SourceError::Scheme { text: text.to_owned(), scheme: scheme.to_owned() }),
        None if text.is_empty() => Err(SourceError::Empty),
        None => Ok(None),
    }
}

/// Reads a `sha256` pin: 64 hex digits, any case, with or without `sha256:`; returned in lower
/// case.
pub fn parse_digest(text: &str) -> Result<String, SourceError> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(SourceError::Digest(text.to_owned()))
    }
}

impl Remote {
    /// The file on the hub, for an `hf://` source.
    pub fn hub(&self) -> Option<HubFile> {
        hub_file(self.text.strip_prefix("hf://")?).ok()
    }

    pub fn is_hub(&self) -> bool {
        self.text.starts_with("hf://")
    }

    /// The URL fetched: an `hf://` source resolves to the file's URL at the hub's `endpoint`.
    pub fn url(&self, endpoint: &str) -> String {
        match self.hub() {
            Some(HubFile { repository, file, revision }) => {
                format!("{}/{repository}/resolve/{revision}/{file}", endpoint.trim_end_matches('/'))
            }
            None => self.text.clone(),
        }
    }
}

/// `ORG/REPO/FILE[@REVISION]` as a hub file; the revision defaults to `main`.
fn hub_file(rest: &str) -> Result<HubFile, String> {
    let (path, revision) = match rest.rsplit_once('@') {
        Some((path, revision)) if !revision.is_empty() && !revision.contains('/') => (path, revision),
        Some(_) => return Err("the revision after '@' is empty or has a '/'".to_owned()),
        None => (rest, "main"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 3 || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err("expected hf://ORG/REPO/FILE@REVISION (FILE may be in folders)".to_owned());
    }
    // The hub decodes each part before it resolves the path: `%2e%2e` is `..` there, and `%2f`
    // a folder. Judge what it will see.
    for part in parts.iter().chain([&revision]) {
        let decoded = percent_decoded(part).ok_or_else(|| format!("'{part}' has a malformed %-escape"))?;
        if decoded == "." || decoded == ".." || decoded.contains(['/', '\\']) || decoded.chars().any(char::is_control) {
            return Err(format!("'{part}' decodes to '{}', which is not a plain path part", decoded.escape_debug()));
        }
    }
    Ok(HubFile {
        repository: format!("{}/{}", parts[0], parts[1]),
        file: parts[2..].join("/"),
        revision: revision.to_owned(),
    })
}

/// `text` with its `%XX` escapes decoded (as UTF-8, lossily); `None` for a malformed escape.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_into_local_paths_urls_and_hub_files() {
        assert_eq!(parse_source("models/m.pt"), Ok(None));
        let url = parse_source("https://example.com/m.pt").expect("url").expect("remote");
        assert_eq!(url.url("https://hub.test"), "https://example.com/m.pt");
        let hub = parse_source("hf://org/repo/dir/m.pt@abc123").expect("hub").expect("remote");
        assert_eq!(hub.url("https://hub.test/"), "https://hub.test/org/repo/resolve/abc123/dir/m.pt");
        let main = parse_source("hf://org/repo/m.pt").expect("hub").expect("remote");
        assert_eq!(main.url("https://hub.test"), "https://hub.test/org/repo/resolve/main/m.pt");
        assert_eq!(main.hub().map(|h| h.revision), Some("main".to_owned()));
        assert_eq!(parse_source("s3://b/m.pt"), Err(SourceError::Scheme { text: "s3://b/m.pt".to_owned(), scheme: "s3".to_owned() }));
        for bad in ["s3://bucket/m.pt", "hf://org/m.pt", "hf://org/repo/../m.pt@x", "hf://org/repo/m.pt@", "https://", ""] {
            assert!(parse_source(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn hub_paths_are_judged_as_the_hub_decodes_them() {
        for bad in ["hf://org/repo/%2e%2e/secret.pt@main", "hf://org/%2E%2e/x/m.pt", "hf://org/repo/a%2fb.pt", "hf://org/repo/m.pt@%2e%2e", "hf://org/repo/m%zz.pt", "hf://org/repo/m%0a.pt"] {
            assert!(parse_source(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_source("hf://org/repo/my%20model.pt@v1").is_ok());
    }

    #[test]
    fn digests_are_64_hex_digits() {
        let d = "AB".repeat(32);
        assert_eq!(parse_digest(&d), Ok("ab".repeat(32)));
        assert_eq!(parse_digest(&format!("sha256:{d}")), Ok("ab".repeat(32)));
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }
}
