//! Inflight I/O tracking for packed rings (vhost-user `INFLIGHT_SHMFD`).
//!
//! A packed ring gives the device no place to find a chain again once it has taken it: used
//! descriptors are written over the ring in completion order, so the descriptors of a chain still
//! in flight may be gone. The region therefore keeps a copy of every descriptor of every chain in
//! flight, in entries threaded on a free list. Layout (QEMU's vhost-user document; DPDK uses it):
//!
//! ```text
//! offset 0   u64 features
//!        8   u16 version           (1; 0: a fresh region)
//!       10   u16 desc_num          (the queue size)
//!       12   u16 free_head         (current free list)
//!       14   u16 old_free_head     (the free list as of the last published batch)
//!       16   u16 used_idx          (used ring slot after the batch in progress)
//!       18   u16 old_used_idx      (... after the last published batch)
//!       20   u8  used_wrap_counter, 21 u8 old_used_wrap_counter, then padding to 32
//!       32   desc_num x { u8 inflight; u8 pad; u16 next; u16 last; u16 num; u64 counter;
//!                         u16 id; u16 flags; u32 len; u64 addr }          (32 bytes each)
//! ```
//!
//! The `old_*` fields are the state of the last batch the driver has seen; the others the state
//! the batch in progress will leave. Vireo's discipline, which keeps every crash point
//! recoverable even when a batch both completes chains and takes new ones:
//!
//! * **Take** (a chain popped): its copies go into entries taken from the *committed* free list
//!   (from `old_free_head`), the first of them the chain's head entry (`counter`, `num`, `last`,
//!   `inflight = 1`, written before the copies, so a half-made record is still on the free list).
//!   Then `old_free_head` (and `free_head`, or the tail of the chains completed in this batch)
//!   moves past them.
//! * **Complete**: the chain's entries go to the front of the current free list (`free_head`);
//!   its head stays `inflight` until the batch is published.
//! * **Publish**: `used_idx`/`used_wrap_counter` are stored before the ring's first used flags
//!   (the publication); afterwards the heads are cleared and `old_*` = current.
//!
//! Recovery: if `used_idx` moved past `old_used_idx`, the descriptor at `old_used_idx` tells
//! whether the driver saw the batch (its flags are no longer the available pattern of
//! `old_used_wrap_counter`): then the batch is committed, otherwise rolled back. Every entry on
//! the free list is then not in flight; the heads still marked are resubmitted from their copies,
//! oldest first, and the ring position resumes after them.
//!
//! Everything is read and written with bounds-checked volatile accesses; a region the frontend
//! corrupted is a typed error.

use std::collections::{HashMap, VecDeque};

use crate::chain::{Descriptor, DESC_F_AVAIL, DESC_F_USED};
use crate::inflight::{region_err, InflightRegion, INFLIGHT_ALIGN};
use crate::QueueError;

const HEADER: usize = 32;
const ENTRY: usize = 32;
const VERSION: u16 = 1;

const FEATURES: usize = 0;
const VERSION_AT: usize = 8;
const DESC_NUM: usize = 10;
const FREE_HEAD: usize = 12;
const OLD_FREE_HEAD: usize = 14;
const USED_IDX: usize = 16;
const OLD_USED_IDX: usize = 18;
const USED_WRAP: usize = 20;
const OLD_USED_WRAP: usize = 21;

const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

/// Bytes of one packed queue's inflight region for a queue of `queue_size` descriptors.
pub fn packed_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + ENTRY * usize::from(queue_size)) as u64;
    raw.div_ceil(INFLIGHT_ALIGN) * INFLIGHT_ALIGN
}

fn corrupt(what: &'static str) -> QueueError {
    QueueError::Config { what }
}

/// What recovery found: where the ring resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedResume {
    pub used: u16,
    pub used_wrap: bool,
    pub next_avail: u16,
    pub avail_wrap: bool,
}

/// A packed queue's inflight tracking state.
#[derive(Debug)]
pub(crate) struct PackedInflight {
    region: InflightRegion,
    size: u16,
    counter: u64,
    /// Mirrors of the region's list heads.
    free_head: u16,
    old_free_head: u16,
    /// Chains completed in the batch in progress: their head entries, and the last entry of the
    /// list they form at the front of the free list (whose `next` leads into the committed list).
    batch: Vec<u16>,
    pending_tail: Option<u16>,
    /// Buffer id -> head entry, for every chain in flight.
    by_id: HashMap<u16, u16>,
    /// Head entries to hand out again before any new available descriptor, oldest first.
    pub(crate) resubmit: VecDeque<u16>,
    pub(crate) recovered: bool,
}

