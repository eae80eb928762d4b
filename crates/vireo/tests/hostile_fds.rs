//! Every descriptor a frontend hands over, at its worst, and every size at its extremes, spoken
//! to the message loop byte by byte: memory regions (SET_MEM_TABLE, ADD_MEM_REG), the dirty log
//! (SET_LOG_BASE, SET_LOG_FD), the inflight area (SET_INFLIGHT_FD), the kick, call and err
//! eventfds, the backend channel (SET_BACKEND_REQ_FD) and the device state (SET_DEVICE_STATE_FD),
//! each with a pipe, /dev/null, an empty or a tiny file, a socket, an eventfd, an empty memfd, and
//! sizes, offsets and counts at zero, past the file and at `u64::MAX`. After each case the
//! backend has answered or closed the connection, serves the next frontend, and holds no more
//! descriptors or guest mappings than before.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vireo_vhost::ServeOptions;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const NEED_REPLY: u32 = 0x8;
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const SET_DEVICE_STATE_FD: u32 = 42;

/// The kinds of descriptor a hostile frontend sends where Vireo expects a particular one.
#[derive(Debug, Clone, Copy)]
enum Kind {
    PipeRead,
    PipeWrite,
    DevNull,
    EmptyFile,
    TinyMemfd,
    EmptyMemfd,
    Socket,
    Eventfd,
    /// A memfd of 2 MiB, shrunk to a page once sent (the mapping Vireo makes may outlive it).
    ShrunkMemfd,
}

const KINDS: [Kind; 9] = [
    Kind::PipeRead,
    Kind::PipeWrite,
    Kind::DevNull,
    Kind::EmptyFile,
    Kind::TinyMemfd,
    Kind::EmptyMemfd,
    Kind::Socket,
    Kind::Eventfd,
    Kind::ShrunkMemfd,
];

const BIG: u64 = 2 << 20;

/// Makes a descriptor of `kind`, and what must live as long as the case (the other ends).
fn make(kind: Kind, keep: &mut Vec<OwnedFd>) -> OwnedFd {
    match kind {
        Kind::PipeRead | Kind::PipeWrite => {
            let (r, w) = rustix::pipe::pipe().unwrap();
            if matches!(kind, Kind::PipeRead) {
                keep.push(w);
                r
            } else {
                keep.push(r);
                w
            }
        }
        Kind::DevNull => std::fs::File::open("/dev/null").unwrap().into(),
        Kind::EmptyFile => {
            let path = std::env::temp_dir().join(format!("vireo-hostile-fd-{}", std::process::id()));
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            f.into()
        }
        Kind::TinyMemfd => vireo_memory::memfd("hostile-fd", 4096).unwrap(),
        Kind::EmptyMemfd => vireo_memory::memfd("hostile-fd", 0).unwrap(),
        Kind::ShrunkMemfd => vireo_memory::memfd("hostile-fd", BIG).unwrap(),
        Kind::Socket => {
            let (a, b) = UnixStream::pair().unwrap();
            keep.push(b.into());
            a.into()
        }
        Kind::Eventfd => {
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .unwrap()
        }
    }
}

struct Conn {
    sock: UnixStream,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Conn {
    fn new() -> Self {
        let (front, back) = UnixStream::pair().unwrap();
        front.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let device =
            vireo_blk::BlkDevice::new(vireo_blk::Storage::Null { size: 1 << 20 }, vireo_blk::BlkConfig::new("fds"))
                .unwrap();
        let server = std::thread::spawn(move || {
            let stop = AtomicBool::new(false);
            // An error ends the connection: that is an allowed answer to a hostile frontend.
            let _ = vireo_vhost::serve(
                vireo_vhost::Endpoint::Stream(back),
                Arc::new(device),
                &stop,
                &ServeOptions::default(),
            );
        });
        Self { sock: front, server: Some(server) }
    }

    /// Sends a message; false if the backend has closed the connection.
    fn send(&mut self, code: u32, flags: u32, payload: &[u8], fds: &[&OwnedFd]) -> bool {
        let mut m = code.to_le_bytes().to_vec();
        m.extend_from_slice(&(1 | flags).to_le_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        m.extend_from_slice(payload);
        if fds.is_empty() {
            return self.sock.write_all(&m).is_ok();
        }
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.sock.send_with_fds(&[&m[..]], &raw).is_ok()
    }

    /// The reply's payload, or `None` when the connection ended instead.
    fn reply(&mut self) -> Option<Vec<u8>> {
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).ok()?;
        let mut payload = vec![0u8; u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize];
        self.sock.read_exact(&mut payload).ok()?;
        Some(payload)
    }

    fn u64_reply(&mut self) -> Option<u64> {
        self.reply().map(|p| u64::from_le_bytes(p[..8].try_into().unwrap()))
    }

    /// SET_OWNER, features and protocol features (everything offered, REPLY_ACK included).
    fn negotiate(&mut self) {
        assert!(self.send(SET_OWNER, 0, &[], &[]));
        assert!(self.send(GET_FEATURES, 0, &[], &[]));
        let features = self.u64_reply().unwrap() & !(1 << 26);
        assert!(self.send(SET_FEATURES, 0, &features.to_le_bytes(), &[]));
        assert!(self.send(GET_PROTOCOL_FEATURES, 0, &[], &[]));
        let protocol = self.u64_reply().unwrap();
        assert!(self.send(SET_PROTOCOL_FEATURES, 0, &protocol.to_le_bytes(), &[]));
    }

    /// Ends the connection and waits for the backend to let go of it.
    fn close(mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.server.take().unwrap().join().unwrap();
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What the open descriptors are (for the message of a failed check).
fn fd_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default()
            )
        })
        .collect();
    v.sort();
    v
}

