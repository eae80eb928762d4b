//! A virtio-blk driver that talks vhost-user to a backend (Vireo, qemu-storage-daemon, SPDK):
//! the frontend's negotiation and memory/ring set-up through rust-vmm's `vhost` crate, and the
//! guest driver's requests through [`SplitDriver`]/[`PackedDriver`] on memfd guest RAM.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_memory::GuestPhysAddr;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iommu::{IommuMode, IotlbSender, MissResponder, IOVA_OFFSET};
use crate::ram::{GuestRam, RamError};
use crate::virtq::{Buffer, DriverError, PackedDriver, SplitDriver, UsedElem};

/// virtio-blk request types (virtio 1.x 5.2.6).
pub mod req {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD as DISCARD, VIRTIO_BLK_T_FLUSH as FLUSH, VIRTIO_BLK_T_GET_ID as GET_ID,
        VIRTIO_BLK_T_IN as IN, VIRTIO_BLK_T_OUT as OUT, VIRTIO_BLK_T_WRITE_ZEROES as WRITE_ZEROES,
    };
}

/// virtio-blk status byte values (small constants the bindings type as u32).
#[allow(clippy::cast_possible_truncation)]
pub mod status {
    /// Success.
    pub const OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
    /// I/O error.
    pub const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
    /// Unsupported request.
    pub const UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
}

use virtio_bindings::virtio_blk as vblk;
const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
const VIRTIO_F_RING_PACKED: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << vblk::VIRTIO_BLK_F_SEG_MAX;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << vblk::VIRTIO_BLK_F_BLK_SIZE;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << vblk::VIRTIO_BLK_F_FLUSH;
const VIRTIO_BLK_F_MQ: u64 = 1 << vblk::VIRTIO_BLK_F_MQ;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << vblk::VIRTIO_BLK_F_DISCARD;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << vblk::VIRTIO_BLK_F_WRITE_ZEROES;
const VIRTIO_BLK_F_RO: u64 = 1 << vblk::VIRTIO_BLK_F_RO;
const VHOST_F_LOG_ALL: u64 = vhost::vhost_user::VhostUserVirtioFeatures::LOG_ALL.bits();
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;

/// How long the driver waits for any vhost-user reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the vhost-user block driver.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The vhost-user conversation failed.
    #[error("vhost-user {what}: {source}")]
    Vhost {
        /// Which step.
        what: &'static str,
        /// The protocol error.
        #[source]
        source: vhost::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The ring.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// An eventfd or poll.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    /// The backend lacks something the driver needs.
    #[error("backend does not offer {0}")]
    Missing(&'static str),
    /// No completion within the timeout.
    #[error("no completion from the backend within {0:?}")]
    Timeout(Duration),
    /// A request too large for the slot buffers.
    #[error("request of {len} bytes exceeds the {max}-byte request buffers")]
    TooLarge {
        /// Bytes asked for.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn vh<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, BlkError> {
    r.map_err(|source| BlkError::Vhost { what, source })
}

/// Bounds every vhost-user exchange in time. The `vhost` crate retries a receive that times
/// out, so a backend that never answers (or answers with fewer bytes than the crate expects:
/// libvhost-user's 8-byte SET_LOG_BASE reply against the crate's 16) would hang the driver; the
/// watchdog shuts the socket down at the deadline, which turns the wait into an error.
struct Watchdog {
    /// Deadline in nanoseconds since `epoch`; 0 when no exchange is in progress.
    deadline: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held for every exchange on the socket: the vIOMMU's IOTLB messages share it.
    exchange: std::sync::Arc<std::sync::Mutex<()>>,
    /// The connection's socket, for exchanges the `vhost` crate cannot make (IOTLB_MSG).
    socket: Option<std::os::unix::net::UnixStream>,
}

impl Watchdog {
    fn new(sock: std::os::unix::net::UnixStream) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
        let socket = sock.try_clone().ok();
        let deadline = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let thread = {
            let (deadline, stop) = (deadline.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vhost-user-watchdog".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        // Parked, so that Drop's unpark ends the thread at once.
                        std::thread::park_timeout(Duration::from_millis(50));
                        let d = deadline.load(Relaxed);
                        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        if d != 0 && now > d {
                            tracing::warn!("vhost-user backend did not answer in time; closing the connection");
                            let _ = sock.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                })
                .ok()
        };
        Self { deadline, stop, epoch, thread, exchange: std::sync::Arc::default(), socket }
    }

    /// Runs one exchange under the deadline.
    fn guard<T>(&self, what: &'static str, f: impl FnOnce() -> vhost::Result<T>) -> Result<T, BlkError> {
        use std::sync::atomic::Ordering::Relaxed;
        let _exchange = self.exchange.lock().unwrap_or_else(|e| e.into_inner());
        let d = self.epoch.elapsed() + REPLY_TIMEOUT;
        self.deadline.store(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1), Relaxed);
        let r = f();
        self.deadline.store(0, Relaxed);
        vh(what, r)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A pipe as two files (the channel of a device state transfer).
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

/// Sleeps until one of the call eventfds fires or `timeout` passes, then drains them (a
/// spurious wake-up just makes the caller poll the rings again). Returns how many calls the
/// eventfds had counted: every write the backend made since the last drain.
fn sleep_on(calls: &[&EventFd], timeout: Duration) -> Result<u64, BlkError> {
    // SAFETY: the eventfds are borrowed from the caller for the whole poll call.
    let borrowed: Vec<_> =
        calls.iter().map(|c| unsafe { std::os::fd::BorrowedFd::borrow_raw(c.as_raw_fd()) }).collect();
    let mut fds: Vec<_> =
        borrowed.iter().map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)).collect();
    let ts = rustix::event::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(BlkError::Io(e.into())),
    }
    let mut counted = 0u64;
    for c in calls {
        counted = counted.saturating_add(c.read().unwrap_or(0));
    }
    Ok(counted)
}

