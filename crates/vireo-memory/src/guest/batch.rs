//! One batch of a queue's work: the guard under which a worker touches guest memory, the pieces
//! it translates and the pins an I/O keeps after it.

use super::*;

/// A region this batch has translated into (and holds), as a linear range of the addresses
/// the driver uses (guest physical, or IOVAs behind an IOTLB) with the rights it allows.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastRegion {
    gpa: u64,
    pub(super) len: u64,
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

/// A [`Window`] laid out for a loop that checks many buffers in a row (the segments of a
/// chain): the rights, the bounds and the non-empty length of a buffer in one table load and one
/// compare, its host and guest physical addresses in one add each.
///
/// The table is indexed by a buffer's class: bit 0 set for a buffer the device writes, bit 1
/// set to refuse the buffer, bit 2 set to refuse it if the device reads it. Bits 1 and 2 let a
/// caller fold its own rules into the same compare: the virtqueue walks refuse an indirect
/// descriptor inside a chain with bit 1 (its flag is the bit above WRITE), and a readable buffer
/// after a writable one (2.7.4.2) with bit 2.
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits<'b> {
    gpa: u64,
    /// The window's mapping address minus `gpa`, wrapping: the host address of `addr` is
    /// `addr + host_delta`.
    host_delta: u64,
    /// `phys - gpa`, wrapping.
    phys_delta: u64,
    /// By class: the length a buffer of that class may reach from `gpa` (0: refused).
    lim: [u64; 8],
    slot: u16,
    _batch: std::marker::PhantomData<&'b ()>,
}

impl<'b> Window<'b> {
    /// The window as [`WindowLimits`].
    #[inline(always)]
    pub fn limits(&self) -> WindowLimits<'b> {
        let l = &self.last;
        WindowLimits {
            gpa: l.gpa,
            host_delta: (l.host as u64).wrapping_sub(l.gpa),
            phys_delta: l.phys.wrapping_sub(l.gpa),
            lim: [l.lim[0], l.lim[1], 0, 0, 0, l.lim[1], 0, 0],
            slot: l.slot,
            _batch: std::marker::PhantomData,
        }
    }
}

impl WindowLimits<'_> {
    /// The host address and the guest physical address of `len` bytes at `addr` for a buffer of
    /// `class` (see the type), when the buffer is not empty and lies inside the window with the
    /// rights its class asks for. The host address is valid for the batch the window borrows, as
    /// a [`Piece`]'s is.
    #[inline(always)]
    pub fn locate(&self, addr: u64, len: u32, class: usize) -> Option<(usize, u64)> {
        let lim = self.lim[class & 7];
        let off = addr.wrapping_sub(self.gpa);
        // The offset of the buffer's last byte: `len - 1` wraps to u64::MAX for an empty buffer
        // and saturates, as an address below the window (a huge `off`) does, so one compare
        // refuses both, and an offset past the end, and a class refused (lim 0).
        let last = off.saturating_add(u64::from(len).wrapping_sub(1));
        if last >= lim {
            return None;
        }
        // off + len <= lim, a mapping's length: `addr + host_delta` is `host + off`, inside the
        // mapping, and fits usize.
        #[allow(clippy::cast_possible_truncation)]
        let host = addr.wrapping_add(self.host_delta) as usize;
        Some((host, addr.wrapping_add(self.phys_delta)))
    }

    /// The window's protocol slot (what an I/O on a buffer in it pins).
    #[inline(always)]
    pub fn slot(&self) -> u16 {
        self.slot
    }
}

impl LastRegion {
    /// No region: every address falls outside it.
    pub(super) const NONE: LastRegion =
        LastRegion { gpa: 0, len: 0, host: 0, phys: 0, slot: 0, perm: Perm::NONE, lim: [0, 0] };

