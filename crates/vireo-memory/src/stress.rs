//! The remap-under-load workload: worker threads process batches through cached and pinned
//! pointers while the control thread changes the memory map over and over (a new memory table
//! remapping the same memfds at new addresses, alternating with removal and re-addition of a
//! region). Every access increments a counter in guest memory, so the files themselves say
//! whether an access was lost or went astray; in the `PROT_NONE` retirement mode a late access
//! through a stale pointer faults and ends the process.
//!
//! Used by `tests/stress_remap.rs` (which asserts on the report) and by `vireo memory-demo`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::addr::{GuestPhysAddr, UserAddr};
use crate::error::MemoryError;
use crate::guest::GuestMemory;
use crate::map::RegionSpec;
use crate::mmap::{memfd, RetireMode};

const RING_BASE: u64 = 0;
const BUF_BASE: u64 = 1 << 20;
const SIZE_BYTES: usize = 256 << 10;
const SIZE: u64 = SIZE_BYTES as u64;
const RING_USER: u64 = 0x7000_0000_0000;
const BUF_USER: u64 = 0x7100_0000_0000;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct StressConfig {
    /// Worker threads (each one queue), at most 64.
    pub workers: usize,
    /// Memory map changes to make.
    pub remaps: u64,
    /// What happens to retired mappings.
    pub retire: RetireMode,
}

/// What one worker did.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerReport {
    /// Increments of its ring counter (every batch makes one).
    pub ring_incs: u64,
    /// Increments of its buffer counter.
    pub buf_incs: u64,
    /// Batches served by the cached translation.
    pub cached_batches: u64,
    /// Batches that fell back to the translating path.
    pub translating_batches: u64,
    /// Buffer accesses that found the buffer region removed (between REM and ADD).
    pub buf_absent: u64,
    /// The counters as read back from the memfds.
    pub ring_in_memory: u64,
    /// See `ring_in_memory`.
    pub buf_in_memory: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct StressReport {
    /// Memory map changes made.
    pub remaps: u64,
    /// Wall time of the remap loop.
    pub elapsed: Duration,
    /// Per worker.
    pub workers: Vec<WorkerReport>,
    /// Invalidation time (start to end), median and 99th percentile.
    pub invalidation_p50: Duration,
    /// See `invalidation_p50`.
    pub invalidation_p99: Duration,
    /// Resident memory and mapping count after warm-up and at the end.
    pub rss_warm: u64,
    /// See `rss_warm`.
    pub rss_end: u64,
    /// See `rss_warm`.
    pub maps_warm: usize,
    /// See `rss_warm`.
    pub maps_end: usize,
    /// Offsets of bytes that changed although no worker owns them (misdirected writes).
    pub stray_writes: Vec<u64>,
}

impl StressReport {
    /// Whether every counter in memory matches what its worker did and nothing else changed.
    pub fn consistent(&self) -> bool {
        self.stray_writes.is_empty()
            && self.workers.iter().all(|w| w.ring_in_memory == w.ring_incs && w.buf_in_memory == w.buf_incs)
    }
}

/// Errors of the workload's own set-up (the memory operations themselves must not fail).
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// Creating or reading the memfds failed.
    #[error("stress workload I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A memory map change was refused.
    #[error("memory map change refused: {0}")]
    Memory(#[from] MemoryError),
    /// A worker thread panicked.
    #[error("a worker thread panicked")]
    Worker,
}

fn spec(fd: &OwnedFd, gpa: u64, user: u64) -> RegionSpec<'_> {
    RegionSpec {
        gpa: GuestPhysAddr::new(gpa),
        size: SIZE,
        user_addr: UserAddr::new(user),
        fd: fd.as_fd(),
        fd_offset: 0,
    }
}

