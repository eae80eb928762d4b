//! A virtqueue, split or packed, as the device sees it.

//!
//! [`Queue`] holds what lasts between batches: the configuration, the device's position, its
//! view of guest memory, and the inflight record. Work happens in batches ([`Queue::process`],
//! `batch.rs`), which walk the rings with the code of `split.rs` and `packed.rs`.

use std::sync::Arc;

use vireo_memory::{Batch, GuestPhysAddr, Perm, QueueHandle, QueueMemory, MAX_CACHED};

use crate::batch::{Access, QueueBatch};
use crate::chain::{Chain, Segments};
use crate::error::QueueError;
use crate::inflight::{Inflight, InflightRegion};
use crate::inflight_packed::PackedInflight;
use crate::rings::{Direct, Layout, Translated};

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

impl Chain<'_> {
    /// What to pass to [`QueueBatch::add_used`] for this chain.
    pub fn token(&self) -> UsedToken {
        UsedToken { id: self.id, ring_descs: self.ring_descs }
    }
}

/// The ring layout and what the device keeps of it between batches.
#[derive(Debug)]
pub(crate) enum Kind {
    /// `avail_shadow`: the driver's available index as last read; `used_known`: the used index
    /// has been read back from the ring since the position was set.
    Split { avail_shadow: u16, used_known: bool },
    /// `first_used_flags`: the slot and flags of the first used descriptor of the batch, written
    /// last (2.8.21.2). `rewound_end`: when chains were given back (`QueueBatch::rewind`), the
    /// position (slot, wrap counter) just past what the device had taken: the packed
    /// counterpart of `avail_shadow`, where a kick event goes so that new chains are signalled
    /// and those given back are not.
    Packed { first_used_flags: Option<(u16, u16)>, rewound_end: Option<(u16, bool)> },
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
    /// The most chains one batch takes (`Queue::set_batch_limit`).
    batch_limit: u32,
    /// VIRTIO_F_IN_ORDER negotiated (`Queue::set_in_order`).
    in_order: bool,
    /// Notifications as the device last asked for them (`Some(true)`: off), so that a polling
    /// device does not write the same flag into the ring at every batch (a store to the line the
    /// driver reads the used index from).
    notify_off: Option<bool>,
}

/// The most chains one batch takes by default. A batch holds off every invalidation that needs
/// this queue quiet, so it must end however fast the driver refills the ring; 256 chains are a
/// few microseconds of work on the fast paths, and a batch boundary costs a few nanoseconds.
pub const DEFAULT_BATCH_LIMIT: u32 = 256;

fn check_area(gpa: GuestPhysAddr, len: u64, align: u64) -> Result<(), QueueError> {
    if !gpa.raw().is_multiple_of(align) {
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
                (
                    Layout { gpa: [desc, driver, device], len: lens },
                    Kind::Packed { first_used_flags: None, rewound_end: None },
                )
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
            batch_limit: DEFAULT_BATCH_LIMIT,
            in_order: false,
            notify_off: None,
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
            Kind::Packed { first_used_flags, rewound_end } => {
                *first_used_flags = None;
                *rewound_end = None;
            }
        }
        self.signalled = self.state.next_used;
        self.notify_off = None;
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

    /// The most chains one batch takes (at least 1): when a batch has taken that many, `pop`
    /// says the ring is empty and [`QueueBatch::exhausted`] says why, and the caller starts a new
    /// batch, between which an invalidation gets its turn. A batch also stops taking chains as
    /// soon as an invalidation waits for it ([`vireo_memory::Batch::yield_requested`]).
    pub fn set_batch_limit(&mut self, limit: u32) {
        self.batch_limit = limit.max(1);
    }

    /// VIRTIO_F_IN_ORDER was negotiated: the driver takes used buffers in the order it made them
    /// available. On a packed ring, completions that wrote nothing
    /// ([`QueueBatch::add_used_many`] with lengths of 0, a transmit queue's) are then published
    /// as one used descriptor per batch, with the id of the last (virtio 1.2 2.8.23; DPDK's
    /// vhost does the same): the device writes one descriptor's line instead of one per chain,
    /// the driver reads one.
    pub fn set_in_order(&mut self, on: bool) {
        self.in_order = on;
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
            used_total: 0,
            batch_used_start: 0,
            budget: self.batch_limit,
            exhausted: false,
            notify_off: &mut self.notify_off,
            prefetch: false,
            in_order: self.in_order,
            collapsing: false,
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
