//! Profiling aid for the cached split path: 128,000 one-descriptor chains popped and completed
//! in batches of 128, the device side timed. Under callgrind it gives instructions per chain:
//! `valgrind --tool=callgrind --toggle-collect='probe_pop::main::{{closure}}'
//! target/release/examples/probe_pop`.
//!
//! Environment: `PROBE_ROUNDS` (batches, default 1000), `PROBE_PER_BATCH` (chains per batch),
//! `PROBE_CHAIN=1` (four-descriptor chains), `PROBE_INDIRECT=1` (four buffers behind an indirect
//! table), `PROBE_EACH=1` (through `pop_each`), `PROBE_SINGLES=1` (through `complete_singles`),
//! `PROBE_EMPTY=1` (batches with nothing to do: what a batch costs by itself, with the clock).
#![allow(clippy::cast_precision_loss)]
use vireo_driver::{Buffer, GuestRam, SplitDriver};
use vireo_memory::{GuestMemory, RetireMode};
use vireo_queue::{Queue, QueueConfig, RingAddrs, UsedToken};

fn main() {
    let mut ram = GuestRam::single(4 << 20).expect("guest RAM");
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&ram.specs()).expect("regions");
    let mut drv = SplitDriver::new(&mut ram, 256).expect("driver");
    let (desc, avail, used) = drv.addrs();
    let mut q = Queue::new(
        mem.register_queue(),
        QueueConfig { size: 256, addrs: RingAddrs::Split { desc, avail, used }, event_idx: true },
    )
    .expect("queue");
    let gpa = ram.alloc(512, 64).expect("buffer");
    let buf = Buffer { gpa, len: 512, writable: true };
    // PROBE_INDIRECT=1: four-buffer chains through indirect tables instead.
    let indirect = std::env::var("PROBE_INDIRECT").is_ok();
    // PROBE_CHAIN=1: four-descriptor chains in the ring.
    let chain = std::env::var("PROBE_CHAIN").is_ok();
    // PROBE_EACH=1: through `pop_each` instead of `pop` and `add_used`.
    let each = std::env::var("PROBE_EACH").is_ok();
    // PROBE_SINGLES=1: through `complete_singles`.
    let singles = std::env::var("PROBE_SINGLES").is_ok();
    let empty = std::env::var("PROBE_EMPTY").is_ok();
    let four: Vec<Buffer> =
        (0..4).map(|_| Buffer { gpa: ram.alloc(512, 64).expect("buffer"), len: 512, writable: true }).collect();
    let (mut total, mut ns) = (0usize, 0u128);
    let rounds: usize = std::env::var("PROBE_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1000);
    for _ in 0..rounds {
        // PROBE_EMPTY=1: batches with nothing available (the fixed cost of a batch).
        let per_batch = if empty {
            0
        } else if let Some(n) = std::env::var("PROBE_PER_BATCH").ok().and_then(|n| n.parse().ok()) {
            n
        } else if chain {
            64
        } else {
            128
        };
        for _ in 0..per_batch {
            if chain {
                drv.add(&ram, &four).expect("add");
            } else if indirect {
                drv.add_indirect(&mut ram, &four).expect("add");
            } else {
                drv.add(&ram, &[buf]).expect("add");
            }
        }
        drv.publish(&ram, true).expect("publish");
        let t0 = std::time::Instant::now();
        let (n, _) = q
            .process(|qb| {
                if singles {
                    return qb.complete_singles(usize::MAX, |_| 512);
                }
                if each {
                    return qb.pop_each(usize::MAX, |c| Some(c.writable_len())).expect("pop_each");
                }
                let mut n = 0usize;
                while let Some(c) = qb.pop().expect("pop") {
                    let t: UsedToken = c.token();
                    qb.add_used(t, 512).expect("used");
                    n += 1;
                }
                n
            })
            .expect("batch");
        ns += t0.elapsed().as_nanos();
        total += n;
        while drv.pop_used(&ram).expect("used").is_some() {}
    }
    if empty {
        println!("{:.2} ns per batch with nothing to do", ns as f64 / rounds as f64);
    } else {
        println!("{:.2} ns per chain (cached split path)", ns as f64 / total as f64);
    }
}
