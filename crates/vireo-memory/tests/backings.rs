//! Regions backed by each kind of file a frontend hands over: a memfd, a regular file, and
//! hugetlbfs memory (a `MFD_HUGETLB` memfd, which is hugetlbfs without a mount).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use vireo_memory::{GuestMemory, GuestPhysAddr, MemoryError, RegionSpec, RetireMode, UserAddr};

const HUGE: u64 = 2 << 20;

fn spec(fd: &OwnedFd, size: u64, fd_offset: u64) -> RegionSpec<'_> {
    RegionSpec { gpa: GuestPhysAddr::new(0), size, user_addr: UserAddr::new(0x4000_0000), fd: fd.as_fd(), fd_offset }
}

fn roundtrip(mem: &GuestMemory) {
    let mut q = mem.register_queue();
    let batch = q.batch(&[]);
    batch.write(GuestPhysAddr::new(0x1234), b"vireo").unwrap();
    let mut back = [0u8; 5];
    batch.read(GuestPhysAddr::new(0x1234), &mut back).unwrap();
    assert_eq!(&back, b"vireo");
}

#[test]
fn regular_file_at_an_offset() {
    let dir = std::env::temp_dir().join(format!("vireo-backing-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&dir).unwrap();
    // Unlinked at once: the descriptor keeps the file, and nothing is left however the test ends.
    std::fs::remove_file(&dir).unwrap();
    f.write_all(&vec![0xaa; 3 * 4096]).unwrap();
    let fd: OwnedFd = f.into();
    let mem = GuestMemory::new(RetireMode::ProtNone { keep: 4 });
    // A byte offset that is not page aligned, as vhost-user's mmap_offset may be.
    mem.set_regions(&[spec(&fd, 8192, 100)]).unwrap();
    // (The temporary directory is tmpfs on some machines: the flag follows the filesystem.)
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let tmpfs = rustix::fs::fstatfs(&fd).unwrap().f_type as u32 == 0x0102_1994;
    assert_eq!(mem.map().has_file_pages(), !tmpfs, "a file a filesystem writes back is told apart");
    let shm = vireo_memory::memfd("shm", 8192).unwrap();
    let other = GuestMemory::new(RetireMode::Unmap);
    other.set_regions(&[spec(&shm, 8192, 0)]).unwrap();
    assert!(!other.map().has_file_pages(), "a memfd is shared memory");
    {
        let mut q = mem.register_queue();
        let batch = q.batch(&[]);
        let mut b = [0u8; 1];
        batch.read(GuestPhysAddr::new(0), &mut b).unwrap();
        assert_eq!(b[0], 0xaa);
        batch.write(GuestPhysAddr::new(0), &[1]).unwrap();
    }
    let mut b = [0u8; 1];
    rustix::io::pread(&fd, &mut b, 100).unwrap();
    assert_eq!(b[0], 1, "the write landed at the file offset");
    roundtrip(&mem);
}

/// Makes sure at least `n` huge pages are reserved (as root), and gives back what it added.
struct HugePages {
    restore: Option<u64>,
}

impl HugePages {
    fn reserve(n: u64) -> Self {
        let path = "/proc/sys/vm/nr_hugepages";
        let now: u64 = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if now >= n {
            return Self { restore: None };
        }
        match std::fs::write(path, (now + n).to_string()) {
            Ok(()) => Self { restore: Some(now) },
            Err(_) => Self { restore: None },
        }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = self.restore {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old.to_string());
        }
    }
}

#[test]
fn hugetlbfs_memory() {
    let _pages = HugePages::reserve(4);
    let fd =
        match rustix::fs::memfd_create("vireo-huge", rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::HUGETLB)
        {
            Ok(fd) => fd,
            Err(e) => panic!("no hugetlbfs memfd on this machine ({e}); the test reserves huge pages when run as root"),
        };
    rustix::fs::ftruncate(&fd, 2 * HUGE).unwrap();
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&[spec(&fd, 2 * HUGE, 0)]).unwrap();
    roundtrip(&mem);
    let huge_maps =
        || std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("vireo-huge")).count();
    let before = huge_maps();
    // A file offset and a size that are not multiples of the huge page size: mapped in whole
    // huge pages (a hugetlbfs mapping cannot start or end inside one, and `munmap` of a length
    // that does not end on one fails, leaking the mapping), served, and unmapped in full when
    // retired.
    for _ in 0..8 {
        mem.set_regions(&[spec(&fd, HUGE - 8192, 4096)]).unwrap();
        roundtrip(&mem);
        let mut q = mem.register_queue();
        let batch = q.batch(&[]);
        batch.write(GuestPhysAddr::new(HUGE - 8192 - 5), b"tail!").unwrap();
        drop(batch);
        let mut b = [0u8; 5];
        rustix::io::pread(&fd, &mut b, 4096 + HUGE - 8192 - 5).unwrap();
        assert_eq!(&b, b"tail!", "the write landed at the file offset");
        mem.set_regions(&[spec(&fd, 2 * HUGE, 0)]).unwrap();
    }
    assert_eq!(huge_maps(), before, "every retired hugetlbfs mapping was unmapped");
    // A range past the end of the file is refused, and the old map keeps serving.
    let err = mem.set_regions(&[spec(&fd, 2 * HUGE, HUGE)]).unwrap_err();
    assert!(matches!(err, MemoryError::Map { .. }), "{err}");
    roundtrip(&mem);
}
