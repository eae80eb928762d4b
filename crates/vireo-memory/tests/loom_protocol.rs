//! Loom models of the invalidation protocol (`src/protocol.rs`), run on the real code: under
//! `--cfg vireo_loom` the protocol's atomics, mutex and waits come from loom.
//!
//! Guest memory is modelled by a `loom::cell::UnsafeCell` per region. Readers read it while they
//! hold a translation; the invalidator writes it right after `invalidate_start` returns ("the
//! mapping is retired"). Loom reports any read that is not ordered before that write, which is
//! exactly a use of a retired translation. Run with
//! `RUSTFLAGS="--cfg vireo_loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release --test loom_protocol`.
#![cfg(vireo_loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use vireo_memory::protocol::{Domain, RegionTag};

/// Region 0 (slot 0, id 1) is retired and replaced by region 1 (slot 1, id 2).
struct World {
    domain: Domain,
    tags: [RegionTag; 2],
    memory: [UnsafeCell<u64>; 2],
    /// The "map": which region currently backs the ring's guest address.
    current: AtomicU64,
}

impl World {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            domain: Domain::new(2),
            tags: [RegionTag::new(1, 0), RegionTag::new(2, 1)],
            memory: [UnsafeCell::new(0), UnsafeCell::new(0)],
            current: AtomicU64::new(0),
        })
    }

    fn access(&self, region: usize) {
        // A read of guest memory through a translation into `region`.
        self.memory[region].with(|p| {
            // SAFETY: loom checks that this read is ordered before the retiring write.
            let _ = unsafe { *p };
        });
    }

    fn invalidate_region0(&self) {
        let inv = self.domain.invalidate_start(&[&self.tags[0]], || self.current.store(1, SeqCst));
        // Retire: after start returned, nobody may touch region 0 any more.
        self.memory[0].with_mut(|p| {
            // SAFETY: loom checks that no reader access races with this write.
            unsafe { *p = 0xdead };
        });
        inv.end();
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// A reader fills its cache (collision-retry) and uses it over two batches while the invalidator
/// retires the region the cache points into: no use after `start`, no stale publish.
#[test]
fn cached_translation_is_never_used_after_invalidate_start() {
    model(|| {
        let w = World::new();
        let gate = w.domain.register();
        let reader = {
            let (w, gate) = (w.clone(), gate.clone());
            thread::spawn(move || {
                let mut cached: Option<usize> = None;
                for _ in 0..2 {
                    let valid = gate.enter();
                    match (valid, cached) {
                        (true, Some(region)) => w.access(region),
                        _ => {
                            if let Some(seq) = w.domain.read_begin() {
                                let region = w.current.load(SeqCst) as usize;
                                if gate.publish_cache(&w.domain, seq, &[w.tags[region].id]) {
                                    cached = Some(region);
                                    w.access(region);
                                }
                            }
                        }
                    }
                    gate.leave();
                }
            })
        };
        w.invalidate_region0();
        reader.join().unwrap();
    });
}

/// A reader on the translating path pins the region it looked up (possibly in a stale map) and
/// looks again when the pin is refused.
#[test]
fn pinned_translation_is_never_used_after_invalidate_start() {
    model(|| {
        let w = World::new();
        let gate = w.domain.register();
        let reader = {
            let (w, gate) = (w.clone(), gate.clone());
            thread::spawn(move || {
                gate.enter();
                let mut pinned = None;
                for _ in 0..2 {
                    let region = w.current.load(SeqCst) as usize;
                    if gate.pin(&w.tags[region]) {
                        pinned = Some(region);
                        break;
                    }
                }
                if let Some(region) = pinned {
                    w.access(region);
                    gate.unpin(w.tags[region].slot);
                }
                gate.leave();
            })
        };
        w.invalidate_region0();
        reader.join().unwrap();
    });
}

/// An I/O pin taken in a batch and released later, on another thread (an io_uring completion):
/// the region is not retired until the I/O is done.
#[test]
fn in_flight_io_holds_off_retirement() {
    model(|| {
        let w = World::new();
        let gate = w.domain.register();
        let reader = {
            let (w, gate) = (w.clone(), gate.clone());
            thread::spawn(move || {
                gate.enter();
                let ok = gate.pin(&w.tags[0]);
                if ok {
                    gate.pin_again(w.tags[0].slot);
                    gate.unpin(w.tags[0].slot);
                }
                gate.leave();
                if ok {
                    // The I/O completes after the batch ended.
                    w.access(0);
                    gate.unpin(w.tags[0].slot);
                }
            })
        };
        w.invalidate_region0();
        reader.join().unwrap();
    });
}

/// Two queues: the invalidator waits for the one whose cache uses region 0 and retires it; the
/// other queue's cache (region 1) stays valid throughout.
#[test]
fn two_queues_only_the_overlapping_one_is_invalidated() {
    model(|| {
        let w = World::new();
        let g0 = w.domain.register();
        let g1 = w.domain.register();
        // Both caches were filled before the invalidation (single-threaded set-up).
        g0.enter();
        assert!(g0.publish_cache(&w.domain, w.domain.read_begin().unwrap(), &[1]));
        g0.leave();
        g1.enter();
        assert!(g1.publish_cache(&w.domain, w.domain.read_begin().unwrap(), &[2]));
        g1.leave();
        let reader = {
            let (w, g0) = (w.clone(), g0.clone());
            thread::spawn(move || {
                if g0.enter() {
                    w.access(0);
                }
                g0.leave();
            })
        };
        w.invalidate_region0();
        reader.join().unwrap();
        assert!(g1.enter(), "an unrelated queue's cache was invalidated");
        g1.leave();
        assert!(!g0.enter());
        g0.leave();
    });
}

/// LOG_ALL switched on while a device batch runs: every write made in a batch that sees logging
/// off must have ended before `quiesce_all` returns, so the migration's bulk copy (after it)
/// sees it; every later write sets its bit after the data (Release), so the final dirty round
/// copies it. The migration thread clears bits concurrently.
#[test]
fn every_write_after_log_all_is_logged_or_copied() {
    model(|| {
        let domain = Arc::new(Domain::new(1));
        let logging = Arc::new(AtomicBool::new(false));
        let data = Arc::new(AtomicU64::new(0));
        let bit = Arc::new(AtomicU8::new(0));
        let gate = domain.register();
        let device = {
            let (logging, data, bit, gate) = (logging.clone(), data.clone(), bit.clone(), gate.clone());
            thread::spawn(move || {
                for v in 1..=2u64 {
                    gate.enter();
                    let log = logging.load(SeqCst);
                    data.store(v, Relaxed);
                    if log {
                        // The batch's log-cache flush: after the data, before the used index.
                        bit.fetch_or(1, Release);
                    }
                    gate.leave();
                }
            })
        };
        // The frontend: SET_FEATURES(LOG_ALL), the reply, then the bulk copy.
        logging.store(true, SeqCst);
        domain.quiesce_all();
        let mut copy = data.load(Acquire);
        // One concurrent dirty round.
        if bit.swap(0, Acquire) != 0 {
            copy = data.load(Acquire);
        }
        device.join().unwrap();
        // Stop-and-copy: the final dirty round after the device stopped.
        if bit.swap(0, Acquire) != 0 {
            copy = data.load(Acquire);
        }
        assert_eq!(copy, data.load(Relaxed), "a device write escaped the dirty log");
    });
}

/// The glue, on the real `GuestMemory` (`guest/`, whose atomics and locks come from loom too):
/// a batch that hits its cache translates a buffer in the rings' region through the window the
/// cache holds (no pin of its own), takes an I/O pin on it (`Gate::pin_again`), ends (`leave`),
/// and only then touches the buffer and drops the pin (`unpin`), while the control side replaces
/// the memory table, retiring the region. Every touch of the old region must be ordered before
/// its retirement; the retirement is modelled by a write to a cell that stands for the old
/// region, made right after `set_regions` returned.
#[test]
fn io_pin_on_the_cached_window_holds_off_a_memory_table_change() {
    use std::os::fd::AsFd;
    use vireo_memory::{GuestMemory, GuestPhysAddr, Perm, RegionSpec, RetireMode, UserAddr};
    const SIZE: u64 = 64 << 10;
    let fd = std::sync::Arc::new(vireo_memory::memfd("loom-glue", 2 * SIZE).expect("memfd"));
    model(move || {
        let spec = |offset: u64| RegionSpec {
            gpa: GuestPhysAddr::new(0),
            size: SIZE,
            user_addr: UserAddr::new(0x10_0000),
            fd: fd.as_fd(),
            fd_offset: offset,
        };
        let mem = GuestMemory::new(RetireMode::Unmap);
        mem.set_regions(&[spec(0)]).expect("regions");
        let ring = [(GuestPhysAddr::new(0), 64)];
        let mut queue = mem.register_queue();
        {
            let batch = queue.batch(&ring);
            assert!(batch.cached().is_some(), "the first batch fills the cache");
        }
        let old = mem.map().translate(GuestPhysAddr::new(0)).expect("region").host;
        let old = old..old + SIZE as usize;
        let region = Arc::new(UnsafeCell::new(0u64));
        let reader = {
            let region = region.clone();
            thread::spawn(move || {
                let batch = queue.batch(&ring);
                let piece = batch.translate_piece(GuestPhysAddr::new(4096), 16, Perm::RW, false).ok();
                let held = piece.map(|p| (p.slice.as_ptr() as usize, batch.io_pin(&p)));
                drop(batch);
                if let Some((host, pin)) = held {
                    if old.contains(&host) {
                        // SAFETY: loom checks that this read is ordered before the retiring write.
                        region.with(|p| unsafe {
                            let _ = *p;
                        });
                    }
                    drop(pin);
                }
            })
        };
        mem.set_regions(&[spec(SIZE)]).expect("new table");
        // SAFETY: loom checks that no access to the old region races with this write.
        region.with_mut(|p| unsafe { *p = 0xdead });
        reader.join().unwrap();
    });
}
