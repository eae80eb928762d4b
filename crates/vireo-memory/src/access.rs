//! Volatile and atomic access to guest memory.
//!
//! Guest memory is shared with an untrusted guest that may change any byte at any time, so no
//! `&T`/`&mut T` to a plain type is ever formed into it: every read and write is volatile (one
//! fetch, never repeated or elided by the compiler) or atomic, and every access is bounds checked
//! with checked arithmetic against the [`GuestSlice`] it goes through.
//!
//! Atomic accessors form a `&AtomicU16`/`&AtomicU32` for the duration of one operation. That is the
//! one reference we allow: an atomic is an `UnsafeCell`, so it asserts nothing about the value that
//! a concurrent writer could break; alignment is checked before it is formed.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering};

use bytemuck::Pod;

use crate::error::MemoryError;

/// A bounded window of guest memory that stays mapped for the lifetime `'a`.
///
/// Who guarantees the mapping lives that long is whoever handed the slice out: a batch of the
/// invalidation protocol (`protocol.rs`), which the invalidating side waits for before it retires a
/// mapping.
#[derive(Clone, Copy, Debug)]
pub struct GuestSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _mapping: PhantomData<&'a ()>,
}

// SAFETY: the slice names shared memory that every thread may access with volatile or atomic
// operations; it holds no thread-bound state.
unsafe impl Send for GuestSlice<'_> {}
// SAFETY: as for Send: all accesses through a shared GuestSlice are volatile or atomic.
unsafe impl Sync for GuestSlice<'_> {}

impl<'a> GuestSlice<'a> {
    /// A slice of no bytes (a placeholder in arrays of views; any access to it is out of bounds).
    pub const fn empty() -> Self {
        Self { ptr: NonNull::dangling(), len: 0, _mapping: PhantomData }
    }

