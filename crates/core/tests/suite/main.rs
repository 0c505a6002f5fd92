//! The numeric core's integration tests, one module per concern, in one
//! test binary: eight binaries each linked fedstep-core, proptest and the
//! test support again, which a cold CI build paid for eight times.

mod abuse;
mod adaptive_clip;
mod aggregate;
mod fedselect;
mod golden;
mod properties;
mod sharded;
mod share_cap;
