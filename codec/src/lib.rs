//! The parts of Kiln that read what clients, tenants and operators send, with nothing heavy
//! beneath them: host tensors and their checks ([`tensor`]), model signatures ([`signature`]),
//! merging requests into a batch and splitting its outputs ([`batch`]), Open Inference Protocol
//! requests ([`oip`]), API keys and key records ([`keys`]), where a model's file comes from and
//! its pin ([`source`]), handlers' OCI references and manifests ([`oci`]) and the config file's syntax ([`config`]). The runtime re-exports them where they belong; `fuzz/` drives each with
//! arbitrary input.

#![forbid(unsafe_code)]

pub mod batch;
pub mod config;
pub mod keys;
pub mod oci;
pub mod oip;
pub mod signature;
pub mod source;
pub mod tensor;
