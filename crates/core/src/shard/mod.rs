//! Sharded aggregation (issue #14): the model cut into shards of whole
//! stripes, each aggregated by its own task and written as its own parts
//! of the outputs, bit for bit what one pass writes. `stripes` is the grid,
//! `plan` who owns what, `parts` how one shard's bytes are written.

pub mod parts;
pub mod plan;
pub mod stripes;

pub use parts::{InPlace, MemoryParts, PartDest, PartStore, ShardOutput};
pub use plan::{Part, ShardPlan, MIN_PART_BYTES, PART_BYTES};
pub use stripes::{Stripe, STRIPE_ELEMENTS};