    /// A whole region, addressed by guest physical addresses (no IOTLB), read and write.
    pub(super) fn whole(r: &crate::map::Region) -> Self {
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
pub(super) struct PinList {
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

    /// Whether nothing is pinned (the spill is used only once the inline slots are full).
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the list (its spill keeps its allocation for the next batch that needs it).
    fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.inline[..self.len].iter().chain(self.spill.iter()).copied()
    }
}

/// One batch of a queue's work. Every [`GuestSlice`] it hands out is valid until it ends (drop).
///
/// What lasts across its translations (its pins, its last region, its map and log cache) lives in
/// the [`QueueMemory`] it borrows exclusively: beginning a batch then stores a few words.
#[derive(Debug)]
pub struct Batch<'q> {
    pub(super) q: &'q QueueMemory,
    /// The id of the rings' region while this batch uses the cached translation
    /// (`LocalCache::window`, then also `QueueMemory::last` at the start), 0 otherwise: held by
    /// the cache, so never pinned by the batch (pinning it could even be refused while it
    /// retires, though the batch holds it), and I/O pins on it are taken on its slot. (Region ids
    /// start at 1.)
    pub(super) held_id: u64,
    /// Whether the cached translation serves this batch.
    pub(super) cache_hit: bool,
    /// VHOST_F_LOG_ALL was on when the batch began: every write must be logged.
    pub(super) logging: bool,
    /// The log it is logged in (pinned); `None` with `logging` when the frontend gave none, and
    /// then every write is refused as unloggable rather than silently not logged.
    pub(super) log: Option<StdArc<DirtyLog>>,
    /// The IOTLB snapshot this batch translates through, its generation pinned in `iotlb_slot`.
    pub(super) iotlb: Option<&'q IotlbTable>,
    pub(super) iotlb_slot: Option<usize>,
}

