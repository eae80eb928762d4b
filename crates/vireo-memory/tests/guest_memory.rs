//! Functional tests of guest memory: maps, refusals, the cache, pins, quiesce and the dirty log.
#![allow(clippy::cast_possible_truncation)] // tests run on 64-bit hosts

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::Backing;
use vireo_memory::{memfd, GuestMemory, GuestPhysAddr, MemoryError, Perm, RegionSpec, RetireMode, UserAddr};

const MB: u64 = 1 << 20;

fn gpa(x: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(x)
}

fn prot_none() -> GuestMemory {
    GuestMemory::new(RetireMode::ProtNone { keep: 64 })
}

/// The permissions column of /proc/self/maps for the mapping holding `addr`.
fn perms_of(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let range = it.next()?;
        let perms = it.next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
        (a <= addr && addr < b).then(|| perms.to_string())
    })
}

#[test]
fn translating_path_crosses_regions() {
    let a = Backing::new(0, MB, 0x7f00_0000_0000);
    let b = Backing::new(MB, MB, 0x7f10_0000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec(), b.spec()]).unwrap();
    let mut q = mem.register_queue();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    {
        let batch = q.batch(&[]);
        batch.write(gpa(MB - 4096), &data).unwrap();
        let mut back = vec![0u8; data.len()];
        batch.read(gpa(MB - 4096), &mut back).unwrap();
        assert_eq!(back, data);
        assert!(matches!(batch.translate(gpa(MB - 8), 16, Perm::RW), Err(MemoryError::Unmapped { .. })));
        assert!(matches!(batch.read(gpa(2 * MB - 8), &mut [0u8; 16]), Err(MemoryError::Unmapped { .. })));
    }
    assert_eq!(&a.read_all()[(MB - 4096) as usize..], &data[..4096]);
    assert_eq!(&b.read_all()[..4096], &data[4096..]);
    let map = mem.map();
    assert_eq!(map.user_to_gpa(UserAddr::new(0x7f10_0000_0010)).unwrap(), gpa(MB + 0x10));
    assert!(map.user_to_gpa(UserAddr::new(0x7f10_0000_0000 + MB)).is_err());
}

#[test]
fn refused_region_sets_leave_the_old_map_serving() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec()]).unwrap();
    let mut q = mem.register_queue();
    q.batch(&[]).write(gpa(0x100), b"still here").unwrap();

    let b = Backing::new(MB / 2, MB, 0x2000_0000);
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let refused: Vec<(&str, Vec<RegionSpec<'_>>)> = vec![
        ("overlap in gpa", vec![a.spec(), b.spec()]),
        ("overlap in user", vec![a.spec(), RegionSpec { gpa: gpa(4 * MB), ..a.spec_at_user(0x1000_0000 + 4096) }]),
        ("empty", vec![RegionSpec { size: 0, ..a.spec() }]),
        ("wrapping", vec![RegionSpec { gpa: gpa(u64::MAX - 4095), size: 8192, ..a.spec() }]),
        ("misaligned", vec![RegionSpec { gpa: gpa(100), ..a.spec() }]),
        ("unmappable", vec![RegionSpec { fd: pipe_r.as_fd(), ..a.spec() }]),
    ];
    for (what, specs) in refused {
        let err = mem.set_regions(&specs).expect_err(what);
        assert!(!err.to_string().is_empty());
        assert!(mem.add_region(&specs[specs.len() - 1]).is_err(), "{what}");
        let mut buf = [0u8; 10];
        q.batch(&[]).read(gpa(0x100), &mut buf).unwrap();
        assert_eq!(&buf, b"still here", "{what}");
    }
    assert!(matches!(
        mem.remove_region(gpa(0), 4096, UserAddr::new(0x1000_0000)),
        Err(MemoryError::NoSuchRegion { .. })
    ));
    let map = mem.map();
    assert_eq!(map.len(), 1);
    assert_eq!((map.regions()[0].gpa(), map.regions()[0].size()), (gpa(0), MB));
}

