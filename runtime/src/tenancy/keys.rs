//! API keys and component signatures.
//!
//! An API key is `kiln_<id>_<secret>`: a 16-hex-digit id that finds the key's record, and 32
//! random bytes. Only a salted HMAC-SHA256 of the secret is ever written down (one line per key
//! in the state directory), and checking a key compares tags in constant time. Keys are random,
//! so a slow password hash would add nothing but per-request cost.
//!
//! Signatures are Ed25519 over the exact component bytes: `kiln keygen` makes a key pair,
//! `kiln sign` signs, and a tenant's `signing_key` in the config makes signatures mandatory.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use ring::hmac;

use kiln_codec::keys::{PREFIX, Record, TokenError, parse_bearer};

use crate::files::write_atomic;
use crate::sync::RwLockExt;

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// May deploy, delete and list handlers, and read every model.
    Admin,
    Tenant(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Admin => f.write_str("admin"),
            Principal::Tenant(t) => write!(f, "tenant '{t}'"),
        }
    }
}

/// What is written down for one key (its line format is kiln-codec's `Record`); the salt and
/// tag stay inside this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord(Record);

impl KeyRecord {
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Seconds since the Unix epoch.
    pub fn created(&self) -> u64 {
        self.0.created
    }

    fn matches(&self, secret: &str) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0.salt);
        hmac::verify(&key, secret.as_bytes(), &self.0.tag).is_ok()
    }
}

/// An HMAC-SHA256 tag, which is always 32 bytes.
fn tag_bytes(tag: &hmac::Tag) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes.iter_mut().zip(tag.as_ref()).for_each(|(b, t)| *b = *t);
    bytes
}

/// Makes a new key: the text to hand out once, and the record to keep.
pub fn generate() -> Result<(String, KeyRecord), KeyError> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 16];
    for buf in [&mut id[..], &mut secret[..], &mut salt[..]] {
        rng.fill(buf).map_err(|_| KeyError::Random)?;
    }
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret = URL_SAFE_NO_PAD.encode(secret);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salt), secret.as_bytes());
    let created = crate::telemetry::unix_seconds();
    let record = KeyRecord(Record { id: id.clone(), salt, tag: tag_bytes(&tag), created });
    Ok((format!("{PREFIX}{id}_{secret}"), record))
}

/// Why a key was not accepted. The reasons are safe to log: none contains the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    /// No key has this id (it was never issued, or was removed).
    UnknownId,
    /// The id is known, the secret is wrong.
    WrongSecret { principal: Principal },
}

impl AuthFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "no API key (expected Authorization: Bearer <key>)",
            AuthFailure::Malformed => "malformed API key",
            AuthFailure::UnknownId => "unknown API key",
            AuthFailure::WrongSecret { .. } => "wrong API key",
        }
    }

    /// What the client is told. An unknown id and a wrong secret read the same, so a caller
    /// cannot learn which key ids exist.
    pub fn public_message(&self) -> &'static str {
        match self {
            AuthFailure::Missing | AuthFailure::Malformed => self.reason(),
            AuthFailure::UnknownId | AuthFailure::WrongSecret { .. } => "invalid API key",
        }
    }

    /// The tenant the presented key claimed to be, when its id was known.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            AuthFailure::WrongSecret { principal } => Some(principal),
            _ => None,
        }
    }
}

/// Every key the server accepts, by id.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    by_id: HashMap<String, (Principal, KeyRecord)>,
}

impl KeyRing {
    /// Reads the admin keys and the keys of every tenant in `tenants` from `state_dir`.
    /// Lines that cannot be read are skipped with a warning; a missing file is no keys.
    pub fn load<'a>(state_dir: &Path, tenants: impl IntoIterator<Item = &'a str>) -> KeyRing {
        let mut ring = KeyRing::default();
        let mut add = |principal: Principal, file: PathBuf| {
            for record in read_records(&file) {
                ring.by_id.insert(record.id().to_owned(), (principal.clone(), record));
            }
        };
        add(Principal::Admin, admin_keys_file(state_dir));
        for tenant in tenants {
            add(Principal::Tenant(tenant.to_owned()), tenant_keys_file(state_dir, tenant));
        }
        ring
    }

    /// Checks an `Authorization` header value.
    pub fn verify(&self, authorization: Option<&str>) -> Result<&Principal, AuthFailure> {
        let (id, secret) = parse_bearer(authorization).map_err(|e| match e {
            TokenError::Missing => AuthFailure::Missing,
            TokenError::Malformed => AuthFailure::Malformed,
        })?;
        // An unknown id is checked against a decoy record, so both failures take one path and
        // the same time (one HMAC).
        let found = self.by_id.get(id);
        let record: &KeyRecord = match found {
            Some((_, record)) => record,
            None => decoy(),
        };
        let matches = record.matches(secret);
        match found {
            Some((principal, _)) if matches => Ok(principal),
            Some((principal, _)) => Err(AuthFailure::WrongSecret {
                principal: principal.clone(),
            }),
            None => Err(AuthFailure::UnknownId),
        }
    }

    pub fn has_admin_key(&self) -> bool {
        self.by_id.values().any(|(p, _)| *p == Principal::Admin)
    }

    /// How many keys each principal has.
    pub fn count(&self, principal: &Principal) -> usize {
        self.by_id.values().filter(|(p, _)| p == principal).count()
    }
}

