//! Handlers in OCI registries: `kiln push` and `kiln pull`, and the config's
//! `component = "oci://REGISTRY/REPO@sha256:…"`, fetched once into the cache and verified.
//!
//! The artifact is the CNCF WebAssembly layout (`kiln_codec::oci`): a
//! `application/vnd.wasm.config.v0+json` config naming the component's imports and exports, and
//! one `application/wasm` layer; a handler's signature (`kiln sign`) rides in the manifest's
//! `dev.kiln.signature` annotation, so `wkg` and Spin pull the same artifact. The registry is
//! spoken to by `oci-client` (rustls on ring); credentials come from a Docker `config.json`
//! (what `docker login` writes and what a Kubernetes pull secret holds), extra CA certificates
//! from a PEM file.
//!
//! What is fetched is trusted only once verified: the manifest's bytes against the pinned
//! digest, the layer against the manifest's digest for it (`oci-client` checks as it reads, and
//! so does this file), and, where the tenant has a signing key, the signature against the
//! handler as the config deploys it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use kiln_codec::oci::{CONFIG_MEDIA_TYPE, HandlerManifest, LAYER_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, OciRef, Pin, SIGNATURE_ANNOTATION};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::files::sha256_hex;

/// The largest component pulled (the admin API's default limit for a deploy).
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// How Kiln reaches registries: credentials by registry and extra trusted CAs.
#[derive(Clone, Default)]
pub struct Access {
    /// `user:password` by registry host (`host` or `host:port`).
    credentials: HashMap<String, (String, String)>,
    /// PEM certificates trusted besides the public roots built into kiln (Mozilla's, from webpki-roots).
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Access {
    /// Names the registries it has credentials for, never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("registries", &self.credentials.keys().collect::<Vec<_>>()).field("extra_ca", &self.ca_pem.is_some()).finish()
    }
}

impl Access {
    /// Reads credentials from a Docker `config.json` (`auth_file`, else `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json` where one exists) and CA certificates from `ca_file`.
    pub fn load(auth_file: Option<&Path>, ca_file: Option<&Path>) -> anyhow::Result<Access> {
        let default_auth = || {
            let dir = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
            Some(dir.join("config.json")).filter(|f| f.is_file())
        };
        let credentials = match auth_file.map(Path::to_path_buf).or_else(default_auth) {
            Some(file) => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read registry credentials {}", file.display()))?;
                docker_credentials(&text).with_context(|| format!("{}: not a Docker config.json", file.display()))?
            }
            None => HashMap::new(),
        };
        let ca_pem = match ca_file {
            Some(file) => {
                let pem = std::fs::read(file).with_context(|| format!("cannot read the registry CA {}", file.display()))?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    anyhow::bail!("{}: no PEM certificate in it", file.display());
                }
                Some(pem)
            }
            None => None,
        };
        Ok(Access { credentials, ca_pem })
    }

    fn client(&self) -> anyhow::Result<Client> {
        Client::try_from(ClientConfig {
            protocol: ClientProtocol::Https,
            extra_root_certificates: self
                .ca_pem
                .iter()
                .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                .collect(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..ClientConfig::default()
        })
        .map_err(|e| anyhow::anyhow!("cannot set up the registry client (registry_ca?): {e}"))
    }

    fn auth(&self, registry: &str) -> RegistryAuth {
        match self.credentials.get(registry) {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// `{"auths": {"REGISTRY": {"auth": base64("user:password")} | {"username", "password"}}}`.
fn docker_credentials(text: &str) -> anyhow::Result<HashMap<String, (String, String)>> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: File = serde_json::from_str(text)?;
    let mut credentials = HashMap::new();
    for (registry, entry) in file.auths {
        let pair = match (entry.auth, entry.username, entry.password) {
            (Some(auth), _, _) => {
                let decoded = crate::tenancy::keys::decode_base64(&auth)
                    .and_then(|b| String::from_utf8(b).ok())
                    .with_context(|| format!("auths.{registry}.auth is not base64 of user:password"))?;
                let (user, password) = decoded.split_once(':').with_context(|| format!("auths.{registry}.auth has no ':'"))?;
                (user.to_owned(), password.to_owned())
            }
            (None, Some(user), Some(password)) => (user, password),
            _ => continue,
        };
        let host = registry.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
        let host = host.split('/').next().unwrap_or(host);
        // `docker login` writes Docker Hub as index.docker.io; references name docker.io.
        let host = if host == "index.docker.io" || host == "registry-1.docker.io" { "docker.io" } else { host };
        credentials.insert(host.to_owned(), pair);
    }
    Ok(credentials)
}

fn reference(r: &OciRef) -> Reference {
    match &r.pin {
        Pin::Digest(d) => Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone()),
        Pin::Tag(t) => Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone()),
    }
}

