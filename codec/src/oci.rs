//! Handlers in OCI registries: the reference a config names (`oci://REGISTRY/REPO@sha256:…`, or
//! `:TAG` where unpinned sources are allowed), and the manifest a registry answers with, read
//! as the untrusted input it is. The artifact is the CNCF WebAssembly OCI layout that `wkg` and
//! Spin read: a `application/vnd.wasm.config.v0+json` config and one `application/wasm` layer.

use serde::Deserialize;

/// The manifest's own media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config blob's media type in the WebAssembly artifact layout.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The component's layer.
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The manifest annotation holding a handler's Ed25519 signature (`kiln sign`), base64.
pub const SIGNATURE_ANNOTATION: &str = "dev.kiln.signature";
/// Largest manifest read: a handler's manifest is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// What a reference pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// A manifest digest: `sha256:` and 64 lowercase hex digits.
    Digest(String),
    /// A tag, which a registry may move: allowed only where unpinned sources are.
    Tag(String),
}

/// `oci://REGISTRY/REPOSITORY@sha256:…` or `oci://REGISTRY/REPOSITORY:TAG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host` or `host:port`.
    pub registry: String,
    /// `path/of/repo`, lowercase.
    pub repository: String,
    pub pin: Pin,
}

/// Why a reference or a manifest cannot be read; each names what it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    #[error("'{0}' is not an OCI reference: write oci://REGISTRY/REPOSITORY@sha256:DIGEST (or :TAG)")]
    NotOci(String),
    #[error("'{text}': {reason}")]
    Reference { text: String, reason: String },
    #[error("the manifest is {0} bytes, more than a handler's manifest can be ({MAX_MANIFEST_BYTES})")]
    ManifestTooLarge(usize),
    #[error("the manifest is not an OCI image manifest: {0}")]
    Manifest(String),
}

impl OciRef {
    /// Reads `oci://…` (the scheme is required: a config's `component` is otherwise a path).
    pub fn parse(text: &str) -> Result<OciRef, OciError> {
        let rest = text.strip_prefix("oci://").ok_or_else(|| OciError::NotOci(text.to_owned()))?;
        let bad = |reason: &str| OciError::Reference { text: text.to_owned(), reason: reason.to_owned() };
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository after the registry"))?;
        if registry.is_empty() || !registry.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')) {
            return Err(bad("the registry must be a host name or address, with an optional :port"));
        }
        let (repository, pin) = if let Some((repository, digest)) = path.split_once('@') {
            (repository, Pin::Digest(parse_digest(digest).map_err(|r| bad(&r))?))
        } else {
            // A tag follows the last ':' that is after the last '/'.
            let slash = path.rfind('/').map_or(0, |i| i + 1);
            match path[slash..].rfind(':') {
                Some(i) => {
                    let (repository, tag) = (&path[..slash + i], &path[slash + i + 1..]);
                    if !valid_tag(tag) {
                        return Err(bad("a tag is 1 to 128 of A-Z a-z 0-9 _ . - and does not start with . or -"));
                    }
                    (repository, Pin::Tag(tag.to_owned()))
                }
                None => return Err(bad("no @sha256:DIGEST or :TAG: pin the handler's manifest digest")),
            }
        };
        if !valid_repository(repository) {
            return Err(bad("a repository is lowercase path components of a-z 0-9 separated by . _ __ - or /"));
        }
        Ok(OciRef { registry: registry.to_owned(), repository: repository.to_owned(), pin })
    }

    /// The digest pinned, if any.
    pub fn digest(&self) -> Option<&str> {
        match &self.pin {
            Pin::Digest(d) => Some(d),
            Pin::Tag(_) => None,
        }
    }

    /// The same repository pinned to `digest`.
    pub fn at(&self, digest: &str) -> OciRef {
        OciRef { registry: self.registry.clone(), repository: self.repository.clone(), pin: Pin::Digest(digest.to_owned()) }
    }

    /// `REGISTRY/REPOSITORY@sha256:…` or `…:TAG`, without the scheme (as registries' tools write it).
    pub fn without_scheme(&self) -> String {
        match &self.pin {
            Pin::Digest(d) => format!("{}/{}@{d}", self.registry, self.repository),
            Pin::Tag(t) => format!("{}/{}:{t}", self.registry, self.repository),
        }
    }
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}", self.without_scheme())
    }
}

/// `sha256:` and 64 hex digits, lowercased.
pub fn parse_digest(text: &str) -> Result<String, String> {
    let hex = text.strip_prefix("sha256:").ok_or_else(|| format!("'{text}' is not a sha256: digest"))?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("'{text}' is not sha256: and 64 hex digits"));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

fn valid_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && !tag.starts_with(['.', '-'])
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_repository(repository: &str) -> bool {
    !repository.is_empty()
        && repository.len() <= 255
        && repository.split('/').all(|part| {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        })
}

/// A blob the manifest points at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// What Kiln needs of a handler's manifest: its one component layer and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerManifest {
    pub config: Descriptor,
    /// The `application/wasm` layer.
    pub component: Descriptor,
    /// The `dev.kiln.signature` annotation, where the pusher attached one.
    pub signature: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

