//! The invalidation protocol: how readers use cached host pointers into guest memory without ever
//! touching memory that the frontend has taken back.
//!
//! # Parties
//!
//! * **Readers** are queue workers. Each queue has one [`Gate`], used by one thread at a time. A
//!   reader works in *batches*: [`Gate::enter`] … [`Gate::leave`]. Inside a batch it may use
//!   (a) its queue's *cached translation* (host pointers of the rings, and of the whole region
//!   the first of them lies in), if the cache is valid, and (b) *pinned* translations: before the
//!   first access to another region in a batch it pins the region's slot ([`Gate::pin`]); an I/O
//!   still in flight after the batch keeps its own pin, taken during the batch on a region the
//!   batch holds either way ([`Gate::pin_again`]).
//! * **The invalidator** is the control thread acting on a frontend message that retires memory.
//!   Invalidations are serialized by the caller (one control thread per device).
//!
//! # State
//!
//! * `Domain::seq`: even when idle, odd while an invalidation is between start and end.
//!   Written only by the invalidator (two `fetch_add`s per invalidation).
//! * `RegionTag::retiring`: set once, by the invalidator, before it quiesces.
//! * `Gate::state`: `2 * batches + active`; odd while the reader is inside a batch. Written only
//!   by the reader. Also the futex word an invalidator sleeps on (`Gate::waiters` counts them).
//! * `Gate::pins[slot]`: how many batch or I/O pins the reader holds on the region in `slot`.
//! * `Gate::cache_valid` / `Gate::cache_ids`: whether the reader's cached translation may be used,
//!   and the ids of the regions it points into.
//!
//! # Operations
//!
//! Reader, entering a batch: `state += 1`, fence, load `cache_valid`.
//! Reader, filling its cache (collision-retry, `mmu_interval_read_begin`/`read_retry`):
//! `s = seq` (must be even, else use the translating path), translate without holding anything,
//! store the ids, `cache_valid = true`, fence, reload `seq`: if it moved, `cache_valid = false`
//! and do not use what was translated.
//! Reader, pinning slot `i` of region `r`: `pins[i] += 1`, fence, load `r.retiring`; if set,
//! `pins[i] -= 1` and look the address up again in the newest map.
//! Reader, leaving: unpin (Release), `state += 1` (Release store).
//!
//! Invalidator, [`Domain::invalidate_start`]: `seq += 1` (odd); publish the new map (the
//! caller's closure); `retiring = true` on every retired tag; fence; then for every gate: if its
//! cache is valid and points into a retired region, clear `cache_valid`, fence, and wait for the
//! batch in progress (if any) to end; wait for the gate's pins on every retired slot to drop to
//! zero. When it returns, no reader holds or will use a pointer into a retired region.
//! [`Invalidation::end`]: `seq += 1` (even).
//!
//! Every "store mine, fence, load yours" above is one half of a Dekker handshake. The fence is
//! asymmetric (`sync.rs`): on the reader's side a compiler barrier (`light_fence`), on the
//! invalidator's side a full fence followed by `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
//! (`heavy_fence`), which makes every running thread of the process execute a full barrier before
//! it returns. So, as with two `fence(SeqCst)`: either the reader's store is visible to the
//! invalidator's load, or the reader's load comes after the barrier and sees the invalidator's
//! store; at least one side sees the other. Readers run in every batch, invalidations are rare:
//! the cost is on the rare side. (Without membarrier both halves are `fence(SeqCst)`; loom models
//! them as such, which is what membarrier guarantees on every thread. Fences rather than SeqCst
//! accesses: on x86 a plain store plus a fence is the cheapest form, and the form loom models.)
//! The invalidator clears every cache it must, then issues one barrier for all the gates. Its
//! waits then use Acquire loads that pair with the reader's Release unpin/leave, so every access
//! the reader made happens-before the retirement of the mapping.
//!
//! # The race it prevents (the 2019 kernel series had no collision-retry)
//!
//! | reader (fill)                          | invalidator                                  |
//! |----------------------------------------|----------------------------------------------|
//! | `s = seq` (even)                       |                                              |
//! | translate GPA with old map -> ptr in R |                                              |
//! |                                        | `seq += 1`; `R.retiring = true`; publish map |
//! |                                        | gate cache not valid yet: no wait on batch   |
//! |                                        | pins on R == 0: done; unmap R; reply         |
//! | `cache_valid = true`                   |                                              |
//! | reload `seq` != s -> **must** clear and not use ptr |                                 |
//!
//! Had the reader published without the reload it would now dereference an unmapped R. Had its
//! `cache_valid = true` come before the invalidator's look at the gate, the invalidator would have
//! seen it, cleared it and waited for the batch instead: one of the two always happens.
//!
//! # What may block
//!
//! Only the invalidator waits, and only for readers' batches and pins; it holds no lock a reader
//! takes while it waits. Readers never wait for the invalidator: a fill that collides falls back
//! to the translating path for that batch.

