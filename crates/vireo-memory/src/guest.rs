//! Guest memory of one device: the control side that changes it ([`GuestMemory`]) and the reader
//! side that queue workers use ([`QueueMemory`], [`Batch`]).
//!
//! Every change that retires memory (a new memory table, a removed region, a new dirty log) runs
//! through [`Domain::invalidate_start`] before the call returns, so a caller that replies to the
//! frontend after the call has made the reply the barrier: no thread touches the retired mapping
//! any more, and the mapping is gone (or `PROT_NONE` in the test mode).

use std::cell::{Cell, RefCell};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc as StdArc, Mutex as StdMutex, MutexGuard};

use crate::access::GuestSlice;
use crate::addr::GuestPhysAddr;
use crate::dirty::{DirtyLog, LogCache};
use crate::error::MemoryError;
use crate::iotlb::{edit, IotlbEntry, IotlbFault, IotlbTable, Perm, MAX_IOTLB_ENTRIES};
use crate::map::{MemoryMap, Region, RegionSpec, MAX_REGIONS};
use crate::mmap::RetireMode;
use crate::protocol::{Domain, Gate, RegionTag, MAX_CACHED};
use crate::sync::Arc;

/// Region slots: a memory table may be replaced while the old one still holds its slots, so
/// twice the map's maximum, plus two slots that dirty logs alternate between and two that IOTLB
/// generations alternate between.
const REGION_SLOTS: usize = 2 * MAX_REGIONS;
const LOG_SLOTS: [usize; 2] = [REGION_SLOTS, REGION_SLOTS + 1];
const IOTLB_SLOTS: [usize; 2] = [REGION_SLOTS + 2, REGION_SLOTS + 3];
const NUM_SLOTS: usize = REGION_SLOTS + 4;

/// Ids start at 1: 0 means "no region" in a gate's cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

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

/// The guest memory of one device, as the control side sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    shared: StdArc<Shared>,
}

impl Default for GuestMemory {
    fn default() -> Self {
        Self::new(RetireMode::from_env())
    }
}

impl GuestMemory {
    /// Empty guest memory whose retired mappings are handled as `mode` says.
    pub fn new(mode: RetireMode) -> Self {
        Self {
            shared: StdArc::new(Shared {
                domain: Domain::new(NUM_SLOTS),
                mode,
                writer: StdMutex::new(Writer { free_slots: (0..REGION_SLOTS).rev().collect() }),
                current: StdMutex::new(StdArc::new(MemoryMap::empty())),
                map_gen: AtomicU64::new(0),
                log: StdMutex::new(None),
                log_gen: AtomicU64::new(0),
                logging: AtomicBool::new(false),
                iotlb: StdMutex::new(None),
                iotlb_gen: AtomicU64::new(0),
                last_invalidation_ns: AtomicU64::new(0),
                last_quiesce_ns: AtomicU64::new(0),
            }),
        }
    }

    /// The map in force now.
    pub fn map(&self) -> StdArc<MemoryMap> {
        lock(&self.shared.current).clone()
    }

    /// The retirement mode.
    pub fn retire_mode(&self) -> RetireMode {
        self.shared.mode
    }

    /// The protocol domain (benchmarks and tests look at its gates).
    pub fn domain(&self) -> &Domain {
        &self.shared.domain
    }

    fn map_regions(&self, w: &mut Writer, specs: &[RegionSpec<'_>]) -> Result<Vec<StdArc<Region>>, MemoryError> {
        let mut mapped = Vec::with_capacity(specs.len());
        for spec in specs {
            let Some(slot) = w.free_slots.pop() else {
                release_slots(w, &mapped);
                return Err(MemoryError::TooManyRegions { max: MAX_REGIONS });
            };
            match Region::map(spec, RegionTag::new(next_id(), slot)) {
                Ok(r) => mapped.push(StdArc::new(r)),
                Err(e) => {
                    w.free_slots.push(slot);
                    release_slots(w, &mapped);
                    return Err(e);
                }
            }
        }
        Ok(mapped)
    }

    /// SET_MEM_TABLE: replaces every region. On error nothing changes and the old map keeps
    /// serving. On success every old mapping is retired before this returns.
    pub fn set_regions(&self, specs: &[RegionSpec<'_>]) -> Result<(), MemoryError> {
        if specs.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions { max: MAX_REGIONS });
        }
        for spec in specs {
            spec.validate()?;
        }
        let mut w = lock(&self.shared.writer);
        let mapped = self.map_regions(&mut w, specs)?;
        let new_map = match MemoryMap::from_regions(mapped.clone()) {
            Ok(m) => m,
            Err(e) => {
                release_slots(&mut w, &mapped);
                return Err(e);
            }
        };
        let old = self.map();
        self.retire(&mut w, old.regions().to_vec(), new_map);
        Ok(())
    }

    /// ADD_MEM_REG: adds one region. Nothing is retired, so nobody is waited for.
    pub fn add_region(&self, spec: &RegionSpec<'_>) -> Result<(), MemoryError> {
        spec.validate()?;
        let mut w = lock(&self.shared.writer);
        let old = self.map();
        if old.len() >= MAX_REGIONS {
            return Err(MemoryError::TooManyRegions { max: MAX_REGIONS });
        }
        let mapped = self.map_regions(&mut w, std::slice::from_ref(spec))?;
        let mut all = old.regions().to_vec();
        all.extend(mapped.iter().cloned());
        match MemoryMap::from_regions(all) {
            Ok(m) => {
                self.publish_map(m);
                Ok(())
            }
            Err(e) => {
                release_slots(&mut w, &mapped);
                Err(e)
            }
        }
    }

    /// REM_MEM_REG: removes the region matching all three of `gpa`, `size` and `user_addr`.
    /// When this returns no thread can touch the region's mapping.
    pub fn remove_region(
        &self,
        gpa: GuestPhysAddr,
        size: u64,
        user_addr: crate::addr::UserAddr,
    ) -> Result<(), MemoryError> {
        let mut w = lock(&self.shared.writer);
        let old = self.map();
        let index =
            old.position(gpa, size, user_addr).ok_or_else(|| MemoryError::NoSuchRegion { gpa, size, user_addr })?;
        let mut keep = old.regions().to_vec();
        let gone = keep.remove(index);
        let new_map = MemoryMap::from_regions(keep)?;
        self.retire(&mut w, vec![gone], new_map);
        Ok(())
    }