/// The key ring being served: what a request's key is checked against, read again from the state
/// directory whenever a key file changes (`kiln tenant add-key` and `remove-key` write them while
/// the server runs). It owns its lock, as `ModelTable` owns the table's.
#[derive(Debug)]
pub struct LiveKeys {
    state_dir: PathBuf,
    tenants: Vec<String>,
    current: std::sync::RwLock<std::sync::Arc<KeyRing>>,
}

impl LiveKeys {
    /// Reads the admin keys and `tenants`' keys from `state_dir`.
    pub fn load(state_dir: &Path, tenants: Vec<String>) -> LiveKeys {
        let ring = KeyRing::load(state_dir, tenants.iter().map(String::as_str));
        LiveKeys { state_dir: state_dir.to_owned(), tenants, current: std::sync::RwLock::new(std::sync::Arc::new(ring)) }
    }

    /// The ring as it is now; a reload does not change it.
    pub fn current(&self) -> std::sync::Arc<KeyRing> {
        std::sync::Arc::clone(&self.current.reading())
    }

    /// Reads the keys again every `every` while the runtime runs, whenever a key file changed (by
    /// content: a removal and an addition within one second, at the same size, count).
    pub fn watch(self: &std::sync::Arc<Self>, every: std::time::Duration) {
        let keys = std::sync::Arc::clone(self);
        let files = std::iter::once(Principal::Admin)
            .chain(self.tenants.iter().map(|t| Principal::Tenant(t.clone())))
            .map(|p| keys_file(&self.state_dir, &p))
            .collect();
        crate::files::watch(files, every, "the key files", move || {
            let ring = KeyRing::load(&keys.state_dir, keys.tenants.iter().map(String::as_str));
            tracing::info!("key files changed; keys reloaded");
            *keys.current.writing() = std::sync::Arc::new(ring);
            Ok(())
        });
    }
}

/// A record no secret matches (its tag is zeros under a random salt): what an unknown key id is
/// checked against.
fn decoy() -> &'static KeyRecord {
    static DECOY: std::sync::OnceLock<KeyRecord> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut salt = [0u8; 16];
        // Without randomness the decoy still costs one HMAC; it never matches either way.
        let _ = SystemRandom::new().fill(&mut salt);
        KeyRecord(Record { id: "0000000000000000".to_owned(), salt, tag: [0; 32], created: 0 })
    })
}

pub fn admin_keys_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.keys")
}

pub fn tenant_keys_file(state_dir: &Path, tenant: &str) -> PathBuf {
    state_dir.join("tenant-keys").join(format!("{tenant}.keys"))
}

/// The key file of a principal.
pub fn keys_file(state_dir: &Path, principal: &Principal) -> PathBuf {
    match principal {
        Principal::Admin => admin_keys_file(state_dir),
        Principal::Tenant(t) => tenant_keys_file(state_dir, t),
    }
}

fn read_records(file: &Path) -> Vec<KeyRecord> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read key file {}: {e}", file.display());
            return Vec::new();
        }
    };
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        match Record::parse_line(line).map(KeyRecord) {
            Some(record) => records.push(record),
            None => tracing::warn!("{}:{}: not a key record; skipped", file.display(), n + 1),
        }
    }
    records
}

/// The records of one principal, oldest first.
pub fn list(state_dir: &Path, principal: &Principal) -> Vec<KeyRecord> {
    read_records(&keys_file(state_dir, principal))
}

/// Holds the state directory's key lock: `kiln tenant add-key` and `remove-key` read, change and
/// rewrite a key file, and two of them at once would each drop the other's change.
struct KeysLock(std::fs::File);

