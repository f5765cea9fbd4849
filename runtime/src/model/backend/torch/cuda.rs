//! libtorch's CUDA half, loaded at run time when it is there.
//!
//! `kiln` links only libtorch's CPU libraries. `libtorch_cuda.so` registers CUDA with libtorch
//! from its static initialisers, so loading it with `dlopen` before the first CUDA query is all
//! it takes; libtorch caches the answer of that first query for the life of the process, so
//! every query in Kiln goes through [`device_count`] or [`is_available`], which load it first.
//! The same binary then serves on a GPU host (the torch wheel's folder, or an image's CUDA
//! layer, holds the library) and in a CPU-only image, where the library is absent and costs
//! nothing.
//!
//! The library is looked up by name: `dlopen` searches the calling object's run path, which is
//! `kiln`'s own (`runtime/build.rs`: beside the binary first, then the build's libtorch).

// dlopen is a foreign call; it is the only one here, and it is given a constant name.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::sync::OnceLock;

/// What loading libtorch's CUDA library gave: `Ok` once loaded, else why not.
static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

const LIBRARY: &CStr = c"libtorch_cuda.so";

/// Loads `libtorch_cuda.so` once; later calls return the first answer.
pub fn load() -> &'static Result<(), String> {
    LOADED.get_or_init(|| {
        // SAFETY: the name is a valid C string; the handle is kept for the life of the process
        // (never closed), and dlerror is read on this thread right after the failed call.
        unsafe {
            let handle = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            if handle.is_null() {
                let error = libc::dlerror();
                let why = if error.is_null() {
                    "not found".to_owned()
                } else {
                    CStr::from_ptr(error).to_string_lossy().into_owned()
                };
                return Err(why);
            }
        }
        Ok(())
    })
}

/// [`load`] as `kiln` starts, before anything in libtorch asks about CUDA; a library that is
/// there but does not load (a missing CUDA dependency) is worth a warning, not silence.
pub fn load_at_start() {
    if let Err(why) = load()
        && !why.contains("No such file")
    {
        tracing::warn!("libtorch's CUDA library is there but did not load, so models run on the CPU: {why}");
    }
}

/// CUDA devices libtorch can use; 0 without the CUDA library, a driver or a device.
pub fn device_count() -> usize {
    let _ = load();
    tch::Cuda::device_count().max(0) as usize
}

/// Whether libtorch can use CUDA here.
pub fn is_available() -> bool {
    let _ = load();
    tch::Cuda::is_available()
}

/// Whether cuDNN is there for libtorch.
pub fn cudnn_is_available() -> bool {
    let _ = load();
    tch::Cuda::cudnn_is_available()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn the_cuda_half_loads_exactly_where_the_build_has_one() {
        // The PyPI wheel this project builds against has a CUDA half; a CPU-only libtorch does
        // not. Loading must find it through kiln's run path alone (no LD_LIBRARY_PATH).
        let built_with = Path::new(env!("KILN_LIBTORCH_LIB")).join("libtorch_cuda.so");
        let first = super::load().clone();
        assert_eq!(first.is_ok(), built_with.exists(), "{first:?}, {}", built_with.display());
        assert_eq!(&first, super::load(), "a second load gives the first answer");
        assert_eq!(super::is_available(), super::device_count() > 0);
    }
}