    fn publish_map(&self, map: MemoryMap) {
        *lock(&self.shared.current) = StdArc::new(map);
        // Release: pairs with the Acquire in `QueueMemory::batch`; a reader that sees the new
        // generation then takes the lock and gets the new map.
        self.shared.map_gen.fetch_add(1, Release);
    }

    fn retire(&self, w: &mut Writer, gone: Vec<StdArc<Region>>, new_map: MemoryMap) {
        let tags: Vec<&RegionTag> = gone.iter().map(|r| &r.tag).collect();
        let started = std::time::Instant::now();
        let invalidation = self.shared.domain.invalidate_start(&tags, || self.publish_map(new_map));
        self.note_quiesce(started);
        // Fills may publish again as soon as no reader can use the retired mappings: they
        // translate with the new map. Retiring the mappings (munmap, the slow part) comes after,
        // still before the caller replies.
        invalidation.end();
        self.note_invalidation(started);
        for r in &gone {
            // SAFETY: `invalidate_start` returned: no reader holds or will use a pointer into the
            // retired regions (the protocol's guarantee), and the regions are out of the map.
            unsafe { r.mapping.retire(self.shared.mode) };
        }
        release_slots(w, &gone);
        tracing::debug!(retired = gone.len(), "guest memory regions retired");
    }

