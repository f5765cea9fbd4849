//! Files Kiln keeps (the state directory's manifests, blobs and key files): written whole or not
//! at all, and named by content where that matters; and files Kiln reads again when they change
//! (keys, certificates).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every temporary file's name starts with this; a valid name cannot (see `check_name`).
pub const TEMP_PREFIX: &str = ".kiln-tmp-";

/// Writes `bytes` to `path` so that readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    // Makes the rename itself durable. Folders cannot be opened this way on every platform.
    match File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 of each of `paths` (`None` for one that cannot be read): changes with any write,
/// even within one timestamp tick.
pub fn fingerprint(paths: &[PathBuf]) -> Vec<Option<String>> {
    paths.iter().map(|path| fs::read(path).ok().map(|bytes| sha256_hex(&bytes))).collect()
}

/// Checks `paths` every `every` while the runtime runs and calls `reload` when any changed. An
/// error from `reload` (a certificate renewed before its key) is logged once, naming `what`,
/// and the reload is tried again at each check until it succeeds: what was loaded before stays
/// in use meanwhile.
pub fn watch(
    paths: Vec<PathBuf>,
    every: Duration,
    what: &'static str,
    mut reload: impl FnMut() -> Result<(), String> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut seen = fingerprint(&paths);
        let mut complained = None;
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&paths);
            if now == seen {
                continue;
            }
            match reload() {
                Ok(()) => {
                    seen = now;
                    complained = None;
                }
                Err(message) => {
                    if complained.as_ref() != Some(&message) {
                        tracing::warn!("{what} changed but cannot be used yet (the one loaded before stays in use): {message}");
                        complained = Some(message);
                    }
                }
            }
        }
    });
}