#[test]
fn too_many_regions_are_refused() {
    let fd = memfd("many", 4096 * 600).unwrap();
    let specs: Vec<RegionSpec<'_>> = (0..510u64)
        .map(|i| RegionSpec {
            gpa: gpa(i * 8192),
            size: 4096,
            user_addr: UserAddr::new(i * 8192),
            fd: fd.as_fd(),
            fd_offset: i * 4096,
        })
        .collect();
    let mem = GuestMemory::new(RetireMode::Unmap);
    assert!(matches!(mem.set_regions(&specs), Err(MemoryError::TooManyRegions { max: 509 })));
    mem.set_regions(&specs[..509]).unwrap();
    assert_eq!(mem.map().len(), 509);
    assert!(matches!(mem.add_region(&specs[509]), Err(MemoryError::TooManyRegions { .. })));
    for s in &specs[..509] {
        assert_eq!(mem.map().translate(s.gpa).map(|t| t.avail), Some(4096));
    }
}

#[test]
fn cached_ring_is_invalidated_and_retired_prot_none() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec()]).unwrap();
    let mut q = mem.register_queue();
    let ring = [(gpa(0x2000), 256u64)];
    let old_ptr = {
        let batch = q.batch(&ring);
        let c = batch.cached().expect("a ring inside one region is cached");
        c[0].write::<u64>(0, 42).unwrap();
        c[0].as_ptr() as usize
    };
    assert_eq!(a.read_u64(0x2000), 42);
    // Remap the same memfd: the cache must refill at the new address, the old one is PROT_NONE.
    mem.set_regions(&[a.spec()]).unwrap();
    assert_eq!(perms_of(old_ptr).as_deref(), Some("---p"));
    let batch = q.batch(&ring);
    let c = batch.cached().expect("refilled");
    assert_ne!(c[0].as_ptr() as usize, old_ptr);
    assert_eq!(c[0].read::<u64>(0).unwrap(), 42);
}

#[test]
fn ring_across_regions_falls_back_to_translating() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let b = Backing::new(MB, MB, 0x2000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec(), b.spec()]).unwrap();
    let mut q = mem.register_queue();
    let batch = q.batch(&[(gpa(MB - 128), 256)]);
    assert!(batch.cached().is_none());
    batch.write(gpa(MB - 128), &[7u8; 256]).unwrap();
    let mut back = [0u8; 256];
    batch.read(gpa(MB - 128), &mut back).unwrap();
    assert_eq!(back, [7u8; 256]);
}

#[test]
fn forced_translating_path_never_caches() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec()]).unwrap();
    let mut q = mem.register_queue();
    q.set_force_translating(true);
    assert!(q.batch(&[(gpa(0), 64)]).cached().is_none());
    q.set_force_translating(false);
    assert!(q.batch(&[(gpa(0), 64)]).cached().is_some());
}

#[test]
fn io_pin_holds_off_retirement() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec()]).unwrap();
    let mut q = mem.register_queue();
    let (pin, ptr) = {
        let batch = q.batch(&[]);
        let p = batch.translate_piece(gpa(0x3000), 4096, Perm::RW, false).unwrap();
        (batch.io_pin(&p), p.slice.as_ptr() as usize)
    };
    let done = Arc::new(AtomicBool::new(false));
    let remover = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            mem.remove_region(gpa(0), MB, UserAddr::new(0x1000_0000)).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "the region was retired under an in-flight I/O");
    // The "I/O" completes: it writes through its pointer, then releases the pin.
    // SAFETY: the pin keeps the mapping alive; the address is inside the 4096 bytes translated.
    unsafe { (ptr as *mut u64).write_volatile(99) };
    drop(pin);
    remover.join().unwrap();
    assert_eq!(a.read_u64(0x3000), 99);
    assert_eq!(perms_of(ptr).as_deref(), Some("---p"));
}

