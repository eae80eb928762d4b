//! The kernel tap behind `vireo net --tap NAME`: one tap queue per virtio queue pair
//! (`IFF_MULTI_QUEUE`), each a non-blocking descriptor that frames move through with
//! `readv`/`writev` straight on the guest's buffers, the virtio-net header included (`IFF_VNET_HDR`,
//! the header length and offloads set from what the driver negotiated).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use vireo_wire::features::net as f;

/// Why the tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] std::io::Error),
    /// TUNSETIFF failed (another kind of device of that name, no permission...).
    #[error("cannot attach to tap {name}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tap exists with other flags than a multi-queue tap with virtio-net headers.
    #[error("tap {name} exists without the flags vireo needs (flags {flags:#x}; create it with `ip tuntap add dev {name} mode tap multi_queue vnet_hdr`)")]
    Flags {
        /// The interface.
        name: String,
        /// Its flags.
        flags: i32,
    },
    /// The name does not fit an interface name.
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    /// An ioctl on an attached queue failed.
    #[error("{what} on tap {name}: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF, TUNGETIFF and TUNSETQUEUE take it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// One tap queue.
#[derive(Debug)]
pub struct TapQueue {
    fd: File,
    attached: AtomicBool,
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A multi-queue tap.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<TapQueue>,
    /// The TUNSETOFFLOAD flags this kernel takes.
    supported: libc::c_uint,
}

