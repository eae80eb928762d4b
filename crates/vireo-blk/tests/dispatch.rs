//! Vireo's own vhost-user message loop, spoken to byte by byte: REPLY_ACK on success and on
//! refusal, SET/GET_STATUS (with NEEDS_RESET once the driver broke a queue), wrong sizes, extra
//! descriptors, unknown requests, and headers that end the connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_blk::{BlkConfig, BlkDevice, Storage};
use vireo_driver::Buffer;
use vireo_vhost::ServeOptions;

const NEED_REPLY: u32 = 0x8;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
const SET_VRING_NUM: u32 = 8;
const REPLY_ACK: u64 = 1 << 3;
const STATUS: u64 = 1 << 16;

struct Conn {
    sock: UnixStream,
    server: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Conn {
    fn new() -> Self {
        let (front, back) = UnixStream::pair().unwrap();
        front.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let device = BlkDevice::new(Storage::Null { size: 1 << 20 }, BlkConfig::new("dispatch")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                vireo_vhost::serve(
                    vireo_vhost::Endpoint::Stream(back),
                    Arc::new(device),
                    &stop,
                    &ServeOptions::default(),
                )
                .unwrap()
            })
        };
        Self { sock: front, server: Some(server), stop }
    }

    fn send(&mut self, code: u32, flags: u32, payload: &[u8]) {
        let mut m = code.to_le_bytes().to_vec();
        m.extend_from_slice(&(1 | flags).to_le_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        m.extend_from_slice(payload);
        self.sock.write_all(&m).unwrap();
    }

    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).unwrap();
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(hdr[4..8].try_into().unwrap()), 0x5, "version 1, reply flag");
        let mut payload = vec![0u8; u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize];
        self.sock.read_exact(&mut payload).unwrap();
        (code, payload)
    }

    fn u64_reply(&mut self, code: u32) -> u64 {
        let (c, p) = self.reply();
        assert_eq!(c, code);
        u64::from_le_bytes(p.try_into().unwrap())
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.sock.read(&mut b), Ok(0))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.server.take() {
            t.join().unwrap();
        }
    }
}

#[test]
fn reply_ack_status_and_refusals() {
    let mut c = Conn::new();
    c.send(GET_PROTOCOL_FEATURES, 0, &[]);
    let offered = c.u64_reply(GET_PROTOCOL_FEATURES);
    assert_ne!(offered & STATUS, 0, "STATUS offered");
    // REPLY_ACK applies from the next message on.
    c.send(SET_PROTOCOL_FEATURES, 0, &(REPLY_ACK | STATUS).to_le_bytes());
    c.send(SET_STATUS, NEED_REPLY, &0x0fu64.to_le_bytes());
    assert_eq!(c.u64_reply(SET_STATUS), 0, "acknowledged");
    c.send(GET_STATUS, 0, &[]);
    assert_eq!(c.u64_reply(GET_STATUS), 0x0f);
    // Refusals are acknowledged with a non-zero status and the connection goes on.
    c.send(SET_VRING_NUM, NEED_REPLY, &[0u8; 4]); // wrong size
    assert_ne!(c.u64_reply(SET_VRING_NUM), 0);
    c.send(SET_VRING_NUM, NEED_REPLY, &[7, 0, 0, 0, 16, 0, 0, 0]); // no queue 7
    assert_ne!(c.u64_reply(SET_VRING_NUM), 0);
    c.send(22, NEED_REPLY, &[0u8; 32]); // IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM
    assert_ne!(c.u64_reply(22), 0);
    c.send(22, 0, &[0u8; 32]); // the spec has every IOTLB_MSG answered, NEED_REPLY or not
    assert_ne!(c.u64_reply(22), 0);
    c.send(43, 0, &[]); // CHECK_DEVICE_STATE with no transfer: a non-zero status
    assert_ne!(c.u64_reply(43), 0);
    c.send(42, 0, &[0u8; 8]); // SET_DEVICE_STATE_FD without a descriptor: error, no fd (bit 8)
    assert_eq!(c.u64_reply(42), 0x101);
    c.send(14, NEED_REPLY, &0x100u64.to_le_bytes()); // SET_VRING_ERR, queue 0, no descriptor
    assert_eq!(c.u64_reply(14), 0);
    let mut cfg = vec![0u8; 12 + 4]; // SET_CONFIG: offset 0, 4 bytes: the config space is read-only
    cfg[4] = 4;
    c.send(25, NEED_REPLY, &cfg);
    assert_ne!(c.u64_reply(25), 0);
    c.send(7, NEED_REPLY, &[]); // SET_LOG_FD without its eventfd
    assert_ne!(c.u64_reply(7), 0);
    c.send(4, NEED_REPLY, &[]); // RESET_OWNER: rings stopped, features forgotten
    assert_eq!(c.u64_reply(4), 0);
    c.send(34, NEED_REPLY, &[]); // RESET_DEVICE
    assert_eq!(c.u64_reply(34), 0);
    c.send(GET_QUEUE_NUM, 0, &[]);
    assert_eq!(c.u64_reply(GET_QUEUE_NUM), 1);
    // A request whose reply is its answer, refused: the frontend would wait for ever, so the
    // connection ends.
    c.send(GET_QUEUE_NUM, 0, &[1, 2, 3]);
    assert!(c.closed());
}

#[test]
fn a_bad_header_ends_the_connection() {
    let mut c = Conn::new();
    c.send(GET_QUEUE_NUM, 0x4, &[]); // the reply flag set on a request
    assert!(c.closed());
    let mut c = Conn::new();
    c.sock.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0]).unwrap(); // 64 KiB payload announced
    assert!(c.closed());
}

/// A queue the driver broke shows in GET_STATUS as VIRTIO_CONFIG_S_NEEDS_RESET.
#[test]
fn a_broken_queue_sets_needs_reset() {
    let (mut backend, ram, mut drv) = common::polled_ring("broken");
    backend.set_status(0x0f).unwrap();
    assert_eq!(backend.status(), 0x0f);
    // A chain whose buffer lies outside guest memory breaks the queue.
    let bad = Buffer { gpa: vireo_memory::GuestPhysAddr::new(1 << 40), len: 16, writable: false };
    drv.add(&ram, &[bad]).unwrap();
    drv.publish(&ram, false).unwrap();
    let t = Instant::now();
    while backend.status() & 0x40 == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "NEEDS_RESET never set");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(backend.status(), 0x4f);
}
