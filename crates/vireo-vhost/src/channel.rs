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

use vireo_wire::iotlb::{ACCESS_FAIL as IOTLB_ACCESS_FAIL, BACKEND_IOTLB_MSG, MISS as IOTLB_MISS};
use vireo_wire::{Header, IotlbMsg};

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

/// A `struct vhost_iotlb_msg` from the backend: size and uaddr unused.
fn iotlb_payload(iova: u64, perm: Perm, kind: u8) -> [u8; vireo_wire::iotlb::SIZE] {
    IotlbMsg { iova, size: 0, uaddr: 0, perm: perm.bits(), kind }.encode()
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
        // Payloads here are at most 32 bytes; no reply is wanted.
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut msg = Header::request(code, 0, size).encode().to_vec();
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
