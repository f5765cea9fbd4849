//! What the runtime's integration tests share: where the repository and its exported models are.

use std::path::{Path, PathBuf};

/// The repository's root (`KILN_ROOT` where the tests run from elsewhere).
pub(crate) fn root() -> PathBuf {
    if let Some(root) = std::env::var_os("KILN_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A model `scripts/setup.sh` exported into `build/models`.
pub(crate) fn model(name: &str) -> PathBuf {
    let path = root().join("build/models").join(name);
    assert!(path.is_file(), "{} is missing: run scripts/setup.sh first", path.display());
    path
}
