//! One batch of work on a queue ([`QueueBatch`], from [`crate::Queue::process`]): popping chains,
//! completing them, publishing, notification control. The walks themselves are in `split.rs`
//! and `packed.rs`; inflight recovery and resubmission in `resubmit.rs`.
//!
//! # A batch is bounded
//!
//! A batch holds off every invalidation that needs its queue quiet (the memory batch is a reader
//! of the protocol), so it must end however fast the driver refills the ring. It takes at most
//! the queue's batch limit of chains, and stops taking them as soon as an invalidation waits for
//! it ([`Batch::yield_requested`]); then `pop` says "nothing more", [`QueueBatch::exhausted`]
//! says why, and the caller starts another batch, between which the invalidation gets in.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vireo_memory::{Batch, GuestPhysAddr, GuestSlice};

use crate::chain::{Chain, Segments, DESC_F_AVAIL, DESC_F_USED};
use crate::error::QueueError;
use crate::inflight::Inflight;
use crate::inflight_packed::PackedInflight;
use crate::packed::{packed_available, packed_distance, packed_need_event};
use crate::queue::{Kind, QueueConfig, QueueState, UsedToken};
use crate::rings::{Area, Direct, Layout, RingAccess, Translated};
use crate::split::split_cached_pop;

/// The rings' access for one batch: cached views, or the translating path.
pub(crate) enum Access<'b, 'q> {
    Direct(Direct<'b>),
    Translated(Translated<'b, 'q>),
}

/// One batch of work on a queue (see [`crate::Queue::process`]).
pub struct QueueBatch<'b, 'q> {
    pub(crate) mem: &'b Batch<'q>,
    pub(crate) access: Access<'b, 'q>,
    pub(crate) cfg: &'b QueueConfig,
    pub(crate) layout: Layout,
    pub(crate) state: &'b mut QueueState,
    pub(crate) kind: &'b mut Kind,
    pub(crate) segs: &'b mut Segments,
    pub(crate) broken: &'b mut Option<Arc<QueueError>>,
    pub(crate) signalled: &'b mut u16,
    /// Used elements added since the last publication.
    pub(crate) used_added: u16,
    /// Used elements added in the whole batch (a position taken before one may not be rewound
    /// to).
    pub(crate) used_total: u32,
    pub(crate) batch_used_start: u16,
    /// Chains this batch may still take.
    pub(crate) budget: u32,
    /// The batch stopped taking chains because of its bound, not because the ring was empty.
    pub(crate) exhausted: bool,
    /// `Queue::notify_off`.
    pub(crate) notify_off: &'b mut Option<bool>,
    /// The fused loops prefetch buffers a few chains ahead (`set_prefetch`).
    pub(crate) prefetch: bool,
    /// VIRTIO_F_IN_ORDER negotiated (`Queue::set_in_order`).
    pub(crate) in_order: bool,
    /// Packed, in order: the publication's first used descriptor (its flags not yet written)
    /// stands for every completion since, which wrote nothing (`add_used_many`).
    pub(crate) collapsing: bool,
    /// Whether this batch logs (read once: logging cannot change under a running batch).
    pub(crate) logging: bool,
    pub(crate) inflight: Option<&'b mut Inflight>,
    pub(crate) packed_inflight: Option<&'b mut PackedInflight>,
}

/// One buffer of a chain taken with [`QueueBatch::pop_buffers`]: valid for the whole batch, so
/// that a device can hold several chains at once (a frame spread over several receive buffers).
#[derive(Clone, Copy, Debug)]
pub struct Buffer<'b> {
    /// Guest physical address of its first byte (what the dirty log records).
    pub gpa: GuestPhysAddr,
    /// The device may write it; else it reads it. Readable buffers come first in a chain.
    pub writable: bool,
    /// The host view.
    pub slice: GuestSlice<'b>,
}

/// What [`QueueBatch::pop_buffers`] took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Popped {
    /// What to complete it with.
    pub token: UsedToken,
    /// Bytes the device may read (the readable buffers, first).
    pub readable: u32,
    /// Bytes the device may write (the writable buffers, after them).
    pub writable: u32,
    /// How many buffers were appended.
    pub buffers: usize,
}

/// A position in the available ring ([`QueueBatch::avail_position`]), to give chains back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvailPosition {
    next_avail: u16,
    avail_wrap: bool,
    used_total: u32,
}

macro_rules! with_access {
    ($self:ident, $r:ident => $body:expr) => {
        match &$self.access {
            crate::batch::Access::Direct(d) => {
                let $r = d;
                $body
            }
            crate::batch::Access::Translated(t) => {
                let $r = t;
                $body
            }
        }
    };
}
pub(crate) use with_access;

