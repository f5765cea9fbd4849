//! The state directory: deployed handlers and API key hashes.
//!
//! ```text
//! state/
//!   admin.keys              key records (see tenancy/keys.rs)
//!   tenant-keys/NAME.keys
//!   blobs/SHA256.wasm       component bytes, named by their hash
//!   handlers/NAME.json      one manifest per deployed handler, naming its blob
//!   models/NAME.json        one record per model loaded through the admin API
//! ```
//!
//! Every file is written whole to a temporary name, synced, renamed over the old one and the
//! folder synced. A deploy writes the blob first and the manifest last, so a crash at any point
//! leaves the old manifest (old version) or the new one (new version), each naming a complete
//! blob. Leftover temporary files and unreferenced blobs are removed at start. Temporary files
//! start with `.kiln-tmp-`, which no valid handler or tenant name can (names never start with
//! `.`). A manifest that cannot be loaded is moved to `quarantine/` with its blob, never deleted.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::deploy::HandlerSettings;
use crate::files::{TEMP_PREFIX, sha256_hex, sync_dir, write_atomic};

/// What is recorded about one deployed handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub name: String,
    pub tenant: String,
    /// Hex SHA-256 of the component bytes, which are stored as `blobs/SHA256.wasm`.
    pub sha256: String,
    pub settings: HandlerSettings,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
    /// Whether a signature was checked at deploy time.
    pub signed: bool,
    /// That signature (base64, over [`HandlerSettings::signed_manifest`]), checked again at
    /// every start against the tenant's signing key as the config has it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Deployment {
    /// Whether this deployment carries a valid signature by `public` over its manifest.
    pub fn verifies(&self, public: &[u8; 32]) -> bool {
        let manifest = self.settings.signed_manifest(&self.name, &self.tenant, &self.sha256);
        self.signature
            .as_deref()
            .and_then(crate::tenancy::keys::decode_base64)
            .is_some_and(|sig| crate::tenancy::keys::verify_signature(public, manifest.as_bytes(), &sig))
    }
}

/// What is recorded about one model loaded through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDeployment {
    pub name: String,
    /// The `[[model]]` fields as they were sent (with `tenants`), validated again at every start.
    pub spec: serde_json::Value,
    /// Whether it is to be served: an unloaded model keeps its record until it is deleted.
    pub loaded: bool,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
}

