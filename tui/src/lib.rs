//! `kiln-top`'s parts: [`args`] (its command line), [`app`] (state and `update`), [`view`] (drawing, no I/O), [`fleet`]
//! (several replicas summed into one snapshot) and [`client`] (the threads that fetch from the
//! servers).

#![forbid(unsafe_code)]

pub mod app;
pub mod args;
pub mod client;
pub mod fleet;
pub mod view;