/// Sets ring `qi` up and enables it at `base`: size, base, addresses, both eventfds (libvhost-user
/// forgets them at GET_VRING_BASE, so a restart sends them again, as QEMU does).
fn start_ring(
    fe: &mut Frontend,
    wd: &Watchdog,
    ram: &GuestRam,
    queue_size: u16,
    qi: usize,
    q: &BlkQueue,
    base: u16,
) -> Result<(), BlkError> {
    let (d, a, u) = match &q.ring {
        Ring::Split(r) => r.addrs(),
        Ring::Packed(r) => r.addrs(),
    };
    // Behind the vIOMMU the rings are given as IOVAs, otherwise as this process's addresses.
    let addr = |gpa| if ram.behind_iommu() { Ok(ram.dma(gpa)) } else { ram.user_addr(gpa) };
    let cfg = VringConfigData {
        queue_max_size: queue_size,
        queue_size,
        flags: 0,
        desc_table_addr: addr(d)?,
        used_ring_addr: addr(u)?,
        avail_ring_addr: addr(a)?,
        log_addr: None,
    };
    wd.guard("SET_VRING_NUM", || fe.set_vring_num(qi, queue_size))?;
    wd.guard("SET_VRING_BASE", || fe.set_vring_base(qi, base))?;
    wd.guard("SET_VRING_ADDR", || fe.set_vring_addr(qi, &cfg))?;
    wd.guard("SET_VRING_CALL", || fe.set_vring_call(qi, &q.call))?;
    wd.guard("SET_VRING_KICK", || fe.set_vring_kick(qi, &q.kick))?;
    wd.guard("SET_VRING_ENABLE", || fe.set_vring_enable(qi, true))?;
    Ok(())
}

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Queues to use (at most what the backend offers).
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Use packed rings (if the backend offers them).
    pub packed: bool,
    /// Negotiate EVENT_IDX (if offered).
    pub event_idx: bool,
    /// The largest request, in bytes (each request slot has a buffer this large).
    pub max_request: usize,
    /// Request slots per queue (the deepest queue depth).
    pub slots: u16,
    /// Back guest RAM with huge pages.
    pub hugepages: bool,
    /// Negotiate LOG_SHMFD so that dirty logging can be switched on
    /// ([`BlkDevice::start_dirty_log`]).
    pub log_shmfd: bool,
    /// Negotiate INFLIGHT_SHMFD: the backend records requests in flight in memory the driver
    /// keeps, so that after the backend dies [`BlkDevice::reconnect`] loses none.
    pub inflight: bool,
    /// Send guest memory region by region with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) instead of one
    /// SET_MEM_TABLE.
    pub add_mem_reg: bool,
    /// Act as a vIOMMU (VIRTIO_F_ACCESS_PLATFORM): give the device IOVAs and IOTLB entries.
    pub iommu: Option<IommuMode>,
    /// Store a split ring's available index only at [`BlkDevice::kick`], as drivers that
    /// publish once per burst do (DPDK's virtio PMD), instead of at every request, as Linux's
    /// does (the default). A request submitted and not kicked is then invisible to the device,
    /// which a test that changes a request's mapping before kicking it relies on.
    pub publish_at_kick: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            packed: false,
            event_idx: true,
            max_request: 128 << 10,
            slots: 128,
            hugepages: false,
            log_shmfd: false,
            inflight: false,
            add_mem_reg: false,
            iommu: None,
            publish_at_kick: false,
        }
    }
}

enum Ring {
    Split(SplitDriver),
    Packed(PackedDriver),
}

/// One request slot: header, data and status in guest RAM.
#[derive(Clone, Copy, Debug)]
struct Slot {
    header: GuestPhysAddr,
    data: GuestPhysAddr,
    status: GuestPhysAddr,
}

struct BlkQueue {
    ring: Ring,
    kick: EventFd,
    call: EventFd,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Ring id of the chain in flight -> slot index.
    by_id: Vec<Option<u16>>,
    pending_kick: bool,
}

/// A range of guest physical memory: start and length.
pub type Extent = (u64, u64);

/// The notifications that crossed between driver and backend, and the driver's sleeps: what an
/// I/O costs in wake-ups on either side, counted by the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyCounts {
    /// Kick eventfd writes (the backend asked to be notified).
    pub kicks: u64,
    /// Call eventfd writes the backend made, as the driver drained them (those since the last
    /// sleep are not counted yet).
    pub calls: u64,
    /// Times the driver found nothing and slept on the call eventfds.
    pub sleeps: u64,
    /// Nanoseconds spent in those sleeps.
    pub slept_ns: u64,
}

/// Packed ring event suppression flags (virtio 1.2, 2.8.10).
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The slot the request used.
    pub slot: u16,
    /// Its status byte.
    pub status: u8,
    /// Bytes the device wrote.
    pub written: u32,
}