const SPLIT_F_NO_NOTIFY: u16 = 1; // VIRTQ_USED_F_NO_NOTIFY
const SPLIT_F_NO_INTERRUPT: u16 = 1; // VIRTQ_AVAIL_F_NO_INTERRUPT
const EVENT_ENABLE: u16 = 0; // RING_EVENT_FLAGS_ENABLE
const EVENT_DISABLE: u16 = 1; // RING_EVENT_FLAGS_DISABLE
const EVENT_DESC: u16 = 2; // RING_EVENT_FLAGS_DESC

impl<'b, 'q> QueueBatch<'b, 'q> {
    /// Whether this batch reads the rings through cached direct pointers.
    pub fn is_cached(&self) -> bool {
        matches!(self.access, Access::Direct(_))
    }

    /// The memory batch, for the device's own buffer work (logging, I/O pins).
    pub fn memory(&self) -> &'b Batch<'q> {
        self.mem
    }

    #[cold]
    pub(crate) fn fail(&mut self, e: QueueError) -> QueueError {
        if matches!(e, QueueError::Broken(_)) || e.is_iotlb_miss() {
            return e;
        }
        tracing::warn!(error = %e, "virtqueue broken by the driver");
        let e = Arc::new(e);
        *self.broken = Some(e.clone());
        QueueError::Broken(e)
    }

