//! placeholder
#![forbid(unsafe_code)]
pub mod bytes;
pub mod client;
pub mod graph;
pub mod ids;
pub mod keys;
pub mod messages;
pub mod params;
pub mod prg;
pub mod quantize;
pub mod recovered;
pub mod ring;
pub mod sealed_share;
pub mod server;
pub mod shamir;
