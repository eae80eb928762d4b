//! Guest RAM for a driver living in this process: memfd regions it maps itself.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vireo_memory::mmap::Mapping;
use vireo_memory::{GuestPhysAddr, GuestSlice, RegionSpec, UserAddr};

/// Errors of guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The memfd could not be created or mapped.
    #[error("guest RAM: {0}")]
    Io(#[from] std::io::Error),
    /// The allocator ran out of RAM.
    #[error("guest RAM exhausted: {want} bytes wanted, {left} left")]
    Exhausted {
        /// Bytes asked for.
        want: u64,
        /// Bytes left.
        left: u64,
    },
    /// An address outside guest RAM.
    #[error("guest address {gpa} (+{len}) is outside guest RAM")]
    Outside {
        /// The address.
        gpa: GuestPhysAddr,
        /// The length.
        len: u64,
    },
}

struct Region {
    gpa: u64,
    size: u64,
    fd: OwnedFd,
    map: Mapping,
}

/// Guest RAM: one or more memfd regions at chosen guest physical addresses, mapped here, with a
/// bump allocator for rings and buffers.
pub struct GuestRam {
    regions: Vec<Region>,
    next: u64,
    alloc_region: usize,
    /// What the device sees a guest physical address as: behind the driver's vIOMMU, IOVA =
    /// GPA + this offset; 0 without one.
    dma_offset: u64,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("regions", &self.regions.len()).field("next", &self.next).finish()
    }
}