/// A batch on a valid cache holds the rings' region without pinning it (its first window). An
/// I/O pin on a buffer there, taken after the batch translated into another region and while
/// the rings' region is being removed, must still hold that region: the removal waits for the
/// batch (the cache points into it), then for the pin, and the I/O's pointer stays mapped.
#[test]
fn io_pin_in_the_rings_region_holds_it_after_the_window_moved() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let b = Backing::new(MB, MB, 0x2000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec(), b.spec()]).unwrap();
    let mut q = mem.register_queue();
    drop(q.batch(&[(gpa(0x1000), 64)])); // fills the cache
    let done = Arc::new(AtomicBool::new(false));
    let (pin, ptr, remover) = {
        let batch = q.batch(&[(gpa(0x1000), 64)]);
        assert!(batch.cached().is_some());
        let p = batch.translate_piece(gpa(0x3000), 4096, Perm::RW, false).unwrap();
        // The window moves to region B.
        batch.translate(gpa(MB + 0x1000), 64, Perm::RW).unwrap();
        let remover = {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                mem.remove_region(gpa(0), MB, UserAddr::new(0x1000_0000)).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        // Region A is retiring now, and the remover waits for this batch.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "region A retired under a batch whose cache is in it");
        (batch.io_pin(&p), p.slice.as_ptr() as usize, remover)
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "region A was retired under an in-flight I/O");
    // SAFETY: the pin keeps the mapping alive; the address is inside the 4096 bytes translated.
    unsafe { (ptr as *mut u64).write_volatile(77) };
    drop(pin);
    remover.join().unwrap();
    assert_eq!(a.read_u64(0x3000), 77);
    assert_eq!(perms_of(ptr).as_deref(), Some("---p"));
}

/// An I/O pin holds the region its piece came from, even after the batch moved to a newer map
/// in which the address lies in a replacement region: the batch pins region A, a new memory
/// table replacing A and B starts (and waits for that pin), the batch's pin on B is refused and
/// it reloads the map; the I/O pinned for A's buffer must keep A until the I/O ends.
#[test]
fn io_pin_holds_the_pieces_region_after_a_map_reload() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let b = Backing::new(MB, MB, 0x2000_0000);
    let (a2, b2) = (Backing::new(0, MB, 0x3000_0000), Backing::new(MB, MB, 0x4000_0000));
    let mem = prot_none();
    mem.set_regions(&[a.spec(), b.spec()]).unwrap();
    let mut q = mem.register_queue();
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let (pin, ptr, setter) = {
            let batch = q.batch(&[]);
            let p = batch.translate_piece(gpa(0x3000), 4096, Perm::RW, false).unwrap();
            let setter = sc.spawn(|| {
                mem.set_regions(&[a2.spec(), b2.spec()]).unwrap();
                done.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!done.load(Ordering::SeqCst), "region A retired under a batch that pinned it");
            // B is retiring: its pin is refused and the batch moves to the new map.
            batch.translate(gpa(MB + 0x1000), 64, Perm::RW).unwrap();
            (batch.io_pin(&p), p.slice.as_ptr() as usize, setter)
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!done.load(Ordering::SeqCst), "region A was retired under an in-flight I/O");
        // SAFETY: the pin keeps the mapping alive; the address is inside the 4096 bytes
        // translated.
        unsafe { (ptr as *mut u64).write_volatile(55) };
        drop(pin);
        setter.join().unwrap();
        assert_eq!(a.read_u64(0x3000), 55);
        assert_eq!(perms_of(ptr).as_deref(), Some("---p"));
    });
}

#[test]
fn invalidation_waits_only_for_queues_that_touch_the_range() {
    let a = Backing::new(0, MB, 0x1000_0000);
    let b = Backing::new(MB, MB, 0x2000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec(), b.spec()]).unwrap();
    let in_batch = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let worker = {
        let (mem, in_batch, release) = (mem.clone(), in_batch.clone(), release.clone());
        std::thread::spawn(move || {
            let mut q = mem.register_queue();
            let batch = q.batch(&[(gpa(0x1000), 64)]);
            assert!(batch.cached().is_some());
            batch.translate(gpa(0x8000), 64, Perm::RW).unwrap();
            in_batch.wait();
            release.wait();
            drop(batch);
        })
    };
    in_batch.wait();
    // Region B is neither cached nor pinned by the busy queue: this must not wait for it.
    mem.remove_region(gpa(MB), MB, UserAddr::new(0x2000_0000)).unwrap();
    // Region A is: removing it must wait until the batch ends.
    let done = Arc::new(AtomicBool::new(false));
    let remover = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            mem.remove_region(gpa(0), MB, UserAddr::new(0x1000_0000)).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "region A was retired under a batch using it");
    release.wait();
    worker.join().unwrap();
    remover.join().unwrap();
    assert!(mem.map().is_empty());
}