impl KeysLock {
    fn take(state_dir: &Path) -> Result<KeysLock, KeyError> {
        let path = state_dir.join("keys.lock");
        let locked = std::fs::create_dir_all(state_dir)
            .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path))
            .and_then(|file| file.lock().map(|()| file));
        locked.map(KeysLock).map_err(|source| KeyError::Write { file: path, source })
    }
}

impl Drop for KeysLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Adds a new key for `principal` and returns its text; only its record is written.
pub fn add(state_dir: &Path, principal: &Principal) -> Result<String, KeyError> {
    let _lock = KeysLock::take(state_dir)?;
    let file = keys_file(state_dir, principal);
    let (key, record) = generate()?;
    let mut records = read_records(&file);
    records.push(record);
    write_records(&file, &records)?;
    Ok(key)
}

/// Removes the key with `id`; false when there was none.
pub fn remove(state_dir: &Path, principal: &Principal, id: &str) -> Result<bool, KeyError> {
    let _lock = KeysLock::take(state_dir)?;
    let file = keys_file(state_dir, principal);
    let mut records = read_records(&file);
    let before = records.len();
    records.retain(|r| r.id() != id);
    if records.len() == before {
        return Ok(false);
    }
    write_records(&file, &records)?;
    Ok(true)
}

fn write_records(file: &Path, records: &[KeyRecord]) -> Result<(), KeyError> {
    let mut text = String::from("# Kiln API key hashes (salted HMAC-SHA256). Edit with `kiln tenant` / `kiln admin`.\n");
    for r in records {
        text.push_str(&r.0.to_line());
        text.push('\n');
    }
    write_atomic(file, text.as_bytes()).map_err(|source| KeyError::Write {
        file: file.to_path_buf(),
        source,
    })
}

/// What a deployment's signature covers: the component's SHA-256 and everything that decides
/// what it may do once deployed (its name, its tenant, the models it may load, its priorities),
/// so a signed component cannot be replayed under another name, tenant, model list or priority.
/// `models: None` is "all of the tenant's" (`*`); priorities default as a deployment's do.
pub fn deployment_manifest(
    handler: &str,
    tenant: &str,
    sha256: &str,
    models: Option<&[String]>,
    priority: Option<u8>,
    max_priority: Option<u8>,
) -> String {
    let models = match models {
        None => "*".to_owned(),
        Some(models) => {
            let mut sorted: Vec<&str> = models.iter().map(String::as_str).collect();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.join(",")
        }
    };
    let priority = priority.unwrap_or(0);
    let max_priority = max_priority.unwrap_or(priority);
    format!(
        "kiln deployment v1\nhandler {handler}\ntenant {tenant}\ncomponent-sha256 {sha256}\nmodels {models}\n\
         priority {priority}\nmax-priority {max_priority}\n"
    )
}

/// A fresh Ed25519 key pair: the PKCS#8 document to keep secret, and the public key.
pub fn keygen() -> Result<(Vec<u8>, [u8; 32]), KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| KeyError::Random)?;
    let public = <[u8; 32]>::try_from(pair.public_key().as_ref()).map_err(|_| KeyError::Random)?;
    Ok((pkcs8.as_ref().to_vec(), public))
}

/// Signs `bytes` with a PKCS#8 Ed25519 private key.
pub fn sign(pkcs8: &[u8], bytes: &[u8]) -> Result<[u8; 64], KeyError> {
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::BadPrivateKey)?;
    let sig = pair.sign(bytes);
    <[u8; 64]>::try_from(sig.as_ref()).map_err(|_| KeyError::BadPrivateKey)
}

/// True when `sig` is `public`'s signature over exactly `bytes`.
pub fn verify_signature(public: &[u8; 32], bytes: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(bytes, sig)
        .is_ok()
}

pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Standard or URL-safe base64, padded or not.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().trim_end_matches('=');
    let normalized: String = text.chars().map(|c| match c {
        '-' => '+',
        '_' => '/',
        c => c,
    }).collect();
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(normalized).ok()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("the system random number generator failed")]
    Random,
    #[error("not an Ed25519 private key in PKCS#8 form (as `kiln keygen` writes)")]
    BadPrivateKey,
    #[error("cannot write {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// An Ed25519 public key as written in config: 32 bytes, base64 (standard or URL-safe).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = crate::tenancy::keys::decode_base64(text.trim())
        .ok_or_else(|| "not base64 (expected the public key `kiln keygen` prints)".to_owned())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        format!("the key is {} bytes; an Ed25519 public key is 32 bytes", bytes.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many `add-key`s and `remove-key`s at once (threads here, processes in real use; the lock
    /// is the same): every added key is kept, every removed one gone.
    #[test]
    fn concurrent_key_changes_lose_nothing() {
        let dir = crate::deploy::store::tests::temp_dir("key-race");
        let tenant = Principal::Tenant("acme".into());
        let doomed: Vec<String> = (0..8).map(|_| add(&dir, &tenant).expect("add")).collect();
        let id = |key: &str| key["kiln_".len().."kiln_".len() + 16].to_owned();
        let added: Vec<String> = std::thread::scope(|scope| {
            let removers: Vec<_> = doomed
                .iter()
                .map(|key| {
                    let (dir, tenant, id) = (&dir, &tenant, id(key));
                    scope.spawn(move || remove(dir, tenant, &id).expect("remove"))
                })
                .collect();
            let adders: Vec<_> = (0..16).map(|_| scope.spawn(|| add(&dir, &tenant).expect("add"))).collect();
            assert!(removers.into_iter().all(|r| r.join().expect("remover")));
            adders.into_iter().map(|a| a.join().expect("adder")).collect()
        });
        let ring = KeyRing::load(&dir, ["acme"]);
        for key in &added {
            assert!(ring.verify(Some(&format!("Bearer {key}"))).is_ok(), "an added key was lost");
        }
        for key in &doomed {
            assert!(ring.verify(Some(&format!("Bearer {key}"))).is_err(), "a removed key came back");
        }
        assert_eq!(list(&dir, &tenant).len(), 16);
    }

    #[test]
    fn a_generated_key_verifies_and_near_misses_do_not() {
        let dir = crate::deploy::store::tests::temp_dir("keys");
        let tenant = Principal::Tenant("acme".into());
        let key = add(&dir, &tenant).expect("add");
        let admin = add(&dir, &Principal::Admin).expect("add admin");
        let ring = KeyRing::load(&dir, ["acme"]);
        assert_eq!(ring.verify(Some(&format!("Bearer {key}"))), Ok(&tenant));
        assert_eq!(ring.verify(Some(&format!("bearer  {admin}"))), Ok(&Principal::Admin));
        // The file holds no key text.
        let text = std::fs::read_to_string(tenant_keys_file(&dir, "acme")).expect("read");
        // The secret is URL-safe base64 and may itself contain `_`: take all of it.
        let secret = &key[PREFIX.len() + 17..];
        assert!(secret.len() >= 40, "{key}");
        assert!(!text.contains(secret), "{text}");

        let mut wrong = key.clone();
        let last = wrong.pop().expect("char");
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            ring.verify(Some(&format!("Bearer {wrong}"))),
            Err(AuthFailure::WrongSecret { principal: tenant.clone() })
        );
        assert_eq!(ring.verify(None), Err(AuthFailure::Missing));
        assert_eq!(ring.verify(Some("Basic abc")), Err(AuthFailure::Malformed));
        assert_eq!(ring.verify(Some(&format!("Bearer {}", &key[..20]))), Err(AuthFailure::Malformed));
        assert_eq!(
            ring.verify(Some("Bearer kiln_0123456789abcdef_secret")),
            Err(AuthFailure::UnknownId)
        );
        // A tenant no longer in the config has no keys.
        assert_eq!(
            KeyRing::load(&dir, []).verify(Some(&format!("Bearer {key}"))),
            Err(AuthFailure::UnknownId)
        );

        let id = &key[PREFIX.len()..PREFIX.len() + 16];
        assert!(remove(&dir, &tenant, id).expect("remove"));
        assert!(!remove(&dir, &tenant, id).expect("remove again"));
        let ring = KeyRing::load(&dir, ["acme"]);
        assert_eq!(ring.verify(Some(&format!("Bearer {key}"))), Err(AuthFailure::UnknownId));
        assert!(ring.has_admin_key());
    }

    #[test]
    fn signatures_cover_every_byte() {
        let (pkcs8, public) = keygen().expect("keygen");
        let bytes = b"\0asm component bytes".to_vec();
        let sig = sign(&pkcs8, &bytes).expect("sign");
        assert!(verify_signature(&public, &bytes, &sig));
        let mut tampered = bytes.clone();
        tampered[3] ^= 1;
        assert!(!verify_signature(&public, &tampered, &sig));
        let (_, other) = keygen().expect("keygen");
        assert!(!verify_signature(&other, &bytes, &sig));
        assert!(!verify_signature(&public, &bytes, &sig[..63]));
        let text = encode_base64(&public);
        assert_eq!(crate::tenancy::keys::parse_public_key(&text), Ok(public));
        assert!(crate::tenancy::keys::parse_public_key("abc").is_err());
    }
}
