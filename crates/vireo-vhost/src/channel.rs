//! The backend channel (SET_BACKEND_REQ_FD): the socket on which the backend sends requests to
//! the frontend. Vireo sends IOTLB misses (a queue needs a translation) and access failures on it, and never asks for a reply.
//!
//! Workers send on it, so a send must never wait: the frontend reads this socket from the same
//! loop that waits for Vireo's replies, and a worker blocked here could be the one an
//! invalidation waits for. Sends are non-blocking; a full socket drops the message (a queue
//! parked on a miss sends it again later) and is reported.

use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vireo_memory::Perm;

/// Backend request codes (vhost-user's VHOST_USER_BACKEND_*).
const BACKEND_IOTLB_MSG: u32 = 1;
/// Header flags: protocol version 1, no reply wanted.
const FLAG_VERSION: u32 = 0x1;
/// `struct vhost_iotlb_msg` type field: a miss, an access failure.
const IOTLB_MISS: u8 = 1;
const IOTLB_ACCESS_FAIL: u8 = 4;
/// `struct vhost_iotlb_msg` is 26 bytes of fields, padded to 32 by its alignment.
const IOTLB_MSG_SIZE: usize = 32;

/// Why a backend request was not sent.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The frontend gave no backend channel (or it was closed).
    #[error("no backend channel")]
    NotConnected,
    /// The socket is full: the frontend is not reading it now.
    #[error("backend channel full; request dropped")]
    Full,
    /// The socket failed; the channel is dropped.
    #[error("backend channel failed: {0}")]
    Io(#[from] std::io::Error),
}

/// SET_LOG_FD's eventfd: kicked after a queue has set bits in the dirty log (a frontend that
/// asks for it syncs the log when kicked).
#[derive(Debug, Default)]
pub struct LogKick {
    fd: Mutex<Option<std::fs::File>>,
}

impl LogKick {
    /// The eventfd to kick (replacing any earlier one), or none.
    pub fn set(&self, fd: Option<std::fs::File>) {
        *self.fd.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }

    /// Signals the eventfd, if there is one (never blocks: an eventfd write only fails when the
    /// counter would overflow, and then the frontend has a kick to read anyway).
    pub fn kick(&self) {
        if let Some(f) = self.fd.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = rustix::io::write(f, &1u64.to_ne_bytes());
        }
    }
}

/// A `struct vhost_iotlb_msg` from the backend: size (8..16) and uaddr (16..24) unused.
fn iotlb_payload(iova: u64, perm: Perm, kind: u8) -> [u8; IOTLB_MSG_SIZE] {
    let mut payload = [0u8; IOTLB_MSG_SIZE];
    payload[0..8].copy_from_slice(&iova.to_le_bytes());
    payload[24] = perm.bits();
    payload[25] = kind;
    payload
}

/// One connection's backend channel, shared by the control thread and the workers.
#[derive(Debug, Default)]
pub struct BackendChannel {
    sock: Mutex<Option<UnixStream>>,
    misses: std::sync::atomic::AtomicU64,
}

impl BackendChannel {
    /// A channel with no socket yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// SET_BACKEND_REQ_FD: the socket to send on (replacing any earlier one).
    pub fn set(&self, sock: Option<UnixStream>) {
        *self.sock.lock().unwrap_or_else(|e| e.into_inner()) = sock;
    }

    /// Asks the frontend for the IOTLB entry covering `iova`, for `perm` access.
    pub fn iotlb_miss(&self, iova: u64, perm: Perm) -> Result<(), ChannelError> {
        self.send(BACKEND_IOTLB_MSG, &iotlb_payload(iova, perm, IOTLB_MISS))?;
        self.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Tells the frontend that an access at `iova` was refused by its entry's rights (the queue
    /// broke on it).
    pub fn iotlb_access_fail(&self, iova: u64, perm: Perm) -> Result<(), ChannelError> {
        self.send(BACKEND_IOTLB_MSG, &iotlb_payload(iova, perm, IOTLB_ACCESS_FAIL))
    }

    /// IOTLB misses sent.
    pub fn misses_sent(&self) -> u64 {
        self.misses.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send(&self, code: u32, payload: &[u8]) -> Result<(), ChannelError> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let sock = guard.as_ref().ok_or(ChannelError::NotConnected)?;
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&FLAG_VERSION.to_le_bytes());
        // Payloads here are at most 32 bytes.
        msg.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
        msg.extend_from_slice(payload);
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::send(sock, &msg, flags) {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(_) => {
                // Half a message on a stream socket: the frontend would misread everything after
                // it. Nothing more is sent on this channel.
                *guard = None;
                Err(ChannelError::Io(std::io::Error::other("partial write; channel closed")))
            }
            Err(rustix::io::Errno::AGAIN) => Err(ChannelError::Full),
            Err(e) => {
                *guard = None;
                Err(ChannelError::Io(e.into()))
            }
        }
    }
}
