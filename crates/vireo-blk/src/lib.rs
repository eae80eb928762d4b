//! Vireo's virtio-blk device (virtio 1.x 5.2): a raw image file or a null device, served through
//! `vireo-vhost`.
//!
//! Each queue is its own group, served by a [`queue::BlkQueue`] (`queue.rs`): chains are popped,
//! handled and completed in one loop (`pop_each`), and each completion is published as it is
//! made. Reads, writes and flushes of an image go through io_uring (`uring.rs`, one ring per
//! queue, the default `Aio::IoUring`): submitted straight from the guest's buffers (no bounce
//! copy), completed out of order, each request holding I/O pins on the regions its buffers are in
//! until it is reaped. With `Aio::Sync`, and for the other request types, requests are handled on
//! the worker during the batch (`preadv`/`pwritev` on the chain's iovecs, valid while the batch
//! holds the buffers' regions). `direct` opens the image a second time with O_DIRECT for the
//! aligned requests of the io_uring path; misaligned ones take the buffered descriptor, and so
//! do requests whose buffers are guest RAM in a regular file (see `uring.rs`).
//!
//! # Invariants
//! * Every request gets a status byte (OK, IOERR or UNSUPP) when the chain has a writable byte
//!   for it; a chain without one is completed with length zero.
//! * Nothing outside `[0, capacity)` is read or written; a read-only device writes nothing.

#![warn(missing_docs)]

mod queue;
mod uring;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vireo_queue::Chain;
use vireo_vhost::{Device, QueueHandler};
use vireo_wire::features::blk as f;

const SECTOR: u64 = 512;

/// virtio-blk request types, from virtio-bindings.
mod req {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD as DISCARD, VIRTIO_BLK_T_FLUSH as FLUSH, VIRTIO_BLK_T_GET_ID as GET_ID,
        VIRTIO_BLK_T_IN as IN, VIRTIO_BLK_T_OUT as OUT, VIRTIO_BLK_T_WRITE_ZEROES as WRITE_ZEROES,
    };
}

use virtio_bindings::virtio_blk as vblk;
// The status values are small constants (0, 1, 2); the bindings type them u32.
#[allow(clippy::cast_possible_truncation)]
const S_OK: u8 = vblk::VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const S_IOERR: u8 = vblk::VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
const S_UNSUPP: u8 = vblk::VIRTIO_BLK_S_UNSUPP as u8;

/// Where the blocks live.
#[derive(Debug)]
pub enum Storage {
    /// Discards writes and leaves read buffers as they are, like QEMU's `null-co`.
    Null {
        /// Size in bytes.
        size: u64,
    },
    /// A raw image file or block device.
    File {
        /// The open image.
        file: File,
        /// Size in bytes.
        size: u64,
    },
}

/// How image I/O is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// io_uring, one ring per queue, completions out of order (falls back to `Sync` where the
    /// kernel refuses io_uring).
    #[default]
    IoUring,
    /// `preadv`/`pwritev` on the queue's worker, one request at a time.
    Sync,
}

/// Why a device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened with O_DIRECT.
    #[error("cannot open the image with O_DIRECT (--direct): {0}")]
    Direct(#[source] std::io::Error),
}

/// Device options.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// Queues offered.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// The GET_ID string (at most 20 bytes are returned).
    pub serial: String,
    /// How image I/O is done.
    pub aio: Aio,
    /// Bypass the host page cache (O_DIRECT) for aligned io_uring requests.
    pub direct: bool,
}

impl BlkConfig {
    /// Options with the defaults of `vireo blk`: 1 queue of up to 256, writable, io_uring.
    pub fn new(serial: impl Into<String>) -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: serial.into(),
            aio: Aio::IoUring,
            direct: false,
        }
    }
}

/// The virtio-blk device (shared by its queues' workers and io_uring engines).
#[derive(Debug, Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storage: Storage,
    cfg: BlkConfig,
    /// The image opened with O_DIRECT (`BlkConfig::direct`).
    direct: Option<File>,
}

impl BlkDevice {
    /// A device over `storage`.
    pub fn new(storage: Storage, cfg: BlkConfig) -> Result<Self, BlkError> {
        let direct = match (&storage, cfg.direct) {
            (Storage::File { file, .. }, true) => {
                use std::os::unix::fs::OpenOptionsExt;
                // Reopen the same file (whatever path it had) through its descriptor.
                let path = format!("/proc/self/fd/{}", file.as_raw_fd());
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!cfg.read_only)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(BlkError::Direct)?;
                Some(f)
            }
            _ => None,
        };
        Ok(Self { inner: Arc::new(Inner { storage, cfg, direct }) })
    }
}

impl Inner {
    fn size(&self) -> u64 {
        match &self.storage {
            Storage::Null { size } | Storage::File { size, .. } => *size,
        }
    }

