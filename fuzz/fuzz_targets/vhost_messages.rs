//! Everything a frontend controls on the socket: the fuzzer's bytes become a stream of vhost-user
//! messages (request codes, flags, sizes, payloads, and attached memfds) sent to a backend for a
//! two-queue null block device, received, checked and dispatched by Vireo's message loop
//! (memory tables whose regions point anywhere in those memfds, rings at any address, features,
//! inflight areas, dirty logs, ...). The backend must answer or refuse, never crash or hang;
//! queues it starts run their workers on whatever the rings hold until the connection ends.
#![no_main]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vireo_blk::{BlkConfig, BlkDevice, Storage};
use vireo_vhost::ServeOptions;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Frontend request codes 1..=47 are defined; a few beyond them test the unknown-request path.
const MAX_CODE: u32 = 50;
const MEMFD_SIZE: u64 = 1 << 20;

fn memfd() -> OwnedFd {
    vireo_memory::memfd("fuzz-region", MEMFD_SIZE).expect("memfd")
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 8192 {
        return;
    }
    let (front, back) = UnixStream::pair().expect("socketpair");
    let device = BlkDevice::new(Storage::Null { size: 1 << 20 }, BlkConfig { num_queues: 2, ..BlkConfig::new("fuzz") })
        .expect("device");

    // Message i: [code, flags, fds, len_lo, len_hi, honest] then `len` payload bytes.
    let mut rest = data;
    let mut fds_keep = Vec::new();
    let mut messages = 0;
    while rest.len() >= 6 && messages < 64 {
        let code = u32::from(rest[0]) % MAX_CODE;
        let flags = u32::from(rest[1] & 0x0f) | 1; // version 1, maybe NEED_REPLY (bit 3)
        let nfds = usize::from(rest[2] % 4);
        let len = usize::from(u16::from_le_bytes([rest[3], rest[4]])).min(rest.len() - 6).min(512);
        let honest = rest[5] & 1 == 1;
        let payload = &rest[6..6 + len];
        rest = &rest[6 + len..];
        let size = if honest { len as u32 } else { u32::from(rest.first().copied().unwrap_or(0)) };
        let mut msg = Vec::with_capacity(12 + len);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        let fds: Vec<OwnedFd> = (0..nfds).map(|_| memfd()).collect();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if front.send_with_fds(&[&msg[..]], &raw).is_err() {
            break;
        }
        fds_keep.extend(fds);
        messages += 1;
    }
    // The frontend has said everything; the backend reads until the end of the stream (its
    // replies fit in the socket buffer) and then stops every queue it started.
    let _ = front.shutdown(std::net::Shutdown::Write);
    let stop = AtomicBool::new(false);
    let _ = vireo_vhost::serve(vireo_vhost::Endpoint::Stream(back), Arc::new(device), &stop, &ServeOptions::default());
    drop(fds_keep);
});
