//! Shared by the ring fuzz targets: the fuzzer's bytes become guest memory (two adjacent
//! regions, so buffers and tables can straddle them) and a few knobs; the device side then pops
//! and completes whatever it finds. Nothing may panic, every popped segment must lie in guest
//! memory, and a queue that reports an error must stay broken.
//!
//! Most inputs are also run twice, once through the cached ring views (and the cached walkers)
//! and once forced onto the translating path (and the general walker), each on its own copy of
//! the image: the chains they find, where they break, and guest memory afterwards (the used
//! ring, the event index) must be the same. The cached walkers only ever doubt a chain and hand
//! it to the general walker; this is what checks that they never accept one it refuses, nor
//! resolve one differently.

use vireo_driver::GuestRam;
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Chain, Queue, QueueConfig, QueueError, RingAddrs};

pub const REGION: u64 = 32 << 10;
pub const RAM: u64 = 2 * REGION;

/// What one run saw: every chain (id, ring descriptors, readable and writable bytes, segments),
/// whether and when the queue broke, and guest memory at the end.
#[derive(Debug, PartialEq, Eq, Default)]
struct Trace {
    chains: Vec<(u16, u16, u32, u32, Vec<(u64, usize, bool)>)>,
    broke_in_round: Option<usize>,
    ram: Vec<u8>,
}

/// Input layout: byte 0 = queue size exponent (0..=6), byte 1 = knobs (bit 0 translating path,
/// bit 1 EVENT_IDX, bit 2 complete in reverse order, bit 3 take single-descriptor chains through
/// `complete_singles` first, bit 4 pop through `pop_each`, bit 5 with `pop_each`, complete every
/// other chain at once), then guest memory from address 0. Without bit 3 the input runs on both
/// paths and they are compared (bit 0 is then ignored).
pub fn run(data: &[u8], packed: bool) {
    if data.len() < 2 {
        return;
    }
    let knobs = data[1];
    if knobs & 8 != 0 {
        // `complete_singles` serves only the cached path, so the two paths complete in different
        // orders: checked on its own.
        trace(data, packed, knobs & 1 != 0);
        return;
    }
    let cached = trace(data, packed, false);
    let translated = trace(data, packed, true);
    assert_eq!(cached.broke_in_round, translated.broke_in_round, "the paths break the queue differently");
    assert_eq!(cached.chains, translated.chains, "the paths resolve chains differently");
    assert!(cached.ram == translated.ram, "the paths leave guest memory differently");
}

fn trace(data: &[u8], packed: bool, translating: bool) -> Trace {
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
    let cfg = QueueConfig { size, addrs, event_idx: knobs & 2 != 0 };
    let mut q = Queue::new(mem.register_queue(), cfg).expect("valid configuration");
    q.set_force_translating(translating);
    let mut t = Trace::default();
    for round in 0..4 {
        let chains = &mut t.chains;
        let mut record = |c: &Chain<'_>| {
            let mut segs = Vec::new();
            for i in 0..c.segments() {
                let (gpa, writable, s) = c.segment(i).expect("segment");
                let end = gpa.raw().checked_add(s.len() as u64).expect("segment wraps");
                assert!(end <= RAM, "segment {gpa} +{} outside guest memory", s.len());
                assert!(s.len() > 0, "empty segment");
                segs.push((gpa.raw(), s.len(), writable));
            }
            assert!(c.readable_len().checked_add(c.writable_len()).is_some());
            let tok = c.token();
            chains.push((tok.id, tok.ring_descs, c.readable_len(), c.writable_len(), segs));
        };
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
            if knobs & 16 != 0 {
                let mut now = false;
                let popped = qb.pop_each(2 * usize::from(size), |c| {
                    record(c);
                    now = !now;
                    if knobs & 32 != 0 && now {
                        Some(c.writable_len().min(64))
                    } else {
                        tokens.push((c.token(), c.writable_len().min(64)));
                        None
                    }
                });
                if popped.is_err() {
                    return Err(());
                }
            } else {
                for _ in 0..(2 * u32::from(size)) {
                    match qb.pop() {
                        Ok(Some(c)) => {
                            record(&c);
                            tokens.push((c.token(), c.writable_len().min(64)));
                        }
                        Ok(None) => break,
                        Err(_) => return Err(()),
                    }
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
                t.broke_in_round = Some(round);
                break;
            }
        }
    }
    let mut bytes = vec![0u8; RAM as usize];
    ram.read(GuestPhysAddr::new(0), &mut bytes).expect("read back");
    t.ram = bytes;
    t
}