use crate::sync::{
    fence, futex_wait, futex_wake, heavy_fence, init_asymmetric, light_fence, wait_step, yield_now, Arc, AtomicBool,
    AtomicU32, AtomicU64, Mutex,
};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

/// The most translations one gate's cache holds (a split ring has 3, a packed ring 3).
pub const MAX_CACHED: usize = 4;

/// How many times the invalidator spins on a busy batch before it sleeps on the futex.
#[cfg(not(vireo_loom))]
const SPIN_BEFORE_SLEEP: u32 = 512;
#[cfg(vireo_loom)]
const SPIN_BEFORE_SLEEP: u32 = 0;

/// What the protocol knows of a region (or of a dirty log): a slot that readers pin, a unique id
/// that caches record, and the flag that turns new pins away once retirement has begun.
#[derive(Debug)]
pub struct RegionTag {
    /// Unique for the life of the process (ids are never reused, slots are).
    pub id: u64,
    /// Index into every gate's pin counters.
    pub slot: usize,
    retiring: AtomicBool,
}

impl RegionTag {
    /// A tag for a region about to be published.
    pub fn new(id: u64, slot: usize) -> Self {
        Self { id, slot, retiring: AtomicBool::new(false) }
    }

    /// Whether an invalidation has begun to retire the region.
    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Acquire)
    }
}

/// One queue's side of the protocol.
#[derive(Debug)]
pub struct Gate {
    /// `2 * batches + active`, wrapping; also the futex word waiters sleep on.
    state: AtomicU32,
    /// How many invalidators sleep on `state` (so that `leave` knows to wake them).
    waiters: AtomicU32,
    /// How many invalidators wait for the batch in progress to end: a hint the reader reads to
    /// end its batch early ([`Gate::yield_requested`]). No correctness rests on it.
    yield_wanted: AtomicU32,
    pins: Box<[AtomicU32]>,
    cache_valid: AtomicBool,
    cache_ids: [AtomicU64; MAX_CACHED],
}

