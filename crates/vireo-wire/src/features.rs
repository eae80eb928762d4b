//! Feature bits as masks. Bit numbers come from `virtio-bindings` (virtio 1.2) where it has them;
//! the vhost-user ones (`PROTOCOL_FEATURES`, `LOG_ALL`) are vhost-user.rst's.

// The bindings type bit numbers as u32; every one is below 64.
use virtio_bindings::virtio_blk as vblk;
use virtio_bindings::virtio_config as vcfg;
use virtio_bindings::virtio_net as vnet;
use virtio_bindings::virtio_ring as vring;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// VIRTIO_F_VERSION_1 (32).
pub const VERSION_1: u64 = bit(vcfg::VIRTIO_F_VERSION_1);
/// VIRTIO_F_ACCESS_PLATFORM (33): the driver's addresses go through an IOMMU.
pub const ACCESS_PLATFORM: u64 = bit(vcfg::VIRTIO_F_ACCESS_PLATFORM);
/// VIRTIO_F_RING_PACKED (34).
pub const RING_PACKED: u64 = bit(vcfg::VIRTIO_F_RING_PACKED);
/// VIRTIO_F_IN_ORDER (35): the device uses buffers in the order they were made available.
pub const IN_ORDER: u64 = bit(vcfg::VIRTIO_F_IN_ORDER);
/// VIRTIO_RING_F_INDIRECT_DESC (28).
pub const INDIRECT_DESC: u64 = bit(vring::VIRTIO_RING_F_INDIRECT_DESC);
/// VIRTIO_RING_F_EVENT_IDX (29).
pub const EVENT_IDX: u64 = bit(vring::VIRTIO_RING_F_EVENT_IDX);
/// VHOST_USER_F_PROTOCOL_FEATURES (30): vhost-user's, in the virtio feature word.
pub const PROTOCOL_FEATURES: u64 = bit(30);
/// VHOST_F_LOG_ALL (26): dirty logging on.
pub const LOG_ALL: u64 = bit(26);

/// The transport bits every Vireo device offers.
pub const TRANSPORT: u64 =
    VERSION_1 | RING_PACKED | INDIRECT_DESC | EVENT_IDX | ACCESS_PLATFORM | PROTOCOL_FEATURES | LOG_ALL;

/// virtio-blk (5.2.3).
pub mod blk {
    use super::{bit, vblk};
    /// VIRTIO_BLK_F_SIZE_MAX.
    pub const SIZE_MAX: u64 = bit(vblk::VIRTIO_BLK_F_SIZE_MAX);
    /// VIRTIO_BLK_F_SEG_MAX.
    pub const SEG_MAX: u64 = bit(vblk::VIRTIO_BLK_F_SEG_MAX);
    /// VIRTIO_BLK_F_RO.
    pub const RO: u64 = bit(vblk::VIRTIO_BLK_F_RO);
    /// VIRTIO_BLK_F_BLK_SIZE.
    pub const BLK_SIZE: u64 = bit(vblk::VIRTIO_BLK_F_BLK_SIZE);
    /// VIRTIO_BLK_F_FLUSH.
    pub const FLUSH: u64 = bit(vblk::VIRTIO_BLK_F_FLUSH);
    /// VIRTIO_BLK_F_TOPOLOGY.
    pub const TOPOLOGY: u64 = bit(vblk::VIRTIO_BLK_F_TOPOLOGY);
    /// VIRTIO_BLK_F_MQ.
    pub const MQ: u64 = bit(vblk::VIRTIO_BLK_F_MQ);
    /// VIRTIO_BLK_F_DISCARD.
    pub const DISCARD: u64 = bit(vblk::VIRTIO_BLK_F_DISCARD);
    /// VIRTIO_BLK_F_WRITE_ZEROES.
    pub const WRITE_ZEROES: u64 = bit(vblk::VIRTIO_BLK_F_WRITE_ZEROES);
}

