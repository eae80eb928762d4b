//! `vireo blk`'s device served over vhost-user in this process, driven by the userspace driver
//! through rust-vmm's vhost frontend: data integrity, GET_ID, FLUSH, read-only refusal, two
//! queues, memory-table churn under I/O, and a second connection after the first goes away.
#![allow(clippy::cast_possible_truncation)] // byte patterns from a 64-bit generator

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_blk::{BlkConfig, BlkDevice as Device, Storage};
use vireo_driver::blk::{req, status};
use vireo_driver::{pattern, BlkDevice, BlkOptions, Completion, IommuMode};

struct Server {
    dir: PathBuf,
    sock: PathBuf,
    image: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(name: &str, size: u64, read_only: bool, queues: u16) -> Self {
        Self::start_with(name, size, read_only, queues, false)
    }

    fn start_with(name: &str, size: u64, read_only: bool, queues: u16, poll: bool) -> Self {
        Self::start_full(name, size, read_only, queues, poll, &format!("vireo-{name}"))
    }

    fn start_full(name: &str, size: u64, read_only: bool, queues: u16, poll: bool, serial: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vireo-blk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let sock = dir.join("vhost.sock");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(&image).unwrap();
        let device = Device::new(
            Storage::File { file, size },
            BlkConfig { num_queues: queues, read_only, ..BlkConfig::new(serial) },
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                vireo_vhost::serve(
                    vireo_vhost::Endpoint::Listen(sock),
                    Arc::new(device),
                    &stop,
                    &vireo_vhost::ServeOptions { poll, ..Default::default() },
                )
                .unwrap()
            })
        };
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(5), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { dir, sock, image, stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        assert!(!self.sock.exists(), "the socket is removed on shutdown");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn data_integrity_get_id_flush_and_reconnect() {
    let srv = Server::start("rw", 16 << 20, false, 1);
    for packed in [false, true] {
        let opts = BlkOptions { packed, ..BlkOptions::default() };
        let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
        assert_eq!(dev.capacity_sectors(), (16 << 20) / 512);
        assert_eq!(dev.features() & (1 << 34) != 0, packed, "packed rings negotiated when asked");
        for (i, &(sector, len)) in [(0u64, 4096usize), (9, 512), (2000, 65536), (32_700, 4096)].iter().enumerate() {
            let data = pattern(i as u64 + 100 * u64::from(packed), len);
            assert_eq!(dev.write(sector, &data).unwrap(), status::OK);
            let (st, back) = dev.read(sector, len).unwrap();
            assert_eq!(st, status::OK);
            assert_eq!(back, data, "sector {sector}");
        }
        assert_eq!(dev.flush().unwrap(), status::OK);
        assert_eq!(dev.get_id().unwrap(), (status::OK, "vireo-rw".to_string()));
        let (st, _) = dev.read(dev.capacity_sectors(), 512).unwrap();
        assert_eq!(st, status::IOERR, "reads past the end fail");
        let (st, _) = dev.run_sync(99, 0, None, 0).unwrap();
        assert_eq!(st, status::UNSUPP);
        // The second iteration connects again: the first connection is gone.
    }
    let file = std::fs::read(&srv.image).unwrap();
    assert_eq!(&file[2000 * 512..2000 * 512 + 65536], &pattern(102, 65536)[..]);
}

/// Memory by ADD_MEM_REG, the inflight area, and a queue stopped and started again, on both ring
/// layouts (a packed ring gets the area, as QEMU insists, but does not track in it).
#[test]
fn add_mem_reg_inflight_stop_and_restart() {
    let srv = Server::start("slots", 16 << 20, false, 1);
    for packed in [false, true] {
        let opts = BlkOptions { packed, add_mem_reg: true, inflight: true, ..BlkOptions::default() };
        let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
        for i in 0..10u64 {
            assert_eq!(dev.write(i * 8, &pattern(i + 50, 4096)).unwrap(), status::OK);
        }
        let base = dev.stop_queue(0).unwrap();
        // Split: the next available index; packed: slot 10 with both wrap counters set.
        let expect = if packed { 10 | 1 << 15 | (10 | 1 << 15) << 16 } else { 10 };
        assert_eq!(base, expect, "packed={packed}");
        dev.start_queue(0, (base & 0xffff) as u16).unwrap();
        for i in 0..10u64 {
            let (st, back) = dev.read(i * 8, 4096).unwrap();
            assert_eq!(st, status::OK);
            assert_eq!(back, pattern(i + 50, 4096));
        }
        assert_eq!(dev.stop_queue(0).unwrap() & 0x7fff, 20);
    }
}

#[test]
fn read_only_refuses_writes() {
    let srv = Server::start("ro", 1 << 20, true, 1);
    let mut dev = BlkDevice::connect(&srv.sock, &BlkOptions::default()).unwrap();
    assert!(dev.read_only());
    assert_eq!(dev.write(0, &[7u8; 512]).unwrap(), status::IOERR);
    assert!(std::fs::read(&srv.image).unwrap().iter().all(|&b| b == 0), "nothing changed on the host");
}

/// Two queues keep 32 requests each in flight while `churn` runs a few hundred times between
/// submission and completion: every request completes OK and every read returns what was
/// written.
fn churn_under_io(name: &str, opts: BlkOptions, mut churn: impl FnMut(&mut BlkDevice)) {
    let srv = Server::start(name, 8 << 20, false, 2);
    let opts = BlkOptions { num_queues: 2, slots: 32, max_request: 4096, ..opts };
    let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
    let mut written = std::collections::HashMap::new();
    let mut done: Vec<(usize, Completion)> = Vec::new();
    let mut inflight: std::collections::HashMap<(usize, u16), (u64, bool)> = Default::default();
    for round in 0..300u64 {
        for q in 0..2 {
            while dev.free_slots(q) > 0 {
                let sector = ((round * 7 + q as u64 * 1000 + inflight.len() as u64 * 13) % 2048) * 8;
                if inflight.values().any(|&(s, _)| s == sector) {
                    break;
                }
                let write = !(round + sector).is_multiple_of(3) || !written.contains_key(&sector);
                let slot = if write {
                    dev.submit(q, req::OUT, sector, Some(&pattern(sector ^ round, 4096)), 0).unwrap()
                } else {
                    dev.submit(q, req::IN, sector, None, 4096).unwrap()
                };
                inflight.insert((q, slot), (sector, write));
                if write {
                    written.insert(sector, sector ^ round);
                }
            }
            dev.kick(q).unwrap();
        }
        churn(&mut dev);
        done.clear();
        dev.wait_any(Duration::from_secs(10), &mut done).unwrap();
        for &(q, c) in &done {
            let (sector, write) = inflight.remove(&(q, c.slot)).unwrap();
            assert_eq!(c.status, status::OK, "request on sector {sector} failed under churn");
            if !write {
                assert_eq!(dev.slot_data(q, c.slot, 4096).unwrap(), pattern(written[&sector], 4096));
            }
        }
    }
}

/// The frontend changes the memory table 300 times under I/O.
#[test]
fn memory_table_churn_under_io() {
    let mut churns = 0;
    churn_under_io("churn", BlkOptions::default(), |dev| {
        dev.resend_mem_table().unwrap();
        churns += 1;
    });
    assert_eq!(churns, 300);
}

/// Behind the driver's vIOMMU: all of guest RAM is invalidated 300 times under I/O (and, when
/// premapped, mapped again), so queues miss, park, and resume mid-flight.
#[test]
fn iotlb_invalidation_churn_under_io() {
    for mode in [IommuMode::OnDemand, IommuMode::Premapped] {
        let mut misses = 0;
        churn_under_io("iotlb-churn", BlkOptions { iommu: Some(mode), ..BlkOptions::default() }, |dev| {
            dev.iotlb_churn().unwrap();
            misses = dev.iotlb_misses();
        });
        // Premapped, a queue that runs between an invalidation and the remap misses too.
        if mode == IommuMode::OnDemand {
            assert!(misses >= 300, "every invalidation brings misses ({misses})");
        }
    }
}

/// Behind the driver's vIOMMU every address the device sees is an IOVA (256 GiB above the
/// guest physical one): data, GET_ID, both ring layouts, both ways of filling the IOTLB.
#[test]
fn viommu_translates_every_address() {
    let srv = Server::start("viommu", 16 << 20, false, 2);
    for (mode, packed) in [
        (IommuMode::Premapped, false),
        (IommuMode::OnDemand, false),
        (IommuMode::Premapped, true),
        (IommuMode::OnDemand, true),
    ] {
        let opts = BlkOptions { num_queues: 2, packed, iommu: Some(mode), ..BlkOptions::default() };
        let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
        assert_ne!(dev.features() & (1 << 33), 0, "VIRTIO_F_ACCESS_PLATFORM negotiated");
        for i in 0..16u64 {
            let q = (i % 2) as usize;
            let data = pattern(i + 900, 8192);
            assert_eq!(dev.run_on(q, req::OUT, i * 64, Some(&data), 0).unwrap().0, status::OK);
            assert_eq!(dev.run_on(q, req::IN, i * 64, None, 8192).unwrap(), (status::OK, data), "{mode:?} {packed}");
        }
        assert_eq!(dev.get_id().unwrap(), (status::OK, "vireo-viommu".to_string()));
        let misses = dev.iotlb_misses();
        match mode {
            IommuMode::OnDemand => assert!(misses > 0, "on demand, the backend asks"),
            IommuMode::Premapped => assert_eq!(misses, 0),
        }
    }
}

/// An IOTLB entry that does not allow what the device must do (a read request's data buffer
/// mapped read-only) breaks that queue, and only it.
#[test]
fn viommu_permission_fault_breaks_only_that_queue() {
    let srv = Server::start("viommu-perm", 1 << 20, false, 2);
    // The request stays invisible until the kick, after its buffer was made read-only.
    let opts =
        BlkOptions { num_queues: 2, iommu: Some(IommuMode::Premapped), publish_at_kick: true, ..BlkOptions::default() };
    let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
    assert_eq!(dev.run_on(0, req::OUT, 0, Some(&[5u8; 4096]), 0).unwrap().0, status::OK);
    let slot = dev.submit(0, req::IN, 0, None, 4096).unwrap();
    let (_, data, _) = dev.slot_iovas(0, slot);
    dev.iotlb_invalidate(data, 4096).unwrap();
    dev.iotlb_update(data, 4096, 1).unwrap(); // VHOST_ACCESS_RO
    dev.kick(0).unwrap();
    let mut out = Vec::new();
    assert!(
        matches!(dev.wait(0, Duration::from_millis(500), &mut out), Err(vireo_driver::BlkError::Timeout(_))),
        "the faulting request is not completed: {out:?}"
    );
    let back = dev.run_on(1, req::IN, 0, None, 4096).unwrap();
    assert_eq!(back, (status::OK, vec![5u8; 4096]), "the other queue goes on");
    let t = Instant::now();
    while dev.iotlb_access_failures() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the access failure is reported on the backend channel");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// DEVICE_STATE: the source's state (its disk's size, read-only flag and serial) is saved with
/// the rings stopped and taken by a destination serving the same disk; a destination serving
/// another disk refuses it through CHECK_DEVICE_STATE, as a running ring refuses the transfer.
#[test]
fn device_state_migrates_and_refuses_another_disk() {
    let src = Server::start_full("state-src", 4 << 20, false, 1, false, "disk-7");
    let same = Server::start_full("state-same", 4 << 20, false, 1, false, "disk-7");
    let other = Server::start_full("state-other", 8 << 20, false, 1, false, "disk-7");
    let mut dev = BlkDevice::connect(&src.sock, &BlkOptions::default()).unwrap();
    assert!(dev.save_state().is_err(), "refused while the ring runs");
    dev.stop_queue(0).unwrap();
    let state = dev.save_state().unwrap();
    assert!(state.starts_with(b"VIREOBLK"));
    for (srv, ok) in [(&same, true), (&other, false)] {
        let mut dst = BlkDevice::connect(&srv.sock, &BlkOptions::default()).unwrap();
        dst.stop_queue(0).unwrap();
        assert_eq!(dst.load_state(&state).is_ok(), ok);
        if ok {
            dst.start_queue(0, 0).unwrap();
            assert_eq!(dst.get_id().unwrap(), (status::OK, "disk-7".to_string()));
        }
    }
}

/// With dirty logging on, the log marks exactly the guest pages the device wrote: a read's
/// data and status, and the ring the device writes (split: the used ring; packed: the
/// descriptor ring); nothing it only read. Also behind the vIOMMU, where the device is given
/// IOVAs and the log is kept in guest physical pages.
#[test]
fn dirty_log_marks_exactly_the_pages_written() {
    let srv = Server::start("dirty", 4 << 20, false, 1);
    for (packed, iommu) in [(false, None), (true, None), (false, Some(IommuMode::Premapped))] {
        let opts = BlkOptions { packed, iommu, log_shmfd: true, max_request: 16384, ..BlkOptions::default() };
        let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
        assert_eq!(dev.write(64, &pattern(5, 16384)).unwrap(), status::OK);
        dev.start_dirty_log().unwrap();
        dev.clear_dirty_log().unwrap();
        let slot = dev.submit(0, req::IN, 64, None, 16384).unwrap();
        dev.kick(0).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            dev.wait(0, Duration::from_secs(10), &mut out).unwrap();
        }
        assert_eq!(out[0].status, status::OK);
        assert_eq!(dev.slot_data(0, slot, 16384).unwrap(), pattern(5, 16384));
        let (rings, bufs) = dev.layout(0, slot);
        let pages = |(start, len): (u64, u64)| (start / 4096)..=((start + len - 1) / 4096);
        let written_ring = if packed { rings[0] } else { rings[2] };
        let mut expect: std::collections::BTreeSet<u64> =
            pages(bufs[1]).chain(pages(bufs[2])).chain(pages(written_ring)).collect();
        if packed {
            // The device event suppression area is written when notifications are re-enabled.
            expect.extend(pages(rings[2]));
        }
        let expect: Vec<u64> = expect.into_iter().collect();
        // The worker may still be finishing its pass (re-enabling notifications writes the
        // event suppression area after the completion was published): the log settles at once.
        let t = Instant::now();
        let mut seen = dev.dirty_page_list().unwrap();
        while seen != expect && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
            seen = dev.dirty_page_list().unwrap();
        }
        assert_eq!(seen, expect, "packed={packed} iommu={iommu:?}");
    }
}

/// Busy-polling workers (`vireo blk --poll`): the same data checks, on two queues.
#[test]
fn polling_workers() {
    let srv = Server::start_with("poll", 4 << 20, false, 2, true);
    let opts = BlkOptions { num_queues: 2, ..BlkOptions::default() };
    let mut dev = BlkDevice::connect(&srv.sock, &opts).unwrap();
    for i in 0..64u64 {
        let data = pattern(i + 7, 4096);
        assert_eq!(dev.write(i * 8, &data).unwrap(), status::OK);
        assert_eq!(dev.read(i * 8, 4096).unwrap(), (status::OK, data));
    }
    assert_eq!(dev.get_id().unwrap(), (status::OK, "vireo-poll".to_string()));
}