impl Gate {
    fn new(num_slots: usize) -> Self {
        Self {
            state: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            yield_wanted: AtomicU32::new(0),
            pins: (0..num_slots).map(|_| AtomicU32::new(0)).collect(),
            cache_valid: AtomicBool::new(false),
            cache_ids: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Reader: begins a batch and says whether the cached translation may be used in it.
    #[inline]
    pub fn enter(&self) -> bool {
        // Only the reader writes `state`, so a load + store is an increment. Release, although
        // this store publishes nothing of the new batch: an invalidator waiting for the previous
        // batch may first see this value rather than that batch's `leave`, and must then still
        // synchronize with everything before it (a Relaxed store here does not continue the
        // release sequence of `leave`; loom found that).
        let s = self.state.load(Relaxed);
        self.state.store(s.wrapping_add(1), Release);
        // The reader's half of the Dekker handshake with the invalidator's "clear `cache_valid`,
        // fence, load `state`" (`invalidate_start`, `quiesce`, `wait_batch_boundary`): either
        // the invalidator sees this batch as active and waits for it, or this load sees the cache
        // cleared (and any flag stored before the invalidator's fence).
        light_fence();
        self.cache_valid.load(Relaxed)
    }

    /// Reader: ends the batch. Every pointer obtained in it is dead from here on.
    #[inline]
    pub fn leave(&self) {
        // Only the reader writes `state`, so a load + store is an increment. Release: pairs with
        // the Acquire in `wait_batch_boundary`, so the batch's accesses happen-before whatever the
        // invalidator does after seeing the batch end.
        let s = self.state.load(Relaxed);
        self.state.store(s.wrapping_add(1), Release);
        // Dekker with `wait_batch_boundary`'s "waiters += 1, fence, load `state`, sleep": either
        // the sleeper sees the new state and does not sleep, or this load sees it and wakes it.
        light_fence();
        if self.waiters.load(Relaxed) != 0 {
            futex_wake(&self.state);
            // When busy readers fill every core, the woken invalidator has no core to run on
            // until the scheduler takes one from a reader, possibly mid-batch of another gate it
            // must then wait for. Handing over this core at a batch boundary is what bounds the
            // oversubscribed case (BENCHMARKS.md).
            yield_now();
        }
    }

    /// Reader: pins `tag`'s slot for an access. `false` means the region is being retired: do not
    /// use it, look the address up again in the newest map.
    #[inline]
    pub fn pin(&self, tag: &RegionTag) -> bool {
        let Some(pin) = self.pins.get(tag.slot) else { return false };
        pin.fetch_add(1, Relaxed);
        // The reader's half of the Dekker handshake with the invalidator's "`retiring = true`,
        // fence, load `pins`" in `invalidate_start`.
        light_fence();
        // Acquire: pairs with the Release store of `retiring`, so the map the caller looks up
        // next is the one published before it.
        if tag.retiring.load(Acquire) {
            self.unpin(tag.slot);
            return false;
        }
        true
    }

    /// Adds a pin to a slot that the caller's batch holds (an I/O taking over a batch's buffer):
    /// pinned, or under the batch's valid cache. No retiring check is needed: the held pin keeps
    /// the invalidator waiting, or the cache does (it waits for the batch to end before it looks
    /// at pins).
    pub fn pin_again(&self, slot: usize) {
        if let Some(pin) = self.pins.get(slot) {
            // Relaxed: ordering comes from what holds the slot: a pin whose SeqCst increment the
            // invalidator's wait has to see undone first, or the batch, whose Release `leave` the
            // invalidator acquires before it loads the pins.
            pin.fetch_add(1, Relaxed);
        }
    }

    /// Reader: whether an invalidator waits for the batch in progress; the reader then ends the
    /// batch as soon as it can (a bounded batch ends anyway; this makes it end now).
    #[inline(always)]
    pub fn yield_requested(&self) -> bool {
        // Relaxed: a hint; the invalidator waits correctly whether or not it is seen.
        self.yield_wanted.load(Relaxed) != 0
    }

    /// Reader (or an I/O completion): drops one pin on `slot`.
    #[inline]
    pub fn unpin(&self, slot: usize) {
        if let Some(pin) = self.pins.get(slot) {
            // Release: pairs with the Acquire in `wait_unpinned`, so the accesses made under the
            // pin happen-before the retirement of the mapping.
            pin.fetch_sub(1, Release);
        }
    }

    /// Reader, inside a batch: publishes a cache filled with translations into the regions `ids`,
    /// if no invalidation started or ended since `read_begin` returned `seq`. `false` means the
    /// fill collided and the translations must not be used.
    pub fn publish_cache(&self, domain: &Domain, seq: u64, ids: &[u64]) -> bool {
        for (slot, id) in self.cache_ids.iter().zip(ids.iter().copied().chain(std::iter::repeat(0))) {
            // Relaxed: made visible by the Release store of `cache_valid` below, which the
            // invalidator loads with Acquire before it reads the ids.
            slot.store(id, Relaxed);
        }
        self.cache_valid.store(true, Release);
        // read_retry: the reader's half of the Dekker handshake with the invalidator's
        // "`seq += 1`, fence, load `cache_valid`": either the invalidator sees this cache and
        // invalidates it (waiting for the batch), or this load sees `seq` moved.
        light_fence();
        if domain.seq.load(Relaxed) != seq {
            self.cache_valid.store(false, Relaxed);
            return false;
        }
        true
    }

    /// Reader: forgets its cached translation (the ring moved, say).
    pub fn drop_cache(&self) {
        // Relaxed: only this thread uses the cache, and an invalidator that still sees it valid
        // merely waits for a batch it did not need to.
        self.cache_valid.store(false, Relaxed);
    }

    /// Invalidator: whether the reader is inside a batch now.
    pub fn is_in_batch(&self) -> bool {
        self.state.load(Acquire) % 2 == 1
    }

    /// Invalidator: waits until the batch in progress, if any, has ended. Batches that begin
    /// afterwards see every SeqCst store the caller made before calling.
    pub fn wait_batch_boundary(&self) {
        // The invalidator's half of the Dekker handshake in `enter`: whatever the caller stored
        // before this fence is seen by a batch that this load does not see active.
        heavy_fence();
        self.wait_batch_boundary_fenced();
    }

    /// [`Gate::wait_batch_boundary`] for a caller that has run [`heavy_fence`] after its last
    /// store that batches must see (one barrier for many gates).
    fn wait_batch_boundary_fenced(&self) {
        // Acquire even for this first load: if it reads the `leave` of a batch that has already
        // ended, that batch's accesses must happen-before what the caller does next (loom found
        // the Relaxed version of this load wanting: an ended batch's write escaped the dirty log).
        let s = self.state.load(Acquire);
        if s.is_multiple_of(2) {
            return;
        }
        let mut round = 0u32;
        // Relaxed: a hint (see `yield_requested`).
        self.yield_wanted.fetch_add(1, Relaxed);
        // Acquire: pairs with the Release store in `leave`.
        while self.state.load(Acquire) == s {
            // A running reader ends a batch within a microsecond or so: spin that long. Longer
            // means it is descheduled mid-batch; sleeping on the futex hands it our core, and
            // its `leave` wakes us.
            if round < SPIN_BEFORE_SLEEP {
                std::hint::spin_loop();
                round += 1;
                continue;
            }
            self.waiters.fetch_add(1, Relaxed);
            // A full fence, not the membarrier: `leave` has only a compiler barrier between its
            // store of `state` and its load of `waiters`, so on rare occasions (its store still
            // in the store buffer) both sides miss each other and no wake comes; the futex wait
            // is bounded (1 ms) and the loop looks again. The membarrier would rule that out,
            // but it costs an IPI to every core running a reader (17 µs on the Intel VM of
            // BENCHMARKS.md), once per sleep: with 8 busy readers on 2 cores the median
            // invalidation took 1.15 ms with it and 80 µs without.
            fence(SeqCst);
            if self.state.load(Relaxed) == s {
                futex_wait(&self.state, s);
            }
            self.waiters.fetch_sub(1, Relaxed);
        }
        self.yield_wanted.fetch_sub(1, Relaxed);
    }

    /// Invalidator: makes sure the reader will not use its cached translation again; waits for a
    /// batch that may be using it. Used when a ring moves or a queue stops.
    pub fn quiesce(&self) {
        self.cache_valid.store(false, Relaxed);
        self.wait_batch_boundary();
    }

    /// Clears the cache if it is valid and uses one of `ids`; says whether it did.
    fn clear_cache_using(&self, ids: &[u64]) -> bool {
        if self.cache_uses(ids) {
            // Relaxed: the caller's barrier orders it before its load of `state`.
            self.cache_valid.store(false, Relaxed);
            return true;
        }
        false
    }

    fn cache_uses(&self, ids: &[u64]) -> bool {
        // Acquire: pairs with the Release store in `publish_cache`, so the ids read below are
        // the ones published with it.
        if !self.cache_valid.load(Acquire) {
            return false;
        }
        self.cache_ids.iter().any(|c| {
            let c = c.load(Relaxed);
            c != 0 && ids.contains(&c)
        })
    }

    fn wait_unpinned(&self, slot: usize) {
        let Some(pin) = self.pins.get(slot) else { return };
        // `invalidate_start` fenced after setting `retiring`: this load is the invalidator's half
        // of the Dekker handshake in `pin`.
        if pin.load(Acquire) == 0 {
            return;
        }
        // Batch pins go when the batch ends, so wait for that on the futex first (nothing stored
        // here needs a new batch to see it: no barrier); what remains is held by I/O in flight,
        // which is polled.
        self.wait_batch_boundary_fenced();
        let mut round = 0;
        // Acquire: pairs with the Release in `unpin`.
        while pin.load(Acquire) != 0 {
            wait_step(round);
            round = round.saturating_add(1);
        }
    }

    /// The number of pins held on `slot` now (tests and diagnostics).
    pub fn pins_on(&self, slot: usize) -> u32 {
        self.pins.get(slot).map_or(0, |p| p.load(Acquire))
    }
}

/// The protocol state shared by all queues of one device: the invalidation sequence and the set
/// of gates to quiesce.
#[derive(Debug)]
pub struct Domain {
    seq: AtomicU64,
    num_slots: usize,
    gates: Mutex<Vec<Arc<Gate>>>,
}

impl Domain {
    /// A domain whose regions use slots `0..num_slots`.
    pub fn new(num_slots: usize) -> Self {
        // Before any reader of this domain exists: readers rely on the invalidator's membarrier
        // from their first batch.
        init_asymmetric();
        Self { seq: AtomicU64::new(0), num_slots, gates: Mutex::new(Vec::new()) }
    }

    /// Registers a new reader.
    pub fn register(&self) -> Arc<Gate> {
        let gate = Arc::new(Gate::new(self.num_slots));
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).push(gate.clone());
        gate
    }

    /// Forgets a reader (its queue is gone).
    pub fn unregister(&self, gate: &Arc<Gate>) {
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).retain(|g| !Arc::ptr_eq(g, gate));
    }