    /// SET_LOG_BASE: maps a new dirty log and retires the old one.
    pub fn set_dirty_log(&self, fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<(), MemoryError> {
        let _w = lock(&self.shared.writer);
        let old = lock(&self.shared.log).clone();
        let slot = match &old {
            Some(l) if l.tag.slot == LOG_SLOTS[0] => LOG_SLOTS[1],
            _ => LOG_SLOTS[0],
        };
        let log = DirtyLog::map(fd, offset, size, RegionTag::new(next_id(), slot))?;
        self.replace_log(old, Some(StdArc::new(log)));
        Ok(())
    }

    /// Drops the dirty log (the frontend is gone, or logging has ended for good).
    pub fn clear_dirty_log(&self) {
        let _w = lock(&self.shared.writer);
        let old = lock(&self.shared.log).clone();
        self.replace_log(old, None);
    }

    fn replace_log(&self, old: Option<StdArc<DirtyLog>>, new: Option<StdArc<DirtyLog>>) {
        let publish = || {
            *lock(&self.shared.log) = new;
            self.shared.log_gen.fetch_add(1, Release);
        };
        match &old {
            Some(old) => {
                let started = std::time::Instant::now();
                let invalidation = self.shared.domain.invalidate_start(&[&old.tag], publish);
                self.note_quiesce(started);
                invalidation.end();
                self.note_invalidation(started);
                // SAFETY: `invalidate_start` returned: no batch holds the old log any more, and it
                // is no longer published, so none will pin it again.
                unsafe { old.mapping.retire(self.shared.mode) };
            }
            None => {
                publish();
                // Batches that began before see no log; every one that begins after this sees
                // the new one. (With logging on, a write in such a batch is refused as
                // unloggable, never left out of the log.)
                self.shared.domain.quiesce_all();
            }
        }
    }

    fn note_quiesce(&self, started: std::time::Instant) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.last_quiesce_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the last invalidation waited for readers (from its start until no reader could
    /// use the retired translation).
    pub fn last_quiesce(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.shared.last_quiesce_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn note_invalidation(&self, started: std::time::Instant) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.last_invalidation_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the last invalidation took from its start to its end (the unmapping of the retired
    /// mappings, which follows, not included).
    pub fn last_invalidation(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.shared.last_invalidation_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs `f` on the dirty log in force (tests read its bits), with the control side held so
    /// that no `set_dirty_log` retires it meanwhile; the log cannot be kept past the call.
    pub fn with_dirty_log<R>(&self, f: impl FnOnce(&DirtyLog) -> R) -> Option<R> {
        let _w = lock(&self.shared.writer);
        let log = lock(&self.shared.log).clone()?;
        Some(f(&log))
    }

    /// Whether the frontend shrank a file under one of the mappings in force (guest memory or the
    /// dirty log) and an access faulted past its end (`sigbus.rs`): the connection must end.
    pub fn poisoned(&self) -> bool {
        self.map().regions().iter().any(|r| r.mapping.poisoned())
            || lock(&self.shared.log).as_ref().is_some_and(|l| l.mapping.poisoned())
    }

    /// VHOST_F_LOG_ALL on or off. Switching on waits for every batch in progress to end, so that
    /// every write after this returns is logged.
    pub fn set_logging(&self, on: bool) {
        let _w = lock(&self.shared.writer);
        // SeqCst: read by `QueueMemory::batch` after the SeqCst `Gate::enter`.
        self.shared.logging.store(on, SeqCst);
        if on {
            self.shared.domain.quiesce_all();
        }
    }

    /// Whether logging is on.
    pub fn logging(&self) -> bool {
        self.shared.logging.load(SeqCst)
    }

    /// Turns address translation through an IOTLB on (VIRTIO_F_ACCESS_PLATFORM negotiated: the
    /// driver's addresses are IOVAs from now on) or off. Switching on starts with an empty IOTLB
    /// and waits for every batch in progress, whose cached rings were translated as guest
    /// physical addresses; switching off retires the IOTLB like an invalidation of everything.
    pub fn set_iotlb_enabled(&self, on: bool) {
        let _w = lock(&self.shared.writer);
        let old = lock(&self.shared.iotlb).clone();
        match (on, old) {
            (true, None) => {
                let tag = StdArc::new(RegionTag::new(next_id(), IOTLB_SLOTS[0]));
                let table = StdArc::new(IotlbTable::new(Vec::new(), tag));
                // An invalidation of nothing, so that a cache fill racing with the switch (one
                // that translated as guest physical) collides and is not published, and every
                // cache there is dropped.
                let invalidation = self.shared.domain.invalidate_start(&[], || self.publish_iotlb(Some(table)));
                self.shared.domain.quiesce_all_caches();
                invalidation.end();
            }
            (false, Some(old)) => {
                let started = std::time::Instant::now();
                let invalidation = self.shared.domain.invalidate_start(&[&old.tag], || self.publish_iotlb(None));
                self.note_quiesce(started);
                invalidation.end();
                self.note_invalidation(started);
            }
            _ => {}
        }
    }

    /// The IOTLB in force (tests look at it).
    pub fn iotlb(&self) -> Option<StdArc<IotlbTable>> {
        lock(&self.shared.iotlb).clone()
    }

    /// Moves on every IOTLB change: a queue parked on a miss retries when it has moved.
    pub fn iotlb_generation(&self) -> u64 {
        self.shared.iotlb_gen.load(Acquire)
    }

    fn publish_iotlb(&self, table: Option<StdArc<IotlbTable>>) {
        *lock(&self.shared.iotlb) = table;
        // Release: pairs with the Acquire in `QueueMemory::batch`.
        self.shared.iotlb_gen.fetch_add(1, Release);
    }

    /// IOTLB update: `entry` becomes usable. Adding to what is there needs no quiesce (nothing a
    /// reader holds is wrong); an entry that overlaps others replaces them, which retires them
    /// first like an invalidation; a full table is dropped first (misses refill it).
    pub fn iotlb_update(&self, entry: IotlbEntry) -> Result<(), MemoryError> {
        if !entry.is_valid() {
            return Err(MemoryError::BadIotlbEntry { iova: entry.iova, size: entry.size, uaddr: entry.uaddr });
        }
        let _w = lock(&self.shared.writer);
        let old = lock(&self.shared.iotlb).clone().ok_or(MemoryError::IotlbDisabled)?;
        if edit::contains_exactly(old.entries(), &entry) {
            return Ok(());
        }
        if edit::overlaps(old.entries(), &entry) {
            let (kept, _) = edit::remove_range(old.entries(), entry.iova, entry.size);
            // Cutting an entry in two adds one: the cap holds here too.
            let kept = if kept.len() >= MAX_IOTLB_ENTRIES { Vec::new() } else { kept };
            self.iotlb_retire(&old, edit::insert(&kept, entry));
        } else if old.entries().len() >= MAX_IOTLB_ENTRIES {
            tracing::debug!(entries = old.entries().len(), "IOTLB full: dropped");
            self.iotlb_retire(&old, vec![entry]);
        } else {
            let table = IotlbTable::new(edit::insert(old.entries(), entry), old.tag.clone());
            self.publish_iotlb(Some(StdArc::new(table)));
        }
        Ok(())
    }

    /// IOTLB invalidate: `[iova, iova + size)` is taken back. When this returns no thread, and no
    /// I/O in flight, uses a translation through it. A range that holds no entry costs nothing.
    pub fn iotlb_invalidate(&self, iova: u64, size: u64) -> Result<(), MemoryError> {
        let _w = lock(&self.shared.writer);
        let old = lock(&self.shared.iotlb).clone().ok_or(MemoryError::IotlbDisabled)?;
        let (kept, removed) = edit::remove_range(old.entries(), iova, size);
        if removed {
            self.iotlb_retire(&old, kept);
        }
        Ok(())
    }

    /// Publishes `entries` under a new generation and retires `old`'s: every cache filled through
    /// it is cleared and every batch and I/O pin on it waited for.
    fn iotlb_retire(&self, old: &IotlbTable, entries: Vec<IotlbEntry>) {
        let slot = if old.tag.slot == IOTLB_SLOTS[0] { IOTLB_SLOTS[1] } else { IOTLB_SLOTS[0] };
        let table = IotlbTable::new(entries, StdArc::new(RegionTag::new(next_id(), slot)));
        let started = std::time::Instant::now();
        let invalidation =
            self.shared.domain.invalidate_start(&[&old.tag], || self.publish_iotlb(Some(StdArc::new(table))));
        self.note_quiesce(started);
        invalidation.end();
        self.note_invalidation(started);
    }

    /// A reader for one queue.
    pub fn register_queue(&self) -> QueueMemory {
        let gate = self.shared.domain.register();
        QueueMemory {
            shared: self.shared.clone(),
            gate,
            map: self.map(),
            map_gen: u64::MAX,
            log: None,
            log_gen: u64::MAX,
            iotlb: None,
            iotlb_gen: u64::MAX,
            cache: LocalCache::default(),
            log_cache: LogCache::new(),
            force_translating: false,
        }
    }
}

fn release_slots(w: &mut Writer, regions: &[StdArc<Region>]) {
    w.free_slots.extend(regions.iter().map(|r| r.tag.slot));
}

/// A handle the control side keeps for one queue, to quiesce it.
#[derive(Debug, Clone)]
pub struct QueueHandle {
    gate: Arc<Gate>,
}

impl QueueHandle {
    /// Makes sure the queue will not use its cached translation again and waits for a batch that
    /// may be using it (the ring moved, the queue stops). Flags the caller stored with SeqCst
    /// before this call are seen by every later batch that loads them with SeqCst.
    pub fn quiesce(&self) {
        self.gate.quiesce();
    }

    /// The queue's gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

#[derive(Debug, Clone, Copy)]
struct LocalCache {
    /// The guest ranges the cache was filled for.
    ranges: [(u64, u64); MAX_CACHED],
    count: usize,
    /// Host address and length of each range.
    views: [(usize, usize); MAX_CACHED],
    /// The whole region the first range lies in (without an IOTLB; `LastRegion::NONE` behind
    /// one): a batch that uses the cache starts with it as its last region, so that buffers in
    /// the rings' region (usually all of them) translate without pinning it. The cache keeps it
    /// mapped for the batch as it keeps the rings: an invalidation that retires a region the
    /// cache points into clears the cache and waits for the batch in progress to end before it
    /// looks at pins (`Domain::invalidate_start`), so the region stays until the batch ends, and
    /// an I/O pin taken on it during the batch (`Gate::pin_again`) is seen by that look.
    window: LastRegion,
    /// The id of that region.
    window_id: u64,
}

impl Default for LocalCache {
    fn default() -> Self {
        Self {
            ranges: [(0, 0); MAX_CACHED],
            count: 0,
            views: [(0, 0); MAX_CACHED],
            window: LastRegion::NONE,
            window_id: 0,
        }
    }
}

/// One queue's view of guest memory: the reader side of the protocol. Owned by the thread that
/// runs the queue.
#[derive(Debug)]
pub struct QueueMemory {
    shared: StdArc<Shared>,
    gate: Arc<Gate>,
    map: StdArc<MemoryMap>,
    map_gen: u64,
    log: Option<StdArc<DirtyLog>>,
    log_gen: u64,
    iotlb: Option<StdArc<IotlbTable>>,
    iotlb_gen: u64,
    cache: LocalCache,
    log_cache: LogCache,
    force_translating: bool,
}

impl Drop for QueueMemory {
    fn drop(&mut self) {
        self.shared.domain.unregister(&self.gate);
    }
}

/// A range of guest memory a queue wants cached for direct access (a ring).
pub type CachedRange = (GuestPhysAddr, u64);

impl QueueMemory {
    /// The control side's handle on this queue.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle { gate: self.gate.clone() }
    }

    /// Forces every batch onto the translating path (to test and measure the fallback).
    pub fn set_force_translating(&mut self, on: bool) {
        self.force_translating = on;
        if on {
            self.gate.drop_cache();
        }
    }

    /// Moves on every IOTLB change (see [`GuestMemory::iotlb_generation`]).
    pub fn iotlb_generation(&self) -> u64 {
        self.shared.iotlb_gen.load(Acquire)
    }

    /// Moves every time this queue's batches set bits in the dirty log.
    pub fn log_flushes(&self) -> u64 {
        self.log_cache.flushes()
    }

    /// Begins a batch. `ranges` (at most [`MAX_CACHED`], one fewer behind a vIOMMU) are the
    /// guest ranges the caller wants direct pointers to, for reading and writing;
    /// [`Batch::cached`] has them when the cache is valid and could be (re)filled.
    #[inline]
    pub fn batch(&mut self, ranges: &[CachedRange]) -> Batch<'_> {
        self.batch_for(ranges, &[Perm::RW; MAX_CACHED])
    }

    /// [`QueueMemory::batch`] with the access each range needs (`perms[i]` for `ranges[i]`),
    /// which an IOTLB checks.
    #[inline]
    pub fn batch_for(&mut self, ranges: &[CachedRange], perms: &[Perm; MAX_CACHED]) -> Batch<'_> {
        let cache_valid = self.gate.enter();
        // Acquire: pairs with the Release in `publish_map`.
        let gen = self.shared.map_gen.load(Acquire);
        if gen != self.map_gen {
            self.map = lock(&self.shared.current).clone();
            self.map_gen = gen;
        }
        // SeqCst: pairs with the SeqCst store in `set_logging` (after the fence in `enter`).
        let logging = self.shared.logging.load(SeqCst);
        let log = if logging { pin_log(&self.gate, &self.shared, &mut self.log, &mut self.log_gen) } else { None };
        // Acquire: pairs with the Release in `publish_iotlb`.
        let iotlb_gen = self.shared.iotlb_gen.load(Acquire);
        let iotlb_on = iotlb_gen != self.iotlb_gen || self.iotlb.is_some();
        let iotlb_slot =
            if iotlb_on { pin_iotlb(&self.gate, &self.shared, &mut self.iotlb, &mut self.iotlb_gen) } else { None };
        let cache_hit = !self.force_translating
            && !ranges.is_empty()
            && ranges.len() + usize::from(self.iotlb.is_some()) <= MAX_CACHED
            && self.use_or_fill_cache(cache_valid, ranges, perms);
        // The rings' region, held by the cache for this batch; not behind an IOTLB, where
        // addresses are IOVAs (a batch may find an IOTLB published under a cache filled without
        // one, before the control thread's quiesce clears it).
        let (held, held_id) = if cache_hit && self.iotlb.is_none() && self.cache.window.len != 0 {
            (self.cache.window, self.cache.window_id)
        } else {
            (LastRegion::NONE, 0)
        };
        Batch {
            gate: &self.gate,
            shared: &self.shared,
            map: RefCell::new(&mut self.map),
            pinned: RefCell::new(PinList::default()),
            last: Cell::new(held),
            held,
            held_id,
            cache_hit,
            logging,
            log,
            log_cache: RefCell::new(&mut self.log_cache),
            cache: &self.cache,
            iotlb: self.iotlb.as_deref(),
            iotlb_slot,
        }
    }

    #[inline]
    fn use_or_fill_cache(&mut self, cache_valid: bool, ranges: &[CachedRange], perms: &[Perm; MAX_CACHED]) -> bool {
        let c = &self.cache;
        let same =
            c.count == ranges.len() && ranges.iter().zip(c.ranges.iter()).all(|(a, b)| a.0.raw() == b.0 && a.1 == b.1);
        if cache_valid && same {
            return true;
        }
        if cache_valid {
            // The ranges changed under a valid cache: clear it before rewriting its ids.
            self.gate.drop_cache();
        }
        self.fill(ranges, perms).is_some()
    }

    #[cold]
    fn fill(&mut self, ranges: &[CachedRange], perms: &[Perm; MAX_CACHED]) -> Option<()> {
        let seq = self.shared.domain.read_begin()?;
        // Translate with a map taken *after* read_begin (the interval notifier's order: begin,
        // then walk, then retry). The map this batch loaded on entry may predate an invalidation
        // that has already ended and left `seq` even again; the stress test faulted on exactly
        // that before this check. Acquire pairs with the Release in `publish_map`, which comes
        // before the Release end of the invalidation that `read_begin` synchronized with.
        let gen = self.shared.map_gen.load(Acquire);
        if gen != self.map_gen {
            self.map = lock(&self.shared.current).clone();
            self.map_gen = gen;
        }
        let mut ids = [0u64; MAX_CACHED];
        let mut views = [(0usize, 0usize); MAX_CACHED];
        let (mut window, mut window_id) = (LastRegion::NONE, 0);
        for (i, &(gpa, len)) in ranges.iter().enumerate() {
            if len == 0 {
                return None;
            }
            let t = match &self.iotlb {
                None => self.map.translate(gpa)?,
                Some(tlb) => {
                    // The IOTLB snapshot is the one this batch pinned: its generation cannot be
                    // retired under us, and the cache records it below.
                    let (uaddr, avail) = tlb.translate(gpa.raw(), len, perms[i]).ok()?;
                    if avail < len {
                        return None;
                    }
                    self.map.translate_user(crate::addr::UserAddr::new(uaddr))?
                }
            };
            if t.avail < len {
                // The range spans two regions: no single pointer; the translating path serves it.
                return None;
            }
            let r = self.map.region(t.index);
            ids[i] = r.id();
            views[i] = (t.host, usize::try_from(len).ok()?);
            if i == 0 && self.iotlb.is_none() {
                window = LastRegion::whole(r);
                window_id = r.id();
            }
        }
        let mut n = ranges.len();
        if let Some(tlb) = &self.iotlb {
            ids[n] = tlb.generation_id();
            n += 1;
        }
        if !self.gate.publish_cache(&self.shared.domain, seq, &ids[..n]) {
            return None;
        }
        let c = &mut self.cache;
        c.count = ranges.len();
        for (i, r) in ranges.iter().enumerate() {
            c.ranges[i] = (r.0.raw(), r.1);
        }
        c.views = views;
        c.window = window;
        c.window_id = window_id;
        Some(())
    }
}

/// Pins the dirty log in force for a batch; `None` when there is none.
fn pin_log(
    gate: &Gate,
    shared: &Shared,
    log: &mut Option<StdArc<DirtyLog>>,
    log_gen: &mut u64,
) -> Option<StdArc<DirtyLog>> {
    loop {
        let gen = shared.log_gen.load(Acquire);
        if gen != *log_gen {
            *log = lock(&shared.log).clone();
            *log_gen = gen;
        }
        let l = log.as_ref()?;
        if gate.pin(&l.tag) {
            return Some(l.clone());
        }
        // The log is being replaced: its successor is published before the invalidator waits,
        // so the next round finds it. (No bound: a batch that gave up would go on without
        // logging; each round sees a newer log, and logs are replaced one at a time by the
        // control thread, which waits for the batches on the old one.)
        *log_gen = u64::MAX;
    }
}

/// Pins the IOTLB generation in force for a batch; returns its slot, or `None` when translation
/// does not go through an IOTLB (any more).
fn pin_iotlb(
    gate: &Gate,
    shared: &Shared,
    iotlb: &mut Option<StdArc<IotlbTable>>,
    iotlb_gen: &mut u64,
) -> Option<usize> {
    loop {
        let gen = shared.iotlb_gen.load(Acquire);
        if gen != *iotlb_gen {
            *iotlb = lock(&shared.iotlb).clone();
            *iotlb_gen = gen;
        }
        let t = iotlb.as_ref()?;
        if gate.pin(&t.tag) {
            return Some(t.tag.slot);
        }
        // Being retired: its successor was published before the retiring flag was set, so the
        // next round finds it. Invalidations come one at a time from the control thread; each
        // round sees a newer generation.
        *iotlb_gen = u64::MAX;
    }
}

/// A region this batch has translated into (and holds), as a linear range of the addresses
/// the driver uses (guest physical, or IOVAs behind an IOTLB) with the rights it allows.
#[derive(Debug, Clone, Copy)]
struct LastRegion {
    gpa: u64,
    len: u64,
    host: usize,
    /// The guest physical address `gpa` stands for (the same without an IOTLB).
    phys: u64,
    /// Slots are below NUM_SLOTS, which fits u16.
    slot: u16,
    perm: Perm,
    /// `len` for the accesses `perm` allows, 0 for the others: index 0 reading, 1 writing. The
    /// fast paths check the right and the bounds with one compare against `lim[writable]`.
    lim: [u64; 2],
}

/// The region a batch translated into last, as a linear window of the driver's addresses: a
/// device that translates many buffers in a row (a batch of receive buffers) checks each against
/// it with two compares. Valid for the batch (the region is pinned, or held by the batch's valid
/// cache, until it ends).
#[derive(Debug, Clone, Copy)]
pub struct Window<'b> {
    last: LastRegion,
    _batch: std::marker::PhantomData<&'b ()>,
}

impl Window<'static> {
    /// A window in which nothing is found.
    pub const EMPTY: Window<'static> = Window { last: LastRegion::NONE, _batch: std::marker::PhantomData };
}

impl<'b> Window<'b> {
    /// `len` bytes at `addr` for a buffer the device reads (`writable` false) or writes, when
    /// they lie inside the window: the right and the bounds in one compare.
    #[inline(always)]
    pub fn translate_for(&self, addr: GuestPhysAddr, len: u32, writable: bool) -> Option<Piece<'b>> {
        let l = &self.last;
        let lim = l.lim[usize::from(writable)];
        let off = addr.raw().wrapping_sub(l.gpa);
        if off >= lim || u64::from(len) > lim - off {
            return None;
        }
        // off < l.len, a mapping's length, which fits usize.
        #[allow(clippy::cast_possible_truncation)]
        let host = l.host + off as usize;
        // SAFETY: `host` is inside a mapping (off < l.len), so not null; the window is a region
        // the batch holds, pinned or under its valid cache (see `Batch::window`), it borrows the
        // batch and cannot outlive it, and `off + len <= l.len`.
        let slice = unsafe { GuestSlice::new(NonNull::new_unchecked(host as *mut u8), len as usize) };
        Some(Piece { slice, phys: GuestPhysAddr::new(l.phys + off), slot: l.slot })
    }
}