impl PackedInflight {
    pub(crate) fn new(region: InflightRegion, size: u16) -> Result<Self, QueueError> {
        if region.len() < HEADER + ENTRY * usize::from(size) {
            return Err(corrupt("inflight region too small for the queue"));
        }
        Ok(Self {
            region,
            size,
            counter: 1,
            free_head: 0,
            old_free_head: 0,
            batch: Vec::new(),
            pending_tail: None,
            by_id: HashMap::new(),
            resubmit: VecDeque::new(),
            recovered: false,
        })
    }

    fn at(&self, e: u16) -> usize {
        HEADER + ENTRY * usize::from(e)
    }

    /// A free list link: an entry, or `desc_num` for the end of the list.
    fn link(&self, v: u16) -> Result<u16, QueueError> {
        if v <= self.size {
            Ok(v)
        } else {
            Err(corrupt("inflight free list link out of range"))
        }
    }

    fn entry_index(&self, v: u16, what: &'static str) -> Result<u16, QueueError> {
        if v < self.size {
            Ok(v)
        } else {
            Err(corrupt(what))
        }
    }

    /// The copy of a descriptor kept in entry `e`, as the ring held it (packed layout: the
    /// buffer id in `flags_or_id`, the flags in `next_or_flags`).
    pub(crate) fn copy(&self, e: u16) -> Result<Descriptor, QueueError> {
        let s = self.region.slice();
        let o = self.at(e);
        Ok(Descriptor {
            addr: s.read::<u64>(o + E_ADDR).map_err(region_err)?,
            len: s.read::<u32>(o + E_LEN).map_err(region_err)?,
            flags_or_id: s.read::<u16>(o + E_ID).map_err(region_err)?,
            next_or_flags: s.read::<u16>(o + E_FLAGS).map_err(region_err)?,
        })
    }

    /// The entries holding the copies of the chain whose head entry is `e`, in order, and the
    /// chain's buffer id (the last descriptor's).
    pub(crate) fn chain_entries(&self, e: u16) -> Result<(Vec<u16>, u16), QueueError> {
        let s = self.region.slice();
        let num = s.read::<u16>(self.at(e) + E_NUM).map_err(region_err)?;
        if num == 0 || num > self.size {
            return Err(corrupt("inflight chain length out of range"));
        }
        let mut entries = Vec::with_capacity(usize::from(num));
        let mut cur = e;
        for i in 0..num {
            entries.push(cur);
            if i + 1 < num {
                let next = s.read::<u16>(self.at(cur) + E_NEXT).map_err(region_err)?;
                cur = self.entry_index(next, "inflight chain link out of range")?;
            }
        }
        let last = s.read::<u16>(self.at(e) + E_LAST).map_err(region_err)?;
        if last != cur {
            return Err(corrupt("inflight chain does not end where its head says"));
        }
        let id = s.read::<u16>(self.at(cur) + E_ID).map_err(region_err)?;
        Ok((entries, id))
    }

