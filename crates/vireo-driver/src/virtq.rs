//! Split and packed virtqueues from the driver's side (virtio 1.x 2.7 and 2.8).

use std::sync::atomic::{fence, Ordering};

use vireo_memory::GuestPhysAddr;

use crate::ram::{GuestRam, RamError};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub gpa: GuestPhysAddr,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device may write it.
    pub writable: bool,
}

/// A completed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// The chain's id (split: head index; packed: buffer id).
    pub id: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// What the driver refuses, or what it caught the device doing.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Guest RAM.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Not enough free descriptors.
    #[error("queue full: {want} descriptors wanted, {free} free")]
    Full {
        /// Descriptors needed.
        want: usize,
        /// Descriptors free.
        free: usize,
    },
    /// An empty chain.
    #[error("a chain needs at least one buffer")]
    Empty,
    /// The device used an id that is not in flight.
    #[error("device returned id {id}, which is not in flight")]
    BadUsedId {
        /// The id.
        id: u32,
    },
    /// A queue size the driver does not support.
    #[error("queue size {0} unsupported")]
    Size(u16),
}

/// The 16 bytes of a descriptor as they sit in guest memory: address, length, and the two
/// 16-bit fields (split: flags, next; packed: id, flags), little endian.
pub fn desc_bytes(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..].copy_from_slice(&b.to_le_bytes());
    d
}

fn at(base: GuestPhysAddr, off: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(base.raw() + off)
}

/// `slot + n` on a ring of `size` (`slot < size`, `n <= size`), and whether it wrapped.
fn advance(slot: u16, n: u16, size: u16) -> (u16, bool) {
    let next = u32::from(slot) + u32::from(n);
    let size = u32::from(size);
    let (next, wrapped) = if next >= size { (next - size, true) } else { (next, false) };
    // next < size <= 32768.
    (u16::try_from(next).unwrap_or(0), wrapped)
}

/// `vring_need_event` (2.7.10).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A split virtqueue, driver side.
#[derive(Debug)]
pub struct SplitDriver {
    size: u16,
    desc: GuestPhysAddr,
    avail: GuestPhysAddr,
    used: GuestPhysAddr,
    free: Vec<u16>,
    /// The number of ring descriptors of each chain in flight, by head (0: none in flight), and
    /// the driver's own copy of each descriptor's `next` (the ring's may be read by the device,
    /// and the driver frees a chain without reading guest memory): no allocation per request.
    chain_len: Vec<u16>,
    chain_next: Vec<u16>,
    /// Each head's indirect table, if any.
    tables: Vec<Option<(GuestPhysAddr, u32)>>,
    avail_idx: u16,
    /// The available index as stored in the ring.
    published: u16,
    /// The available index when the driver last decided whether to kick: what the device's
    /// event index is compared against (every chain since then counts, 2.7.13.4).
    kicked: u16,
    last_used: u16,
    /// The device's used index as last read: entries up to it are consumed without reading the
    /// index again (a line the device writes after every completion).
    seen_used: u16,
}