impl GuestRam {
    /// RAM made of regions `(gpa, size)`; allocation starts in the first.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, RamError> {
        Self::with_pages(layout, false)
    }

    /// As [`GuestRam::new`], backed by huge pages (hugetlbfs memfds) when `huge` is set; the
    /// region sizes must then be multiples of the huge page size and enough pages reserved.
    pub fn with_pages(layout: &[(u64, u64)], huge: bool) -> Result<Self, RamError> {
        let mut regions = Vec::with_capacity(layout.len());
        for &(gpa, size) in layout {
            let fd = if huge {
                let fd = rustix::fs::memfd_create(
                    "vireo-guest-ram-huge",
                    rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::HUGETLB,
                )
                .map_err(std::io::Error::from)?;
                rustix::fs::ftruncate(&fd, size).map_err(std::io::Error::from)?;
                fd
            } else {
                vireo_memory::memfd("vireo-guest-ram", size)?
            };
            let map = Mapping::from_fd(fd.as_fd(), 0, size)?;
            regions.push(Region { gpa, size, fd, map });
        }
        let next = regions.first().map_or(0, |r| r.gpa);
        Ok(Self { regions, next, alloc_region: 0, dma_offset: 0 })
    }

    /// One region of `size` bytes at guest physical address 0.
    pub fn single(size: u64) -> Result<Self, RamError> {
        Self::new(&[(0, size)])
    }

    /// The regions as a backend receives them (SET_MEM_TABLE), with user addresses equal to the
    /// driver's own mapping addresses, as QEMU does.
    pub fn specs(&self) -> Vec<RegionSpec<'_>> {
        self.regions
            .iter()
            .map(|r| RegionSpec {
                gpa: GuestPhysAddr::new(r.gpa),
                size: r.size,
                user_addr: UserAddr::new(r.map.as_ptr() as u64),
                fd: r.fd.as_fd(),
                fd_offset: 0,
            })
            .collect()
    }

    /// The address the device is given for `gpa`: the GPA itself, or its IOVA behind the
    /// driver's vIOMMU.
    pub fn dma(&self, gpa: GuestPhysAddr) -> u64 {
        gpa.raw().wrapping_add(self.dma_offset)
    }

    /// Puts every address the device is given at `offset` above its guest physical address
    /// (the driver acting as a vIOMMU with a fixed IOVA layout).
    pub fn set_dma_offset(&mut self, offset: u64) {
        self.dma_offset = offset;
    }

    /// Whether the device is given IOVAs (a DMA offset is set).
    pub fn behind_iommu(&self) -> bool {
        self.dma_offset != 0
    }

    /// The region holding the IOVA `iova` (behind the vIOMMU): its IOVA, size and user address.
    pub fn iova_region(&self, iova: u64) -> Option<(u64, u64, u64)> {
        let gpa = iova.checked_sub(self.dma_offset)?;
        let r = self.regions.iter().find(|r| r.gpa <= gpa && gpa < r.gpa + r.size)?;
        Some((r.gpa + self.dma_offset, r.size, r.map.as_ptr() as u64))
    }

    /// The driver's own address of guest address `gpa` (vhost-user's "user address", which
    /// SET_VRING_ADDR speaks in).
    pub fn user_addr(&self, gpa: GuestPhysAddr) -> Result<u64, RamError> {
        let r = self
            .regions
            .iter()
            .find(|r| r.gpa <= gpa.raw() && gpa.raw() < r.gpa + r.size)
            .ok_or_else(|| RamError::Outside { gpa, len: 0 })?;
        Ok(r.map.as_ptr() as u64 + (gpa.raw() - r.gpa))
    }

    /// Each region's guest address, size and file (for a peer that maps the same memory itself).
    pub fn files(&self) -> Vec<(GuestPhysAddr, u64, std::os::fd::BorrowedFd<'_>)> {
        self.regions.iter().map(|r| (GuestPhysAddr::new(r.gpa), r.size, r.fd.as_fd())).collect()
    }

    /// The memory table a frontend sends for this RAM (SET_MEM_TABLE): each region with the
    /// driver's own address of it as the user address, and a duplicate of its file to pass.
    pub fn mem_table(&self) -> Result<(Vec<VhostUserMemoryRegion>, Vec<std::fs::File>), RamError> {
        let mut regions = Vec::with_capacity(self.regions.len());
        let mut files = Vec::with_capacity(self.regions.len());
        for (gpa, size, fd) in self.files() {
            regions.push(VhostUserMemoryRegion::new(gpa.raw(), size, self.user_addr(gpa)?, 0));
            files.push(std::fs::File::from(fd.try_clone_to_owned()?));
        }
        Ok((regions, files))
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed. An allocation may run
    /// on into the next region when the two are adjacent in guest physical memory (a ring that
    /// straddles two regions, as a guest may place it); otherwise it moves on to the next region.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestPhysAddr, RamError> {
        loop {
            let Some(r) = self.regions.get(self.alloc_region) else {
                return Err(RamError::Exhausted { want: len, left: 0 });
            };
            let start = self.next.max(r.gpa).div_ceil(align) * align;
            if start < r.gpa + r.size && self.covered(start, len) {
                self.next = start + len;
                let gpa = GuestPhysAddr::new(start);
                let n = usize::try_from(len).map_err(|_| RamError::Outside { gpa, len })?;
                self.write(gpa, &vec![0u8; n])?;
                return Ok(gpa);
            }
            self.alloc_region += 1;
            match self.regions.get(self.alloc_region) {
                Some(n) => self.next = n.gpa,
                None => return Err(RamError::Exhausted { want: len, left: 0 }),
            }
        }
    }

    fn covered(&self, start: u64, len: u64) -> bool {
        let mut at = start;
        let Some(end) = start.checked_add(len) else { return false };
        while at < end {
            match self.regions.iter().find(|r| r.gpa <= at && at < r.gpa + r.size) {
                Some(r) => at = r.gpa + r.size,
                None => return false,
            }
        }
        true
    }

    /// Moves allocation to guest address `gpa` (to place things at the end of a region, say).
    pub fn alloc_at(&mut self, gpa: GuestPhysAddr) -> Result<(), RamError> {
        let i = self
            .regions
            .iter()
            .position(|r| r.gpa <= gpa.raw() && gpa.raw() < r.gpa + r.size)
            .ok_or_else(|| RamError::Outside { gpa, len: 0 })?;
        self.alloc_region = i;
        self.next = gpa.raw();
        Ok(())
    }

    /// A view of `len` bytes at `gpa`, which must lie in one region.
    pub fn slice(&self, gpa: GuestPhysAddr, len: u64) -> Result<GuestSlice<'_>, RamError> {
        let r = self
            .regions
            .iter()
            .find(|r| r.gpa <= gpa.raw() && gpa.raw().checked_add(len).is_some_and(|e| e <= r.gpa + r.size))
            .ok_or_else(|| RamError::Outside { gpa, len })?;
        let off = usize::try_from(gpa.raw() - r.gpa).map_err(|_| RamError::Outside { gpa, len })?;
        let len = usize::try_from(len).map_err(|_| RamError::Outside { gpa, len })?;
        // SAFETY: the range lies inside the region's mapping (checked above), which lives as long
        // as `self`; the slice borrows `self`.
        Ok(unsafe { GuestSlice::new(NonNull::new_unchecked(r.map.as_ptr().add(off)), len) })
    }

    /// Writes `data` at `gpa` (which may span regions).
    pub fn write(&self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), RamError> {
        self.each_piece(gpa, data.len() as u64, |s, at| {
            s.copy_from(0, &data[at..at + s.len()]).map_err(|_| RamError::Outside { gpa, len: data.len() as u64 })
        })
    }

    /// Reads `out.len()` bytes at `gpa` (which may span regions).
    pub fn read(&self, gpa: GuestPhysAddr, out: &mut [u8]) -> Result<(), RamError> {
        let len = out.len() as u64;
        self.each_piece(gpa, len, |s, at| {
            let n = s.len();
            s.copy_to(0, &mut out[at..at + n]).map_err(|_| RamError::Outside { gpa, len })
        })
    }

    fn each_piece(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        mut f: impl FnMut(GuestSlice<'_>, usize) -> Result<(), RamError>,
    ) -> Result<(), RamError> {
        let mut done = 0u64;
        while done < len {
            let at = gpa.raw() + done;
            let r = self
                .regions
                .iter()
                .find(|r| r.gpa <= at && at < r.gpa + r.size)
                .ok_or_else(|| RamError::Outside { gpa, len })?;
            let n = (r.gpa + r.size - at).min(len - done);
            let at_buf = usize::try_from(done).map_err(|_| RamError::Outside { gpa, len })?;
            f(self.slice(GuestPhysAddr::new(at), n)?, at_buf)?;
            done += n;
        }
        Ok(())
    }
}
