//! The other side of a virtqueue: what a guest driver does.
//!
//! [`GuestRam`] is guest memory made of memfds, mapped by the driver for its own use and handed
//! to a backend as region descriptions; [`SplitDriver`] and [`PackedDriver`] make buffers
//! available and collect used ones exactly as a virtio driver does. Tests use them as the model
//! driver; the userspace vhost-user driver builds on them.
//!
//! The driver trusts nothing the device writes either: used ids and lengths are checked.

#![warn(missing_docs)]

pub mod blk;
pub mod iommu;
pub mod pattern;
mod ram;
mod virtq;

pub use blk::{BlkDevice, BlkError, BlkOptions, Completion, NotifyCounts};
pub use iommu::IommuMode;
pub use pattern::{pattern, XorShift};
pub use ram::{GuestRam, RamError};
pub use virtq::{desc_bytes, Buffer, DriverError, PackedDriver, SplitDriver, UsedElem};

/// The CPU's model name (`/proc/cpuinfo`), which benchmarks print beside their figures: they
/// differ between kinds of machine.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
