//! Inflight I/O tracking for split rings (packed rings: `inflight_packed.rs`) (vhost-user `INFLIGHT_SHMFD`): a record, in memory the
//! frontend keeps across backend restarts, of which chains the device has taken from the
//! available ring and not yet returned, so that a backend killed mid-request and started again
//! resubmits exactly those: none lost, none completed twice.
//!
//! The layout of one queue's region is the one QEMU's vhost-user document defines (and
//! libvhost-user and DPDK use):
//!
//! ```text
//! offset 0   u64 features      (the negotiated virtio features; informational)
//!        8   u16 version       (1; 0 means "never used": a fresh region)
//!       10   u16 desc_num      (the queue size)
//!       12   u16 last_batch_head
//!       14   u16 used_idx      (the used index once the last batch was fully recorded)
//!       16   desc_num x { u8 inflight; u8 pad[5]; u16 next; u64 counter }
//! ```
//!
//! The protocol, per batch: mark each head taken (`counter`, then `inflight = 1`); link each
//! completed head into the batch list (`next = last_batch_head; last_batch_head = head`);
//! publish the used index; clear `inflight` along the batch list; store `used_idx`. A crash
//! between the publication and the last store leaves `used_idx` behind the ring's used index,
//! and recovery clears that many entries from `last_batch_head`. Then every entry still marked
//! is a request the driver is waiting for; they are resubmitted oldest first.
//!
//! The region is shared with the frontend, which could scribble on it: it is read and written
//! with bounds-checked volatile accesses only, and a bad region is a typed error, never a crash.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::Arc;

use vireo_memory::{GuestSlice, Mapping};

use crate::QueueError;

const HEADER: usize = 16;
const DESC_STATE: usize = 16;
const VERSION: u16 = 1;
/// Queue regions start on this boundary inside the inflight area.
pub const INFLIGHT_ALIGN: u64 = 64;

/// Bytes of one split queue's inflight region for a queue of `queue_size` descriptors.
pub fn split_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC_STATE * usize::from(queue_size)) as u64;
    raw.div_ceil(INFLIGHT_ALIGN) * INFLIGHT_ALIGN
}

/// One queue's part of a mapped inflight area.
#[derive(Clone, Debug)]
pub struct InflightRegion {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl InflightRegion {
    /// The `len` bytes at `offset` of `map`.
    pub fn new(map: Arc<Mapping>, offset: usize, len: usize) -> Result<Self, QueueError> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len() && len >= HEADER => Ok(Self { map, offset, len }),
            _ => Err(QueueError::Config { what: "inflight region outside the inflight area" }),
        }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn slice(&self) -> GuestSlice<'_> {
        // SAFETY: offset + len <= map.len() (checked in `new`), and the Arc keeps the mapping
        // alive (it is never retired: only Drop unmaps it) for as long as `self` lives. The
        // frontend may write it concurrently; GuestSlice only does volatile accesses.
        unsafe {
            let ptr = NonNull::new_unchecked(self.map.as_ptr().add(self.offset));
            GuestSlice::new(ptr, self.len)
        }
    }
}

pub(crate) fn region_err(_: vireo_memory::MemoryError) -> QueueError {
    QueueError::Config { what: "inflight region too small for the queue" }
}

/// A queue's inflight tracking state.
#[derive(Debug)]
pub(crate) struct Inflight {
    region: InflightRegion,
    size: u16,
    /// The next `counter` value: one past the largest the region holds.
    counter: u64,
    /// In-memory mirror of the region's `last_batch_head`.
    last_batch_head: u16,
    /// Heads to hand out again before any new available entry, oldest first.
    pub(crate) resubmit: VecDeque<u16>,
    /// Recovery has run (it needs the ring's used index, so it runs in the first batch).
    pub(crate) recovered: bool,
}

impl Inflight {
    pub(crate) fn new(region: InflightRegion, size: u16) -> Result<Self, QueueError> {
        if region.len < HEADER + DESC_STATE * usize::from(size) {
            return Err(QueueError::Config { what: "inflight region too small for the queue" });
        }
        Ok(Self { region, size, counter: 1, last_batch_head: 0, resubmit: VecDeque::new(), recovered: false })
    }

    fn desc_off(&self, head: u16) -> usize {
        HEADER + DESC_STATE * usize::from(head)
    }

    /// Reconciles the region with the ring after a (re)start, given the ring's used index and the
    /// negotiated features; returns how many chains are to be resubmitted.
    pub(crate) fn recover(&mut self, ring_used: u16, features: u64) -> Result<u16, QueueError> {
        self.recovered = true;
        let s = self.region.slice();
        let version = s.read::<u16>(8).map_err(region_err)?;
        let desc_num = s.read::<u16>(10).map_err(region_err)?;
        if version == 0 && desc_num == 0 {
            // A fresh region (GET_INFLIGHT_FD hands out zeroed memory): nothing was in flight.
            s.write::<u64>(0, features).map_err(region_err)?;
            s.write::<u16>(10, self.size).map_err(region_err)?;
            s.write::<u16>(12, 0).map_err(region_err)?;
            s.write::<u16>(14, ring_used).map_err(region_err)?;
            s.write::<u16>(8, VERSION).map_err(region_err)?;
            return Ok(0);
        }
        if version != VERSION || desc_num != self.size {
            return Err(QueueError::Config { what: "inflight region from another queue layout" });
        }
        let used_idx = s.read::<u16>(14).map_err(region_err)?;
        let mut pending = ring_used.wrapping_sub(used_idx);
        if pending > self.size {
            return Err(QueueError::Config { what: "inflight used index far from the ring's" });
        }
        // The last batch reached the used ring but not the region: its entries are complete.
        let mut head = s.read::<u16>(12).map_err(region_err)?;
        while pending > 0 {
            if head >= self.size {
                return Err(QueueError::Config { what: "inflight batch list leaves the queue" });
            }
            let off = self.desc_off(head);
            s.write::<u8>(off, 0).map_err(region_err)?;
            head = s.read::<u16>(off + 6).map_err(region_err)?;
            pending -= 1;
        }
        s.write::<u16>(14, ring_used).map_err(region_err)?;
        let mut marked: Vec<(u64, u16)> = Vec::new();
        for h in 0..self.size {
            let off = self.desc_off(h);
            if s.read::<u8>(off).map_err(region_err)? != 0 {
                marked.push((s.read::<u64>(off + 8).map_err(region_err)?, h));
            }
        }
        marked.sort_unstable();
        self.counter = marked.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        self.last_batch_head = s.read::<u16>(12).map_err(region_err)?;
        self.resubmit = marked.into_iter().map(|(_, h)| h).collect();
        // At most `size` entries, so the count fits.
        Ok(u16::try_from(self.resubmit.len()).unwrap_or(self.size))
    }