    /// Wraps `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a mapping that stays mapped, readable and writable for `'a` (shared
    /// memory that others may change concurrently is fine: every access is volatile or atomic).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len, _mapping: PhantomData }
    }

    /// The number of bytes in the slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the first byte, for I/O submission (readv, io_uring). Using it is the
    /// caller's `unsafe`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset + len <= self.len, so the result stays inside the mapping.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(MemoryError::OutOfBounds { offset, len, size: self.len }),
        }
    }

    /// The `len` bytes at `offset`, as a slice of their own.
    pub fn subslice(&self, offset: usize, len: usize) -> Result<GuestSlice<'a>, MemoryError> {
        let p = self.check(offset, len)?;
        // SAFETY: `check` proved the range lies within this slice, which is mapped for `'a`;
        // `p` derives from a NonNull and is thus non-null.
        Ok(unsafe { GuestSlice::new(NonNull::new_unchecked(p), len) })
    }

    /// [`GuestSlice::read`] for hot loops: `None` instead of an error (no error value to build
    /// and drop), and always inlined.
    #[inline(always)]
    pub fn get<T: Pod>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(size_of::<T>())?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset + size_of::<T>() <= self.len, so the pointer stays inside the mapping.
        let p = unsafe { self.ptr.as_ptr().add(offset) };
        if !(p as usize).is_multiple_of(align_of::<T>()) {
            return self.read(offset).ok();
        }
        // SAFETY: in bounds and aligned (both checked), mapped for 'a; T is Pod so any bit
        // pattern the guest left is a valid T.
        Some(unsafe { p.cast::<T>().read_volatile() })
    }

    /// Reads a `T` at `offset` with one volatile access (or bytewise where it is misaligned).
    #[inline]
    pub fn read<T: Pod>(&self, offset: usize) -> Result<T, MemoryError> {
        let p = self.check(offset, size_of::<T>())?;
        if (p as usize).is_multiple_of(align_of::<T>()) {
            // SAFETY: in bounds (checked), aligned (checked), mapped for 'a; T is Pod so any bit
            // pattern the guest left is a valid T.
            Ok(unsafe { p.cast::<T>().read_volatile() })
        } else {
            let mut v = T::zeroed();
            let bytes = bytemuck::bytes_of_mut(&mut v);
            for (i, b) in bytes.iter_mut().enumerate() {
                // SAFETY: i < size_of::<T>() and the whole range was bounds checked.
                *b = unsafe { p.add(i).read_volatile() };
            }
            Ok(v)
        }
    }

    /// Writes a `T` at `offset` with one volatile access (or bytewise where it is misaligned).
    pub fn write<T: Pod>(&self, offset: usize, value: T) -> Result<(), MemoryError> {
        let p = self.check(offset, size_of::<T>())?;
        if (p as usize).is_multiple_of(align_of::<T>()) {
            // SAFETY: in bounds, aligned, mapped for 'a and writable.
            unsafe { p.cast::<T>().write_volatile(value) };
        } else {
            for (i, b) in bytemuck::bytes_of(&value).iter().enumerate() {
                // SAFETY: i < size_of::<T>() and the whole range was bounds checked.
                unsafe { p.add(i).write_volatile(*b) };
            }
        }
        Ok(())
    }

    fn atomic_ptr<A>(&self, offset: usize, width: usize) -> Result<*mut A, MemoryError> {
        let p = self.check(offset, width)?;
        if !(p as usize).is_multiple_of(width) {
            return Err(MemoryError::Misaligned { offset, width });
        }
        Ok(p.cast())
    }

    /// Loads a `u16` with the given ordering (Acquire for a ring index the other side publishes).
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Result<u16, MemoryError> {
        let p = self.atomic_ptr::<u16>(offset, 2)?;
        // SAFETY: aligned and in bounds (checked), mapped for 'a; see the module doc for why an
        // atomic reference into guest memory is sound.
        Ok(unsafe { AtomicU16::from_ptr(p) }.load(order))
    }

    /// Stores a `u16` with the given ordering (Release for the used index).
    pub fn store_u16(&self, offset: usize, value: u16, order: Ordering) -> Result<(), MemoryError> {
        let p = self.atomic_ptr::<u16>(offset, 2)?;
        // SAFETY: as in `load_u16`.
        unsafe { AtomicU16::from_ptr(p) }.store(value, order);
        Ok(())
    }

    /// Loads a `u32` with the given ordering.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, MemoryError> {
        let p = self.atomic_ptr::<u32>(offset, 4)?;
        // SAFETY: as in `load_u16`.
        Ok(unsafe { AtomicU32::from_ptr(p) }.load(order))
    }

    /// Stores a `u32` with the given ordering.
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), MemoryError> {
        let p = self.atomic_ptr::<u32>(offset, 4)?;
        // SAFETY: as in `load_u16`.
        unsafe { AtomicU32::from_ptr(p) }.store(value, order);
        Ok(())
    }

    /// Atomically ORs `bits` into the byte at `offset` (the dirty log's primitive).
    pub fn fetch_or_u8(&self, offset: usize, bits: u8, order: Ordering) -> Result<u8, MemoryError> {
        let p = self.atomic_ptr::<u8>(offset, 1)?;
        // SAFETY: as in `load_u16`.
        Ok(unsafe { AtomicU8::from_ptr(p) }.fetch_or(bits, order))
    }

    /// Copies `dst.len()` bytes from guest memory at `offset` into `dst`.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.check(offset, dst.len())?;
        // SAFETY: the source range is in bounds and mapped; `dst` is ordinary host memory.
        unsafe { volatile_copy_from_guest(p, dst) };
        Ok(())
    }

    /// Copies `src` into guest memory at `offset`.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> Result<(), MemoryError> {
        let p = self.check(offset, src.len())?;
        // SAFETY: the destination range is in bounds, mapped and writable.
        unsafe { volatile_copy_to_guest(src, p) };
        Ok(())
    }

    /// The sum of the `len` bytes at `offset`, each read exactly once (eight at a time): what a
    /// device that must look at every byte of a buffer (a switch forwarding a frame, the network
    /// sink) computes, without copying it out.
    pub fn byte_sum(&self, offset: usize, len: usize) -> Result<u64, MemoryError> {
        let p = self.check(offset, len)?;
        // SAFETY: the range was bounds checked; it is mapped and readable for the view's life.
        Ok(unsafe { volatile_byte_sum(p, len) })
    }

    /// Asks the CPU to bring the view's first `len` bytes into its cache (a hint: nothing is
    /// read, nothing can fault). A device about to read many buffers another core wrote (the
    /// network sink's frames) issues these first, so that the misses overlap.
    #[inline(always)]
    pub fn prefetch(&self, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let end = len.min(self.len);
            let mut off = 0;
            while off < end {
                // SAFETY: SSE, which the instruction needs, is part of the x86_64 baseline; a
                // prefetch only names an address (inside the view here), reads nothing into the
                // program and never faults.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        self.ptr.as_ptr().wrapping_add(off).cast_const().cast(),
                    );
                }
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = len;
    }

    /// [`GuestSlice::prefetch`] for a view about to be written: the lines are asked for in a state
    /// that allows the write (`prefetchw`), so that the stores do not wait for ownership.
    #[inline(always)]
    pub fn prefetch_write(&self, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let end = len.min(self.len);
            let mut off = 0;
            while off < end {
                // SAFETY: `prefetchw` only names an address (inside the view here), reads and
                // writes nothing and never faults; on a CPU without it, the encoding (0F 0D /1) is a
                // no-op.
                unsafe {
                    std::arch::asm!(
                        "prefetchw [{p}]",
                        p = in(reg) self.ptr.as_ptr().wrapping_add(off),
                        options(nostack, preserves_flags, readonly)
                    );
                }
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = len;
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemoryError> {
        let p = self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: i < len, and the range was bounds checked.
            unsafe { p.add(i).write_volatile(byte) };
        }
        Ok(())
    }
}

