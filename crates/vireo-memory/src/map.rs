//! The memory map: the set of guest memory regions in force, with O(log n) lookups by guest
//! physical address and by frontend user address.
//!
//! A [`MemoryMap`] is immutable once built. Changing guest memory builds a new map and publishes it
//! through the invalidation protocol (`guest/`); readers keep using the map they started their
//! batch with until the protocol tells them otherwise. Lookups run over flat sorted arrays of
//! starts, ends and host bases (no pointer chasing per probe), which is what makes them cheaper
//! than a binary search over region objects at 509 regions.

use std::os::fd::BorrowedFd;

use crate::addr::{GuestPhysAddr, UserAddr};
use crate::error::MemoryError;
use crate::mmap::Mapping;
use crate::protocol::RegionTag;
use std::sync::Arc;

/// The most regions one map holds: vhost-user's VHOST_USER_MAX_CONFIG_MEM_SLOTS (what
/// GET_MAX_MEM_SLOTS answers with CONFIGURE_MEM_SLOTS).
#[cfg(not(vireo_loom))]
pub const MAX_REGIONS: usize = 509;
/// Under loom every gate's pin counters are modelled objects: a handful of slots keeps the
/// models fast, and nothing in them depends on the count.
#[cfg(vireo_loom)]
pub const MAX_REGIONS: usize = 4;

/// Guest addresses and sizes of regions must be multiples of this.
pub const REGION_ALIGN: u64 = 4096;

/// A region the frontend offers: where it sits in guest physical and frontend user address
/// space, and the file descriptor range that backs it.
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec<'fd> {
    /// Guest physical address of the first byte.
    pub gpa: GuestPhysAddr,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address of the first byte.
    pub user_addr: UserAddr,
    /// The file backing the region.
    pub fd: BorrowedFd<'fd>,
    /// Offset of the first byte in that file.
    pub fd_offset: u64,
}

impl RegionSpec<'_> {
    /// Checks what can be checked without mapping: size, wrap-around and alignment.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let (gpa, size) = (self.gpa, self.size);
        if size == 0 {
            return Err(MemoryError::EmptyRegion { gpa });
        }
        let wraps = gpa.checked_add(size).is_none()
            || self.user_addr.checked_add(size).is_none()
            || self.fd_offset.checked_add(size).is_none()
            || usize::try_from(size).is_err();
        if wraps {
            return Err(MemoryError::WrappingRegion { gpa, size });
        }
        if gpa.raw() % REGION_ALIGN != 0 || size % REGION_ALIGN != 0 {
            return Err(MemoryError::MisalignedRegion { gpa, size, page_size: REGION_ALIGN });
        }
        Ok(())
    }
}

/// One mapped region of guest memory.
#[derive(Debug)]
pub struct Region {
    pub(crate) tag: RegionTag,
    gpa: GuestPhysAddr,
    size: u64,
    user_addr: UserAddr,
    fd_offset: u64,
    /// A file whose pages a filesystem writes back (not shmem, not hugetlbfs): see
    /// [`MemoryMap::has_file_pages`].
    file_pages: bool,
    pub(crate) mapping: Mapping,
}

/// Whether the pages of `fd` belong to a filesystem that writes them back to storage: anything
/// but shared memory (memfd, /dev/shm) and hugetlbfs.
fn has_writeback(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;
    match rustix::fs::fstatfs(fd) {
        // `f_type` is a signed word whose low 32 bits are the magic number.
        #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
        Ok(st) => !matches!(st.f_type as u32, TMPFS_MAGIC | HUGETLBFS_MAGIC),
        // Unknown: assume the worst (the cost is a buffered read instead of a direct one).
        Err(_) => true,
    }
}