#[test]
fn dirty_log_records_writes_while_logging() {
    let a = Backing::new(0, 4 * MB, 0x1000_0000);
    let mem = prot_none();
    mem.set_regions(&[a.spec()]).unwrap();
    let log_fd = memfd("log", 4096).unwrap();
    mem.set_dirty_log(log_fd.as_fd(), 0, 4096).unwrap();
    let mut q = mem.register_queue();
    q.batch(&[]).write(gpa(0x5000), &[1; 8]).unwrap();
    let dirty = |page: u64| mem.with_dirty_log(|log| log.is_dirty(page)).unwrap();
    assert!(!dirty(5), "logging is off");
    mem.set_logging(true);
    {
        let batch = q.batch(&[]);
        batch.write(gpa(0x7ff8), &[2; 16]).unwrap();
        batch.log_write(gpa(3 * MB), 1).unwrap();
    }
    for page in [7, 8, 3 * MB / 4096] {
        assert!(dirty(page), "page {page}");
    }
    assert!(!dirty(5) && !dirty(9));
    // A new log retires the old one, and batches move to the new one.
    let log2_fd = memfd("log2", 4096).unwrap();
    mem.set_dirty_log(log2_fd.as_fd(), 0, 4096).unwrap();
    q.batch(&[]).write(gpa(0x9000), &[3; 8]).unwrap();
    assert!(dirty(9));
    mem.set_logging(false);
    q.batch(&[]).write(gpa(0xa000), &[3; 8]).unwrap();
    assert!(!dirty(10));
}

mod iotlb {
    use super::*;
    use vireo_memory::IotlbEntry;

    const UA: u64 = 0x7f20_0000_0000;
    const IOVA: u64 = 0x40_0000_0000;

    fn behind_iommu() -> (Backing, GuestMemory) {
        let a = Backing::new(0, MB, UA);
        let mem = prot_none();
        mem.set_regions(&[a.spec()]).unwrap();
        mem.set_iotlb_enabled(true);
        (a, mem)
    }

    fn map(mem: &GuestMemory, iova: u64, size: u64, gpa: u64, perm: Perm) {
        mem.iotlb_update(IotlbEntry { iova, size, uaddr: UA + gpa, perm }).unwrap();
    }

    /// IOVAs translate through the IOTLB to the region, page by page and across pages that
    /// continue each other; a hole is a miss, a missing right a denial; guest physical
    /// addresses mean nothing any more.
    #[test]
    fn translation_goes_through_the_iotlb() {
        let (a, mem) = behind_iommu();
        map(&mem, IOVA, 4096, 0x3000, Perm::RW);
        map(&mem, IOVA + 4096, 4096, 0x4000, Perm::RW);
        map(&mem, IOVA + 0x10000, 4096, 0x8000, Perm::READ);
        let mut q = mem.register_queue();
        let b = q.batch(&[]);
        b.write(gpa(IOVA + 4000), &[9u8; 200]).unwrap();
        assert_eq!(&a.read_all()[0x3000 + 4000..0x3000 + 4200], &[9u8; 200][..]);
        let piece = b.translate_piece(gpa(IOVA + 0x100), 0x1000, Perm::WRITE, false).unwrap();
        assert_eq!(piece.phys, gpa(0x3100), "the guest physical address behind the IOVA");
        assert!(matches!(
            b.translate(gpa(IOVA + 0x2000), 1, Perm::READ),
            Err(MemoryError::IotlbMiss { iova, perm: Perm::READ }) if iova == IOVA + 0x2000
        ));
        assert!(matches!(b.translate(gpa(0x3000), 1, Perm::READ), Err(MemoryError::IotlbMiss { .. })));
        assert!(b.translate(gpa(IOVA + 0x10000), 8, Perm::READ).is_ok());
        assert!(matches!(
            b.translate(gpa(IOVA + 0x10000), 8, Perm::WRITE),
            Err(MemoryError::IotlbDenied { need: Perm::WRITE, have: Perm::READ, .. })
        ));
        assert!(matches!(b.check_access(gpa(IOVA), 0x3000, Perm::READ), Err(MemoryError::IotlbMiss { .. })));
        assert!(b.check_access(gpa(IOVA), 0x2000, Perm::RW).is_ok());
    }