impl SplitDriver {
    /// Allocates the rings of a queue of `size` (a power of two) in `ram`.
    pub fn new(ram: &mut GuestRam, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(DriverError::Size(size));
        }
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 16)?;
        let avail = ram.alloc(6 + 2 * n, 2)?;
        let used = ram.alloc(6 + 8 * n, 4)?;
        Ok(Self {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            chain_next: vec![0; usize::from(size)],
            tables: vec![None; usize::from(size)],
            avail_idx: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
            seen_used: 0,
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor table, available ring and used ring addresses.
    pub fn addrs(&self) -> (GuestPhysAddr, GuestPhysAddr, GuestPhysAddr) {
        (self.desc, self.avail, self.used)
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    fn push_avail(&mut self, ram: &GuestRam, head: u16) -> Result<(), DriverError> {
        let slot = u64::from(self.avail_idx & (self.size - 1));
        ram.write(at(self.avail, 4 + 2 * slot), &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes a chain of direct descriptors available (published by [`SplitDriver::publish`]).
    pub fn add(&mut self, ram: &GuestRam, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        if bufs.len() > self.free.len() {
            return Err(DriverError::Full { want: bufs.len(), free: self.free.len() });
        }
        let n = u16::try_from(bufs.len()).map_err(|_| DriverError::Full { want: bufs.len(), free: self.free.len() })?;
        // Link the chain's descriptors first (bufs.len() <= free.len(), checked above).
        let head = self.free.pop().ok_or(DriverError::Full { want: bufs.len(), free: 0 })?;
        let mut last = head;
        for _ in 1..bufs.len() {
            let d = self.free.pop().ok_or(DriverError::Full { want: bufs.len(), free: 0 })?;
            self.chain_next[usize::from(last)] = d;
            last = d;
        }
        let mut d = head;
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= F_NEXT;
                self.chain_next[usize::from(d)]
            } else {
                0
            };
            ram.write(at(self.desc, 16 * u64::from(d)), &desc_bytes(ram.dma(b.gpa), b.len, flags, next))?;
            d = next;
        }
        self.chain_len[usize::from(head)] = n;
        self.push_avail(ram, head)?;
        Ok(head)
    }

    /// Makes a chain available through an indirect table (one ring descriptor), allocating the
    /// table in `ram` the first time a head needs one that large.
    pub fn add_indirect(&mut self, ram: &mut GuestRam, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let head = self.free.pop().ok_or_else(|| DriverError::Full { want: 1, free: 0 })?;
        let n = u32::try_from(bufs.len()).map_err(|_| DriverError::Full { want: bufs.len(), free: 0 })?;
        let table = match self.tables[usize::from(head)] {
            Some((t, cap)) if cap >= n => t,
            _ => {
                let t = ram.alloc(16 * u64::from(n), 16)?;
                self.tables[usize::from(head)] = Some((t, n));
                t
            }
        };
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= F_NEXT;
                u16::try_from(i + 1).map_err(|_| DriverError::Full { want: bufs.len(), free: 0 })?
            } else {
                0
            };
            ram.write(at(table, 16 * i as u64), &desc_bytes(ram.dma(b.gpa), b.len, flags, next))?;
        }
        ram.write(at(self.desc, 16 * u64::from(head)), &desc_bytes(ram.dma(table), 16 * n, F_INDIRECT, 0))?;
        self.chain_len[usize::from(head)] = 1;
        self.push_avail(ram, head)?;
        Ok(head)
    }

    /// Makes every chain added so far visible to the device (the available index, with release
    /// ordering), without deciding about a kick: Linux's driver stores the index at every add
    /// and kicks once per batch, so the device starts on the first request while the driver
    /// adds the rest, as it does on a packed ring, where a descriptor is visible once written.
    pub fn expose(&mut self, ram: &GuestRam) -> Result<(), DriverError> {
        let idx = ram.slice(self.avail, 4)?;
        // Release: the ring entries and descriptors written above are visible before the index.
        idx.store_u16(2, self.avail_idx.to_le(), Ordering::Release)
            .map_err(|_| RamError::Outside { gpa: self.avail, len: 4 })?;
        self.published = self.avail_idx;
        Ok(())
    }

    /// Publishes every chain added since the last call (the available index, with release
    /// ordering), and says whether the device wants a kick for the chains made available since
    /// the last call (2.7.13.4), [`SplitDriver::expose`]d or not.
    pub fn publish(&mut self, ram: &GuestRam, event_idx: bool) -> Result<bool, DriverError> {
        let old = self.kicked;
        self.expose(ram)?;
        self.kicked = self.avail_idx;
        // Pairs with the device's barrier between writing avail_event/flags and re-reading the
        // available index.
        fence(Ordering::SeqCst);
        let n = u64::from(self.size);
        if event_idx {
            let ev = ram.slice(at(self.used, 4 + 8 * n), 2)?;
            let event = u16::from_le(ev.read::<u16>(0).map_err(|_| RamError::Outside { gpa: self.used, len: 2 })?);
            Ok(need_event(event, self.avail_idx, old))
        } else {
            let f = ram.slice(self.used, 2)?;
            let flags = u16::from_le(
                f.load_u16(0, Ordering::Relaxed).map_err(|_| RamError::Outside { gpa: self.used, len: 2 })?,
            );
            Ok(flags & 1 == 0)
        }
    }

    /// Takes the next used element, if the device has published one.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Result<Option<UsedElem>, DriverError> {
        if self.seen_used == self.last_used {
            let used_idx = ram.slice(self.used, 4)?;
            // Acquire: pairs with the device's release store of the used index.
            let idx = u16::from_le(
                used_idx.load_u16(2, Ordering::Acquire).map_err(|_| RamError::Outside { gpa: self.used, len: 4 })?,
            );
            if idx == self.last_used {
                return Ok(None);
            }
            self.seen_used = idx;
        }
        let slot = u64::from(self.last_used & (self.size - 1));
        let mut e = [0u8; 8];
        ram.read(at(self.used, 4 + 8 * slot), &mut e)?;
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let id16 = u16::try_from(id).map_err(|_| DriverError::BadUsedId { id })?;
        let n = match self.chain_len.get_mut(usize::from(id16)) {
            Some(n) if *n > 0 => std::mem::take(n),
            _ => return Err(DriverError::BadUsedId { id }),
        };
        let mut d = id16;
        for _ in 0..n {
            self.free.push(d);
            d = self.chain_next[usize::from(d)];
        }
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { id: id16, len }))
    }

    /// Writes `used_event` (EVENT_IDX): interrupt me when the used index passes `v`.
    pub fn set_used_event(&self, ram: &GuestRam, v: u16) -> Result<(), DriverError> {
        ram.write(at(self.avail, 4 + 2 * u64::from(self.size)), &v.to_le_bytes())?;
        Ok(())
    }

    /// Sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
    pub fn set_no_interrupt(&self, ram: &GuestRam, on: bool) -> Result<(), DriverError> {
        ram.write(self.avail, &u16::from(on).to_le_bytes())?;
        Ok(())
    }

    /// The used index as the device last published it (what a frontend sends as the base when
    /// a backend restarts).
    pub fn device_used_idx(&self, ram: &GuestRam) -> Result<u16, DriverError> {
        let used = ram.slice(self.used, 4)?;
        let idx = used.load_u16(2, Ordering::Acquire).map_err(|_| RamError::Outside { gpa: self.used, len: 4 })?;
        Ok(u16::from_le(idx))
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The available index the driver has published.
    pub fn published_avail_idx(&self) -> u16 {
        self.published
    }
}