impl Region {
    /// Maps `spec`'s file range. `tag` names the protocol slot the region pins.
    pub(crate) fn map(spec: &RegionSpec<'_>, tag: RegionTag) -> Result<Self, MemoryError> {
        spec.validate()?;
        let mapping = Mapping::from_fd(spec.fd, spec.fd_offset, spec.size).map_err(|source| MemoryError::Map {
            gpa: spec.gpa,
            size: spec.size,
            offset: spec.fd_offset,
            source,
        })?;
        let file_pages = has_writeback(spec.fd);
        Ok(Self {
            tag,
            gpa: spec.gpa,
            size: spec.size,
            user_addr: spec.user_addr,
            fd_offset: spec.fd_offset,
            file_pages,
            mapping,
        })
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> GuestPhysAddr {
        self.gpa
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The frontend's user address of the first byte.
    pub fn user_addr(&self) -> UserAddr {
        self.user_addr
    }
    /// The file offset of the first byte.
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }
    /// Whether the region is a file a filesystem writes back (see [`MemoryMap::has_file_pages`]).
    pub fn file_pages(&self) -> bool {
        self.file_pages
    }
    /// The region's unique id (never reused within a process).
    pub fn id(&self) -> u64 {
        self.tag.id
    }
    /// The protocol slot the region pins.
    pub fn slot(&self) -> usize {
        self.tag.slot
    }
    fn gpa_end(&self) -> u64 {
        // Cannot wrap: `RegionSpec::validate` refused wrapping regions.
        self.gpa.raw() + self.size
    }
    fn user_end(&self) -> u64 {
        self.user_addr.raw() + self.size
    }
}

/// An immutable set of non-overlapping regions.
#[derive(Debug, Default)]
pub struct MemoryMap {
    /// Regions sorted by guest physical address.
    regions: Vec<Arc<Region>>,
    /// `regions[i].gpa`, flat, for the search.
    gpa_start: Vec<u64>,
    /// A direct index into `gpa_start` by the address's high bits.
    gpa_index: StartIndex,
    /// `regions[i].gpa + size`.
    gpa_end: Vec<u64>,
    /// Host address of `regions[i].gpa`.
    host: Vec<usize>,
    /// Frontend user address starts, sorted, with the index of their region.
    user_start: Vec<u64>,
    user_index: Vec<u16>,
    /// Some region is a file a filesystem writes back.
    file_pages: bool,
}

/// The index of the last element of `starts` (sorted ascending) that is `<= x`.
///
/// Branch-free halving: the loop runs `log2(n)` times whatever the data (its one branch depends
/// on the length only), and the select is a conditional move (`select_unpredictable`: a plain
/// `if` compiled to a branch, and random addresses mispredicted half of them), so a random
/// lookup pays no misprediction.
#[inline]
fn last_at_or_below(starts: &[u64], x: u64) -> Option<usize> {
    let mut size = starts.len();
    if size == 0 {
        return None;
    }
    let mut base = 0usize;
    while size > 1 {
        let half = size / 2;
        let mid = base + half;
        // SAFETY: `base + size <= starts.len()` holds on entry (0 + len) and is kept by each
        // round (`base` moves by `half` exactly when `size` shrinks by it), and `mid = base +
        // half < base + size` because `half < size`: `mid` is in bounds. (The checked index
        // would put a compare and branch into every round.)
        let probe = unsafe { *starts.get_unchecked(mid) };
        base = std::hint::select_unpredictable(probe <= x, mid, base);
        size -= half;
    }
    (starts[base] <= x).then_some(base)
}

/// A direct index over sorted region starts: the span from the first start to the last end is
/// cut into `2^k` equal buckets (about two per region), and `counts[b]` is the number of starts
/// below bucket `b`. An address's bucket is a subtraction and a shift; the starts inside it
/// (usually none or one) are all that is left to search. A lookup is then a few instructions
/// whatever the number of regions, where a binary search of 509 starts takes nine dependent
/// rounds (issue 14's goal: 509 regions within 4x of one). A layout that crowds many regions
/// into one bucket (a few tiny regions next to a huge one) falls back to the binary search over
/// that bucket's starts: never worse than the plain search by more than the index's two loads.
#[derive(Debug, Default)]
struct StartIndex {
    /// The first start.
    base: u64,
    /// log2 of a bucket's size.
    shift: u32,
    /// `counts[b]`: how many starts are below `base + (b << shift)`, for `b` in `0..=buckets`.
    counts: Vec<u16>,
}

impl StartIndex {
    /// Buckets for at most this many regions and no more: 2 KiB of counts at `MAX_REGIONS`.
    const MAX_BUCKETS: u64 = 1024;

    /// The index of `starts` (sorted, not empty, at most `u16::MAX` of them) whose regions end
    /// at or below `end`.
    fn new(starts: &[u64], end: u64) -> Self {
        let Some(&base) = starts.first() else { return Self::default() };
        let span = end.saturating_sub(base).max(1);
        let n = u64::try_from(starts.len()).unwrap_or(u64::MAX);
        let target = n.saturating_mul(2).next_power_of_two().clamp(2, Self::MAX_BUCKETS);
        // The smallest bucket size (a power of two) that covers the span in `target` buckets;
        // with target >= 2 the shift stays below 64.
        let mut shift = 0u32;
        while ((span - 1) >> shift) + 1 > target {
            shift += 1;
        }
        let buckets = ((span - 1) >> shift) + 1;
        // One merge pass over buckets and starts (a map is built on every memory-table change,
        // inside the frontend's wait for the reply).
        let mut below_count = 0usize;
        let counts = (0..=buckets)
            .map(|b| {
                let below = u128::from(base) + (u128::from(b) << shift);
                while starts.get(below_count).is_some_and(|&s| u128::from(s) < below) {
                    below_count += 1;
                }
                u16::try_from(below_count).unwrap_or(u16::MAX)
            })
            .collect();
        Self { base, shift, counts }
    }

