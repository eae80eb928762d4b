//! The device side of split and packed queues against the model driver: chains in and out,
#![allow(clippy::cast_possible_truncation)] // small test values
//! direct and indirect, out-of-order completion, wrap-around, state save/restore, and the
//! translating path.

mod common;

use common::Bench;
use proptest::prelude::*;
use vireo_driver::{Buffer, GuestRam};
use vireo_memory::GuestPhysAddr;
use vireo_queue::{QueueState, UsedToken};

/// The device's work for one chain: read the readable part, write its bytes + 1 into the
/// writable part; returns (token, bytes written).
fn serve(b: &mut Bench) -> Vec<(UsedToken, u32)> {
    let (done, _) = b
        .queue
        .process(|qb| {
            let mut done = Vec::new();
            let mem = qb.memory();
            while let Some(chain) = qb.pop().unwrap() {
                let mut data = vec![0u8; chain.readable_len() as usize];
                assert_eq!(chain.read_at(0, &mut data), data.len());
                let reply: Vec<u8> =
                    data.iter().map(|x| x.wrapping_add(1)).take(chain.writable_len() as usize).collect();
                let n = chain.write_at(0, &reply) as u32;
                chain.log_written(mem, n).unwrap();
                done.push((chain.token(), n));
            }
            done
        })
        .unwrap();
    done
}

fn complete(b: &mut Bench, tokens: &[(UsedToken, u32)]) -> bool {
    let ((), notify) = b
        .queue
        .process(|qb| {
            for &(t, n) in tokens {
                qb.add_used(t, n).unwrap();
            }
        })
        .unwrap();
    notify
}

fn roundtrip(packed: bool, indirect: bool, translating: bool) {
    let mut b = Bench::new(packed, 16, 1 << 20);
    b.queue.set_force_translating(translating);
    for round in 0..100u32 {
        let fill = round as u8;
        let r1 = b.buffer(100, false, fill);
        let r2 = b.buffer(28, false, fill);
        let w = b.buffer(128, true, 0);
        let id = b.drv.add(&mut b.ram, &[r1, r2, w], indirect).unwrap();
        b.drv.publish(&b.ram);
        let done = serve(&mut b);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0.id, id);
        assert!(complete(&mut b, &done));
        let used = b.drv.pop_used(&b.ram).expect("used element");
        assert_eq!((used.id, used.len), (id, 128));
        assert_eq!(b.read(w.gpa, 128), vec![fill.wrapping_add(1); 128]);
        assert!(b.drv.pop_used(&b.ram).is_none());
    }
}

#[test]
fn split_direct() {
    roundtrip(false, false, false);
}
#[test]
fn split_indirect() {
    roundtrip(false, true, false);
}
#[test]
fn packed_direct() {
    roundtrip(true, false, false);
}
#[test]
fn packed_indirect() {
    roundtrip(true, true, false);
}
#[test]
fn split_translating() {
    roundtrip(false, false, true);
    roundtrip(false, true, true);
}
#[test]
fn packed_translating() {
    roundtrip(true, false, true);
    roundtrip(true, true, true);
}

/// Enough chains to wrap the 16-bit split indices and the packed wrap counters many times.
fn wrap_around(packed: bool) {
    let mut b = Bench::new(packed, 8, 1 << 20);
    let r = b.buffer(16, false, 7);
    let w = b.buffer(16, true, 0);
    let mut next_check = 0u32;
    for i in 0..70_000u32 {
        let n = 1 + (i % 3) as usize;
        let bufs: Vec<Buffer> = std::iter::repeat_n(r, n - 1).chain(std::iter::once(w)).collect();
        let id = b.drv.add(&mut b.ram, &bufs, false).unwrap();
        b.drv.publish(&b.ram);
        let done = serve(&mut b);
        assert_eq!(done.len(), 1, "chain {i}");
        assert_eq!(done[0].0.id, id);
        complete(&mut b, &done);
        let u = b.drv.pop_used(&b.ram).unwrap();
        assert_eq!(u.id, id);
        next_check += 1;
    }
    assert_eq!(next_check, 70_000);
    assert_eq!(b.drv.free(), 8);
}

#[test]
fn split_wraps_around() {
    wrap_around(false);
}
#[test]
fn packed_wraps_around() {
    wrap_around(true);
}

