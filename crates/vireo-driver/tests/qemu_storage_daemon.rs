//! The driver against a backend we did not write: qemu-storage-daemon's vhost-user-blk export.
//! Write, read back and verify (through the device and in the image file), GET_ID, FLUSH, and
//! both queues.
#![allow(clippy::cast_possible_truncation)] // byte patterns from a 64-bit generator

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_driver::blk::{req, status};
use vireo_driver::{pattern, BlkDevice, BlkOptions, Completion};

/// A qemu-storage-daemon exporting a fresh image; killed and cleaned up on drop.
struct Qsd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    image: PathBuf,
}

impl Qsd {
    fn start(name: &str, size: u64, queues: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("vireo-qsd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let sock = dir.join("vhost.sock");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon must be installed (Debian: qemu-utils from bookworm-backports)");
        let mut me = Self { child, dir, sock, image };
        let start = Instant::now();
        while !me.sock.exists() {
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!("qemu-storage-daemon exited: {st}");
            }
            assert!(start.elapsed() < Duration::from_secs(10), "qemu-storage-daemon did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn sock(&self) -> &Path {
        &self.sock
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn write_read_verify_get_id_flush() {
    let qsd = Qsd::start("rw", 64 << 20, 1);
    let mut dev = BlkDevice::connect(qsd.sock(), &BlkOptions::default()).expect("connect");
    assert_eq!(dev.capacity_sectors(), (64 << 20) / 512);
    assert!(!dev.read_only());
    for (i, &(sector, len)) in [(0u64, 4096usize), (8, 4096), (1000, 65536), (131_000, 8192)].iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(dev.write(sector, &data).unwrap(), status::OK, "write at {sector}");
        let (st, back) = dev.read(sector, len).unwrap();
        assert_eq!(st, status::OK);
        assert_eq!(back, data, "read back at sector {sector}");
    }
    assert_eq!(dev.flush().unwrap(), status::OK);
    let (st, id) = dev.get_id().unwrap();
    assert_eq!(st, status::OK);
    assert!(!id.is_empty(), "GET_ID returned an empty id");
    // The image file holds what was written.
    let file = std::fs::read(&qsd.image).unwrap();
    assert_eq!(&file[1000 * 512..1000 * 512 + 65536], &pattern(3, 65536)[..]);
    // A read beyond the end fails with IOERR, not a hang.
    let (st, _) = dev.read(dev.capacity_sectors(), 4096).unwrap();
    assert_ne!(st, status::OK);
}

#[test]
fn deep_queue_on_two_queues() {
    let qsd = Qsd::start("mq", 32 << 20, 2);
    let opts = BlkOptions { num_queues: 2, slots: 64, max_request: 4096, ..BlkOptions::default() };
    let mut dev = BlkDevice::connect(qsd.sock(), &opts).expect("connect");
    assert_eq!(dev.num_queues(), 2);
    // 64 writes in flight on each queue, then 64 reads, verified.
    for q in 0..2 {
        for i in 0..64u64 {
            let sector = (q as u64 * 64 + i) * 8;
            dev.submit(q, req::OUT, sector, Some(&pattern(sector + 7, 4096)), 0).unwrap();
        }
        dev.kick(q).unwrap();
    }
    for q in 0..2 {
        let mut done: Vec<Completion> = Vec::new();
        while done.len() < 64 {
            dev.wait(q, Duration::from_secs(10), &mut done).unwrap();
        }
        assert!(done.iter().all(|c| c.status == status::OK));
    }
    for q in 0..2 {
        let mut slots = Vec::new();
        for i in 0..64u64 {
            let sector = (q as u64 * 64 + i) * 8;
            slots.push((dev.submit(q, req::IN, sector, None, 4096).unwrap(), sector));
        }
        dev.kick(q).unwrap();
        let mut done: Vec<Completion> = Vec::new();
        while done.len() < 64 {
            dev.wait(q, Duration::from_secs(10), &mut done).unwrap();
        }
        for (slot, sector) in slots {
            let c = done.iter().find(|c| c.slot == slot).unwrap();
            assert_eq!(c.status, status::OK);
            assert_eq!(dev.slot_data(q, slot, 4096).unwrap(), pattern(sector + 7, 4096), "sector {sector}");
        }
    }
}

/// Memory by ADD_MEM_REG, and a queue stopped (GET_VRING_BASE: the position it reports is the
/// number of chains it took) and started again where it was. (qemu-storage-daemon 10 does not
/// offer INFLIGHT_SHMFD, so the inflight area is proven against Vireo only.)
#[test]
fn add_mem_reg_stop_and_restart() {
    let qsd = Qsd::start("slots", 16 << 20, 1);
    let opts = BlkOptions { add_mem_reg: true, ..BlkOptions::default() };
    let mut dev = BlkDevice::connect(qsd.sock(), &opts).expect("connect with ADD_MEM_REG");
    for i in 0..10u64 {
        assert_eq!(dev.write(i * 8, &pattern(i, 4096)).unwrap(), status::OK);
    }
    let base = dev.stop_queue(0).unwrap();
    assert_eq!(base, 10, "ten chains taken");
    dev.start_queue(0, base as u16).unwrap();
    for i in 0..10u64 {
        let (st, back) = dev.read(i * 8, 4096).unwrap();
        assert_eq!(st, status::OK);
        assert_eq!(back, pattern(i, 4096));
    }
    assert_eq!(dev.stop_queue(0).unwrap(), 20);
}
