//! The memory crate's one error type. Every variant carries the addresses and sizes that explain it.

use crate::addr::{GuestPhysAddr, UserAddr};

/// What can go wrong when mapping guest memory, translating an address, or accessing memory.
///
/// Guest-caused faults (an address outside guest memory, an access past a region) are kept apart
/// from host failures (mmap refusing a descriptor) so that a device can move the queue to
/// needs-reset for the first kind and report the second.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are the context each message names
pub enum MemoryError {
    /// A region of size zero was offered.
    #[error("region at {gpa} has size zero")]
    EmptyRegion { gpa: GuestPhysAddr },
    /// A region's guest physical range, user range or file range wraps around 2^64.
    #[error("region at {gpa} with size {size:#x} wraps its address space")]
    WrappingRegion { gpa: GuestPhysAddr, size: u64 },
    /// A region's guest address or size is not a multiple of the host page size.
    #[error("region at {gpa} with size {size:#x} is not aligned to the page size {page_size:#x}")]
    MisalignedRegion { gpa: GuestPhysAddr, size: u64, page_size: u64 },
    /// Two regions overlap in guest physical or in frontend user addresses.
    #[error("region at {gpa} (size {size:#x}) overlaps the region at {other_gpa} in {space} addresses")]
    OverlappingRegions { gpa: GuestPhysAddr, size: u64, other_gpa: GuestPhysAddr, space: &'static str },
    /// More regions than the map holds (vhost-user's CONFIGURE_MEM_SLOTS maximum).
    #[error("memory map is full: {max} regions")]
    TooManyRegions { max: usize },
    /// No region matches a removal request.
    #[error("no region at {gpa} with size {size:#x} and user address {user_addr}")]
    NoSuchRegion { gpa: GuestPhysAddr, size: u64, user_addr: UserAddr },
    /// The kernel refused to map a region's file descriptor.
    #[error("cannot map {size:#x} bytes at file offset {offset:#x} for region at {gpa}")]
    Map {
        gpa: GuestPhysAddr,
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused to map the dirty log.
    #[error("cannot map the dirty log ({size:#x} bytes at offset {offset:#x})")]
    MapLog {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// A guest physical range is not inside one mapped region (and the caller needed it to be).
    #[error("guest range {gpa}+{len:#x} is not backed by guest memory")]
    Unmapped { gpa: GuestPhysAddr, len: u64 },
    /// A frontend user address is not inside any region.
    #[error("user address {user_addr} is not inside any memory region")]
    UnmappedUser { user_addr: UserAddr },
    /// An access of `len` bytes at `offset` does not fit a slice of `size` bytes.
    #[error("access of {len} bytes at offset {offset:#x} is outside a slice of {size} bytes")]
    OutOfBounds { offset: usize, len: usize, size: usize },
    /// An atomic access at an address that is not aligned for its width.
    #[error("atomic access of {width} bytes at offset {offset:#x} is misaligned")]
    Misaligned { offset: usize, width: usize },
    /// No IOTLB entry covers an IOVA: the frontend must be asked (a miss). Not the guest's
    /// fault: the access is retried once the frontend has sent the entry.
    #[error("IOTLB miss at IOVA {iova:#x} ({perm:?} access)")]
    IotlbMiss { iova: u64, perm: crate::iotlb::Perm },
    /// An IOTLB entry covers the IOVA but not for this access.
    #[error("IOTLB denies {need:?} access at IOVA {iova:#x} (entry allows {have:?})")]
    IotlbDenied { iova: u64, need: crate::iotlb::Perm, have: crate::iotlb::Perm },
    /// An IOTLB update that is empty or wraps an address space.
    #[error("IOTLB entry at IOVA {iova:#x}, size {size:#x}, user address {uaddr:#x} is empty or wraps")]
    BadIotlbEntry { iova: u64, size: u64, uaddr: u64 },
    /// An IOTLB message while the device is not behind a vIOMMU (VIRTIO_F_ACCESS_PLATFORM not
    /// negotiated).
    #[error("IOTLB message without VIRTIO_F_ACCESS_PLATFORM")]
    IotlbDisabled,
    /// Dirty logging is on (VHOST_F_LOG_ALL) and the frontend gave no log to record writes in.
    #[error("dirty logging is on but no dirty log was given (SET_LOG_BASE)")]
    NoDirtyLog,
    /// A guest physical page beyond the end of the dirty log.
    #[error("guest page {page:#x} is beyond the dirty log of {log_bytes} bytes")]
    BeyondLog { page: u64, log_bytes: u64 },
}

impl MemoryError {
    /// Whether this is an IOTLB miss (the access can succeed once the frontend answers).
    pub fn is_iotlb_miss(&self) -> bool {
        matches!(self, MemoryError::IotlbMiss { .. })
    }
}
