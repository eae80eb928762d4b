//! Helpers shared by the integration tests: memfd-backed regions as a frontend would create them.
#![allow(clippy::cast_possible_truncation)]
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};

use vireo_memory::{memfd, GuestPhysAddr, RegionSpec, UserAddr};

/// A memfd standing for one region of guest RAM.
pub struct Backing {
    pub fd: OwnedFd,
    pub gpa: u64,
    pub size: u64,
    pub user: u64,
}

impl Backing {
    pub fn new(gpa: u64, size: u64, user: u64) -> Self {
        Self { fd: memfd("vireo-test", size).expect("memfd"), gpa, size, user }
    }

    pub fn spec(&self) -> RegionSpec<'_> {
        RegionSpec {
            gpa: GuestPhysAddr::new(self.gpa),
            size: self.size,
            user_addr: UserAddr::new(self.user),
            fd: self.fd.as_fd(),
            fd_offset: 0,
        }
    }

    pub fn spec_at_user(&self, user: u64) -> RegionSpec<'_> {
        RegionSpec { user_addr: UserAddr::new(user), ..self.spec() }
    }

    /// Reads the backing file directly (not through any mapping of the code under test).
    pub fn read_u64(&self, offset: u64) -> u64 {
        let mut buf = [0u8; 8];
        rustix::io::pread(&self.fd, &mut buf, offset).expect("pread");
        u64::from_ne_bytes(buf)
    }

    pub fn read_all(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.size as usize];
        rustix::io::pread(&self.fd, &mut buf, 0).expect("pread");
        buf
    }
}