/// A vhost-user block device as seen from the guest side.
pub struct BlkDevice {
    fe: Frontend,
    ram: GuestRam,
    queues: Vec<BlkQueue>,
    features: u64,
    capacity: u64,
    blk_size: u32,
    max_request: usize,
    event_idx: bool,
    /// [`BlkOptions::publish_at_kick`].
    publish_at_kick: bool,
    /// The dirty log, once started: its memfd and size.
    log: Option<(std::os::fd::OwnedFd, u64)>,
    watchdog: Watchdog,
    /// Protocol features asked for (the backend's offer intersected with these).
    proto_want: VhostUserProtocolFeatures,
    queue_size: u16,
    /// The inflight area the backend created (GET_INFLIGHT_FD), handed to every new connection.
    inflight: Option<(std::fs::File, VhostUserInflight)>,
    iommu: Option<IommuMode>,
    /// The vIOMMU's sender on this connection's socket, and the thread answering misses.
    iotlb: Option<IotlbSender>,
    responder: Option<MissResponder>,
    /// Misses answered on earlier connections.
    misses_before: u64,
    notify: NotifyCounts,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice").field("queues", &self.queues.len()).field("capacity", &self.capacity).finish()
    }
}

impl BlkDevice {
    /// Connects to the backend at `socket`, negotiates, maps guest RAM and starts the queues.
    pub fn connect(socket: &Path, opts: &BlkOptions) -> Result<Self, BlkError> {
        Self::with_stream(std::os::unix::net::UnixStream::connect(socket)?, opts)
    }

    /// As [`BlkDevice::connect`], over a connected socket (a backend in client mode connected to
    /// a socket this program listens on).
    pub fn with_stream(sock: std::os::unix::net::UnixStream, opts: &BlkOptions) -> Result<Self, BlkError> {
        // Our own socket, so that every reply has a deadline: a backend that never answers
        // fails the call instead of hanging the driver.
        let watchdog = Watchdog::new(sock.try_clone()?);
        let mut fe = Frontend::from_stream(sock, u64::from(opts.num_queues.max(1)));
        let offered = watchdog.guard("GET_FEATURES", || fe.get_features())?;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(BlkError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(BlkError::Missing("VIRTIO_F_VERSION_1"));
        }
        let proto = watchdog.guard("GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
        let mut want =
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        type P = VhostUserProtocolFeatures;
        // What each option needs the backend to offer (REPLY_ACK, which the vIOMMU also needs,
        // is asked for above).
        for (asked, feature, name) in [
            (opts.log_shmfd, P::LOG_SHMFD, "VHOST_USER_PROTOCOL_F_LOG_SHMFD"),
            (opts.add_mem_reg, P::CONFIGURE_MEM_SLOTS, "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS"),
            (opts.iommu.is_some(), P::BACKEND_REQ | P::REPLY_ACK, "VHOST_USER_PROTOCOL_F_BACKEND_REQ and REPLY_ACK"),
            (opts.inflight, P::INFLIGHT_SHMFD, "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD"),
        ] {
            if asked {
                if !proto.contains(feature) {
                    return Err(BlkError::Missing(name));
                }
                want |= feature;
            }
        }
        if opts.iommu.is_some() && offered & VIRTIO_F_ACCESS_PLATFORM == 0 {
            return Err(BlkError::Missing("VIRTIO_F_ACCESS_PLATFORM"));
        }
        // Device state transfer, where offered (BlkDevice::save_state / load_state).
        want |= proto & VhostUserProtocolFeatures::DEVICE_STATE;
        watchdog.guard("SET_PROTOCOL_FEATURES", || fe.set_protocol_features(proto & want))?;
        let backend_queues = if proto.contains(VhostUserProtocolFeatures::MQ) {
            watchdog.guard("GET_QUEUE_NUM", || fe.get_queue_num())?
        } else {
            1
        };
        let num_queues = u64::from(opts.num_queues.max(1)).min(backend_queues);
        watchdog.guard("SET_OWNER", || fe.set_owner())?;

        let packed = opts.packed && offered & VIRTIO_F_RING_PACKED != 0;
        let event_idx = opts.event_idx && offered & VIRTIO_RING_F_EVENT_IDX != 0;
        if offered & VIRTIO_RING_F_INDIRECT_DESC == 0 {
            return Err(BlkError::Missing("VIRTIO_RING_F_INDIRECT_DESC"));
        }
        let mut features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_INDIRECT_DESC;
        for f in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_RO,
        ] {
            features |= offered & f;
        }
        if packed {
            features |= VIRTIO_F_RING_PACKED;
        }
        if event_idx {
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.iommu.is_some() {
            features |= VIRTIO_F_ACCESS_PLATFORM;
        }

        // Config space: capacity (sectors) at 0, blk_size at 20.
        let cfg_len = 60u32;
        let (_, cfg) = watchdog.guard("GET_CONFIG", || {
            fe.get_config(0, cfg_len, VhostUserConfigFlags::WRITABLE, &vec![0u8; cfg_len as usize])
        })?;
        let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap_or([0; 8]));
        let blk_size = if features & VIRTIO_BLK_F_BLK_SIZE != 0 {
            u32::from_le_bytes(cfg[20..24].try_into().unwrap_or([0; 4])).max(512)
        } else {
            512
        };

        // Guest RAM: the rings and, per queue, `slots` request slots.
        let per_slot = (opts.max_request as u64).div_ceil(4096) * 4096 + 4096;
        let ram_size = (num_queues * (u64::from(opts.slots) * per_slot + (1 << 20))).div_ceil(2 << 20) * (2 << 20);
        let mut ram = GuestRam::with_pages(&[(0, ram_size)], opts.hugepages)?;
        if opts.iommu.is_some() {
            ram.set_dma_offset(IOVA_OFFSET);
        }

        let mut queues = Vec::new();
        let num_queues = usize::try_from(num_queues).unwrap_or(1);
        for _ in 0..num_queues {
            let ring = if packed {
                Ring::Packed(PackedDriver::new(&mut ram, opts.queue_size)?)
            } else {
                Ring::Split(SplitDriver::new(&mut ram, opts.queue_size)?)
            };
            let (d, a, u) = match &ring {
                Ring::Split(r) => r.addrs(),
                Ring::Packed(r) => r.addrs(),
            };
            let slots: Vec<Slot> = (0..opts.slots)
                .map(|_| -> Result<Slot, BlkError> {
                    let header = ram.alloc(16, 16)?;
                    let status = ram.alloc(1, 1)?;
                    let data = ram.alloc(opts.max_request as u64, 4096)?;
                    Ok(Slot { header, data, status })
                })
                .collect::<Result<_, _>>()?;
            let _ = (d, a, u);
            let kick = EventFd::new(EFD_NONBLOCK)?;
            let call = EventFd::new(EFD_NONBLOCK)?;
            let n = usize::from(opts.queue_size);
            queues.push(BlkQueue {
                ring,
                kick,
                call,
                free: (0..opts.slots).rev().collect(),
                slots,
                by_id: vec![None; n],
                pending_kick: false,
            });
        }
        let mut dev = Self {
            fe,
            ram,
            queues,
            features,
            capacity,
            blk_size,
            max_request: opts.max_request,
            event_idx,
            publish_at_kick: opts.publish_at_kick,
            log: None,
            watchdog,
            proto_want: want,
            queue_size: opts.queue_size,
            inflight: None,
            iommu: opts.iommu,
            iotlb: None,
            responder: None,
            misses_before: 0,
            notify: NotifyCounts::default(),
        };
        for q in 0..dev.queues.len() {
            dev.disarm(q)?;
        }
        dev.start(opts.inflight)?;
        Ok(dev)
    }