    fn gates(&self) -> Vec<Arc<Gate>> {
        // The registry lock is held only to copy the list: never while waiting on a reader.
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reader: `mmu_interval_read_begin`. `None` while an invalidation is in progress: then no
    /// fill may publish, and the reader uses the translating path for this batch.
    #[inline]
    pub fn read_begin(&self) -> Option<u64> {
        // Acquire: pairs with the Release increment that ended the last invalidation.
        let s = self.seq.load(Acquire);
        s.is_multiple_of(2).then_some(s)
    }

    /// Invalidator: retires `tags`. `publish` runs first, and is where the caller installs the map
    /// without them, so that readers turned away from a retiring tag find its replacement. When this returns,
    /// no reader holds or will use a pointer into any of the tags' regions; until the returned
    /// [`Invalidation`] ends, no cache fill publishes.
    pub fn invalidate_start(&self, tags: &[&RegionTag], publish: impl FnOnce()) -> Invalidation<'_> {
        self.seq.fetch_add(1, Relaxed);
        // Publish first, so that a reader whose pin is refused finds the new map when it looks
        // again: Release pairs with the Acquire load of `retiring` in `pin`.
        publish();
        for tag in tags {
            tag.retiring.store(true, Release);
        }
        let ids: Vec<u64> = tags.iter().map(|t| t.id).collect();
        let gates = self.gates();
        // Caches that use a retired region are cleared before the barrier below, so that one
        // barrier serves three handshakes (one `membarrier` per invalidation in the common case):
        // with `enter` (it stored `state`, fenced, loads `cache_valid`; we stored `cache_valid`,
        // fence, load `state`), with `pin` (it stored `pins`, fenced, loads `retiring`; we stored
        // `retiring`, fence, load `pins`) and with `publish_cache` (it stored `cache_valid`,
        // fenced, loads `seq`; we stored `seq`, fence, load `cache_valid` below).
        let mut caching: Vec<bool> = gates.iter().map(|gate| gate.clear_cache_using(&ids)).collect();
        heavy_fence();
        // A cache published before the barrier and not seen above (its store was still on its
        // way) is seen now; it must be cleared too, and that clearing needs its own barrier
        // before `state` is looked at. Rare: a fill that raced with this invalidation.
        let mut again = false;
        for (gate, caching) in gates.iter().zip(caching.iter_mut()) {
            if gate.clear_cache_using(&ids) {
                *caching = true;
                again = true;
            }
        }
        if again {
            heavy_fence();
        }
        for (gate, caching) in gates.iter().zip(caching) {
            if caching {
                gate.wait_batch_boundary_fenced();
            }
            for tag in tags {
                gate.wait_unpinned(tag.slot);
            }
        }
        Invalidation { domain: self }
    }

