//! The dirty log: the bitmap in which a backend records every guest page it writes while live
//! migration runs (vhost-user LOG_SHMFD; one bit per 4 KiB page of guest physical memory, bit
//! `page % 8` of byte `page / 8`, set with an atomic OR because the frontend clears bits
//! concurrently).
//!
//! Writers batch their bits in a per-queue [`LogCache`] and flush it before the used index that
//! exposes the writes is published (the device writes data, then logs it, then publishes it: a
//! page logged before it is written could be copied by the migration thread before the write and
//! its bit cleared, losing the write; the 2019 kernel series had exactly that bug).

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use crate::access::GuestSlice;
use crate::addr::{GuestPhysAddr, LOG_PAGE_SIZE};
use crate::error::MemoryError;
use crate::mmap::Mapping;
use crate::protocol::RegionTag;

/// A mapped dirty-log bitmap.
#[derive(Debug)]
pub struct DirtyLog {
    pub(crate) tag: RegionTag,
    pub(crate) mapping: Mapping,
}

impl DirtyLog {
    /// Maps `size` bytes of `fd` at `offset` as the log (SET_LOG_BASE's payload).
    pub(crate) fn map(fd: BorrowedFd<'_>, offset: u64, size: u64, tag: RegionTag) -> Result<Self, MemoryError> {
        let mapping =
            Mapping::from_fd(fd, offset, size).map_err(|source| MemoryError::MapLog { size, offset, source })?;
        Ok(Self { tag, mapping })
    }

    /// The size of the bitmap in bytes.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: an empty log is refused when mapped.
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// The number of guest pages the log covers.
    pub fn pages(&self) -> u64 {
        self.mapping.len() as u64 * 8
    }

    fn bytes(&self) -> GuestSlice<'_> {
        // SAFETY: the mapping lives as long as `self`; it is retired only after the protocol has
        // quiesced every reader pinning the log's slot, and callers reach the log through such a
        // pin (`Batch`) or own it outright (tests).
        unsafe { GuestSlice::new(std::ptr::NonNull::new_unchecked(self.mapping.as_ptr()), self.mapping.len()) }
    }

    /// ORs `mask` into byte `index` of the bitmap.
    pub(crate) fn or_byte(&self, index: u64, mask: u8) -> Result<(), MemoryError> {
        let offset = usize::try_from(index)
            .map_err(|_| MemoryError::BeyondLog { page: index * 8, log_bytes: self.len() as u64 })?;
        // Release: the guest data write this bit stands for happens-before a migration thread
        // that reads the bit with Acquire (QEMU uses an atomic exchange) and then copies the page.
        self.bytes()
            .fetch_or_u8(offset, mask, Ordering::Release)
            .map(|_| ())
            .map_err(|_| MemoryError::BeyondLog { page: index * 8, log_bytes: self.len() as u64 })
    }

    /// Whether the bit of guest page `page` is set (tests).
    pub fn is_dirty(&self, page: u64) -> bool {
        let Ok(offset) = usize::try_from(page / 8) else { return false };
        self.bytes().read::<u8>(offset).map(|b| b & (1 << (page % 8)) != 0).unwrap_or(false)
    }

    /// Reads and clears byte `index` (what a migration thread does; tests).
    pub fn take_byte(&self, index: usize) -> u8 {
        // A CAS loop on the byte: clear exactly what was read.
        let s = self.bytes();
        loop {
            let Ok(old) = s.read::<u8>(index) else { return 0 };
            if old == 0 {
                return 0;
            }
            let Ok(p) = s.subslice(index, 1) else { return 0 };
            // SAFETY: one aligned, in-bounds byte of the mapping (subslice checked it).
            let cell = unsafe { std::sync::atomic::AtomicU8::from_ptr(p.as_ptr()) };
            if cell.compare_exchange(old, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return old;
            }
        }
    }
}

/// Bits waiting to be ORed into the log, per queue. Adjacent pages of one batch share bytes, so
/// most writes cost a compare, not an atomic.
#[derive(Debug, Default)]
pub struct LogCache {
    entries: Vec<(u64, u8)>,
    /// Flushes that set bits, ever (what a SET_LOG_FD eventfd is kicked for).
    flushes: u64,
}

/// How many distinct log bytes a cache holds before it flushes on its own.
pub const LOG_CACHE_ENTRIES: usize = 32;

impl LogCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self { entries: Vec::with_capacity(LOG_CACHE_ENTRIES), flushes: 0 }
    }

    /// Records a write of `len` bytes at `gpa`; flushes into `log` when the cache is full.
    pub fn add(&mut self, gpa: GuestPhysAddr, len: u64, log: &DirtyLog) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let first = gpa.raw() / LOG_PAGE_SIZE;
        let last = gpa.raw().checked_add(len - 1).ok_or_else(|| MemoryError::Unmapped { gpa, len })? / LOG_PAGE_SIZE;
        if last >= log.pages() {
            return Err(MemoryError::BeyondLog { page: last, log_bytes: log.len() as u64 });
        }
        for page in first..=last {
            let (byte, bit) = (page / 8, 1u8 << (page % 8));
            if let Some(e) = self.entries.iter_mut().rev().find(|e| e.0 == byte) {
                e.1 |= bit;
                continue;
            }
            if self.entries.len() == LOG_CACHE_ENTRIES {
                self.flush(log)?;
            }
            self.entries.push((byte, bit));
        }
        Ok(())
    }

    /// ORs every cached bit into `log`.
    pub fn flush(&mut self, log: &DirtyLog) -> Result<(), MemoryError> {
        if !self.entries.is_empty() {
            self.flushes = self.flushes.wrapping_add(1);
        }
        for (byte, mask) in self.entries.drain(..) {
            log.or_byte(byte, mask)?;
        }
        Ok(())
    }

    /// How many flushes have set bits so far.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Whether bits are waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