impl LastRegion {
    /// No region: every address falls outside it.
    const NONE: LastRegion = LastRegion { gpa: 0, len: 0, host: 0, phys: 0, slot: 0, perm: Perm::NONE, lim: [0, 0] };

    /// A whole region, addressed by guest physical addresses (no IOTLB), read and write.
    fn whole(r: &crate::map::Region) -> Self {
        let gpa = r.gpa().raw();
        Self::new(gpa, r.size(), r.mapping.as_ptr() as usize, gpa, slot16(r.slot()), Perm::RW)
    }

    fn new(gpa: u64, len: u64, host: usize, phys: u64, slot: u16, perm: Perm) -> Self {
        let lim = [Perm::READ, Perm::WRITE].map(|p| if perm.allows(p) { len } else { 0 });
        Self { gpa, len, host, phys, slot, perm, lim }
    }
}

/// A translated piece of guest memory: where it is in the host, the guest physical address it
/// starts at (what the dirty log records; the driver's address itself unless behind an IOTLB),
/// and the protocol slot that holds it (what an I/O pins).
#[derive(Debug)]
pub struct Piece<'b> {
    /// The host view.
    pub slice: GuestSlice<'b>,
    /// Guest physical address of its first byte.
    pub phys: GuestPhysAddr,
    /// The region's protocol slot.
    pub slot: u16,
}

