//! Memory a frontend can shrink under us.
//!
//! Guest RAM, the dirty log and the inflight area are `mmap`s of files the frontend handed over.
//! A file is checked to hold the whole range when it is mapped (`Mapping::from_fd`), but nothing
//! stops the frontend from `ftruncate`-ing it afterwards (a memfd sealed with `F_SEAL_SHRINK`
//! cannot be, and QEMU's memfd backend seals by default; DPDK's and hugetlbfs files are not). A
//! page past the new end raises SIGBUS on the first access, in whichever thread touches it: a
//! worker in a batch, or the control thread. Killing the daemon for it would let one frontend stop
//! every other connection, so the signal is caught:
//!
//! * every mapping of a frontend's file is registered here (`register`) with its range and page
//!   size, in a fixed table the handler reads without locks;
//! * on SIGBUS inside a registered range the handler maps an anonymous zero page (a huge page for
//!   a hugetlbfs mapping) over the faulting page with `MAP_FIXED`, marks the range poisoned, and
//!   returns: the access repeats and finds memory. The data is garbage to the guest (zeros, or
//!   what was written there since), which is the frontend's doing;
//! * the connection checks its mappings (`GuestMemory::poisoned`) between messages and at least
//!   every 200 ms, and ends with an error: the frontend that shrank its memory is cut off, the
//!   next one is served;
//! * a SIGBUS anywhere else is not ours: the previous disposition (Rust's stack-overflow handler,
//!   or the default) is put back and the fault repeats under it.
//!
//! The kernel's own accesses to such pages (io_uring, `readv` into a tap) fail with EFAULT and
//! need none of this. Retirement unregisters a mapping before it is unmapped: no thread accesses it
//! afterwards, so no handler runs for it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Mutex, OnceLock};

/// How many mappings can be registered at once: regions (509 per connection, two tables while one
/// replaces the other), dirty logs and inflight areas, for several connections.
const SLOTS: usize = 4096;

struct Slot {
    /// First address, 0 while the slot is free.
    start: AtomicUsize,
    end: AtomicUsize,
    /// The mapping's page size (what an anonymous page put over a fault must cover).
    page: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below, never used as a value
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Serializes registrations (the handler only reads).
static REGISTER: Mutex<()> = Mutex::new(());
/// How many faults the handler has absorbed, in all.
static POISONINGS: AtomicU64 = AtomicU64::new(0);

/// The disposition found when the handler was installed.
struct Previous(libc::sigaction);
// SAFETY: written once before the handler can run, read-only afterwards; a plain C struct.
unsafe impl Sync for Previous {}
// SAFETY: as above.
unsafe impl Send for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// A registered range; unregistered by [`Guard::release`] or when dropped.
#[derive(Debug)]
pub(crate) struct Guard {
    index: usize,
    released: AtomicBool,
    /// Kept once released (the slot may serve another range by then).
    poisoned: AtomicBool,
}

impl Guard {
    /// Whether a fault was absorbed in the range (the frontend shrank the file).
    pub(crate) fn poisoned(&self) -> bool {
        if self.released.load(Acquire) {
            return self.poisoned.load(Relaxed);
        }
        TABLE[self.index].poisoned.load(Acquire)
    }

    /// Unregisters the range (before it is unmapped); idempotent.
    pub(crate) fn release(&self) {
        let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        if self.released.swap(true, Relaxed) {
            return;
        }
        let s = &TABLE[self.index];
        self.poisoned.store(s.poisoned.load(Acquire), Relaxed);
        s.start.store(0, Release);
        s.end.store(0, Relaxed);
        s.poisoned.store(false, Relaxed);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Registers `[start, start + len)`, a mapping of a frontend's file with pages of `page` bytes,
/// installing the handler on first use. `None` when the table is full (the mapping then goes
/// unguarded: logged, not refused, as it was before this existed).
pub(crate) fn register(start: usize, len: usize, page: usize) -> Option<Guard> {
    install();
    let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    let index = TABLE.iter().position(|s| s.start.load(Relaxed) == 0)?;
    let s = &TABLE[index];
    s.poisoned.store(false, Relaxed);
    s.page.store(page.max(1), Relaxed);
    s.end.store(start.saturating_add(len), Relaxed);
    // Release: a handler that sees `start` sees the rest.
    s.start.store(start, Release);
    Some(Guard { index, released: AtomicBool::new(false), poisoned: AtomicBool::new(false) })
}

/// Faults absorbed so far (tests).
pub fn poisonings() -> u64 {
    POISONINGS.load(Acquire)
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed struct, our handler and SA_SIGINFO (the handler takes
        // the siginfo); the previous disposition is kept for faults that are not ours. Both
        // structs live across the call.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &act, &mut prev) == 0 {
                let _ = PREVIOUS.set(Previous(prev));
            } else {
                tracing::warn!("cannot install the SIGBUS handler: a frontend that shrinks its memory can kill vireo");
            }
        }
    });
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap` and `sigaction` only.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a signal delivered with SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &TABLE {
        let start = s.start.load(Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Relaxed) {
            continue;
        }
        let page = s.page.load(Relaxed);
        let at = addr - addr % page;
        // SAFETY: `at..at + page` lies in a mapping of a frontend's file that this process made and
        // registered (its page size is the mapping's, so the range is one whole page of it); no
        // Rust object lives there, only guest memory accessed through raw pointers. MAP_FIXED
        // replaces that page with anonymous zeroed memory, which the faulting access then finds.
        let r = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            s.poisoned.store(true, Release);
            POISONINGS.fetch_add(1, Release);
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): the previous disposition takes the fault,
    // which repeats when this returns.
    // SAFETY: restoring a disposition obtained from sigaction itself (or the default).
    unsafe {
        match PREVIOUS.get() {
            Some(p) => libc::sigaction(libc::SIGBUS, &p.0, std::ptr::null_mut()),
            None => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut())
            }
        };
    }
}