    /// Has `pop_each` and `complete_singles` prefetch the buffers of the chains a few entries
    /// ahead of the one they hand out: for a device that reads or writes every buffer (a network
    /// device moving frames another core produces or consumes), so that the cache misses overlap.
    /// A hint that costs a few loads per chain; off by default.
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Whether the batch stopped taking chains because of its bound (its chain limit, or an
    /// invalidation waiting for it) rather than because the driver had nothing more: the caller
    /// ends the batch and starts another one soon, without waiting for a kick.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// How many chains this batch may still take, at most `max`; 0 (and `exhausted`) when its
    /// bound is reached or an invalidation waits for it.
    #[inline(always)]
    pub(crate) fn allowance(&mut self, max: usize) -> usize {
        if self.budget == 0 || self.mem.yield_requested() {
            self.exhausted = true;
            return 0;
        }
        max.min(self.budget as usize)
    }

    /// Charges `n` chains taken to the batch's bound.
    #[inline(always)]
    pub(crate) fn charge(&mut self, n: usize) {
        // n <= budget (`allowance`), which fits u32.
        self.budget -= u32::try_from(n).unwrap_or(self.budget).min(self.budget);
    }

    /// Pops the next chain as [`QueueBatch::pop`] does and appends its buffers to `out`, views
    /// valid until the batch ends (not only until the next pop): a device that needs several
    /// chains at once (mergeable receive buffers) holds them this way, within the batch.
    pub fn pop_buffers(&mut self, out: &mut Vec<Buffer<'b>>) -> Result<Option<Popped>, QueueError> {
        if let Some(e) = self.broken.as_ref() {
            return Err(QueueError::Broken(e.clone()));
        }
        let mut got = None;
        self.pop_each(1, |c| {
            got = Some(Self::buffers_of(c, out));
            None
        })?;
        Ok(got)
    }

    /// Pops up to `max` chains as [`QueueBatch::pop_buffers`] does, appending their buffers to
    /// `bufs` and what was taken to `taken`; returns how many. One call for a burst: a device
    /// that handles chains in bursts (prefetching their buffers first) pays no per-chain return.
    ///
    /// It is [`QueueBatch::pop_each`] with every chain left in flight: the same walks, in the
    /// loop that keeps the rings and the window in registers (a loop of `pop`s costs some 60
    /// more instructions per chain).
    pub fn pop_burst(
        &mut self,
        max: usize,
        bufs: &mut Vec<Buffer<'b>>,
        taken: &mut Vec<Popped>,
    ) -> Result<usize, QueueError> {
        if let Some(e) = self.broken.as_ref() {
            return Err(QueueError::Broken(e.clone()));
        }
        self.pop_each(max, |c| {
            taken.push(Self::buffers_of(c, bufs));
            None
        })
    }

    /// Appends the buffers of `c`, a chain popped in this batch, to `bufs`, and says what was
    /// taken.
    #[inline(always)]
    fn buffers_of(c: &Chain<'_>, bufs: &mut Vec<Buffer<'b>>) -> Popped {
        // The totals from the segments as they are copied out, not from the walk's totals,
        // which its last stores just wrote (a wider load of them would stall).
        let (mut readable, mut writable) = (0u32, 0u32);
        let segs = c.raw_segments();
        bufs.reserve(segs.len());
        for s in segs {
            if s.writable {
                writable = writable.wrapping_add(s.len);
            } else {
                readable = readable.wrapping_add(s.len);
            }
            bufs.push(Buffer {
                gpa: GuestPhysAddr::new(s.gpa),
                writable: s.writable,
                // SAFETY: the segment was translated in this batch (its host address is never
                // null: it lies in a mapping), which holds its region (a pin, or the cached
                // translation of the rings' region) until the batch ends; `'b` is the batch's
                // borrow of its memory batch, so the view cannot outlive it either.
                slice: unsafe { GuestSlice::new(std::ptr::NonNull::new_unchecked(s.host as *mut u8), s.len as usize) },
            });
        }
        Popped { token: c.token(), readable, writable, buffers: segs.len() }
    }

    /// Where the device is in the available ring now: [`QueueBatch::rewind`] gives back every
    /// chain taken after it.
    pub fn avail_position(&self) -> AvailPosition {
        AvailPosition {
            next_avail: self.state.next_avail,
            avail_wrap: self.state.avail_wrap,
            used_total: self.used_total,
        }
    }

    /// Gives back, unconsumed, every chain popped in this batch since `pos` was taken: the driver
    /// still owns them and they are popped again, re-read and re-translated, next time (a receive
    /// buffer popped for a packet that turned out not to be there, a frame the port could not take
    /// now). Nothing of them is held afterwards, no pin and no position.
    ///
    /// Refused (an error, nothing changed) once a used element was added after `pos` (on a
    /// packed ring it may have overwritten the descriptors to be re-read), and on a queue with an
    /// inflight record (which has recorded the chains as taken).
    pub fn rewind(&mut self, pos: AvailPosition) -> Result<(), QueueError> {
        if pos.used_total != self.used_total {
            return Err(QueueError::Config { what: "rewind past a completed chain" });
        }
        if self.inflight.is_some() || self.packed_inflight.is_some() {
            return Err(QueueError::Config { what: "rewind with inflight tracking" });
        }
        if let Kind::Packed { rewound_end, .. } = &mut *self.kind {
            // Remember how far the device had taken chains, unless an earlier rewind reached
            // further.
            let here = (self.state.next_avail, self.state.avail_wrap);
            let size = self.cfg.size;
            let further = match *rewound_end {
                Some(end) => {
                    packed_distance(size, (pos.next_avail, pos.avail_wrap), end)
                        < packed_distance(size, (pos.next_avail, pos.avail_wrap), here)
                }
                None => true,
            };
            if further {
                *rewound_end = Some(here);
            }
        }
        self.state.next_avail = pos.next_avail;
        self.state.avail_wrap = pos.avail_wrap;
        Ok(())
    }

    /// A packed ring whose device position is back where it had taken chains to before it gave
    /// some back: the kick event goes at the position again (`enable_notification`).
    #[inline(always)]
    fn passed_rewound_end(&mut self) {
        if let Kind::Packed { rewound_end, .. } = &mut *self.kind {
            if *rewound_end == Some((self.state.next_avail, self.state.avail_wrap)) {
                *rewound_end = None;
            }
        }
    }

    /// Pops the next available chain, validated and resolved into host segments; `None` when
    /// the driver has made nothing more available. An error breaks the queue.
    #[inline(always)]
    pub fn pop(&mut self) -> Result<Option<Chain<'_>>, QueueError> {
        if let Some(e) = self.broken.as_ref() {
            return Err(QueueError::Broken(e.clone()));
        }
        if self.allowance(1) == 0 {
            return Ok(None);
        }
        let chain = self.pop_unbounded_id()?;
        match chain {
            Some((id, descs)) => {
                self.budget -= 1;
                Ok(Some(Chain::new(id, descs, self.segs)))
            }
            None => Ok(None),
        }
    }