/// A packed virtqueue, driver side.
#[derive(Debug)]
pub struct PackedDriver {
    size: u16,
    desc: GuestPhysAddr,
    driver_area: GuestPhysAddr,
    device_area: GuestPhysAddr,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    free_slots: u16,
    free_ids: Vec<u16>,
    /// Ring descriptors each id in flight used (0: not in flight).
    id_descs: Vec<u16>,
    tables: Vec<Option<(GuestPhysAddr, u32)>>,
    /// The head of the chain added but not yet made visible, and its flags.
    pending: Vec<(u16, u16)>,
}

impl PackedDriver {
    /// Allocates the rings of a packed queue of `size` in `ram`.
    pub fn new(ram: &mut GuestRam, size: u16) -> Result<Self, DriverError> {
        if size == 0 || size > 32768 {
            return Err(DriverError::Size(size));
        }
        let desc = ram.alloc(16 * u64::from(size), 16)?;
        let driver_area = ram.alloc(4, 4)?;
        let device_area = ram.alloc(4, 4)?;
        Ok(Self {
            size,
            desc,
            driver_area,
            device_area,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free_slots: size,
            free_ids: (0..size).rev().collect(),
            id_descs: vec![0; usize::from(size)],
            tables: vec![None; usize::from(size)],
            pending: Vec::new(),
        })
    }

    /// Descriptor ring, driver area and device area addresses.
    pub fn addrs(&self) -> (GuestPhysAddr, GuestPhysAddr, GuestPhysAddr) {
        (self.desc, self.driver_area, self.device_area)
    }

    /// Free ring slots.
    pub fn free(&self) -> usize {
        usize::from(self.free_slots)
    }

    fn avail_flags(&self) -> u16 {
        if self.avail_wrap {
            F_AVAIL
        } else {
            F_USED
        }
    }

