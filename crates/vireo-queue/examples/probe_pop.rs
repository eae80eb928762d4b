//! Profiling aid: pops and completes one-descriptor chains on the cached path only
//! (`valgrind --tool=callgrind target/release/examples/probe_pop`).
use vireo_driver::{Buffer, GuestRam, SplitDriver};
use vireo_memory::{GuestMemory, RetireMode};
use vireo_queue::{Queue, QueueConfig, RingAddrs};

fn main() {
    let mut ram = GuestRam::single(4 << 20).unwrap();
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&ram.specs()).unwrap();
    let mut drv = SplitDriver::new(&mut ram, 256).unwrap();
    let (desc, avail, used) = drv.addrs();
    let mut q = Queue::new(
        mem.register_queue(),
        QueueConfig { size: 256, addrs: RingAddrs::Split { desc, avail, used }, event_idx: true, ring_log_addr: None },
    )
    .unwrap();
    let gpa = ram.alloc(512, 64).unwrap();
    let buf = Buffer { gpa, len: 512, writable: true };
    let mut total = 0u64;
    let mode = std::env::var("PROBE").unwrap_or_default();
    let mut ns = 0u128;
    for _ in 0..1000 {
        for _ in 0..128 {
            drv.add(&ram, &[buf]).unwrap();
        }
        drv.publish(&ram, true).unwrap();
        let t0 = std::time::Instant::now();
        let (n, _) = q
            .process(|qb| {
                let mut n = 0u64;
                let mut toks = [None; 128];
                while let Some(c) = qb.pop().unwrap() {
                    toks[n as usize] = Some(c.token());
                    n += 1;
                }
                if mode != "pop" {
                    for t in toks.iter().flatten() {
                        qb.add_used(*t, 512).unwrap();
                    }
                }
                n
            })
            .unwrap();
        ns += t0.elapsed().as_nanos();
        if mode == "pop" {
            q.process(|qb| {
                for i in 0..128u16 {
                    let _ = i;
                }
                let _ = qb;
            })
            .unwrap();
        }
        total += n;
        while drv.pop_used(&ram).unwrap().is_some() {}
    }
    assert_eq!(total, 128_000);
    println!("{mode}: {:.2} ns per chain", ns as f64 / 128_000.0);
}