    /// The cached walkers alone, for a queue with no inflight record: the next chain's id and
    /// ring descriptors, or `None` for "look with [`QueueBatch::pop_uncached_id`]" (nothing
    /// known available, or a doubt). A small return value, kept in registers: through the large
    /// `Result` the id and count were stored to the stack in pieces and loaded back whole, a
    /// store-forwarding stall on every chain of a burst (a quarter of the sink's samples on
    /// packed rings).
    #[inline(always)]
    fn pop_cached_id(&mut self) -> Option<(u16, u16)> {
        if self.inflight.is_some() || self.packed_inflight.is_some() {
            return None;
        }
        match (&*self.kind, &self.access) {
            (Kind::Split { avail_shadow, .. }, Access::Direct(d)) => {
                if self.state.next_avail == *avail_shadow {
                    return None;
                }
                split_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs).map(|id| (id, 1))
            }
            (Kind::Packed { .. }, Access::Direct(d)) => {
                let got = crate::packed::packed_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs);
                if got.is_some() {
                    self.passed_rewound_end();
                }
                got
            }
            _ => None,
        }
    }

    /// `pop` without the batch's bound (charged only when a chain is taken).
    #[inline(always)]
    fn pop_unbounded_id(&mut self) -> Result<Option<(u16, u16)>, QueueError> {
        match self.pop_cached_id() {
            Some(got) => Ok(Some(got)),
            None => self.pop_uncached_id(),
        }
    }

    /// What [`QueueBatch::pop_unbounded_id`] does once [`QueueBatch::pop_cached_id`] found
    /// nothing: chains to resubmit, the cached walkers of a queue with an inflight record (which
    /// records what they take), and the general walkers.
    #[inline(always)]
    fn pop_uncached_id(&mut self) -> Result<Option<(u16, u16)>, QueueError> {
        // Without an inflight record the cached walkers have been tried already.
        let cached_tried = self.inflight.is_none() && self.packed_inflight.is_none();
        if let Some(inf) = self.inflight.as_ref() {
            if !inf.resubmit.is_empty() {
                return self.pop_resubmit();
            }
        }
        // On the cached path, a known-available entry goes through the cached walker first. Any
        // doubt takes the general walker, which starts over and does every check; nothing but the
        // segment list (and the batch's pins and window) is changed unless this succeeds.
        if let (Kind::Split { avail_shadow, .. }, Access::Direct(d), false) = (&*self.kind, &self.access, cached_tried)
        {
            if self.state.next_avail != *avail_shadow {
                if let Some(id) = split_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs) {
                    if self.inflight.is_some() {
                        self.inflight_record(id, Inflight::mark)?;
                    }
                    return Ok(Some((id, 1)));
                }
            }
        }
        if self.packed_inflight.as_ref().is_some_and(|i| !i.resubmit.is_empty()) {
            return self.pop_resubmit_packed();
        }
        let head_slot = self.state.next_avail;
        if let (Kind::Packed { .. }, Access::Direct(d), false) = (&*self.kind, &self.access, cached_tried) {
            if let Some((id, count)) =
                crate::packed::packed_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs)
            {
                self.passed_rewound_end();
                if self.packed_inflight.is_some() {
                    self.packed_take(head_slot, count)?;
                }
                return Ok(Some((id, count)));
            }
        }
        let res = match self.kind {
            Kind::Split { .. } => {
                with_access!(self, r => crate::split::pop_split(r, self.mem, self.cfg.size, self.state, self.kind, self.segs))
            }
            Kind::Packed { .. } => {
                with_access!(self, r => crate::packed::pop_packed(r, self.mem, self.cfg.size, self.state, self.segs))
            }
        };
        match res {
            Ok(Some((id, ring_descs))) => {
                self.passed_rewound_end();
                if self.inflight.is_some() {
                    self.inflight_record(id, Inflight::mark)?;
                }
                if self.packed_inflight.is_some() {
                    self.packed_take(head_slot, ring_descs)?;
                }
                Ok(Some((id, ring_descs)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Pops up to `max` available chains and hands each to `f`, which does the device's work
    /// and says what became of the chain: `Some(written)` completes it at once (the `written`
    /// bytes are logged while logging is on, and the used element is written in the same loop),
    /// `None` leaves it in flight, to be completed later with [`QueueBatch::add_used`] and its
    /// token. Returns how many chains were popped; the used elements are published as
    /// [`QueueBatch::add_used`]'s are (by [`QueueBatch::publish`] or the end of the batch).
    ///
    /// This is `pop` and `add_used` in one loop: on the cached path each chain goes through the
    /// cached walker (`cached.rs`) and its used element is two stores (split) or three (packed),
    /// with the ring pointers, the region window and the counters kept in registers across the
    /// loop. Anything the cached walker doubts, and every queue it does not serve (translating
    /// path, inflight tracking, a chain to resubmit, a packed ring while logging), goes through
    /// `pop` and `add_used`; the chains, their checks and their errors are the same either way.
    /// A buffer write that cannot be logged (a dirty log smaller than guest memory) breaks the
    /// queue on either path, and that chain is taken and not completed: a write the log lacks is
    /// never exposed.
    pub fn pop_each(&mut self, max: usize, mut f: impl FnMut(&Chain<'_>) -> Option<u32>) -> Result<usize, QueueError> {
        let mem = self.mem;
        let max = self.allowance(max);
        let mut done = 0;
        while done < max {
            let fast = match (&*self.kind, &self.access) {
                (Kind::Split { .. }, Access::Direct(_)) => self.split_each(max - done, &mut f),
                (Kind::Packed { .. }, Access::Direct(_)) => self.packed_each(max - done, &mut f),
                _ => Ok(0),
            };
            let k = match fast {
                Ok(k) => k,
                Err(e) => {
                    self.charge(done);
                    return Err(e);
                }
            };
            done += k;
            if done == max {
                break;
            }
            // What the loop above left: a chain it doubted, or a queue it does not serve.
            let popped = match self.pop_unbounded_id() {
                Ok(p) => p,
                Err(e) => {
                    self.charge(done);
                    return Err(e);
                }
            };
            let Some((id, descs)) = popped else { break };
            let chain = Chain::new(id, descs, self.segs);
            let token = chain.token();
            let finished = f(&chain);
            let logged = finished.map_or(Ok(()), |written| chain.log_written(mem, written));
            done += 1;
            if let Err(e) = logged {
                // As in the loops above: not completed, and the queue breaks.
                self.charge(done);
                return Err(self.fail(e));
            }
            if let Some(written) = finished {
                if let Err(e) = self.add_used(token, written) {
                    self.charge(done);
                    return Err(e);
                }
            }
        }
        self.charge(done);
        Ok(done)
    }

    #[inline]
    pub(crate) fn ensure_used_known(&mut self) -> Result<(), QueueError> {
        if let Kind::Split { used_known, .. } = self.kind {
            if !*used_known {
                // After SET_VRING_BASE the used index is whatever the used ring says.
                let idx = with_access!(self, r => r.load_u16(Area::Device, 2, Ordering::Acquire))?;
                self.state.next_used = u16::from_le(idx);
                *self.signalled = self.state.next_used;
                *used_known = true;
            }
        }
        Ok(())
    }

    /// Completes a chain: `len` bytes were written into its writable part. The used index is
    /// published when the batch ends.
    #[inline(always)]
    pub fn add_used(&mut self, token: UsedToken, len: u32) -> Result<(), QueueError> {
        if let Some(e) = self.broken.as_ref() {
            return Err(QueueError::Broken(e.clone()));
        }
        if self.used_added == 0 {
            self.ensure_used_known()?;
            self.batch_used_start = self.state.next_used;
        } else if let (Kind::Split { .. }, Access::Direct(d)) = (&*self.kind, &self.access) {
            // The cached split path after the first element of the batch: two aligned stores.
            let off = 4 + 8 * usize::from(self.state.next_used & (self.cfg.size - 1));
            if d.write::<u32>(Area::Device, off, u32::from(token.id).to_le()).is_ok()
                && d.write::<u32>(Area::Device, off + 4, len.to_le()).is_ok()
            {
                self.log_ring(Area::Device, off, 8)?;
                if self.inflight.is_some() {
                    self.inflight_record(token.id, Inflight::link)?;
                }
                self.state.next_used = self.state.next_used.wrapping_add(1);
                self.used_added = self.used_added.wrapping_add(1);
                self.used_total = self.used_total.wrapping_add(1);
                return Ok(());
            }
        }
        let size = self.cfg.size;
        let res = match self.kind {
            Kind::Split { .. } => {
                let slot = usize::from(self.state.next_used & (size - 1));
                let off = 4 + 8 * slot;
                // Two aligned 32-bit stores: a used element sits at a 4-byte boundary.
                with_access!(self, r => {
                    r.write::<u32>(Area::Device, off, u32::from(token.id).to_le())?;
                    r.write::<u32>(Area::Device, off + 4, len.to_le())
                })
                .map(|()| (Area::Device, off))
            }
            Kind::Packed { first_used_flags, .. } => {
                // An element of its own: the first descriptor no longer stands for what follows.
                self.collapsing = false;
                let slot = self.state.next_used;
                let off = 16 * usize::from(slot);
                let flags = if self.state.used_wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
                let write = with_access!(self, r => {
                    r.write::<u32>(Area::Desc, off + 8, len.to_le())?;
                    r.write::<u16>(Area::Desc, off + 12, token.id.to_le())?;
                    if first_used_flags.is_none() {
                        // The first used descriptor of a batch is made visible last (2.8.21.2).
                        *first_used_flags = Some((slot, flags));
                        Ok(())
                    } else {
                        r.write::<u16>(Area::Desc, off + 14, flags.to_le())
                    }
                });
                write.map(|()| (Area::Desc, off + 8))
            }
        };
        let (area, off) = res.map_err(|e| self.fail(e))?;
        self.log_ring(area, off, 8)?;
        match self.kind {
            Kind::Split { .. } => self.state.next_used = self.state.next_used.wrapping_add(1),
            Kind::Packed { .. } => {
                let (next, wrapped) =
                    crate::packed::advance(self.state.next_used, token.ring_descs.clamp(1, size), size);
                self.state.next_used = next;
                self.state.used_wrap ^= wrapped;
            }
        }
        if self.inflight.is_some() {
            self.inflight_record(token.id, Inflight::link)?;
        }
        if let Some(Err(e)) = self.packed_inflight.as_mut().map(|i| i.complete(token.id)) {
            return Err(self.fail(e));
        }
        self.used_added = self.used_added.wrapping_add(1);
        self.used_total = self.used_total.wrapping_add(1);
        Ok(())
    }

    /// [`QueueBatch::add_used`] for many chains: used elements for `done` (token, bytes written)
    /// in order. On the cached split path a loop of two stores each; anything else goes through
    /// `add_used`.
    pub fn add_used_many(&mut self, done: impl IntoIterator<Item = (UsedToken, u32)>) -> Result<(), QueueError> {
        if self.in_order && self.packed_inflight.is_none() && matches!(&*self.kind, Kind::Packed { .. }) {
            // A packed ring under IN_ORDER: a completion that wrote nothing, after one that
            // wrote nothing and whose flags are not written yet, is folded into it (the position
            // moves on by its descriptors; the head's id becomes the last folded one's, written
            // once at the end of the run); any other goes through `add_used`.
            let mut folded: Option<(u16, u16)> = None;
            for (t, len) in done {
                if let Some(head) = self.folding_head(len) {
                    self.fold_in_order(t);
                    folded = Some((head, t.id));
                } else {
                    if let Some((head, id)) = folded.take() {
                        self.write_folded_id(head, id)?;
                    }
                    self.add_used(t, len)?;
                    // The element just written is the publication's first (its flags deferred)
                    // and wrote nothing: later ones may fold into it.
                    self.collapsing = len == 0 && self.used_added == 1;
                }
            }
            if let Some((head, id)) = folded {
                self.write_folded_id(head, id)?;
            }
            return Ok(());
        }
        let fast = self.broken.is_none()
            && self.inflight.is_none()
            && matches!((&*self.kind, &self.access), (Kind::Split { .. }, Access::Direct(_)));
        if !fast {
            for (t, len) in done {
                self.add_used(t, len)?;
            }
            return Ok(());
        }
        if self.used_added == 0 {
            self.ensure_used_known()?;
            self.batch_used_start = self.state.next_used;
        }
        let Access::Direct(d) = &self.access else { return Ok(()) };
        let used = d.base(Area::Device);
        let mask = self.cfg.size - 1;
        let start = self.state.next_used;
        let mut k = 0u16;
        for (t, len) in done {
            let slot = usize::from(start.wrapping_add(k) & mask);
            // SAFETY: slot < size and the used ring's view holds 6 + 8 * size bytes from a
            // 4-aligned base, so the element at 4 + 8 * slot (two u32) is inside it, aligned.
            unsafe {
                let p = used.add(4 + 8 * slot).cast::<u32>();
                p.write_volatile(u32::from(t.id).to_le());
                p.add(1).write_volatile(len.to_le());
            }
            k = k.wrapping_add(1);
        }
        self.state.next_used = start.wrapping_add(k);
        self.used_added = self.used_added.wrapping_add(k);
        self.used_total = self.used_total.wrapping_add(u32::from(k));
        if self.logging {
            for j in 0..k {
                self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & mask), 8)?;
            }
        }
        Ok(())
    }

    /// The slot of the used descriptor a completion of `len` bytes folds into (in order, packed:
    /// the publication's head, while every completion in it wrote nothing), if it may.
    #[inline(always)]
    fn folding_head(&self, len: u32) -> Option<u16> {
        match &*self.kind {
            Kind::Packed { first_used_flags: Some((slot, _)), .. }
                if self.collapsing && len == 0 && self.broken.is_none() =>
            {
                Some(*slot)
            }
            _ => None,
        }
    }

    /// Counts `token` as used, folded into the head: the device position moves past its
    /// descriptors; the head's id is written by [`QueueBatch::write_folded_id`].
    #[inline(always)]
    fn fold_in_order(&mut self, token: UsedToken) {
        let size = self.cfg.size;
        let (next, wrapped) = crate::packed::advance(self.state.next_used, token.ring_descs.clamp(1, size), size);
        self.state.next_used = next;
        self.state.used_wrap ^= wrapped;
        self.used_added = self.used_added.wrapping_add(1);
        self.used_total = self.used_total.wrapping_add(1);
    }

    /// Writes the id of the last completion folded into the head descriptor at `head` (its
    /// flags are written at publication, after this).
    fn write_folded_id(&mut self, head: u16, id: u16) -> Result<(), QueueError> {
        let off = 16 * usize::from(head) + 12;
        with_access!(self, r => r.write::<u16>(Area::Desc, off, id.to_le())).map_err(|e| self.fail(e))?;
        self.log_ring(Area::Desc, off, 2)
    }

    /// Logs a device write to a ring area at the guest physical page it lands on (behind an
    /// IOTLB the ring's address is an IOVA, taken to its page through the batch's IOTLB). Not the
    /// frontend's `log_guest_addr`: for a packed ring QEMU sends the device event area's address
    /// there, while the used descriptors are written into the descriptor ring. A write the log
    /// cannot record breaks the queue, as a buffer write does: the driver must never see a
    /// completion the destination of a migration would lack.
    #[inline(always)]
    pub(crate) fn log_ring(&mut self, area: Area, off: usize, len: u64) -> Result<(), QueueError> {
        if self.logging {
            return self.log_ring_slow(area, off, len);
        }
        Ok(())
    }

    #[cold]
    fn log_ring_slow(&mut self, area: Area, off: usize, len: u64) -> Result<(), QueueError> {
        let gpa = GuestPhysAddr::new(self.layout.gpa[area as usize].raw().wrapping_add(off as u64));
        match self.mem.log_write_addr(gpa, len) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(QueueError::mem(gpa, len, e))),
        }
    }

    /// Asks the driver to notify (kick) on new buffers, and says whether buffers arrived
    /// meanwhile (then the caller should process again rather than sleep).
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        *self.notify_off = Some(false);
        let res = self.enable_notification_inner();
        res.map_err(|e| self.fail(e))
    }

    fn enable_notification_inner(&mut self) -> Result<bool, QueueError> {
        let size = self.cfg.size;
        match self.kind {
            Kind::Split { avail_shadow, .. } => {
                // The event is the driver's index as last read, not the device's position: a
                // device that left buffers available (given back, or too few for its need) is
                // kicked when more come, and a driver past the device's position but not past what
                // it has seen would otherwise never kick (its next index never crosses an event
                // behind it). With nothing left behind the two are the same.
                let seen = *avail_shadow;
                if self.cfg.event_idx {
                    let off = 4 + 8 * usize::from(size);
                    with_access!(self, r => r.write::<u16>(Area::Device, off, seen.to_le()))?;
                    self.log_ring(Area::Device, off, 2)?;
                } else {
                    with_access!(self, r => r.store_u16(Area::Device, 0, 0, Ordering::Relaxed))?;
                    self.log_ring(Area::Device, 0, 2)?;
                }
                with_access!(self, r => {
                    // Pairs with the driver's barrier between writing the available index and
                    // reading the used ring's flags / avail_event (2.7.13): one of us sees the
                    // other.
                    fence(Ordering::SeqCst);
                    let idx = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
                    Ok(idx != seen)
                })
            }
            Kind::Packed { ref mut rewound_end, .. } => {
                // The event descriptor is just past what the device has taken, chains given back
                // included (the same as the device's position when nothing was given back), for
                // the reason above. Not "the first descriptor not available now": a chain the
                // driver made available since the device last looked would be passed over, and
                // neither kicked for nor found by the check below.
                let here = (self.state.next_avail, self.state.avail_wrap);
                let (slot, wrap) = match *rewound_end {
                    Some(end) if packed_distance(size, here, end) <= size => end,
                    _ => {
                        *rewound_end = None;
                        here
                    }
                };
                if self.cfg.event_idx {
                    let off_wrap = slot | (u16::from(wrap) << 15);
                    with_access!(self, r => {
                        r.write::<u16>(Area::Device, 0, off_wrap.to_le())?;
                        r.store_u16(Area::Device, 2, EVENT_DESC.to_le(), Ordering::Release)
                    })?;
                    self.log_ring(Area::Device, 0, 4)?;
                } else {
                    with_access!(self, r => r.store_u16(Area::Device, 2, EVENT_ENABLE.to_le(), Ordering::Release))?;
                    self.log_ring(Area::Device, 2, 2)?;
                }
                let at = QueueState { next_avail: slot, avail_wrap: wrap, ..*self.state };
                with_access!(self, r => {
                    // Pairs with the driver's barrier between making a descriptor available and
                    // reading the device event suppression area (2.8.21).
                    fence(Ordering::SeqCst);
                    packed_available(r, size, &at).map(|d| d.is_some())
                })
            }
        }
    }

    /// Asks the driver not to notify (the device polls).
    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        if *self.notify_off == Some(true) {
            return Ok(());
        }
        *self.notify_off = Some(true);
        let res = match self.kind {
            Kind::Split { .. } if self.cfg.event_idx => Ok(()),
            Kind::Split { .. } => {
                with_access!(self, r => r.store_u16(Area::Device, 0, SPLIT_F_NO_NOTIFY.to_le(), Ordering::Relaxed))
                    .and_then(|()| self.log_ring(Area::Device, 0, 2))
            }
            Kind::Packed { .. } => {
                with_access!(self, r => r.store_u16(Area::Device, 2, EVENT_DISABLE.to_le(), Ordering::Relaxed))
                    .and_then(|()| self.log_ring(Area::Device, 2, 2))
            }
        };
        res.map_err(|e| self.fail(e))
    }

    pub(crate) fn finish(mut self) -> Result<bool, QueueError> {
        self.publish()
    }

    /// Publishes the used elements added so far (the dirty log first), as the end of the batch
    /// does, and says whether the driver must be notified; the batch goes on. A worker that
    /// completes many chains in one batch publishes part-way, so that the driver can start on
    /// the first completions while the device works on the rest.
    pub fn publish(&mut self) -> Result<bool, QueueError> {
        if self.used_added == 0 {
            return Ok(false);
        }
        let res = self.publish_inner();
        let notify = res.map_err(|e| self.fail(e))?;
        *self.signalled = self.state.next_used;
        self.used_added = 0;
        self.collapsing = false;
        Ok(notify)
    }

    fn publish_inner(&mut self) -> Result<bool, QueueError> {
        let flush_error = |e| QueueError::mem(self.layout.gpa[2], 0, e);
        // Buffer and used-element bits go into the log before the index (or flag) that exposes
        // them.
        self.mem.flush_log().map_err(flush_error)?;
        let size = self.cfg.size;
        // The store that publishes, and the ring write it is, logged after it (a log bit set
        // before the store could be synced and cleared by the frontend before the store lands).
        match self.kind {
            Kind::Split { .. } => {
                // Release: pairs with the driver's read barrier after it reads the used index
                // (2.7.14): the used elements written above are visible first.
                let idx = self.state.next_used.to_le();
                with_access!(self, r => r.store_u16(Area::Device, 2, idx, Ordering::Release))?;
                self.log_ring(Area::Device, 2, 2)?;
                if let Some(inf) = self.inflight.as_mut() {
                    inf.published(self.state.next_used, self.used_added)?;
                }
            }
            Kind::Packed { ref mut first_used_flags, .. } => {
                let first = first_used_flags.take();
                if let Some(inf) = self.packed_inflight.as_mut() {
                    inf.publishing(self.state.next_used, self.state.used_wrap)?;
                }
                if let Some((slot, flags)) = first {
                    let off = 16 * usize::from(slot) + 14;
                    // Release: the used descriptors written in this batch become visible before
                    // the first one's flags make them available to the driver.
                    with_access!(self, r => r.store_u16(Area::Desc, off, flags.to_le(), Ordering::Release))?;
                    self.log_ring(Area::Desc, off, 2)?;
                }
                if let Some(inf) = self.packed_inflight.as_mut() {
                    inf.published(self.state.next_used, self.state.used_wrap)?;
                }
            }
        }
        self.mem.flush_log().map_err(|e| QueueError::mem(self.layout.gpa[2], 0, e))?;
        // Pairs with the driver's barrier between publishing new buffers (or its event index)
        // and reading the used index (2.7.10, 2.8.21): of the two, one sees the other.
        fence(Ordering::SeqCst);
        let (old, new) = (self.batch_used_start, self.state.next_used);
        let event_idx = self.cfg.event_idx;
        let (signalled, used_wrap) = (*self.signalled, self.state.used_wrap);
        match self.kind {
            Kind::Split { .. } => with_access!(self, r => {
                if event_idx {
                    let event = u16::from_le(r.read::<u16>(Area::Driver, 4 + 2 * usize::from(size))?);
                    Ok(crate::split::vring_need_event(event, new, old))
                } else {
                    let flags = u16::from_le(r.load_u16(Area::Driver, 0, Ordering::Relaxed)?);
                    Ok(flags & SPLIT_F_NO_INTERRUPT == 0)
                }
            }),
            Kind::Packed { .. } => with_access!(self, r => {
                let flags = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
                match flags {
                    EVENT_DISABLE => Ok(false),
                    EVENT_DESC if event_idx => {
                        let off_wrap = u16::from_le(r.read::<u16>(Area::Driver, 0)?);
                        Ok(packed_need_event(off_wrap, size, signalled, new, used_wrap))
                    }
                    _ => Ok(true),
                }
            }),
        }
    }
}