    /// Invalidator: waits for every batch in progress to end, after the caller has changed a
    /// SeqCst flag that batches read after `enter` (logging switched on, say).
    pub fn quiesce_all(&self) {
        heavy_fence();
        for gate in self.gates() {
            gate.wait_batch_boundary_fenced();
        }
    }

    /// Invalidator: [`Gate::quiesce`] on every gate: no cached translation of any queue is used
    /// again, and every batch in progress has ended (the way addresses translate changed).
    pub fn quiesce_all_caches(&self) {
        let gates = self.gates();
        for gate in &gates {
            gate.cache_valid.store(false, Relaxed);
        }
        heavy_fence();
        for gate in &gates {
            gate.wait_batch_boundary_fenced();
        }
    }

    /// The current sequence (tests and diagnostics).
    pub fn seq(&self) -> u64 {
        self.seq.load(Acquire)
    }
}

/// An invalidation between start and end. Ends when dropped.
#[must_use = "an invalidation ends when dropped; keep it until the retired mappings are gone"]
#[derive(Debug)]
pub struct Invalidation<'d> {
    domain: &'d Domain,
}

impl Invalidation<'_> {
    /// Ends the invalidation: cache fills may publish again.
    pub fn end(self) {}
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire in `read_begin`; the retirement is done.
        self.domain.seq.fetch_add(1, Release);
    }
}