    /// The device took chain `head` from the ring.
    #[inline]
    pub(crate) fn mark(&mut self, head: u16) -> Result<(), QueueError> {
        let s = self.region.slice();
        let off = self.desc_off(head);
        s.write::<u64>(off + 8, self.counter).map_err(region_err)?;
        s.write::<u8>(off, 1).map_err(region_err)?;
        self.counter = self.counter.wrapping_add(1);
        Ok(())
    }

    /// The device wrote the used element for `head` (not yet published).
    #[inline]
    pub(crate) fn link(&mut self, head: u16) -> Result<(), QueueError> {
        let s = self.region.slice();
        s.write::<u16>(self.desc_off(head) + 6, self.last_batch_head).map_err(region_err)?;
        s.write::<u16>(12, head).map_err(region_err)?;
        self.last_batch_head = head;
        Ok(())
    }

    /// The used index `used` now publishes the last `count` linked heads: they are done.
    pub(crate) fn published(&mut self, used: u16, count: u16) -> Result<(), QueueError> {
        // The used index store happened before; keep these stores after it in program order.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        let s = self.region.slice();
        let mut head = self.last_batch_head;
        for _ in 0..count {
            if head >= self.size {
                break;
            }
            let off = self.desc_off(head);
            s.write::<u8>(off, 0).map_err(region_err)?;
            head = s.read::<u16>(off + 6).map_err(region_err)?;
        }
        s.write::<u16>(14, used).map_err(region_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: u16) -> (InflightRegion, Arc<Mapping>) {
        let len = split_region_size(size);
        let fd = vireo_memory::memfd("inflight-test", len).unwrap();
        let map = Arc::new(Mapping::from_fd(std::os::fd::AsFd::as_fd(&fd), 0, len).unwrap());
        (InflightRegion::new(map.clone(), 0, usize::try_from(len).unwrap()).unwrap(), map)
    }

    #[test]
    fn size_is_aligned_and_covers_the_queue() {
        assert_eq!(split_region_size(256), 16 + 16 * 256 + 48);
        assert_eq!(split_region_size(1) % INFLIGHT_ALIGN, 0);
    }

    #[test]
    fn fresh_region_is_initialized_and_nothing_resubmits() {
        let (r, _m) = region(8);
        let mut inf = Inflight::new(r.clone(), 8).unwrap();
        assert_eq!(inf.recover(5, 0xabc).unwrap(), 0);
        let s = r.slice();
        assert_eq!(s.read::<u16>(8).unwrap(), VERSION);
        assert_eq!(s.read::<u16>(10).unwrap(), 8);
        assert_eq!(s.read::<u16>(14).unwrap(), 5);
    }

    #[test]
    fn crash_between_publish_and_record_is_repaired() {
        let (r, _m) = region(8);
        let mut inf = Inflight::new(r.clone(), 8).unwrap();
        inf.recover(0, 0).unwrap();
        for h in [3, 1, 6, 2] {
            inf.mark(h).unwrap();
        }
        // 3 and 1 complete in one batch; the process dies after the ring's used index moved to 2
        // but before the region recorded it.
        inf.link(3).unwrap();
        inf.link(1).unwrap();
        let mut again = Inflight::new(r.clone(), 8).unwrap();
        assert_eq!(again.recover(2, 0).unwrap(), 2);
        assert_eq!(again.resubmit, [6, 2]);
        assert_eq!(r.slice().read::<u16>(14).unwrap(), 2);
        // Completing 6 fully, then restarting, leaves only 2.
        again.resubmit.clear();
        again.link(6).unwrap();
        again.published(3, 1).unwrap();
        let mut third = Inflight::new(r, 8).unwrap();
        assert_eq!(third.recover(3, 0).unwrap(), 1);
        assert_eq!(third.resubmit, [2]);
        assert!(third.counter > 4);
    }

    #[test]
    fn hostile_regions_are_errors() {
        let (r, _m) = region(8);
        let s = r.slice();
        s.write::<u16>(8, 1).unwrap();
        s.write::<u16>(10, 16).unwrap();
        assert!(Inflight::new(r.clone(), 8).unwrap().recover(0, 0).is_err());
        s.write::<u16>(10, 8).unwrap();
        s.write::<u16>(12, 77).unwrap(); // batch list head out of range
        s.write::<u16>(14, 0).unwrap();
        assert!(Inflight::new(r.clone(), 8).unwrap().recover(1, 0).is_err());
        s.write::<u16>(14, 100).unwrap(); // used index far from the ring's
        assert!(Inflight::new(r, 8).unwrap().recover(1, 0).is_err());
    }
}
