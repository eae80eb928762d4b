//! Inflight tracking across a backend "crash": a queue takes chains, completes some, and is
//! dropped mid-way (as a SIGKILLed process would leave it); a new queue on the same rings and the
//! same inflight region must hand out exactly the chains the driver still waits for, oldest
//! first, and then carry on with new ones. Nothing lost, nothing completed twice.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::Bench;
use proptest::prelude::*;
use vireo_memory::GuestPhysAddr;
use vireo_memory::Mapping;
use vireo_queue::{packed_region_size, split_region_size, InflightRegion, Queue, QueueConfig, RingAddrs, UsedToken};

fn region_size(packed: bool, size: u16) -> u64 {
    if packed {
        packed_region_size(size)
    } else {
        split_region_size(size)
    }
}

fn inflight_area(packed: bool, size: u16) -> (Arc<Mapping>, std::os::fd::OwnedFd) {
    let len = region_size(packed, size);
    let fd = vireo_memory::memfd("inflight", len).unwrap();
    let map = Arc::new(Mapping::from_fd(std::os::fd::AsFd::as_fd(&fd), 0, len).unwrap());
    (map, fd)
}

/// A fresh queue on the bench's rings, as a restarted backend builds it: SET_VRING_BASE with the
/// used position (what QEMU sends after a backend died), then the inflight region.
fn restart(b: &Bench, packed: bool, size: u16, area: &Arc<Mapping>, used: u16) -> Queue {
    let cfg = QueueConfig { size, addrs: b.drv.addrs(), event_idx: false };
    let mut q = Queue::new(b.mem.register_queue(), cfg).unwrap();
    q.set_vring_base(b.drv.restart_base(used)).unwrap();
    let len = usize::try_from(region_size(packed, size)).unwrap();
    q.set_inflight(InflightRegion::new(area.clone(), 0, len).unwrap(), 0).unwrap();
    q
}

/// Runs `steps` against the queue: `Take(n)` pops up to n chains, `Complete(n)` completes the n
/// oldest taken chains in one batch. Returns the chains still taken (in order).
#[derive(Clone, Copy, Debug)]
enum Step {
    Take(u8),
    /// Completes the n oldest taken chains in one batch.
    Complete(u8),
    /// Completes the n newest taken chains in one batch (out of order).
    CompleteNewest(u8),
}

fn run(q: &mut Queue, steps: &[Step], taken: &mut Vec<UsedToken>, completed: &mut Vec<u16>) {
    for &s in steps {
        match s {
            Step::Take(n) => {
                q.process(|qb| {
                    for _ in 0..n {
                        match qb.pop().unwrap() {
                            Some(c) => taken.push(c.token()),
                            None => break,
                        }
                    }
                })
                .unwrap();
            }
            Step::Complete(n) | Step::CompleteNewest(n) => {
                let n = usize::from(n).min(taken.len());
                let batch: Vec<UsedToken> = match s {
                    Step::Complete(_) => taken.drain(..n).collect(),
                    _ => taken.drain(taken.len() - n..).rev().collect(),
                };
                q.process(|qb| {
                    for t in &batch {
                        qb.add_used(*t, 0).unwrap();
                        completed.push(t.id);
                    }
                })
                .unwrap();
            }
        }
    }
}

