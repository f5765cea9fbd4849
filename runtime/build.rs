//! Compile the gRPC API from `proto/inference.proto`, and link libtorch so that `kiln` finds it
//! and its CUDA half at run time.
//!
//! The proto is parsed by `protox` (in Rust), so building needs no `protoc`.
//!
//! torch-sys links with `--as-needed`, which drops `libtorch_cuda` because nothing references it
//! by symbol; without it libtorch reports no CUDA device even on a GPU host. We link it again
//! with `--no-as-needed` and add an rpath to the libtorch folder so `kiln` starts without
//! LD_LIBRARY_PATH.

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
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
