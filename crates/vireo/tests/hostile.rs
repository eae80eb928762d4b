//! Hostile frontends and drivers against the in-process backend, for both devices: what a
//! frontend hands over at its worst (descriptors of the wrong kind, an eventfd that would block a
//! writer, memory it shrinks afterwards) and a driver that never lets its ring run dry. After
//! each, the backend is alive, its invalidations complete within a bound, and it serves the next
//! frontend.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vireo_driver::{GuestRam, SplitDriver};
use vireo_memory::GuestPhysAddr;
use vireo_vhost::{Device, VhostUserBackend, DEFAULT_POLL_MAX};

/// The bound an invalidation is held to while a driver keeps its ring full (measured: well under
/// a millisecond on a quiet machine; this leaves room for a loaded CI machine with two cores).
const INVALIDATION_BOUND: Duration = Duration::from_secs(2);

/// A backend for `device` with one started, busy-polled split ring at queue `queue`.
struct Rig {
    backend: VhostUserBackend,
    ram: GuestRam,
    drv: SplitDriver,
}

impl Rig {
    fn new(device: Arc<dyn Device>, queue: u32, size: u16, call: Option<File>) -> Self {
        Self::acking(device, queue, size, call, u64::MAX)
    }

    /// [`Rig::new`] acknowledging only the offered features in `mask`.
    fn acking(device: Arc<dyn Device>, queue: u32, size: u16, call: Option<File>, mask: u64) -> Self {
        let backend = VhostUserBackend::new(device, false, 1, DEFAULT_POLL_MAX);
        let mut ram = GuestRam::single(8 << 20).unwrap();
        let drv = SplitDriver::new(&mut ram, size).unwrap();
        let mut rig = Self { backend, ram, drv };
        rig.set_mem_table();
        // Split rings, no vIOMMU, no protocol features (rings start without SET_VRING_ENABLE),
        // no LOG_ALL (logging with no log given breaks a queue rather than leave a write
        // unlogged), no IN_ORDER.
        let features =
            rig.backend.get_features().unwrap() & !(1 << 34) & !(1 << 33) & !(1 << 30) & !(1 << 35) & !(1 << 26) & mask;
        rig.backend.set_features(features).unwrap();
        let b = &mut rig.backend;
        b.set_vring_num(queue, u32::from(size)).unwrap();
        b.set_vring_base(queue, 0).unwrap();
        let (d, a, u) = rig.drv.addrs();
        let user = |g| rig.ram.user_addr(g).unwrap();
        b.set_vring_addr(queue, VhostUserVringAddrFlags::empty(), user(d), user(u), user(a), 0).unwrap();
        let q = u8::try_from(queue).unwrap();
        b.set_vring_call(q, call).unwrap();
        b.set_vring_kick(q, None).unwrap();
        rig
    }

    fn set_mem_table(&mut self) {
        let (regions, files) = self.ram.mem_table().unwrap();
        self.backend.set_mem_table(&regions, files, None).unwrap();
    }
}

/// Keeps the ring full for ever: `heads` chains are written once and fill every slot of the
/// available ring, and a thread moves the available index to the used index plus the ring's size
/// whenever the device completes one (the same chains made available again while in flight, which
/// a device cannot tell from new ones), so the device never finds the ring empty. Returns the
/// thread's stop flag and handle.
fn keep_full(rig: &Rig, heads: &[u16]) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let (_, avail, used) = rig.drv.addrs();
    let size = rig.drv.size();
    for slot in 0..size {
        let head = heads[usize::from(slot) % heads.len()];
        rig.ram.write(GuestPhysAddr::new(avail.raw() + 4 + 2 * u64::from(slot)), &head.to_le_bytes()).unwrap();
    }
    let n = size;
    let stop = Arc::new(AtomicBool::new(false));
    // The thread writes through its own view of guest RAM: the same memfd.
    let fd = rig.ram.files()[0].2.try_clone_to_owned().unwrap();
    let len = rig.ram.files()[0].1;
    let view = vireo_memory::Mapping::from_fd(fd.as_fd(), 0, len).unwrap();
    let base = view.as_ptr() as usize;
    let handle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _keep = (view, fd);
            let avail_idx = (base + usize::try_from(avail.raw()).unwrap() + 2) as *mut u16;
            let used_idx = (base + usize::try_from(used.raw()).unwrap() + 2) as *const u16;
            let mut moves = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: both indices lie in the mapping `_keep` holds for the thread's life,
                // 2-aligned (ring alignment); a u16 is any bits.
                unsafe {
                    let u = used_idx.read_volatile();
                    let want = u.wrapping_add(n);
                    if avail_idx.read_volatile() != want {
                        std::sync::atomic::fence(Ordering::Release);
                        avail_idx.write_volatile(want);
                        moves += 1;
                    }
                }
                std::hint::spin_loop();
            }
            moves
        })
    };
    (stop, handle)
}