impl HandlerManifest {
    /// Reads a manifest's bytes: an OCI image manifest whose config is the WebAssembly config
    /// and with exactly one `application/wasm` layer, with digests that are digests.
    pub fn parse(bytes: &[u8]) -> Result<HandlerManifest, OciError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(OciError::ManifestTooLarge(bytes.len()));
        }
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| OciError::Manifest(e.to_string()))?;
        if raw.schema_version != 2 {
            return Err(OciError::Manifest(format!("schemaVersion {} (2 expected)", raw.schema_version)));
        }
        if let Some(media_type) = raw.media_type.as_deref()
            && media_type != MANIFEST_MEDIA_TYPE
        {
            return Err(OciError::Manifest(format!("mediaType '{media_type}' ({MANIFEST_MEDIA_TYPE} expected)")));
        }
        if raw.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(OciError::Manifest(format!(
                "config mediaType '{}': not a WebAssembly artifact ({CONFIG_MEDIA_TYPE} expected)",
                raw.config.media_type
            )));
        }
        let mut wasm = raw.layers.into_iter().filter(|l| l.media_type == LAYER_MEDIA_TYPE);
        let component = match (wasm.next(), wasm.next()) {
            (Some(layer), None) => layer,
            (None, _) => return Err(OciError::Manifest(format!("no {LAYER_MEDIA_TYPE} layer"))),
            (Some(_), Some(_)) => return Err(OciError::Manifest(format!("more than one {LAYER_MEDIA_TYPE} layer"))),
        };
        for descriptor in [&raw.config, &component] {
            parse_digest(&descriptor.digest).map_err(OciError::Manifest)?;
        }
        Ok(HandlerManifest { config: raw.config, component, signature: raw.annotations.get(SIGNATURE_ANNOTATION).cloned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_pin_a_digest_or_name_a_tag() {
        let r = OciRef::parse(&format!("oci://127.0.0.1:5000/kiln/digits@{D}")).expect("digest");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.digest()), ("127.0.0.1:5000", "kiln/digits", Some(D)));
        assert_eq!(r.to_string(), format!("oci://127.0.0.1:5000/kiln/digits@{D}"));
        let upper = OciRef::parse(&format!("oci://r.example/a@{}", D.to_uppercase().replace("SHA256", "sha256"))).expect("upper hex");
        assert_eq!(upper.digest(), Some(D));
        let t = OciRef::parse("oci://ghcr.io/acme/handlers/digits:v1.2").expect("tag");
        assert_eq!((t.repository.as_str(), &t.pin), ("acme/handlers/digits", &Pin::Tag("v1.2".into())));
        assert_eq!(t.at(D).to_string(), format!("oci://ghcr.io/acme/handlers/digits@{D}"));
        for (bad, says) in [
            ("digits.wasm", "not an OCI reference"),
            ("oci://registry", "no repository"),
            ("oci://registry/repo", "no @sha256"),
            ("oci://registry/Repo:v1", "lowercase"),
            ("oci://registry/repo@sha256:12", "64 hex"),
            ("oci://registry/repo@md5:0123", "not a sha256"),
            ("oci://registry/repo:-x", "a tag is"),
            ("oci://reg istry/repo:v1", "host name"),
        ] {
            let e = OciRef::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn manifest(config_type: &str, layers: &[&str], annotations: &str) -> String {
        let layers: Vec<String> = layers.iter().map(|t| format!(r#"{{"mediaType":"{t}","digest":"{D}","size":3}}"#)).collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_MEDIA_TYPE}","config":{{"mediaType":"{config_type}","digest":"{D}","size":2}},"layers":[{}]{annotations}}}"#,
            layers.join(",")
        )
    }

    #[test]
    fn a_handler_manifest_has_the_wasm_config_and_one_wasm_layer() {
        let m = HandlerManifest::parse(manifest(CONFIG_MEDIA_TYPE, &[LAYER_MEDIA_TYPE], r#","annotations":{"dev.kiln.signature":"c2ln"}"#).as_bytes())
            .expect("manifest");
        assert_eq!((m.component.digest.as_str(), m.component.size, m.signature.as_deref()), (D, 3, Some("c2ln")));
        for (text, says) in [
            (manifest("application/vnd.oci.image.config.v1+json", &[LAYER_MEDIA_TYPE], ""), "not a WebAssembly artifact"),
            (manifest(CONFIG_MEDIA_TYPE, &[], ""), "no application/wasm layer"),
            (manifest(CONFIG_MEDIA_TYPE, &[LAYER_MEDIA_TYPE, LAYER_MEDIA_TYPE], ""), "more than one"),
            (manifest(CONFIG_MEDIA_TYPE, &[LAYER_MEDIA_TYPE], "").replace(D, "sha256:zz"), "64 hex"),
            ("{}".to_owned(), "missing field"),
            (" ".repeat(MAX_MANIFEST_BYTES + 1), "more than a handler's manifest"),
        ] {
            let e = HandlerManifest::parse(text.as_bytes()).expect_err(says).to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
