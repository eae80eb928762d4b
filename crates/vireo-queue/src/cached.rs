//! The cached walkers: a chain read through the ring's direct pointers in one pass, every check
//! the general walker makes, no error built.
//!
//! They serve the common case, where every descriptor is well formed and every buffer lies in
//! one region, at the cost of a few compares per descriptor. On anything else (an error, a
//! buffer that crosses regions or misses the IOTLB, a chain longer than [`FAST_SEGS`]) they
//! return `None` having changed nothing but the segment list and the batch's translations (a
//! region pinned, the window moved), and the caller hands the chain to the general walker
//! (`queue.rs`: `walk_split`, `walk_packed`), which starts over and reports what is wrong with a
//! typed error. So an error is never found here, only doubted; the tests that feed both paths
//! the same rings (`tests/paths.rs`, the `split_chain` and `packed_chain` fuzz targets) check
//! that the two agree.
//!
//! The checks, and how each is cheaper here than in the general walker: an end pointer bounds
//! both the chain and the writes (at most the queue size, or the indirect table's length);
//! lengths are summed in 64 bits and the 32-bit overflow checked once per chain (64 lengths of 32
//! bits cannot overflow 64 bits); a zero length, an INDIRECT flag inside a chain or a table, a
//! readable buffer after a writable one, the access right and the bounds of a buffer are one
//! table load and one compare against the window (`WindowLimits::locate`: the descriptor's WRITE
//! and INDIRECT bits and the order rule pick the limit, 0 for a refusal). A chain of one
//! descriptor, the most common shape, skips the loop altogether.

use vireo_memory::{Batch, GuestPhysAddr, Piece, Window, WindowLimits};

use crate::chain::{access, RawSeg, Segments, Totals, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_INDIRECT};

/// The most buffers a cached walk resolves for one chain; a longer chain takes the general
/// walker. Block requests are three descriptors, network packets one to a few.
pub(crate) const FAST_SEGS: usize = 64;

/// The region buffers are translated through: a copy of the batch's last one, moved when a
/// buffer falls outside it, and the same as [`WindowLimits`] for the walks' loops.
pub(crate) struct Windowed<'b, 'q> {
    mem: &'b Batch<'q>,
    window: Window<'b>,
    limits: WindowLimits<'b>,
    /// The window's slot as [`RawSeg::meta`] wants it.
    slot_word: u64,
}

impl<'b, 'q> Windowed<'b, 'q> {
    #[inline(always)]
    pub fn new(mem: &'b Batch<'q>) -> Self {
        let window = mem.window();
        let limits = window.limits();
        Self { mem, window, limits, slot_word: RawSeg::slot_word(limits.slot()) }
    }

    /// The window buffers are translated through now.
    #[inline(always)]
    pub fn window(&self) -> &Window<'b> {
        &self.window
    }

    /// Outside the window: the batch translates `len` bytes at `addr` (and pins the region) for
    /// a buffer the device writes (`writable`) or reads, and the window moves there. Out of
    /// line, so that the walks' loops have no call on their common path.
    #[cold]
    #[inline(never)]
    fn miss(&mut self, addr: u64, len: u32, writable: bool) -> Option<Piece<'b>> {
        let p = self.mem.translate_piece(GuestPhysAddr::new(addr), u64::from(len), access(writable), false).ok()?;
        self.window = self.mem.window();
        self.limits = self.window.limits();
        self.slot_word = RawSeg::slot_word(self.limits.slot());
        Some(p)
    }
}

/// How many chains ahead of the one being walked the batch loops prefetch buffers, when asked
/// to (`QueueBatch::set_prefetch`).
pub(crate) const PREFETCH_AHEAD: u16 = 4;

/// Prefetches the buffer of the descriptor whose words are `lo` and `hi` (as the ring holds them,
/// little endian; `flags_shift` where its flags are in `hi`: 32 split, 48 packed), if it lies in
/// the window. A hint about a descriptor the driver may still be writing: nothing is checked but
/// that the address is in the window, nothing is read from it, and it cannot fault.
#[inline(always)]
pub(crate) fn prefetch_desc(window: &Window<'_>, lo: u64, hi: u64, flags_shift: u32) {
    let (addr, hi) = (u64::from_le(lo), u64::from_le(hi));
    // The low 32 bits are the length, the flags the 16 at `flags_shift`.
    #[allow(clippy::cast_possible_truncation)]
    let (len, flags) = (hi as u32, (hi >> flags_shift) as u16);
    let writable = flags & DESC_F_WRITE != 0;
    if let Some(p) = window.translate_for(GuestPhysAddr::new(addr), len.min(128), writable) {
        if writable {
            p.slice.prefetch_write(128);
        } else {
            p.slice.prefetch(128);
        }
    }
}

