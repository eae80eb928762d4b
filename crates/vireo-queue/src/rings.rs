//! Access to a queue's three ring areas, through cached direct views or through the translating
//! path. The walking code is written once, generic over [`RingAccess`], and monomorphized for
//! both.

use std::sync::atomic::Ordering;

use bytemuck::Pod;
use vireo_memory::{Batch, GuestPhysAddr, GuestSlice, Perm};

use crate::error::QueueError;

/// Which of the three areas of a ring: for a split queue the descriptor table, the available
/// ring and the used ring; for a packed queue the descriptor ring, the driver event suppression
/// area and the device event suppression area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Area {
    Desc = 0,
    Driver = 1,
    Device = 2,
}

/// Typed, bounds-checked access to the ring areas.
pub(crate) trait RingAccess {
    fn read<T: Pod>(&self, area: Area, off: usize) -> Result<T, QueueError>;
    fn write<T: Pod>(&self, area: Area, off: usize, v: T) -> Result<(), QueueError>;
    fn load_u16(&self, area: Area, off: usize, order: Ordering) -> Result<u16, QueueError>;
    fn store_u16(&self, area: Area, off: usize, v: u16, order: Ordering) -> Result<(), QueueError>;
}

/// Where the areas are in guest memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub gpa: [GuestPhysAddr; 3],
    pub len: [u64; 3],
}

impl Layout {
    fn at(&self, area: Area, off: usize) -> GuestPhysAddr {
        GuestPhysAddr::new(self.gpa[area as usize].raw().wrapping_add(off as u64))
    }
}

/// The cached path: three direct views, valid for the batch.
///
/// Accesses are plain volatile loads and stores at `base + off` after one compare against the
/// area's length: the walkers only form offsets from indices already reduced modulo the queue
/// size or checked against it, so the compare never fails in practice, and the areas were
/// checked at least as long as the layout when the batch began (`Direct::new`).
pub(crate) struct Direct<'b> {
    base: [*mut u8; 3],
    len: [usize; 3],
    pub layout: Layout,
    _views: std::marker::PhantomData<GuestSlice<'b>>,
}

