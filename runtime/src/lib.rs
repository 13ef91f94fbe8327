//! talkline's runtime: sessions, the pipeline, transports, model provisioning and the CLI.
//!
//! The `talkline` binary (`main.rs`) is a thin shell over [`cli::run`].

pub mod cli;
pub mod config;
pub mod models;
