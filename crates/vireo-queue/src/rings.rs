//! Access to a queue's three ring areas, through cached direct views or through the translating
//! path. The walking code is written once, generic over [`RingAccess`], and monomorphized for
//! both.

use std::sync::atomic::Ordering;

use bytemuck::Pod;
use vireo_memory::{Batch, GuestPhysAddr, GuestSlice};

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
pub(crate) struct Direct<'b> {
    pub areas: [GuestSlice<'b>; 3],
    pub layout: Layout,
}

impl Direct<'_> {
    #[inline]
    fn err(&self, area: Area, off: usize, len: usize, e: vireo_memory::MemoryError) -> QueueError {
        QueueError::mem(self.layout.at(area, off), len as u64, e)
    }
}

impl RingAccess for Direct<'_> {
    #[inline]
    fn read<T: Pod>(&self, area: Area, off: usize) -> Result<T, QueueError> {
        self.areas[area as usize].read(off).map_err(|e| self.err(area, off, size_of::<T>(), e))
    }
    #[inline]
    fn write<T: Pod>(&self, area: Area, off: usize, v: T) -> Result<(), QueueError> {
        self.areas[area as usize].write(off, v).map_err(|e| self.err(area, off, size_of::<T>(), e))
    }
    #[inline]
    fn load_u16(&self, area: Area, off: usize, order: Ordering) -> Result<u16, QueueError> {
        self.areas[area as usize].load_u16(off, order).map_err(|e| self.err(area, off, 2, e))
    }
    #[inline]
    fn store_u16(&self, area: Area, off: usize, v: u16, order: Ordering) -> Result<(), QueueError> {
        self.areas[area as usize].store_u16(off, v, order).map_err(|e| self.err(area, off, 2, e))
    }
}

/// The translating path: every access looks its address up (and pins its region).
pub(crate) struct Translated<'b, 'q> {
    pub batch: &'b Batch<'q>,
    pub layout: Layout,
}

impl Translated<'_, '_> {
    #[inline]
    fn slice(&self, area: Area, off: usize, len: usize) -> Result<GuestSlice<'_>, QueueError> {
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
        self.batch.translate(gpa, len as u64).map_err(|e| QueueError::mem(gpa, len as u64, e))
    }
}

impl RingAccess for Translated<'_, '_> {
    fn read<T: Pod>(&self, area: Area, off: usize) -> Result<T, QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, size_of::<T>())?.read(0).map_err(|e| QueueError::mem(gpa, size_of::<T>() as u64, e))
    }
    fn write<T: Pod>(&self, area: Area, off: usize, v: T) -> Result<(), QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, size_of::<T>())?.write(0, v).map_err(|e| QueueError::mem(gpa, size_of::<T>() as u64, e))
    }
    fn load_u16(&self, area: Area, off: usize, order: Ordering) -> Result<u16, QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, 2)?.load_u16(0, order).map_err(|e| QueueError::mem(gpa, 2, e))
    }
    fn store_u16(&self, area: Area, off: usize, v: u16, order: Ordering) -> Result<(), QueueError> {
        let gpa = self.layout.at(area, off);
        self.slice(area, off, 2)?.store_u16(0, v, order).map_err(|e| QueueError::mem(gpa, 2, e))
    }
}