    /// The index of the last of `starts` (the ones this index was built over) that is `<= x`,
    /// or `None` when there is none or `x` lies past the end the index was built with.
    #[inline(always)]
    fn last_at_or_below(&self, starts: &[u64], x: u64) -> Option<usize> {
        let off = x.checked_sub(self.base)?;
        // Past the last bucket (and past every region's end) when the bucket is out of range.
        let b = usize::try_from(off >> self.shift).ok()?;
        let lo = usize::from(*self.counts.get(b)?);
        let hi = usize::from(*self.counts.get(b + 1)?);
        // The starts inside the bucket; before the first of them (or with none), the answer is
        // the last start below the bucket, which exists: the first start is `base`, at or
        // below `x`, so only bucket 0 has lo == 0, and its first start is `base` itself.
        match starts.get(lo..hi).and_then(|inside| last_at_or_below(inside, x)) {
            Some(j) => Some(lo + j),
            None => lo.checked_sub(1),
        }
    }
}

/// Up to this many regions, [`MemoryMap::find`] binary-searches without the index.
const SEARCH_DIRECTLY: usize = 4;

/// Where a guest physical address landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Index of the region in the map.
    pub index: usize,
    /// Host address of the requested guest address.
    pub host: usize,
    /// Bytes from the requested address to the end of the region.
    pub avail: u64,
}

