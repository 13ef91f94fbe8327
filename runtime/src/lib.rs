//! talkline's runtime: sessions, the pipeline, transports, model provisioning and the CLI.
//!
//! The `talkline` binary (`main.rs`) is a thin shell over [`cli::run`].

pub mod agent;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod converse;
pub mod echo;
pub mod jitter;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod onnx;
pub mod openai;
pub mod say;
pub mod serve;
pub mod session;
pub mod sip;
pub mod stages;
pub mod tls;
pub mod transcribe;
pub mod turn;
pub mod twilio;
pub mod webrtc;
