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

/// Sleeps while `word` holds `expected` (a futex wait), for at most a millisecond: the wake-up is
/// an optimisation, the caller re-checks its condition in a loop either way.
#[cfg(not(vireo_loom))]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32) {
    let timeout = rustix::thread::futex::Timespec { tv_sec: 0, tv_nsec: 1_000_000 };
    // Errors (EAGAIN: the value changed already; EINTR; ETIMEDOUT) all mean "look again".
    let _ = rustix::thread::futex::wait(word, rustix::thread::futex::Flags::PRIVATE, expected, Some(&timeout));
}

/// Wakes every thread sleeping in [`futex_wait`] on `word`.
#[cfg(not(vireo_loom))]
pub(crate) fn futex_wake(word: &AtomicU32) {
    let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::PRIVATE, u32::MAX);
}

#[cfg(vireo_loom)]
pub(crate) fn futex_wait(_word: &AtomicU32, _expected: u32) {
    loom::thread::yield_now();
}

#[cfg(vireo_loom)]
pub(crate) fn futex_wake(_word: &AtomicU32) {}

/// Gives up the core to another runnable thread.
#[cfg(not(vireo_loom))]
pub(crate) fn yield_now() {
    std::thread::yield_now();
}

#[cfg(vireo_loom)]
pub(crate) fn yield_now() {
    loom::thread::yield_now();
}
