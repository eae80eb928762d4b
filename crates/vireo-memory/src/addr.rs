//! Address spaces. Each has its own newtype so that a guest physical address can never be passed
//! where a frontend user address is expected; conversions go through the memory map.

use std::fmt;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address of this space.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value, for the wire and for arithmetic done by the caller with checks.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` where it would wrap.
            pub fn checked_add(self, offset: u64) -> Option<Self> {
                self.0.checked_add(offset).map(Self)
            }

            /// The distance from `base` up to `self`, or `None` where `self` is below `base`.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, ":{:#x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

address_type!(
    /// A guest physical address: what virtio descriptors and ring addresses hold (without a vIOMMU).
    GuestPhysAddr,
    "gpa"
);
address_type!(
    /// An address in the frontend's own virtual address space (vhost-user's "user address"),
    /// which SET_VRING_ADDR uses for ring addresses.
    UserAddr,
    "uaddr"
);

/// The dirty log's page size: one bit of the log stands for 4 KiB of guest physical memory
/// (vhost-user, "Migration"; VHOST_LOG_PAGE in the kernel).
pub const LOG_PAGE_SIZE: u64 = 4096;
