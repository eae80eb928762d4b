//! Frames Vireo makes or looks into itself: the source's UDP frame, the RARP announcement, the
//! sink's checksum.

/// A MAC address.
pub type Mac = [u8; 6];

/// The broadcast address.
pub const BROADCAST: Mac = [0xff; 6];

/// The smallest frame the source sends (Ethernet 14 + IPv4 20 + UDP 8 + 18 bytes of payload: the
/// 60 bytes of a minimal Ethernet frame without its FCS... plus 4, as "64-byte frames" count the
/// FCS the device does not carry).
pub const MIN_SOURCE_FRAME: usize = 60;

/// The largest frame the source sends (an untagged 1500-byte MTU frame).
pub const MAX_SOURCE_FRAME: usize = 1514;

fn fold16(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // sum <= 0xffff after the fold.
    u16::try_from(sum).unwrap_or(0xffff)
}

fn ones_sum(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += u32::from(w);
    }
    sum
}

/// The source's frame: `len` bytes (the FCS not counted: a "64-byte frame" is `len` 60) of
/// Ethernet, IPv4 and UDP from `src` to `dst` (10.0.0.1:1024 to 10.0.0.2:1024), IPv4 and UDP
/// checksums valid, the payload a counting pattern. `len` is clamped to
/// `MIN_SOURCE_FRAME..=MAX_SOURCE_FRAME`.
pub fn udp_frame(src: Mac, dst: Mac, len: usize) -> Vec<u8> {
    let len = len.clamp(MIN_SOURCE_FRAME, MAX_SOURCE_FRAME);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(len - 14).unwrap_or(u16::MAX);
    let udp_len = ip_len - 20;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = !fold16(ones_sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = i.to_le_bytes()[0];
    }
    f[34..36].copy_from_slice(&1024u16.to_be_bytes());
    f[36..38].copy_from_slice(&1024u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    // Pseudo-header (addresses, protocol, UDP length), then the UDP header and payload.
    let mut sum = ones_sum(&f[26..34]) + 17 + u32::from(udp_len);
    sum += ones_sum(&f[34..]);
    let mut c = !fold16(sum);
    if c == 0 {
        c = 0xffff;
    }
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// Whether `frame` is an IPv4 UDP frame whose IPv4 and UDP checksums verify (tests check what the
/// source wrote).
pub fn udp_checksums_valid(frame: &[u8]) -> bool {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return false;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    if fold16(ones_sum(&frame[14..14 + ihl])) != 0xffff {
        return false;
    }
    let udp = &frame[14 + ihl..];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len > udp.len() {
        return false;
    }
    let sum =
        ones_sum(&frame[26..34]) + 17 + u32::from(u16::try_from(udp_len).unwrap_or(0)) + ones_sum(&udp[..udp_len]);
    fold16(sum) == 0xffff
}

/// A RARP announcement for `mac` (ethertype 0x8035, opcode 3 "reverse request", sender and
/// target `mac` with address 0.0.0.0, padded to the minimal 60 bytes), as QEMU's
/// `qemu_announce_self` and DPDK build it: switches on the path learn where the guest is now.
pub fn rarp(mac: Mac) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

/// The sink's checksum of a frame: the sum of its bytes (the virtio-net header not included).
/// Summed over every frame a queue consumed; a test that knows the frames sent computes the same.
pub fn byte_sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|&b| u64::from(b)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_frames_have_valid_checksums() {
        for len in [0, 60, 61, 64, 128, 1000, 1514, 9000] {
            let f = udp_frame([2, 0, 0, 0, 0, 1], BROADCAST, len);
            assert_eq!(f.len(), len.clamp(60, 1514));
            assert!(udp_checksums_valid(&f), "length {len}");
        }
        let mut f = udp_frame([2, 0, 0, 0, 0, 1], BROADCAST, 64);
        f[50] ^= 1;
        assert!(!udp_checksums_valid(&f));
    }

    #[test]
    fn rarp_layout() {
        let r = rarp([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        assert_eq!(&r[6..12], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(r[21], 3);
    }
}