/// Sums `n` guest bytes from `src`: single bytes up to an 8-byte boundary, then aligned 8-byte
/// words into four 16-bit lanes (a volatile read of an unaligned word would be split into bytes
/// by the compiler), then the tail.
///
/// # Safety
/// `src..src+n` must be mapped and readable.
unsafe fn volatile_byte_sum(src: *const u8, n: usize) -> u64 {
    const LANES: u64 = 0x00ff_00ff_00ff_00ff;
    let mut total = 0u64;
    let mut i = 0;
    // SAFETY: every access is at `src + i` with `i < n` (bytes) or `i + 8 <= n` (words, at
    // 8-aligned addresses), inside the caller's range.
    unsafe {
        while i < n && !(src.add(i) as usize).is_multiple_of(8) {
            total += u64::from(src.add(i).read_volatile());
            i += 1;
        }
        while i + 8 <= n {
            // Up to 128 words per round: each adds at most 2 * 255 to a 16-bit lane.
            let end = n.min(i + 8 * 128);
            let mut lanes = 0u64;
            while i + 8 <= end {
                let w = src.add(i).cast::<u64>().read_volatile();
                lanes += (w & LANES) + ((w >> 8) & LANES);
                i += 8;
            }
            total += (lanes & 0xffff) + ((lanes >> 16) & 0xffff) + ((lanes >> 32) & 0xffff) + (lanes >> 48);
        }
        while i < n {
            total += u64::from(src.add(i).read_volatile());
            i += 1;
        }
    }
    total
}

