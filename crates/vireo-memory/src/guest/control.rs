//! The control side: what the frontend's messages change, and the waits that make a reply the
//! barrier.

use super::*;

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
            map: RefCell::new(self.map()),
            map_gen: u64::MAX,
            log: None,
            log_gen: u64::MAX,
            iotlb: None,
            iotlb_gen: u64::MAX,
            cache: LocalCache::default(),
            log_cache: RefCell::new(LogCache::new()),
            force_translating: false,
            pinned: RefCell::new(PinList::default()),
            last: Cell::new(LastRegion::NONE),
            last_is_window: Cell::new(false),
        }
    }
}

fn release_slots(w: &mut Writer, regions: &[StdArc<Region>]) {
    w.free_slots.extend(regions.iter().map(|r| r.tag.slot));
}

/// A handle the control side keeps for one queue, to quiesce it.
#[derive(Debug, Clone)]
pub struct QueueHandle {
    pub(super) gate: Arc<Gate>,
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
