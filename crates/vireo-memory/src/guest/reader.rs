//! A queue's view of guest memory: its map, log and IOTLB snapshots and the cache of ring
//! pointers it fills under the protocol's sequence.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct LocalCache {
    /// The guest ranges the cache was filled for.
    ranges: [(u64, u64); MAX_CACHED],
    count: usize,
    /// Host address and length of each range. The address is never 0 (unused entries hold
    /// [`DANGLING`] with length 0), so that [`Batch::cached`] is a copy. (An address rather than
    /// a `NonNull`, which would make the queue's memory `!Send`.)
    pub(super) views: [(usize, usize); MAX_CACHED],
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

/// The address of an unused cached view: not null, never dereferenced (its length is 0).
pub(super) const DANGLING: usize = 1;

impl Default for LocalCache {
    fn default() -> Self {
        Self {
            ranges: [(0, 0); MAX_CACHED],
            count: 0,
            views: [(DANGLING, 0); MAX_CACHED],
            window: LastRegion::NONE,
            window_id: 0,
        }
    }
}

/// One queue's view of guest memory: the reader side of the protocol. Owned by the thread that
/// runs the queue.
#[derive(Debug)]
pub struct QueueMemory {
    pub(super) shared: StdArc<Shared>,
    pub(super) gate: Arc<Gate>,
    /// The map batches translate with; a batch replaces it in place when a region turns out to
    /// be retiring (not a clone per batch: a shared refcount would bounce a cache line between
    /// workers).
    pub(super) map: RefCell<StdArc<MemoryMap>>,
    pub(super) map_gen: u64,
    pub(super) log: Option<StdArc<DirtyLog>>,
    pub(super) log_gen: u64,
    pub(super) iotlb: Option<StdArc<IotlbTable>>,
    pub(super) iotlb_gen: u64,
    pub(super) cache: LocalCache,
    pub(super) log_cache: RefCell<LogCache>,
    pub(super) force_translating: bool,
    /// What a batch keeps between its translations, kept here rather than in the [`Batch`] so
    /// that beginning a batch writes almost nothing (the read side's cost is mostly stores):
    /// the slots the batch has pinned (empty between batches),
    pub(super) pinned: RefCell<PinList>,
    /// the region of its last translation (see `Batch::translate_last`),
    pub(super) last: Cell<LastRegion>,
    /// and whether `last` is a copy of `cache.window`, which a batch that uses the cache then
    /// need not copy again. Cleared by whatever else writes `last` ([`QueueMemory::set_last`])
    /// and by a refill of the cache.
    pub(super) last_is_window: Cell<bool>,
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
        self.log_cache.borrow().flushes()
    }

    /// Sets the region of a batch's last translation (anything but the cache's window).
    #[inline]
    pub(super) fn set_last(&self, last: LastRegion) {
        self.last.set(last);
        self.last_is_window.set(false);
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
            *self.map.get_mut() = lock(&self.shared.current).clone();
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
        // The batch starts from the rings' region, held by the cache for this batch; not behind
        // an IOTLB, where addresses are IOVAs (a batch may find an IOTLB published under a cache
        // filled without one, before the control thread's quiesce clears it). Otherwise from no
        // region: whatever an earlier batch pinned is not pinned any more.
        let held_id = if cache_hit && self.iotlb.is_none() {
            if !self.last_is_window.get() {
                self.last.set(self.cache.window);
                self.last_is_window.set(true);
            }
            self.cache.window_id
        } else {
            self.set_last(LastRegion::NONE);
            0
        };
        let q: &QueueMemory = self;
        Batch { q, held_id, cache_hit, logging, log, iotlb: q.iotlb.as_deref(), iotlb_slot }
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
            *self.map.get_mut() = lock(&self.shared.current).clone();
            self.map_gen = gen;
        }
        let mut ids = [0u64; MAX_CACHED];
        let mut views = [(DANGLING, 0usize); MAX_CACHED];
        let (mut window, mut window_id) = (LastRegion::NONE, 0);
        for (i, &(gpa, len)) in ranges.iter().enumerate() {
            if len == 0 {
                return None;
            }
            let t = match &self.iotlb {
                None => self.map.get_mut().translate(gpa)?,
                Some(tlb) => {
                    // The IOTLB snapshot is the one this batch pinned: its generation cannot be
                    // retired under us, and the cache records it below.
                    let (uaddr, avail) = tlb.translate(gpa.raw(), len, perms[i]).ok()?;
                    if avail < len {
                        return None;
                    }
                    self.map.get_mut().translate_user(crate::addr::UserAddr::new(uaddr))?
                }
            };
            if t.avail < len {
                // The range spans two regions: no single pointer; the translating path serves it.
                return None;
            }
            let r = self.map.get_mut().region(t.index);
            ids[i] = r.id();
            views[i] = (NonNull::new(t.host as *mut u8)?.as_ptr() as usize, usize::try_from(len).ok()?);
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
        self.last_is_window.set(false);
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