impl MemoryMap {
    /// A map with no regions.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a map from regions, refusing overlaps in either address space.
    pub(crate) fn from_regions(mut regions: Vec<Arc<Region>>) -> Result<Self, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions { max: MAX_REGIONS });
        }
        regions.sort_by_key(|r| r.gpa);
        for w in regions.windows(2) {
            if w[0].gpa_end() > w[1].gpa.raw() {
                return Err(MemoryError::OverlappingRegions {
                    gpa: w[1].gpa,
                    size: w[1].size,
                    other_gpa: w[0].gpa,
                    space: "guest physical",
                });
            }
        }
        let mut by_user: Vec<(u64, u16)> = Vec::with_capacity(regions.len());
        for (i, r) in regions.iter().enumerate() {
            // MAX_REGIONS < u16::MAX, checked above.
            by_user.push((r.user_addr.raw(), u16::try_from(i).unwrap_or(u16::MAX)));
        }
        by_user.sort_unstable();
        for w in by_user.windows(2) {
            let (a, b) = (&regions[usize::from(w[0].1)], &regions[usize::from(w[1].1)]);
            if a.user_end() > b.user_addr.raw() {
                return Err(MemoryError::OverlappingRegions {
                    gpa: b.gpa,
                    size: b.size,
                    other_gpa: a.gpa,
                    space: "user",
                });
            }
        }
        let gpa_start: Vec<u64> = regions.iter().map(|r| r.gpa.raw()).collect();
        Ok(Self {
            gpa_index: StartIndex::new(&gpa_start, regions.last().map_or(0, |r| r.gpa_end())),
            gpa_start,
            gpa_end: regions.iter().map(|r| r.gpa_end()).collect(),
            host: regions.iter().map(|r| r.mapping.as_ptr() as usize).collect(),
            user_start: by_user.iter().map(|&(s, _)| s).collect(),
            user_index: by_user.iter().map(|&(_, i)| i).collect(),
            file_pages: regions.iter().any(|r| r.file_pages),
            regions,
        })
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Whether some region is a file whose pages a filesystem writes back (guest RAM in a
    /// regular file on disk, rather than shared memory or hugetlbfs). The kernel should not write
    /// into such pages through a `get_user_pages` pin (an O_DIRECT read): the `set_page_dirty`
    /// problem with file-backed memory that the review of the 2019 vhost work raised, where the
    /// filesystem does not learn in time that the page was dirtied and may write it back or
    /// reclaim it under the I/O. Devices read into such memory through the page cache instead
    /// (a copy made under ordinary page faults, which dirty the page the filesystem's way).
    pub fn has_file_pages(&self) -> bool {
        self.file_pages
    }

    /// The number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the map has no regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The index of the region holding `gpa`.
    #[inline]
    pub fn find(&self, gpa: GuestPhysAddr) -> Option<usize> {
        // A handful of regions (a usual QEMU guest has one to four) is searched directly: two
        // or three rounds cost less than the index's loads. (The branch depends on the map
        // only, so it is always predicted.)
        let i = if self.gpa_start.len() <= SEARCH_DIRECTLY {
            last_at_or_below(&self.gpa_start, gpa.raw())?
        } else {
            self.gpa_index.last_at_or_below(&self.gpa_start, gpa.raw())?
        };
        (gpa.raw() < *self.gpa_end.get(i)?).then_some(i)
    }

    /// Translates `gpa` to a host address, with how many bytes follow it in the same region.
    #[inline]
    pub fn translate(&self, gpa: GuestPhysAddr) -> Option<Translation> {
        let index = self.find(gpa)?;
        let offset = gpa.raw() - self.gpa_start[index];
        let avail = self.gpa_end[index] - gpa.raw();
        // offset < region size, which fits usize (checked in RegionSpec::validate).
        let host = self.host[index] + usize::try_from(offset).ok()?;
        Some(Translation { index, host, avail })
    }

    /// The region at `index`.
    pub fn region(&self, index: usize) -> &Arc<Region> {
        &self.regions[index]
    }

    /// The guest physical address that frontend user address `user_addr` stands for.
    pub fn user_to_gpa(&self, user_addr: UserAddr) -> Result<GuestPhysAddr, MemoryError> {
        let i = last_at_or_below(&self.user_start, user_addr.raw())
            .ok_or_else(|| MemoryError::UnmappedUser { user_addr })?;
        let r = &self.regions[usize::from(self.user_index[i])];
        let offset = user_addr
            .offset_from(r.user_addr)
            .filter(|&o| o < r.size)
            .ok_or_else(|| MemoryError::UnmappedUser { user_addr })?;
        Ok(GuestPhysAddr::new(r.gpa.raw() + offset))
    }

    /// Translates a frontend user address (what an IOTLB entry maps to) to a host address, with
    /// how many bytes follow it in the same region.
    #[inline]
    pub fn translate_user(&self, user_addr: UserAddr) -> Option<Translation> {
        let i = last_at_or_below(&self.user_start, user_addr.raw())?;
        let index = usize::from(self.user_index[i]);
        let r = &self.regions[index];
        let offset = user_addr.offset_from(r.user_addr).filter(|&o| o < r.size)?;
        let host = self.host[index] + usize::try_from(offset).ok()?;
        Some(Translation { index, host, avail: r.size - offset })
    }

    /// The index of the region exactly matching a REM_MEM_REG description.
    pub fn position(&self, gpa: GuestPhysAddr, size: u64, user_addr: UserAddr) -> Option<usize> {
        let i = self.find(gpa)?;
        let r = &self.regions[i];
        (r.gpa == gpa && r.size == size && r.user_addr == user_addr).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::{last_at_or_below, StartIndex};

    #[test]
    fn search_finds_the_last_start_at_or_below() {
        let starts = [0u64, 10, 20, 30, 40];
        for x in 0..50 {
            assert_eq!(last_at_or_below(&starts, x), Some((x / 10) as usize), "{x}");
        }
        assert_eq!(last_at_or_below(&starts[1..], 5), None);
        assert_eq!(last_at_or_below(&[], 5), None);
        assert_eq!(last_at_or_below(&[7], u64::MAX), Some(0));
    }

    /// Sorted, non-overlapping regions as (start, end) from gaps and sizes drawn over the whole
    /// 64-bit space: tiny regions next to huge gaps crowd buckets, spans reach 2^64.
    fn layout(parts: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0u64;
        for &(gap, size) in parts {
            let Some(start) = at.checked_add(gap) else { break };
            let Some(end) = start.checked_add(size.max(1)) else { break };
            out.push((start, end));
            at = end;
        }
        out
    }

    proptest::proptest! {
        /// The index finds what the plain search finds, for addresses at and around every edge
        /// and for random ones.
        #[test]
        fn start_index_agrees_with_the_plain_search(
            parts in proptest::collection::vec(
                (proptest::prop_oneof![0u64..4, 0u64..(1 << 20), 0u64..(1 << 40), 0u64..u64::MAX / 4],
                 proptest::prop_oneof![1u64..4, 1u64..(1 << 21), 1u64..(1 << 44)]),
                1..600),
            randoms in proptest::collection::vec(proptest::num::u64::ANY, 32),
        ) {
            let regions = layout(&parts);
            proptest::prop_assume!(!regions.is_empty());
            let starts: Vec<u64> = regions.iter().map(|r| r.0).collect();
            let index = StartIndex::new(&starts, regions.last().map_or(0, |r| r.1));
            proptest::prop_assert!(index.counts.len() as u64 <= StartIndex::MAX_BUCKETS + 1);
            let mut probes = randoms;
            for &(s, e) in &regions {
                probes.extend([s.wrapping_sub(1), s, s + 1, e - 1, e, e.wrapping_add(1)]);
            }
            let last_end = regions.last().map_or(0, |r| r.1);
            for x in probes {
                let plain = last_at_or_below(&starts, x);
                let want = if x < last_end { plain } else { None };
                let got = index.last_at_or_below(&starts, x);
                // Past the last end the index may stop early; what `find` makes of it is the same.
                proptest::prop_assert!(got == want || (x >= last_end && got == plain), "x {:#x}: {:?} {:?}", x, got, plain);
            }
        }
    }
}
