//! The one place the invalidation protocol gets its atomics from.
//!
//! Under `--cfg vireo_loom` every atomic and every wait in the protocol comes from `loom`, so that
//! `tests/loom_protocol.rs` explores the interleavings of the real code, not of a copy of it.
//! Everything outside the protocol (mappings, the dirty-log bitmap in shared memory) uses `std`
//! directly: it is not part of the model.

#[cfg(vireo_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64};
#[cfg(vireo_loom)]
pub(crate) use loom::sync::{Arc, Mutex};

#[cfg(not(vireo_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64};
#[cfg(not(vireo_loom))]
pub(crate) use std::sync::{Arc, Mutex};

/// One step of a bounded wait on another thread.
///
/// The invalidating side calls this while it waits for a batch to end or for pins to drop; it never
/// holds a lock a reader needs while it does (see the lock order in ARCHITECTURE.md). A busy reader's
/// batch is short, so the first steps spin; an idle-looking wait backs off to yielding and then to
/// short sleeps so that an oversubscribed machine lets the reader run.
#[cfg(not(vireo_loom))]
pub(crate) fn wait_step(round: u32) {
    if round < 64 {
        std::hint::spin_loop();
    } else if round < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
}

#[cfg(vireo_loom)]
pub(crate) fn wait_step(_round: u32) {
    loom::thread::yield_now();
}
