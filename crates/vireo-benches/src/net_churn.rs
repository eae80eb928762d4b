//! Invalidation reply latency while a 64-byte stream runs through the network device, and the
//! packet rate the stream keeps, against the same stream with no invalidations.
//!
//! The backend is Vireo's own (`VhostUserBackend` in this process, one worker thread) with the
//! net device on its sink (guest TX) or source (guest RX) port. A driver thread keeps one split
//! ring full for ever: every slot holds a chain, and whenever the device completes chains the
//! thread makes them available again, so the device never finds the ring empty (the harshest
//! stream for an invalidation to cut into: a worker with work at every instant). The main thread
//! sends `SET_MEM_TABLE` with the same regions at a fixed rate — a full invalidation: new
//! mappings, every cached ring pointer and translation dropped, the old mappings retired — and
//! times each call from the request to the reply, which returns only once no worker can touch the
//! old mappings (the protocol's barrier). The socket is left out: it costs the same with any
//! backend, and the figure is the backend's.
//!
//! Runs alternate between "steady" (no changes) and "churn" (changes at `rate` per second), A B A
//! B, each for the same time; the packet rate is read from the device's own counters.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vireo_driver::{Buffer, GuestRam, SplitDriver};
use vireo_memory::GuestPhysAddr;
use vireo_net::{NetConfig, NetDevice, Port};
use vireo_vhost::{VhostUserBackend, DEFAULT_POLL_MAX};

use crate::harness::{percentile, round, Runs};

/// The ring size: QEMU's default for a virtio-net queue.
const RING: u16 = 256;

/// The virtio-net header with MRG_RXBUF (12 bytes) and a 60-byte frame ("64 bytes" on the wire
/// with its FCS).
const HEADER: u32 = 12;
const FRAME: u32 = 60;

/// Which way the stream goes, from the guest's side.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Guest TX into the sink: queue 1, readable chains of header + frame.
    Transmit,
    /// Guest RX from the source: queue 0, writable 2 KiB buffers.
    Receive,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Self::Transmit => "guest-tx (sink)",
            Self::Receive => "guest-rx (source)",
        }
    }
}

/// A backend with the net device and one started, polled split ring.
struct Stream {
    backend: VhostUserBackend,
    ram: GuestRam,
    drv: SplitDriver,
    stats: Arc<vireo_net::Stats>,
    queue: usize,
}

impl Stream {
    /// The stream's backend with its ring polled (no kick fd), or, given `kick`, woken by it.
    fn new(dir: Direction, kick: Option<std::fs::File>) -> Self {
        let (port, queue) = match dir {
            Direction::Transmit => (Port::Sink, 1u32),
            Direction::Receive => (Port::Source { frame_len: FRAME as usize }, 0u32),
        };
        let device = NetDevice::new(port, NetConfig::default());
        let stats = device.stats();
        let backend = VhostUserBackend::new(Arc::new(device), false, 1, DEFAULT_POLL_MAX);
        let mut ram = GuestRam::single(16 << 20).expect("guest RAM");
        let drv = SplitDriver::new(&mut ram, RING).expect("ring");
        let mut s = Self { backend, ram, drv, stats, queue: queue as usize };
        s.set_mem_table();
        // Split ring, no vIOMMU, no protocol features (the ring starts without
        // SET_VRING_ENABLE), no logging, no IN_ORDER: the plainest stream.
        let strip = (1u64 << 34) | (1 << 33) | (1 << 30) | (1 << 35) | (1 << 26);
        let features = s.backend.get_features().expect("features") & !strip;
        s.backend.set_features(features).expect("features");
        let b = &mut s.backend;
        b.set_vring_num(queue, u32::from(RING)).expect("ring size");
        b.set_vring_base(queue, 0).expect("ring base");
        let (d, a, u) = s.drv.addrs();
        let user = |g| s.ram.user_addr(g).expect("ring address");
        b.set_vring_addr(queue, VhostUserVringAddrFlags::empty(), user(d), user(u), user(a), 0).expect("addr");
        let q = u8::try_from(queue).expect("queue");
        b.set_vring_call(q, None).expect("call");
        // No kick fd: the ring is polled.
        b.set_vring_kick(q, kick).expect("kick");
        let chain = match dir {
            Direction::Transmit => {
                let frame = s.ram.alloc(u64::from(HEADER + FRAME), 64).expect("frame");
                let mut bytes = vec![0u8; (HEADER + FRAME) as usize];
                bytes[12..18].copy_from_slice(&[0xff; 6]);
                bytes[24..26].copy_from_slice(&[0x08, 0x00]);
                s.ram.write(frame, &bytes).expect("frame");
                Buffer { gpa: frame, len: HEADER + FRAME, writable: false }
            }
            Direction::Receive => {
                let buf = s.ram.alloc(2048, 64).expect("buffer");
                Buffer { gpa: buf, len: 2048, writable: true }
            }
        };
        for _ in 0..RING {
            s.drv.add(&s.ram, &[chain]).expect("chain");
        }
        s
    }