    /// Runs one request; returns the status and the bytes written before the status byte.
    /// The request header (type, sector), when the chain has one.
    fn header(chain: &Chain<'_>) -> Option<(u32, u64)> {
        let mut hdr = [0u8; 16];
        if chain.read_at(0, &mut hdr) != 16 {
            return None;
        }
        Some((u32::from_le_bytes(hdr[..4].try_into().ok()?), u64::from_le_bytes(hdr[8..].try_into().ok()?)))
    }

    /// Where a read (IN) or write (OUT) lands: byte offset and data length (the writable part
    /// without its status byte, or the readable part after the header). `None` when it would
    /// leave the device, writes a read-only one, or is not a read or write.
    fn rw_extent(&self, kind: u32, sector: u64, chain: &Chain<'_>) -> Option<(u64, u32)> {
        let len = match kind {
            req::IN => chain.writable_len().saturating_sub(1),
            req::OUT if !self.cfg.read_only => chain.readable_len().saturating_sub(16),
            _ => return None,
        };
        let off = sector.checked_mul(SECTOR)?;
        (off.checked_add(u64::from(len))? <= self.size()).then_some((off, len))
    }

    fn run(&self, kind: u32, sector: u64, chain: &Chain<'_>) -> (u8, u32) {
        let data_out = chain.writable_len().saturating_sub(1);
        match kind {
            req::IN | req::OUT => {
                let Some((off, len)) = self.rw_extent(kind, sector, chain) else { return (S_IOERR, 0) };
                let read = kind == req::IN;
                let done = match &self.storage {
                    Storage::Null { .. } => true,
                    Storage::File { file, .. } => rw_vectored(file, chain, off, !read).is_ok_and(|n| n == len as usize),
                };
                match (done, read) {
                    (true, true) => (S_OK, len),
                    (true, false) => (S_OK, 0),
                    (false, _) => (S_IOERR, 0),
                }
            }
            req::FLUSH => match &self.storage {
                Storage::Null { .. } => (S_OK, 0),
                Storage::File { file, .. } => (if file.sync_data().is_ok() { S_OK } else { S_IOERR }, 0),
            },
            req::GET_ID => {
                let mut id = [0u8; 20];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(20);
                id[..n].copy_from_slice(&s[..n]);
                let len = (data_out as usize).min(20);
                let written = chain.write_at(0, &id[..len]);
                (S_OK, u32::try_from(written).unwrap_or(0))
            }
            req::DISCARD | req::WRITE_ZEROES => {
                if self.cfg.read_only {
                    return (S_IOERR, 0);
                }
                (self.discard_or_zero(kind, chain), 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// DISCARD and WRITE_ZEROES: a list of {sector u64, num_sectors u32, flags u32} segments.
    fn discard_or_zero(&self, kind: u32, chain: &Chain<'_>) -> u8 {
        let total = chain.readable_len().saturating_sub(16) as usize;
        if total == 0 || !total.is_multiple_of(16) {
            return S_IOERR;
        }
        let mut seg = [0u8; 16];
        for i in 0..total / 16 {
            if chain.read_at(16 + 16 * i, &mut seg) != 16 {
                return S_IOERR;
            }
            let sector = u64::from_le_bytes(seg[..8].try_into().unwrap_or([0; 8]));
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let Some(off) = sector.checked_mul(SECTOR) else { return S_IOERR };
            let len = u64::from(count) * SECTOR;
            if off.checked_add(len).is_none_or(|end| end > self.size()) {
                return S_IOERR;
            }
            if let Storage::File { file, .. } = &self.storage {
                let mode = if kind == req::DISCARD {
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE
                } else {
                    rustix::fs::FallocateFlags::ZERO_RANGE
                };
                if rustix::fs::fallocate(file, mode, off, len).is_err() {
                    return S_IOERR;
                }
            }
        }
        S_OK
    }
}

/// The data buffers of a read or write as iovecs: the writable part without its last (status)
/// byte for reads, the readable part after the 16-byte header for writes.
fn data_iovecs(chain: &Chain<'_>, write: bool, iov: &mut Vec<libc::iovec>) {
    iov.clear();
    let mut skip = if write { 16usize } else { 0 };
    let mut left = if write { chain.readable_len() as usize - 16 } else { chain.writable_len() as usize - 1 };
    for i in 0..chain.segments() {
        let Some((_, writable, s)) = chain.segment(i) else { break };
        if writable == write || left == 0 {
            continue;
        }
        let (mut base, mut len) = (s.as_ptr() as usize, s.len());
        let k = skip.min(len);
        base += k;
        len -= k;
        skip -= k;
        let len = len.min(left);
        if len > 0 {
            iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len });
            left -= len;
        }
    }
}

/// `preadv`/`pwritev` between the image and the chain's data buffers.
fn rw_vectored(file: &File, chain: &Chain<'_>, offset: u64, write: bool) -> std::io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(chain.segments());
    data_iovecs(chain, write, &mut iov);
    let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let cnt = libc::c_int::try_from(iov.len()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: every iovec points into a segment of `chain`, which the worker's batch keeps
    // pinned (and so mapped) until the call returns; the lengths stay inside the segments.
    // The kernel reads or writes guest memory directly: no Rust reference to it is formed.
    let n = unsafe {
        if write {
            libc::pwritev(file.as_raw_fd(), iov.as_ptr(), cnt, off)
        } else {
            libc::preadv(file.as_raw_fd(), iov.as_ptr(), cnt, off)
        }
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// The device state's header and version (`Device::save_state`).
const STATE_MAGIC: &[u8; 8] = b"VIREOBLK";
const STATE_VERSION: u32 = 1;

impl BlkDevice {
    /// Magic, version, size in bytes, read-only flag, the 20 serial bytes GET_ID returns.
    fn state_record(&self) -> Vec<u8> {
        let mut s = STATE_MAGIC.to_vec();
        s.extend_from_slice(&STATE_VERSION.to_le_bytes());
        s.extend_from_slice(&self.inner.size().to_le_bytes());
        s.push(u8::from(self.inner.cfg.read_only));
        let mut serial = [0u8; 20];
        let n = self.inner.cfg.serial.len().min(20);
        serial[..n].copy_from_slice(&self.inner.cfg.serial.as_bytes()[..n]);
        s.extend_from_slice(&serial);
        s
    }
}

impl Device for BlkDevice {
    fn features(&self) -> u64 {
        let mut bits = f::SIZE_MAX | f::SEG_MAX | f::BLK_SIZE | f::FLUSH | f::TOPOLOGY | f::MQ;
        if self.inner.cfg.read_only {
            bits |= f::RO;
        } else if matches!(self.inner.storage, Storage::File { .. }) {
            bits |= f::DISCARD | f::WRITE_ZEROES;
        }
        bits
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(self.inner.size() / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&u32::from(self.inner.cfg.queue_size.saturating_sub(2)).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.inner.cfg.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&(u32::MAX / 512).to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&(u32::MAX / 512).to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }

    fn num_queues(&self) -> usize {
        usize::from(self.inner.cfg.num_queues.max(1))
    }

    /// A block device keeps no request state across a stop (rings drain first), so what
    /// migrates is what the guest has seen of the disk: its size, whether it is read-only, and
    /// its serial (GET_ID). The destination refuses a state that does not match its own disk:
    /// a guest must not resume on another disk than the one it was using.
    fn save_state(&self) -> Vec<u8> {
        self.state_record()
    }

    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        let mine = self.state_record();
        if state.len() < STATE_MAGIC.len() + 4 || !state.starts_with(STATE_MAGIC) {
            return Err("not a vireo block device state".into());
        }
        let version = u32::from_le_bytes([state[8], state[9], state[10], state[11]]);
        if version != STATE_VERSION {
            return Err(format!("block device state version {version}, this vireo takes {STATE_VERSION}"));
        }
        if state != mine.as_slice() {
            let describe = |s: &[u8]| {
                let cap = s.get(12..20).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                let ro = s.get(20).copied().unwrap_or(0) != 0;
                let serial = String::from_utf8_lossy(s.get(21..).unwrap_or(&[])).trim_end_matches('\0').to_string();
                format!("{cap} bytes, read-only {ro}, serial {serial:?}")
            };
            return Err(format!(
                "the source served another disk ({}), this one is {}",
                describe(state),
                describe(&mine)
            ));
        }
        Ok(())
    }

    fn max_queue_size(&self) -> u16 {
        self.inner.cfg.queue_size
    }

    /// One handler per queue: a block queue needs nothing of another.
    fn activate(&self, queue: usize, _features: u64) -> std::io::Result<Box<dyn QueueHandler>> {
        let engine = if self.inner.cfg.aio == Aio::IoUring && matches!(self.inner.storage, Storage::File { .. }) {
            match uring::UringEngine::new(self.inner.clone(), queue) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(queue, error = %e, "io_uring unavailable; this queue does synchronous I/O");
                    None
                }
            }
        } else {
            None
        };
        Ok(Box::new(queue::BlkQueue::new(self.inner.clone(), engine)))
    }
}

impl Inner {
    /// Runs one request during the batch; returns the used length.
    fn handle_sync(&self, chain: &Chain<'_>) -> u32 {
        if chain.writable_len() == 0 {
            return 0;
        }
        let (status, data) = match Self::header(chain) {
            Some((kind, sector)) => self.run(kind, sector, chain),
            None => (S_IOERR, 0),
        };
        let status_at = chain.writable_len() - 1;
        chain.write_at(status_at as usize, &[status]);
        // What the device wrote, counted from the writable start (the used length, and what the
        // dirty log records): the data (reads, GET_ID) and the status byte. When the status byte
        // is not right after the data (a write-type request, or GET_ID into a buffer longer than
        // the 20 id bytes), everything up to it.
        if data == 0 || status_at > data {
            chain.writable_len()
        } else {
            data + 1
        }
    }
}
