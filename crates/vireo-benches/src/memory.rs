//! `vireo-benches memory`: guest memory translation against rust-vmm's vm-memory, the cost of the
//! protocol's read side, and how long invalidations take with busy readers.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use vireo_memory::{memfd, GuestMemory, GuestPhysAddr, RegionSpec, RetireMode, UserAddr};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use crate::harness::{interleave, percentile, round, time_per_op};

const REGION: u64 = 1 << 20;
const STRIDE: u64 = 2 << 20;

fn lookup(regions: u64, rounds: usize, ops: u64) -> Value {
    let fd = memfd("bench", REGION).expect("memfd");
    let specs: Vec<RegionSpec<'_>> = (0..regions)
        .map(|i| RegionSpec {
            gpa: GuestPhysAddr::new(i * STRIDE),
            size: REGION,
            user_addr: UserAddr::new(i * STRIDE),
            fd: fd.as_fd(),
            fd_offset: 0,
        })
        .collect();
    let vireo = GuestMemory::new(RetireMode::Unmap);
    vireo.set_regions(&specs).expect("regions");
    let map = vireo.map();
    let ranges: Vec<(GuestAddress, usize)> =
        (0..regions).map(|i| (GuestAddress(i * STRIDE), REGION as usize)).collect();
    let peer = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("vm-memory regions");
    // Deterministic, so that both sides translate the same addresses.
    let mut rng = vireo_driver::XorShift::new(0x9e37_79b9_7f4a_7c15);
    let addrs: Vec<u64> = (0..4096).map(|_| (rng.next() % regions) * STRIDE + rng.next() % REGION).collect();
    let mask = addrs.len() as u64 - 1;
    let mut ours = || {
        time_per_op(ops, |i| {
            let a = addrs[(i & mask) as usize];
            black_box(map.translate(GuestPhysAddr::new(black_box(a))).map(|t| t.host));
        })
    };
    let mut theirs = || {
        time_per_op(ops, |i| {
            let a = addrs[(i & mask) as usize];
            black_box(peer.get_host_address(GuestAddress(black_box(a))).ok());
        })
    };
    let runs = interleave(rounds, &mut [&mut ours, &mut theirs]);
    let (v, p) = (runs[0].median(), runs[1].median());
    json!({
        "regions": regions,
        "vireo_ns": round(v),
        "vm_memory_ns": round(p),
        "ratio": round(p / v),
        "vireo_runs": runs[0].json(),
        "vm_memory_runs": runs[1].json(),
    })
}

fn one_region(mode: RetireMode) -> (GuestMemory, std::os::fd::OwnedFd) {
    let fd = memfd("bench", 4 * REGION).expect("memfd");
    let mem = GuestMemory::new(mode);
    mem.set_regions(&[RegionSpec {
        gpa: GuestPhysAddr::new(0),
        size: 4 * REGION,
        user_addr: UserAddr::new(0),
        fd: fd.as_fd(),
        fd_offset: 0,
    }])
    .expect("region");
    (mem, fd)
}

/// The read side: one batch entered and left with a valid cached ring, and the alternatives that
/// were measured when the mechanism was chosen.
fn read_side(rounds: usize, ops: u64) -> Value {
    let (mem, _fd) = one_region(RetireMode::Unmap);
    let mut q = mem.register_queue();
    let ring = [(GuestPhysAddr::new(0x1000), 4096u64)];
    let gate = q.handle();
    let mutex = Mutex::new(0u64);
    let rwlock = RwLock::new(0u64);
    let mut batch = || {
        time_per_op(ops, |_| {
            let b = q.batch(&ring);
            black_box(b.cached().map(|c| c[0].len()));
        })
    };
    let mut gate_only = || {
        time_per_op(ops, |_| {
            black_box(gate.gate().enter());
            gate.gate().leave();
        })
    };
    let mut mutex_batch = || {
        time_per_op(ops, |_| {
            let g = mutex.lock().unwrap();
            black_box(*g);
        })
    };
    let mut rwlock_batch = || {
        time_per_op(ops, |_| {
            let g = rwlock.read().unwrap();
            black_box(*g);
        })
    };
    let runs = interleave(rounds, &mut [&mut batch, &mut gate_only, &mut mutex_batch, &mut rwlock_batch]);
    json!({
        "read_side_ns_per_batch": round(runs[0].median()),
        "read_side_runs": runs[0].json(),
        "alternatives": {
            "gate_enter_leave_ns": round(runs[1].median()),
            "mutex_lock_unlock_ns": round(runs[2].median()),
            "rwlock_read_ns": round(runs[3].median()),
            "gate_runs": runs[1].json(),
            "mutex_runs": runs[2].json(),
            "rwlock_runs": runs[3].json(),
        }
    })
}

