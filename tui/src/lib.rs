//! `kiln-top`'s parts: [`app`] (state and `update`), [`view`] (drawing, no I/O) and [`client`]
//! (the threads that fetch from the server).

#![forbid(unsafe_code)]

pub mod app;
pub mod client;
pub mod view;