/// The slots a batch has pinned. A batch usually touches one or two regions, so they live
/// inline; a batch that scatters over more spills to the heap.
#[derive(Debug, Default)]
struct PinList {
    inline: [u16; 8],
    len: usize,
    spill: Vec<u16>,
}

impl PinList {
    fn contains(&self, slot: u16) -> bool {
        self.inline[..self.len].contains(&slot) || self.spill.contains(&slot)
    }

    fn push(&mut self, slot: u16) {
        if self.len < self.inline.len() {
            self.inline[self.len] = slot;
            self.len += 1;
        } else {
            self.spill.push(slot);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.inline[..self.len].iter().chain(self.spill.iter()).copied()
    }
}

/// One batch of a queue's work. Every [`GuestSlice`] it hands out is valid until it ends (drop).
#[derive(Debug)]
pub struct Batch<'q> {
    gate: &'q Arc<Gate>,
    shared: &'q StdArc<Shared>,
    /// The queue's map, replaced in place (not cloned: a shared refcount per batch would bounce a
    /// cache line between workers) when a region turns out to be retiring.
    map: RefCell<&'q mut StdArc<MemoryMap>>,
    pinned: RefCell<PinList>,
    /// The region of the last translation, pinned for this batch or held by its cache: buffers of one batch
    /// almost always fall in the same region, and then translating is two compares. A batch that
    /// uses the cached translation starts with the rings' region (`LocalCache::window`), held by
    /// the cache instead of a pin; others with `LastRegion::NONE` (nothing matches it).
    last: Cell<LastRegion>,
    /// The rings' region while this batch uses the cached translation (`LocalCache::window`),
    /// `LastRegion::NONE` otherwise: held by the cache, so never pinned by the batch (pinning it
    /// could even be refused while it retires, though the batch holds it), and I/O pins on it
    /// are taken on its slot.
    held: LastRegion,
    /// Its region id, 0 with no region.
    held_id: u64,
    /// Whether the cached translation serves this batch.
    cache_hit: bool,
    /// VHOST_F_LOG_ALL was on when the batch began: every write must be logged.
    logging: bool,
    /// The log it is logged in (pinned); `None` with `logging` when the frontend gave none, and
    /// then every write is refused as unloggable rather than silently not logged.
    log: Option<StdArc<DirtyLog>>,
    log_cache: RefCell<&'q mut LogCache>,
    cache: &'q LocalCache,
    /// The IOTLB snapshot this batch translates through, its generation pinned in `iotlb_slot`.
    iotlb: Option<&'q IotlbTable>,
    iotlb_slot: Option<usize>,
}