/// virtio-net (5.1.3).
pub mod net {
    use super::{bit, vnet};
    /// VIRTIO_NET_F_CSUM (0): the device takes frames with a partial checksum.
    pub const CSUM: u64 = bit(vnet::VIRTIO_NET_F_CSUM);
    /// VIRTIO_NET_F_GUEST_CSUM (1): the driver takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = bit(vnet::VIRTIO_NET_F_GUEST_CSUM);
    /// VIRTIO_NET_F_MTU (3).
    pub const MTU: u64 = bit(vnet::VIRTIO_NET_F_MTU);
    /// VIRTIO_NET_F_MAC (5).
    pub const MAC: u64 = bit(vnet::VIRTIO_NET_F_MAC);
    /// VIRTIO_NET_F_GUEST_TSO4 (7).
    pub const GUEST_TSO4: u64 = bit(vnet::VIRTIO_NET_F_GUEST_TSO4);
    /// VIRTIO_NET_F_GUEST_TSO6 (8).
    pub const GUEST_TSO6: u64 = bit(vnet::VIRTIO_NET_F_GUEST_TSO6);
    /// VIRTIO_NET_F_GUEST_ECN (9).
    pub const GUEST_ECN: u64 = bit(vnet::VIRTIO_NET_F_GUEST_ECN);
    /// VIRTIO_NET_F_GUEST_UFO (10).
    pub const GUEST_UFO: u64 = bit(vnet::VIRTIO_NET_F_GUEST_UFO);
    /// VIRTIO_NET_F_HOST_TSO4 (11).
    pub const HOST_TSO4: u64 = bit(vnet::VIRTIO_NET_F_HOST_TSO4);
    /// VIRTIO_NET_F_HOST_TSO6 (12).
    pub const HOST_TSO6: u64 = bit(vnet::VIRTIO_NET_F_HOST_TSO6);
    /// VIRTIO_NET_F_HOST_ECN (13).
    pub const HOST_ECN: u64 = bit(vnet::VIRTIO_NET_F_HOST_ECN);
    /// VIRTIO_NET_F_HOST_UFO (14).
    pub const HOST_UFO: u64 = bit(vnet::VIRTIO_NET_F_HOST_UFO);
    /// VIRTIO_NET_F_MRG_RXBUF (15).
    pub const MRG_RXBUF: u64 = bit(vnet::VIRTIO_NET_F_MRG_RXBUF);
    /// VIRTIO_NET_F_STATUS (16).
    pub const STATUS: u64 = bit(vnet::VIRTIO_NET_F_STATUS);
    /// VIRTIO_NET_F_MQ (22).
    pub const MQ: u64 = bit(vnet::VIRTIO_NET_F_MQ);
    /// VIRTIO_NET_F_GUEST_USO4 (54).
    pub const GUEST_USO4: u64 = bit(vnet::VIRTIO_NET_F_GUEST_USO4);
    /// VIRTIO_NET_F_GUEST_USO6 (55).
    pub const GUEST_USO6: u64 = bit(vnet::VIRTIO_NET_F_GUEST_USO6);
    /// VIRTIO_NET_F_HOST_USO (56).
    pub const HOST_USO: u64 = bit(vnet::VIRTIO_NET_F_HOST_USO);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_numbers_match_the_spec() {
        assert_eq!(VERSION_1, 1 << 32);
        assert_eq!(ACCESS_PLATFORM, 1 << 33);
        assert_eq!(RING_PACKED, 1 << 34);
        assert_eq!(INDIRECT_DESC, 1 << 28);
        assert_eq!(EVENT_IDX, 1 << 29);
        assert_eq!(net::MRG_RXBUF, 1 << 15);
        assert_eq!(net::MQ, 1 << 22);
        assert_eq!(net::HOST_TSO4, 1 << 11);
        assert_eq!(blk::MQ, 1 << 12);
    }
}
