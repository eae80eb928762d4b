//! A test bench: guest RAM, a backend view of it, and a model driver of either ring layout.
#![allow(dead_code)]

use vireo_driver::{Buffer, DriverError, GuestRam, PackedDriver, SplitDriver, UsedElem};
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Queue, QueueConfig, RingAddrs};

/// Either model driver.
pub enum Driver {
    Split(SplitDriver),
    Packed(PackedDriver),
}

impl Driver {
    pub fn add(&mut self, ram: &mut GuestRam, bufs: &[Buffer], indirect: bool) -> Result<u16, DriverError> {
        match (self, indirect) {
            (Driver::Split(d), false) => d.add(ram, bufs),
            (Driver::Split(d), true) => d.add_indirect(ram, bufs),
            (Driver::Packed(d), false) => d.add(ram, bufs),
            (Driver::Packed(d), true) => d.add_indirect(ram, bufs),
        }
    }

    pub fn publish(&mut self, ram: &GuestRam) -> bool {
        match self {
            Driver::Split(d) => d.publish(ram, false).unwrap(),
            Driver::Packed(d) => d.publish(ram).unwrap(),
        }
    }

    pub fn pop_used(&mut self, ram: &GuestRam) -> Option<UsedElem> {
        match self {
            Driver::Split(d) => d.pop_used(ram).unwrap(),
            Driver::Packed(d) => d.pop_used(ram).unwrap(),
        }
    }

    pub fn free(&self) -> usize {
        match self {
            Driver::Split(d) => d.free(),
            Driver::Packed(d) => d.free(),
        }
    }

    /// What a frontend sends in SET_VRING_BASE after the backend died: split, the used index
    /// (`completed`, what the driver has consumed); packed, the device position the driver
    /// tracks (16-bit form: available = used).
    pub fn restart_base(&self, completed: u16) -> u32 {
        match self {
            Driver::Split(_) => u32::from(completed),
            Driver::Packed(d) => u32::from(d.device_position()),
        }
    }

    pub fn addrs(&self) -> RingAddrs {
        match self {
            Driver::Split(d) => {
                let (desc, avail, used) = d.addrs();
                RingAddrs::Split { desc, avail, used }
            }
            Driver::Packed(d) => {
                let (desc, driver, device) = d.addrs();
                RingAddrs::Packed { desc, driver, device }
            }
        }
    }
}

pub struct Bench {
    pub ram: GuestRam,
    pub mem: GuestMemory,
    pub drv: Driver,
    pub queue: Queue,
}

impl Bench {
    pub fn new(packed: bool, size: u16, ram_size: u64) -> Self {
        Self::with_ram(packed, size, GuestRam::single(ram_size).unwrap())
    }

    pub fn with_ram(packed: bool, size: u16, mut ram: GuestRam) -> Self {
        let mem = GuestMemory::new(RetireMode::ProtNone { keep: 16 });
        mem.set_regions(&ram.specs()).unwrap();
        let drv = if packed {
            Driver::Packed(PackedDriver::new(&mut ram, size).unwrap())
        } else {
            Driver::Split(SplitDriver::new(&mut ram, size).unwrap())
        };
        let queue =
            Queue::new(mem.register_queue(), QueueConfig { size, addrs: drv.addrs(), event_idx: false }).unwrap();
        Self { ram, mem, drv, queue }
    }

    /// A buffer of `len` bytes filled with `fill`.
    pub fn buffer(&mut self, len: u32, writable: bool, fill: u8) -> Buffer {
        let gpa = self.ram.alloc(u64::from(len), 8).unwrap();
        self.ram.write(gpa, &vec![fill; len as usize]).unwrap();
        Buffer { gpa, len, writable }
    }

    pub fn read(&self, gpa: GuestPhysAddr, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram.read(gpa, &mut v).unwrap();
        v
    }
}