/// On a packed ring chain `i` has `1 + i % 3` descriptors (or one indirect descriptor when
/// `i % 5 == 4`): its copies in the region are what is resubmitted.
fn crash_and_recover(packed: bool, size: u16, chains: u16, before: &[Step]) {
    let mut b = Bench::new(packed, size, 1 << 20);
    let (area, _fd) = inflight_area(packed, size);
    let len = usize::try_from(region_size(packed, size)).unwrap();
    b.queue.set_inflight(InflightRegion::new(area.clone(), 0, len).unwrap(), 0).unwrap();
    let mut ids = Vec::new();
    let mut ring_descs = 0u16;
    for i in 0..chains {
        let (n, indirect) = if packed { (1 + i % 3, i % 5 == 4) } else { (1, false) };
        let ring_n = if indirect { 1 } else { n };
        if ring_descs + ring_n > size {
            break;
        }
        ring_descs += ring_n;
        let bufs: Vec<_> = (0..n).map(|j| b.buffer(64, j + 1 == n, 1)).collect();
        ids.push(b.drv.add(&mut b.ram, &bufs, indirect).unwrap());
    }
    b.drv.publish(&b.ram);

    let (mut taken, mut completed) = (Vec::new(), Vec::new());
    run(&mut b.queue, before, &mut taken, &mut completed);
    // The driver sees exactly the completed chains.
    let mut seen = Vec::new();
    while let Some(u) = b.drv.pop_used(&b.ram) {
        seen.push(u.id);
    }
    assert_eq!(seen, completed);
    // "Crash": the queue goes away with `taken` in flight.
    let used = u16::try_from(completed.len()).unwrap();
    let mut q = restart(&b, packed, size, &area, used);
    assert!(q.resubmissions_pending() == 0, "recovery runs in the first batch");
    let mut again = Vec::new();
    q.process(|qb| {
        while let Some(c) = qb.pop().unwrap() {
            again.push(c.token());
        }
    })
    .unwrap();
    let taken_ids: Vec<u16> = taken.iter().map(|t| t.id).collect();
    let again_ids: Vec<u16> = again.iter().map(|t| t.id).collect();
    // First the chains in flight, oldest first; then the ones never taken, in ring order.
    assert_eq!(&again_ids[..taken_ids.len()], &taken_ids[..]);
    let rest: Vec<u16> = ids.iter().copied().filter(|i| !completed.contains(i) && !taken_ids.contains(i)).collect();
    assert_eq!(&again_ids[taken_ids.len()..], &rest[..]);
    // Completing everything: each chain reaches the used ring exactly once overall.
    q.process(|qb| {
        for t in &again {
            qb.add_used(*t, 0).unwrap();
        }
    })
    .unwrap();
    while let Some(u) = b.drv.pop_used(&b.ram) {
        seen.push(u.id);
    }
    let unique: BTreeSet<u16> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a chain completed twice: {seen:?}");
    assert_eq!(unique, ids.iter().copied().collect::<BTreeSet<u16>>());
}

#[test]
fn restart_resubmits_what_was_taken_and_not_completed() {
    for packed in [false, true] {
        crash_and_recover(packed, 16, 12, &[Step::Take(8), Step::CompleteNewest(3), Step::Take(2), Step::Complete(1)]);
    }
}

#[test]
fn restart_with_nothing_in_flight_resumes_at_the_used_index() {
    for packed in [false, true] {
        crash_and_recover(packed, 16, 10, &[Step::Take(6), Step::Complete(6)]);
    }
}

#[test]
fn restart_after_a_wrap() {
    for packed in [false, true] {
        crash_and_recover(packed, 8, 8, &[Step::Take(8), Step::Complete(7), Step::Take(1)]);
    }
}

/// A crash after the used index was published but before the region recorded it: the last
/// batch must not be resubmitted.
#[test]
fn crash_between_used_index_and_record() {
    let size = 16u16;
    let mut b = Bench::new(false, size, 1 << 20);
    let (area, _fd) = inflight_area(false, size);
    let len = usize::try_from(split_region_size(size)).unwrap();
    b.queue.set_inflight(InflightRegion::new(area.clone(), 0, len).unwrap(), 0).unwrap();
    for _ in 0..5 {
        let buf = b.buffer(64, false, 1);
        b.drv.add(&mut b.ram, &[buf], false).unwrap();
    }
    b.drv.publish(&b.ram);
    let (mut taken, mut completed) = (Vec::new(), Vec::new());
    run(&mut b.queue, &[Step::Take(5), Step::Complete(3)], &mut taken, &mut completed);
    // Undo the region's record of the last batch (used_idx at offset 14) as if the process died
    // right after publishing the used index; the batch list still names the three heads.
    // SAFETY: the test owns the mapping; nothing else touches it now; every offset is inside
    // the region (16-byte header, 16 bytes per descriptor state).
    unsafe {
        area.as_ptr().add(14).cast::<u16>().write_volatile(0);
        for &id in &completed {
            area.as_ptr().add(16 + 16 * usize::from(id)).write_volatile(1);
        }
    }
    let mut q = restart(&b, false, size, &area, 3);
    let mut again = Vec::new();
    q.process(|qb| {
        while let Some(c) = qb.pop().unwrap() {
            again.push(c.token().id);
        }
    })
    .unwrap();
    assert_eq!(again, taken.iter().map(|t| t.id).collect::<Vec<_>>());
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (0u8..10).prop_map(Step::Take),
            (0u8..10).prop_map(Step::Complete),
            (0u8..10).prop_map(Step::CompleteNewest)
        ],
        0..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn any_crash_point_loses_nothing_and_duplicates_nothing(before in steps(), chains in 1u16..16, packed: bool) {
        crash_and_recover(packed, 16, chains, &before);
    }
}

