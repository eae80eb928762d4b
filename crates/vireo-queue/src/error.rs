//! The queue crate's error type.

use vireo_memory::{GuestPhysAddr, MemoryError};

/// Why a queue refused a configuration or broke.
///
/// Every variant but [`QueueError::Config`] and an IOTLB miss ([`QueueError::is_iotlb_miss`]) is
/// the guest's doing: the queue is then broken (see
/// `SplitQueue::broken`) and the device should report VIRTIO_CONFIG_S_NEEDS_RESET; other queues
/// are unaffected.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are the context each message names
pub enum QueueError {
    /// The ring layout the frontend gave is unusable (size, alignment, wrap-around).
    #[error("queue configuration refused: {what}")]
    Config { what: &'static str },
    /// The available index moved by more than the queue size.
    #[error("available index jumped from {last} to {now} on a queue of {size}")]
    AvailIdxJump { last: u16, now: u16, size: u16 },
    /// A descriptor index outside the table.
    #[error("descriptor index {index} out of range (table of {size})")]
    DescIndex { index: u32, size: u32 },
    /// A chain longer than the queue (or the indirect table): a loop.
    #[error("descriptor chain from head {head} is longer than {limit} descriptors (a loop)")]
    ChainTooLong { head: u16, limit: u32 },
    /// An indirect table inside an indirect table, or an indirect descriptor with NEXT.
    #[error("indirect descriptor misuse at chain head {head}: {what}")]
    Indirect { head: u16, what: &'static str },
    /// A descriptor with length zero.
    #[error("zero-length descriptor in chain {head}")]
    ZeroLength { head: u16 },
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one in chain {head}")]
    ReadableAfterWritable { head: u16 },
    /// The chain's total length overflows 32 bits.
    #[error("chain {head} is longer than 4 GiB in total")]
    LengthOverflow { head: u16 },
    /// A buffer or ring that is not backed by guest memory.
    #[error("guest memory access at {gpa} ({len} bytes) failed")]
    Memory {
        gpa: GuestPhysAddr,
        len: u64,
        /// Boxed: keeps the error, and every `Result` on the data path, small.
        #[source]
        source: Box<MemoryError>,
    },
    /// A used element for a head that is not in flight.
    #[error("completion for descriptor {id}, which is not in flight")]
    NotInFlight { id: u16 },
    /// The queue is broken (by this error or an earlier one); it stays broken until reset.
    #[error("queue is broken: {0}")]
    Broken(std::sync::Arc<QueueError>),
}

impl QueueError {
    /// Whether this is an IOTLB miss: not the guest's fault, and nothing was consumed; the queue
    /// is parked until the frontend sends the entry, then the same work is retried.
    pub fn is_iotlb_miss(&self) -> bool {
        matches!(self, QueueError::Memory { source, .. } if source.is_iotlb_miss())
    }

    /// The IOVA and access of an IOTLB miss.
    pub fn iotlb_miss(&self) -> Option<(u64, vireo_memory::Perm)> {
        match self {
            QueueError::Memory { source, .. } => match **source {
                MemoryError::IotlbMiss { iova, perm } => Some((iova, perm)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The IOVA and access of an IOTLB permission fault (the queue broke on it), looking
    /// through [`QueueError::Broken`].
    pub fn iotlb_denied(&self) -> Option<(u64, vireo_memory::Perm)> {
        match self {
            QueueError::Memory { source, .. } => match **source {
                MemoryError::IotlbDenied { iova, need, .. } => Some((iova, need)),
                _ => None,
            },
            QueueError::Broken(e) => e.iotlb_denied(),
            _ => None,
        }
    }

    /// A guest-memory error at `len` bytes from `gpa` (a device's engine reports an unloggable
    /// write with it, say).
    #[cold]
    pub fn mem(gpa: GuestPhysAddr, len: u64, source: MemoryError) -> Self {
        Self::Memory { gpa, len, source: Box::new(source) }
    }
}