#[test]
fn state_round_trips_through_vring_base() {
    for packed in [false, true] {
        let mut b = Bench::new(packed, 8, 1 << 20);
        let w = b.buffer(8, true, 0);
        for _ in 0..11 {
            b.drv.add(&mut b.ram, &[w], false).unwrap();
            b.drv.publish(&b.ram);
            let done = serve(&mut b);
            complete(&mut b, &done);
            b.drv.pop_used(&b.ram).unwrap();
        }
        let base = b.queue.vring_base();
        let state = b.queue.state();
        if packed {
            // 11 chains on a ring of 8: slot 3, wrap counter flipped once.
            assert_eq!(state, QueueState { next_avail: 3, next_used: 3, avail_wrap: false, used_wrap: false });
            assert_eq!(base, 3 | (3 << 16));
        } else {
            assert_eq!(base, 11);
        }
        // A fresh queue on the same rings, restored from the base, carries on.
        let mut q2 = vireo_queue::Queue::new(b.mem.register_queue(), *b.queue.config()).unwrap();
        q2.set_vring_base(base).unwrap();
        b.queue = q2;
        let id = b.drv.add(&mut b.ram, &[w], false).unwrap();
        b.drv.publish(&b.ram);
        let done = serve(&mut b);
        assert_eq!(done[0].0.id, id);
        complete(&mut b, &done);
        assert_eq!(b.drv.pop_used(&b.ram).unwrap().id, id);
    }
}

#[test]
fn rings_across_regions_use_the_translating_path() {
    for packed in [false, true] {
        let mut ram = GuestRam::new(&[(0, 1 << 20), (1 << 20, 1 << 20)]).unwrap();
        // Put the rings where they straddle the boundary.
        ram.alloc_at(GuestPhysAddr::new((1 << 20) - 64)).unwrap();
        let mut b = Bench::with_ram(packed, 16, ram);
        let w = b.buffer(64, true, 0);
        let r = b.buffer(64, false, 9);
        let id = b.drv.add(&mut b.ram, &[r, w], false).unwrap();
        b.drv.publish(&b.ram);
        let (cached, _) = b.queue.process(|qb| qb.is_cached()).unwrap();
        assert!(!cached, "a ring spanning two regions cannot be cached");
        let done = serve(&mut b);
        complete(&mut b, &done);
        assert_eq!(b.drv.pop_used(&b.ram).unwrap().id, id);
        assert_eq!(b.read(w.gpa, 64), vec![10; 64]);
    }
}

