//! The network device's chain handling, end to end through the backend: the fuzzer's bytes
//! become guest memory holding a receive and a transmit split ring (descriptor tables, available
//! rings, indirect tables, virtio-net headers, frames), and a few knobs choose the port (sink,
//! loopback, source) and the features the driver acknowledged (mergeable receive buffers, the
//! checksum and segmentation offloads, EVENT_IDX, indirect descriptors). The backend serves both
//! queues, busy-polled, until the transmit ring is drained or a moment has passed, then stops.
//!
//! Nothing may panic (a panic on a worker aborts the process under the fuzzer), hang (libFuzzer's
//! timeout), or write outside guest memory; afterwards every used element names a descriptor of
//! its ring, a receive element's length fits what a chain can hold, and the counters add up:
//! every transmit chain completed was either moved or counted as dropped or refused.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vireo_driver::GuestRam;
use vireo_memory::GuestPhysAddr;
use vireo_net::{NetConfig, NetDevice, Port};
use vireo_vhost::{VhostUserBackend, DEFAULT_POLL_MAX};

const RAM: u64 = 64 << 10;
/// Ring areas, per queue (receive 0, transmit 1): descriptors, available, used.
const RINGS: [[u64; 3]; 2] = [[0x0000, 0x1000, 0x1800], [0x2000, 0x3000, 0x3800]];
const KNOBS: usize = 3;

fn read_u16(ram: &GuestRam, gpa: u64) -> u16 {
    let mut b = [0u8; 2];
    ram.read(GuestPhysAddr::new(gpa), &mut b).expect("ring in RAM");
    u16::from_le_bytes(b)
}

fn bits(knobs: u8) -> u64 {
    use vireo_wire::features::net as f;
    let mut acked = vireo_wire::features::VERSION_1;
    let pick = [
        (1u8, f::MRG_RXBUF),
        (2, f::CSUM | f::GUEST_CSUM),
        (4, f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN | f::HOST_UFO | f::HOST_USO),
        (8, vireo_wire::features::EVENT_IDX),
        (16, vireo_wire::features::INDIRECT_DESC),
    ];
    for (bit, feature) in pick {
        if knobs & bit != 0 {
            acked |= feature;
        }
    }
    if knobs & 32 != 0 {
        acked &= !vireo_wire::features::VERSION_1;
    }
    acked
}

fuzz_target!(|data: &[u8]| {
    if data.len() < KNOBS {
        return;
    }
    let port = match data[0] % 3 {
        0 => Port::Sink,
        1 => Port::Loopback,
        _ => Port::Source { frame_len: 60 + usize::from(data[0] / 3) * 8 },
    };
    // 2..=128: each ring area fits in the place given to it.
    let size = 1u16 << (1 + data[2] % 7);
    let device = Arc::new(NetDevice::new(port, NetConfig { queue_size: 256, ..NetConfig::default() }));
    let stats = device.stats();
    let ram = GuestRam::single(RAM).expect("guest RAM");
    let image = &data[KNOBS..data.len().min(KNOBS + RAM as usize)];
    ram.write(GuestPhysAddr::new(0), image).expect("image");
    // The used rings start zeroed, as a driver leaves them (what is found there afterwards is the
    // device's).
    for [_, _, used] in RINGS {
        ram.write(GuestPhysAddr::new(used), &[0; 0x800]).expect("used ring");
    }

    let mut backend = VhostUserBackend::new(device, true, 1, DEFAULT_POLL_MAX);
    let (regions, files) = ram.mem_table().expect("memory table");
    backend.set_mem_table(&regions, files, None).expect("memory table");
    let offered = backend.get_features().expect("features");
    backend.set_features(offered & bits(data[1])).expect("acked features");
    for (q, [desc, avail, used]) in RINGS.iter().enumerate() {
        let q32 = q as u32;
        let user = |g: u64| ram.user_addr(GuestPhysAddr::new(g)).expect("user");
        backend.set_vring_num(q32, u32::from(size)).expect("num");
        backend.set_vring_base(q32, 0).expect("base");
        backend
            .set_vring_addr(q32, VhostUserVringAddrFlags::empty(), user(*desc), user(*used), user(*avail), 0)
            .expect("addr");
        backend.set_vring_call(q as u8, None).expect("call");
        backend.set_vring_kick(q as u8, None).expect("kick");
    }
    // Served until the transmit ring is drained (or broken, or the moment is over).
    let tx_avail = read_u16(&ram, RINGS[1][1] + 2);
    let deadline = Instant::now() + Duration::from_millis(20);
    while Instant::now() < deadline {
        let used = read_u16(&ram, RINGS[1][2] + 2);
        if used == tx_avail || stats.queue(1).is_some_and(|q| q.broken.load(std::sync::atomic::Ordering::Relaxed)) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    backend.shutdown();

    // What the device left in the used rings.
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    for (q, [_, avail, used]) in RINGS.iter().enumerate() {
        let n = read_u16(&ram, used + 2);
        let _ = avail;
        for i in 0..n.min(size) {
            let at = used + 4 + 8 * u64::from(i);
            let mut e = [0u8; 8];
            ram.read(GuestPhysAddr::new(at), &mut e).expect("used ring");
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            assert!(id < u32::from(size), "queue {q}: used id {id} outside a ring of {size}");
            assert!(u64::from(len) <= RAM, "queue {q}: used length {len} larger than guest memory");
        }
    }
    let tx = stats.queue(1).expect("tx counters");
    if !tx.broken.load(relaxed) {
        let completed = u64::from(read_u16(&ram, RINGS[1][2] + 2));
        let accounted = tx.frames.load(relaxed) + tx.drops.load(relaxed) + tx.errors.load(relaxed);
        assert!(accounted >= completed, "tx: {completed} chains completed, {accounted} frames counted");
    }
});