/// A registry's refusal or failure, said in terms of the reference.
fn registry_error(r: &OciRef, what: &str, e: oci_client::errors::OciDistributionError) -> anyhow::Error {
    use oci_client::errors::OciDistributionError as E;
    let why = match &e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => format!(
            "{} refused the credentials (401): check its entry in the registry credentials file",
            r.registry
        ),
        E::ImageManifestNotFoundError(_) => format!("{r}: not in {} (404)", r.registry),
        E::RegistryError { envelope, .. } if envelope.errors.iter().any(|x| format!("{:?}", x.code).contains("Unknown")) => {
            format!("{r}: not in {} ({})", r.registry, envelope.errors.iter().map(|x| x.message.clone()).collect::<Vec<_>>().join("; "))
        }
        E::RequestError(inner) if inner.is_connect() || inner.is_timeout() => {
            let why = format!("{what} {r}: cannot reach {} ({})", r.registry, full_chain(inner));
            return kiln_wire::cli::Unreachable(why).into();
        }
        E::RequestError(inner) => format!("{} broke off ({})", r.registry, full_chain(inner)),
        other => format!("{other}"),
    };
    anyhow::anyhow!("{what} {r}: {why}")
}

fn full_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The component's own imports and exports, for the artifact's config.
pub fn world_of(component: &[u8]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    use wasmparser::{Encoding, Parser, Payload};
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(component) {
        match payload.context("not a WebAssembly component")? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    anyhow::bail!("a core module, not a component: build it for wasm32-wasip2");
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    imports.push(import?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    exports.push(export?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

/// Pushes `component` to `to` (a tag or a digest) in the WebAssembly artifact layout, with
/// `signature` attached; returns the manifest's digest, which pins it.
pub async fn push(access: &Access, component: Vec<u8>, to: &OciRef, signature: Option<&str>) -> anyhow::Result<String> {
    let (imports, exports) = world_of(&component)?;
    let created = rfc3339_now();
    let layer_digest = format!("sha256:{}", sha256_hex(&component));
    let config = serde_json::to_vec(&serde_json::json!({
        "created": created,
        "author": null,
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer_digest],
        "component": { "exports": exports, "imports": imports, "target": null },
    }))?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let mut annotations = serde_json::Map::new();
    annotations.insert("org.opencontainers.image.created".into(), created.into());
    if let Some(signature) = signature {
        annotations.insert(SIGNATURE_ANNOTATION.into(), signature.trim().into());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": component.len() }],
        "annotations": annotations,
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let client = access.client()?;
    let image = reference(to);
    client.store_auth_if_needed(image.resolve_registry(), &access.auth(&to.registry)).await;
    client.push_blob(&image, &component, &layer_digest).await.map_err(|e| registry_error(to, "cannot push to", e))?;
    client.push_blob(&image, &config, &config_digest).await.map_err(|e| registry_error(to, "cannot push to", e))?;
    let content_type = http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
    client.push_manifest_raw(&image, manifest, content_type).await.map_err(|e| registry_error(to, "cannot push to", e))?;
    Ok(manifest_digest)
}

/// A handler fetched from a registry, verified against its digests.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest's digest: what pins it.
    pub digest: String,
    /// The manifest's bytes, which the digest covers.
    pub raw_manifest: Vec<u8>,
    pub manifest: HandlerManifest,
    pub component: Vec<u8>,
}

/// How long a pull may take in all, however slowly the registry answers.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// Pulls the handler `from` names: its manifest (checked against the pinned digest), then its
/// one component layer (checked against the manifest, and never more bytes than it gives),
/// within [`PULL_TIMEOUT`].
pub async fn pull(access: &Access, from: &OciRef) -> anyhow::Result<Pulled> {
    tokio::time::timeout(PULL_TIMEOUT, pull_within(access, from))
        .await
        .map_err(|_| anyhow::anyhow!("cannot pull {from}: {} gave no complete answer within {PULL_TIMEOUT:?}", from.registry))?
}

async fn pull_within(access: &Access, from: &OciRef) -> anyhow::Result<Pulled> {
    let client = access.client()?;
    let image = reference(from);
    let (raw, _) = client
        .pull_manifest_raw(&image, &access.auth(&from.registry), &[MANIFEST_MEDIA_TYPE])
        .await
        .map_err(|e| registry_error(from, "cannot pull", e))?;
    let digest = format!("sha256:{}", sha256_hex(&raw));
    if let Some(pinned) = from.digest()
        && pinned != digest
    {
        anyhow::bail!("cannot pull {from}: the registry's manifest has digest {digest}, not the pinned one");
    }
    let manifest = HandlerManifest::parse(&raw).with_context(|| format!("cannot pull {from}"))?;
    if manifest.component.size > MAX_COMPONENT_BYTES {
        anyhow::bail!("cannot pull {from}: its component is {} bytes, more than {MAX_COMPONENT_BYTES}", manifest.component.size);
    }
    let mut component = Bounded { bytes: Vec::with_capacity(manifest.component.size as usize), limit: manifest.component.size as usize };
    let layer = oci_client::manifest::OciDescriptor {
        media_type: manifest.component.media_type.clone(),
        digest: manifest.component.digest.clone(),
        size: manifest.component.size as i64,
        ..Default::default()
    };
    client.pull_blob(&image, &layer, &mut component).await.map_err(|e| registry_error(from, "cannot pull", e))?;
    let component = component.bytes;
    let got = format!("sha256:{}", sha256_hex(&component));
    if got != manifest.component.digest {
        anyhow::bail!("cannot pull {from}: its component has digest {got}, not the manifest's {}", manifest.component.digest);
    }
    Ok(Pulled { digest, raw_manifest: raw, manifest, component })
}

/// A layer's bytes as they arrive, refused past the size its manifest gives: a registry cannot
/// make Kiln hold more than it asked for.
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            let limit = self.limit;
            return std::task::Poll::Ready(Err(std::io::Error::other(format!("the layer is longer than the {limit} bytes its manifest gives"))));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The cache of pulled handlers: `DIR/sha256-HEX.manifest` (the manifest's bytes) and
/// `DIR/sha256-HEX.wasm` (its component), by manifest digest. Both are verified again whenever
/// they are used, so a restart needs no registry and a changed file is never served.
pub struct HandlerCache {
    dir: PathBuf,
}

impl HandlerCache {
    pub fn new(dir: PathBuf) -> HandlerCache {
        HandlerCache { dir }
    }

    fn paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        let stem = digest.replace(':', "-");
        (self.dir.join(format!("{stem}.manifest")), self.dir.join(format!("{stem}.wasm")))
    }

    /// The handler `digest` pins, if it is here and still what was pulled.
    pub fn get(&self, digest: &str) -> Option<(HandlerManifest, PathBuf)> {
        let (manifest_path, wasm_path) = self.paths(digest);
        let raw = std::fs::read(&manifest_path).ok()?;
        if format!("sha256:{}", sha256_hex(&raw)) != digest {
            return None;
        }
        let manifest = HandlerManifest::parse(&raw).ok()?;
        let component = std::fs::read(&wasm_path).ok()?;
        (format!("sha256:{}", sha256_hex(&component)) == manifest.component.digest).then_some((manifest, wasm_path))
    }

    /// The handler `reference` names, from the cache or else pulled into it; tags are resolved
    /// each time (that is what makes them unpinned). Returns its digest, manifest and file.
    pub async fn fetch(&self, access: &Access, reference: &OciRef) -> anyhow::Result<(String, HandlerManifest, PathBuf)> {
        if let Some(digest) = reference.digest()
            && let Some((manifest, path)) = self.get(digest)
        {
            return Ok((digest.to_owned(), manifest, path));
        }
        let pulled = pull(access, reference).await?;
        let (manifest_path, wasm_path) = self.paths(&pulled.digest);
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        // Component first, manifest last: a manifest in the cache means its component is whole.
        crate::files::write_atomic(&wasm_path, &pulled.component)?;
        crate::files::write_atomic(&manifest_path, &pulled.raw_manifest)?;
        Ok((pulled.digest, pulled.manifest, wasm_path))
    }
}

/// A config handler's component from its registry (or the cache): pinned by digest unless
/// `allow_unpinned`, and, where its tenant has a signing key, signed by it for exactly this
/// handler (`kiln sign` with the config's name, tenant, models and priorities). Returns the file.
pub async fn fetch_for_config(
    cache: &HandlerCache,
    access: &Access,
    name: &str,
    tenant: &crate::tenancy::TenantConfig,
    reference: &OciRef,
    settings: &super::HandlerSettings,
    allow_unpinned: bool,
) -> anyhow::Result<PathBuf> {
    if let Pin::Tag(tag) = &reference.pin
        && !allow_unpinned
    {
        anyhow::bail!(
            "handler '{name}': {reference} names tag '{tag}', which its registry can move: pin the manifest digest \
             (`kiln pull {reference}` prints it), or, outside cluster mode, start with --allow-unpinned"
        );
    }
    let (digest, manifest, path) = cache.fetch(access, reference).await.with_context(|| format!("handler '{name}'"))?;
    if let Some(public) = &tenant.signing_key {
        let signature = manifest.signature.as_deref().with_context(|| {
            format!(
                "handler '{name}': tenant '{}' requires signed components, and {} carries no {SIGNATURE_ANNOTATION} \
                 annotation (`kiln push --signature`)",
                tenant.name,
                reference.at(&digest)
            )
        })?;
        let sha256 = manifest.component.digest.trim_start_matches("sha256:");
        let signed = settings.signed_manifest(name, &tenant.name, sha256);
        let valid = crate::tenancy::keys::decode_base64(signature)
            .is_some_and(|sig| crate::tenancy::keys::verify_signature(public, signed.as_bytes(), &sig));
        if !valid {
            anyhow::bail!(
                "handler '{name}': the signature on {} does not verify against tenant '{}'s signing key for this component as \
                 handler '{name}' with the config's models and priorities",
                reference.at(&digest),
                tenant.name
            );
        }
    }
    if reference.digest().is_none() {
        tracing::warn!(handler = name, "{reference} resolved to {digest}; pin it in the config");
    }
    tracing::info!(handler = name, "component {} ({} bytes)", reference.at(&digest), manifest.component.size);
    Ok(path)
}

/// Now as `2026-12-06T15:28:31Z`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_as_docker_writes_them() {
        let text = r#"{"auths": {"https://127.0.0.1:5000/v2/": {"auth": "a2lsbjpzM2NyZXQ="},
                        "ghcr.io": {"username": "u", "password": "p"}, "empty.example": {}}}"#;
        let got = docker_credentials(text).expect("config.json");
        assert_eq!(got.get("127.0.0.1:5000"), Some(&("kiln".to_owned(), "s3cret".to_owned())));
        assert_eq!(got.get("ghcr.io"), Some(&("u".to_owned(), "p".to_owned())));
        assert_eq!(got.len(), 2);
        assert!(docker_credentials(r#"{"auths": {"r": {"auth": "bm8tY29sb24="}}}"#).is_err());
    }

    #[test]
    fn the_artifact_config_names_the_component_s_world_and_refuses_a_core_module() {
        let component = wat::parse_str(
            r#"(component (import "wasi:cli/environment@0.2.0" (instance)) (core module) (export "greet" (core module 0)))"#,
        )
        .expect("a component");
        let (imports, exports) = world_of(&component).expect("a component");
        assert_eq!(imports, ["wasi:cli/environment@0.2.0"]);
        assert_eq!(exports, ["greet"]);
        let module = wat::parse_str("(module)").expect("module");
        assert!(world_of(&module).expect_err("core").to_string().contains("core module"));
        assert!(world_of(b"not wasm").is_err());
        let now = rfc3339_now();
        assert_eq!((now.len(), &now[4..5], &now[10..11], &now[19..]), (20, "-", "T", "Z"), "{now}");
    }
}
