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

/// The sum of the eight bytes of `w`: pairs of bytes into four 16-bit lanes (each at most
/// 510), and the lanes summed into the top one by a multiply (at most 2,040: no carry out).
#[inline(always)]
fn word_byte_sum(w: u64) -> u64 {
    const LANES: u64 = 0x00ff_00ff_00ff_00ff;
    let lanes = (w & LANES) + ((w >> 8) & LANES);
    lanes.wrapping_mul(0x0001_0001_0001_0001) >> 48
}

/// One aligned volatile read of a `$t` at `src + *i` if `$cond`, its bytes summed into `total`.
macro_rules! sum_step {
    ($src:expr, $i:expr, $n:expr, $total:expr, $t:ty, $cond:expr) => {
        let size = std::mem::size_of::<$t>();
        if *$i + size <= $n && $cond(($src.wrapping_add(*$i) as usize), size) {
            // SAFETY: `size` bytes at `src + i` with `i + size <= n`, inside the caller's range;
            // the callers' conditions make the address `size`-aligned (see them).
            let v = unsafe { $src.add(*$i).cast::<$t>().read_volatile() };
            $total += word_byte_sum(u64::from(v));
            *$i += size;
        }
    };
}

/// The head of a sum: aligned reads of 1, 2, 4 and 8 bytes, each where the address has that
/// bit set, bring `src + *i` to a 16-byte boundary, or stop at the first size for which too few
/// bytes are left (the address is then aligned to that size, and fewer bytes are left than it).
///
/// # Safety
/// `src..src+n` must be mapped and readable.
#[inline(always)]
unsafe fn byte_sum_head(src: *const u8, n: usize, i: &mut usize) -> u64 {
    let mut total = 0u64;
    // Every lower bit is clear once the steps before this one ran: the address is aligned to
    // `size`.
    let bit_set = |a: usize, size: usize| a & size != 0;
    sum_step!(src, i, n, total, u8, bit_set);
    sum_step!(src, i, n, total, u16, bit_set);
    sum_step!(src, i, n, total, u32, bit_set);
    sum_step!(src, i, n, total, u64, bit_set);
    total
}

/// The tail of a sum, fewer than 16 bytes from an address aligned to a size larger than them
/// (see [`byte_sum_head`]): reads of 8, 4, 2 and 1 bytes, each where that many are left. Each
/// leaves the address aligned to the next, smaller size.
///
/// # Safety
/// `src..src+n` must be mapped and readable.
#[inline(always)]
unsafe fn byte_sum_tail(src: *const u8, n: usize, i: &mut usize) -> u64 {
    let mut total = 0u64;
    let always = |_: usize, _: usize| true;
    sum_step!(src, i, n, total, u64, always);
    sum_step!(src, i, n, total, u32, always);
    sum_step!(src, i, n, total, u16, always);
    sum_step!(src, i, n, total, u8, always);
    total
}

