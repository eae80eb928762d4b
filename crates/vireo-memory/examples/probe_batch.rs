use std::os::fd::AsFd;
fn main() {
    let fd = vireo_memory::memfd("p", 1 << 20).unwrap();
    let mem = vireo_memory::GuestMemory::new(vireo_memory::RetireMode::Unmap);
    mem.set_regions(&[vireo_memory::RegionSpec {
        gpa: vireo_memory::GuestPhysAddr::new(0),
        size: 1 << 20,
        user_addr: vireo_memory::UserAddr::new(0),
        fd: fd.as_fd(),
        fd_offset: 0,
    }])
    .unwrap();
    let mut q = mem.register_queue();
    let ring = [(vireo_memory::GuestPhysAddr::new(0x1000), 4096u64)];
    // PROBE_ROUNDS batches (callgrind: run twice with different counts, the difference is the
    // per-batch cost without the setup).
    let rounds: u64 = std::env::var("PROBE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    for _ in 0..rounds {
        let b = q.batch(&ring);
        std::hint::black_box(b.cached().map(|c| c[0].len()));
    }
}