/// The segment list being filled: raw writes into capacity reserved up front, the length and
/// totals stored once at the end.
struct Filling<'s> {
    segs: &'s mut Segments,
    /// Where the next segment goes, and where the list is full (at most `FAST_SEGS` segments
    /// from the start, within the reserved capacity).
    out: *mut RawSeg,
    end: *mut RawSeg,
    /// Bytes of the chain, and of its readable part (the total when the last readable buffer
    /// was pushed: readable buffers come first).
    total: u64,
    readable: u64,
    /// Bit 2 of a buffer's class in [`WindowLimits::locate`]: 4 (refuse a readable buffer) once
    /// a writable one was pushed, else 0.
    refuse_reads: usize,
}

impl<'s> Filling<'s> {
    /// An empty list for a chain of at most `limit` segments.
    #[inline(always)]
    fn new(segs: &'s mut Segments, limit: usize) -> Self {
        if segs.segs.capacity() < FAST_SEGS {
            segs.segs.reserve(FAST_SEGS);
        }
        let out = segs.segs.as_mut_ptr();
        // SAFETY: min(limit, FAST_SEGS) <= the capacity: the end is inside the allocation (or
        // one past it).
        let end = unsafe { out.add(limit.min(FAST_SEGS)) };
        Self { segs, out, end, total: 0, readable: 0, refuse_reads: 0 }
    }

    /// Lowers the most segments this chain may have to `limit` (an indirect table's entries).
    #[inline(always)]
    fn cap(&mut self, limit: usize) {
        let start = self.segs.segs.as_mut_ptr();
        // SAFETY: nothing was pushed yet (out == start), and min(limit, FAST_SEGS) is within the
        // capacity.
        let end = unsafe { start.add(limit.min(FAST_SEGS)) };
        if end < self.end {
            self.end = end;
        }
    }

    /// Adds the buffer of descriptor words `lo` (address) and `hi` (length in the low 32 bits)
    /// whose flags are `flags`; `None` on a zero length, an indirect descriptor, a readable
    /// buffer after a writable one, a full list, or a buffer that does not translate in one piece.
    #[inline(always)]
    fn push(&mut self, lo: u64, hi: u64, flags: u16, win: &mut Windowed<'_, '_>) -> Option<()> {
        if self.out == self.end {
            return None;
        }
        // The low 32 bits are the length.
        #[allow(clippy::cast_possible_truncation)]
        let len = hi as u32;
        // WRITE and INDIRECT are bits 1 and 2 of the flags: bits 0 and 1 of the class.
        let class = usize::from((flags >> 1) & 3) | self.refuse_reads;
        let writable = u64::from((flags >> 1) & 1);
        // The emptiness, the indirect flag, the order, the right and the bounds in one compare.
        let (host, gpa, slot_word) = match win.limits.locate(lo, len, class) {
            Some((host, gpa)) => (host, gpa, win.slot_word),
            None => Self::miss(lo, len, class, win)?,
        };
        // SAFETY: out < end, which is within the capacity reserved in `new`, and nothing else
        // touches the vector until `finish` sets its length: the write is inside the allocation;
        // `writable` is 0 or 1, as `RawSeg::meta` wants.
        unsafe {
            RawSeg::write(self.out, host, gpa, RawSeg::meta(len, slot_word, writable));
            self.out = self.out.add(1);
        }
        self.total += u64::from(len);
        if writable == 0 {
            self.readable = self.total;
        }
        #[allow(clippy::cast_possible_truncation)]
        {
            self.refuse_reads = (writable as usize) << 2;
        }
        Some(())
    }

    /// A buffer of `class` that [`Filling::push`] did not find in the window: refused if it is
    /// empty or its class is, else translated by the batch (the window moves there). Out of
    /// line, and given only what it needs, so that the filling's state stays in registers in
    /// the loop.
    #[cold]
    #[inline(never)]
    fn miss(lo: u64, len: u32, class: usize, win: &mut Windowed<'_, '_>) -> Option<(usize, u64, u64)> {
        let writable = class & 1 != 0;
        // Bit 1: an indirect descriptor; bit 2: after a writable buffer.
        if len == 0 || class & 2 != 0 || (class & 4 != 0 && !writable) {
            return None;
        }
        let p = win.miss(lo, len, writable)?;
        Some((p.slice.as_ptr() as usize, p.phys.raw(), RawSeg::slot_word(p.slot)))
    }

