//! `kiln-top`'s parts: [`app`] (state and `update`), [`view`] (drawing, no I/O), [`fleet`]
//! (several replicas summed into one snapshot) and [`client`] (the threads that fetch from the
//! servers).

#![forbid(unsafe_code)]

pub mod app;
pub mod client;
pub mod fleet;
pub mod view;
