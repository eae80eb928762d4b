//! Shared by the ring fuzz targets: the fuzzer's bytes become guest memory (two adjacent
//! regions, so buffers and tables can straddle them) and a few knobs; the device side then pops
//! and completes whatever it finds. Nothing may panic, every popped segment must lie in guest
//! memory, and a queue that reports an error must stay broken.

use vireo_driver::GuestRam;
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Queue, QueueConfig, QueueError, RingAddrs};

pub const REGION: u64 = 32 << 10;
pub const RAM: u64 = 2 * REGION;

/// Input layout: byte 0 = queue size exponent (0..=6), byte 1 = knobs (bit 0 translating path,
/// bit 1 EVENT_IDX, bit 2 complete in reverse order, bit 3 take single-descriptor chains through
/// the batch API first), then guest memory from address 0.
pub fn run(data: &[u8], packed: bool) {
    if data.len() < 2 {
        return;
    }
    let size = 1u16 << (data[0] % 7);
    let knobs = data[1];
    let ram = GuestRam::new(&[(0, REGION), (REGION, REGION)]).expect("guest RAM");
    let image = &data[2..data.len().min(2 + RAM as usize)];
    ram.write(GuestPhysAddr::new(0), image).expect("image");
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&ram.specs()).expect("regions");
    // Fixed ring places: descriptors at 0, the other areas after them.
    let desc = GuestPhysAddr::new(0);
    let addrs = if packed {
        RingAddrs::Packed { desc, driver: GuestPhysAddr::new(0x1000), device: GuestPhysAddr::new(0x1004) }
    } else {
        RingAddrs::Split { desc, avail: GuestPhysAddr::new(0x1000), used: GuestPhysAddr::new(0x2000) }
    };
    let cfg = QueueConfig { size, addrs, event_idx: knobs & 2 != 0, ring_log_addr: None };
    let mut q = Queue::new(mem.register_queue(), cfg).expect("valid configuration");
    q.set_force_translating(knobs & 1 != 0);
    for _ in 0..4 {
        let res = q.process(|qb| {
            let mut tokens = Vec::new();
            if knobs & 8 != 0 {
                qb.complete_singles(usize::from(size), |s| {
                    let end = s.phys.raw().checked_add(s.buf.len() as u64).expect("buffer wraps");
                    assert!(end <= RAM, "single buffer {} +{} outside guest memory", s.phys, s.buf.len());
                    assert!(s.buf.len() > 0);
                    s.buf.len().min(64) as u32
                });
            }
            for _ in 0..(2 * u32::from(size)) {
                match qb.pop() {
                    Ok(Some(c)) => {
                        for i in 0..c.segments() {
                            let (gpa, _, s) = c.segment(i).expect("segment");
                            let end = gpa.raw().checked_add(s.len() as u64).expect("segment wraps");
                            assert!(end <= RAM, "segment {gpa} +{} outside guest memory", s.len());
                        }
                        assert!(c.readable_len().checked_add(c.writable_len()).is_some());
                        tokens.push((c.token(), c.writable_len().min(64)));
                    }
                    Ok(None) => break,
                    Err(_) => return Err(()),
                }
            }
            if knobs & 4 != 0 {
                tokens.reverse();
            }
            for (t, n) in tokens {
                if qb.add_used(t, n).is_err() {
                    return Err(());
                }
            }
            let _ = qb.enable_notification();
            Ok(())
        });
        match res {
            Ok((Ok(()), _)) => {}
            Ok((Err(()), _)) | Err(_) => {
                assert!(q.broken().is_some(), "an error must leave the queue broken");
                assert!(matches!(q.process(|_| ()), Err(QueueError::Broken(_))));
                return;
            }
        }
    }
}