    /// The part of the set-up every connection repeats: features, memory table, inflight area,
    /// and the rings (their bases read back from the rings themselves, as a frontend does after
    /// a backend went away).
    fn start(&mut self, want_inflight: bool) -> Result<(), BlkError> {
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        wd.guard("SET_FEATURES", || fe.set_features(self.features))?;
        let regions = self.regions();
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        if self.proto_want.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let slots = wd.guard("GET_MAX_MEM_SLOTS", || fe.get_max_mem_slots())?;
            if (regions.len() as u64) > slots {
                return Err(BlkError::Missing("enough memory slots for the guest RAM"));
            }
            for r in &regions {
                wd.guard("ADD_MEM_REG", || fe.add_mem_region(r))?;
            }
        } else {
            wd.guard("SET_MEM_TABLE", || fe.set_mem_table(&regions))?;
        }
        let nq = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
        if want_inflight && self.inflight.is_none() {
            let ask = VhostUserInflight::new(0, 0, nq, self.queue_size);
            let (info, file) = wd.guard("GET_INFLIGHT_FD", || fe.get_inflight_fd(&ask))?;
            self.inflight = Some((file, info));
        }
        if let Some((file, info)) = &self.inflight {
            wd.guard("SET_INFLIGHT_FD", || fe.set_inflight_fd(info, file.as_raw_fd()))?;
        }
        if let Some(mode) = self.iommu {
            self.start_iommu(mode)?;
        }
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        for (qi, q) in self.queues.iter().enumerate() {
            let base = match &q.ring {
                // What the device completed is where it starts again; with an inflight area the
                // backend resubmits what it had taken beyond that.
                Ring::Split(r) => r.device_used_idx(&self.ram)?,
                // A packed ring restarts at the driver's view of the device position (wrap
                // counter in bit 15); both counters start at 1 (virtio 1.x 2.8.1).
                Ring::Packed(r) => r.device_position(),
            };
            start_ring(fe, wd, &self.ram, self.queue_size, qi, q, base)?;
        }
        Ok(())
    }

    /// The vIOMMU's part of a connection: the backend channel and its miss responder, and in
    /// [`IommuMode::Premapped`] an entry per guest RAM region.
    fn start_iommu(&mut self, mode: IommuMode) -> Result<(), BlkError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        wd.guard("SET_BACKEND_REQ_FD", || fe.set_backend_request_fd(&theirs))?;
        let sock = self.watchdog.socket.as_ref().ok_or(BlkError::Missing("a socket to clone"))?.try_clone()?;
        let sender = IotlbSender::new(sock, self.watchdog.exchange.clone())?;
        let regions: Vec<(u64, u64, u64)> = self
            .ram
            .files()
            .iter()
            .map(|&(gpa, size, _)| Ok((self.ram.dma(gpa), size, self.ram.user_addr(gpa)?)))
            .collect::<Result<_, BlkError>>()?;
        if mode == IommuMode::Premapped {
            for &(iova, size, uaddr) in &regions {
                sender.update(iova, size, uaddr)?;
            }
        }
        self.misses_before += self.responder.as_ref().map_or(0, MissResponder::misses);
        self.responder = Some(MissResponder::spawn(ours, sender.clone(), regions)?);
        self.iotlb = Some(sender);
        Ok(())
    }

    /// Guest RAM (a hostile frontend's tests shrink its files under the backend).
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The addresses the device is given for `slot` of queue `q`: header, data and status
    /// (IOVAs behind the vIOMMU).
    pub fn slot_iovas(&self, q: usize, slot: u16) -> (u64, u64, u64) {
        let s = self.queues[q].slots[usize::from(slot)];
        (self.ram.dma(s.header), self.ram.dma(s.data), self.ram.dma(s.status))
    }

    /// vIOMMU: maps `size` bytes at `iova` (inside guest RAM) with access `perm` (vhost's
    /// VHOST_ACCESS_RO = 1, WO = 2, RW = 3).
    pub fn iotlb_update(&self, iova: u64, size: u64, perm: u8) -> Result<(), BlkError> {
        let sender = self.iotlb.as_ref().ok_or(BlkError::Missing("the vIOMMU (BlkOptions::iommu)"))?;
        let (start, len, uaddr) = self
            .ram
            .iova_region(iova)
            .filter(|&(s, l, _)| iova.checked_add(size).is_some_and(|end| end <= s + l))
            .ok_or(RamError::Outside { gpa: GuestPhysAddr::new(iova), len: size })?;
        let _ = len;
        Ok(sender.update_with(iova, size, uaddr + (iova - start), perm)?)
    }

    /// vIOMMU: takes `[iova, iova + size)` back. When this returns the backend no longer uses
    /// it, and no I/O of its is in flight into it.
    pub fn iotlb_invalidate(&self, iova: u64, size: u64) -> Result<(), BlkError> {
        let sender = self.iotlb.as_ref().ok_or(BlkError::Missing("the vIOMMU (BlkOptions::iommu)"))?;
        Ok(sender.invalidate(iova, size)?)
    }

    /// vIOMMU: takes every IOVA back (one invalidation of all of guest RAM, whose reply is
    /// timed) and, in [`IommuMode::Premapped`], maps guest RAM again; on demand, the backend's
    /// misses bring the pages back. Returns the invalidation's reply latency.
    pub fn iotlb_churn(&self) -> Result<Duration, BlkError> {
        let sender = self.iotlb.as_ref().ok_or(BlkError::Missing("the vIOMMU (BlkOptions::iommu)"))?;
        let files = self.ram.files();
        let lo = files.iter().map(|f| self.ram.dma(f.0)).min().unwrap_or(0);
        let hi = files.iter().map(|f| self.ram.dma(f.0) + f.1).max().unwrap_or(0);
        let t = Instant::now();
        sender.invalidate(lo, hi - lo)?;
        let took = t.elapsed();
        if self.iommu == Some(IommuMode::Premapped) {
            for &(gpa, size, _) in &files {
                sender.update(self.ram.dma(gpa), size, self.ram.user_addr(gpa)?)?;
            }
        }
        Ok(took)
    }

    /// vIOMMU: how many IOTLB access failures the backend reported on this connection.
    pub fn iotlb_access_failures(&self) -> u64 {
        self.responder.as_ref().map_or(0, MissResponder::faults)
    }

    /// vIOMMU: how many IOTLB misses the backend sent (and were answered).
    pub fn iotlb_misses(&self) -> u64 {
        self.misses_before + self.responder.as_ref().map_or(0, MissResponder::misses)
    }

    /// Connects again to a backend at `socket` (a restarted one, after the old one died) and
    /// sets everything up again with the same guest RAM, rings and inflight area: requests in
    /// flight stay in flight and complete through the new backend. Dirty logging is not
    /// carried over.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), BlkError> {
        let sock = std::os::unix::net::UnixStream::connect(socket)?;
        self.watchdog = Watchdog::new(sock.try_clone()?);
        self.fe = Frontend::from_stream(sock, self.queues.len() as u64);
        self.log = None;
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        let offered = wd.guard("GET_FEATURES", || fe.get_features())?;
        if offered & self.features != self.features {
            return Err(BlkError::Missing("a feature the first backend offered"));
        }
        let proto = wd.guard("GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
        if !proto.contains(self.proto_want) {
            return Err(BlkError::Missing("a protocol feature the first backend offered"));
        }
        wd.guard("SET_PROTOCOL_FEATURES", || fe.set_protocol_features(self.proto_want))?;
        wd.guard("SET_OWNER", || fe.set_owner())?;
        self.start(false)?;
        for q in 0..self.queues.len() {
            self.queues[q].kick.write(1)?;
        }
        Ok(())
    }

    /// Stops queue `q` (GET_VRING_BASE) and returns the position the backend reports: for a
    /// split ring the next available index it would read, for a packed ring its 32-bit encoding.
    /// The backend completes what it had taken first; [`BlkDevice::start_queue`] resumes.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32, BlkError> {
        if q >= self.queues.len() {
            return Err(BlkError::Missing("a queue with that index"));
        }
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        wd.guard("GET_VRING_BASE", || fe.get_vring_base(q))
    }

    /// Starts queue `q` again after [`BlkDevice::stop_queue`], at `base` (what it returned, or
    /// for a split ring any position the driver chooses).
    pub fn start_queue(&mut self, q: usize, base: u16) -> Result<(), BlkError> {
        let queue = self.queues.get(q).ok_or(BlkError::Missing("a queue with that index"))?;
        start_ring(&mut self.fe, &self.watchdog, &self.ram, self.queue_size, q, queue, base)
    }

    /// Saves the backend's device state (DEVICE_STATE, as the source of a migration does): every
    /// queue must be stopped first ([`BlkDevice::stop_queue`]).
    pub fn save_state(&mut self) -> Result<Vec<u8>, BlkError> {
        use vhost::vhost_user::message::{VhostTransferStateDirection as Dir, VhostTransferStatePhase as Phase};
        let (reader, writer) = pipe()?;
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        let theirs =
            wd.guard("SET_DEVICE_STATE_FD", || fe.set_device_state_fd(Dir::SAVE, Phase::STOPPED, writer.into()))?;
        let mut state = Vec::new();
        match theirs {
            Some(f) => std::io::Read::read_to_end(&mut { f }, &mut state)?,
            None => std::io::Read::read_to_end(&mut { reader }, &mut state)?,
        };
        wd.guard("CHECK_DEVICE_STATE", || fe.check_device_state())?;
        Ok(state)
    }

    /// Hands the backend a source's device state (as the destination of a migration does):
    /// every queue must be stopped first. The backend's verdict comes from CHECK_DEVICE_STATE.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), BlkError> {
        use vhost::vhost_user::message::{VhostTransferStateDirection as Dir, VhostTransferStatePhase as Phase};
        let (reader, writer) = pipe()?;
        let (fe, wd) = (&mut self.fe, &self.watchdog);
        let theirs =
            wd.guard("SET_DEVICE_STATE_FD", || fe.set_device_state_fd(Dir::LOAD, Phase::STOPPED, reader.into()))?;
        match theirs {
            Some(f) => std::io::Write::write_all(&mut { f }, state)?,
            None => std::io::Write::write_all(&mut { writer }, state)?,
        }
        wd.guard("CHECK_DEVICE_STATE", || fe.check_device_state())
    }

    /// Requests submitted and not yet completed on queue `q`.
    pub fn in_flight(&self, q: usize) -> usize {
        self.queues.get(q).map_or(0, |x| x.slots.len() - x.free.len())
    }

    fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.ram
            .files()
            .iter()
            .map(|&(gpa, size, fd)| VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa.raw(),
                memory_size: size,
                userspace_addr: self.ram.user_addr(gpa).unwrap_or(0),
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
            })
            .collect()
    }

    /// Sends the memory table again, as a frontend does when its memory layout changes: the
    /// backend must remap under running queues. Returns how long the reply took.
    pub fn resend_mem_table(&mut self) -> Result<Duration, BlkError> {
        let regions = self.regions();
        let t = Instant::now();
        let fe = &self.fe;
        self.watchdog.guard("SET_MEM_TABLE", || fe.set_mem_table(&regions))?;
        Ok(t.elapsed())
    }

    /// Switches dirty logging on: a log memfd (one bit per 4 KiB of guest RAM) through
    /// SET_LOG_BASE, then VHOST_F_LOG_ALL. Needs `BlkOptions::log_shmfd`.
    pub fn start_dirty_log(&mut self) -> Result<(), BlkError> {
        let ram_bytes: u64 = self.ram.files().iter().map(|f| f.0.raw() + f.1).max().unwrap_or(0);
        let log_bytes = ram_bytes.div_ceil(4096 * 8).div_ceil(4096) * 4096;
        let fd = vireo_memory::memfd("vireo-dirty-log", log_bytes).map_err(BlkError::Io)?;
        let region =
            vhost::VhostUserDirtyLogRegion { mmap_size: log_bytes, mmap_offset: 0, mmap_handle: fd.as_raw_fd() };
        let fe = &self.fe;
        self.watchdog.guard("SET_LOG_BASE", || fe.set_log_base(0, Some(region)))?;
        self.watchdog.guard("SET_FEATURES", || fe.set_features(self.features | VHOST_F_LOG_ALL))?;
        // SET_FEATURES has no reply: a request made right after could be served before the
        // backend has switched logging on. A request that is answered, handled in order, makes
        // sure it has (QEMU asks for REPLY_ACK on this SET_FEATURES for the same reason).
        self.watchdog.guard("GET_FEATURES", || fe.get_features())?;
        self.log = Some((fd, log_bytes));
        Ok(())
    }

    /// The number of dirty pages in the log (reading it does not clear it).
    pub fn dirty_pages(&self) -> Result<u64, BlkError> {
        let Some((fd, len)) = &self.log else { return Ok(0) };
        let mut buf = vec![0u8; usize::try_from(*len).unwrap_or(0)];
        rustix::io::pread(fd, &mut buf, 0).map_err(|e| BlkError::Io(e.into()))?;
        Ok(buf.iter().map(|b| u64::from(b.count_ones())).sum())
    }

    /// The guest pages (4 KiB page numbers) the dirty log marks, in order.
    pub fn dirty_page_list(&self) -> Result<Vec<u64>, BlkError> {
        let Some((fd, len)) = &self.log else { return Ok(Vec::new()) };
        let mut buf = vec![0u8; usize::try_from(*len).unwrap_or(0)];
        rustix::io::pread(fd, &mut buf, 0).map_err(|e| BlkError::Io(e.into()))?;
        Ok((0..buf.len() as u64 * 8).filter(|&p| buf[(p / 8) as usize] & (1 << (p % 8)) != 0).collect())
    }

    /// Clears the dirty log, as a frontend does after it has synced the pages.
    pub fn clear_dirty_log(&self) -> Result<(), BlkError> {
        let Some((fd, len)) = &self.log else { return Ok(()) };
        let zeros = vec![0u8; usize::try_from(*len).unwrap_or(0)];
        rustix::io::pwrite(fd, &zeros, 0).map_err(|e| BlkError::Io(e.into()))?;
        Ok(())
    }

    /// The guest physical ranges of queue `q`'s rings (descriptor area, driver area, device
    /// area) and of `slot`'s header, data and status, as `(start, length)`.
    pub fn layout(&self, q: usize, slot: u16) -> ([Extent; 3], [Extent; 3]) {
        let size = u64::from(self.queue_size);
        let (rings, lens) = match &self.queues[q].ring {
            Ring::Split(r) => (r.addrs(), [16 * size, 6 + 2 * size, 6 + 8 * size]),
            Ring::Packed(r) => (r.addrs(), [16 * size, 4, 4]),
        };
        let s = self.queues[q].slots[usize::from(slot)];
        let max = self.max_request as u64;
        (
            [(rings.0.raw(), lens[0]), (rings.1.raw(), lens[1]), (rings.2.raw(), lens[2])],
            [(s.header.raw(), 16), (s.data.raw(), max), (s.status.raw(), 1)],
        )
    }

    /// Waits up to `timeout` for completions on any queue; returns them with their queue.
    pub fn wait_any(&mut self, timeout: Duration, out: &mut Vec<(usize, Completion)>) -> Result<usize, BlkError> {
        let mut buf = Vec::new();
        let collect = |dev: &mut Self, out: &mut Vec<(usize, Completion)>, buf: &mut Vec<Completion>| {
            let mut n = 0;
            for q in 0..dev.queues.len() {
                buf.clear();
                n += dev.poll(q, buf)?;
                out.extend(buf.iter().map(|c| (q, *c)));
            }
            Ok::<usize, BlkError>(n)
        };
        let n = collect(self, out, &mut buf)?;
        if n > 0 || timeout.is_zero() {
            return Ok(n);
        }
        for q in 0..self.queues.len() {
            self.arm(q)?;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut n = collect(self, out, &mut buf)?;
        if n == 0 {
            let calls: Vec<&EventFd> = self.queues.iter().map(|q| &q.call).collect();
            let t = Instant::now();
            let counted = sleep_on(&calls, timeout)?;
            self.notify.slept_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.notify.sleeps += 1;
            self.notify.calls += counted;
            n = collect(self, out, &mut buf)?;
        }
        for q in 0..self.queues.len() {
            self.disarm(q)?;
        }
        Ok(n)
    }

    /// Asks queue `q` for an interrupt at its next completion, as a guest driver re-enables its
    /// callbacks before it sleeps: with EVENT_IDX, the split ring's used event or the packed
    /// ring's event offset at what the driver has consumed; without it, the flags. The caller
    /// fences and looks at the ring once more before sleeping.
    fn arm(&self, q: usize) -> Result<(), BlkError> {
        match &self.queues[q].ring {
            Ring::Split(r) if self.event_idx => r.set_used_event(&self.ram, r.last_used())?,
            Ring::Split(r) => r.set_no_interrupt(&self.ram, false)?,
            Ring::Packed(r) if self.event_idx => r.set_driver_event(&self.ram, EVENT_DESC, r.device_position())?,
            Ring::Packed(r) => r.set_driver_event(&self.ram, EVENT_ENABLE, 0)?,
        }
        Ok(())
    }

    /// Queue `q` needs no interrupt while the driver is awake and looking at its rings (a guest
    /// driver disables its callbacks while it processes). A split ring with EVENT_IDX needs no
    /// write: its used event stays where the driver last slept, behind the device. Without
    /// this, a packed ring asked for a call at every completion, which kept the driver's
    /// eventfd readable so that it never slept: the two layouts measured different drivers.
    fn disarm(&self, q: usize) -> Result<(), BlkError> {
        match &self.queues[q].ring {
            Ring::Split(_) if self.event_idx => {}
            Ring::Split(r) => r.set_no_interrupt(&self.ram, true)?,
            Ring::Packed(r) => r.set_driver_event(&self.ram, EVENT_DISABLE, 0)?,
        }
        Ok(())
    }

    /// Kicks sent, calls received and sleeps so far.
    pub fn notify_counts(&self) -> NotifyCounts {
        self.notify
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// The device's block size.
    pub fn block_size(&self) -> u32 {
        self.blk_size
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the backend accepts writes.
    pub fn read_only(&self) -> bool {
        self.features & VIRTIO_BLK_F_RO != 0
    }

    /// Number of queues in use.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Free request slots on queue `q`.
    pub fn free_slots(&self, q: usize) -> usize {
        self.queues.get(q).map_or(0, |x| x.free.len())
    }

    /// The data buffer of `slot` on queue `q` (what a read filled, what a write sends).
    pub fn slot_data(&self, q: usize, slot: u16, len: usize) -> Result<Vec<u8>, BlkError> {
        let s = self.queues[q].slots[usize::from(slot)];
        let mut v = vec![0u8; len];
        self.ram.read(s.data, &mut v)?;
        Ok(v)
    }

    /// Queues a request on queue `q` (sent at the next [`BlkDevice::kick`]): `data` is written
    /// into the slot for OUT/DISCARD/WRITE_ZEROES; `len` bytes are read back for IN/GET_ID.
    pub fn submit(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<u16, BlkError> {
        let max = self.max_request;
        let dlen = data.map_or(len, <[u8]>::len);
        let dlen32 = u32::try_from(dlen).map_err(|_| BlkError::TooLarge { len: dlen, max })?;
        if dlen > max {
            return Err(BlkError::TooLarge { len: dlen, max });
        }
        let queue = &mut self.queues[q];
        let slot = queue.free.pop().ok_or_else(|| DriverError::Full { want: 1, free: 0 })?;
        let s = queue.slots[usize::from(slot)];
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(s.header, &hdr)?;
        self.ram.write(s.status, &[0xff])?;
        let mut bufs = vec![Buffer { gpa: s.header, len: 16, writable: false }];
        let device_writes = matches!(kind, req::IN | req::GET_ID);
        if let (Some(d), false) = (data, device_writes) {
            self.ram.write(s.data, d)?;
        }
        if dlen > 0 && matches!(kind, req::OUT | req::DISCARD | req::WRITE_ZEROES | req::IN | req::GET_ID) {
            bufs.push(Buffer { gpa: s.data, len: dlen32, writable: device_writes });
        }
        bufs.push(Buffer { gpa: s.status, len: 1, writable: true });
        // A split ring's index is stored at every add, as Linux's virtio driver does (the kick
        // waits for `kick`): the device starts on this request while the next ones are written.
        // Publishing only at the kick made the device wait for the whole batch, and the two
        // sides took turns (the driver slept once per batch, BENCHMARKS.md); a packed ring's
        // descriptor is visible as soon as it is written.
        let id = match &mut queue.ring {
            Ring::Split(r) if self.publish_at_kick => r.add_indirect(&mut self.ram, &bufs),
            Ring::Split(r) => r.add_indirect(&mut self.ram, &bufs).and_then(|id| r.expose(&self.ram).map(|()| id)),
            Ring::Packed(r) => r.add_indirect(&mut self.ram, &bufs),
        };
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                queue.free.push(slot);
                return Err(e.into());
            }
        };
        queue.by_id[usize::from(id)] = Some(slot);
        queue.pending_kick = true;
        Ok(slot)
    }

    /// Publishes queued requests and notifies the backend if it wants to be.
    pub fn kick(&mut self, q: usize) -> Result<(), BlkError> {
        let queue = &mut self.queues[q];
        if !queue.pending_kick {
            return Ok(());
        }
        queue.pending_kick = false;
        let notify = match &mut queue.ring {
            Ring::Split(r) => r.publish(&self.ram, self.event_idx)?,
            Ring::Packed(r) => r.publish(&self.ram)?,
        };
        if notify {
            queue.kick.write(1)?;
            self.notify.kicks += 1;
        }
        Ok(())
    }

    /// Collects every completion the backend has published on queue `q` (no waiting).
    pub fn poll(&mut self, q: usize, out: &mut Vec<Completion>) -> Result<usize, BlkError> {
        let queue = &mut self.queues[q];
        let mut n = 0;
        loop {
            let used: Option<UsedElem> = match &mut queue.ring {
                Ring::Split(r) => r.pop_used(&self.ram)?,
                Ring::Packed(r) => r.pop_used(&self.ram)?,
            };
            let Some(u) = used else { break };
            let slot = queue.by_id.get_mut(usize::from(u.id)).and_then(Option::take);
            let Some(slot) = slot else {
                return Err(DriverError::BadUsedId { id: u32::from(u.id) }.into());
            };
            let mut st = [0u8; 1];
            self.ram.read(queue.slots[usize::from(slot)].status, &mut st)?;
            queue.free.push(slot);
            out.push(Completion { slot, status: st[0], written: u.len });
            n += 1;
        }
        Ok(n)
    }

    /// Waits up to `timeout` for completions on queue `q` (on its call eventfd).
    pub fn wait(&mut self, q: usize, timeout: Duration, out: &mut Vec<Completion>) -> Result<usize, BlkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.poll(q, out)?;
            if n > 0 {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BlkError::Timeout(timeout));
            }
            // Ask for an interrupt at the next completion, then look once more: a completion
            // that landed in between would otherwise sleep until the timeout.
            self.arm(q)?;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let n = self.poll(q, out)?;
            if n == 0 {
                let t = Instant::now();
                let counted = sleep_on(&[&self.queues[q].call], left)?;
                self.notify.slept_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.notify.sleeps += 1;
                self.notify.calls += counted;
            }
            self.disarm(q)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Runs one request to completion on queue 0 and returns its status and the slot's data.
    pub fn run_sync(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(u8, Vec<u8>), BlkError> {
        self.run_on(0, kind, sector, data, len)
    }

    /// As [`BlkDevice::run_sync`], on queue `q` (other completions that arrive meanwhile are
    /// consumed).
    pub fn run_on(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(u8, Vec<u8>), BlkError> {
        let slot = self.submit(q, kind, sector, data, len)?;
        self.kick(q)?;
        let mut done = Vec::new();
        while !done.iter().any(|c: &Completion| c.slot == slot) {
            self.wait(q, Duration::from_secs(10), &mut done)?;
        }
        let c =
            done.iter().find(|c| c.slot == slot).copied().ok_or_else(|| BlkError::Timeout(Duration::from_secs(10)))?;
        let back = if matches!(kind, req::IN | req::GET_ID) { self.slot_data(q, slot, len)? } else { Vec::new() };
        Ok((c.status, back))
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: usize) -> Result<(u8, Vec<u8>), BlkError> {
        self.run_sync(req::IN, sector, None, len)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8, BlkError> {
        self.run_sync(req::OUT, sector, Some(data), 0).map(|r| r.0)
    }

    /// Flushes the backend's write cache.
    pub fn flush(&mut self) -> Result<u8, BlkError> {
        self.run_sync(req::FLUSH, 0, None, 0).map(|r| r.0)
    }

    /// The device id string (GET_ID), without its trailing NULs.
    pub fn get_id(&mut self) -> Result<(u8, String), BlkError> {
        let (st, bytes) = self.run_sync(req::GET_ID, 0, None, 20)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Ok((st, String::from_utf8_lossy(&bytes[..end]).into_owned()))
    }
}
