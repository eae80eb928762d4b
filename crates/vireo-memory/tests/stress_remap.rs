//! The stress test of the invalidation protocol under load: worker threads process continuously
//! through cached and pinned pointers while the control thread changes the memory map (a new
//! memory table remapping the same memfds at new addresses, and region removal + re-add) a
//! hundred thousand times, with every retired mapping turned `PROT_NONE`. A late access through a
//! stale pointer would fault and kill the test; a lost or misdirected access shows in the
//! counters, which are checked against the memfds themselves; memory is checked flat.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{map_count, rss_bytes, Backing};
use vireo_memory::{GuestMemory, GuestPhysAddr, MemoryError, RetireMode, UserAddr};

const RING_BASE: u64 = 0;
const BUF_BASE: u64 = 1 << 20;
const SIZE: u64 = 256 << 10;
const WORKERS: u64 = 2;

#[derive(Default, Debug)]
struct WorkerStats {
    ring_incs: u64,
    buf_incs: u64,
    cached_batches: u64,
    translating_batches: u64,
    buf_absent: u64,
}

fn worker(mem: GuestMemory, w: u64, stop: Arc<AtomicBool>) -> WorkerStats {
    let mut q = mem.register_queue();
    let ring_gpa = GuestPhysAddr::new(RING_BASE + w * 4096);
    let buf_gpa = GuestPhysAddr::new(BUF_BASE + w * 4096);
    let mut st = WorkerStats::default();
    while !stop.load(Ordering::Relaxed) {
        let batch = q.batch(&[(ring_gpa, 64)]);
        if let Some(c) = batch.cached() {
            let v: u64 = c[0].read(0).unwrap();
            c[0].write(0, v + 1).unwrap();
            st.cached_batches += 1;
        } else {
            let mut b = [0u8; 8];
            batch.read(ring_gpa, &mut b).unwrap();
            batch.write(ring_gpa, &(u64::from_ne_bytes(b) + 1).to_ne_bytes()).unwrap();
            st.translating_batches += 1;
        }
        st.ring_incs += 1;
        match batch.translate(buf_gpa, 8) {
            Ok(s) => {
                let v: u64 = s.read(0).unwrap();
                s.write(0, v + 1).unwrap();
                st.buf_incs += 1;
            }
            Err(MemoryError::Unmapped { .. }) => st.buf_absent += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    st
}

#[test]
fn remap_under_load_with_prot_none_retirement() {
    let remaps: u64 = std::env::var("VIREO_STRESS_REMAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let ring = Backing::new(RING_BASE, SIZE, 0x7000_0000_0000);
    let buf = Backing::new(BUF_BASE, SIZE, 0x7100_0000_0000);
    let mem = GuestMemory::new(RetireMode::ProtNone { keep: 256 });
    mem.set_regions(&[ring.spec(), buf.spec()]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || worker(mem, w, stop))
        })
        .collect();

    let started = Instant::now();
    let warm_up = remaps.min(2_000);
    let (mut rss_warm, mut maps_warm) = (0, 0);
    for i in 0..remaps {
        if i == warm_up {
            (rss_warm, maps_warm) = (rss_bytes(), map_count());
        }
        // The frontend's user addresses move on every table change, as they would when QEMU
        // re-creates its RAM blocks; guest physical addresses stay.
        let shift = (i % 1024) * (SIZE * 2);
        if i % 2 == 0 {
            mem.set_regions(&[ring.spec_at_user(0x7000_0000_0000 + shift), buf.spec_at_user(0x7100_0000_0000 + shift)])
                .unwrap();
        } else {
            let map = mem.map();
            let b = map.regions().iter().find(|r| r.gpa().raw() == BUF_BASE).unwrap().clone();
            mem.remove_region(b.gpa(), b.size(), b.user_addr()).unwrap();
            mem.add_region(&buf.spec_at_user(0x7100_0000_0000 + shift)).unwrap();
        }
    }
    let elapsed = started.elapsed();
    let (rss_end, maps_end) = (rss_bytes(), map_count());
    stop.store(true, Ordering::Relaxed);
    let stats: Vec<WorkerStats> = workers.into_iter().map(|h| h.join().unwrap()).collect();

    let ring_bytes = ring.read_all();
    let buf_bytes = buf.read_all();
    for (w, st) in stats.iter().enumerate() {
        let off = w * 4096;
        let ring_val = u64::from_ne_bytes(ring_bytes[off..off + 8].try_into().unwrap());
        let buf_val = u64::from_ne_bytes(buf_bytes[off..off + 8].try_into().unwrap());
        assert_eq!(ring_val, st.ring_incs, "worker {w}: ring increments lost or duplicated: {st:?}");
        assert_eq!(buf_val, st.buf_incs, "worker {w}: buffer increments lost or duplicated: {st:?}");
        assert!(st.cached_batches > 0, "worker {w} never used the cached path: {st:?}");
        eprintln!("worker {w}: {st:?}");
    }
    // Misdirected accesses would have landed somewhere else in the files.
    for (name, bytes) in [("ring", &ring_bytes), ("buf", &buf_bytes)] {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            if (i * 8) % 4096 != 0 || (i * 8) / 4096 >= WORKERS as usize {
                assert!(chunk.iter().all(|&b| b == 0), "{name}: stray write at offset {:#x}", i * 8);
            }
        }
    }
    eprintln!(
        "{remaps} remaps in {elapsed:?} ({:.1} us each); rss {rss_warm} -> {rss_end}; maps {maps_warm} -> {maps_end}; live guest mappings {}",
        elapsed.as_secs_f64() * 1e6 / remaps as f64,
        vireo_memory::live_mappings()
    );
    if remaps > warm_up {
        assert!(maps_end <= maps_warm + 8, "mappings grew with remaps: {maps_warm} -> {maps_end}");
        assert!(rss_end <= rss_warm + (16 << 20), "memory grew with remaps: {rss_warm} -> {rss_end}");
    }
    // Two live regions plus at most the quarantine.
    assert!(vireo_memory::live_mappings() <= 2 + 256);
}

#[test]
fn user_address_lookup_follows_remaps() {
    let ring = Backing::new(RING_BASE, SIZE, 0x7000_0000_0000);
    let mem = GuestMemory::new(RetireMode::ProtNone { keep: 16 });
    for i in 0..64u64 {
        let user = 0x7000_0000_0000 + i * SIZE;
        mem.set_regions(&[ring.spec_at_user(user)]).unwrap();
        assert_eq!(mem.map().user_to_gpa(UserAddr::new(user + 0x10)).unwrap(), GuestPhysAddr::new(0x10));
    }
}