    fn set_mem_table(&mut self) {
        let (regions, files) = self.ram.mem_table().expect("memory table");
        self.backend.set_mem_table(&regions, files, None).expect("SET_MEM_TABLE");
    }

    fn frames(&self) -> u64 {
        self.stats.queue(self.queue).map_or(0, |c| c.frames.load(Ordering::Relaxed))
    }
}

/// The driver thread: makes every slot available again as soon as the device has used it
/// (`avail.idx = used.idx + size`), through its own mapping of the memfd. Returns the stop
/// flag, a count of refills, and the thread.
fn keep_full(
    s: &Stream,
    kick: Option<std::os::fd::OwnedFd>,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let (_, avail, used) = s.drv.addrs();
    let size = s.drv.size();
    // Every slot names a chain: the heads are 0..size, one descriptor each.
    for slot in 0..size {
        s.ram.write(GuestPhysAddr::new(avail.raw() + 4 + 2 * u64::from(slot)), &slot.to_le_bytes()).expect("avail");
    }
    let fd = s.ram.files()[0].2.try_clone_to_owned().expect("dup");
    let len = s.ram.files()[0].1;
    let view = vireo_memory::Mapping::from_fd(fd.as_fd(), 0, len).expect("driver's view");
    let base = view.as_ptr() as usize;
    let avail_off = usize::try_from(avail.raw()).expect("offset") + 2;
    let used_off = usize::try_from(used.raw()).expect("offset") + 2;
    let stop = Arc::new(AtomicBool::new(false));
    let refills = Arc::new(AtomicU64::new(0));
    let handle = {
        let (stop, refills) = (stop.clone(), refills.clone());
        std::thread::spawn(move || {
            let _keep = (view, fd);
            let avail_idx = (base + avail_off) as *mut u16;
            let used_idx = (base + used_off) as *const u16;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: both indices lie inside the mapping `_keep` holds for the thread's
                // life (the ring is in guest RAM, which the mapping covers whole), 2-aligned
                // (ring alignment); a u16 is any bits, and the device writes the used index
                // only as a whole u16.
                unsafe {
                    let want = used_idx.read_volatile().wrapping_add(size);
                    if avail_idx.read_volatile() != want {
                        // The chains are unchanged; the fence orders the index after nothing
                        // but keeps the shape a driver has.
                        std::sync::atomic::fence(Ordering::Release);
                        avail_idx.write_volatile(want);
                        n += 1;
                        if let Some(k) = &kick {
                            // A full eventfd counter (it cannot be, at one write per refill)
                            // would only mean the device is already woken.
                            let _ = rustix::io::write(k, &1u64.to_ne_bytes());
                        }
                    }
                }
                std::hint::spin_loop();
            }
            refills.store(n, Ordering::Relaxed);
        })
    };
    (stop, refills, handle)
}