/// Runs `f` on another thread and waits at most `bound` for it: `None` if it did not finish
/// (the thread is left behind; the test fails).
fn within<T: Send + 'static>(bound: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<(T, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(r);
    });
    rx.recv_timeout(bound).ok().map(|r| (r, t.elapsed()))
}

fn assert_invalidation_bounded(mut rig: Rig, heads: &[u16], what: &str) {
    let (stop, filler) = keep_full(&rig, heads);
    // Let the device run on the full ring first.
    std::thread::sleep(Duration::from_millis(200));
    let mut worst = Duration::ZERO;
    let mut rig = {
        let done = within(INVALIDATION_BOUND * 5, move || {
            let mut worst = Duration::ZERO;
            for _ in 0..20 {
                let t = Instant::now();
                rig.set_mem_table();
                worst = worst.max(t.elapsed());
            }
            (rig, worst)
        });
        let Some(((rig, w), _)) = done else {
            stop.store(true, Ordering::Relaxed);
            panic!("{what}: SET_MEM_TABLE did not return while the driver kept its ring full");
        };
        worst = worst.max(w);
        rig
    };
    stop.store(true, Ordering::Relaxed);
    let moves = filler.join().unwrap();
    eprintln!("{what}: {moves} refills");
    assert!(moves > 0, "{what}: the driver's thread refilled the ring");
    // (A broken queue would complete nothing and make every invalidation trivially fast.)
    assert_ne!(rig.drv.device_used_idx(&rig.ram).unwrap(), 0, "{what}: the device completed chains");
    assert!(worst < INVALIDATION_BOUND, "{what}: an invalidation took {worst:?} with the ring kept full");
    eprintln!("{what}: the longest of 20 SET_MEM_TABLE under a ring kept full took {worst:?}");
    rig.backend.shutdown();
}

/// The ring size of the kept-full tests: the largest, so that the device takes a while to drain
/// it and the driver's thread (on a machine as small as two cores, descheduled now and then)
/// keeps it full from the device's side.
const FULL_RING: u16 = 32768;

