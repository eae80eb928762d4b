//! The one place the invalidation protocol gets its atomics from.
//!
//! Under `--cfg vireo_loom` every atomic and every wait in the protocol (`protocol.rs`) and in
//! its glue (`guest/`: the published map, log and IOTLB, their generations, the pins a batch
//! takes on them) comes from `loom`, so that `tests/loom_protocol.rs` explores the interleavings
//! of the real code, not of a copy of it. What is not a synchronization between our threads (the
//! mappings themselves, the dirty-log bitmap in shared memory, id counters) uses `std`.

#[cfg(vireo_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64};
#[cfg(vireo_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(vireo_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64};
#[cfg(not(vireo_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// The reader's half of an asymmetric barrier ([`heavy_fence`] is the other): where the
/// protocol's readers would put `fence(SeqCst)` in a "store mine, fence, load yours" handshake.
///
/// With `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` registered, this is only a compiler
/// barrier, and the invalidator pays for both sides: its `membarrier` makes every thread of the
/// process that is running execute a full barrier (an IPI), so of the reader's "store, load" and
/// the invalidator's "store, membarrier, load", one sees the other, as with two fences (the
/// argument of liburcu's "memb" flavour and folly's `asymmetricLightBarrier`). Readers run in
/// every batch and invalidations are rare: the cost moves to the rare side. Where the kernel
/// refuses the registration both sides use `fence(SeqCst)`.
///
/// Under loom both halves are `fence(SeqCst)`: the model treats the membarrier as a fence
/// executed by every thread at that point, which is what it guarantees.
#[inline(always)]
pub(crate) fn light_fence() {
    #[cfg(vireo_loom)]
    fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(vireo_loom))]
    {
        if ASYMMETRIC.load(std::sync::atomic::Ordering::Relaxed) {
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        } else {
            fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The invalidator's half of the asymmetric barrier (see [`light_fence`]): a full fence, then,
/// when registered, `membarrier`, which returns only after every running thread of the process
/// has executed a full barrier.
pub(crate) fn heavy_fence() {
    fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(vireo_loom))]
    if ASYMMETRIC.load(std::sync::atomic::Ordering::Relaxed)
        && rustix::thread::membarrier(rustix::thread::MembarrierCommand::PrivateExpedited).is_err()
    {
        // Registered, so it cannot fail; were it to, no reader may rely on it any more. Readers
        // that already skipped their fence are covered by nothing: stop the process rather than
        // run on unsound ground.
        std::process::abort();
    }
}

/// Whether readers may rely on [`heavy_fence`]'s membarrier (set once, never cleared).
#[cfg(not(vireo_loom))]
static ASYMMETRIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Registers the process for expedited private membarriers, once, before the first domain has
/// readers: from then on readers use compiler barriers. `VIREO_MEMBARRIER=off` keeps full
/// fences on both sides (to measure the difference).
pub(crate) fn init_asymmetric() {
    #[cfg(not(vireo_loom))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var("VIREO_MEMBARRIER").is_ok_and(|v| v == "off") {
                return;
            }
            let ok = rustix::thread::membarrier(rustix::thread::MembarrierCommand::RegisterPrivateExpedited).is_ok();
            // Release (and the Once): a thread that later uses a gate of a domain made after
            // this sees the flag.
            ASYMMETRIC.store(ok, std::sync::atomic::Ordering::Release);
        });
    }
}

/// Whether the readers' barriers are compiler barriers (membarrier registered).
pub fn asymmetric_fences() -> bool {
    #[cfg(not(vireo_loom))]
    return ASYMMETRIC.load(std::sync::atomic::Ordering::Acquire);
    #[cfg(vireo_loom)]
    false
}

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