/// A protocol slot as the u16 that pieces and pin lists carry (slots are below NUM_SLOTS).
fn slot16(slot: usize) -> u16 {
    u16::try_from(slot).unwrap_or(u16::MAX)
}

fn iotlb_error(f: IotlbFault, perm: Perm) -> MemoryError {
    match f {
        IotlbFault::Miss { iova } => MemoryError::IotlbMiss { iova, perm },
        IotlbFault::Denied { iova, have } => MemoryError::IotlbDenied { iova, need: perm, have },
    }
}

impl<'q> Batch<'q> {
    /// Whether an invalidation waits for this batch: end it as soon as possible (see
    /// [`Gate::yield_requested`]).
    #[inline(always)]
    pub fn yield_requested(&self) -> bool {
        self.gate.yield_requested()
    }

    /// Whether addresses go through an IOTLB in this batch.
    pub fn iotlb_enabled(&self) -> bool {
        self.iotlb.is_some()
    }

    /// [`Batch::translate_piece`]'s fast path alone: `len` bytes at `addr` in the region this
    /// batch translated into last, or `None` (then translate normally).
    #[inline(always)]
    pub fn translate_fast(&self, addr: GuestPhysAddr, len: u32, writable: bool) -> Option<Piece<'_>> {
        Window { last: self.last.get(), _batch: std::marker::PhantomData }.translate_for(addr, len, writable)
    }

    /// The region this batch translated into last (pinned for the batch), or before that the
    /// rings' region its valid cache holds; otherwise an empty window, in which nothing is found.
    #[inline(always)]
    pub fn window(&self) -> Window<'_> {
        Window { last: self.last.get(), _batch: std::marker::PhantomData }
    }

    /// Behind an IOTLB: checks that `[addr, addr + len)` is fully covered with `perm`, so that a
    /// miss is found before anything is done (rings are checked this way at the start of a
    /// batch). Always `Ok` for guest physical addresses.
    pub fn check_access(&self, addr: GuestPhysAddr, len: u64, perm: Perm) -> Result<(), MemoryError> {
        match self.iotlb {
            Some(t) => t.check(addr.raw(), len, perm).map_err(|f| iotlb_error(f, perm)),
            None => Ok(()),
        }
    }

    /// The cached direct views of the ranges passed to [`QueueMemory::batch`], in that order (the
    /// entries past them are empty), or `None` when this batch must use the translating path.
    #[inline]
    pub fn cached(&self) -> Option<[GuestSlice<'_>; MAX_CACHED]> {
        if !self.cache_hit {
            return None;
        }
        Some(self.cache.views.map(|(host, len)| {
            // SAFETY: the gate's cache is valid for this batch (checked after `enter`, or filled
            // and validated against `seq` in `fill`), so every cached range stays mapped until the
            // batch ends: an invalidation that retires its region clears the cache and waits for
            // this batch first. Each range lies inside one region (checked in `fill`), and the
            // slice borrows the batch, so it cannot outlive it. Unused entries have length zero
            // and a dangling, never dereferenced pointer.
            unsafe { GuestSlice::new(NonNull::new(host as *mut u8).unwrap_or(NonNull::dangling()), len) }
        }))
    }

    /// The map this batch translates with.
    pub fn map(&self) -> StdArc<MemoryMap> {
        (**self.map.borrow()).clone()
    }

    fn pin_index(&self, index: usize, map: &MemoryMap) -> bool {
        let region = map.region(index);
        if self.held.len != 0 && region.id() == self.held_id {
            // Held by the cache for the whole batch (`LocalCache::window`).
            return true;
        }
        let tag = &region.tag;
        // Slots are below NUM_SLOTS, which fits u16.
        let slot = u16::try_from(tag.slot).unwrap_or(u16::MAX);
        if self.pinned.borrow().contains(slot) {
            return true;
        }
        if !self.gate.pin(tag) {
            return false;
        }
        self.pinned.borrow_mut().push(slot);
        true
    }

    /// Translates `len` bytes at `gpa` for the access `perm` (checked behind an IOTLB), which
    /// must lie in one region, and holds that region for the rest of the batch (a pin, unless its
    /// cached translation already holds it).
    #[inline(always)]
    pub fn translate(&self, gpa: GuestPhysAddr, len: u64, perm: Perm) -> Result<GuestSlice<'_>, MemoryError> {
        self.translate_piece(gpa, len, perm, false).map(|p| p.slice)
    }

    /// [`Batch::translate`] (or, with `prefix`, [`Batch::translate_prefix`]) that also says
    /// which guest physical address and which slot the piece is in.
    #[inline(always)]
    pub fn translate_piece(
        &self,
        addr: GuestPhysAddr,
        len: u64,
        perm: Perm,
        prefix: bool,
    ) -> Result<Piece<'_>, MemoryError> {
        if let Some(p) = self.translate_last(addr, len, perm, prefix) {
            return Ok(p);
        }
        self.translate_inner(addr, len, perm, prefix)
    }

    /// The fast path: `gpa` in the region this batch translated into last.
    #[inline(always)]
    fn translate_last(&self, gpa: GuestPhysAddr, len: u64, perm: Perm, prefix: bool) -> Option<Piece<'_>> {
        let last = self.last.get();
        let off = gpa.raw().wrapping_sub(last.gpa);
        if off >= last.len || !last.perm.allows(perm) {
            return None;
        }
        let avail = last.len - off;
        let take = if len <= avail {
            len
        } else if prefix {
            avail
        } else {
            return None;
        };
        let ptr = NonNull::new((last.host + usize::try_from(off).ok()?) as *mut u8)?;
        // SAFETY: `last` describes a region this batch pinned (it is only set after a successful
        // pin, and cleared when the batch changes maps) or the region its valid cache holds
        // (`held`), so it stays mapped until the batch ends; `off + take <= last.len`; the slice
        // borrows the batch.
        let slice = unsafe { GuestSlice::new(ptr, usize::try_from(take).ok()?) };
        // Slots are below NUM_SLOTS, which fits u16.
        Some(Piece { slice, phys: GuestPhysAddr::new(last.phys + off), slot: last.slot })
    }

    /// Like [`Batch::translate`], but a range that spans regions yields its first part only; the
    /// length of what was translated is the slice's length.
    #[inline]
    pub fn translate_prefix(&self, gpa: GuestPhysAddr, len: u64, perm: Perm) -> Result<GuestSlice<'_>, MemoryError> {
        self.translate_piece(gpa, len, perm, true).map(|p| p.slice)
    }

    /// Where `addr` lands in `map`: the translation, and the linear range around it that
    /// `translate_last` may reuse.
    fn locate(
        &self,
        map: &MemoryMap,
        addr: GuestPhysAddr,
        len: u64,
        perm: Perm,
    ) -> Result<(crate::map::Translation, LastRegion), MemoryError> {
        let unmapped = || MemoryError::Unmapped { gpa: addr, len };
        match self.iotlb {
            None => {
                let t = map.translate(addr).ok_or_else(unmapped)?;
                Ok((t, LastRegion::whole(map.region(t.index))))
            }
            Some(tlb) => {
                let e = *tlb.entry(addr.raw(), perm).map_err(|f| iotlb_error(f, perm))?;
                let (uaddr, iavail) = tlb.translate(addr.raw(), len, perm).map_err(|f| iotlb_error(f, perm))?;
                let mut t = map.translate_user(crate::addr::UserAddr::new(uaddr)).ok_or_else(unmapped)?;
                t.avail = t.avail.min(iavail);
                // The part of the entry inside the region is linear in both spaces.
                let r = map.region(t.index);
                let lo = e.uaddr.max(r.user_addr().raw());
                let hi = (e.uaddr + e.size).min(r.user_addr().raw() + r.size());
                let host =
                    r.mapping.as_ptr() as usize + usize::try_from(lo - r.user_addr().raw()).map_err(|_| unmapped())?;
                let phys = r.gpa().raw() + (lo - r.user_addr().raw());
                let last = LastRegion::new(e.iova + (lo - e.uaddr), hi - lo, host, phys, slot16(r.slot()), e.perm);
                Ok((t, last))
            }
        }
    }

    fn translate_inner(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        perm: Perm,
        prefix: bool,
    ) -> Result<Piece<'_>, MemoryError> {
        // A refused pin means the region is retiring, and its replacement map was published
        // before the refusal (see `Domain::invalidate_start`), so one more look normally
        // succeeds; the bound only stops a frontend that remaps without pause from holding a
        // worker here.
        for _ in 0..64 {
            let (t, pinned, last) = {
                let map = self.map.borrow();
                let (t, last) = self.locate(&map, gpa, len, perm)?;
                let pinned = self.pin_index(t.index, &map);
                if pinned {
                    self.last.set(last);
                }
                (t, pinned, last)
            };
            if !pinned {
                // Being retired: its replacement (if any) is already published.
                self.last.set(LastRegion::NONE);
                **self.map.borrow_mut() = lock(&self.shared.current).clone();
                continue;
            }
            let take = if t.avail >= len {
                len
            } else if prefix {
                t.avail
            } else {
                return Err(MemoryError::Unmapped { gpa, len });
            };
            let n = usize::try_from(take).map_err(|_| MemoryError::Unmapped { gpa, len })?;
            let ptr = NonNull::new(t.host as *mut u8).ok_or_else(|| MemoryError::Unmapped { gpa, len })?;
            // SAFETY: the region holding [gpa, gpa+take) is held until this batch ends, by the pin
            // just taken or by the batch's cache (`pin_index`; the invalidator waits for both
            // before retiring it), `take` bytes fit in it, and the slice borrows the batch, so it
            // cannot outlive the batch.
            let slice = unsafe { GuestSlice::new(ptr, n) };
            let phys = GuestPhysAddr::new(last.phys + (gpa.raw() - last.gpa));
            // Slots are below NUM_SLOTS, which fits u16.
            return Ok(Piece { slice, phys, slot: last.slot });
        }
        Err(MemoryError::Unmapped { gpa, len })
    }

    /// The translating slow path: copies guest memory at `gpa` into `buf`, across regions.
    pub fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at =
                gpa.checked_add(done as u64).ok_or_else(|| MemoryError::Unmapped { gpa, len: buf.len() as u64 })?;
            let s = self.translate_prefix(at, (buf.len() - done) as u64, Perm::READ)?;
            s.copy_to(0, &mut buf[done..done + s.len()])?;
            done += s.len();
        }
        Ok(())
    }

    /// The translating slow path: copies `buf` into guest memory at `gpa`, across regions, and
    /// logs the write when logging is on.
    pub fn write(&self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at =
                gpa.checked_add(done as u64).ok_or_else(|| MemoryError::Unmapped { gpa, len: buf.len() as u64 })?;
            let s = self.translate_prefix(at, (buf.len() - done) as u64, Perm::WRITE)?;
            s.copy_from(0, &buf[done..done + s.len()])?;
            done += s.len();
        }
        self.log_write(gpa, buf.len() as u64)
    }

    /// Whether this batch logs writes.
    #[inline]
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// Records that the device wrote `len` bytes at guest physical address `gpa` (no-op when
    /// logging is off). Call after the write and before [`Batch::flush_log`] / publishing the
    /// used index. Behind an IOTLB, take the address from [`Piece::phys`] or use
    /// [`Batch::log_write_addr`].
    pub fn log_write(&self, gpa: GuestPhysAddr, len: u64) -> Result<(), MemoryError> {
        match &self.log {
            Some(log) => self.log_cache.borrow_mut().add(gpa, len, log),
            None if self.logging => Err(MemoryError::NoDirtyLog),
            None => Ok(()),
        }
    }

    /// [`Batch::log_write`] for a range of the driver's addresses: behind an IOTLB an IOVA range,
    /// taken through the batch's IOTLB and the memory map to the guest physical pages it stands
    /// for (a ring's, which the batch has checked or cached).
    pub fn log_write_addr(&self, gpa: GuestPhysAddr, len: u64) -> Result<(), MemoryError> {
        let Some(log) = &self.log else {
            return if self.logging { Err(MemoryError::NoDirtyLog) } else { Ok(()) };
        };
        let Some(tlb) = self.iotlb else { return self.log_cache.borrow_mut().add(gpa, len, log) };
        let map = self.map.borrow();
        let mut done = 0u64;
        while done < len {
            let at = gpa.raw().checked_add(done).ok_or(MemoryError::Unmapped { gpa, len })?;
            let (uaddr, n) = tlb.translate(at, len - done, Perm::NONE).map_err(|f| iotlb_error(f, Perm::WRITE))?;
            let t = map.translate_user(crate::addr::UserAddr::new(uaddr)).ok_or(MemoryError::Unmapped { gpa, len })?;
            let r = map.region(t.index);
            let page_gpa = GuestPhysAddr::new(r.gpa().raw() + (uaddr - r.user_addr().raw()));
            let n = n.min(t.avail);
            self.log_cache.borrow_mut().add(page_gpa, n, log)?;
            done += n;
        }
        Ok(())
    }

    /// Sets every logged bit in the dirty log. Call before publishing a used index.
    pub fn flush_log(&self) -> Result<(), MemoryError> {
        match &self.log {
            Some(log) => self.log_cache.borrow_mut().flush(log),
            None => Ok(()),
        }
    }

    /// A pin for an I/O that goes on after the batch (an io_uring read into a guest buffer): the
    /// region of `piece`, a translation made in this batch (which holds the region: by a pin, or
    /// by the cached translation of the rings' region), is not retired until the pin is dropped.
    /// The region is the piece's, not whatever holds its address now: a batch whose pin was
    /// refused mid-way moves to a newer map, where the address may lie in a replacement region.
    ///
    /// Behind an IOTLB the pin also holds the IOTLB generation: an invalidation of the IOVA
    /// waits for the I/O too.
    pub fn io_pin(&self, piece: &Piece<'_>) -> IoPin {
        let slot = usize::from(piece.slot);
        self.gate.pin_again(slot);
        if let Some(s) = self.iotlb_slot {
            self.gate.pin_again(s);
        }
        IoPin { gate: self.gate.clone(), slot, iotlb_slot: self.iotlb_slot }
    }

    /// I/O pins on the slots of pieces this batch translated ([`Piece::slot`]), one per distinct
    /// slot (a request's buffers are usually all in one region), and one on the IOTLB generation
    /// behind an IOTLB, appended to `out`.
    pub fn io_pins(&self, slots: impl Iterator<Item = u16>, out: &mut Vec<IoPin>) {
        let mut add = |slot: usize| {
            if !out.iter().any(|p| p.slot == slot) {
                // The batch holds this slot pinned (it translated into it), or its cached
                // translation is in it (`LocalCache::window`), so no retiring check is needed.
                self.gate.pin_again(slot);
                out.push(IoPin { gate: self.gate.clone(), slot, iotlb_slot: None });
            }
        };
        if let Some(slot) = self.iotlb_slot {
            add(slot);
        }
        for slot in slots {
            add(usize::from(slot));
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            if let Err(err) = self.log_cache.borrow_mut().flush(log) {
                tracing::warn!(%err, "dirty log flush failed at the end of a batch");
            }
            self.gate.unpin(log.tag.slot);
        }
        for slot in self.pinned.borrow().iter() {
            self.gate.unpin(usize::from(slot));
        }
        if let Some(slot) = self.iotlb_slot {
            self.gate.unpin(slot);
        }
        self.gate.leave();
    }
}

/// An in-flight I/O's hold on a region (and, behind an IOTLB, on its generation): the
/// invalidator waits for it.
#[derive(Debug)]
pub struct IoPin {
    gate: Arc<Gate>,
    slot: usize,
    iotlb_slot: Option<usize>,
}

impl Drop for IoPin {
    fn drop(&mut self) {
        self.gate.unpin(self.slot);
        if let Some(slot) = self.iotlb_slot {
            self.gate.unpin(slot);
        }
    }
}
