//! The stress test of the invalidation protocol under load (`src/stress.rs` is the workload):
//! worker threads process continuously through cached and pinned pointers while the control
//! thread changes the memory map a hundred thousand times, with every retired mapping turned
//! `PROT_NONE`. A late access through a stale pointer would fault and kill the test; a lost or
//! misdirected access shows in the counters, which are read back from the memfds themselves;
//! memory must stay flat.

mod common;

use vireo_memory::stress::{run, StressConfig};
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode, UserAddr};

#[test]
fn remap_under_load_with_prot_none_retirement() {
    let remaps = std::env::var("VIREO_STRESS_REMAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let keep = 256;
    let report = run(StressConfig { workers: 2, remaps, retire: RetireMode::ProtNone { keep } }).unwrap();
    eprintln!("{report:#?}");
    assert!(report.consistent(), "lost or misdirected accesses: {report:#?}");
    for (w, st) in report.workers.iter().enumerate() {
        assert!(st.cached_batches > 0, "worker {w} never used the cached path");
        assert!(st.ring_incs > 0 && st.buf_incs > 0, "worker {w} made no progress");
    }
    assert!(report.maps_end <= report.maps_warm + 8, "mappings grew with remaps");
    assert!(report.rss_end <= report.rss_warm + (16 << 20), "memory grew with remaps");
    assert!(vireo_memory::live_mappings() <= keep + 2);
}

#[test]
fn user_address_lookup_follows_remaps() {
    let ring = common::Backing::new(0, 256 << 10, 0x7000_0000_0000);
    let mem = GuestMemory::new(RetireMode::ProtNone { keep: 16 });
    for i in 0..64u64 {
        let user = 0x7000_0000_0000 + i * (256 << 10);
        mem.set_regions(&[ring.spec_at_user(user)]).unwrap();
        assert_eq!(mem.map().user_to_gpa(UserAddr::new(user + 0x10)).unwrap(), GuestPhysAddr::new(0x10));
    }
}