#[test]
fn memory_table_change_under_a_running_queue() {
    for packed in [false, true] {
        let mut b = Bench::new(packed, 16, 1 << 20);
        let w = b.buffer(8, true, 0);
        for i in 0..50 {
            let id = b.drv.add(&mut b.ram, &[w], false).unwrap();
            b.drv.publish(&b.ram);
            // The frontend remaps guest memory between kick and completion.
            b.mem.set_regions(&b.ram.specs()).unwrap();
            let done = serve(&mut b);
            if i % 2 == 0 {
                b.mem.set_regions(&b.ram.specs()).unwrap();
            }
            complete(&mut b, &done);
            assert_eq!(b.drv.pop_used(&b.ram).unwrap().id, id);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Add a chain of `n` readable and `m` writable buffers (at least one in all).
    Add { readable: u8, writable: u8, indirect: bool },
    /// The device pops what is available.
    Serve,
    /// The device completes the `k`-th of its outstanding chains.
    Complete(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 0u8..3, any::<bool>()).prop_map(|(readable, writable, indirect)| Op::Add { readable, writable, indirect }),
        2 => Just(Op::Serve),
        3 => any::<prop::sample::Index>().prop_map(Op::Complete),
    ]
}

fn run_ops(packed: bool, translating: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut b = Bench::new(packed, 16, 4 << 20);
    b.queue.set_force_translating(translating);
    let mut expected: std::collections::HashMap<u16, (u8, Buffer, u32)> = Default::default();
    let mut outstanding: Vec<(UsedToken, u32)> = Vec::new();
    let mut completed = 0usize;
    let mut seq = 0u8;
    for op in ops {
        match op {
            Op::Add { readable, writable, indirect } => {
                seq = seq.wrapping_add(1);
                let (nr, nw) = (*readable as usize, (*writable).max(1) as usize);
                let mut bufs = Vec::new();
                for _ in 0..nr {
                    bufs.push(b.buffer(24, false, seq));
                }
                let mut w0 = None;
                for i in 0..nw {
                    let w = b.buffer(16, true, 0);
                    if i == 0 {
                        w0 = Some(w);
                    }
                    bufs.push(w);
                }
                let need = if *indirect { 1 } else { bufs.len() };
                if b.drv.free() < need {
                    continue;
                }
                let Ok(id) = b.drv.add(&mut b.ram, &bufs, *indirect) else { continue };
                b.drv.publish(&b.ram);
                let written = (24 * nr as u32).min(16 * nw as u32);
                expected.insert(id, (seq, w0.unwrap(), written));
            }
            Op::Serve => outstanding.extend(serve(&mut b)),
            Op::Complete(k) => {
                if !outstanding.is_empty() {
                    let t = outstanding.remove(k.index(outstanding.len()));
                    complete(&mut b, &[t]);
                    while let Some(u) = b.drv.pop_used(&b.ram) {
                        let (seq, w0, written) = expected.remove(&u.id).expect("used id in flight");
                        prop_assert_eq!(u.len, written);
                        if written > 0 {
                            let got = b.read(w0.gpa, 1);
                            prop_assert_eq!(got[0], seq.wrapping_add(1));
                        }
                        completed += 1;
                    }
                }
            }
        }
    }
    prop_assert!(completed <= ops.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn split_random_ops(ops in prop::collection::vec(op(), 1..120), translating in any::<bool>()) {
        run_ops(false, translating, &ops)?;
    }
    #[test]
    fn packed_random_ops(ops in prop::collection::vec(op(), 1..120), translating in any::<bool>()) {
        run_ops(true, translating, &ops)?;
    }
}

/// `complete_singles` hands out the same chains `pop` would, with the same buffers, as long as
/// they are one descriptor each; it stops at the first chain of another shape (which `pop` then
/// takes) and at a bad head (which `pop` then reports); the used ring is the one `add_used`
/// would leave.
#[test]
fn batched_singles_match_pop() {
    let mut b = Bench::new(false, 16, 1 << 20);
    let mut expect = Vec::new();
    // Six single-descriptor chains (readable and writable), then a two-descriptor one, then two
    // more singles.
    for i in 0..6u8 {
        let buf = b.buffer(64 + u32::from(i), i % 2 == 0, i);
        expect.push((b.drv.add(&mut b.ram, &[buf], false).unwrap(), buf));
    }
    let pair = [b.buffer(16, false, 9), b.buffer(16, true, 9)];
    let pair_id = b.drv.add(&mut b.ram, &pair, false).unwrap();
    for i in 0..2u8 {
        let buf = b.buffer(32, true, 20 + i);
        expect.push((b.drv.add(&mut b.ram, &[buf], false).unwrap(), buf));
    }
    b.drv.publish(&b.ram);
    let (seen, _) = b
        .queue
        .process(|qb| {
            let mut seen: Vec<(u16, bool, u64, usize)> = Vec::new();
            let n = qb.complete_singles(16, |s| {
                seen.push((s.id, s.writable, s.phys.raw(), s.buf.len()));
                // The used length is what the device says it wrote: here the buffer's length.
                s.buf.len() as u32
            });
            assert_eq!(n, 6);
            // The pair: `pop` takes it.
            let t = qb.pop().unwrap().unwrap().token();
            assert_eq!(t.id, pair_id);
            qb.add_used(t, 0).unwrap();
            let m = qb.complete_singles(16, |s| {
                seen.push((s.id, s.writable, s.phys.raw(), s.buf.len()));
                7
            });
            assert_eq!(m, 2);
            assert_eq!(qb.complete_singles(16, |_| 0), 0, "nothing left");
            seen
        })
        .unwrap();
    let want: Vec<(u16, bool, u64, usize)> =
        expect.iter().map(|(id, buf)| (*id, buf.writable, buf.gpa.raw(), buf.len as usize)).collect();
    assert_eq!(seen, want);
    let mut used = Vec::new();
    while let Some(u) = b.drv.pop_used(&b.ram) {
        used.push((u.id, u.len));
    }
    let mut want_used: Vec<(u16, u32)> = expect[..6].iter().map(|(id, buf)| (*id, buf.len)).collect();
    want_used.push((pair_id, 0));
    want_used.extend(expect[6..].iter().map(|(id, _)| (*id, 7)));
    assert_eq!(used, want_used);

    // A head out of range: `complete_singles` stops short of it, `pop` breaks the queue on it.
    let mut b = Bench::new(false, 16, 1 << 20);
    let buf = b.buffer(64, true, 1);
    b.drv.add(&mut b.ram, &[buf], false).unwrap();
    b.drv.publish(&b.ram);
    let common::Driver::Split(d) = &b.drv else { unreachable!() };
    let (_, avail, _) = d.addrs();
    b.ram.write(GuestPhysAddr::new(avail.raw() + 4), &99u16.to_le_bytes()).unwrap();
    b.queue
        .process(|qb| {
            assert_eq!(qb.complete_singles(4, |_| 0), 0);
            assert!(qb.pop().is_err());
        })
        .unwrap();
}

/// `complete_singles` walks the rings in runs that stop where either ring wraps; with the used
/// index behind the available one (a chain held in flight), the two wrap at different chains.
/// Every chain completes once, with its length, in the order completed; `pop_each` does the same.
#[test]
fn batch_completions_across_the_wrap() {
    for each in [false, true] {
        let mut b = Bench::new(false, 8, 1 << 20);
        let mut held: Option<UsedToken> = None;
        for round in 0..6u8 {
            let mut ids = Vec::new();
            for i in 0..5u8 {
                let buf = b.buffer(16 + u32::from(i), true, round);
                ids.push((b.drv.add(&mut b.ram, &[buf], false).unwrap(), buf.len));
            }
            b.drv.publish(&b.ram);
            // The held chain of the round before completes first, then the four after this
            // round's first, which is held in flight: the used index trails by one.
            let mut expect: Vec<(u16, u32)> = held.iter().map(|t| (t.id, 1)).collect();
            expect.extend(ids[1..].iter().copied());
            let ((), _) = b
                .queue
                .process(|qb| {
                    if let Some(t) = held.take() {
                        qb.add_used(t, 1).unwrap();
                    }
                    let c = qb.pop().unwrap().unwrap();
                    assert_eq!(c.token().id, ids[0].0);
                    held = Some(c.token());
                    let n = if each {
                        qb.pop_each(8, |c| Some(c.writable_len())).unwrap()
                    } else {
                        qb.complete_singles(8, |s| s.buf.len() as u32)
                    };
                    assert_eq!(n, 4);
                })
                .unwrap();
            let mut got = Vec::new();
            while let Some(u) = b.drv.pop_used(&b.ram) {
                got.push((u.id, u.len));
            }
            assert_eq!(got, expect, "round {round}, through pop_each: {each}");
        }
    }
}

/// A buffer write the dirty log cannot record (the frontend's log is smaller than guest memory)
/// breaks the queue, and its chain is taken but never completed, whichever path serves it: a
/// write the log lacks is never exposed to the driver.
#[test]
fn an_unloggable_write_breaks_the_queue_on_every_path() {
    use std::os::fd::AsFd;
    let cases =
        [(false, false, true), (true, false, true), (false, true, true), (false, false, false), (false, true, false)];
    for (translating, singles, with_log) in cases {
        let mut b = Bench::new(false, 16, 1 << 20);
        // One byte of log: the first 8 pages (32 KiB), where the rings are; or logging on with no
        // log at all (VHOST_F_LOG_ALL before any SET_LOG_BASE), where nothing can be recorded.
        let log = vireo_memory::memfd("log", 4096).unwrap();
        if with_log {
            b.mem.set_dirty_log(log.as_fd(), 0, 1).unwrap();
        }
        b.mem.set_logging(true);
        b.queue.set_force_translating(translating);
        b.ram.alloc(64 << 10, 4096).unwrap();
        let logged = b.buffer(64, true, 1);
        assert!(logged.gpa.raw() >= 32 << 10, "the buffer lies beyond the log");
        b.drv.add(&mut b.ram, &[logged], false).unwrap();
        b.drv.publish(&b.ram);
        let (res, _) = b
            .queue
            .process(|qb| {
                if singles {
                    Ok(qb.complete_singles(4, |s| s.buf.len() as u32))
                } else {
                    qb.pop_each(4, |c| Some(c.writable_len()))
                }
            })
            .unwrap();
        let what = format!("translating {translating}, complete_singles {singles}, log {with_log}: {res:?}");
        let why = if with_log { "BeyondLog" } else { "NoDirtyLog" };
        match res {
            Ok(n) => assert!(singles && n == 0, "{what}"),
            Err(e) => assert!(!singles && format!("{e:?}").contains(why), "{what}"),
        }
        assert!(b.queue.broken().is_some(), "{what}");
        assert!(b.drv.pop_used(&b.ram).is_none(), "{what}: the chain was completed");
    }
}

/// A packed queue's positions are ring slots: a state with a slot past the size is refused (the
/// cached loops write the used descriptor at `next_used` directly).
#[test]
fn packed_positions_beyond_the_size_are_refused() {
    let mut b = Bench::new(true, 8, 1 << 20);
    let good = QueueState { next_avail: 7, next_used: 3, avail_wrap: false, used_wrap: true };
    b.queue.set_state(good).unwrap();
    assert_eq!(b.queue.state(), good);
    for bad in [QueueState { next_used: 8, ..good }, QueueState { next_avail: 4000, ..good }] {
        assert!(b.queue.set_state(bad).is_err(), "{bad:?}");
        assert_eq!(b.queue.state(), good, "a refused state changes nothing");
    }
}

/// A packed ring under IN_ORDER: completions that wrote nothing, taken in order, are published as
/// one used descriptor at the first one's place with the last one's id (2.8.23); one that wrote
/// something gets a descriptor of its own, and later ones fold into nothing before it.
#[test]
fn packed_in_order_completions_that_wrote_nothing_are_one_descriptor() {
    let mut b = Bench::new(true, 16, 1 << 20);
    b.queue.set_in_order(true);
    let r = b.buffer(64, false, 1);
    let w = b.buffer(64, true, 0);
    let (desc, _, _) = match b.drv.addrs() {
        vireo_queue::RingAddrs::Packed { desc, driver, device } => (desc, driver, device),
        _ => unreachable!(),
    };
    // Chains of 1, 2 and 1 descriptors (positions 0, 1-2, 3), then one that writes (4-5).
    let ids: Vec<u16> = [&[r][..], &[r, r][..], &[r][..], &[r, w][..]]
        .iter()
        .map(|bufs| b.drv.add(&mut b.ram, bufs, false).unwrap())
        .collect();
    b.drv.publish(&b.ram);
    let ((), _) = b
        .queue
        .process(|qb| {
            let mut tokens = Vec::new();
            while let Some(chain) = qb.pop().unwrap() {
                tokens.push((chain.token(), chain.writable_len()));
            }
            assert_eq!(tokens.len(), 4);
            // Transmit-like completions first, then the writing one on its own.
            qb.add_used_many(tokens[..3].iter().map(|&(t, _)| (t, 0))).unwrap();
            qb.add_used_many(std::iter::once((tokens[3].0, 64))).unwrap();
        })
        .unwrap();
    let at = |slot: u64| {
        let bytes = b.read(GuestPhysAddr::new(desc.raw() + 16 * slot), 16);
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        let id = u16::from_le_bytes(bytes[12..14].try_into().unwrap());
        let flags = u16::from_le_bytes(bytes[14..16].try_into().unwrap());
        (len, id, flags)
    };
    const USED_BOTH: u16 = (1 << 7) | (1 << 15);
    let (len, id, flags) = at(0);
    assert_eq!((len, id, flags & USED_BOTH), (0, ids[2], USED_BOTH), "one used descriptor, the last id");
    for slot in 1..4 {
        assert_ne!(at(slot).2 & USED_BOTH, USED_BOTH, "position {slot} is not written as used");
    }
    let (len, id, flags) = at(4);
    assert_eq!((len, id, flags & USED_BOTH), (64, ids[3], USED_BOTH), "a chain that wrote has its own");
    assert_eq!(b.queue.state().next_used, 6, "the device's position moved past every descriptor");
}

/// Re-enabling notifications on a packed ring reports a chain the driver made available while
/// they were off (the worker would otherwise sleep on it, the driver having seen notifications
/// off and not kicked), and does not report chains the device gave back, until a new one comes.
#[test]
fn packed_enable_notification_reports_new_chains_and_not_those_given_back() {
    let mut b = Bench::new(true, 16, 1 << 20);
    let r = b.buffer(64, false, 1);
    let Bench { ram, drv, queue, .. } = &mut b;
    for round in 0..20 {
        let ((), _) = queue
            .process(|qb| {
                qb.disable_notification().unwrap();
                drv.add(ram, &[r, r, r], false).unwrap();
                drv.publish(ram);
                assert!(qb.enable_notification().unwrap(), "round {round}: a chain made available meanwhile");
                let start = qb.avail_position();
                assert!(qb.pop().unwrap().is_some());
                qb.rewind(start).unwrap();
                assert!(!qb.enable_notification().unwrap(), "round {round}: only the chain given back");
                drv.add(ram, &[r], false).unwrap();
                drv.publish(ram);
                assert!(qb.enable_notification().unwrap(), "round {round}: a new chain after the one given back");
                let mut tokens = Vec::new();
                while let Some(c) = qb.pop().unwrap() {
                    tokens.push(c.token());
                }
                assert_eq!(tokens.len(), 2);
                for t in tokens {
                    qb.add_used(t, 0).unwrap();
                }
            })
            .unwrap();
        while drv.pop_used(ram).is_some() {}
    }
}