fn worker(mem: GuestMemory, w: u64, stop: Arc<AtomicBool>) -> Result<WorkerReport, MemoryError> {
    let mut q = mem.register_queue();
    let ring_gpa = GuestPhysAddr::new(RING_BASE + w * 4096);
    let buf_gpa = GuestPhysAddr::new(BUF_BASE + w * 4096);
    let mut st = WorkerReport::default();
    while !stop.load(Ordering::Relaxed) {
        let batch = q.batch(&[(ring_gpa, 64)]);
        if let Some(c) = batch.cached() {
            let v: u64 = c[0].read(0)?;
            c[0].write(0, v + 1)?;
            st.cached_batches += 1;
        } else {
            let mut b = [0u8; 8];
            batch.read(ring_gpa, &mut b)?;
            batch.write(ring_gpa, &(u64::from_ne_bytes(b) + 1).to_ne_bytes())?;
            st.translating_batches += 1;
        }
        st.ring_incs += 1;
        match batch.translate(buf_gpa, 8, crate::iotlb::Perm::RW) {
            Ok(s) => {
                let v: u64 = s.read(0)?;
                s.write(0, v + 1)?;
                st.buf_incs += 1;
            }
            Err(MemoryError::Unmapped { .. }) => st.buf_absent += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(st)
}

fn read_file(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; SIZE_BYTES];
    let n = rustix::io::pread(fd, &mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    bytes.get(off..off + 8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes).unwrap_or(0)
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * crate::mmap::page_size())
}

/// Number of mappings of this process.
pub fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[(v.len() - 1) * p / 100]
}

/// Runs the workload.
pub fn run(cfg: StressConfig) -> Result<StressReport, StressError> {
    let workers = cfg.workers.clamp(1, 64) as u64;
    let ring = memfd("vireo-stress-ring", SIZE)?;
    let buf = memfd("vireo-stress-buf", SIZE)?;
    let mem = GuestMemory::new(cfg.retire);
    mem.set_regions(&[spec(&ring, RING_BASE, RING_USER), spec(&buf, BUF_BASE, BUF_USER)])?;

    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || worker(mem, w, stop))
        })
        .collect();

    let started = Instant::now();
    let warm_up = cfg.remaps.min(2_000);
    let (mut rss_warm, mut maps_warm) = (rss_bytes(), map_count());
    // A fixed-size sample of invalidation times, so that measuring does not grow the memory the
    // run checks stays flat.
    let every = (cfg.remaps / 4096).max(1);
    let mut inval = Vec::with_capacity(4097);
    let mut outcome: Result<(), MemoryError> = Ok(());
    for i in 0..cfg.remaps {
        if i == warm_up {
            (rss_warm, maps_warm) = (rss_bytes(), map_count());
        }
        // The frontend's user addresses move on every table change, as when QEMU re-creates
        // its RAM blocks; guest physical addresses stay.
        let shift = (i % 1024) * (SIZE * 2);
        let step = if i % 2 == 0 {
            mem.set_regions(&[spec(&ring, RING_BASE, RING_USER + shift), spec(&buf, BUF_BASE, BUF_USER + shift)])
        } else {
            let map = mem.map();
            match map.regions().iter().find(|r| r.gpa().raw() == BUF_BASE) {
                Some(b) => mem
                    .remove_region(b.gpa(), b.size(), b.user_addr())
                    .and_then(|()| mem.add_region(&spec(&buf, BUF_BASE, BUF_USER + shift))),
                None => mem.add_region(&spec(&buf, BUF_BASE, BUF_USER + shift)),
            }
        };
        if let Err(e) = step {
            outcome = Err(e);
            break;
        }
        if i % every == 0 {
            inval.push(mem.last_invalidation());
        }
    }
    let elapsed = started.elapsed();
    let (rss_end, maps_end) = (rss_bytes(), map_count());
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for h in handles {
        reports.push(h.join().map_err(|_| StressError::Worker)??);
    }
    outcome?;

    let ring_bytes = read_file(&ring)?;
    let buf_bytes = read_file(&buf)?;
    let mut stray_writes = Vec::new();
    for (w, r) in reports.iter_mut().enumerate() {
        r.ring_in_memory = u64_at(&ring_bytes, w * 4096);
        r.buf_in_memory = u64_at(&buf_bytes, w * 4096);
    }
    for (base, bytes) in [(RING_BASE, &ring_bytes), (BUF_BASE, &buf_bytes)] {
        for (i, b) in bytes.iter().enumerate() {
            let owned = i % 4096 < 8 && (i / 4096) < workers as usize;
            if !owned && *b != 0 {
                stray_writes.push(base + i as u64);
            }
        }
    }
    Ok(StressReport {
        remaps: cfg.remaps,
        elapsed,
        workers: reports,
        invalidation_p50: percentile(&mut inval, 50),
        invalidation_p99: percentile(&mut inval, 99),
        rss_warm,
        rss_end,
        maps_warm,
        maps_end,
        stray_writes,
    })
}
