//! SET_VRING_KICK without a file descriptor (vhost-user's "no fd" flag): the frontend will never
//! kick, so the backend must poll the ring. Driven through the backend's request handler in this
//! process, with a model driver on memfd guest RAM.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vireo_blk::{BlkConfig, BlkDevice, Storage};
use vireo_driver::Buffer;
use vireo_vhost::VhostUserBackend;

#[test]
fn a_ring_without_kick_fd_is_polled() {
    let (mut backend, mut ram, mut drv) = common::polled_ring("polled-ring");
    // Dirty logging on, with SET_LOG_FD's eventfd: it is kicked once the device has logged.
    let log = vireo_memory::memfd("log", 4096).unwrap();
    backend.set_log_base(&vhost::vhost_user::message::VhostUserLog::new(4096, 0), std::fs::File::from(log)).unwrap();
    let kick = rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).unwrap();
    backend.set_log_fd(std::fs::File::from(kick.try_clone().unwrap())).unwrap();

    // GET_ID: header, 20-byte id buffer, status byte. Published, never kicked.
    let header = ram.alloc(16, 16).unwrap();
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID.to_le_bytes());
    ram.write(header, &hdr).unwrap();
    let id = ram.alloc(20, 8).unwrap();
    let status = ram.alloc(1, 1).unwrap();
    ram.write(status, &[0xff]).unwrap();
    let bufs = [
        Buffer { gpa: header, len: 16, writable: false },
        Buffer { gpa: id, len: 20, writable: true },
        Buffer { gpa: status, len: 1, writable: true },
    ];
    let head = drv.add(&ram, &bufs).unwrap();
    drv.publish(&ram, false).unwrap();

    let t = Instant::now();
    let used = loop {
        if let Some(u) = drv.pop_used(&ram).unwrap() {
            break u;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the polled ring was never served");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(used.id, head);
    let mut out = [0u8; 20];
    ram.read(id, &mut out).unwrap();
    assert!(out.starts_with(b"polled-ring"));
    let mut st = [0u8];
    ram.read(status, &mut st).unwrap();
    assert_eq!(st[0], 0);
    let state = backend.get_vring_base(0).unwrap();
    let consumed = { state.num };
    assert_eq!(consumed, 1, "one chain consumed");
    let mut count = [0u8; 8];
    assert_eq!(rustix::io::read(&kick, &mut count).unwrap(), 8, "the dirty log's eventfd was kicked");
    assert!(u64::from_ne_bytes(count) >= 1);
}

/// Every ring message with a queue index the device does not have is refused, not a panic
/// (the message fuzzer found SET_VRING_BASE and SET_VRING_NUM indexing out of range).
#[test]
fn out_of_range_queue_indices_are_refused() {
    let device = BlkDevice::new(Storage::Null { size: 1 << 20 }, BlkConfig::new("range")).unwrap();
    let mut backend = VhostUserBackend::new(Arc::new(device), false, 1, vireo_vhost::DEFAULT_POLL_MAX);
    let eventfd = || std::fs::File::from(vireo_memory::memfd("not-an-eventfd", 8).unwrap());
    for index in [1u32, 99, u32::from(u8::MAX), u32::MAX] {
        assert!(backend.set_vring_num(index, 16).is_err());
        assert!(backend.set_vring_base(index, 0).is_err());
        assert!(backend.get_vring_base(index).is_err());
        assert!(backend.set_vring_addr(index, VhostUserVringAddrFlags::empty(), 0, 0, 0, 0).is_err());
        assert!(backend.set_vring_enable(index, true).is_err());
        if let Ok(i) = u8::try_from(index) {
            assert!(backend.set_vring_kick(i, Some(eventfd())).is_err());
            assert!(backend.set_vring_call(i, Some(eventfd())).is_err());
            assert!(backend.set_vring_err(i, None).is_err());
        }
    }
}
