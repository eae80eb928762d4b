//! Guest memory of one device: the control side that changes it ([`GuestMemory`]) and the reader
//! side that queue workers use ([`QueueMemory`], [`Batch`]).
//!
//! Every change that retires memory (a new memory table, a removed region, a new dirty log) runs
//! through [`Domain::invalidate_start`] before the call returns, so a caller that replies to the
//! frontend after the call has made the reply the barrier: no thread touches the retired mapping
//! any more, and the mapping is gone (or `PROT_NONE` in the test mode).
//!
//! The module is split by role: `control` (the side that changes memory and waits),
//! `reader` (a queue's view and its cache of ring pointers) and `batch` (the guard a worker
//! holds while it touches guest memory, as crossbeam-epoch keeps its `Guard` apart).

use std::cell::{Cell, RefCell};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::sync::Arc as StdArc;

use crate::access::GuestSlice;
use crate::addr::GuestPhysAddr;
use crate::dirty::{DirtyLog, LogCache};
use crate::error::MemoryError;
use crate::iotlb::{edit, IotlbEntry, IotlbFault, IotlbTable, Perm, MAX_IOTLB_ENTRIES};
use crate::map::{MemoryMap, Region, RegionSpec, MAX_REGIONS};
use crate::mmap::RetireMode;
use crate::protocol::{Domain, Gate, RegionTag, MAX_CACHED};
// The glue's atomics and locks come from the facade too: under loom the cache fill's map reload,
// the log and IOTLB pins and their generations run in the model with the protocol.
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex as StdMutex, MutexGuard};

mod batch;
mod control;
mod reader;

pub use batch::{Batch, IoPin, Piece, Window, WindowLimits};
use batch::{LastRegion, PinList};
pub use control::{GuestMemory, QueueHandle};
use reader::LocalCache;
pub use reader::{CachedRange, QueueMemory};

/// Region slots: a memory table may be replaced while the old one still holds its slots, so
/// twice the map's maximum, plus two slots that dirty logs alternate between and two that IOTLB
/// generations alternate between.
const REGION_SLOTS: usize = 2 * MAX_REGIONS;
const LOG_SLOTS: [usize; 2] = [REGION_SLOTS, REGION_SLOTS + 1];
const IOTLB_SLOTS: [usize; 2] = [REGION_SLOTS + 2, REGION_SLOTS + 3];
const NUM_SLOTS: usize = REGION_SLOTS + 4;

/// Ids start at 1: 0 means "no region" in a gate's cache.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug)]
struct Writer {
    /// Slots not held by a live region.
    free_slots: Vec<usize>,
}

#[derive(Debug)]
struct Shared {
    domain: Domain,
    mode: RetireMode,
    /// Serializes the control side. Held across invalidations (and their waits); no reader ever
    /// takes it.
    writer: StdMutex<Writer>,
    /// The map in force. Readers take this lock only to clone the `Arc` when `map_gen` moved; the
    /// control side holds it only to swap the `Arc`, never while it waits.
    current: StdMutex<StdArc<MemoryMap>>,
    map_gen: AtomicU64,
    /// The dirty log in force, under the same rules as `current`.
    log: StdMutex<Option<StdArc<DirtyLog>>>,
    log_gen: AtomicU64,
    /// VHOST_F_LOG_ALL: read by every batch after it enters.
    logging: AtomicBool,
    /// The IOTLB in force when the device sits behind a vIOMMU (`None`: addresses are guest
    /// physical), under the same rules as `current`.
    iotlb: StdMutex<Option<StdArc<IotlbTable>>>,
    /// Moves on every IOTLB publication (updates too: queues parked on a miss watch it).
    iotlb_gen: AtomicU64,
    /// How long the last invalidation took from start to end, in nanoseconds (the part of a
    /// frontend's reply latency that the protocol adds; benchmarks report it).
    last_invalidation_ns: AtomicU64,
    /// Of which the wait for readers (start until `invalidate_start` returned).
    last_quiesce_ns: AtomicU64,
}

fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical section is
    // a swap or a push), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
