//! The IOTLB of a device behind a virtual IOMMU (VIRTIO_F_ACCESS_PLATFORM with vhost-user's
//! IOTLB protocol feature).
//!
//! With a vIOMMU the driver puts I/O virtual addresses (IOVAs) in its rings and descriptors, not
//! guest physical addresses. The frontend tells the backend, entry by entry, which IOVA range
//! stands for which range of its own user addresses, and with which rights (IOTLB_MSG update),
//! and takes entries back (IOTLB_MSG invalidate). The backend asks for what it lacks with a miss
//! on the backend channel.
//!
//! An [`IotlbTable`] is one immutable snapshot: sorted, non-overlapping entries searched in
//! O(log n). The control side builds a new snapshot for every change ([`crate::GuestMemory`]);
//! readers keep the one they loaded for the length of a batch. Every snapshot carries the
//! [`RegionTag`] of its *generation*: updates that only add entries keep the tag (nothing a
//! reader holds became wrong), while an invalidation moves to a new tag and retires the old one
//! through the protocol, exactly as a removed memory region is retired. A batch or an in-flight
//! I/O that translated through the IOTLB pins the generation's tag, so the reply to an
//! invalidation waits for them, and a ring cache filled through the IOTLB records the tag's id,
//! so an invalidation clears it.

use std::sync::Arc;

use crate::protocol::RegionTag;

/// Access rights of an IOTLB entry, or the access a translation needs (vhost's
/// VHOST_ACCESS_RO = 1: the device may read; WO = 2: it may write; RW = 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// The device reads.
    pub const READ: Perm = Perm(1);
    /// The device writes.
    pub const WRITE: Perm = Perm(2);
    /// Both.
    pub const RW: Perm = Perm(3);
    /// No access: every entry allows it (looking an address up without an access, to log it).
    pub const NONE: Perm = Perm(0);

    /// From vhost's encoding; `None` for 0 (no access) or unknown bits.
    pub fn from_bits(bits: u8) -> Option<Perm> {
        (1..=3).contains(&bits).then_some(Perm(bits))
    }

    /// vhost's encoding.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether an entry with these rights allows the access `need`.
    #[inline]
    pub fn allows(self, need: Perm) -> bool {
        self.0 & need.0 == need.0
    }
}

/// One IOTLB entry: `size` bytes at `iova` are the frontend's user addresses from `uaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First I/O virtual address.
    pub iova: u64,
    /// Length in bytes (non-zero).
    pub size: u64,
    /// The frontend user address `iova` stands for.
    pub uaddr: u64,
    /// What the device may do there.
    pub perm: Perm,
}

impl IotlbEntry {
    /// One past the last IOVA (entries are validated not to wrap).
    pub fn end(&self) -> u64 {
        self.iova + self.size
    }

    /// Whether the entry is usable: non-empty and wrapping neither address space.
    pub fn is_valid(&self) -> bool {
        self.size != 0 && self.iova.checked_add(self.size).is_some() && self.uaddr.checked_add(self.size).is_some()
    }
}

/// The most entries one IOTLB holds. The kernel's vhost keeps 2048 by default and evicts; QEMU
/// answers every miss with a page-sized entry, so a busy guest with a vIOMMU produces many.
/// When full, the control side drops the whole table (an invalidation): misses refill it.
pub const MAX_IOTLB_ENTRIES: usize = 65536;

/// Why an IOVA did not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbFault {
    /// No entry covers the address: the frontend has to be asked (a miss).
    Miss {
        /// The first uncovered address.
        iova: u64,
    },
    /// An entry covers it but does not allow the access.
    Denied {
        /// The address.
        iova: u64,
        /// The entry's rights.
        have: Perm,
    },
}

/// One immutable IOTLB snapshot (see the module documentation).
#[derive(Debug)]
pub struct IotlbTable {
    /// `entries[i].iova`, flat, for the search.
    starts: Vec<u64>,
    entries: Vec<IotlbEntry>,
    pub(crate) tag: Arc<RegionTag>,
}

impl IotlbTable {
    pub(crate) fn new(entries: Vec<IotlbEntry>, tag: Arc<RegionTag>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].end() <= w[1].iova));
        Self { starts: entries.iter().map(|e| e.iova).collect(), entries, tag }
    }

    /// The entries, sorted by IOVA.
    pub fn entries(&self) -> &[IotlbEntry] {
        &self.entries
    }

    /// The generation's id (what caches filled through this table record).
    pub fn generation_id(&self) -> u64 {
        self.tag.id
    }

    /// The index of the entry holding `iova`, in O(log n).
    #[inline]
    pub fn find(&self, iova: u64) -> Option<usize> {
        let i = self.starts.partition_point(|&s| s <= iova).checked_sub(1)?;
        (iova < self.entries[i].end()).then_some(i)
    }

    /// The entry holding `iova`, checked for `need`.
    #[inline]
    pub fn entry(&self, iova: u64, need: Perm) -> Result<&IotlbEntry, IotlbFault> {
        let e = &self.entries[self.find(iova).ok_or(IotlbFault::Miss { iova })?];
        if !e.perm.allows(need) {
            return Err(IotlbFault::Denied { iova, have: e.perm });
        }
        Ok(e)
    }

    /// Translates `iova` for `need`: the user address it stands for, and how many bytes from it
    /// (at most `len`) continue linearly in user space with the same rights, following
    /// neighbouring entries that continue each other (QEMU sends page-sized entries, so a ring
    /// longer than a page spans several).
    pub fn translate(&self, iova: u64, len: u64, need: Perm) -> Result<(u64, u64), IotlbFault> {
        let mut i = self.find(iova).ok_or(IotlbFault::Miss { iova })?;
        let e = &self.entries[i];
        if !e.perm.allows(need) {
            return Err(IotlbFault::Denied { iova, have: e.perm });
        }
        let uaddr = e.uaddr + (iova - e.iova);
        let mut avail = e.end() - iova;
        while avail < len {
            let (prev, Some(next)) = (&self.entries[i], self.entries.get(i + 1)) else { break };
            if next.iova != prev.end() || next.uaddr != prev.uaddr + prev.size || !next.perm.allows(need) {
                break;
            }
            avail += next.size;
            i += 1;
        }
        Ok((uaddr, avail.min(len)))
    }

    /// Checks that every byte of `[iova, iova + len)` is covered, with `need`: the first hole is
    /// a miss, a covering entry without the rights a denial.
    pub fn check(&self, iova: u64, len: u64, need: Perm) -> Result<(), IotlbFault> {
        let mut at = iova;
        let end = iova.saturating_add(len);
        while at < end {
            let e = self.entry(at, need)?;
            at = e.end();
        }
        Ok(())
    }
}