/// Copies guest bytes into host memory, each guest byte fetched exactly once (word-wise where the
/// guest side is aligned).
///
/// # Safety
/// `src..src+dst.len()` must be mapped and readable.
unsafe fn volatile_copy_from_guest(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    let n = dst.len();
    // SAFETY: every access is at `src + i` with `i < n`, inside the caller's range.
    unsafe {
        while i < n && !(src.add(i) as usize).is_multiple_of(8) {
            dst[i] = src.add(i).read_volatile();
            i += 1;
        }
        while i + 8 <= n {
            let w = src.add(i).cast::<u64>().read_volatile();
            dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
        while i < n {
            dst[i] = src.add(i).read_volatile();
            i += 1;
        }
    }
}

/// Copies host bytes into guest memory, each guest byte stored exactly once.
///
/// # Safety
/// `dst..dst+src.len()` must be mapped and writable.
unsafe fn volatile_copy_to_guest(src: &[u8], dst: *mut u8) {
    let mut i = 0;
    let n = src.len();
    // SAFETY: every access is at `dst + i` with `i < n`, inside the caller's range.
    unsafe {
        while i < n && !(dst.add(i) as usize).is_multiple_of(8) {
            dst.add(i).write_volatile(src[i]);
            i += 1;
        }
        while i + 8 <= n {
            let mut w = [0u8; 8];
            w.copy_from_slice(&src[i..i + 8]);
            dst.add(i).cast::<u64>().write_volatile(u64::from_ne_bytes(w));
            i += 8;
        }
        while i < n {
            dst.add(i).write_volatile(src[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_slice(f: impl FnOnce(GuestSlice<'_>)) {
        let mut backing = vec![0u64; 8];
        let ptr = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `backing` outlives the closure and is 64 bytes long.
        f(unsafe { GuestSlice::new(ptr, 64) });
    }

    #[test]
    fn byte_sum_reads_every_byte_once() {
        let mut backing = vec![0u8; 4096 + 9];
        for (i, b) in backing.iter_mut().enumerate() {
            *b = u8::try_from(i * 7 % 251).unwrap();
        }
        let ptr = NonNull::new(backing.as_mut_ptr()).unwrap();
        // SAFETY: `backing` outlives the view and is as long as it says.
        let s = unsafe { GuestSlice::new(ptr, backing.len()) };
        for (off, len) in [(0, 0), (0, 1), (3, 60), (1, 4096 + 8), (0, 4096 + 9), (4000, 105)] {
            let want: u64 = backing[off..off + len].iter().map(|&b| u64::from(b)).sum();
            assert_eq!(s.byte_sum(off, len).unwrap(), want, "{off}+{len}");
        }
        assert!(s.byte_sum(4096, 10).is_err());
    }

    #[test]
    fn accesses_are_bounds_checked() {
        with_slice(|s| {
            s.write::<u64>(56, 7).unwrap();
            assert_eq!(s.read::<u64>(56).unwrap(), 7);
            assert!(matches!(s.read::<u64>(57), Err(MemoryError::OutOfBounds { offset: 57, len: 8, size: 64 })));
            assert!(s.read::<u8>(usize::MAX).is_err());
            assert!(s.subslice(60, 8).is_err());
            assert!(s.subslice(usize::MAX, 2).is_err());
            assert!(s.copy_from(60, &[1; 5]).is_err());
        });
    }

    #[test]
    fn misaligned_plain_access_works_and_atomic_access_is_refused() {
        with_slice(|s| {
            s.write::<u32>(3, 0xdead_beef).unwrap();
            assert_eq!(s.read::<u32>(3).unwrap(), 0xdead_beef);
            assert!(matches!(s.load_u16(1, Ordering::Acquire), Err(MemoryError::Misaligned { offset: 1, width: 2 })));
            s.store_u16(2, 0x1234, Ordering::Release).unwrap();
            assert_eq!(s.load_u16(2, Ordering::Acquire).unwrap(), 0x1234);
        });
    }

    #[test]
    fn copies_cross_word_boundaries_exactly() {
        with_slice(|s| {
            let src: Vec<u8> = (1..=37).collect();
            s.copy_from(5, &src).unwrap();
            let mut back = vec![0u8; 37];
            s.copy_to(5, &mut back).unwrap();
            assert_eq!(back, src);
            assert_eq!(s.read::<u8>(4).unwrap(), 0);
            assert_eq!(s.read::<u8>(42).unwrap(), 0);
        });
    }
}