/// Invalidation latency (start to end, retirement included) with `readers` threads processing
/// batches continuously through cached rings in the region being retired.
fn invalidate(readers: usize, samples: usize) -> Value {
    let (mem, fd) = one_region(RetireMode::Unmap);
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..readers)
        .map(|r| {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut q = mem.register_queue();
                let ring = [(GuestPhysAddr::new(r as u64 * 4096), 256u64)];
                let mut batches = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let b = q.batch(&ring);
                    // About the work of a small batch of chains: a few dozen ring accesses.
                    match b.cached() {
                        Some(c) => {
                            for i in 0..32 {
                                let v: u64 = c[0].read(i * 8 % 256).unwrap_or(0);
                                let _ = c[0].write(i * 8 % 256, v.wrapping_add(1));
                            }
                        }
                        None => {
                            let mut buf = [0u8; 8];
                            let _ = b.read(GuestPhysAddr::new(r as u64 * 4096), &mut buf);
                        }
                    }
                    batches += 1;
                }
                batches
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let spec = RegionSpec {
        gpa: GuestPhysAddr::new(0),
        size: 4 * REGION,
        user_addr: UserAddr::new(0),
        fd: fd.as_fd(),
        fd_offset: 0,
    };
    let mut us = Vec::with_capacity(samples);
    let mut quiesce_us = Vec::with_capacity(samples);
    let mut total_us = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = std::time::Instant::now();
        mem.set_regions(&[spec]).expect("remap");
        total_us.push(t.elapsed().as_nanos() as f64 / 1000.0);
        us.push(mem.last_invalidation().as_nanos() as f64 / 1000.0);
        quiesce_us.push(mem.last_quiesce().as_nanos() as f64 / 1000.0);
        // Let the readers refill their caches between invalidations.
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let batches: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let (p50, p99, max) = (percentile(&mut us, 50.0), percentile(&mut us, 99.0), percentile(&mut us, 100.0));
    json!({
        "readers": readers,
        "p50": round(p50),
        "p99": round(p99),
        "max": round(max),
        "set_mem_table_p50": round(percentile(&mut total_us, 50.0)),
        "set_mem_table_p99": round(percentile(&mut total_us, 99.0)),
        "quiesce_p50": round(percentile(&mut quiesce_us, 50.0)),
        "quiesce_p99": round(percentile(&mut quiesce_us, 99.0)),
        "samples": samples,
        "reader_batches": batches,
    })
}

/// The `memory` benchmark as one JSON object.
pub fn run(quick: bool) -> Value {
    let (rounds, ops, samples) = if quick { (3, 200_000, 200) } else { (7, 4_000_000, 2000) };
    let lookup: Vec<Value> = [1, 8, 64, 509].iter().map(|&n| lookup(n, rounds, ops)).collect();
    let read = read_side(rounds, ops);
    let inval: Vec<Value> = [1, 2, 8].iter().map(|&n| invalidate(n, samples)).collect();
    json!({
        "lookup": lookup,
        "read_side_ns_per_batch": read["read_side_ns_per_batch"],
        "read_side": read,
        "invalidate_us": inval,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}