/// The control side's edits: pure functions from one entry list to the next.
pub(crate) mod edit {
    use super::IotlbEntry;

    /// `entries` without anything in `[iova, iova + size)`; entries cut by the range keep their
    /// parts outside it. Also says whether anything was removed.
    pub fn remove_range(entries: &[IotlbEntry], iova: u64, size: u64) -> (Vec<IotlbEntry>, bool) {
        let end = iova.saturating_add(size);
        let mut out = Vec::with_capacity(entries.len());
        let mut removed = false;
        for e in entries {
            if e.end() <= iova || e.iova >= end {
                out.push(*e);
                continue;
            }
            removed = true;
            if e.iova < iova {
                out.push(IotlbEntry { size: iova - e.iova, ..*e });
            }
            if e.end() > end {
                let cut = end - e.iova;
                out.push(IotlbEntry { iova: end, size: e.end() - end, uaddr: e.uaddr + cut, perm: e.perm });
            }
        }
        (out, removed)
    }

    /// Whether `new` is already in `entries` exactly (a repeated update: nothing to do).
    pub fn contains_exactly(entries: &[IotlbEntry], new: &IotlbEntry) -> bool {
        let i = entries.partition_point(|e| e.iova < new.iova);
        entries.get(i) == Some(new)
    }

    /// Whether `new` overlaps any entry.
    pub fn overlaps(entries: &[IotlbEntry], new: &IotlbEntry) -> bool {
        let i = entries.partition_point(|e| e.end() <= new.iova);
        entries.get(i).is_some_and(|e| e.iova < new.end())
    }

    /// `entries` (which `new` does not overlap) with `new` inserted in order.
    pub fn insert(entries: &[IotlbEntry], new: IotlbEntry) -> Vec<IotlbEntry> {
        let i = entries.partition_point(|e| e.iova < new.iova);
        let mut out = Vec::with_capacity(entries.len() + 1);
        out.extend_from_slice(&entries[..i]);
        out.push(new);
        out.extend_from_slice(&entries[i..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: Vec<IotlbEntry>) -> IotlbTable {
        IotlbTable::new(entries, Arc::new(RegionTag::new(1, 0)))
    }

    fn e(iova: u64, size: u64, uaddr: u64, perm: Perm) -> IotlbEntry {
        IotlbEntry { iova, size, uaddr, perm }
    }

    #[test]
    fn translation_follows_contiguous_entries_and_checks_rights() {
        let t = table(vec![
            e(0x1000, 0x1000, 0x9000, Perm::RW),
            e(0x2000, 0x1000, 0xa000, Perm::RW),
            e(0x3000, 0x1000, 0x5_0000, Perm::RW),
            e(0x5000, 0x1000, 0x6_0000, Perm::READ),
        ]);
        assert_eq!(t.translate(0x1800, 0x2000, Perm::READ), Ok((0x9800, 0x1800)));
        assert_eq!(t.translate(0x1800, 0x10, Perm::WRITE), Ok((0x9800, 0x10)));
        assert_eq!(t.translate(0x4000, 1, Perm::READ), Err(IotlbFault::Miss { iova: 0x4000 }));
        assert_eq!(t.translate(0x5000, 1, Perm::WRITE), Err(IotlbFault::Denied { iova: 0x5000, have: Perm::READ }));
        assert_eq!(t.translate(0x0fff, 1, Perm::READ), Err(IotlbFault::Miss { iova: 0x0fff }));
        assert_eq!(t.check(0x1000, 0x3000, Perm::READ), Ok(()));
        assert_eq!(t.check(0x1000, 0x3001, Perm::READ), Err(IotlbFault::Miss { iova: 0x4000 }));
    }

    #[test]
    fn removal_keeps_the_parts_outside_the_range() {
        let entries = vec![e(0x1000, 0x3000, 0x9000, Perm::RW), e(0x8000, 0x1000, 0x1000, Perm::READ)];
        let (out, removed) = edit::remove_range(&entries, 0x2000, 0x1000);
        assert!(removed);
        assert_eq!(out, vec![e(0x1000, 0x1000, 0x9000, Perm::RW), e(0x3000, 0x1000, 0xb000, Perm::RW), entries[1]]);
        let (same, removed) = edit::remove_range(&entries, 0x5000, 0x1000);
        assert!(!removed);
        assert_eq!(same, entries);
        assert!(edit::overlaps(&entries, &e(0x3fff, 2, 0, Perm::RW)));
        assert!(!edit::overlaps(&entries, &e(0x4000, 0x4000, 0, Perm::RW)));
        assert!(edit::contains_exactly(&entries, &entries[1]));
    }
}