    /// The host address of the indirect table of `len` bytes at `lo`, which the device reads.
    #[inline(always)]
    fn table(lo: u64, len: u32, win: &mut Windowed<'_, '_>) -> Option<usize> {
        if let Some((host, _)) = win.limits.locate(lo, len, 0) {
            return Some(host);
        }
        let p = win.miss(lo, len, false)?;
        Some(p.slice.as_ptr() as usize)
    }

    /// Sets the list's length and totals; `None` when the chain's lengths overflow 32 bits.
    #[inline(always)]
    fn finish(self) -> Option<()> {
        if self.total > u64::from(u32::MAX) {
            return None;
        }
        // SAFETY: `out` and the vector's pointer are in one allocation, `out` not below it.
        let n = unsafe { self.out.offset_from(self.segs.segs.as_ptr()) };
        // SAFETY: the first `n` elements were written in `push` (n <= capacity).
        #[allow(clippy::cast_sign_loss)]
        unsafe {
            self.segs.segs.set_len(n as usize);
        }
        // Each part is at most the total, which fits u32.
        #[allow(clippy::cast_possible_truncation)]
        {
            self.segs.totals = Totals {
                readable: self.readable as u32,
                writable: (self.total - self.readable) as u32,
                seen_writable: self.refuse_reads != 0,
            };
        }
        Some(())
    }
}

/// A descriptor's two 64-bit words at `p` (little endian in guest memory).
///
/// # Safety
/// `p` is 8-aligned and the 16 bytes there are mapped for the caller's batch.
#[inline(always)]
unsafe fn words(p: *const u8) -> (u64, u64) {
    let p = p.cast::<u64>();
    // SAFETY: the caller's contract; u64 has no invalid values, so whatever the guest left is
    // a value, and volatile keeps each word one load that the guest cannot tear into two reads.
    unsafe { (u64::from_le(p.read_volatile()), u64::from_le(p.add(1).read_volatile())) }
}

/// The flags of a split descriptor's `hi` word (bits 32-47).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
fn split_flags(hi: u64) -> u16 {
    (hi >> 32) as u16
}

/// The flags of a packed descriptor's `hi` word (bits 48-63).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
fn packed_flags(hi: u64) -> u16 {
    (hi >> 48) as u16
}

/// The `next` field of a split descriptor's `hi` word (bits 48-63), or a packed one's buffer id
/// (bits 32-47).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
fn split_next(hi: u64) -> u16 {
    (hi >> 48) as u16
}

/// A chain of the one buffer `lo`, `hi` if it is non-empty and in the window: the common shape,
/// without the walk's loop.
#[inline(always)]
fn single(segs: &mut Segments, lo: u64, hi: u64, writable: bool, win: &Windowed<'_, '_>) -> bool {
    #[allow(clippy::cast_possible_truncation)]
    let len = hi as u32;
    let Some((host, gpa)) = win.limits.locate(lo, len, usize::from(writable)) else { return false };
    segs.segs.clear();
    segs.segs.push(RawSeg { host, len, gpa, slot: win.limits.slot(), writable });
    let (readable, writable_len) = if writable { (0, len) } else { (len, 0) };
    segs.totals = Totals { readable, writable: writable_len, seen_writable: writable };
    true
}

/// [`single`] against the batch's window as it is, for a caller that takes one chain and would
/// lay out the window's limits for nothing when the chain is a single buffer.
#[inline(always)]
fn single_in(segs: &mut Segments, lo: u64, hi: u64, writable: bool, window: &Window<'_>) -> bool {
    #[allow(clippy::cast_possible_truncation)]
    let len = hi as u32;
    if len == 0 {
        return false;
    }
    let Some(p) = window.translate_for(GuestPhysAddr::new(lo), len, writable) else { return false };
    segs.segs.clear();
    segs.segs.push(RawSeg { host: p.slice.as_ptr() as usize, len, gpa: p.phys.raw(), slot: p.slot, writable });
    let (readable, writable_len) = if writable { (0, len) } else { (len, 0) };
    segs.totals = Totals { readable, writable: writable_len, seen_writable: writable };
    true
}

