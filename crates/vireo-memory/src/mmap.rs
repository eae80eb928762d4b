//! Host mappings of guest memory and their retirement.
//!
//! A [`Mapping`] is one `mmap` of a file descriptor the frontend handed over (a memfd, a hugetlbfs
//! file or a regular file). It is retired exactly once, by the invalidating side, after the
//! invalidation protocol has proved that no reader can touch it any more (see `protocol.rs`).
//! Retirement either unmaps it or, in the test mode, replaces it by an inaccessible `PROT_NONE`
//! reservation of the same addresses, so that any late access faults instead of silently reading
//! memory that was handed back. The reservations live in a bounded quarantine, so that the number
//! of mappings stays flat however many remaps a run makes (the kernel caps a process at about 65k
//! mappings).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use rustix::mm::{MapFlags, ProtFlags};

/// What happens to a mapping once no reader can use it any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetireMode {
    /// `munmap` it: the memory goes back to the frontend at once (production).
    Unmap,
    /// Replace it with a `PROT_NONE` reservation and keep the most recent `keep` of them, so that a
    /// late access through a stale pointer faults (tests and `VIREO_RETIRE=protnone`).
    ProtNone {
        /// How many retired reservations are kept before the oldest is unmapped.
        keep: usize,
    },
}

impl RetireMode {
    /// The mode named by the `VIREO_RETIRE` environment variable: `protnone` (optionally
    /// `protnone:KEEP`) or anything else for [`RetireMode::Unmap`].
    pub fn from_env() -> Self {
        match std::env::var("VIREO_RETIRE") {
            Ok(v) if v.starts_with("protnone") => {
                let keep = v.strip_prefix("protnone:").and_then(|k| k.parse().ok()).unwrap_or(DEFAULT_QUARANTINE);
                RetireMode::ProtNone { keep }
            }
            _ => RetireMode::Unmap,
        }
    }
}

/// The default number of `PROT_NONE` reservations kept in the quarantine.
pub const DEFAULT_QUARANTINE: usize = 1024;

static LIVE_MAPPINGS: AtomicUsize = AtomicUsize::new(0);
static QUARANTINE: Mutex<VecDeque<(usize, usize)>> = Mutex::new(VecDeque::new());

/// The number of guest-memory mappings this process holds now, quarantined reservations included.
/// Leak tests compare it before and after.
pub fn live_mappings() -> usize {
    LIVE_MAPPINGS.load(Ordering::Relaxed) + quarantined_mappings()
}

/// The number of retired `PROT_NONE` reservations kept in the quarantine now.
pub fn quarantined_mappings() -> usize {
    QUARANTINE.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// The host's base page size.
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// The page size of the file behind `fd`: a hugetlbfs file's huge page size (a mapping of it must
/// start and end on huge page boundaries, and `munmap` of a length that does not refuses), the
/// base page size for everything else.
fn file_page_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let st = rustix::fs::fstatfs(fd)?;
    // The filesystem type fits i64 on every Linux ABI; the block size of hugetlbfs is its page.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    if st.f_type as i64 == HUGETLBFS_MAGIC {
        let bsize = u64::try_from(st.f_bsize).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if bsize.is_power_of_two() && bsize >= page_size() {
            return Ok(bsize);
        }
    }
    Ok(page_size())
}

/// One shared, writable mapping of part of a file descriptor.
#[derive(Debug)]
pub struct Mapping {
    /// Start of the kernel mapping (page aligned).
    map_base: NonNull<u8>,
    /// Length of the kernel mapping.
    map_len: usize,
    /// Where the requested file offset landed inside the mapping.
    data: NonNull<u8>,
    /// Length of the requested range.
    len: usize,
    retired: AtomicBool,
    /// Its registration with the SIGBUS handler (`sigbus.rs`): the frontend may shrink the file.
    guard: Option<crate::sigbus::Guard>,
}

