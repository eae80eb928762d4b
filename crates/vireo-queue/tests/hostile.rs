//! Hostile drivers: every malformed ring the issue lists breaks its queue with a typed error and
//! no panic, and another queue on the same memory carries on.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use common::{Bench, Driver};
use vireo_driver::SplitDriver;
use vireo_memory::GuestPhysAddr;
use vireo_queue::{Queue, QueueConfig, QueueError, RingAddrs, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

use vireo_driver::desc_bytes as desc;

const SIZE: u16 = 8;

/// A split bench with raw access: `setup` writes descriptors and avail entries, then the
/// available index is set to `avail_idx`.
/// Runs the case on the cached path and on the translating path; both must refuse it the
/// same way. Returns the cached path's error.
fn split_case(setup: impl Fn(&Bench, GuestPhysAddr, GuestPhysAddr, u64), avail_idx: u16) -> Arc<QueueError> {
    let cached = split_case_on(&setup, avail_idx, false);
    let translated = split_case_on(&setup, avail_idx, true);
    assert_eq!(
        std::mem::discriminant(&*cached),
        std::mem::discriminant(&*translated),
        "cached: {cached}; translating: {translated}"
    );
    cached
}

fn split_case_on(
    setup: &impl Fn(&Bench, GuestPhysAddr, GuestPhysAddr, u64),
    avail_idx: u16,
    translating: bool,
) -> Arc<QueueError> {
    let mut b = Bench::new(false, SIZE, 1 << 20);
    b.queue.set_force_translating(translating);
    let data = b.ram.alloc(4096, 16).unwrap().raw();
    let RingAddrs::Split { desc, avail, .. } = b.drv.addrs() else { unreachable!() };
    setup(&b, desc, avail, data);
    b.ram.write(GuestPhysAddr::new(avail.raw() + 2), &avail_idx.to_le_bytes()).unwrap();

    // A second, well-behaved queue on the same memory.
    let mut good = SplitDriver::new(&mut b.ram, SIZE).unwrap();
    let (gd, ga, gu) = good.addrs();
    let mut q2 = Queue::new(
        b.mem.register_queue(),
        QueueConfig { size: SIZE, addrs: RingAddrs::Split { desc: gd, avail: ga, used: gu }, event_idx: false },
    )
    .unwrap();

    let err = b.queue.process(|qb| qb.pop().map(|c| c.map(|c| c.id))).unwrap().0.expect_err("malformed ring accepted");
    assert!(b.queue.broken().is_some());
    assert!(matches!(b.queue.process(|_| ()), Err(QueueError::Broken(_))), "a broken queue stays broken");

    let w = vireo_driver::Buffer { gpa: GuestPhysAddr::new(data + 2048), len: 64, writable: true };
    let id = good.add(&b.ram, &[w]).unwrap();
    good.publish(&b.ram, false).unwrap();
    let (got, _) = q2
        .process(|qb| {
            let c = qb.pop().unwrap().unwrap();
            let t = c.token();
            qb.add_used(t, 0).unwrap();
            t.id
        })
        .unwrap();
    assert_eq!(got, id, "the other queue goes on");
    assert_eq!(good.pop_used(&b.ram).unwrap().unwrap().id, id);
    match err {
        QueueError::Broken(inner) => inner,
        other => panic!("expected the queue to report itself broken, got {other}"),
    }
}

fn entry(b: &Bench, avail: GuestPhysAddr, slot: u64, head: u16) {
    b.ram.write(GuestPhysAddr::new(avail.raw() + 4 + 2 * slot), &head.to_le_bytes()).unwrap();
}

fn put(b: &Bench, table: GuestPhysAddr, i: u64, d: [u8; 16]) {
    b.ram.write(GuestPhysAddr::new(table.raw() + 16 * i), &d).unwrap();
}

#[test]
fn avail_index_jump() {
    let e = split_case(|_, _, _, _| {}, SIZE + 1);
    assert!(matches!(*e, QueueError::AvailIdxJump { .. }), "{e}");
}

#[test]
fn head_out_of_range() {
    let e = split_case(|b, _, avail, _| entry(b, avail, 0, SIZE), 1);
    assert!(matches!(*e, QueueError::DescIndex { .. }), "{e}");
}

#[test]
fn next_out_of_range() {
    let e = split_case(
        |b, desc, avail, data| {
            put(b, desc, 0, desc_bytes_next(data, 4, SIZE + 3));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::DescIndex { .. }), "{e}");
}

fn desc_bytes_next(addr: u64, len: u32, next: u16) -> [u8; 16] {
    desc(addr, len, DESC_F_NEXT, next)
}

#[test]
fn chain_loop() {
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 4, DESC_F_NEXT, 1));
            put(b, d, 1, desc(data, 4, DESC_F_NEXT, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::ChainTooLong { .. }), "{e}");
}

