#![allow(clippy::cast_possible_truncation)] // loop counters as bytes and sectors
//! Connections come and go without leaving anything behind: a thousand connect / negotiate /
//! map memory / start queues / one request / disconnect cycles against the in-process backend
//! leave this process's file descriptors, guest-memory mappings and threads where they started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_blk::{BlkConfig, BlkDevice as Device, Storage};
use vireo_driver::blk::status;
use vireo_driver::{BlkDevice, BlkOptions};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A directory removed when dropped, however the test ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_thousand_connections_leak_nothing() {
    let dir = std::env::temp_dir().join(format!("vireo-leaks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _dir_guard = RemoveOnDrop(dir.clone());
    let sock = dir.join("vhost.sock");
    let device =
        Device::new(Storage::Null { size: 1 << 20 }, BlkConfig { num_queues: 2, ..BlkConfig::new("leaks") }).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || {
            vireo_vhost::serve(vireo_vhost::Endpoint::Listen(sock), Arc::new(device), &stop, &Default::default())
                .unwrap()
        })
    };
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    let opts = BlkOptions { num_queues: 2, slots: 4, max_request: 4096, ..BlkOptions::default() };
    let cycle = |i: usize| {
        let mut dev = BlkDevice::connect(&sock, &opts).unwrap();
        assert_eq!(dev.write((i % 100) as u64, &[i as u8; 512]).unwrap(), status::OK);
    };
    // Warm up (lazily created statics, thread-locals), then measure.
    for i in 0..20 {
        cycle(i);
    }
    // Let the server notice the last disconnect and stop its workers.
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, maps0, threads0) = (count("/proc/self/fd"), vireo_memory::live_mappings(), count("/proc/self/task"));
    for i in 0..1000 {
        cycle(i);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (fds1, maps1, threads1) = (count("/proc/self/fd"), vireo_memory::live_mappings(), count("/proc/self/task"));
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    eprintln!("fds {fds0} -> {fds1}, guest mappings {maps0} -> {maps1}, threads {threads0} -> {threads1}");
    assert!(fds1 <= fds0, "file descriptors leaked: {fds0} -> {fds1}");
    assert!(maps1 <= maps0, "guest-memory mappings leaked: {maps0} -> {maps1}");
    assert!(threads1 <= threads0, "threads leaked: {threads0} -> {threads1}");
}
