//! `struct vhost_iotlb_msg` (linux/vhost_types.h): the payload of the frontend's IOTLB_MSG and of
//! the backend's VHOST_USER_BACKEND_IOTLB_MSG. Three `u64` (iova, size, uaddr), then `perm` and
//! `type` bytes, padded to 32 bytes by the structure's alignment.

/// Bytes of the payload.
pub const SIZE: usize = 32;

/// The frontend request code of IOTLB_MSG (`FrontendReq::IOTLB_MSG`).
pub const FRONTEND_IOTLB_MSG: u32 = 22;
/// The backend request code of VHOST_USER_BACKEND_IOTLB_MSG.
pub const BACKEND_IOTLB_MSG: u32 = 1;

/// `type`: the backend asks for a translation.
pub const MISS: u8 = 1;
/// `type`: the frontend adds a translation.
pub const UPDATE: u8 = 2;
/// `type`: the frontend takes a range back.
pub const INVALIDATE: u8 = 3;
/// `type`: the backend reports an access the entry's rights refused.
pub const ACCESS_FAIL: u8 = 4;

/// `perm`: VHOST_ACCESS_RO.
pub const ACCESS_RO: u8 = 1;
/// `perm`: VHOST_ACCESS_WO.
pub const ACCESS_WO: u8 = 2;
/// `perm`: VHOST_ACCESS_RW.
pub const ACCESS_RW: u8 = 3;

/// One IOTLB message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbMsg {
    /// First IOVA of the range.
    pub iova: u64,
    /// Length of the range (unused in a miss or an access failure).
    pub size: u64,
    /// The frontend's user address the IOVA stands for (updates only).
    pub uaddr: u64,
    /// Access rights (`ACCESS_*`).
    pub perm: u8,
    /// What the message is (`MISS`, `UPDATE`, `INVALIDATE`, `ACCESS_FAIL`).
    pub kind: u8,
}

impl IotlbMsg {
    /// The 32 bytes on the wire.
    pub fn encode(&self) -> [u8; SIZE] {
        let mut b = [0u8; SIZE];
        b[0..8].copy_from_slice(&self.iova.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        b[24] = self.perm;
        b[25] = self.kind;
        b
    }

    /// Decodes a payload; `None` unless it is exactly [`SIZE`] bytes.
    pub fn decode(p: &[u8]) -> Option<Self> {
        if p.len() != SIZE {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Some(Self { iova: word(0), size: word(8), uaddr: word(16), perm: p[24], kind: p[25] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = IotlbMsg { iova: 1 << 40, size: 4096, uaddr: 0x7f00_0000_0000, perm: ACCESS_RW, kind: UPDATE };
        assert_eq!(IotlbMsg::decode(&m.encode()), Some(m));
        assert_eq!(IotlbMsg::decode(&[0u8; 31]), None);
    }
}