/// A protocol slot as the u16 that pieces and pin lists carry (slots are below NUM_SLOTS).
pub(super) fn slot16(slot: usize) -> u16 {
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
        self.q.gate.yield_requested()
    }

    /// Whether addresses go through an IOTLB in this batch.
    pub fn iotlb_enabled(&self) -> bool {
        self.iotlb.is_some()
    }

    /// [`Batch::translate_piece`]'s fast path alone: `len` bytes at `addr` in the region this
    /// batch translated into last, or `None` (then translate normally).
    #[inline(always)]
    pub fn translate_fast(&self, addr: GuestPhysAddr, len: u32, writable: bool) -> Option<Piece<'_>> {
        Window { last: self.q.last.get(), _batch: std::marker::PhantomData }.translate_for(addr, len, writable)
    }

    /// The region this batch translated into last (pinned for the batch), or before that the
    /// rings' region its valid cache holds; otherwise an empty window, in which nothing is found.
    #[inline(always)]
    pub fn window(&self) -> Window<'_> {
        Window { last: self.q.last.get(), _batch: std::marker::PhantomData }
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
        Some(self.q.cache.views.map(|(host, len)| {
            // SAFETY: the gate's cache is valid for this batch (checked after `enter`, or filled
            // and validated against `seq` in `fill`), so every cached range stays mapped until the
            // batch ends: an invalidation that retires its region clears the cache and waits for
            // this batch first. Each range lies inside one region (checked in `fill`), and the
            // slice borrows the batch, so it cannot outlive it. Unused entries have length zero
            // and a dangling, never dereferenced address. No address is 0 (`LocalCache::views`).
            unsafe { GuestSlice::new(NonNull::new_unchecked(host as *mut u8), len) }
        }))
    }

    /// Whether some region of the map this batch translates with is a file a filesystem writes
    /// back ([`MemoryMap::has_file_pages`]): then the kernel must not write into guest memory
    /// through O_DIRECT.
    #[inline]
    pub fn has_file_pages(&self) -> bool {
        self.q.map.borrow().has_file_pages()
    }

    /// The map this batch translates with.
    pub fn map(&self) -> StdArc<MemoryMap> {
        self.q.map.borrow().clone()
    }

    fn pin_index(&self, index: usize, map: &MemoryMap) -> bool {
        let region = map.region(index);
        if self.held_id != 0 && region.id() == self.held_id {
            // Held by the cache for the whole batch (`LocalCache::window`).
            return true;
        }
        let tag = &region.tag;
        // Slots are below NUM_SLOTS, which fits u16.
        let slot = u16::try_from(tag.slot).unwrap_or(u16::MAX);
        if self.q.pinned.borrow().contains(slot) {
            return true;
        }
        if !self.q.gate.pin(tag) {
            return false;
        }
        self.q.pinned.borrow_mut().push(slot);
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
        let last = self.q.last.get();
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
                let map = self.q.map.borrow();
                let (t, last) = self.locate(&map, gpa, len, perm)?;
                let pinned = self.pin_index(t.index, &map);
                if pinned {
                    self.q.set_last(last);
                }
                (t, pinned, last)
            };
            if !pinned {
                // Being retired: its replacement (if any) is already published.
                self.q.set_last(LastRegion::NONE);
                *self.q.map.borrow_mut() = lock(&self.q.shared.current).clone();
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
            Some(log) => self.q.log_cache.borrow_mut().add(gpa, len, log),
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
        let Some(tlb) = self.iotlb else { return self.q.log_cache.borrow_mut().add(gpa, len, log) };
        let map = self.q.map.borrow();
        let mut done = 0u64;
        while done < len {
            let at = gpa.raw().checked_add(done).ok_or(MemoryError::Unmapped { gpa, len })?;
            let (uaddr, n) = tlb.translate(at, len - done, Perm::NONE).map_err(|f| iotlb_error(f, Perm::WRITE))?;
            let t = map.translate_user(crate::addr::UserAddr::new(uaddr)).ok_or(MemoryError::Unmapped { gpa, len })?;
            let r = map.region(t.index);
            let page_gpa = GuestPhysAddr::new(r.gpa().raw() + (uaddr - r.user_addr().raw()));
            let n = n.min(t.avail);
            self.q.log_cache.borrow_mut().add(page_gpa, n, log)?;
            done += n;
        }
        Ok(())
    }

    /// Sets every logged bit in the dirty log. Call before publishing a used index.
    pub fn flush_log(&self) -> Result<(), MemoryError> {
        match &self.log {
            Some(log) => self.q.log_cache.borrow_mut().flush(log),
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
        self.q.gate.pin_again(slot);
        if let Some(s) = self.iotlb_slot {
            self.q.gate.pin_again(s);
        }
        IoPin { gate: self.q.gate.clone(), slot, iotlb_slot: self.iotlb_slot }
    }

    /// I/O pins on the slots of pieces this batch translated ([`Piece::slot`]), one per distinct
    /// slot (a request's buffers are usually all in one region), and one on the IOTLB generation
    /// behind an IOTLB, appended to `out`.
    pub fn io_pins(&self, slots: impl Iterator<Item = u16>, out: &mut Vec<IoPin>) {
        let mut add = |slot: usize| {
            if !out.iter().any(|p| p.slot == slot) {
                // The batch holds this slot pinned (it translated into it), or its cached
                // translation is in it (`LocalCache::window`), so no retiring check is needed.
                self.q.gate.pin_again(slot);
                out.push(IoPin { gate: self.q.gate.clone(), slot, iotlb_slot: None });
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
            if let Err(err) = self.q.log_cache.borrow_mut().flush(log) {
                tracing::warn!(%err, "dirty log flush failed at the end of a batch");
            }
            self.q.gate.unpin(log.tag.slot);
        }
        let mut pinned = self.q.pinned.borrow_mut();
        if !pinned.is_empty() {
            // Most batches pin nothing (their buffers are in the rings' region, which the cache
            // holds): the loop stays out of their way.
            unpin_all(&self.q.gate, &mut pinned);
        }
        drop(pinned);
        if let Some(slot) = self.iotlb_slot {
            self.q.gate.unpin(slot);
        }
        self.q.gate.leave();
    }
}

#[cold]
#[inline(never)]
fn unpin_all(gate: &Gate, pinned: &mut PinList) {
    for slot in pinned.iter() {
        gate.unpin(usize::from(slot));
    }
    pinned.clear();
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
