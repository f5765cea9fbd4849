//! Compiles the C++ shim over libtorch's TorchScript importer (`src/scan.cpp`) against the headers
//! of the libtorch that torch-sys links, and the confinement (`src/confine.c`).
//!
//! torch-sys says where libtorch's libraries are (`DEP_TCH_LIBTORCH_LIB`); the headers sit beside
//! them (`../include`) in both a libtorch download and a PyTorch wheel. The C++ standard library
//! ABI must be libtorch's: asked of PyTorch as torch-sys does (`LIBTORCH_USE_PYTORCH`), else
//! `LIBTORCH_CXX11_ABI`, else the new ABI that every libtorch since 2.7 uses.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/scan.cpp");
    println!("cargo:rerun-if-changed=src/confine.c");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB is unset)"),
    };
    let include = lib.parent().unwrap_or(Path::new("/")).join("include");
    if !include.join("torch/csrc/jit/serialization/import_source.h").exists() {
        panic!("libtorch's TorchScript headers are not in {}", include.display());
    }
    // This crate's own test binary finds libtorch without LD_LIBRARY_PATH (`kiln` has its own).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let abi = cxx11_abi();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .pic(true)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's headers are not warning-clean; this file's own warnings still show.
        .flag("-isystem")
        .flag(include.to_string_lossy().as_ref())
        .flag("-Wno-unused-parameter")
        .flag("-Wno-unused-function")
        .file("src/scan.cpp")
        .compile("kiln_torchscan_scan");
    cc::Build::new().file("src/confine.c").compile("kiln_torchscan_confine");
}

fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        // The interpreter torch-sys asks.
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let asked = Command::new(python)
            .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output();
        match asked {
            Ok(out) if out.status.success() => return String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            Ok(out) => panic!("{python} could not say torch's C++ ABI: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => panic!("cannot run {python} to ask torch's C++ ABI: {e}"),
        }
    }
    std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned())
}