/// Sums `n` guest bytes from `src`, each read exactly once and by an aligned read (a volatile
/// read of an unaligned word would be split into bytes by the compiler): a head of at most four
/// reads to a 16-byte boundary, aligned 16-byte reads summed with `psadbw` (x86_64) or 8-byte
/// ones (elsewhere), and a tail of at most four reads.
///
/// # Safety
/// `src..src+n` must be mapped and readable.
unsafe fn volatile_byte_sum(src: *const u8, n: usize) -> u64 {
    let mut i = 0;
    // SAFETY: the caller's range.
    let mut total = unsafe { byte_sum_head(src, n, &mut i) };
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_add_epi64, _mm_sad_epu8, _mm_setzero_si128, _mm_storeu_si128};
        // SAFETY: SSE2 is part of the x86_64 baseline. While 16 bytes are left the head has
        // brought `src + i` to a 16-byte boundary, so each read is 16 aligned bytes with
        // `i + 16 <= n`, inside the caller's range, and one load.
        unsafe {
            let zero = _mm_setzero_si128();
            let mut acc = zero;
            while i + 16 <= n {
                let v = src.add(i).cast::<__m128i>().read_volatile();
                // Two sums of eight bytes, one in each 64-bit half.
                acc = _mm_add_epi64(acc, _mm_sad_epu8(v, zero));
                i += 16;
            }
            let mut halves = [0u64; 2];
            _mm_storeu_si128(halves.as_mut_ptr().cast(), acc);
            total += halves[0] + halves[1];
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: while 16 bytes are left the head has brought `src + i` to a 16-byte boundary:
    // each read is 8 aligned bytes with `i + 8 <= n`, inside the caller's range.
    unsafe {
        while i + 8 <= n {
            total += word_byte_sum(src.add(i).cast::<u64>().read_volatile());
            i += 8;
        }
    }
    // SAFETY: the caller's range; the address is aligned as the tail needs (the loop above
    // stopped at a 16-byte boundary with fewer than 16 bytes left (or 8, elsewhere), or the head
    // stopped with fewer bytes left than the size it is aligned to).
    total += unsafe { byte_sum_tail(src, n, &mut i) };
    debug_assert_eq!(i, n, "every byte read");
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

/// One aligned volatile store of a `$t` from `src[*i..]` to `dst + *i` if `$cond`.
macro_rules! store_step {
    ($src:expr, $dst:expr, $i:expr, $t:ty, $cond:expr) => {
        let size = std::mem::size_of::<$t>();
        if *$i + size <= $src.len() && $cond(($dst.wrapping_add(*$i) as usize), size) {
            let mut bytes = [0u8; std::mem::size_of::<$t>()];
            bytes.copy_from_slice(&$src[*$i..*$i + size]);
            // SAFETY: `size` bytes at `dst + i` with `i + size <= src.len()`, inside the caller's
            // range; the callers' conditions make the address `size`-aligned (as for the sums).
            unsafe { $dst.add(*$i).cast::<$t>().write_volatile(<$t>::from_ne_bytes(bytes)) };
            *$i += size;
        }
    };
}

/// Copies host bytes into guest memory, each guest byte stored exactly once and by an aligned
/// store: a head of at most four stores to a 16-byte boundary, aligned 16-byte stores (x86_64)
/// or 8-byte ones (elsewhere), and a tail of at most four (the shape of `volatile_byte_sum`).
///
/// # Safety
/// `dst..dst+src.len()` must be mapped and writable.
unsafe fn volatile_copy_to_guest(src: &[u8], dst: *mut u8) {
    let n = src.len();
    if let [byte] = src {
        // One byte (a block request's status): one store, without the head and tail's steps.
        // SAFETY: `dst` is the caller's range of one byte.
        unsafe { dst.write_volatile(*byte) };
        return;
    }
    let mut i = 0usize;
    let i = &mut i;
    // The head, as `byte_sum_head`'s.
    let bit_set = |a: usize, size: usize| a & size != 0;
    store_step!(src, dst, i, u8, bit_set);
    store_step!(src, dst, i, u16, bit_set);
    store_step!(src, dst, i, u32, bit_set);
    store_step!(src, dst, i, u64, bit_set);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128};
        // SAFETY: SSE2 is part of the x86_64 baseline. While 16 bytes are left the head has
        // brought `dst + i` to a 16-byte boundary: each store is 16 aligned bytes with
        // `i + 16 <= n`, inside the caller's range, and one instruction; the load reads
        // `src[i..i + 16]`, inside the slice, unaligned.
        unsafe {
            while *i + 16 <= n {
                let v = _mm_loadu_si128(src.as_ptr().add(*i).cast());
                dst.add(*i).cast::<__m128i>().write_volatile(v);
                *i += 16;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    while *i + 8 <= n {
        store_step!(src, dst, i, u64, |_: usize, _: usize| true);
    }
    // The tail, as `byte_sum_tail`'s.
    let always = |_: usize, _: usize| true;
    store_step!(src, dst, i, u64, always);
    store_step!(src, dst, i, u32, always);
    store_step!(src, dst, i, u16, always);
    store_step!(src, dst, i, u8, always);
    debug_assert_eq!(*i, n, "every byte stored");
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
            // Runs of 255 (the largest sums) among other values.
            *b = if i % 97 < 40 { 255 } else { u8::try_from(i * 7 % 251).unwrap() };
        }
        let ptr = NonNull::new(backing.as_mut_ptr()).unwrap();
        // SAFETY: `backing` outlives the view and is as long as it says.
        let s = unsafe { GuestSlice::new(ptr, backing.len()) };
        let sum = |off: usize, len: usize| backing[off..off + len].iter().map(|&b| u64::from(b)).sum::<u64>();
        for (off, len) in [(0, 0), (0, 1), (3, 60), (1, 4096 + 8), (0, 4096 + 9), (4000, 105)] {
            assert_eq!(s.byte_sum(off, len).unwrap(), sum(off, len), "{off}+{len}");
        }
        // Every alignment of the start against every length through a head, a 16-byte part
        // and a tail.
        for off in 0..48 {
            for len in 0..100 {
                assert_eq!(s.byte_sum(off, len).unwrap(), sum(off, len), "{off}+{len}");
            }
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

    /// Every alignment of the destination against every length through a head, a 16-byte part
    /// and a tail: exactly the bytes asked for change.
    #[test]
    fn copies_into_guest_memory_at_every_alignment() {
        let mut backing = vec![0u8; 256];
        let ptr = NonNull::new(backing.as_mut_ptr()).unwrap();
        // SAFETY: `backing` outlives the view and is as long as it says.
        let s = unsafe { GuestSlice::new(ptr, 256) };
        for off in 0..48 {
            for len in 0..100 {
                s.fill(0, 256, 0xee).unwrap();
                let src: Vec<u8> = (0..len).map(|k| u8::try_from(k % 200).unwrap() + 1).collect();
                s.copy_from(off, &src).unwrap();
                let mut back = vec![0u8; 256];
                s.copy_to(0, &mut back).unwrap();
                assert!(back[..off].iter().all(|&b| b == 0xee), "{off}+{len}: before");
                assert_eq!(&back[off..off + len], &src[..], "{off}+{len}");
                assert!(back[off + len..].iter().all(|&b| b == 0xee), "{off}+{len}: after");
            }
        }
    }
}
