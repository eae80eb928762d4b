//! The virtio-net header (virtio 1.2 5.1.6) in front of every frame, and what a device must
//! refuse in one the guest wrote.

use vireo_wire::features::net as f;
use vireo_wire::features::VERSION_1;

/// `flags`: the checksum from `csum_start` on is partial (the device completes it).
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was checked (receive only).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (UFO).
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO).
pub const GSO_UDP_L4: u8 = 5;
/// Bit 7: the TCP frames carry ECN.
pub const GSO_ECN: u8 = 0x80;

/// The header's length for the negotiated features: 12 bytes (with `num_buffers`) under
/// VERSION_1 or MRG_RXBUF, 10 before.
pub fn header_len(features: u64) -> usize {
    if features & (VERSION_1 | f::MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Ethernet header plus an 802.1Q tag.
const L2_MAX: usize = 14 + 4;

/// The longest frame (without the virtio-net header) the guest may send: an MTU's worth, or a
/// 64 KiB GSO super-frame when a segmentation offload was negotiated.
pub fn max_tx_frame(features: u64, mtu: u16) -> usize {
    if features & (f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_UFO | f::HOST_USO) != 0 {
        65535 + L2_MAX
    } else {
        usize::from(mtu) + L2_MAX
    }
}

/// The longest frame the device may hand the guest: the same rule for the guest's offloads.
pub fn max_rx_frame(features: u64, mtu: u16) -> usize {
    if features & (f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO | f::GUEST_USO4 | f::GUEST_USO6) != 0 {
        65535 + L2_MAX
    } else {
        usize::from(mtu) + L2_MAX
    }
}

/// The first 10 bytes of the header, as the guest wrote them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

/// Why a frame the guest sent was refused (it is dropped and counted; the queue goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain is shorter than the virtio-net header.
    #[error("chain of {len} bytes, shorter than the {need}-byte virtio-net header")]
    ShortChain {
        /// Readable bytes.
        len: u32,
        /// The header's length.
        need: usize,
    },
    /// Shorter than an Ethernet header.
    #[error("frame of {0} bytes, shorter than an Ethernet header")]
    Runt(usize),
    /// Longer than the MTU (or 64 KiB with segmentation offloads) allows.
    #[error("frame of {len} bytes, longer than the {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A partial checksum without VIRTIO_NET_F_CSUM, or one that points outside the frame.
    #[error("checksum offload not negotiated or outside the frame")]
    Checksum,
    /// A segmentation type the device did not offer (or an unknown one, or a zero segment size).
    #[error("segmentation offload {0:#x} not negotiated")]
    Gso(u8),
    /// A receive-only flag on a frame sent.
    #[error("flags {0:#x} not allowed on a frame the driver sends")]
    Flags(u8),
}

impl NetHeader {
    /// Decodes the first 10 bytes.
    pub fn decode(b: &[u8; 10]) -> Self {
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self { flags: b[0], gso_type: b[1], hdr_len: w(2), gso_size: w(4), csum_start: w(6), csum_offset: w(8) }
    }

    /// Checks a header the driver sent with a frame of `frame_len` bytes against the features it
    /// negotiated (virtio 1.2 5.1.6.2: the driver must not ask for what was not offered).
    pub fn check_tx(&self, features: u64, frame_len: usize, max_frame: usize) -> Result<(), TxError> {
        if frame_len < 14 {
            return Err(TxError::Runt(frame_len));
        }
        if frame_len > max_frame {
            return Err(TxError::TooLong { len: frame_len, max: max_frame });
        }
        if self.flags & !F_NEEDS_CSUM != 0 {
            return Err(TxError::Flags(self.flags));
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if features & f::CSUM == 0 || end > frame_len {
                return Err(TxError::Checksum);
            }
        }
        let ecn = self.gso_type & GSO_ECN != 0;
        let kind = self.gso_type & !GSO_ECN;
        let needed = match kind {
            GSO_NONE if !ecn => return Ok(()),
            GSO_TCPV4 => f::HOST_TSO4,
            GSO_TCPV6 => f::HOST_TSO6,
            GSO_UDP => f::HOST_UFO,
            GSO_UDP_L4 => f::HOST_USO,
            _ => return Err(TxError::Gso(self.gso_type)),
        };
        let ecn_ok = !ecn || (features & f::HOST_ECN != 0 && matches!(kind, GSO_TCPV4 | GSO_TCPV6));
        // Segmentation needs the checksum offload too (every segment's checksum is computed by
        // the device), and a segment size.
        if features & needed == 0 || !ecn_ok || self.gso_size == 0 || self.flags & F_NEEDS_CSUM == 0 {
            return Err(TxError::Gso(self.gso_type));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso: u8, gso_size: u16, start: u16, off: u16) -> NetHeader {
        NetHeader { flags, gso_type: gso, hdr_len: 54, gso_size, csum_start: start, csum_offset: off }
    }

    #[test]
    fn offloads_must_be_negotiated() {
        let max = max_tx_frame(0, 1500);
        assert_eq!(hdr(0, 0, 0, 0, 0).check_tx(0, 60, max), Ok(()));
        assert_eq!(hdr(F_NEEDS_CSUM, 0, 0, 34, 16).check_tx(0, 60, max), Err(TxError::Checksum));
        assert_eq!(hdr(F_NEEDS_CSUM, 0, 0, 34, 16).check_tx(f::CSUM, 60, max), Ok(()));
        assert_eq!(hdr(F_NEEDS_CSUM, 0, 0, 50, 16).check_tx(f::CSUM, 60, max), Err(TxError::Checksum));
        let tso = f::CSUM | f::HOST_TSO4;
        let big = max_tx_frame(tso, 1500);
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16).check_tx(f::CSUM, 9000, big), Err(TxError::Gso(1)));
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16).check_tx(tso, 9000, big), Ok(()));
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV4, 0, 34, 16).check_tx(tso, 9000, big), Err(TxError::Gso(1)));
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV6, 1448, 54, 16).check_tx(tso, 9000, big), Err(TxError::Gso(4)));
        assert_eq!(
            hdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448, 34, 16).check_tx(tso, 9000, big),
            Err(TxError::Gso(0x81))
        );
        assert_eq!(hdr(0, 9, 1448, 0, 0).check_tx(u64::MAX, 9000, big), Err(TxError::Gso(9)));
        assert_eq!(hdr(F_DATA_VALID, 0, 0, 0, 0).check_tx(u64::MAX, 60, max), Err(TxError::Flags(2)));
    }

    #[test]
    fn frame_lengths_are_bounded() {
        let max = max_tx_frame(0, 1500);
        assert_eq!(max, 1518);
        assert_eq!(hdr(0, 0, 0, 0, 0).check_tx(0, 13, max), Err(TxError::Runt(13)));
        assert_eq!(hdr(0, 0, 0, 0, 0).check_tx(0, 1519, max), Err(TxError::TooLong { len: 1519, max }));
        assert_eq!(max_tx_frame(f::HOST_TSO6, 1500), 65553);
        assert_eq!(header_len(VERSION_1), 12);
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(f::MRG_RXBUF), 12);
    }
}
