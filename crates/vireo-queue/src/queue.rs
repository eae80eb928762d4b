//! A virtqueue, split or packed, as the device sees it.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vireo_memory::{Batch, GuestPhysAddr, GuestSlice, Perm, QueueHandle, QueueMemory, MAX_CACHED};

use crate::cached;
use crate::chain::{
    access, Chain, Descriptor, Segments, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE,
    MAX_INDIRECT,
};
use crate::error::QueueError;
use crate::inflight::{Inflight, InflightRegion};
use crate::inflight_packed::PackedInflight;
use crate::rings::{Area, Direct, Layout, RingAccess, Translated};

/// The largest queue virtio allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Where a queue's rings are, in guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingAddrs {
    /// Split virtqueue (virtio 1.x 2.7): descriptor table, available ring, used ring.
    Split {
        /// Descriptor table (16-byte aligned).
        desc: GuestPhysAddr,
        /// Available ring (2-byte aligned).
        avail: GuestPhysAddr,
        /// Used ring (4-byte aligned).
        used: GuestPhysAddr,
    },
    /// Packed virtqueue (2.8): descriptor ring and the two event suppression areas.
    Packed {
        /// Descriptor ring (16-byte aligned).
        desc: GuestPhysAddr,
        /// Driver event suppression area (4-byte aligned).
        driver: GuestPhysAddr,
        /// Device event suppression area (4-byte aligned).
        device: GuestPhysAddr,
    },
}

/// How a queue is set up.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Number of descriptors (a power of two for split queues), at most 32768.
    pub size: u16,
    /// Ring addresses.
    pub addrs: RingAddrs,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Where writes to the used ring (split) or descriptor ring (packed) are logged while dirty
    /// logging is on (vhost-user's `log_guest_addr`); the ring's own address when `None`.
    pub ring_log_addr: Option<GuestPhysAddr>,
}

/// The device's position in a queue, for stop/start and migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Next available entry the device will read (split: free-running; packed: ring slot).
    pub next_avail: u16,
    /// Next used entry the device will write (split: free-running; packed: ring slot).
    pub next_used: u16,
    /// Packed: the driver ring wrap counter the device expects.
    pub avail_wrap: bool,
    /// Packed: the device ring wrap counter.
    pub used_wrap: bool,
}

/// What a completion needs to know about the chain it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedToken {
    /// The chain's id (split head, packed buffer id).
    pub id: u16,
    /// How many ring descriptors the chain used (packed queues advance by it).
    pub ring_descs: u16,
}

/// A chain of one descriptor, as [`QueueBatch::pop_singles`] hands them out (the shape of
/// receive buffers): its id, whether the device writes it, the buffer, and the guest physical
/// address the buffer starts at (what the dirty log records after a write).
#[derive(Clone, Copy, Debug)]
pub struct Single<'b> {
    /// The chain's head (split) index.
    pub id: u16,
    /// The device may write it (VIRTQ_DESC_F_WRITE); else it reads it.
    pub writable: bool,
    /// The buffer, valid for the batch.
    pub buf: GuestSlice<'b>,
    /// Guest physical address of `buf`'s first byte.
    pub phys: GuestPhysAddr,
    /// The protocol slot of `buf`'s region: what an I/O that outlives the batch pins
    /// ([`vireo_memory::Batch::io_pins`]).
    pub slot: u16,
}

impl Single<'_> {
    /// An unused entry, to fill arrays with before [`QueueBatch::pop_singles`].
    pub const EMPTY: Single<'static> =
        Single { id: 0, writable: false, buf: GuestSlice::empty(), phys: GuestPhysAddr::new(0), slot: 0 };

    /// What to pass to [`QueueBatch::add_used`] for it.
    pub fn token(&self) -> UsedToken {
        UsedToken { id: self.id, ring_descs: 1 }
    }
}

impl Chain<'_> {
    /// What to pass to [`QueueBatch::add_used`] for this chain.
    pub fn token(&self) -> UsedToken {
        UsedToken { id: self.id, ring_descs: self.ring_descs }
    }
}

#[derive(Debug)]
enum Kind {
    Split { avail_shadow: u16, used_known: bool },
    Packed { first_used_flags: Option<(u16, u16)> },
}

/// A virtqueue: its configuration, the device's position, and its view of guest memory.
#[derive(Debug)]
pub struct Queue {
    mem: QueueMemory,
    cfg: QueueConfig,
    layout: Layout,
    state: QueueState,
    kind: Kind,
    segs: Segments,
    broken: Option<Arc<QueueError>>,
    /// The used index (split) or used position with wrap (packed) at the last notification
    /// decision.
    signalled: u16,
    /// Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), when the frontend gave a region.
    inflight: Option<Box<Inflight>>,
    /// The same for a packed ring, whose region keeps copies of the descriptors in flight.
    packed_inflight: Option<Box<PackedInflight>>,
    /// The negotiated features, recorded in a fresh inflight region.
    inflight_features: u64,
}

/// `slot + n` on a packed ring of `size` (`slot < size`, `n <= size`), and whether it wrapped.
fn advance(slot: u16, n: u16, size: u16) -> (u16, bool) {
    let next = u32::from(slot) + u32::from(n);
    let size = u32::from(size);
    let (next, wrapped) = if next >= size { (next - size, true) } else { (next, false) };
    debug_assert!(next < size);
    // next < size <= 32768.
    (u16::try_from(next).unwrap_or(0), wrapped)
}

/// `vring_need_event` (virtio 1.x 2.7.10): whether moving the used index from `old` to `new`
/// crossed `event`.
#[inline]
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn check_area(gpa: GuestPhysAddr, len: u64, align: u64) -> Result<(), QueueError> {
    if gpa.raw() % align != 0 {
        return Err(QueueError::Config { what: "ring area misaligned" });
    }
    if gpa.checked_add(len).is_none() {
        return Err(QueueError::Config { what: "ring area wraps around" });
    }
    Ok(())
}