#[test]
fn zero_length() {
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 0, 0, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::ZeroLength { .. }), "{e}");
}

#[test]
fn readable_after_writable() {
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 4, DESC_F_NEXT | DESC_F_WRITE, 1));
            put(b, d, 1, desc(data + 8, 4, 0, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::ReadableAfterWritable { .. }), "{e}");
}

#[test]
fn total_length_overflows() {
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 16, DESC_F_NEXT, 1));
            put(b, d, 1, desc(data, u32::MAX, 0, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::LengthOverflow { .. }), "{e}");
}

#[test]
fn buffer_outside_guest_memory() {
    for addr in [1u64 << 40, u64::MAX - 8, (1 << 20) - 8] {
        let e = split_case(
            |b, d, avail, _| {
                put(b, d, 0, desc(addr, 64, 0, 0));
                entry(b, avail, 0, 0);
            },
            1,
        );
        assert!(matches!(*e, QueueError::Memory { .. }), "{addr:#x}: {e}");
    }
}

#[test]
fn indirect_misuse() {
    // Indirect with NEXT.
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::Indirect { .. }), "{e}");
    // Table length not a multiple of 16, and zero.
    for len in [0u32, 24] {
        let e = split_case(
            |b, d, avail, data| {
                put(b, d, 0, desc(data, len, DESC_F_INDIRECT, 0));
                entry(b, avail, 0, 0);
            },
            1,
        );
        assert!(matches!(*e, QueueError::Indirect { .. }), "len {len}: {e}");
    }
    // Nested table.
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 32, DESC_F_INDIRECT, 0));
            put(b, GuestPhysAddr::new(data), 0, desc(data + 512, 32, DESC_F_INDIRECT, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::Indirect { .. }), "{e}");
    // A loop inside the table, and a next beyond it.
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 32, DESC_F_INDIRECT, 0));
            put(b, GuestPhysAddr::new(data), 0, desc(data + 512, 8, DESC_F_NEXT, 1));
            put(b, GuestPhysAddr::new(data), 1, desc(data + 512, 8, DESC_F_NEXT, 0));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::ChainTooLong { .. }), "{e}");
    let e = split_case(
        |b, d, avail, data| {
            put(b, d, 0, desc(data, 32, DESC_F_INDIRECT, 0));
            put(b, GuestPhysAddr::new(data), 0, desc(data + 512, 8, DESC_F_NEXT, 7));
            entry(b, avail, 0, 0);
        },
        1,
    );
    assert!(matches!(*e, QueueError::DescIndex { .. }), "{e}");
}

#[test]
fn packed_hostile_chains() {
    // Every slot chained with NEXT: longer than the ring.
    let mut b = Bench::new(true, SIZE, 1 << 20);
    let data = b.ram.alloc(4096, 16).unwrap().raw();
    let RingAddrs::Packed { desc: d, .. } = b.drv.addrs() else { unreachable!() };
    const AVAIL: u16 = 1 << 7;
    for i in 0..u64::from(SIZE) {
        put(&b, d, i, desc(data, 8, 1, AVAIL | DESC_F_NEXT));
    }
    let e = b.queue.process(|qb| qb.pop().map(|c| c.map(|c| c.id))).unwrap().0.unwrap_err();
    assert!(format!("{e}").contains("longer than"), "{e}");

    // An indirect descriptor in the middle of a chain; a nested table; zero length.
    let cases: Vec<(Vec<[u8; 16]>, &str)> = vec![
        (vec![desc(data, 8, 1, AVAIL | DESC_F_NEXT), desc(data + 64, 32, 1, AVAIL | DESC_F_INDIRECT)], "indirect"),
        (vec![desc(data + 1024, 32, 1, AVAIL | DESC_F_INDIRECT)], "nested"),
        (vec![desc(data, 0, 1, AVAIL)], "zero-length"),
    ];
    for (descs, what) in cases {
        let mut b = Bench::new(true, SIZE, 1 << 20);
        let data2 = b.ram.alloc(4096, 16).unwrap().raw();
        assert_eq!(data, data2, "same layout as the first bench");
        // The nested case's table holds an indirect descriptor.
        put(&b, GuestPhysAddr::new(data + 1024), 0, desc(data, 16, 0, DESC_F_INDIRECT));
        let RingAddrs::Packed { desc: d, .. } = b.drv.addrs() else { unreachable!() };
        for (i, x) in descs.iter().enumerate() {
            put(&b, d, i as u64, *x);
        }
        let e = b.queue.process(|qb| qb.pop().map(|c| c.map(|c| c.id))).unwrap().0.unwrap_err();
        assert!(b.queue.broken().is_some(), "{what}: {e}");
    }
    let _ = Driver::Split;
}
