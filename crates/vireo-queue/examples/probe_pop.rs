//! Profiling aid for the cached split path: 128,000 one-descriptor chains popped and completed
//! in batches of 128, the device side timed. Under callgrind it gives instructions per chain:
//! `valgrind --tool=callgrind target/release/examples/probe_pop`.
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
        QueueConfig { size: 256, addrs: RingAddrs::Split { desc, avail, used }, event_idx: true, ring_log_addr: None },
    )
    .expect("queue");
    let gpa = ram.alloc(512, 64).expect("buffer");
    let buf = Buffer { gpa, len: 512, writable: true };
    // PROBE_INDIRECT=1: four-buffer chains through indirect tables instead.
    let indirect = std::env::var("PROBE_INDIRECT").is_ok();
    let four: Vec<Buffer> =
        (0..4).map(|_| Buffer { gpa: ram.alloc(512, 64).expect("buffer"), len: 512, writable: true }).collect();
    let (mut total, mut ns) = (0usize, 0u128);
    for _ in 0..1000 {
        for _ in 0..128 {
            if indirect {
                drv.add_indirect(&mut ram, &four).expect("add");
            } else {
                drv.add(&ram, &[buf]).expect("add");
            }
        }
        drv.publish(&ram, true).expect("publish");
        let t0 = std::time::Instant::now();
        let (n, _) = q
            .process(|qb| {
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
    assert_eq!(total, 128_000);
    println!("{:.2} ns per chain (pop + add used, cached split path)", ns as f64 / 128_000.0);
}