/// Walks an indirect table whose descriptor's words are `lo`, `hi`: split tables (entries
/// chained by NEXT, flags in bits 32-47) or packed ones (every entry in order, flags in bits
/// 48-63).
#[inline(always)]
fn walk_table(lo: u64, hi: u64, packed: bool, fill: &mut Filling<'_>, win: &mut Windowed<'_, '_>) -> Option<()> {
    #[allow(clippy::cast_possible_truncation)]
    let len = hi as u32;
    if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT {
        return None;
    }
    let entries = (len / 16) as usize;
    fill.cap(entries);
    let base = Filling::table(lo, len, win)?;
    if !base.is_multiple_of(8) {
        return None;
    }
    let mut j = 0usize;
    loop {
        // SAFETY: j < entries, and the table's piece holds 16 * entries bytes from the 8-aligned
        // `base`, in a region the batch holds (the translation pinned it, or its cache holds it).
        let (elo, ehi) = unsafe { words((base + 16 * j) as *const u8) };
        let flags = if packed { packed_flags(ehi) } else { split_flags(ehi) };
        // `push` refuses an indirect entry (2.7.5.3.1: a table holds no indirect descriptor).
        fill.push(elo, ehi, flags, win)?;
        if packed {
            // A packed table is read in order, every entry of it (2.8.13).
            j += 1;
            if j == entries {
                return Some(());
            }
        } else {
            if flags & DESC_F_NEXT == 0 {
                return Some(());
            }
            j = usize::from(split_next(ehi));
            if j >= entries {
                return None;
            }
        }
    }
}

/// The split chain at `head` (virtio 1.x 2.7.5), read from the descriptor table at `desc`,
/// resolved into `segs`; `None` on any doubt.
///
/// # Safety
/// `desc` is the 16-aligned base of a descriptor table of `size` entries, mapped for the batch.
#[inline(always)]
pub(crate) unsafe fn split_chain(
    desc: *const u8,
    size: u16,
    head: u16,
    segs: &mut Segments,
    win: &mut Windowed<'_, '_>,
) -> Option<()> {
    if head >= size {
        return None;
    }
    // SAFETY: head < size: the entry lies in the table (the caller's contract).
    let (lo, hi) = unsafe { words(desc.add(16 * usize::from(head))) };
    let flags = split_flags(hi);
    if flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && single(segs, lo, hi, flags & DESC_F_WRITE != 0, win) {
        return Some(());
    }
    // SAFETY: the caller's contract.
    unsafe { split_walk(desc, size, lo, hi, segs, win) }
}

/// [`split_chain`] for a caller that takes one chain (`QueueBatch::pop`, `pop_burst`): the
/// batch's window is read as it is for a single buffer, and a [`Windowed`] made only for a walk.
///
/// # Safety
/// As for [`split_chain`].
#[inline(always)]
pub(crate) unsafe fn split_chain_once(
    desc: *const u8,
    size: u16,
    head: u16,
    segs: &mut Segments,
    mem: &Batch<'_>,
) -> Option<()> {
    if head >= size {
        return None;
    }
    // SAFETY: head < size: the entry lies in the table (the caller's contract).
    let (lo, hi) = unsafe { words(desc.add(16 * usize::from(head))) };
    let flags = split_flags(hi);
    if flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && single_in(segs, lo, hi, flags & DESC_F_WRITE != 0, &mem.window())
    {
        return Some(());
    }
    // SAFETY: the caller's contract.
    unsafe { split_walk(desc, size, lo, hi, segs, &mut Windowed::new(mem)) }
}

/// [`split_chain`] past its head's single buffer: the walk's loop. Inlined: out of line it has
/// the registers to itself but pays a call, saves and restores, and counts more instructions per
/// chain (callgrind, `examples/probe_pop.rs`).
///
/// # Safety
/// As for [`split_chain`].
#[inline(always)]
unsafe fn split_walk(
    desc: *const u8,
    size: u16,
    mut lo: u64,
    mut hi: u64,
    segs: &mut Segments,
    win: &mut Windowed<'_, '_>,
) -> Option<()> {
    let mut flags = split_flags(hi);
    let mut fill = Filling::new(segs, usize::from(size));
    if flags & DESC_F_INDIRECT != 0 {
        if flags & DESC_F_NEXT != 0 {
            return None;
        }
        walk_table(lo, hi, false, &mut fill, win)?;
        return fill.finish();
    }
    loop {
        fill.push(lo, hi, flags, win)?;
        if flags & DESC_F_NEXT == 0 {
            return fill.finish();
        }
        let next = split_next(hi);
        if next >= size {
            return None;
        }
        // SAFETY: next < size, as for the head. The chain cannot loop for ever: each step
        // pushes a segment, and `push` stops at the limit (at most the queue size).
        (lo, hi) = unsafe { words(desc.add(16 * usize::from(next))) };
        // An indirect descriptor inside a chain is the general walker's: `push` refuses it.
        flags = split_flags(hi);
    }
}

