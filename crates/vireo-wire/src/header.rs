//! The vhost-user message header (QEMU's docs/interop/vhost-user.rst, "Message Specification"):
//! request code, flags, payload size, each a little-endian `u32`.

/// Bytes in a header.
pub const SIZE: usize = 12;
/// Bits 0-1 of the flags: the protocol version, always 1.
pub const VERSION: u32 = 0x1;
/// The mask of the version bits.
pub const VERSION_MASK: u32 = 0x3;
/// Bit 2: this message is a reply.
pub const REPLY: u32 = 0x4;
/// Bit 3: the sender wants a reply (REPLY_ACK, or the request's own reply).
pub const NEED_REPLY: u32 = 0x8;

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The request code (`FrontendReq` or `BackendReq` in the `vhost` crate).
    pub code: u32,
    /// Version and reply bits.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl Header {
    /// A request of version 1 with `extra` flags (`NEED_REPLY`, say).
    pub const fn request(code: u32, extra: u32, size: u32) -> Self {
        Self { code, flags: VERSION | extra, size }
    }

    /// The reply to request `code`: version 1 and the reply bit, nothing else (DPDK's frontend
    /// refuses a reply that carries any other flag).
    pub const fn reply(code: u32, size: u32) -> Self {
        Self { code, flags: VERSION | REPLY, size }
    }

    /// The 12 bytes on the wire.
    pub fn encode(&self) -> [u8; SIZE] {
        let mut b = [0u8; SIZE];
        b[0..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes 12 bytes (no check of the flags: see [`Header::is_request`]).
    pub fn decode(b: &[u8; SIZE]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self { code: word(0), flags: word(4), size: word(8) }
    }

    /// Version 1 and not a reply: what a request must be.
    pub fn is_request(&self) -> bool {
        self.flags & VERSION_MASK == VERSION && self.flags & REPLY == 0
    }

    /// Version 1 and a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & VERSION_MASK == VERSION && self.flags & REPLY != 0
    }

    /// The sender asked for a reply.
    pub fn needs_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_flags() {
        let h = Header::request(22, NEED_REPLY, 32);
        let d = Header::decode(&h.encode());
        assert_eq!(d, h);
        assert!(d.is_request() && d.needs_reply() && !d.is_reply());
        let r = Header::decode(&Header::reply(22, 8).encode());
        assert!(r.is_reply() && !r.is_request());
        assert_eq!(r.flags, 0x5);
        assert!(!Header { code: 1, flags: 2, size: 0 }.is_request(), "version 2 is no request");
    }
}