fn ioctl_int(fd: &File, req: libc::Ioctl, value: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: these tun ioctls take their argument by value (an int in the pointer slot); no
    // memory is passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, value) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_ifreq(fd: &File, req: libc::Ioctl, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `ifr` is a live, writable `struct ifreq` (40 bytes on 64-bit Linux, as `IfReq` is)
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(ifr)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_ptr_int(fd: &File, req: libc::Ioctl, value: &mut libc::c_int) -> std::io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ, TUNSETVNETLE and TUNGETVNETHDRSZ take a pointer to an int, live
    // for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(value)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attaches `queues` queues to the tap `name`, creating it (not persistent: it goes when
    /// Vireo exits) if it does not exist. An existing tap must be a multi-queue tap with
    /// virtio-net headers.
    pub fn open(name: &str, queues: usize) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let mut ifr = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut qs = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            let fd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::Open)?;
            // The flags fit a c_short (0x5102).
            #[allow(clippy::cast_possible_truncation)]
            let flags = TAP_FLAGS as libc::c_short;
            ifr.flags = flags;
            ioctl_ifreq(&fd, libc::TUNSETIFF, &mut ifr)
                .map_err(|source| TapError::Attach { name: name.to_string(), source })?;
            // The first queue attached decides the device's flags; a later one with others is
            // taken silently. Check what the device has.
            let mut got = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
            ioctl_ifreq(&fd, libc::TUNGETIFF, &mut got).map_err(|source| TapError::Ioctl {
                name: name.to_string(),
                what: "TUNGETIFF",
                source,
            })?;
            let have = libc::c_int::from(got.flags)
                & (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE);
            if have != TAP_FLAGS {
                return Err(TapError::Flags { name: name.to_string(), flags: libc::c_int::from(got.flags) });
            }
            qs.push(TapQueue { fd, attached: AtomicBool::new(true) });
        }
        // Which offloads this kernel takes: unknown flags are EINVAL. USO needs both halves.
        let first = &qs[0].fd;
        let mut supported =
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO;
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        if ioctl_int(first, libc::TUNSETOFFLOAD, libc::c_ulong::from(supported | uso)).is_ok() {
            supported |= uso;
        } else if ioctl_int(first, libc::TUNSETOFFLOAD, libc::c_ulong::from(supported)).is_err() {
            supported = 0;
        }
        // No offloads until a driver negotiates them.
        let _ = ioctl_int(first, libc::TUNSETOFFLOAD, 0);
        tracing::info!(tap = name, queues = qs.len(), offloads = supported, "tap attached");
        Ok(Self { name: name.to_string(), queues: qs, supported })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queue `i`.
    pub fn queue(&self, i: usize) -> Option<&TapQueue> {
        self.queues.get(i)
    }

    /// The device features the tap can serve: every checksum and segmentation offload in both
    /// directions (a tap takes GSO frames whatever its offload flags, and gives them only as
    /// set), USO towards the guest where this kernel has it.
    pub fn features(&self) -> u64 {
        let mut bits = f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN | f::HOST_UFO | f::HOST_USO;
        if self.supported & libc::TUN_F_CSUM != 0 {
            bits |= f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_ECN | f::GUEST_UFO;
        }
        if self.supported & libc::TUN_F_USO4 != 0 {
            bits |= f::GUEST_USO4 | f::GUEST_USO6;
        }
        bits
    }

    /// Sets the tap up for a driver's features (the header length and what the kernel may hand
    /// over, TUNSETOFFLOAD from the GUEST_* bits) and attaches queue `i`. The header length and
    /// offloads are the device's, shared by every queue.
    pub fn activate(&self, i: usize, hdr_len: usize, features: u64) -> Result<(), TapError> {
        let q = self.queues.get(i).ok_or_else(|| TapError::Ioctl {
            name: self.name.clone(),
            what: "queue",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        self.attach(q, true)?;
        let err = |what| move |source| TapError::Ioctl { name: self.name.clone(), what, source };
        let mut sz = libc::c_int::try_from(hdr_len).unwrap_or(12);
        ioctl_ptr_int(&q.fd, libc::TUNSETVNETHDRSZ, &mut sz).map_err(err("TUNSETVNETHDRSZ"))?;
        // Virtio 1 headers are little endian; a no-op on x86, needed on a big-endian host.
        let mut le: libc::c_int = 1;
        let _ = ioctl_ptr_int(&q.fd, libc::TUNSETVNETLE, &mut le);
        let mut off = 0;
        if features & f::GUEST_CSUM != 0 {
            off |= libc::TUN_F_CSUM;
            for (feature, flag) in [
                (f::GUEST_TSO4, libc::TUN_F_TSO4),
                (f::GUEST_TSO6, libc::TUN_F_TSO6),
                (f::GUEST_ECN, libc::TUN_F_TSO_ECN),
                (f::GUEST_UFO, libc::TUN_F_UFO),
            ] {
                if features & feature != 0 {
                    off |= flag;
                }
            }
            if features & (f::GUEST_USO4 | f::GUEST_USO6) == f::GUEST_USO4 | f::GUEST_USO6 {
                off |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
            }
            if off & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) == 0 {
                off &= !libc::TUN_F_TSO_ECN;
            }
        }
        ioctl_int(&q.fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(off & self.supported)).map_err(err("TUNSETOFFLOAD"))
    }

    /// Detaches queue `i` (its pair stopped): frames the kernel would hash to it go to the
    /// queues still attached instead of piling up here.
    pub fn deactivate(&self, i: usize) {
        if let Some(q) = self.queues.get(i) {
            if let Err(e) = self.attach(q, false) {
                tracing::warn!(tap = %self.name, queue = i, error = %e, "tap queue not detached");
            }
        }
    }

    fn attach(&self, q: &TapQueue, on: bool) -> Result<(), TapError> {
        if q.attached.load(Relaxed) == on {
            return Ok(());
        }
        // The flags fit a c_short.
        #[allow(clippy::cast_possible_truncation)]
        let flags = if on { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE } as libc::c_short;
        let mut ifr = IfReq { name: [0; 16], flags, _pad: [0; 22] };
        ioctl_ifreq(&q.fd, libc::TUNSETQUEUE, &mut ifr).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            what: "TUNSETQUEUE",
            source,
        })?;
        q.attached.store(on, Relaxed);
        Ok(())
    }

    /// Sends one frame of Vireo's own (a RARP announcement) behind a zeroed virtio-net header of
    /// the length the tap expects now, on the first attached queue that takes it. Never blocks.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut last = std::io::Error::from(std::io::ErrorKind::NotConnected);
        for q in self.queues.iter().filter(|q| q.attached.load(Relaxed)) {
            let mut sz: libc::c_int = 10;
            ioctl_ptr_int(&q.fd, libc::TUNGETVNETHDRSZ, &mut sz)?;
            let mut buf = vec![0u8; usize::try_from(sz).unwrap_or(10)];
            buf.extend_from_slice(frame);
            match rustix::io::write(&q.fd, &buf) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }
}

use std::os::unix::fs::OpenOptionsExt;