fn hostile_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("hostile-fd")).count()
}

fn region(gpa: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    [gpa, size, user, offset].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut p = u32::try_from(regions.len()).unwrap().to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);
    for r in regions {
        p.extend_from_slice(r);
    }
    p
}

/// A hostile message: its code, payload and how many descriptors of the case's kind go with it.
struct Case {
    what: String,
    code: u32,
    payload: Vec<u8>,
    fds: usize,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |what: &str, code: u32, payload: Vec<u8>, fds: usize| {
        v.push(Case { what: what.to_owned(), code, payload, fds });
    };
    let page = 4096u64;
    for (what, r) in [
        ("a region", region(0, BIG, 0x7000_0000, 0)),
        ("an empty region", region(0, 0, 0x7000_0000, 0)),
        ("a region of u64::MAX bytes", region(0, u64::MAX, 0x7000_0000, 0)),
        ("a region past the end of the file", region(0, page, 0x7000_0000, BIG)),
        ("a region whose offset wraps", region(0, page, 0x7000_0000, u64::MAX - 10)),
        ("a region whose guest address wraps", region(u64::MAX - page + 1, 2 * page, 0x7000_0000, 0)),
        ("a region whose user address wraps", region(0, 2 * page, u64::MAX - page + 1, 0)),
    ] {
        add(&format!("SET_MEM_TABLE: {what}"), SET_MEM_TABLE, mem_table(std::slice::from_ref(&r)), 1);
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&r);
        add(&format!("ADD_MEM_REG: {what}"), ADD_MEM_REG, p, 1);
    }
    add("SET_MEM_TABLE: 509 regions, one descriptor", SET_MEM_TABLE, mem_table(&vec![region(0, page, 0, 0); 509]), 1);
    add("SET_MEM_TABLE: 510 regions", SET_MEM_TABLE, mem_table(&vec![region(0, page, 0, 0); 510]), 1);
    add(
        "SET_MEM_TABLE: two regions, one descriptor",
        SET_MEM_TABLE,
        mem_table(&[region(0, page, 0, 0), region(page, page, page, 0)]),
        1,
    );
    let mut lying = u32::MAX.to_le_bytes().to_vec();
    lying.extend_from_slice(&[0; 4]);
    add("SET_MEM_TABLE: u32::MAX regions in a short payload", SET_MEM_TABLE, lying, 1);
    for (what, size, offset) in [
        ("a log", BIG, 0),
        ("an empty log", 0, 0),
        ("a log of u64::MAX bytes", u64::MAX, 0),
        ("a log past the file", page, BIG),
        ("a log whose offset wraps", page, u64::MAX),
    ] {
        let p: Vec<u8> = [size, offset].iter().flat_map(|v| v.to_le_bytes()).collect();
        add(&format!("SET_LOG_BASE: {what}"), SET_LOG_BASE, p, 1);
    }
    add("SET_LOG_FD", SET_LOG_FD, vec![], 1);
    for (what, size, offset, queues, qsize) in [
        ("an inflight area", BIG, 0u64, 1u16, 256u16),
        ("an empty inflight area", 0, 0, 1, 256),
        ("an inflight area of u64::MAX bytes", u64::MAX, 0, 1, 256),
        ("an inflight area past the file", page, BIG, 1, 256),
        ("an inflight area for 65535 queues of 65535", BIG, 0, u16::MAX, u16::MAX),
        ("an inflight area for no queue", BIG, 0, 0, 0),
    ] {
        let mut p: Vec<u8> = [size, offset].iter().flat_map(|v| v.to_le_bytes()).collect();
        p.extend_from_slice(&queues.to_le_bytes());
        p.extend_from_slice(&qsize.to_le_bytes());
        add(&format!("SET_INFLIGHT_FD: {what}"), SET_INFLIGHT_FD, p, 1);
    }
    for (name, code) in
        [("SET_VRING_KICK", SET_VRING_KICK), ("SET_VRING_CALL", SET_VRING_CALL), ("SET_VRING_ERR", SET_VRING_ERR)]
    {
        add(&format!("{name}: queue 0"), code, 0u64.to_le_bytes().to_vec(), 1);
        add(&format!("{name}: queue 255"), code, 255u64.to_le_bytes().to_vec(), 1);
        add(&format!("{name}: two descriptors"), code, 0u64.to_le_bytes().to_vec(), 2);
    }
    add("SET_BACKEND_REQ_FD", SET_BACKEND_REQ_FD, vec![], 1);
    for (what, direction, phase) in
        [("save", 0u32, 0u32), ("load", 1, 0), ("an unknown direction", 7, 0), ("an unknown phase", 0, 9)]
    {
        let mut p = direction.to_le_bytes().to_vec();
        p.extend_from_slice(&phase.to_le_bytes());
        add(&format!("SET_DEVICE_STATE_FD: {what}"), SET_DEVICE_STATE_FD, p, 1);
    }
    v
}