    /// `WindowLimits::locate` answers as the window does, for every class: a refused class,
    /// an empty buffer and a readable one after the order bit are refused, and otherwise the
    /// host and guest physical addresses are the window's, at every edge of an IOVA window
    /// whose guest physical addresses differ and which is read-only.
    #[test]
    fn window_limits_locate_as_the_window_translates() {
        let (_a, mem) = behind_iommu();
        map(&mem, IOVA + 0x10000, 0x2000, 0x8000, Perm::READ);
        map(&mem, IOVA + 0x20000, 0x2000, 0x9000, Perm::RW);
        let mut q = mem.register_queue();
        for base in [IOVA + 0x10000, IOVA + 0x20000] {
            let b = q.batch(&[]);
            b.translate_piece(gpa(base), 1, Perm::READ, false).unwrap();
            let window = b.window();
            let limits = window.limits();
            let addrs =
                [0, base - 1, base, base + 1, base + 0xfff, base + 0x1fff, base + 0x2000, u64::MAX, u64::MAX - 7];
            let lens = [0u32, 1, 8, 0x1000, 0x2000, 0x2001, u32::MAX];
            for addr in addrs {
                for len in lens {
                    for class in 0..8usize {
                        let writable = class & 1 != 0;
                        let refused = class & 2 != 0 || (class & 4 != 0 && !writable) || len == 0;
                        let want = if refused {
                            None
                        } else {
                            window
                                .translate_for(gpa(addr), len, writable)
                                .map(|p| (p.slice.as_ptr() as usize, p.phys.raw()))
                        };
                        assert_eq!(limits.locate(addr, len, class), want, "{addr:#x}+{len:#x} class {class}");
                    }
                }
            }
            assert_eq!(limits.slot(), b.translate_piece(gpa(base), 1, Perm::READ, false).unwrap().slot);
        }
    }

    /// The reply to an invalidation is the barrier: it waits for a batch that translated through
    /// the IOTLB and for an I/O pin taken in it, and afterwards the IOVA misses and a ring cache
    /// filled through it is gone.
    #[test]
    fn invalidation_waits_for_batches_and_io_and_clears_caches() {
        let (_a, mem) = behind_iommu();
        map(&mem, IOVA, 0x10000, 0, Perm::RW);
        let mut q = mem.register_queue();
        let ring = [(gpa(IOVA + 0x1000), 64)];
        assert!(q.batch(&ring).cached().is_some(), "a ring inside one entry is cached");
        let batch = q.batch(&ring);
        let piece = batch.translate_piece(gpa(IOVA + 0x8000), 512, Perm::WRITE, false).unwrap();
        let mut pins = Vec::new();
        batch.io_pins(std::iter::once(piece.slot), &mut pins);
        assert_eq!(pins.len(), 2, "the region and the IOTLB generation");
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                mem.iotlb_invalidate(IOVA, 0x10000).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "the invalidation waits for the batch");
        drop(batch);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "and for the I/O");
        drop(pins);
        t.join().unwrap();
        let b = q.batch(&ring);
        assert!(b.cached().is_none(), "the cache filled through the old entry is gone");
        assert!(matches!(b.translate(gpa(IOVA + 0x8000), 1, Perm::READ), Err(MemoryError::IotlbMiss { .. })));
        drop(b);
        // An invalidation of a range that holds nothing waits for nothing.
        let _held = q.batch(&[]);
        mem.iotlb_invalidate(IOVA, 0x10000).unwrap();
    }

    /// Writes through IOVAs are logged at the guest physical pages behind them.
    #[test]
    fn writes_through_iovas_are_logged_at_their_guest_pages() {
        let (_a, mem) = behind_iommu();
        map(&mem, IOVA, 4096, 0x5000, Perm::RW);
        map(&mem, IOVA + 4096, 4096, 0x9000, Perm::RW);
        let log = memfd("log", 4096).unwrap();
        mem.set_dirty_log(log.as_fd(), 0, 4096).unwrap();
        mem.set_logging(true);
        let mut q = mem.register_queue();
        {
            let b = q.batch(&[]);
            b.log_write_addr(gpa(IOVA + 4000), 200).unwrap();
        }
        let dirty: Vec<u64> = mem.with_dirty_log(|log| (0..16).filter(|&p| log.is_dirty(p)).collect()).unwrap();
        assert_eq!(dirty, vec![5, 9]);
    }
}