/// Packed rings: a crash inside the publication of a batch (the ring's first used flags stored
/// or not, the region's `old_*` fields and the heads' `inflight` bytes not yet updated).
/// Published, the batch counts as done; not published, its chains are resubmitted.
#[test]
fn packed_crash_inside_a_publication() {
    for published in [true, false] {
        let size = 16u16;
        let mut b = Bench::new(true, size, 1 << 20);
        let (area, _fd) = inflight_area(true, size);
        let len = usize::try_from(packed_region_size(size)).unwrap();
        b.queue.set_inflight(InflightRegion::new(area.clone(), 0, len).unwrap(), 0).unwrap();
        for _ in 0..5 {
            let buf = b.buffer(64, true, 1);
            b.drv.add(&mut b.ram, &[buf], false).unwrap();
        }
        b.drv.publish(&b.ram);
        let (mut taken, mut completed) = (Vec::new(), Vec::new());
        run(&mut b.queue, &[Step::Take(5)], &mut taken, &mut completed);
        let committed: Vec<u8> = (12..22)
            // SAFETY: the test owns the mapping and nothing else runs on it; bytes 12..22 are in
            // the region's 32-byte header.
            .map(|i| unsafe { area.as_ptr().add(i).read_volatile() })
            .collect();
        run(&mut b.queue, &[Step::Complete(3)], &mut taken, &mut completed);
        // SAFETY: as above; the header bytes and the first three entries' `inflight` bytes (32
        // bytes per entry after the header) are inside the region.
        unsafe {
            for i in [14usize, 15, 18, 19, 21] {
                area.as_ptr().add(i).write_volatile(committed[i - 12]);
            }
            // The first five entries are the heads, taken in order from a fresh list.
            for e in 0..3usize {
                area.as_ptr().add(32 + 32 * e).write_volatile(1);
            }
        }
        if !published {
            // The first used descriptor's flags back to what the driver made available (wrap 1:
            // AVAIL set, USED clear): the driver never saw the batch.
            let RingAddrs::Packed { desc, .. } = b.drv.addrs() else { unreachable!() };
            b.ram.write(GuestPhysAddr::new(desc.raw() + 14), &(1u16 << 7).to_le_bytes()).unwrap();
        }
        let cfg = QueueConfig { size, addrs: b.drv.addrs(), event_idx: false };
        let mut q = Queue::new(b.mem.register_queue(), cfg).unwrap();
        q.set_vring_base(1 << 15).unwrap(); // slot 0, wrap counter 1
        q.set_inflight(InflightRegion::new(area.clone(), 0, len).unwrap(), 0).unwrap();
        let mut again = Vec::new();
        q.process(|qb| {
            while let Some(c) = qb.pop().unwrap() {
                again.push(c.token().id);
            }
        })
        .unwrap();
        let expect: Vec<u16> = if published {
            taken.iter().map(|t| t.id).collect()
        } else {
            completed.iter().copied().chain(taken.iter().map(|t| t.id)).collect()
        };
        assert_eq!(again, expect, "published={published}");
    }
}