/// A driver that keeps a block queue full for ever does not hold off an invalidation: batches
/// are bounded (a chain limit, and an invalidation that waits ends the batch). Each request reads
/// 4 KiB from a file, synchronously, so that the ring takes the device long to drain. Without the
/// bound, SET_MEM_TABLE never returns.
#[test]
fn a_ring_kept_full_does_not_hold_off_invalidations_blk() {
    let path = std::env::temp_dir().join(format!("vireo-hostile-img-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len(1 << 20).unwrap();
    let device = vireo_blk::BlkDevice::new(
        vireo_blk::Storage::File { file, size: 1 << 20 },
        vireo_blk::BlkConfig {
            aio: vireo_blk::Aio::Sync,
            queue_size: FULL_RING,
            ..vireo_blk::BlkConfig::new("hostile")
        },
    )
    .unwrap();
    let mut rig = Rig::new(Arc::new(device), 0, FULL_RING, None);
    // Eight reads of 4 KiB from sector 0 (header readable, data and status writable).
    let header = rig.ram.alloc(16, 16).unwrap();
    rig.ram.write(header, &[0u8; 16]).unwrap(); // VIRTIO_BLK_T_IN, sector 0
    let data = rig.ram.alloc(4096, 4096).unwrap();
    let status = rig.ram.alloc(1, 1).unwrap();
    let mut heads = Vec::new();
    for _ in 0..8 {
        let h = vireo_driver::Buffer { gpa: header, len: 16, writable: false };
        let d = vireo_driver::Buffer { gpa: data, len: 4096, writable: true };
        let s = vireo_driver::Buffer { gpa: status, len: 1, writable: true };
        heads.push(rig.drv.add(&rig.ram, &[h, d, s]).unwrap());
    }
    assert_invalidation_bounded(rig, &heads, "blk");
}

/// The same for a network transmit queue on the sink, with 60 KB segmentation-offload frames
/// (each read whole).
#[test]
fn a_ring_kept_full_does_not_hold_off_invalidations_net() {
    let device = vireo_net::NetDevice::new(
        vireo_net::Port::Sink,
        vireo_net::NetConfig { queue_size: FULL_RING, ..vireo_net::NetConfig::default() },
    );
    let mut rig = Rig::new(Arc::new(device), 1, FULL_RING, None);
    let len = 12 + 60_000;
    let frame = rig.ram.alloc(len, 8).unwrap();
    let mut bytes = vec![0u8; usize::try_from(len).unwrap()];
    // NEEDS_CSUM, TCPv4 segmentation, gso_size 1448, checksum at 34 + 16.
    bytes[0] = 1;
    bytes[1] = 1;
    bytes[4..6].copy_from_slice(&1448u16.to_le_bytes());
    bytes[6..8].copy_from_slice(&34u16.to_le_bytes());
    bytes[8..10].copy_from_slice(&16u16.to_le_bytes());
    bytes[12..18].copy_from_slice(&[0xff; 6]);
    rig.ram.write(frame, &bytes).unwrap();
    let mut heads = Vec::new();
    for _ in 0..16 {
        let b = vireo_driver::Buffer { gpa: frame, len: u32::try_from(len).unwrap(), writable: false };
        heads.push(rig.drv.add(&rig.ram, &[b]).unwrap());
    }
    assert_invalidation_bounded(rig, &heads, "net");
}

fn eventfd(initial: u64, flags: rustix::event::EventfdFlags) -> File {
    let fd = rustix::event::eventfd(0, flags).unwrap();
    if initial > 0 {
        rustix::io::write(&fd, &initial.to_ne_bytes()).unwrap();
    }
    File::from(fd)
}

/// A call eventfd handed over blocking, its counter one below the maximum: the worker's next
/// interrupt would block for ever, holding its batch, the next invalidation and the connection's
/// end with it. Vireo makes every eventfd it writes non-blocking when it arrives.
#[test]
fn a_full_blocking_call_eventfd_never_blocks_a_worker() {
    let device =
        vireo_blk::BlkDevice::new(vireo_blk::Storage::Null { size: 1 << 20 }, vireo_blk::BlkConfig::new("hostile"))
            .unwrap();
    let call = eventfd(u64::MAX - 1, rustix::event::EventfdFlags::empty());
    let mut rig = Rig::new(Arc::new(device), 0, 16, Some(call));
    let header = rig.ram.alloc(16, 16).unwrap();
    let status = rig.ram.alloc(1, 1).unwrap();
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&1u32.to_le_bytes());
    rig.ram.write(header, &hdr).unwrap();
    for _ in 0..4 {
        let h = vireo_driver::Buffer { gpa: header, len: 16, writable: false };
        let s = vireo_driver::Buffer { gpa: status, len: 1, writable: true };
        rig.drv.add(&rig.ram, &[h, s]).unwrap();
        rig.drv.publish(&rig.ram, false).unwrap();
    }
    let done = within(Duration::from_secs(10), move || {
        let t = Instant::now();
        while rig.drv.pop_used(&rig.ram).unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(5), "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Interrupts were sent (or dropped) without blocking: an invalidation and the end of the
        // connection go through.
        rig.set_mem_table();
        rig.backend.shutdown();
    });
    assert!(done.is_some(), "a worker blocked on the frontend's call eventfd");
}

/// Kick, call, err and log descriptors that are not eventfds are refused (a kick that is a
/// regular file would poll readable for ever; a call that is a pipe can fill).
#[test]
fn descriptors_of_the_wrong_kind_are_refused() {
    let device =
        vireo_blk::BlkDevice::new(vireo_blk::Storage::Null { size: 1 << 20 }, vireo_blk::BlkConfig::new("hostile"))
            .unwrap();
    let mut b = VhostUserBackend::new(Arc::new(device), false, 1, DEFAULT_POLL_MAX);
    let path = std::env::temp_dir().join(format!("vireo-hostile-file-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let (pr, pw) = rustix::pipe::pipe().unwrap();
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
    let wrong: Vec<File> = vec![file, File::from(pr), File::from(pw), File::from(std::os::fd::OwnedFd::from(s1))];
    for f in &wrong {
        assert!(b.set_vring_kick(0, Some(f.try_clone().unwrap())).is_err());
        assert!(b.set_vring_call(0, Some(f.try_clone().unwrap())).is_err());
        assert!(b.set_vring_err(0, Some(f.try_clone().unwrap())).is_err());
        assert!(b.set_log_fd(f.try_clone().unwrap()).is_err());
    }
    // An eventfd is taken, and made non-blocking.
    let e = eventfd(0, rustix::event::EventfdFlags::empty());
    b.set_vring_call(0, Some(e.try_clone().unwrap())).unwrap();
    assert!(rustix::fs::fcntl_getfl(&e).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
}

/// A frontend that shrinks the memfd behind guest RAM after SET_MEM_TABLE and then kicks a
/// request: the rings and buffers past the new end fault (SIGBUS), the fault is absorbed, the
/// connection is cut, and the next frontend is served; nothing leaks.
#[test]
fn a_frontend_that_shrinks_guest_memory_is_cut_off() {
    use vireo_driver::{BlkDevice as Driver, BlkOptions};
    let dir = std::env::temp_dir().join(format!("vireo-hostile-shrink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vhost.sock");
    let device =
        vireo_blk::BlkDevice::new(vireo_blk::Storage::Null { size: 1 << 20 }, vireo_blk::BlkConfig::new("shrink"))
            .unwrap();
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
    let opts = BlkOptions { slots: 4, max_request: 4096, ..BlkOptions::default() };
    // A first connection, to count what a connection leaves behind.
    drop(Driver::connect(&sock, &opts).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let (fds_before, maps_before) =
        (std::fs::read_dir("/proc/self/fd").unwrap().count(), vireo_memory::live_mappings());
    let before = vireo_memory::poisonings();
    for shrink_to in [0u64, 64 << 10] {
        let mut dev = Driver::connect(&sock, &opts).unwrap();
        for (_, _, fd) in dev.guest_ram().files() {
            rustix::fs::ftruncate(fd, shrink_to).unwrap();
        }
        // The request is made (its rings and buffers are past the end: the driver's own writes
        // fault too, and are absorbed the same way); whatever answer comes, or none.
        let _ = dev.read(0, 4096);
        drop(dev);
    }
    assert!(vireo_memory::poisonings() > before, "the shrunk memory faulted and the fault was absorbed");
    // The next frontend is served.
    let mut dev = Driver::connect(&sock, &opts).unwrap();
    let (st, _) = dev.read(0, 4096).unwrap();
    assert_eq!(st, vireo_driver::blk::status::OK);
    drop(dev);
    std::thread::sleep(Duration::from_millis(300));
    let (fds, maps) = (std::fs::read_dir("/proc/self/fd").unwrap().count(), vireo_memory::live_mappings());
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(fds <= fds_before, "file descriptors: {fds_before} before, {fds} after");
    assert!(maps <= maps_before, "mappings: {maps_before} before, {maps} after");
}

/// Waits until the device has completed `n` chains in all (used index), at most 10 s.
fn wait_used(rig: &Rig, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.drv.device_used_idx(&rig.ram).unwrap() != n {
        assert!(
            Instant::now() < deadline,
            "{what}: the device completed {} of {n} chains",
            rig.drv.device_used_idx(&rig.ram).unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A virtio-net header: flags, gso type, gso size, checksum start and offset (num_buffers 0).
fn net_header(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
    let mut h = vec![flags, gso, 54, 0];
    for v in [gso_size, csum_start, csum_offset, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

/// Transmit chains a driver gets wrong, on the sink with the segmentation offloads offered but
/// not acknowledged: each is dropped and counted as an error, the queue is not broken, and a good
/// frame before and after them is consumed.
#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    use vireo_wire::features::net as f;
    let device = Arc::new(vireo_net::NetDevice::new(vireo_net::Port::Sink, vireo_net::NetConfig::default()));
    let stats = device.stats();
    let no_gso = !(f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_UFO | f::HOST_USO | f::HOST_ECN);
    let mut rig = Rig::acking(device, 1, 256, None, no_gso);
    let frame = |hdr: Vec<u8>, len: usize| {
        let mut b = hdr;
        b.extend((0..len).map(|i| u8::try_from(i % 251).unwrap()));
        b
    };
    let good = frame(net_header(0, 0, 0, 0, 0), 60);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("good", good.clone(), false),
        ("shorter than the header", vec![0; 5], false),
        ("runt", frame(net_header(0, 0, 0, 0, 0), 10), false),
        ("longer than the MTU", frame(net_header(0, 0, 0, 0, 0), 9000), false),
        ("TCPv4 segmentation not negotiated", frame(net_header(1, 1, 1448, 34, 16), 3000), false),
        ("a receive-only flag", frame(net_header(2, 0, 0, 0, 0), 60), false),
        ("checksum past the frame", frame(net_header(1, 0, 0, 58, 16), 60), false),
        ("only a writable buffer", good.clone(), true),
        ("good again", good.clone(), false),
    ];
    for (_, bytes, writable) in &cases {
        let len = u32::try_from(bytes.len()).unwrap();
        let gpa = rig.ram.alloc(u64::from(len), 8).unwrap();
        rig.ram.write(gpa, bytes).unwrap();
        rig.drv.add(&rig.ram, &[vireo_driver::Buffer { gpa, len, writable: *writable }]).unwrap();
    }
    rig.drv.publish(&rig.ram, false).unwrap();
    wait_used(&rig, u16::try_from(cases.len()).unwrap(), "tx");
    let q = stats.queue(1).unwrap();
    assert_eq!(q.frames.load(Ordering::Relaxed), 2, "the two good frames were consumed");
    assert_eq!(q.errors.load(Ordering::Relaxed), u64::try_from(cases.len() - 2).unwrap(), "each bad chain counted");
    assert!(!q.broken.load(Ordering::Relaxed), "a frame the guest got wrong does not break the queue");
    // Every chain came back (a dropped frame is still completed).
    for _ in 0..cases.len() {
        assert!(rig.drv.pop_used(&rig.ram).unwrap().is_some());
    }
    rig.backend.shutdown();
}

/// A receive chain with no writable buffer is completed empty and counted; the next chain gets a
/// frame.
#[test]
fn a_receive_chain_without_a_writable_buffer_is_counted_and_skipped() {
    let device =
        Arc::new(vireo_net::NetDevice::new(vireo_net::Port::Source { frame_len: 60 }, vireo_net::NetConfig::default()));
    let stats = device.stats();
    let mut rig = Rig::new(device, 0, 256, None);
    let ro = rig.ram.alloc(2048, 8).unwrap();
    let rw = rig.ram.alloc(2048, 8).unwrap();
    rig.drv.add(&rig.ram, &[vireo_driver::Buffer { gpa: ro, len: 2048, writable: false }]).unwrap();
    rig.drv.add(&rig.ram, &[vireo_driver::Buffer { gpa: rw, len: 2048, writable: true }]).unwrap();
    rig.drv.publish(&rig.ram, false).unwrap();
    wait_used(&rig, 2, "rx");
    let first = rig.drv.pop_used(&rig.ram).unwrap().unwrap();
    let second = rig.drv.pop_used(&rig.ram).unwrap().unwrap();
    assert_eq!(first.len, 0, "nothing written into a chain with no writable buffer");
    assert_eq!(second.len, 12 + 60, "a header and a frame in the next one");
    let q = stats.queue(0).unwrap();
    assert_eq!((q.frames.load(Ordering::Relaxed), q.errors.load(Ordering::Relaxed)), (1, 1));
    assert!(!q.broken.load(Ordering::Relaxed));
    rig.backend.shutdown();
}

/// Queues past the pairs offered cannot be set up or enabled: each message is refused, and the
/// queues offered go on.
#[test]
fn queue_pairs_past_the_offered_are_refused() {
    let device = Arc::new(vireo_net::NetDevice::new(vireo_net::Port::Sink, vireo_net::NetConfig::default()));
    let stats = device.stats();
    let mut rig = Rig::new(device, 1, 256, None);
    let b = &mut rig.backend;
    for q in [2u32, 3, 255, u32::MAX] {
        assert!(b.set_vring_num(q, 256).is_err(), "SET_VRING_NUM {q}");
        assert!(b.set_vring_base(q, 0).is_err(), "SET_VRING_BASE {q}");
        assert!(b.set_vring_enable(q, true).is_err(), "SET_VRING_ENABLE {q}");
        assert!(b.get_vring_base(q).is_err(), "GET_VRING_BASE {q}");
    }
    for q in [2u8, 3, 255] {
        assert!(b.set_vring_kick(q, None).is_err(), "SET_VRING_KICK {q}");
        assert!(b.set_vring_call(q, None).is_err(), "SET_VRING_CALL {q}");
    }
    let gpa = rig.ram.alloc(72, 8).unwrap();
    let mut bytes = net_header(0, 0, 0, 0, 0);
    bytes.resize(72, 0xab);
    rig.ram.write(gpa, &bytes).unwrap();
    rig.drv.add(&rig.ram, &[vireo_driver::Buffer { gpa, len: 72, writable: false }]).unwrap();
    rig.drv.publish(&rig.ram, false).unwrap();
    wait_used(&rig, 1, "tx after refusals");
    assert_eq!(stats.queue(1).unwrap().frames.load(Ordering::Relaxed), 1);
    rig.backend.shutdown();
}