impl Queue {
    /// A queue over `mem` with the rings `cfg` names, at position zero.
    pub fn new(mem: QueueMemory, cfg: QueueConfig) -> Result<Self, QueueError> {
        let size = u64::from(cfg.size);
        if cfg.size == 0 || cfg.size > MAX_QUEUE_SIZE {
            return Err(QueueError::Config { what: "queue size must be 1..=32768" });
        }
        let (layout, kind) = match cfg.addrs {
            RingAddrs::Split { desc, avail, used } => {
                if !cfg.size.is_power_of_two() {
                    return Err(QueueError::Config { what: "split queue size must be a power of two" });
                }
                let lens = [16 * size, 6 + 2 * size, 6 + 8 * size];
                check_area(desc, lens[0], 16)?;
                check_area(avail, lens[1], 2)?;
                check_area(used, lens[2], 4)?;
                (Layout { gpa: [desc, avail, used], len: lens }, Kind::Split { avail_shadow: 0, used_known: false })
            }
            RingAddrs::Packed { desc, driver, device } => {
                let lens = [16 * size, 4, 4];
                check_area(desc, lens[0], 16)?;
                check_area(driver, 4, 4)?;
                check_area(device, 4, 4)?;
                (Layout { gpa: [desc, driver, device], len: lens }, Kind::Packed { first_used_flags: None })
            }
        };
        let state = QueueState { avail_wrap: true, used_wrap: true, ..QueueState::default() };
        Ok(Self {
            mem,
            cfg,
            layout,
            state,
            kind,
            segs: Segments::default(),
            broken: None,
            signalled: 0,
            inflight: None,
            packed_inflight: None,
            inflight_features: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Whether this is a packed queue.
    pub fn is_packed(&self) -> bool {
        matches!(self.kind, Kind::Packed { .. })
    }

    /// The device's position.
    pub fn state(&self) -> QueueState {
        self.state
    }

    /// Restores a position (SET_VRING_BASE, or after migration). A split queue reads its used
    /// index back from the used ring at its next batch; a packed queue's slots must be below the
    /// queue size (the cached loops write the used descriptor at `next_used` directly).
    pub fn set_state(&mut self, state: QueueState) -> Result<(), QueueError> {
        if matches!(self.kind, Kind::Packed { .. })
            && (state.next_avail >= self.cfg.size || state.next_used >= self.cfg.size)
        {
            return Err(QueueError::Config { what: "packed ring position beyond the queue size" });
        }
        self.state = state;
        match &mut self.kind {
            Kind::Split { avail_shadow, used_known } => {
                *avail_shadow = state.next_avail;
                *used_known = false;
            }
            Kind::Packed { first_used_flags } => *first_used_flags = None,
        }
        self.signalled = self.state.next_used;
        Ok(())
    }

    /// GET_VRING_BASE's value: for a split queue the next available index; for a packed queue
    /// bits 0-14 the next available slot, bit 15 its wrap counter, bits 16-30 the next used slot,
    /// bit 31 its wrap counter.
    pub fn vring_base(&self) -> u32 {
        let s = self.state;
        match self.kind {
            Kind::Split { .. } => u32::from(s.next_avail),
            Kind::Packed { .. } => {
                let a = u32::from(s.next_avail & 0x7fff) | (u32::from(s.avail_wrap) << 15);
                let u = u32::from(s.next_used & 0x7fff) | (u32::from(s.used_wrap) << 15);
                a | (u << 16)
            }
        }
    }

    /// SET_VRING_BASE: the inverse of [`Queue::vring_base`].
    pub fn set_vring_base(&mut self, base: u32) -> Result<(), QueueError> {
        let state = match self.kind {
            // A split base is the low 16 bits; the used index comes from the used ring.
            Kind::Split { .. } => QueueState { next_avail: (base & 0xffff) as u16, ..QueueState::default() },
            Kind::Packed { .. } => {
                let a = (base & 0x7fff) as u16;
                let avail_wrap = base & (1 << 15) != 0;
                // A 16-bit base (what QEMU's frontend and rust-vmm's send: its SET_VRING_BASE
                // takes a u16) carries only the available half; then the used position equals
                // it, as DPDK and libvhost-user assume: nothing is in flight across a stop.
                let (u, used_wrap) = if base >> 16 == 0 {
                    (a, avail_wrap)
                } else {
                    (((base >> 16) & 0x7fff) as u16, base & (1 << 31) != 0)
                };
                if a >= self.cfg.size || u >= self.cfg.size {
                    return Err(QueueError::Config { what: "packed vring base beyond the queue size" });
                }
                QueueState { next_avail: a, avail_wrap, next_used: u, used_wrap }
            }
        };
        self.set_state(state)
    }

    /// Tracks the chains in flight in `region` (vhost-user INFLIGHT_SHMFD), a region that
    /// outlives the backend process. On the first batch the queue reconciles it with the used
    /// ring and hands out again, oldest first, every chain a previous backend took and did not
    /// complete; its next available index then follows them. The region's layout is the split
    /// one ([`crate::split_region_size`]) or the packed one ([`crate::packed_region_size`]).
    pub fn set_inflight(&mut self, region: InflightRegion, features: u64) -> Result<(), QueueError> {
        if self.is_packed() {
            self.packed_inflight = Some(Box::new(PackedInflight::new(region, self.cfg.size)?));
        } else {
            self.inflight = Some(Box::new(Inflight::new(region, self.cfg.size)?));
        }
        self.inflight_features = features;
        Ok(())
    }

    /// Chains a restarted backend still has to hand out again (from the inflight region).
    pub fn resubmissions_pending(&self) -> usize {
        self.inflight.as_ref().map_or(0, |i| i.resubmit.len())
            + self.packed_inflight.as_ref().map_or(0, |i| i.resubmit.len())
    }

    /// Moves on every IOTLB change: a queue parked on a miss retries once it has moved since
    /// the value read before the batch that missed.
    pub fn iotlb_generation(&self) -> u64 {
        self.mem.iotlb_generation()
    }

    /// Moves every time this queue sets bits in the dirty log (vhost-user's SET_LOG_FD eventfd
    /// is kicked for it).
    pub fn log_flushes(&self) -> u64 {
        self.mem.log_flushes()
    }

    /// Runs `f` in a memory batch that uses no ring: a queue parked on an IOTLB miss still
    /// completes the I/O it has in flight (whose pins an invalidation may be waiting for).
    pub fn with_memory<R>(&mut self, f: impl FnOnce(&Batch<'_>) -> R) -> R {
        let mb = self.mem.batch(&[]);
        f(&mb)
    }

    /// Why the queue broke, if it did.
    pub fn broken(&self) -> Option<&QueueError> {
        self.broken.as_deref()
    }

    /// The control side's handle on this queue's memory (to quiesce it).
    pub fn memory_handle(&self) -> QueueHandle {
        self.mem.handle()
    }

    /// Forces the translating path (tests and measurements of the fallback).
    pub fn set_force_translating(&mut self, on: bool) {
        self.mem.set_force_translating(on);
    }

    fn ranges(&self) -> [(GuestPhysAddr, u64); 3] {
        [0, 1, 2].map(|i| (self.layout.gpa[i], self.layout.len[i]))
    }

    /// Runs one batch of work on the queue: `f` pops chains and adds used elements through the
    /// [`QueueBatch`]; when it returns, the used index is published (dirty log flushed first)
    /// and the result says whether the driver must be notified.
    #[inline(never)]
    pub fn process<R>(&mut self, f: impl FnOnce(&mut QueueBatch<'_, '_>) -> R) -> Result<(R, bool), QueueError> {
        if let Some(e) = &self.broken {
            return Err(QueueError::Broken(e.clone()));
        }
        let ranges = self.ranges();
        let layout = self.layout;
        let align = if self.is_packed() { [16, 4, 4] } else { [16, 2, 4] };
        let perms = if self.is_packed() { RING_PERMS_PACKED } else { RING_PERMS_SPLIT };
        let mb = self.mem.batch_for(&ranges, &perms);
        let direct = mb.cached().and_then(|c| Direct::new([c[0], c[1], c[2]], layout, align));
        if direct.is_none() && mb.iotlb_enabled() {
            // Behind an IOTLB, a ring the translating path would find missing halfway through a
            // batch is found missing here, before anything is consumed (the batch's IOTLB
            // generation is pinned, so what is checked stays).
            for (i, &(gpa, len)) in ranges.iter().enumerate() {
                if let Err(e) = mb.check_access(gpa, len, perms[i]) {
                    let e = QueueError::mem(gpa, len, e);
                    if e.is_iotlb_miss() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "virtqueue broken: its rings are not accessible");
                    let e = Arc::new(e);
                    self.broken = Some(e.clone());
                    return Err(QueueError::Broken(e));
                }
            }
        }
        let access = match direct {
            Some(d) => Access::Direct(d),
            None => Access::Translated(Translated { batch: &mb, layout }),
        };
        let mut qb = QueueBatch {
            mem: &mb,
            access,
            cfg: &self.cfg,
            layout,
            state: &mut self.state,
            kind: &mut self.kind,
            segs: &mut self.segs,
            broken: &mut self.broken,
            signalled: &mut self.signalled,
            used_added: 0,
            batch_used_start: 0,
            logging: mb.logging(),
            inflight: self.inflight.as_deref_mut(),
            packed_inflight: self.packed_inflight.as_deref_mut(),
        };
        if qb.inflight.as_ref().is_some_and(|i| !i.recovered) {
            qb.recover_inflight(self.inflight_features)?;
        }
        if qb.packed_inflight.as_ref().is_some_and(|i| !i.recovered) {
            qb.recover_packed_inflight(self.inflight_features)?;
        }
        let r = f(&mut qb);
        let notify = qb.finish()?;
        Ok((r, notify))
    }
}

/// The access the device needs to each ring area: split (descriptor table, available ring,
/// used ring) and packed (descriptor ring, driver area, device area).
/// The split used ring is read too (its index, after SET_VRING_BASE), as the kernel's vhost does.
const RING_PERMS_SPLIT: [Perm; MAX_CACHED] = [Perm::READ, Perm::READ, Perm::RW, Perm::NONE];
const RING_PERMS_PACKED: [Perm; MAX_CACHED] = [Perm::RW, Perm::READ, Perm::WRITE, Perm::NONE];

enum Access<'b, 'q> {
    Direct(Direct<'b>),
    Translated(Translated<'b, 'q>),
}

/// One batch of work on a queue (see [`Queue::process`]).
pub struct QueueBatch<'b, 'q> {
    mem: &'b Batch<'q>,
    access: Access<'b, 'q>,
    cfg: &'b QueueConfig,
    layout: Layout,
    state: &'b mut QueueState,
    kind: &'b mut Kind,
    segs: &'b mut Segments,
    broken: &'b mut Option<Arc<QueueError>>,
    signalled: &'b mut u16,
    used_added: u16,
    batch_used_start: u16,
    /// Whether this batch logs (read once: logging cannot change under a running batch).
    logging: bool,
    inflight: Option<&'b mut Inflight>,
    packed_inflight: Option<&'b mut PackedInflight>,
}

macro_rules! with_access {
    ($self:ident, $r:ident => $body:expr) => {
        match &$self.access {
            Access::Direct(d) => {
                let $r = d;
                $body
            }
            Access::Translated(t) => {
                let $r = t;
                $body
            }
        }
    };
}

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
    fn fail(&mut self, e: QueueError) -> QueueError {
        if matches!(e, QueueError::Broken(_)) || e.is_iotlb_miss() {
            return e;
        }
        tracing::warn!(error = %e, "virtqueue broken by the driver");
        let e = Arc::new(e);
        *self.broken = Some(e.clone());
        QueueError::Broken(e)
    }

    #[cold]
    fn recover_inflight(&mut self, features: u64) -> Result<(), QueueError> {
        self.ensure_used_known().map_err(|e| self.fail(e))?;
        let used = self.state.next_used;
        let Some(inf) = self.inflight.as_mut() else { return Ok(()) };
        let count = inf.recover(used, features).map_err(|e| self.fail(e))?;
        if count > 0 {
            tracing::info!(resubmit = count, used, "inflight chains from a previous backend will be resubmitted");
            // Every chain before these in the ring is complete: the next new one follows them.
            self.state.next_avail = used.wrapping_add(count);
            if let Kind::Split { avail_shadow, .. } = self.kind {
                *avail_shadow = self.state.next_avail;
            }
        }
        Ok(())
    }

    #[cold]
    fn recover_packed_inflight(&mut self, features: u64) -> Result<(), QueueError> {
        let (used, used_wrap) = (self.state.next_used, self.state.used_wrap);
        let Some(inf) = self.packed_inflight.as_deref_mut() else { return Ok(()) };
        let access = &self.access;
        let flags_at = |slot: u16| {
            let off = 16 * usize::from(slot) + 14;
            let f = match access {
                Access::Direct(d) => d.read::<u16>(Area::Desc, off),
                Access::Translated(t) => t.read::<u16>(Area::Desc, off),
            };
            f.map(u16::from_le)
        };
        let resume = inf.recover(features, used, used_wrap, flags_at);
        let resume = resume.map_err(|e| self.fail(e))?;
        if let Some(r) = resume {
            let count = self.packed_inflight.as_ref().map_or(0, |i| i.resubmit.len());
            tracing::info!(
                resubmit = count,
                used = r.used,
                "inflight chains from a previous backend will be resubmitted"
            );
            *self.state = QueueState {
                next_avail: r.next_avail,
                avail_wrap: r.avail_wrap,
                next_used: r.used,
                used_wrap: r.used_wrap,
            };
            *self.signalled = r.used;
        }
        Ok(())
    }

    /// Hands out again a packed chain a previous backend took and did not complete, from the
    /// copies of its descriptors in the inflight region.
    #[cold]
    fn pop_resubmit_packed(&mut self) -> Result<Option<Chain<'_>>, QueueError> {
        let Some(inf) = self.packed_inflight.as_deref() else { return Ok(None) };
        let Some(&head) = inf.resubmit.front() else { return Ok(None) };
        let res = inf.chain_entries(head).and_then(|(entries, id)| {
            let num = u16::try_from(entries.len()).unwrap_or(u16::MAX);
            let (walked_id, count) = walk_packed(self.mem, num, self.segs, |i| inf.copy(entries[usize::from(i)]))?;
            if count != num || walked_id != id {
                return Err(QueueError::Config { what: "inflight copies do not form the recorded chain" });
            }
            Ok((id, num))
        });
        match res {
            Ok((id, num)) => {
                if let Some(i) = self.packed_inflight.as_mut() {
                    i.resubmit.pop_front();
                }
                Ok(Some(Chain::new(id, num, self.segs)))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Records a packed chain just taken from ring slots `head_slot..+count`: its descriptors are
    /// copied into the inflight region while the ring still holds them.
    #[cold]
    fn packed_take(&mut self, head_slot: u16, count: u16) -> Result<(), QueueError> {
        let size = self.cfg.size;
        let mut descs = Vec::with_capacity(usize::from(count));
        let mut slot = head_slot;
        for _ in 0..count {
            descs.push(with_access!(self, r => read_desc(r, slot))?);
            slot = if slot + 1 == size { 0 } else { slot + 1 };
        }
        match self.packed_inflight.as_mut().map(|i| i.take(&descs)) {
            Some(Err(e)) => Err(self.fail(e)),
            _ => Ok(()),
        }
    }

    /// Hands out again a chain a previous backend took and did not complete.
    #[cold]
    fn pop_resubmit(&mut self) -> Result<Option<Chain<'_>>, QueueError> {
        let head = self.inflight.as_ref().and_then(|i| i.resubmit.front().copied());
        let Some(head) = head else { return Ok(None) };
        let res = with_access!(self, r => walk_split(r, self.mem, self.cfg.size, head, self.segs));
        match res {
            Ok(()) => {
                // Taken off the list only now: after an IOTLB miss the same head is tried again.
                if let Some(i) = self.inflight.as_mut() {
                    i.resubmit.pop_front();
                }
                Ok(Some(Chain::new(head, 1, self.segs)))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Records `head` in the inflight area, if there is one: taken (`mark`) or completed
    /// (`link`). A region the frontend corrupted breaks the queue.
    #[cold]
    fn inflight_record(
        &mut self,
        head: u16,
        op: fn(&mut Inflight, u16) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        match self.inflight.as_mut().map(|i| op(i, head)) {
            Some(Err(e)) => Err(self.fail(e)),
            _ => Ok(()),
        }
    }

    /// Pops the next available chain, validated and resolved into host segments; `None` when
    /// the driver has made nothing more available. An error breaks the queue.
    #[inline(always)]
    pub fn pop(&mut self) -> Result<Option<Chain<'_>>, QueueError> {
        if let Some(e) = self.broken.as_ref() {
            return Err(QueueError::Broken(e.clone()));
        }
        if let Some(inf) = self.inflight.as_ref() {
            if !inf.resubmit.is_empty() {
                return self.pop_resubmit();
            }
        }
        // On the cached path, a known-available entry goes through the cached walker first. Any
        // doubt takes the general walker, which starts over and does every check; nothing but the
        // segment list (and the batch's pins and window) is changed unless this succeeds.
        if let (Kind::Split { avail_shadow, .. }, Access::Direct(d)) = (&*self.kind, &self.access) {
            if self.state.next_avail != *avail_shadow {
                if let Some(id) = split_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs) {
                    if self.inflight.is_some() {
                        self.inflight_record(id, Inflight::mark)?;
                    }
                    return Ok(Some(Chain::new(id, 1, self.segs)));
                }
            }
        }
        if self.packed_inflight.as_ref().is_some_and(|i| !i.resubmit.is_empty()) {
            return self.pop_resubmit_packed();
        }
        let head_slot = self.state.next_avail;
        if let (Kind::Packed { .. }, Access::Direct(d)) = (&*self.kind, &self.access) {
            if let Some((id, count)) = packed_cached_pop(d, self.mem, self.cfg.size, self.state, self.segs) {
                if self.packed_inflight.is_some() {
                    self.packed_take(head_slot, count)?;
                }
                return Ok(Some(Chain::new(id, count, self.segs)));
            }
        }
        let res = match self.kind {
            Kind::Split { .. } => {
                with_access!(self, r => pop_split(r, self.mem, self.cfg.size, self.state, self.kind, self.segs))
            }
            Kind::Packed { .. } => {
                with_access!(self, r => pop_packed(r, self.mem, self.cfg.size, self.state, self.segs))
            }
        };
        match res {
            Ok(Some((id, ring_descs))) => {
                if self.inflight.is_some() {
                    self.inflight_record(id, Inflight::mark)?;
                }
                if self.packed_inflight.is_some() {
                    self.packed_take(head_slot, ring_descs)?;
                }
                Ok(Some(Chain::new(id, ring_descs, self.segs)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Pops up to `out.len()` available chains into `out` while each is one descriptor (no
    /// NEXT, no INDIRECT, non-zero length) whose buffer lies in one region, and returns how
    /// many. Every check `pop` makes is made; a loop of two compares per buffer replaces its
    /// general walk. It stops at the first chain of any other shape, or any doubt, leaving it
    /// for [`QueueBatch::pop`]; on a packed ring, on the translating path, with inflight
    /// tracking or with chains to resubmit it pops nothing (use `pop`).
    #[inline]
    pub fn pop_singles(&mut self, out: &mut [Single<'b>]) -> usize {
        let mut i = 0;
        self.pop_singles_with(out.len(), |s| {
            out[i] = s;
            i += 1;
        })
    }

    /// [`QueueBatch::pop_singles`] handing each chain to `f` instead of an array (no array to
    /// fill first).
    // Counts below the queue size (at most 32768) are taken as u16, lengths of one
    // descriptor (u32) as u32.
    #[allow(clippy::cast_possible_truncation)]
    #[inline]
    pub fn pop_singles_with(&mut self, max: usize, mut f: impl FnMut(Single<'b>)) -> usize {
        let Some((next, n)) = self.singles_available(max) else { return 0 };
        let Access::Direct(d) = &self.access else { return 0 };
        let bases = Bases::of(d);
        let mut window = self.mem.window();
        let mut i = 0;
        while i < n {
            let Some(s) = single_at(bases, self.mem, self.cfg.size, next, i, &mut window) else { break };
            f(s);
            i += 1;
        }
        // i <= size fits u16.
        self.state.next_avail = next.wrapping_add(i as u16);
        i
    }

    /// Pops single-descriptor chains as [`QueueBatch::pop_singles`] does and completes each at
    /// once: `f` does the device's work on the buffer and returns how many bytes it wrote, which
    /// are logged (when logging is on) and become the used length. One loop from the available
    /// ring to the used ring, for devices that finish such chains synchronously (a null disk, a
    /// receive queue fed by a copy). Returns how many were completed. A write the dirty log
    /// cannot record breaks the queue (that chain is taken and not completed; the next call on
    /// the batch reports the queue broken), as on every other path.
    // Counts below the queue size (at most 32768) are taken as u16, lengths of one
    // descriptor (u32) as u32.
    #[allow(clippy::cast_possible_truncation)]
    #[inline]
    pub fn complete_singles(&mut self, max: usize, mut f: impl FnMut(Single<'b>) -> u32) -> usize {
        let Some((next, n)) = self.singles_available(max) else { return 0 };
        if self.used_added == 0 {
            if self.ensure_used_known().is_err() {
                return 0;
            }
            self.batch_used_start = self.state.next_used;
        }
        let Access::Direct(d) = &self.access else { return 0 };
        let (mem, size) = (self.mem, self.cfg.size);
        let rings = SinglesRings { avail: d.base(Area::Driver), desc: d.base(Area::Desc), used: d.base(Area::Device) };
        let start = self.state.next_used;
        // Two copies of the loop: the one without logging has no logging test in it.
        let (i, log_error) = if self.logging {
            // SAFETY: `rings` are the views of a cached split ring of `size` entries (Direct::new
            // checked their lengths and alignment); n <= size entries are available.
            unsafe { complete_singles_loop::<true, _>(rings, mem, size, next, start, n, &mut f) }
        } else {
            // SAFETY: as above.
            unsafe { complete_singles_loop::<false, _>(rings, mem, size, next, start, n, &mut f) }
        };
        // i <= size fits u16.
        let k = i as u16;
        // A chain whose write could not be logged was taken and not completed.
        self.state.next_avail = next.wrapping_add(k + u16::from(log_error.is_some()));
        self.state.next_used = start.wrapping_add(k);
        self.used_added = self.used_added.wrapping_add(k);
        if self.logging {
            for j in 0..k {
                self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & (size - 1)), 8);
            }
        }
        if let Some(e) = log_error {
            self.fail(e);
        }
        i
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
        let mut done = 0;
        while done < max {
            done += match (&*self.kind, &self.access) {
                (Kind::Split { .. }, Access::Direct(_)) => self.split_each(max - done, &mut f)?,
                (Kind::Packed { .. }, Access::Direct(_)) => self.packed_each(max - done, &mut f)?,
                _ => 0,
            };
            if done == max {
                break;
            }
            // What the loop above left: a chain it doubted, or a queue it does not serve.
            let Some(chain) = self.pop()? else { break };
            let token = chain.token();
            let finished = f(&chain);
            let logged = finished.map_or(Ok(()), |written| chain.log_written(mem, written));
            done += 1;
            if let Err(e) = logged {
                // As in the loops above: not completed, and the queue breaks.
                return Err(self.fail(e));
            }
            if let Some(written) = finished {
                self.add_used(token, written)?;
            }
        }
        Ok(done)
    }

    /// `pop_each`'s loop on a cached split ring. Stops at the first chain the cached walker
    /// doubts, leaving it available.
    // Counts below the queue size (at most 32768) are taken as u16.
    #[allow(clippy::cast_possible_truncation)]
    #[inline(always)]
    fn split_each(&mut self, max: usize, f: &mut impl FnMut(&Chain<'_>) -> Option<u32>) -> Result<usize, QueueError> {
        let Some((next, n)) = self.singles_available(max) else { return Ok(0) };
        if self.used_added == 0 {
            self.ensure_used_known().map_err(|e| self.fail(e))?;
            self.batch_used_start = self.state.next_used;
        }
        let Access::Direct(d) = &self.access else { return Ok(0) };
        let (mem, size) = (self.mem, self.cfg.size);
        let rings = SinglesRings { avail: d.base(Area::Driver), desc: d.base(Area::Desc), used: d.base(Area::Device) };
        let start = self.state.next_used;
        let segs = &mut *self.segs;
        let (popped, completed, log_error) = if self.logging {
            // SAFETY: `rings` are the views of a cached split ring of `size` entries (Direct::new
            // checked their lengths and alignment); n <= size entries are available.
            unsafe { split_each_loop::<true, _>(rings, mem, size, next, start, n, segs, f) }
        } else {
            // SAFETY: as above.
            unsafe { split_each_loop::<false, _>(rings, mem, size, next, start, n, segs, f) }
        };
        // Both counts are at most n <= size, which fits u16.
        self.state.next_avail = next.wrapping_add(popped as u16);
        self.state.next_used = start.wrapping_add(completed);
        self.used_added = self.used_added.wrapping_add(completed);
        if self.logging {
            for j in 0..completed {
                self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & (size - 1)), 8);
            }
        }
        match log_error {
            Some(e) => Err(self.fail(e)),
            None => Ok(popped),
        }
    }

    /// `pop_each`'s loop on a cached packed ring (not while logging, nor with inflight
    /// tracking: those take `pop` and `add_used`). Stops at the first chain the cached walker
    /// doubts, leaving it available.
    #[inline(always)]
    fn packed_each(&mut self, max: usize, f: &mut impl FnMut(&Chain<'_>) -> Option<u32>) -> Result<usize, QueueError> {
        if self.broken.is_some() || self.packed_inflight.is_some() || self.logging {
            return Ok(0);
        }
        let (Kind::Packed { first_used_flags }, Access::Direct(d)) = (&mut *self.kind, &self.access) else {
            return Ok(0);
        };
        let (mem, size) = (self.mem, self.cfg.size);
        let ring = d.base(Area::Desc);
        let segs = &mut *self.segs;
        let mut win = cached::Windowed::new(mem);
        if self.used_added == 0 {
            self.batch_used_start = self.state.next_used;
        }
        // The positions in locals for the loop, written back after it; with the wrap counters,
        // the flag bits they stand for: a head is available when its AVAIL/USED bits are
        // `avail_bits` (AVAIL = wrap, USED = !wrap), a used descriptor gets `used_bits`.
        let QueueState { mut next_avail, mut next_used, mut avail_wrap, mut used_wrap } = *self.state;
        const BOTH: u16 = DESC_F_AVAIL | DESC_F_USED;
        let mut avail_bits = if avail_wrap { DESC_F_AVAIL } else { DESC_F_USED };
        let mut used_bits = if used_wrap { BOTH } else { 0 };
        let mut first = *first_used_flags;
        let mut popped = 0usize;
        let mut completed = 0u16;
        // Both positions are below the size (`set_state`, `advance`); checked again here, where
        // the used descriptor is written through a raw pointer.
        while popped < max && next_avail < size && next_used < size {
            // SAFETY: next_avail < size and the ring's view holds 16 * size bytes from a 16-aligned
            // base, mapped for the batch: the head's flags (offset 14) are inside it, aligned; an
            // atomic reference for one load, as in `Direct::load_u16`.
            let flags = u16::from_le(
                unsafe { std::sync::atomic::AtomicU16::from_ptr(ring.add(16 * usize::from(next_avail) + 14).cast()) }
                    // Acquire: as in `packed_available`.
                    .load(Ordering::Acquire),
            );
            if flags & BOTH != avail_bits {
                break;
            }
            // SAFETY: as above; the head (next_avail) is below the size.
            let Some((id, count)) = (unsafe { cached::packed_chain(ring, size, next_avail, segs, &mut win) }) else {
                break;
            };
            // count <= size (the walker's limit), so the sums stay below 2 * size <= 65536.
            next_avail += count;
            if next_avail >= size {
                next_avail -= size;
                avail_wrap = !avail_wrap;
                avail_bits ^= BOTH;
            }
            popped += 1;
            let chain = Chain::new(id, count, segs);
            let Some(written) = f(&chain) else { continue };
            // SAFETY: next_used < size (the loop's condition; kept so below) and the ring's view
            // holds 16 * size bytes from a 16-aligned base: the descriptor's length (offset 8),
            // id (12) and flags (14) are inside it, aligned.
            unsafe {
                let p = ring.add(16 * usize::from(next_used));
                p.add(8).cast::<u32>().write_volatile(written.to_le());
                p.add(12).cast::<u16>().write_volatile(id.to_le());
                if first.is_none() {
                    // The first used descriptor of a batch is made visible last (2.8.21.2).
                    first = Some((next_used, used_bits));
                } else {
                    p.add(14).cast::<u16>().write_volatile(used_bits.to_le());
                }
            }
            next_used += count;
            if next_used >= size {
                next_used -= size;
                used_wrap = !used_wrap;
                used_bits ^= BOTH;
            }
            completed += 1;
        }
        *self.state = QueueState { next_avail, next_used, avail_wrap, used_wrap };
        *first_used_flags = first;
        self.used_added = self.used_added.wrapping_add(completed);
        Ok(popped)
    }

    /// For the batch pops: the next available index and how many entries (at most `max`) the
    /// driver has made available, when the queue is of the shape they serve (split, cached
    /// rings, not broken, no inflight record).
    #[inline(always)]
    fn singles_available(&mut self, max: usize) -> Option<(u16, usize)> {
        let (Kind::Split { avail_shadow, .. }, Access::Direct(d)) = (&mut *self.kind, &self.access) else {
            return None;
        };
        if self.broken.is_some() || self.inflight.is_some() {
            return None;
        }
        let next = self.state.next_avail;
        if next == *avail_shadow {
            // Acquire: as in `pop_split`.
            let idx = u16::from_le(d.load_u16(Area::Driver, 2, Ordering::Acquire).ok()?);
            let pending = idx.wrapping_sub(next);
            if pending == 0 || pending > self.cfg.size {
                // Nothing, or a jump `pop` reports and breaks the queue for.
                return None;
            }
            *avail_shadow = idx;
        }
        Some((next, usize::from(avail_shadow.wrapping_sub(next)).min(max)))
    }

    /// [`QueueBatch::add_used`] for many chains: used elements for `done` (token, bytes written)
    /// in order. On the cached split path a loop of two stores each; anything else goes through
    /// `add_used`.
    pub fn add_used_many(&mut self, done: impl IntoIterator<Item = (UsedToken, u32)>) -> Result<(), QueueError> {
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
        if self.logging {
            for j in 0..k {
                self.log_ring(Area::Device, 4 + 8 * usize::from(start.wrapping_add(j) & mask), 8);
            }
        }
        self.state.next_used = start.wrapping_add(k);
        self.used_added = self.used_added.wrapping_add(k);
        Ok(())
    }

    #[inline]
    fn ensure_used_known(&mut self) -> Result<(), QueueError> {
        if let Kind::Split { used_known, .. } = self.kind {
            if !*used_known {
                // After SET_VRING_BASE the used index is whatever the used ring says.
                let idx = with_access!(self, r => r.load_u16(Area::Driver.min_used(), 2, Ordering::Acquire))?;
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
                self.log_ring(Area::Device, off, 8);
                if self.inflight.is_some() {
                    self.inflight_record(token.id, Inflight::link)?;
                }
                self.state.next_used = self.state.next_used.wrapping_add(1);
                self.used_added = self.used_added.wrapping_add(1);
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
                .map(|()| {
                    self.log_ring(Area::Device, off, 8);
                    self.state.next_used = self.state.next_used.wrapping_add(1);
                })
            }
            Kind::Packed { first_used_flags } => {
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
                write.map(|()| {
                    self.log_ring(Area::Desc, off + 8, 8);
                    let (next, wrapped) = advance(slot, token.ring_descs.clamp(1, size), size);
                    self.state.next_used = next;
                    self.state.used_wrap ^= wrapped;
                })
            }
        };
        res.map_err(|e| self.fail(e))?;
        if self.inflight.is_some() {
            self.inflight_record(token.id, Inflight::link)?;
        }
        if let Some(Err(e)) = self.packed_inflight.as_mut().map(|i| i.complete(token.id)) {
            return Err(self.fail(e));
        }
        self.used_added = self.used_added.wrapping_add(1);
        Ok(())
    }

    #[inline]
    fn log_ring(&self, area: Area, off: usize, len: u64) {
        if self.logging {
            self.log_ring_slow(area, off, len);
        }
    }

    #[cold]
    fn log_ring_slow(&self, area: Area, off: usize, len: u64) {
        let res = match (area, self.cfg.ring_log_addr) {
            // vhost-user's log_guest_addr: a guest physical address.
            (Area::Device | Area::Desc, Some(log)) => {
                let gpa = GuestPhysAddr::new(log.raw().wrapping_add(off as u64));
                self.mem.log_write(gpa, len).map(|()| gpa)
            }
            // The ring's own address: an IOVA behind an IOTLB.
            _ => {
                let gpa = GuestPhysAddr::new(self.layout.gpa[area as usize].raw().wrapping_add(off as u64));
                self.mem.log_write_addr(gpa, len).map(|()| gpa)
            }
        };
        if let Err(e) = res {
            let gpa = self.layout.gpa[area as usize];
            tracing::warn!(error = %e, %gpa, "ring write not logged");
        }
    }

    /// Asks the driver to notify (kick) on new buffers, and says whether buffers arrived
    /// meanwhile (then the caller should process again rather than sleep).
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let size = self.cfg.size;
        let res = match self.kind {
            Kind::Split { .. } => with_access!(self, r => {
                if self.cfg.event_idx {
                    r.write::<u16>(Area::Device, 4 + 8 * usize::from(size), self.state.next_avail.to_le())?;
                    self.log_ring(Area::Device, 4 + 8 * usize::from(size), 2);
                } else {
                    r.store_u16(Area::Device, 0, 0, Ordering::Relaxed)?;
                    self.log_ring(Area::Device, 0, 2);
                }
                // Pairs with the driver's barrier between writing the available index and
                // reading the used ring's flags / avail_event (2.7.13): one of us sees the other.
                fence(Ordering::SeqCst);
                let idx = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
                Ok(idx != self.state.next_avail)
            }),
            Kind::Packed { .. } => with_access!(self, r => {
                if self.cfg.event_idx {
                    let off_wrap = self.state.next_avail | (u16::from(self.state.avail_wrap) << 15);
                    r.write::<u16>(Area::Device, 0, off_wrap.to_le())?;
                    r.store_u16(Area::Device, 2, EVENT_DESC.to_le(), Ordering::Release)?;
                } else {
                    r.store_u16(Area::Device, 2, EVENT_ENABLE.to_le(), Ordering::Release)?;
                }
                // Pairs with the driver's barrier between making a descriptor available and
                // reading the device event suppression area (2.8.21).
                fence(Ordering::SeqCst);
                packed_available(r, size, self.state).map(|d| d.is_some())
            }),
        };
        res.map_err(|e| self.fail(e))
    }

    /// Asks the driver not to notify (the device polls).
    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        let res = match self.kind {
            Kind::Split { .. } if self.cfg.event_idx => Ok(()),
            Kind::Split { .. } => {
                with_access!(self, r => r.store_u16(Area::Device, 0, SPLIT_F_NO_NOTIFY.to_le(), Ordering::Relaxed))
            }
            Kind::Packed { .. } => {
                with_access!(self, r => r.store_u16(Area::Device, 2, EVENT_DISABLE.to_le(), Ordering::Relaxed))
            }
        };
        res.map_err(|e| self.fail(e))
    }

    fn finish(mut self) -> Result<bool, QueueError> {
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
        // Buffer and used-element bits go into the log before the index that exposes them.
        self.mem.flush_log().map_err(|e| QueueError::mem(self.layout.gpa[2], 0, e))?;
        let size = self.cfg.size;
        let res = match self.kind {
            Kind::Split { .. } => with_access!(self, r => {
                // Release: pairs with the driver's read barrier after it reads the used index
                // (2.7.14): the used elements written above are visible first.
                r.store_u16(Area::Device, 2, self.state.next_used.to_le(), Ordering::Release)?;
                self.log_ring(Area::Device, 2, 2);
                if let Some(inf) = self.inflight.as_mut() {
                    inf.published(self.state.next_used, self.used_added)?;
                }
                fence(Ordering::SeqCst);
                let (old, new) = (self.batch_used_start, self.state.next_used);
                if self.cfg.event_idx {
                    let event = u16::from_le(r.read::<u16>(Area::Driver, 4 + 2 * usize::from(size))?);
                    Ok(vring_need_event(event, new, old))
                } else {
                    let flags = u16::from_le(r.load_u16(Area::Driver, 0, Ordering::Relaxed)?);
                    Ok(flags & SPLIT_F_NO_INTERRUPT == 0)
                }
            }),
            Kind::Packed { ref mut first_used_flags } => {
                let first = first_used_flags.take();
                if let Some(inf) = self.packed_inflight.as_mut() {
                    inf.publishing(self.state.next_used, self.state.used_wrap)?;
                }
                with_access!(self, r => {
                    if let Some((slot, flags)) = first {
                        // Release: the used descriptors written in this batch become visible
                        // before the first one's flags make them available to the driver.
                        r.store_u16(Area::Desc, 16 * usize::from(slot) + 14, flags.to_le(), Ordering::Release)?;
                    }
                    if let Some(inf) = self.packed_inflight.as_mut() {
                        inf.published(self.state.next_used, self.state.used_wrap)?;
                    }
                    fence(Ordering::SeqCst);
                    let flags = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
                    match flags {
                        EVENT_DISABLE => Ok(false),
                        EVENT_DESC if self.cfg.event_idx => {
                            let off_wrap = u16::from_le(r.read::<u16>(Area::Driver, 0)?);
                            Ok(packed_need_event(off_wrap, size, *self.signalled, self.state.next_used, self.state.used_wrap))
                        }
                        _ => Ok(true),
                    }
                })
            }
        };
        let notify = res.map_err(|e| self.fail(e))?;
        if matches!(self.kind, Kind::Packed { .. }) {
            let off = 16 * usize::from(self.batch_used_start) + 14;
            self.log_ring(Area::Desc, off, 2);
        }
        self.mem.flush_log().map_err(|e| QueueError::mem(self.layout.gpa[2], 0, e))?;
        *self.signalled = self.state.next_used;
        self.used_added = 0;
        Ok(notify)
    }
}

impl Area {
    /// The split used ring is the device area.
    const fn min_used(self) -> Area {
        Area::Device
    }
}

/// Whether moving the used position from `old` to `new` (slots, as QEMU keeps them) passed the
/// driver's event offset `off_wrap` (2.8.10): an offset from the other lap counts one ring size
/// back. Slots that wrapped in the batch make the distance look huge, which errs on the side of
/// notifying.
fn packed_need_event(off_wrap: u16, size: u16, old: u16, new: u16, used_wrap: bool) -> bool {
    let mut off = off_wrap & 0x7fff;
    if (off_wrap & 0x8000 != 0) != used_wrap {
        off = off.wrapping_sub(size);
    }
    vring_need_event(off, new, old)
}

/// A descriptor from its two little-endian 64-bit words (two single loads: a volatile read of
/// the 16-byte struct itself compiles to byte-sized pieces).
#[inline(always)]
fn desc_from_words(lo: u64, hi: u64) -> Descriptor {
    let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
    // `hi` holds len (bits 0-31), then two 16-bit fields; the truncations take those fields.
    #[allow(clippy::cast_possible_truncation)]
    Descriptor { addr: lo, len: hi as u32, flags_or_id: (hi >> 32) as u16, next_or_flags: (hi >> 48) as u16 }
}

#[inline(always)]
fn read_desc<R: RingAccess>(r: &R, index: u16) -> Result<Descriptor, QueueError> {
    let off = 16 * usize::from(index);
    Ok(desc_from_words(r.read::<u64>(Area::Desc, off)?, r.read::<u64>(Area::Desc, off + 8)?))
}

/// An indirect table: translated once when it lies in one region (the usual case), entry by
/// entry otherwise. Tables live in buffer memory, not in the cached rings.
struct Table<'m, 'q> {
    mem: &'m Batch<'q>,
    addr: u64,
    whole: Option<vireo_memory::GuestSlice<'m>>,
}

impl<'m, 'q> Table<'m, 'q> {
    fn new(mem: &'m Batch<'q>, addr: u64, len: u32) -> Self {
        Self { mem, addr, whole: mem.translate(GuestPhysAddr::new(addr), u64::from(len), Perm::READ).ok() }
    }

    #[inline(always)]
    fn entry(&self, i: u32) -> Result<Descriptor, QueueError> {
        // i < 32768 (indirect_entries), so the offset cannot overflow.
        let off = 16 * i as usize;
        if let Some(t) = &self.whole {
            if let (Some(lo), Some(hi)) = (t.get::<u64>(off), t.get::<u64>(off + 8)) {
                return Ok(desc_from_words(lo, hi));
            }
        }
        self.entry_slow(i)
    }

    /// A table that spans regions: each entry translated on its own.
    #[cold]
    fn entry_slow(&self, i: u32) -> Result<Descriptor, QueueError> {
        let gpa = GuestPhysAddr::new(self.addr.wrapping_add(16 * u64::from(i)));
        let s = self.mem.translate(gpa, 16, Perm::READ).map_err(|e| QueueError::mem(gpa, 16, e))?;
        let lo = s.read::<u64>(0).map_err(|e| QueueError::mem(gpa, 16, e))?;
        let hi = s.read::<u64>(8).map_err(|e| QueueError::mem(gpa, 16, e))?;
        Ok(desc_from_words(lo, hi))
    }
}

fn indirect_entries(head: u16, d: &Descriptor) -> Result<u32, QueueError> {
    if d.len == 0 || d.len % 16 != 0 {
        return Err(QueueError::Indirect { head, what: "table length is not a non-zero multiple of 16" });
    }
    let n = d.len / 16;
    if n > MAX_INDIRECT {
        return Err(QueueError::Indirect { head, what: "table longer than 32768 entries" });
    }
    if d.addr.checked_add(u64::from(d.len)).is_none() {
        return Err(QueueError::Indirect { head, what: "table wraps around" });
    }
    Ok(n)
}

/// The ring bases a batch pop reads through, taken from `Direct` once per pop rather than once
/// per chain (after a volatile store the compiler must assume the `Direct` itself changed).
#[derive(Clone, Copy)]
struct Bases {
    avail: *mut u8,
    desc: *mut u8,
}

impl Bases {
    #[inline(always)]
    fn of(d: &Direct<'_>) -> Self {
        Self { avail: d.base(Area::Driver), desc: d.base(Area::Desc) }
    }
}

/// The base pointers of a cached split ring, for `complete_singles_loop`.
#[derive(Clone, Copy)]
struct SinglesRings {
    avail: *mut u8,
    desc: *mut u8,
    used: *mut u8,
}

/// `QueueBatch::complete_singles`'s loop: from available entry `next` and used entry `start`,
/// at most `n` single-buffer chains; returns how many were completed, and the error of a write
/// that could not be logged (that chain was taken and is not completed). The ring is walked in
/// runs that do not wrap, so that within a run the available and used entries are two pointers
/// that advance (no index arithmetic per chain); `LOGGING` compiles the logging in or out.
///
/// # Safety
/// `rings` are the bases of a split ring of `size` entries (a power of two) mapped for the batch
/// `mem`: an available ring of 6 + 2 * size bytes (2-aligned), a descriptor table of 16 * size
/// (16-aligned), a used ring of 6 + 8 * size (4-aligned); `n <= size`.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // counts below size <= 32768
unsafe fn complete_singles_loop<'b, const LOGGING: bool, F: FnMut(Single<'b>) -> u32>(
    rings: SinglesRings,
    mem: &'b Batch<'_>,
    size: u16,
    next: u16,
    start: u16,
    n: usize,
    f: &mut F,
) -> (usize, Option<QueueError>) {
    let mask = size - 1;
    let mut window = mem.window();
    let mut i = 0usize;
    'runs: while i < n {
        let a = usize::from(next.wrapping_add(i as u16) & mask);
        let u = usize::from(start.wrapping_add(i as u16) & mask);
        let run = (n - i).min(usize::from(size) - a).min(usize::from(size) - u);
        // SAFETY: a + run <= size and u + run <= size: every entry of the run lies inside the
        // available ring (from offset 4, 2 bytes each) and the used ring (from offset 4, 8 bytes
        // each), aligned as their bases are.
        let (mut pa, mut pu) =
            unsafe { (rings.avail.add(4 + 2 * a).cast::<u16>(), rings.used.add(4 + 8 * u).cast::<u32>()) };
        for _ in 0..run {
            // SAFETY: inside the run (above); any bytes the guest left are a u16.
            let head = u16::from_le(unsafe { pa.read_volatile() });
            if head >= size {
                break 'runs;
            }
            // SAFETY: head < size: both words of entry `head` are inside the 16-aligned table.
            let (lo, hi) = unsafe {
                let p = rings.desc.add(16 * usize::from(head)).cast::<u64>();
                (p.read_volatile(), p.add(1).read_volatile())
            };
            // Little endian to native here, once.
            let desc = desc_from_words(lo, hi);
            if desc.flags_or_id & (DESC_F_NEXT | DESC_F_INDIRECT) != 0 || desc.len == 0 {
                break 'runs;
            }
            let writable = desc.flags_or_id & DESC_F_WRITE != 0;
            let addr = GuestPhysAddr::new(desc.addr);
            let piece = match window.translate_for(addr, desc.len, writable) {
                Some(p) => p,
                None => match singles_miss(mem, addr, desc.len, writable) {
                    Some((p, w)) => {
                        window = w;
                        p
                    }
                    None => break 'runs,
                },
            };
            let written =
                f(Single { id: head, writable, buf: piece.slice, phys: piece.phys, slot: piece.slot }).min(desc.len);
            if LOGGING && writable && written > 0 {
                if let Err(e) = mem.log_write(piece.phys, u64::from(written)) {
                    // Not completed: a write the log lacks is never exposed.
                    return (i, Some(QueueError::mem(piece.phys, u64::from(written), e)));
                }
            }
            // SAFETY: inside the run (above): the element's two u32 are inside the used ring.
            unsafe {
                pu.write_volatile(u32::from(head).to_le());
                pu.add(1).write_volatile(written.to_le());
                pa = pa.add(1);
                pu = pu.add(2);
            }
            i += 1;
        }
    }
    (i, None)
}

/// `QueueBatch::pop_each`'s loop on a cached split ring: from available entry `next` and used
/// entry `start`, at most `n` chains through the cached walker; returns how many were popped,
/// how many completed, and the error of a write that could not be logged (which ends the loop;
/// that chain was taken and is not completed). The available and used entries are pointers that
/// advance and wrap.
///
/// # Safety
/// As for `complete_singles_loop`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn split_each_loop<const LOGGING: bool, F: FnMut(&Chain<'_>) -> Option<u32>>(
    rings: SinglesRings,
    mem: &Batch<'_>,
    size: u16,
    next: u16,
    start: u16,
    n: usize,
    segs: &mut Segments,
    f: &mut F,
) -> (usize, u16, Option<QueueError>) {
    let mask = size - 1;
    // SAFETY: the entries at offset 4 of the available (2 bytes each) and used (8 bytes each)
    // rings: slots below size, inside the views, aligned as their bases are; the ends are one
    // past the last entry, where the pointers wrap back.
    let (avail0, avail_end, used0, used_end) = unsafe {
        let a = rings.avail.add(4).cast::<u16>();
        let u = rings.used.add(4).cast::<u32>();
        (a, a.add(usize::from(size)), u, u.add(2 * usize::from(size)))
    };
    // SAFETY: slots below size (masked), as above.
    let (mut pa, mut pu) = unsafe { (avail0.add(usize::from(next & mask)), used0.add(2 * usize::from(start & mask))) };
    let mut win = cached::Windowed::new(mem);
    let (mut popped, mut completed) = (0usize, 0u16);
    while popped < n {
        // SAFETY: pa points at an entry of the available ring (wrapped below); any bytes the guest
        // left are a u16.
        let head = u16::from_le(unsafe { pa.read_volatile() });
        // SAFETY: the table holds 16 * size bytes from a 16-aligned base, mapped for the batch.
        if unsafe { cached::split_chain(rings.desc, size, head, segs, &mut win) }.is_none() {
            break;
        }
        popped += 1;
        // SAFETY: pa stays within [avail0, avail_end): it wraps when it reaches the end.
        pa = unsafe { pa.add(1) };
        if pa == avail_end {
            pa = avail0;
        }
        let chain = Chain::new(head, 1, segs);
        let Some(written) = f(&chain) else { continue };
        if LOGGING {
            if let Err(e) = chain.log_written(mem, written) {
                // Not completed: a write the log lacks is never exposed.
                return (popped, completed, Some(e));
            }
        }
        // SAFETY: pu points at a used element (wrapped below): two u32 inside the used ring.
        unsafe {
            pu.write_volatile(u32::from(head).to_le());
            pu.add(1).write_volatile(written.to_le());
            pu = pu.add(2);
        }
        if pu == used_end {
            pu = used0;
        }
        completed += 1;
    }
    (popped, completed, None)
}

/// A single buffer outside the window: translated through the batch, and the window moved.
#[cold]
#[inline(never)]
fn singles_miss<'b>(
    mem: &'b Batch<'_>,
    addr: GuestPhysAddr,
    len: u32,
    writable: bool,
) -> Option<(vireo_memory::Piece<'b>, vireo_memory::Window<'b>)> {
    let p = mem.translate_piece(addr, u64::from(len), access(writable), false).ok()?;
    Some((p, mem.window()))
}

/// The batch pops' step: the chain at available entry `next + i` if it is one direct descriptor
/// (no NEXT, no INDIRECT, non-zero length) whose buffer lies in one region; `None` for anything
/// else, left to `QueueBatch::pop`. `i` is below the number of entries the driver made available,
/// which is at most the queue size. `window` is the batch's last region, kept current.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // i < size <= 32768
fn single_at<'b>(
    d: Bases,
    mem: &'b Batch<'_>,
    size: u16,
    next: u16,
    i: usize,
    window: &mut vireo_memory::Window<'b>,
) -> Option<Single<'b>> {
    // i < size: the u16 arithmetic is exact modulo the (power of two) ring size.
    let slot = usize::from(next.wrapping_add(i as u16) & (size - 1));
    // SAFETY: slot < size, and the available ring's view holds 6 + 2 * size bytes from an
    // aligned base (Direct::new), so the 2 bytes at 4 + 2 * slot are inside it, aligned; u16 is
    // Pod, so any bytes the guest left are a value.
    let head = u16::from_le(unsafe { d.avail.add(4 + 2 * slot).cast::<u16>().read_volatile() });
    if head >= size {
        return None;
    }
    // SAFETY: head < size and the table's view holds 16 * size bytes from a 16-aligned base, so
    // both words of entry `head` are inside it and aligned.
    let (lo, hi) = unsafe {
        let p = d.desc.add(16 * usize::from(head)).cast::<u64>();
        (p.read_volatile(), p.add(1).read_volatile())
    };
    let desc = desc_from_words(lo, hi);
    if desc.flags_or_id & (DESC_F_NEXT | DESC_F_INDIRECT) != 0 || desc.len == 0 {
        return None;
    }
    let writable = desc.flags_or_id & DESC_F_WRITE != 0;
    let addr = GuestPhysAddr::new(desc.addr);
    let piece = match window.translate_for(addr, desc.len, writable) {
        Some(p) => p,
        None => {
            let p = mem.translate_piece(addr, u64::from(desc.len), access(writable), false).ok()?;
            *window = mem.window();
            p
        }
    };
    Some(Single { id: head, writable, buf: piece.slice, phys: piece.phys, slot: piece.slot })
}

/// See `QueueBatch::pop`: the chain at the next available entry through the cached walker, in
/// the regions the batch translated into (or now translates into, without splitting a buffer).
/// `None` sends the caller to the general walker; nothing but `segs` is changed unless this
/// succeeds.
#[inline(always)]
fn split_cached_pop(
    d: &Direct<'_>,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Option<u16> {
    let slot = usize::from(state.next_avail & (size - 1));
    let head = u16::from_le(d.read::<u16>(Area::Driver, 4 + 2 * slot).ok()?);
    let mut win = cached::Windowed::new(mem);
    // SAFETY: the descriptor table's view holds 16 * size bytes from a 16-aligned base
    // (Direct::new), mapped for the batch.
    unsafe { cached::split_chain(d.base(Area::Desc), size, head, segs, &mut win) }?;
    state.next_avail = state.next_avail.wrapping_add(1);
    Some(head)
}

/// The packed counterpart of `split_cached_pop`: the buffer id and the ring descriptors used.
#[inline(always)]
fn packed_cached_pop(
    d: &Direct<'_>,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Option<(u16, u16)> {
    let head = state.next_avail;
    if head >= size || packed_available(d, size, state).ok()?.is_none() {
        return None;
    }
    let mut win = cached::Windowed::new(mem);
    // SAFETY: the ring's view holds 16 * size bytes from a 16-aligned base (Direct::new), mapped
    // for the batch; head < size.
    let (id, count) = unsafe { cached::packed_chain(d.base(Area::Desc), size, head, segs, &mut win) }?;
    let (next, wrapped) = advance(head, count, size);
    state.next_avail = next;
    state.avail_wrap ^= wrapped;
    Some((id, count))
}

#[inline(always)]
fn pop_split<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    kind: &mut Kind,
    segs: &mut Segments,
) -> Result<Option<(u16, u16)>, QueueError> {
    let Kind::Split { avail_shadow, .. } = kind else { return Ok(None) };
    if state.next_avail == *avail_shadow {
        // Acquire: pairs with the driver's write barrier before it updates the available index
        // (virtio 1.x 2.7.13): the ring entries and descriptors it made available are visible.
        let idx = u16::from_le(r.load_u16(Area::Driver, 2, Ordering::Acquire)?);
        let pending = idx.wrapping_sub(state.next_avail);
        if pending > size {
            return Err(QueueError::AvailIdxJump { last: state.next_avail, now: idx, size });
        }
        if pending == 0 {
            return Ok(None);
        }
        *avail_shadow = idx;
    }
    let slot = usize::from(state.next_avail & (size - 1));
    let head = u16::from_le(r.read::<u16>(Area::Driver, 4 + 2 * slot)?);
    walk_split(r, mem, size, head, segs)?;
    state.next_avail = state.next_avail.wrapping_add(1);
    Ok(Some((head, 1)))
}

/// Validates the split chain that starts at descriptor `head` and resolves it into `segs`.
#[inline(always)]
fn walk_split<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    head: u16,
    segs: &mut Segments,
) -> Result<(), QueueError> {
    if head >= size {
        return Err(QueueError::DescIndex { index: u32::from(head), size: u32::from(size) });
    }
    segs.clear();
    let mut index = head;
    let mut count = 0u32;
    loop {
        count += 1;
        if count > u32::from(size) {
            return Err(QueueError::ChainTooLong { head, limit: u32::from(size) });
        }
        let d = read_desc(r, index)?;
        let flags = d.flags_or_id;
        if flags & DESC_F_INDIRECT != 0 {
            if flags & DESC_F_NEXT != 0 {
                return Err(QueueError::Indirect { head, what: "indirect descriptor with NEXT" });
            }
            let n = indirect_entries(head, &d)?;
            let table = Table::new(mem, d.addr, d.len);
            let mut j = 0u32;
            let mut steps = 0u32;
            loop {
                steps += 1;
                if steps > n {
                    return Err(QueueError::ChainTooLong { head, limit: n });
                }
                let t = table.entry(j)?;
                if t.flags_or_id & DESC_F_INDIRECT != 0 {
                    return Err(QueueError::Indirect { head, what: "nested indirect table" });
                }
                segs.push(mem, head, t.addr, t.len, t.flags_or_id & DESC_F_WRITE != 0)?;
                if t.flags_or_id & DESC_F_NEXT == 0 {
                    break;
                }
                j = u32::from(t.next_or_flags);
                if j >= n {
                    return Err(QueueError::DescIndex { index: j, size: n });
                }
            }
            break;
        }
        segs.push(mem, head, d.addr, d.len, flags & DESC_F_WRITE != 0)?;
        if flags & DESC_F_NEXT == 0 {
            break;
        }
        index = d.next_or_flags;
        if index >= size {
            return Err(QueueError::DescIndex { index: u32::from(index), size: u32::from(size) });
        }
    }
    Ok(())
}

/// Validates a packed chain whose descriptors `desc(i)` yields in order (from the ring, or from
/// the copies an inflight region keeps) and resolves it into `segs`; at most `limit` ring
/// descriptors. Returns the buffer id and how many ring descriptors the chain used.
#[inline(always)]
fn walk_packed(
    mem: &Batch<'_>,
    limit: u16,
    segs: &mut Segments,
    mut desc: impl FnMut(u16) -> Result<Descriptor, QueueError>,
) -> Result<(u16, u16), QueueError> {
    segs.clear();
    let mut count = 0u16;
    loop {
        let d = desc(count)?;
        let (buf_id, flags) = (d.flags_or_id, d.next_or_flags);
        count += 1;
        if flags & DESC_F_INDIRECT != 0 {
            if count != 1 || flags & DESC_F_NEXT != 0 {
                return Err(QueueError::Indirect { head: buf_id, what: "indirect descriptor inside a chain" });
            }
            let n = indirect_entries(buf_id, &d)?;
            let table = Table::new(mem, d.addr, d.len);
            for j in 0..n {
                let t = table.entry(j)?;
                // In a packed indirect table the second u16 holds the flags.
                let tflags = t.next_or_flags;
                if tflags & DESC_F_INDIRECT != 0 {
                    return Err(QueueError::Indirect { head: buf_id, what: "nested indirect table" });
                }
                segs.push(mem, buf_id, t.addr, t.len, tflags & DESC_F_WRITE != 0)?;
            }
            return Ok((buf_id, count));
        }
        segs.push(mem, buf_id, d.addr, d.len, flags & DESC_F_WRITE != 0)?;
        if flags & DESC_F_NEXT == 0 {
            return Ok((buf_id, count));
        }
        if count >= limit {
            return Err(QueueError::ChainTooLong { head: buf_id, limit: u32::from(limit) });
        }
    }
}

/// The descriptor at the device's next available slot, if the driver has made it available.
#[inline]
fn packed_available<R: RingAccess>(r: &R, size: u16, state: &QueueState) -> Result<Option<u16>, QueueError> {
    let _ = size;
    // Acquire: pairs with the driver's write barrier before it sets the head's flags
    // (2.8.21.1): the descriptor's other fields, and the rest of the chain, are visible.
    let flags = u16::from_le(r.load_u16(Area::Desc, 16 * usize::from(state.next_avail) + 14, Ordering::Acquire)?);
    let avail = flags & DESC_F_AVAIL != 0;
    let used = flags & DESC_F_USED != 0;
    Ok((avail == state.avail_wrap && used != state.avail_wrap).then_some(flags))
}

#[inline]
fn pop_packed<R: RingAccess>(
    r: &R,
    mem: &Batch<'_>,
    size: u16,
    state: &mut QueueState,
    segs: &mut Segments,
) -> Result<Option<(u16, u16)>, QueueError> {
    if state.next_avail >= size {
        return Err(QueueError::DescIndex { index: u32::from(state.next_avail), size: u32::from(size) });
    }
    if packed_available(r, size, state)?.is_none() {
        return Ok(None);
    }
    let head_slot = state.next_avail;
    let (id, count) = walk_packed(mem, size, segs, |i| {
        // head_slot < size <= 32768 and i < size: the sum fits u16 and is below 2 * size.
        let slot = head_slot + i;
        read_desc(r, if slot >= size { slot - size } else { slot })
    })?;
    let (next, wrapped) = advance(head_slot, count, size);
    state.next_avail = next;
    state.avail_wrap ^= wrapped;
    Ok(Some((id, count)))
}
