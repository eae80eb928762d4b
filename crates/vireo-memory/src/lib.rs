//! Guest memory for Vireo.
//!
//! A vhost-user backend is handed the guest's memory as file descriptors and must read and write
//! it while the frontend may, at any moment, take parts of it back (a new memory table, a removed
//! region, a moved ring, a new dirty log). Vireo's data path uses cached host pointers into that
//! memory instead of translating every access, so it must know, without a doubt, when a pointer
//! has stopped being usable. This crate holds that knowledge.
//!
//! # Invariants, and where each is enforced
//!
//! * **No pointer into guest memory outlives the batch or pin that protects it.** Host pointers
//!   leave this crate only as [`GuestSlice`]s that borrow a [`Batch`], or as an [`IoPin`] that
//!   holds the region (`guest/batch.rs`).
//! * **The reply is the barrier.** [`GuestMemory::set_regions`], [`GuestMemory::remove_region`]
//!   and [`GuestMemory::set_dirty_log`] return only after every reader that could touch the
//!   retired mapping has quiesced and the mapping is retired (`protocol.rs`, checked by
//!   `tests/loom_protocol.rs` and `tests/stress_remap.rs` with `PROT_NONE` retirement).
//! * **A translation that raced with an invalidation is never published**: cache fills are
//!   validated against the invalidation sequence (`Gate::publish_cache`, loom-checked).
//! * **Quiesce per queue**: an invalidation waits only for gates whose cache or pins touch a
//!   retired region (`Domain::invalidate_start`).
//! * **Guest memory is hostile**: no `&T` into it, every access volatile or atomic and bounds
//!   checked (`access.rs`); regions that overlap, wrap, are empty or misaligned are refused and
//!   leave the old map serving (`map.rs`, `guest/control.rs`, `tests/map_props.rs`).
//! * **Every logged write is set after the write and before it is exposed** (`dirty.rs`).
//! * **Nothing grows with the number of remaps**: retired mappings are unmapped at once, or kept
//!   `PROT_NONE` in a bounded quarantine (`mmap.rs`).

#![warn(missing_docs)]

pub mod access;
pub mod addr;
pub mod dirty;
pub mod error;
pub mod guest;
pub mod iotlb;
pub mod map;
pub mod mmap;
pub mod protocol;
mod sigbus;
pub mod stress;
mod sync;
pub use sigbus::poisonings;
pub use sync::asymmetric_fences;

pub use access::GuestSlice;
pub use addr::{GuestPhysAddr, UserAddr, LOG_PAGE_SIZE};
pub use dirty::{DirtyLog, LogCache};
pub use error::MemoryError;
pub use guest::{Batch, CachedRange, GuestMemory, IoPin, Piece, QueueHandle, QueueMemory, Window, WindowLimits};
pub use iotlb::{IotlbEntry, IotlbFault, IotlbTable, Perm, MAX_IOTLB_ENTRIES};
pub use map::{MemoryMap, Region, RegionSpec, Translation, MAX_REGIONS, REGION_ALIGN};
pub use mmap::{live_mappings, memfd, Mapping, RetireMode};
pub use protocol::MAX_CACHED;