// SAFETY: a Mapping is an address range owned by this process; nothing in it is tied to a thread.
// Accesses to the memory go through the volatile accessors, which take their own care of races.
unsafe impl Send for Mapping {}
// SAFETY: as for Send; the only mutation of the struct itself is the atomic `retired` flag.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` starting at file offset `offset`, shared and read-write.
    ///
    /// The file offset need not be page aligned (vhost-user's `mmap_offset` only promises it is a
    /// byte offset): the mapping starts at the page below it and [`Mapping::as_ptr`] points at the
    /// requested byte.
    ///
    /// A regular file (memfd, hugetlbfs, image) must hold the whole range: touching a page of a
    /// mapping beyond the end of its file raises SIGBUS, so a frontend that names more memory
    /// than its file has is refused here. A frontend that shrinks the file afterwards makes the
    /// pages past the new end fault: the mapping is registered with the SIGBUS handler
    /// (`sigbus.rs`), which absorbs the fault and marks the mapping poisoned
    /// ([`Mapping::poisoned`]).
    ///
    /// A hugetlbfs file is mapped in whole huge pages (the offset rounded down, the length up): a
    /// mapping of it that is not cannot be unmapped.
    pub fn from_fd(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile {
            let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            if end > u64::try_from(st.st_size).unwrap_or(0) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond the end of the file"));
            }
        }
        let page = file_page_size(fd)?;
        let aligned_offset = offset - offset % page;
        let lead = offset - aligned_offset;
        let map_len = lead
            .checked_add(len)
            .and_then(|l| l.checked_next_multiple_of(page))
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let len_usize = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len_usize == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses (no MAP_FIXED) cannot alias any
        // Rust object; the result is checked before use.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                fd,
                aligned_offset,
            )
        }?;
        LIVE_MAPPINGS.fetch_add(1, Ordering::Relaxed);
        let map_base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        let lead = usize::try_from(lead).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `lead` is below one page and inside the `map_len` bytes just mapped.
        let data = unsafe { map_base.add(lead) };
        let guard = crate::sigbus::register(ptr as usize, map_len, usize::try_from(page).unwrap_or(4096));
        if guard.is_none() {
            tracing::warn!("too many mappings to guard against a frontend shrinking them");
        }
        Ok(Self { map_base, map_len, data, len: len_usize, retired: AtomicBool::new(false), guard })
    }

    /// Whether the frontend shrank the file under the mapping and an access faulted past its new
    /// end (the page was replaced with a zero page; see `sigbus.rs`). The connection ends.
    pub fn poisoned(&self) -> bool {
        self.guard.as_ref().is_some_and(crate::sigbus::Guard::poisoned)
    }

    /// The host address of the first byte of the requested range.
    pub fn as_ptr(&self) -> *mut u8 {
        self.data.as_ptr()
    }

    /// The length of the requested range.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused at creation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `Mapping::retire` has run.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Gives the memory back (or fences it off, in the `PROT_NONE` mode).
    ///
    /// # Safety
    /// No thread may access the range again, and no pointer into it may be used: this is the
    /// last step of an invalidation, run after the protocol's quiesce (`GuestMemory`'s control
    /// side is the only caller). Calling it twice does nothing.
    pub(crate) unsafe fn retire(&self, mode: RetireMode) {
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(g) = &self.guard {
            g.release();
        }
        LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
        let base = self.map_base.as_ptr().cast::<c_void>();
        match mode {
            RetireMode::Unmap => unmap(base, self.map_len),
            RetireMode::ProtNone { keep } => {
                // SAFETY: MAP_FIXED over our own mapping replaces it atomically with an
                // inaccessible anonymous reservation; nothing of Rust's lives there, and the caller
                // guarantees no thread accesses the range any more. Replacing (rather than
                // mprotect) also drops the reference to the frontend's file.
                let res = unsafe {
                    rustix::mm::mmap_anonymous(
                        base,
                        self.map_len,
                        ProtFlags::empty(),
                        MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
                    )
                };
                match res {
                    Ok(_) => {
                        let mut q = QUARANTINE.lock().unwrap_or_else(|e| e.into_inner());
                        q.push_back((base as usize, self.map_len));
                        while q.len() > keep {
                            if let Some((addr, len)) = q.pop_front() {
                                unmap(addr as *mut c_void, len);
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot fence off a retired mapping; unmapping it instead");
                        unmap(base, self.map_len);
                    }
                }
            }
        }
    }
}

fn unmap(base: *mut c_void, len: usize) {
    // SAFETY: `base`/`len` describe a mapping this module created and nobody else refers to any
    // more (retired, or being dropped without ever having been retired).
    if let Err(err) = unsafe { rustix::mm::munmap(base, len) } {
        tracing::error!(%err, "munmap of guest memory failed");
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.retired.load(Ordering::Acquire) {
            LIVE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            unmap(self.map_base.as_ptr().cast(), self.map_len);
        }
    }
}

/// Creates an anonymous memory file of `len` bytes (a memfd), as a frontend does for guest RAM.
/// Used by tests, the stress demo and the userspace driver.
pub fn memfd(name: &str, len: u64) -> io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, len)?;
    Ok(fd)
}
