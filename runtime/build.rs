//! Compile the gRPC API from `proto/inference.proto`, and link libtorch so that `kiln` finds it
//! and its CUDA half at run time.
//!
//! The proto is parsed by `protox` (in Rust), so building needs no `protoc`.
//!
//! torch-sys links with `--as-needed`, which drops `libtorch_cuda` because nothing references it
//! by symbol; without it libtorch reports no CUDA device even on a GPU host. Rather than link it
//! (which would make every kiln need CUDA's gigabytes), kiln loads it at run time when it is
//! there (`model::backend::torch::cuda`). The run path names the folder beside the binary first
//! (`$ORIGIN/../lib/kiln`, where an image puts libtorch), then the build's libtorch, so `kiln`
//! starts without LD_LIBRARY_PATH.

use std::path::Path;

fn main() {
    compile_protos();
    link_libtorch();
}

fn compile_protos() {
    let proto = "proto/inference.proto";
    println!("cargo:rerun-if-changed={proto}");
    let files = match protox::compile([proto], ["proto"]) {
        Ok(files) => files,
        Err(e) => panic!("{proto}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        // Tensor contents stay reference-counted slices of the message, never copied.
        .bytes(".inference")
        .compile_fds(files)
    {
        panic!("cannot generate the gRPC code from {proto}: {e}");
    }
}

fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    // A packaged kiln (the image, scripts/image.sh) keeps libtorch in ../lib/kiln beside it;
    // that folder comes first, so a package never reaches back into the build's venv.
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib/kiln");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    // For the test that libtorch's CUDA half loads where the build has one.
    println!("cargo:rustc-env=KILN_LIBTORCH_LIB={lib}");
    if !lib.is_empty() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", Path::new(&lib).display());
    }
}