/// One run: the stream for `secs`, with memory-table changes at `rate` per second (0: none).
/// Returns (Mpps, reply latencies in µs).
fn one_run(s: &mut Stream, secs: f64, rate: u32) -> (f64, Vec<f64>) {
    let f0 = s.frames();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    if rate == 0 {
        std::thread::sleep(end - Instant::now());
    } else {
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut next = t0 + period;
        while next < end {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let t = Instant::now();
            s.set_mem_table();
            lat.push(t.elapsed().as_nanos() as f64 / 1e3);
            // A schedule, not a loop of sleeps: a late change does not push the others back,
            // but one that overran by more than a period is not followed by a burst.
            next = (next + period).max(Instant::now());
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let frames = s.frames() - f0;
    (frames as f64 / elapsed / 1e6, lat)
}

fn direction(dir: Direction, rounds: usize, secs: f64, rate: u32) -> Value {
    let mut s = Stream::new(dir, None);
    let (stop, refills, filler) = keep_full(&s, None);
    // Warm-up: the device reaches its pace, and one change of each kind has run.
    one_run(&mut s, secs / 4.0, rate);
    let (mut steady, mut churn) = (Runs::default(), Runs::default());
    let mut lat_all = Vec::new();
    let mut per_run = Vec::new();
    for _ in 0..rounds {
        steady.0.push(one_run(&mut s, secs, 0).0);
        let (mpps, mut lat) = one_run(&mut s, secs, rate);
        churn.0.push(mpps);
        per_run.push(json!({
            "changes": lat.len(),
            "p50_us": round(percentile(&mut lat, 50.0)),
            "p99_us": round(percentile(&mut lat, 99.0)),
            "max_us": round(percentile(&mut lat, 100.0)),
        }));
        lat_all.extend(lat);
    }
    stop.store(true, Ordering::Relaxed);
    filler.join().expect("driver thread");
    let used = s.drv.device_used_idx(&s.ram).expect("used index");
    let broken = s.stats.queue(s.queue).is_some_and(|c| c.broken.load(Ordering::Relaxed));
    assert!(!broken && used != 0, "{}: the stream ran", dir.name());
    s.backend.shutdown();
    json!({
        "stream": dir.name(),
        "rate_per_s": rate,
        "steady_mpps": steady.json(),
        "churn_mpps": churn.json(),
        "steady_mpps_median": round(steady.median()),
        "churn_mpps_median": round(churn.median()),
        "kept": round(churn.median() / steady.median()),
        "reply_us_per_run": per_run,
        "reply_us_p50": round(percentile(&mut lat_all, 50.0)),
        "reply_us_p99": round(percentile(&mut lat_all, 99.0)),
        "reply_us_max": round(percentile(&mut lat_all, 100.0)),
        "refills": refills.load(Ordering::Relaxed),
    })
}

/// The benchmark: both directions, `rate` changes per second.
pub fn run(quick: bool, rate: u32, secs: Option<f64>) -> Value {
    let (rounds, default_secs) = if quick { (2, 0.5) } else { (5, 5.0) };
    let secs = secs.unwrap_or(default_secs);
    let streams: Vec<Value> =
        [Direction::Transmit, Direction::Receive].iter().map(|&d| direction(d, rounds, secs, rate)).collect();
    json!({
        "net_invalidation": streams,
        "frame_bytes": FRAME + 4,
        "ring": RING,
        "seconds_per_run": secs,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// Profiling mode: `frames` frames through the device in each direction, the worker woken by a
/// kick after each refill (no polling: under a profiler, a polling worker's empty passes would
/// outnumber its work), then the frames moved and the time taken. Under callgrind,
/// `--toggle-collect='<vireo_net::pair::Pair as vireo_vhost::device::QueueHandler>::run'` counts
/// the device's instructions, kick handling included, and divided by `frames_total` gives
/// instructions per frame.
pub fn profile(frames: u64) -> Value {
    let streams: Vec<Value> = [Direction::Transmit, Direction::Receive]
        .iter()
        .map(|&dir| {
            let kick =
                rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC)
                    .expect("eventfd");
            let worker_end = std::fs::File::from(kick.try_clone().expect("dup"));
            let s = Stream::new(dir, Some(worker_end));
            let t0 = Instant::now();
            let (stop, refills, filler) = keep_full(&s, Some(kick));
            while s.frames() < frames {
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::Relaxed);
            filler.join().expect("driver thread");
            let elapsed = t0.elapsed().as_secs_f64();
            let moved = s.frames();
            let broken = s.stats.queue(s.queue).is_some_and(|c| c.broken.load(Ordering::Relaxed));
            assert!(!broken, "{}: the stream ran", dir.name());
            let mut s = s;
            s.backend.shutdown();
            json!({
                "stream": dir.name(),
                "frames_total": moved,
                "refills": refills.load(Ordering::Relaxed),
                "seconds": round(elapsed),
                "mpps": round(moved as f64 / elapsed / 1e6),
            })
        })
        .collect();
    json!({ "net_profile": streams, "frame_bytes": FRAME + 4, "ring": RING })
}