    /// Reconciles the region with the ring after a (re)start. `flags_at(slot)` reads the flags of
    /// a ring descriptor; `state` is the position SET_VRING_BASE gave. Returns where the ring
    /// resumes.
    pub(crate) fn recover(
        &mut self,
        features: u64,
        used: u16,
        used_wrap: bool,
        flags_at: impl Fn(u16) -> Result<u16, QueueError>,
    ) -> Result<Option<PackedResume>, QueueError> {
        self.recovered = true;
        let s = self.region.slice();
        let version = s.read::<u16>(VERSION_AT).map_err(region_err)?;
        let desc_num = s.read::<u16>(DESC_NUM).map_err(region_err)?;
        if version == 0 && desc_num == 0 {
            // Fresh (GET_INFLIGHT_FD hands out zeroes): every entry free, in order; the list ends
            // at `desc_num`.
            for e in 0..self.size {
                s.write::<u16>(self.at(e) + E_NEXT, e + 1).map_err(region_err)?;
                s.write::<u8>(self.at(e) + E_INFLIGHT, 0).map_err(region_err)?;
            }
            s.write::<u64>(FEATURES, features).map_err(region_err)?;
            s.write::<u16>(DESC_NUM, self.size).map_err(region_err)?;
            for (at, v) in [(FREE_HEAD, 0), (OLD_FREE_HEAD, 0), (USED_IDX, used), (OLD_USED_IDX, used)] {
                s.write::<u16>(at, v).map_err(region_err)?;
            }
            s.write::<u8>(USED_WRAP, u8::from(used_wrap)).map_err(region_err)?;
            s.write::<u8>(OLD_USED_WRAP, u8::from(used_wrap)).map_err(region_err)?;
            s.write::<u16>(VERSION_AT, VERSION).map_err(region_err)?;
            return Ok(None);
        }
        if version != VERSION || desc_num != self.size {
            return Err(corrupt("inflight region from another queue layout"));
        }
        let read16 = |at| s.read::<u16>(at).map_err(region_err);
        let read8 = |at| s.read::<u8>(at).map_err(region_err);
        let mut cur = (read16(FREE_HEAD)?, read16(USED_IDX)?, read8(USED_WRAP)? != 0);
        let mut old = (read16(OLD_FREE_HEAD)?, read16(OLD_USED_IDX)?, read8(OLD_USED_WRAP)? != 0);
        if cur.1 >= self.size || old.1 >= self.size || cur.0 > self.size || old.0 > self.size {
            return Err(corrupt("inflight ring index out of range"));
        }
        if (cur.1, cur.2) != (old.1, old.2) {
            // A batch was being published. Did the driver see it? Before publication the slot
            // still holds a descriptor the driver made available in the `old` lap.
            let flags = flags_at(old.1)?;
            let avail = (flags & DESC_F_AVAIL != 0) == old.2 && (flags & DESC_F_USED != 0) != old.2;
            if !avail {
                old = cur;
            }
        }
        cur = old;
        s.write::<u16>(FREE_HEAD, cur.0).map_err(region_err)?;
        s.write::<u16>(USED_IDX, cur.1).map_err(region_err)?;
        s.write::<u8>(USED_WRAP, u8::from(cur.2)).map_err(region_err)?;
        s.write::<u16>(OLD_FREE_HEAD, cur.0).map_err(region_err)?;
        s.write::<u16>(OLD_USED_IDX, cur.1).map_err(region_err)?;
        s.write::<u8>(OLD_USED_WRAP, u8::from(cur.2)).map_err(region_err)?;
        // Nothing on the free list is in flight (records half made, batches not published).
        let mut e = cur.0;
        let mut on_free_list = vec![false; usize::from(self.size)];
        while e < self.size && !on_free_list[usize::from(e)] {
            on_free_list[usize::from(e)] = true;
            s.write::<u8>(self.at(e) + E_INFLIGHT, 0).map_err(region_err)?;
            e = self.link(read16(self.at(e) + E_NEXT)?)?;
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for e in 0..self.size {
            if read8(self.at(e) + E_INFLIGHT)? != 0 {
                heads.push((s.read::<u64>(self.at(e) + E_COUNTER).map_err(region_err)?, e));
            }
        }
        heads.sort_unstable();
        let mut descs = 0u32;
        self.by_id.clear();
        for &(_, e) in &heads {
            let (entries, id) = self.chain_entries(e)?;
            if entries.iter().any(|&x| on_free_list[usize::from(x)]) {
                return Err(corrupt("inflight chain overlaps the free list"));
            }
            // A chain has at most `size` entries (checked in chain_entries).
            descs += u32::try_from(entries.len()).unwrap_or(u32::MAX);
            if self.by_id.insert(id, e).is_some() {
                return Err(corrupt("two inflight chains with one buffer id"));
            }
        }
        if descs > u32::from(self.size) {
            return Err(corrupt("more inflight descriptors than the ring holds"));
        }
        self.counter = heads.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        self.free_head = cur.0;
        self.old_free_head = cur.0;
        self.resubmit = heads.into_iter().map(|(_, e)| e).collect();
        // The chains in flight sit in the ring right after the used position.
        let total = u32::from(cur.1) + descs;
        let size = u32::from(self.size);
        let (next_avail, avail_wrap) = if total >= size { (total - size, !cur.2) } else { (total, cur.2) };
        Ok(Some(PackedResume {
            used: cur.1,
            used_wrap: cur.2,
            // total < 2 * size, so this is below size.
            next_avail: u16::try_from(next_avail).unwrap_or(0),
            avail_wrap,
        }))
    }

    /// The device took a chain whose ring descriptors are `descs` (packed layout).
    pub(crate) fn take(&mut self, descs: &[Descriptor]) -> Result<(), QueueError> {
        let s = self.region.slice();
        // A driver that makes more available than the ring holds runs the free list out.
        let exhausted = || corrupt("more descriptors in flight than the queue holds");
        let head = self.old_free_head;
        if head >= self.size {
            return Err(exhausted());
        }
        let h = self.at(head);
        s.write::<u16>(h + E_NUM, 0).map_err(region_err)?;
        s.write::<u64>(h + E_COUNTER, self.counter).map_err(region_err)?;
        s.write::<u8>(h + E_INFLIGHT, 1).map_err(region_err)?;
        self.counter = self.counter.wrapping_add(1);
        let mut e = head;
        let mut id = 0;
        for (i, d) in descs.iter().enumerate() {
            if e >= self.size {
                return Err(exhausted());
            }
            let o = self.at(e);
            s.write::<u64>(o + E_ADDR, d.addr).map_err(region_err)?;
            s.write::<u32>(o + E_LEN, d.len).map_err(region_err)?;
            s.write::<u16>(o + E_ID, d.flags_or_id).map_err(region_err)?;
            s.write::<u16>(o + E_FLAGS, d.next_or_flags).map_err(region_err)?;
            id = d.flags_or_id;
            if i + 1 == descs.len() {
                s.write::<u16>(h + E_LAST, e).map_err(region_err)?;
            }
            let num = u16::try_from(i + 1).map_err(|_| exhausted())?;
            s.write::<u16>(h + E_NUM, num).map_err(region_err)?;
            e = self.link(s.read::<u16>(o + E_NEXT).map_err(region_err)?)?;
        }
        // `e` is the committed free list past the chain. Chains completed in this batch sit in
        // front of it on the current list: their tail follows it along.
        match self.pending_tail {
            Some(tail) => s.write::<u16>(self.at(tail) + E_NEXT, e).map_err(region_err)?,
            None => {
                self.free_head = e;
                s.write::<u16>(FREE_HEAD, e).map_err(region_err)?;
            }
        }
        self.old_free_head = e;
        s.write::<u16>(OLD_FREE_HEAD, e).map_err(region_err)?;
        if self.by_id.insert(id, head).is_some() {
            return Err(QueueError::Config { what: "a chain taken with the buffer id of one in flight" });
        }
        Ok(())
    }

    /// The device wrote the used descriptor for buffer `id` (not yet published).
    pub(crate) fn complete(&mut self, id: u16) -> Result<(), QueueError> {
        let head = self.by_id.remove(&id).ok_or(QueueError::NotInFlight { id })?;
        let s = self.region.slice();
        let last = self.entry_index(
            s.read::<u16>(self.at(head) + E_LAST).map_err(region_err)?,
            "inflight chain end out of range",
        )?;
        s.write::<u16>(self.at(last) + E_NEXT, self.free_head).map_err(region_err)?;
        s.write::<u16>(FREE_HEAD, head).map_err(region_err)?;
        self.free_head = head;
        if self.pending_tail.is_none() {
            self.pending_tail = Some(last);
        }
        self.batch.push(head);
        Ok(())
    }

    /// Before the publication: the used position the batch leaves.
    pub(crate) fn publishing(&mut self, used: u16, used_wrap: bool) -> Result<(), QueueError> {
        let s = self.region.slice();
        s.write::<u16>(USED_IDX, used).map_err(region_err)?;
        s.write::<u8>(USED_WRAP, u8::from(used_wrap)).map_err(region_err)
    }

    /// After the publication: the batch's chains are done and the state is committed.
    pub(crate) fn published(&mut self, used: u16, used_wrap: bool) -> Result<(), QueueError> {
        // The flags store happened before; keep these stores after it in program order.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        let s = self.region.slice();
        for &e in &self.batch {
            s.write::<u8>(self.at(e) + E_INFLIGHT, 0).map_err(region_err)?;
        }
        self.batch.clear();
        self.pending_tail = None;
        self.old_free_head = self.free_head;
        s.write::<u16>(OLD_FREE_HEAD, self.free_head).map_err(region_err)?;
        s.write::<u16>(OLD_USED_IDX, used).map_err(region_err)?;
        s.write::<u8>(OLD_USED_WRAP, u8::from(used_wrap)).map_err(region_err)
    }
}
