//! The device side of virtqueues (virtio 1.x, split 2.7 and packed 2.8), over the cached
//! translations of `vireo-memory`.
//!
//! # Invariants, and where each is enforced
//!
//! * **Ring metadata goes through the cached direct views whenever the protocol allows**, and
//!   through the translating path otherwise, with the same code (`rings.rs`: one walker,
//!   monomorphized over `Direct` and `Translated`; `Queue::process` picks per batch).
//! * **The guest is hostile** (`queue.rs`, `chain.rs`): every index is reduced modulo the queue
//!   size or checked against it; chains are bounded by the queue size and indirect tables by their
//!   length; loops, nested indirect tables, INDIRECT with NEXT, zero lengths, 32-bit length
//!   overflow, readable-after-writable, addresses outside guest memory and an available index
//!   that jumps by more than the queue size all break the queue with a typed [`QueueError`],
//!   never a panic, and touch no other queue.
//! * **Used elements are visible before the index (or flag) that publishes them**, and their
//!   dirty-log bits are set before it too (`QueueBatch::finish`).
//! * **A chain taken is recorded until its used element is published** when the frontend gave
//!   an inflight region (`inflight.rs`), so that a restarted backend resubmits exactly the
//!   chains the driver still waits for.

#![warn(missing_docs)]

mod batch;
mod cached;
mod chain;
mod descriptors;
mod error;
mod inflight;
mod inflight_packed;
mod packed;
mod queue;
mod resubmit;
mod rings;
mod split;

pub use batch::{AvailPosition, Buffer, Popped, QueueBatch};
pub use chain::{
    Chain, Descriptor, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE, MAX_INDIRECT,
};
pub use error::QueueError;
pub use inflight::{split_region_size, InflightRegion, INFLIGHT_ALIGN};
pub use inflight_packed::packed_region_size;
pub use queue::{Queue, QueueConfig, QueueState, RingAddrs, UsedToken, DEFAULT_BATCH_LIMIT, MAX_QUEUE_SIZE};
pub use split::{vring_need_event, Single};