/// The packed chain whose head is at ring slot `head` (2.8.6), read from the descriptor ring at
/// `ring`, resolved into `segs`: its buffer id and how many ring descriptors it used; `None` on
/// any doubt. The caller has checked (with acquire ordering) that the head is available.
///
/// # Safety
/// `ring` is the 16-aligned base of a descriptor ring of `size` entries, mapped for the batch,
/// and `head < size`.
#[inline(always)]
pub(crate) unsafe fn packed_chain(
    ring: *const u8,
    size: u16,
    head: u16,
    segs: &mut Segments,
    win: &mut Windowed<'_, '_>,
) -> Option<(u16, u16)> {
    // SAFETY: head < size (the caller's contract).
    let (lo, hi) = unsafe { words(ring.add(16 * usize::from(head))) };
    let flags = packed_flags(hi);
    if flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && single(segs, lo, hi, flags & DESC_F_WRITE != 0, win) {
        return Some((packed_id(hi), 1));
    }
    // SAFETY: the caller's contract.
    unsafe { packed_walk(ring, size, head, lo, hi, segs, win) }
}

/// [`packed_chain`] for a caller that takes one chain, as [`split_chain_once`] is.
///
/// # Safety
/// As for [`packed_chain`].
#[inline(always)]
pub(crate) unsafe fn packed_chain_once(
    ring: *const u8,
    size: u16,
    head: u16,
    segs: &mut Segments,
    mem: &Batch<'_>,
) -> Option<(u16, u16)> {
    // SAFETY: head < size (the caller's contract).
    let (lo, hi) = unsafe { words(ring.add(16 * usize::from(head))) };
    let flags = packed_flags(hi);
    if flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && single_in(segs, lo, hi, flags & DESC_F_WRITE != 0, &mem.window())
    {
        return Some((packed_id(hi), 1));
    }
    // SAFETY: the caller's contract.
    unsafe { packed_walk(ring, size, head, lo, hi, segs, &mut Windowed::new(mem)) }
}

/// The buffer id of a packed descriptor's `hi` word (bits 32-47): the chain's last
/// descriptor's is the chain's.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
fn packed_id(hi: u64) -> u16 {
    (hi >> 32) as u16
}

/// [`packed_chain`] past its head's single buffer, as [`split_walk`] is for split rings.
///
/// # Safety
/// As for [`packed_chain`].
#[inline(always)]
unsafe fn packed_walk(
    ring: *const u8,
    size: u16,
    head: u16,
    mut lo: u64,
    mut hi: u64,
    segs: &mut Segments,
    win: &mut Windowed<'_, '_>,
) -> Option<(u16, u16)> {
    let id = packed_id;
    let mut flags = packed_flags(hi);
    let mut fill = Filling::new(segs, usize::from(size));
    if flags & DESC_F_INDIRECT != 0 {
        if flags & DESC_F_NEXT != 0 {
            return None;
        }
        walk_table(lo, hi, true, &mut fill, win)?;
        return fill.finish().map(|()| (id(hi), 1));
    }
    let mut slot = head;
    let mut count = 1u16;
    loop {
        fill.push(lo, hi, flags, win)?;
        if flags & DESC_F_NEXT == 0 {
            return fill.finish().map(|()| (id(hi), count));
        }
        // `push` bounds the chain at the limit (at most the queue size), so count stays within
        // the size and the slot arithmetic cannot overflow.
        slot += 1;
        if slot == size {
            slot = 0;
        }
        count += 1;
        // SAFETY: slot < size.
        (lo, hi) = unsafe { words(ring.add(16 * usize::from(slot))) };
        // `push` refuses an indirect descriptor, as above.
        flags = packed_flags(hi);
    }
}