impl<'b> Direct<'b> {
    /// `None` when a cached view is shorter than the layout needs, or its host address is not
    /// aligned as the ring requires (a frontend's byte-granular `mmap_offset` can do that): then
    /// the batch translates. `align` is each area's alignment; the walkers only use offsets that
    /// are multiples of the element they access, so aligned bases keep every access aligned.
    pub fn new(views: [GuestSlice<'b>; 3], layout: Layout, align: [usize; 3]) -> Option<Self> {
        for ((v, &need), a) in views.iter().zip(layout.len.iter()).zip(align) {
            if (v.len() as u64) < need || !(v.as_ptr() as usize).is_multiple_of(a) {
                return None;
            }
        }
        Some(Self {
            base: views.map(|v| v.as_ptr()),
            len: views.map(|v| v.len()),
            layout,
            _views: std::marker::PhantomData,
        })
    }

    /// The host address of `area`'s first byte: the view behind it holds at least the layout's
    /// length of the area (checked in `new`), aligned as the ring requires, until the batch ends.
    #[inline(always)]
    pub fn base(&self, area: Area) -> *mut u8 {
        self.base[area as usize]
    }

    #[inline(always)]
    fn ptr<T>(&self, area: Area, off: usize) -> Result<*mut T, QueueError> {
        let i = area as usize;
        let p = self.base[i].wrapping_add(off);
        // Alignment holds by construction (aligned bases, element-multiple offsets; see `new`).
        debug_assert_eq!((p as usize) % align_of::<T>(), 0);
        if off.checked_add(size_of::<T>()).is_some_and(|end| end <= self.len[i]) {
            Ok(p.cast())
        } else {
            Err(self.err(area, off, size_of::<T>()))
        }
    }

    #[cold]
    fn err(&self, area: Area, off: usize, len: usize) -> QueueError {
        QueueError::mem(
            self.layout.at(area, off),
            len as u64,
            vireo_memory::MemoryError::OutOfBounds { offset: off, len, size: self.len[area as usize] },
        )
    }
}

impl RingAccess for Direct<'_> {
    #[inline(always)]
    fn read<T: Pod>(&self, area: Area, off: usize) -> Result<T, QueueError> {
        let p = self.ptr::<T>(area, off)?;
        // SAFETY: in bounds (checked in `ptr`) and aligned (by construction, see `new`; the
        // offsets the walkers use for a `T` are multiples of its alignment); the view is mapped for the batch
        // (`'b`, the batch's cached translation); T is Pod, so any bytes the guest left are a T.
        Ok(unsafe { p.read_volatile() })
    }
    #[inline(always)]
    fn write<T: Pod>(&self, area: Area, off: usize, v: T) -> Result<(), QueueError> {
        let p = self.ptr::<T>(area, off)?;
        // SAFETY: as in `read`; the rings are writable shared memory.
        unsafe { p.write_volatile(v) };
        Ok(())
    }
    #[inline(always)]
    fn load_u16(&self, area: Area, off: usize, order: Ordering) -> Result<u16, QueueError> {
        let p = self.ptr::<u16>(area, off)?;
        // SAFETY: as in `read`; an atomic reference for one operation, see vireo-memory's
        // access.rs for why that is sound on shared memory.
        Ok(unsafe { std::sync::atomic::AtomicU16::from_ptr(p) }.load(order))
    }
    #[inline(always)]
    fn store_u16(&self, area: Area, off: usize, v: u16, order: Ordering) -> Result<(), QueueError> {
        let p = self.ptr::<u16>(area, off)?;
        // SAFETY: as in `load_u16`.
        unsafe { std::sync::atomic::AtomicU16::from_ptr(p) }.store(v, order);
        Ok(())
    }
}

/// The translating path: every access looks its address up (and pins its region).
pub(crate) struct Translated<'b, 'q> {
    pub batch: &'b Batch<'q>,
    pub layout: Layout,
}

impl Translated<'_, '_> {
    #[inline]
    fn slice(&self, area: Area, off: usize, len: usize, perm: Perm) -> Result<GuestSlice<'_>, QueueError> {
        let gpa = self.layout.at(area, off);
        let in_bounds = off.checked_add(len).is_some_and(|end| end as u64 <= self.layout.len[area as usize]);
        if !in_bounds {
            return Err(QueueError::mem(
                gpa,
                len as u64,
                vireo_memory::MemoryError::OutOfBounds {
                    offset: off,
                    len,
                    size: usize::try_from(self.layout.len[area as usize]).unwrap_or(usize::MAX),
                },
            ));
        }
        self.batch.translate(gpa, len as u64, perm).map_err(|e| QueueError::mem(gpa, len as u64, e))
    }
}

impl RingAccess for Translated<'_, '_> {
    fn read<T: Pod>(&self, area: Area, off: usize) -> Result<T, QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, size_of::<T>(), Perm::READ)?
            .read(0)
            .map_err(|e| QueueError::mem(gpa, size_of::<T>() as u64, e))
    }
    fn write<T: Pod>(&self, area: Area, off: usize, v: T) -> Result<(), QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, size_of::<T>(), Perm::WRITE)?
            .write(0, v)
            .map_err(|e| QueueError::mem(gpa, size_of::<T>() as u64, e))
    }
    fn load_u16(&self, area: Area, off: usize, order: Ordering) -> Result<u16, QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, 2, Perm::READ)?.load_u16(0, order).map_err(|e| QueueError::mem(gpa, 2, e))
    }
    fn store_u16(&self, area: Area, off: usize, v: u16, order: Ordering) -> Result<(), QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, 2, Perm::WRITE)?.store_u16(0, v, order).map_err(|e| QueueError::mem(gpa, 2, e))
    }
}
