//! The vhost-user and virtio wire format that rust-vmm's `vhost` and `virtio-bindings` do not
//! give us, written once for both sides of the socket: the backend (`vireo-vhost`) and the driver
//! (`vireo-driver`).
//!
//! * [`header`]: the 12-byte message header and its flag bits (`vhost` keeps them private to its
//!   own message loop, which Vireo does not use).
//! * [`iotlb`]: `struct vhost_iotlb_msg`, the payload of IOTLB_MSG and of the backend's
//!   VHOST_USER_BACKEND_IOTLB_MSG (`vhost` has neither).
//! * [`features`]: feature bits as `u64` masks, transport and device ones, so that no crate spells
//!   `1 << virtio_bindings::...` again.
//!
//! Nothing here touches a socket or guest memory: it is encoding and decoding only.

#![warn(missing_docs)]

pub mod features;
pub mod header;
pub mod iotlb;

pub use header::Header;
pub use iotlb::IotlbMsg;
