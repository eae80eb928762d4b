//! Shared by the in-process backend tests: a backend for a null block device, driven through its
//! request handler, with one split ring on memfd guest RAM that the backend polls (no kick fd).
#![allow(dead_code)]

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vireo_blk::{BlkConfig, BlkDevice, Storage};
use vireo_driver::{GuestRam, SplitDriver};
use vireo_vhost::VhostUserBackend;

/// A started, polled ring of 16 descriptors on a null device whose GET_ID returns `serial`.
pub fn polled_ring(serial: &str) -> (VhostUserBackend, GuestRam, SplitDriver) {
    let device = BlkDevice::new(Storage::Null { size: 1 << 20 }, BlkConfig::new(serial)).unwrap();
    let mut backend = VhostUserBackend::new(Arc::new(device), false, 1, vireo_vhost::DEFAULT_POLL_MAX);
    let mut ram = GuestRam::single(4 << 20).unwrap();
    let drv = SplitDriver::new(&mut ram, 16).unwrap();
    let (regions, files) = ram.mem_table().unwrap();
    backend.set_mem_table(&regions, files, None).unwrap();
    let features = backend.get_features().unwrap() & !(1 << 34) & !(1 << 33); // split ring, no vIOMMU
    backend.set_features(features).unwrap();
    backend.set_vring_num(0, 16).unwrap();
    backend.set_vring_base(0, 0).unwrap();
    let (d, a, u) = drv.addrs();
    let user = |g| ram.user_addr(g).unwrap();
    backend.set_vring_addr(0, VhostUserVringAddrFlags::empty(), user(d), user(u), user(a), 0).unwrap();
    backend.set_vring_kick(0, None).unwrap();
    backend.set_vring_enable(0, true).unwrap();
    (backend, ram, drv)
}