/// The deployed handlers and models in a state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating it if needed) the state directory and clears what a crash left behind.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let store = Store {
            dir: dir.to_path_buf(),
        };
        for sub in [store.handlers_dir(), store.blobs_dir(), store.models_dir(), dir.join("tenant-keys"), dir.to_path_buf()] {
            fs::create_dir_all(&sub)?;
            for entry in fs::read_dir(&sub)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    tracing::info!("removing {} left by an interrupted write", entry.path().display());
                    fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn handlers_dir(&self) -> PathBuf {
        self.dir.join("handlers")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    fn models_dir(&self) -> PathBuf {
        self.dir.join("models")
    }

    fn model_record(&self, name: &str) -> PathBuf {
        self.models_dir().join(format!("{name}.json"))
    }

    /// Every model record, in name order. One that cannot be read is quarantined and skipped
    /// with an error in the log.
    pub fn load_models(&self) -> io::Result<Vec<ModelDeployment>> {
        let mut entries: Vec<PathBuf> = fs::read_dir(self.models_dir())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        let mut found = Vec::new();
        for path in entries {
            let loaded = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_slice::<ModelDeployment>(&text).map_err(|e| format!("invalid record: {e}")))
                .and_then(|record| {
                    let expected = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                    if expected.as_deref() == Some(record.name.as_str()) {
                        Ok(record)
                    } else {
                        Err(format!("the record names model '{}'", record.name))
                    }
                });
            match loaded {
                Ok(record) => found.push(record),
                Err(e) => {
                    tracing::error!("skipping model record {}: {e}", path.display());
                    self.quarantine(&path)?;
                }
            }
        }
        Ok(found)
    }

    /// Records a model durably (replacing an earlier record of the same name).
    pub fn save_model(&self, record: &ModelDeployment) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.model_record(&record.name), &text)
    }

    /// Forgets a model; false when it had no record.
    pub fn remove_model(&self, name: &str) -> io::Result<bool> {
        remove_durably(&self.model_record(name))
    }

    fn manifest(&self, name: &str) -> PathBuf {
        self.handlers_dir().join(format!("{name}.json"))
    }

    fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs_dir().join(format!("{sha256}.wasm"))
    }

    /// Every deployment with its component bytes, by name. A manifest that cannot be read or
    /// whose blob is missing or altered is skipped with an error in the log.
    pub fn load_all(&self) -> io::Result<Vec<(Deployment, Vec<u8>)>> {
        let mut found = Vec::new();
        let mut entries: Vec<PathBuf> = fs::read_dir(self.handlers_dir())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        for path in entries {
            match self.load_one(&path) {
                Ok(d) => found.push(d),
                Err(e) => {
                    tracing::error!("skipping deployed handler {}: {e}", path.display());
                    self.quarantine(&path)?;
                }
            }
        }
        self.collect_garbage(&found.iter().map(|(d, _)| d.sha256.as_str()).collect::<Vec<_>>())?;
        Ok(found)
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    /// Moves a manifest that failed to load, and the blob it names if it names one, out of the
    /// live folders, so that the operator can look at them and nothing is collected as garbage.
    fn quarantine(&self, manifest: &Path) -> io::Result<()> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir)?;
        let named_blob = fs::read(manifest)
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .and_then(|v| v["sha256"].as_str().map(str::to_owned))
            .filter(|sha| sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
        let stamp = crate::telemetry::unix_seconds();
        let mut moved = vec![manifest.to_path_buf()];
        if let Some(sha) = named_blob {
            moved.push(self.blob(&sha));
        }
        for path in moved.into_iter().filter(|p| p.exists()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let to = dir.join(format!("{stamp}-{name}"));
            fs::rename(&path, &to)?;
            tracing::warn!("quarantined {} as {}", path.display(), to.display());
        }
        sync_dir(manifest.parent().unwrap_or(&self.dir))?;
        sync_dir(&dir)
    }

    fn load_one(&self, manifest: &Path) -> Result<(Deployment, Vec<u8>), String> {
        let text = fs::read(manifest).map_err(|e| e.to_string())?;
        let deployment: Deployment =
            serde_json::from_slice(&text).map_err(|e| format!("invalid manifest: {e}"))?;
        let expected = manifest.file_stem().map(|s| s.to_string_lossy().into_owned());
        if expected.as_deref() != Some(deployment.name.as_str()) {
            return Err(format!("manifest names handler '{}'", deployment.name));
        }
        let blob = self.blob(&deployment.sha256);
        let bytes = fs::read(&blob).map_err(|e| format!("cannot read {}: {e}", blob.display()))?;
        if sha256_hex(&bytes) != deployment.sha256 {
            return Err(format!("{} does not match its SHA-256", blob.display()));
        }
        Ok((deployment, bytes))
    }

    /// Records a deployment durably: blob first, then the manifest that makes it live.
    pub fn save(&self, deployment: &Deployment, bytes: &[u8]) -> io::Result<()> {
        let blob = self.blob(&deployment.sha256);
        let complete = fs::read(&blob).is_ok_and(|b| sha256_hex(&b) == deployment.sha256);
        if !complete {
            write_atomic(&blob, bytes)?;
        }
        let manifest = serde_json::to_vec_pretty(deployment).map_err(io::Error::other)?;
        write_atomic(&self.manifest(&deployment.name), &manifest)
    }

    /// Removes a deployment; false when there was none. Its blob goes at the next start.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        remove_durably(&self.manifest(name))
    }

    fn collect_garbage(&self, live: &[&str]) -> io::Result<()> {
        for entry in fs::read_dir(self.blobs_dir())? {
            let path = entry?.path();
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            if stem.is_some_and(|s| !live.contains(&s.as_str())) {
                tracing::debug!("removing unreferenced blob {}", path.display());
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// Removes a file and syncs its folder; false when there was none.
fn remove_durably(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-unit-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn deployment(name: &str, bytes: &[u8]) -> Deployment {
        Deployment {
            name: name.to_owned(),
            tenant: "t".to_owned(),
            sha256: sha256_hex(bytes),
            settings: HandlerSettings::default(),
            deployed_at: 1,
            signed: false,
            signature: None,
        }
    }

    #[test]
    fn saved_deployments_load_back_and_removed_ones_do_not() {
        let dir = temp_dir("store");
        let store = Store::open(&dir).expect("open");
        store.save(&deployment("a", b"one"), b"one").expect("save a");
        store.save(&deployment("b", b"two"), b"two").expect("save b");
        store.save(&deployment("a", b"three"), b"three").expect("replace a");
        assert!(store.remove("b").expect("remove"));
        assert!(!store.remove("b").expect("remove again"));
        let loaded = Store::open(&dir).expect("reopen").load_all().expect("load");
        assert_eq!(loaded, vec![(deployment("a", b"three"), b"three".to_vec())]);
        // The replaced and the removed blobs are collected.
        assert_eq!(fs::read_dir(dir.join("blobs")).expect("blobs").count(), 1);
    }

    #[test]
    fn a_crash_mid_deploy_leaves_the_old_version() {
        let dir = temp_dir("crash");
        let store = Store::open(&dir).expect("open");
        store.save(&deployment("h", b"old"), b"old").expect("save");
        // A crash after the new blob, before the manifest: a complete blob nobody names, and a
        // half-written temporary manifest.
        write_atomic(&dir.join("blobs").join(format!("{}.wasm", sha256_hex(b"new"))), b"new")
            .expect("blob");
        fs::write(dir.join("handlers").join(".kiln-tmp-1-0-h.json"), b"{\"name\": \"h\", \"ten")
            .expect("partial");
        // A crash while writing a blob: a partial temporary blob.
        fs::write(dir.join("blobs").join(".kiln-tmp-1-1-x.wasm"), b"ne").expect("partial blob");
        let loaded = Store::open(&dir).expect("reopen").load_all().expect("load");
        assert_eq!(loaded, vec![(deployment("h", b"old"), b"old".to_vec())]);
        let left: Vec<String> = fs::read_dir(dir.join("blobs"))
            .expect("blobs")
            .chain(fs::read_dir(dir.join("handlers")).expect("handlers"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    /// Valid names may contain `.tmp.`; only Kiln's own temporary files are cleared at start.
    #[test]
    fn names_that_look_temporary_survive_a_restart() {
        let dir = temp_dir("names");
        let store = Store::open(&dir).expect("open");
        for name in ["a.tmp.b", "x.tmp.1.0", "kiln-tmp-z"] {
            crate::deploy::check_name(name).expect("a valid name");
            store.save(&deployment(name, name.as_bytes()), name.as_bytes()).expect("save");
        }
        let loaded = Store::open(&dir).expect("reopen").load_all().expect("load");
        assert_eq!(loaded.len(), 3, "{loaded:?}");
        assert!(crate::deploy::check_name(".kiln-tmp-1-0-a").is_err(), "no valid name is a temp name");
    }

    /// A manifest that cannot be read keeps its blob: both go to quarantine, not to garbage.
    #[test]
    fn a_manifest_that_fails_to_load_is_quarantined_with_its_blob() {
        let dir = temp_dir("quarantine");
        let store = Store::open(&dir).expect("open");
        store.save(&deployment("h", b"bytes"), b"bytes").expect("save");
        store.save(&deployment("ok", b"fine"), b"fine").expect("save");
        let manifest = dir.join("handlers/h.json");
        let text = fs::read_to_string(&manifest).expect("manifest");
        fs::write(&manifest, text.replace("\"signed\"", "\"unknown_field\"")).expect("corrupt");
        let loaded = Store::open(&dir).expect("reopen").load_all().expect("load");
        assert_eq!(loaded, vec![(deployment("ok", b"fine"), b"fine".to_vec())]);
        let quarantined: Vec<String> = fs::read_dir(dir.join("quarantine"))
            .expect("quarantine")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let blob = format!("{}.wasm", sha256_hex(b"bytes"));
        assert!(quarantined.iter().any(|n| n.ends_with("-h.json")), "{quarantined:?}");
        assert!(quarantined.iter().any(|n| n.ends_with(&blob)), "{quarantined:?}");
        assert!(!manifest.exists());
    }

    #[test]
    fn model_records_load_back_until_removed_and_a_broken_one_is_quarantined() {
        let dir = temp_dir("models");
        let store = Store::open(&dir).expect("open");
        let record = |name: &str, loaded: bool| ModelDeployment {
            name: name.to_owned(),
            spec: serde_json::json!({ "path": "/m.pt", "tenants": ["t"] }),
            loaded,
            deployed_at: 7,
        };
        store.save_model(&record("a", true)).expect("save a");
        store.save_model(&record("b", true)).expect("save b");
        store.save_model(&record("a", false)).expect("replace a");
        store.save_model(&record("c", true)).expect("save c");
        assert!(store.remove_model("b").expect("remove"));
        assert!(!store.remove_model("b").expect("remove again"));
        // A record whose file name and content disagree is not trusted.
        fs::rename(dir.join("models/c.json"), dir.join("models/d.json")).expect("rename");
        let loaded = Store::open(&dir).expect("reopen").load_models().expect("load");
        assert_eq!(loaded, vec![record("a", false)]);
        let quarantined = fs::read_dir(dir.join("quarantine")).expect("quarantine").count();
        assert_eq!(quarantined, 1);
    }

    #[test]
    fn an_altered_blob_is_refused_at_load() {
        let dir = temp_dir("tamper");
        let store = Store::open(&dir).expect("open");
        store.save(&deployment("h", b"good"), b"good").expect("save");
        fs::write(dir.join("blobs").join(format!("{}.wasm", sha256_hex(b"good"))), b"evil")
            .expect("tamper");
        assert!(store.load_all().expect("load").is_empty());
    }
}