/// A queue set up on a real ring (so that a kick, call or err descriptor is used, and a memory
/// table is in force when the log or the inflight area arrives).
fn set_up_queue(c: &mut Conn, keep: &mut Vec<OwnedFd>) -> bool {
    let ram = vireo_memory::memfd("hostile-fd", BIG).unwrap();
    let ok = c.send(SET_MEM_TABLE, 0, &mem_table(&[region(0, BIG, 0x7000_0000, 0)]), &[&ram])
        && c.send(SET_VRING_NUM, 0, &[0, 0, 0, 0, 0, 1, 0, 0], &[])
        && c.send(SET_VRING_BASE, 0, &[0; 8], &[]);
    let mut addr = vec![0u8; 8];
    for a in [0x7000_0000u64, 0x7000_2000, 0x7000_1000, 0] {
        addr.extend_from_slice(&a.to_le_bytes());
    }
    keep.push(ram);
    ok && c.send(SET_VRING_ADDR, 0, &addr, &[])
}

#[test]
fn every_descriptor_at_its_worst_and_every_size_at_its_extremes() {
    // One connection first, so that what the process keeps for good (the membarrier
    // registration, the worker pool's first allocations) is in the baseline.
    let mut warm = Conn::new();
    warm.negotiate();
    warm.close();
    let (fds_before, maps_before) = (open_fds(), vireo_memory::live_mappings());
    let mut answered = 0;
    let mut closed = 0;
    for case in cases() {
        for kind in KINDS {
            let mut keep = Vec::new();
            let mut c = Conn::new();
            c.negotiate();
            let queue_ready = set_up_queue(&mut c, &mut keep);
            assert!(queue_ready, "{}: the set-up was refused", case.what);
            let fds: Vec<OwnedFd> = (0..case.fds).map(|_| make(kind, &mut keep)).collect();
            let refs: Vec<&OwnedFd> = fds.iter().collect();
            let sent = c.send(case.code, NEED_REPLY, &case.payload, &refs);
            if matches!(kind, Kind::ShrunkMemfd) {
                for f in &fds {
                    let _ = rustix::fs::ftruncate(f.as_fd(), 4096);
                }
            }
            drop(fds);
            match c.reply() {
                Some(_) if sent => answered += 1,
                _ => closed += 1,
            }
            // The queue started and kicked, so that the worker touches whatever is in force now
            // (a ring in a region of the hostile table, a shrunk file, the hostile descriptors).
            let kick = make(Kind::Eventfd, &mut keep);
            if c.send(SET_VRING_KICK, 0, &0u64.to_le_bytes(), &[&kick])
                && c.send(SET_VRING_ENABLE, 0, &[0, 0, 0, 0, 1, 0, 0, 0], &[])
            {
                let _ = rustix::io::write(&kick, &1u64.to_ne_bytes());
            }
            drop(kick);
            // Alive, and the connection still answers (or has ended cleanly).
            if c.send(GET_FEATURES, 0, &[], &[]) {
                let _ = c.reply();
            }
            c.close();
            drop(keep);
            let t = std::time::Instant::now();
            while open_fds() != fds_before && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(open_fds(), fds_before, "{} with {kind:?}: descriptors left open: {:?}", case.what, fd_list());
            assert_eq!(vireo_memory::live_mappings(), maps_before, "{} with {kind:?}: mappings left", case.what);
            assert_eq!(hostile_mappings(), 0, "{} with {kind:?}: a frontend's file still mapped", case.what);
        }
    }
    eprintln!("{answered} cases answered, {closed} ended the connection");
    // The next frontend is served.
    let mut next = Conn::new();
    next.negotiate();
    assert!(next.send(GET_FEATURES, 0, &[], &[]));
    assert!(next.u64_reply().is_some(), "a new frontend is served after every hostile one");
    next.close();
}
