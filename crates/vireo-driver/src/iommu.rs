//! The driver as a virtual IOMMU (VIRTIO_F_ACCESS_PLATFORM): every address it gives the device
//! is an IOVA, `IOVA_OFFSET` above the guest physical address, and the backend learns what an
//! IOVA stands for only from IOTLB messages. Either the whole of guest RAM is sent up front
//! ([`IommuMode::Premapped`]), or nothing is and every translation the backend needs is asked
//! for on the backend channel and answered page by page ([`IommuMode::OnDemand`]), as QEMU does
//! for a guest behind an emulated IOMMU.
//!
//! rust-vmm's frontend has no IOTLB_MSG, so the message is written here, on the same socket:
//! every exchange on it, the frontend's and these, holds the connection's exchange lock.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where IOVAs start: guest physical address + this (a backend that took a descriptor address
/// as guest physical would find nothing there).
pub const IOVA_OFFSET: u64 = 0x40_0000_0000;

/// The size of one on-demand entry (a page of the emulated IOMMU).
pub const ON_DEMAND_PAGE: u64 = 4096;

/// How the driver's vIOMMU tells the backend about translations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// One entry per guest RAM region, sent before the rings start.
    Premapped,
    /// Nothing up front: every miss is answered with one page.
    OnDemand,
}

const IOTLB_MSG: u32 = 22;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const IOTLB_MISS: u8 = 1;
const IOTLB_ACCESS_FAIL: u8 = 4;
const IOTLB_UPDATE: u8 = 2;
const IOTLB_INVALIDATE: u8 = 3;
/// VHOST_ACCESS_RW.
const ACCESS_RW: u8 = 3;
const BACKEND_IOTLB_MSG: u32 = 1;

/// Writes IOTLB messages on the frontend socket.
#[derive(Debug, Clone)]
pub(crate) struct IotlbSender {
    sock: Arc<Mutex<UnixStream>>,
    /// The connection's exchange lock (shared with the frontend's watchdog).
    exchange: Arc<Mutex<()>>,
}

impl IotlbSender {
    pub fn new(sock: UnixStream, exchange: Arc<Mutex<()>>) -> std::io::Result<Self> {
        sock.set_read_timeout(Some(crate::blk::REPLY_TIMEOUT))?;
        Ok(Self { sock: Arc::new(Mutex::new(sock)), exchange })
    }

    /// Sends one IOTLB message and waits for its status word (the spec has the backend answer
    /// every IOTLB_MSG).
    pub fn send(&self, iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> std::io::Result<()> {
        let _exchange = self.exchange.lock().unwrap_or_else(|e| e.into_inner());
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let mut msg = Vec::with_capacity(44);
        msg.extend_from_slice(&IOTLB_MSG.to_le_bytes());
        msg.extend_from_slice(&(FLAG_VERSION | FLAG_NEED_REPLY).to_le_bytes());
        msg.extend_from_slice(&32u32.to_le_bytes());
        msg.extend_from_slice(&iova.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&uaddr.to_le_bytes());
        msg.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
        sock.write_all(&msg)?;
        let mut reply = [0u8; 20];
        sock.read_exact(&mut reply)?;
        let code = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let flags = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let size = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
        let mut status = [0u8; 8];
        status.copy_from_slice(&reply[12..20]);
        if code != IOTLB_MSG || flags & FLAG_REPLY == 0 || size != 8 {
            return Err(std::io::Error::other("malformed IOTLB_MSG reply"));
        }
        match u64::from_le_bytes(status) {
            0 => Ok(()),
            s => Err(std::io::Error::other(format!("IOTLB_MSG refused (status {s})"))),
        }
    }

    pub fn update(&self, iova: u64, size: u64, uaddr: u64) -> std::io::Result<()> {
        self.send(iova, size, uaddr, ACCESS_RW, IOTLB_UPDATE)
    }

    pub fn update_with(&self, iova: u64, size: u64, uaddr: u64, perm: u8) -> std::io::Result<()> {
        self.send(iova, size, uaddr, perm, IOTLB_UPDATE)
    }

    pub fn invalidate(&self, iova: u64, size: u64) -> std::io::Result<()> {
        self.send(iova, size, 0, 0, IOTLB_INVALIDATE)
    }
}

/// Guest RAM as the vIOMMU maps it: `(iova, size, uaddr)` per region.
pub(crate) type IovaRegions = Vec<(u64, u64, u64)>;

/// The thread that answers the backend's misses.
pub(crate) struct MissResponder {
    stop: Arc<AtomicBool>,
    misses: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MissResponder {
    /// Reads misses from `channel` (the driver's end of the backend channel) and answers each
    /// with the page holding it, through `sender`.
    pub fn spawn(channel: UnixStream, sender: IotlbSender, regions: IovaRegions) -> std::io::Result<Self> {
        channel.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let misses = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, misses, faults) = (stop.clone(), misses.clone(), faults.clone());
            std::thread::Builder::new().name("viommu".into()).spawn(move || {
                Self::run(channel, &sender, &regions, &stop, [&misses, &faults]);
            })?
        };
        Ok(Self { stop, misses, faults, thread: Some(thread) })
    }

    /// `counts`: misses answered, access failures reported.
    fn run(
        mut channel: UnixStream,
        sender: &IotlbSender,
        regions: &IovaRegions,
        stop: &AtomicBool,
        counts: [&AtomicU64; 2],
    ) {
        let mut msg = [0u8; 12 + 32];
        while !stop.load(Ordering::Relaxed) {
            match channel.read_exact(&mut msg) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => {
                    if !stop.load(Ordering::Relaxed) {
                        tracing::debug!(error = %e, "backend channel closed");
                    }
                    return;
                }
            }
            let code = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]);
            let kind = msg[12 + 25];
            if code != BACKEND_IOTLB_MSG || size != 32 || !matches!(kind, IOTLB_MISS | IOTLB_ACCESS_FAIL) {
                tracing::warn!(code, size, "unexpected backend request; the channel is dropped");
                return;
            }
            let mut iova = [0u8; 8];
            iova.copy_from_slice(&msg[12..20]);
            let iova = u64::from_le_bytes(iova);
            if kind == IOTLB_ACCESS_FAIL {
                tracing::debug!(iova, "the backend reports an IOTLB access failure");
                counts[1].fetch_add(1, Ordering::Relaxed);
                continue;
            }
            counts[0].fetch_add(1, Ordering::Relaxed);
            let page = iova & !(ON_DEMAND_PAGE - 1);
            let Some(&(start, len, uaddr)) = regions.iter().find(|(s, l, _)| *s <= page && page - s < *l) else {
                // A miss for an IOVA the guest never mapped: an IOMMU fault. Nothing is sent,
                // as QEMU does; the queue stays parked.
                tracing::warn!(iova, "IOTLB miss outside guest RAM");
                continue;
            };
            let size = ON_DEMAND_PAGE.min(start + len - page);
            if let Err(e) = sender.update(page, size, uaddr + (page - start)) {
                tracing::warn!(error = %e, "IOTLB update failed");
                return;
            }
        }
    }

    /// How many misses were answered.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// How many access failures the backend reported.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
}

impl Drop for MissResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