    fn put(
        &mut self,
        ram: &GuestRam,
        addr: u64,
        len: u32,
        id: u16,
        flags: u16,
        first: bool,
    ) -> Result<(), DriverError> {
        let slot = self.next_avail;
        let flags = flags | self.avail_flags();
        if first {
            // The head's flags are written last, in `publish`, so the chain appears at once.
            ram.write(at(self.desc, 16 * u64::from(slot)), &desc_bytes(addr, len, id, 0)[..14])?;
            self.pending.push((slot, flags));
        } else {
            ram.write(at(self.desc, 16 * u64::from(slot)), &desc_bytes(addr, len, id, flags))?;
        }
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_wrap = !self.avail_wrap;
        }
        Ok(())
    }

    /// Makes a chain of direct descriptors available (visible after [`PackedDriver::publish`]).
    pub fn add(&mut self, ram: &GuestRam, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let n = u16::try_from(bufs.len()).map_err(|_| DriverError::Full { want: bufs.len(), free: self.free() })?;
        if n > self.free_slots {
            return Err(DriverError::Full { want: bufs.len(), free: self.free() });
        }
        let id = self.free_ids.pop().ok_or_else(|| DriverError::Full { want: 1, free: 0 })?;
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.put(ram, ram.dma(b.gpa), b.len, id, flags, i == 0)?;
        }
        self.free_slots -= n;
        self.id_descs[usize::from(id)] = n;
        Ok(id)
    }

    /// Makes a chain available through an indirect table (one ring descriptor).
    pub fn add_indirect(&mut self, ram: &mut GuestRam, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        if self.free_slots == 0 {
            return Err(DriverError::Full { want: 1, free: 0 });
        }
        let id = self.free_ids.pop().ok_or_else(|| DriverError::Full { want: 1, free: 0 })?;
        let n = u32::try_from(bufs.len()).map_err(|_| DriverError::Full { want: bufs.len(), free: 0 })?;
        let table = match self.tables[usize::from(id)] {
            Some((t, cap)) if cap >= n => t,
            _ => {
                let t = ram.alloc(16 * u64::from(n), 16)?;
                self.tables[usize::from(id)] = Some((t, n));
                t
            }
        };
        for (i, b) in bufs.iter().enumerate() {
            let flags = if b.writable { F_WRITE } else { 0 };
            ram.write(at(table, 16 * i as u64), &desc_bytes(ram.dma(b.gpa), b.len, 0, flags))?;
        }
        self.put(ram, ram.dma(table), 16 * n, id, F_INDIRECT, true)?;
        self.free_slots -= 1;
        self.id_descs[usize::from(id)] = 1;
        Ok(id)
    }

    /// Makes the chains added since the last call visible (their head flags, release ordered)
    /// and says whether the device wants a kick.
    pub fn publish(&mut self, ram: &GuestRam) -> Result<bool, DriverError> {
        for (slot, flags) in std::mem::take(&mut self.pending) {
            let s = ram.slice(at(self.desc, 16 * u64::from(slot)), 16)?;
            // Release: the chain's descriptors are visible before its head's flags.
            s.store_u16(14, flags.to_le(), Ordering::Release)
                .map_err(|_| RamError::Outside { gpa: self.desc, len: 16 })?;
        }
        fence(Ordering::SeqCst);
        let dev = ram.slice(self.device_area, 4)?;
        let flags = u16::from_le(
            dev.load_u16(2, Ordering::Acquire).map_err(|_| RamError::Outside { gpa: self.device_area, len: 4 })?,
        );
        // DESC mode is treated as "kick": a kick too many is harmless for a model driver.
        Ok(flags != 1)
    }

    /// The device position the driver has consumed up to: slot in bits 0-14, wrap counter in
    /// bit 15 (a 16-bit vhost-user vring base).
    pub fn device_position(&self) -> u16 {
        self.next_used | (u16::from(self.used_wrap) << 15)
    }

    /// Takes the next used element, if the device has made one visible.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Result<Option<UsedElem>, DriverError> {
        let s = ram.slice(at(self.desc, 16 * u64::from(self.next_used)), 16)?;
        // Acquire: pairs with the device's release store of the flags.
        let flags =
            u16::from_le(s.load_u16(14, Ordering::Acquire).map_err(|_| RamError::Outside { gpa: self.desc, len: 16 })?);
        let (avail, used) = (flags & F_AVAIL != 0, flags & F_USED != 0);
        if avail != self.used_wrap || used != self.used_wrap {
            return Ok(None);
        }
        let len = u32::from_le(s.read::<u32>(8).map_err(|_| RamError::Outside { gpa: self.desc, len: 16 })?);
        let id = u16::from_le(s.read::<u16>(12).map_err(|_| RamError::Outside { gpa: self.desc, len: 16 })?);
        let n = match self.id_descs.get(usize::from(id)) {
            Some(&n) if n > 0 => n,
            _ => return Err(DriverError::BadUsedId { id: u32::from(id) }),
        };
        self.id_descs[usize::from(id)] = 0;
        self.free_ids.push(id);
        self.free_slots += n;
        let (next, wrapped) = advance(self.next_used, n, self.size);
        self.next_used = next;
        self.used_wrap ^= wrapped;
        Ok(Some(UsedElem { id, len }))
    }

    /// Writes the driver event suppression area: flags (0 enable, 1 disable, 2 desc) and
    /// off_wrap.
    pub fn set_driver_event(&self, ram: &GuestRam, flags: u16, off_wrap: u16) -> Result<(), DriverError> {
        let mut b = [0u8; 4];
        b[..2].copy_from_slice(&off_wrap.to_le_bytes());
        b[2..].copy_from_slice(&flags.to_le_bytes());
        ram.write(self.driver_area, &b)?;
        Ok(())
    }
}
