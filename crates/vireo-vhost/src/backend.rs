//! One connection's backend state and the handlers of the frontend's messages
//! (`dispatch.rs` decodes them; `server.rs` runs the connection).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};

use vhost::vhost_user::{Error as VuError, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vireo_memory::Mapping;
use vireo_memory::{GuestMemory, GuestPhysAddr, IotlbEntry, Perm, RegionSpec, RetireMode, UserAddr, MAX_REGIONS};
use vireo_queue::{packed_region_size, split_region_size, InflightRegion, Queue, QueueConfig, RingAddrs};

use crate::channel::BackendChannel;
use crate::device::{Device, DeviceRequest};
use crate::device_state::Transfer;
use crate::notify::{adopt_eventfd, LogKick};
use crate::worker::{QueueStart, WorkerPool};
use vireo_wire::features::{
    ACCESS_PLATFORM as VIRTIO_F_ACCESS_PLATFORM, EVENT_IDX as VIRTIO_RING_F_EVENT_IDX, LOG_ALL as VHOST_F_LOG_ALL,
    PROTOCOL_FEATURES as VHOST_USER_F_PROTOCOL_FEATURES, RING_PACKED as VIRTIO_F_RING_PACKED,
};
use vireo_wire::iotlb::{INVALIDATE as IOTLB_INVALIDATE, UPDATE as IOTLB_UPDATE};

type Result<T> = std::result::Result<T, VuError>;
// A small constant (0x40) the bindings type as u32.
#[allow(clippy::cast_possible_truncation)]
const NEEDS_RESET: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;

#[derive(Default)]
struct Ring {
    size: u16,
    /// Frontend user addresses from SET_VRING_ADDR: descriptor, used, available.
    addrs: Option<(u64, u64, u64)>,
    base: u32,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// The frontend asked for no kick fd (the backend polls the ring).
    kick_polled: bool,
    /// The queue is with a worker thread.
    running: bool,
    /// Set by the worker when the driver broke the queue (reported as NEEDS_RESET).
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// The stopped queue, kept so that GET_VRING_BASE can report its position.
    stopped: Option<Queue>,
}

/// One frontend connection's backend state.
pub struct VhostUserBackend {
    device: Arc<dyn Device>,
    memory: GuestMemory,
    features: u64,
    acked_features: u64,
    protocol_features: u64,
    rings: Vec<Ring>,
    /// The files behind the current regions, kept open as long as they are mapped.
    region_files: Vec<(u64, File)>,
    /// Workers busy-poll their rings instead of waiting for kicks.
    poll: bool,
    workers: WorkerPool,
    /// The inflight area (SET_INFLIGHT_FD) and the queue size its regions are laid out for.
    inflight: Option<(Arc<Mapping>, u16)>,
    /// The device status byte (SET_STATUS).
    status: u8,
    /// The backend channel (SET_BACKEND_REQ_FD), shared with the workers.
    channel: Arc<BackendChannel>,
    /// SET_LOG_FD's eventfd, shared with the workers.
    log_kick: Arc<LogKick>,
    /// A DEVICE_STATE transfer in progress: the thread that writes or reads the state, and its
    /// verdict (CHECK_DEVICE_STATE).
    transfer: Option<Transfer>,
    /// IOTLB updates and invalidations received (reported when the connection ends).
    iotlb_updates: u64,
    iotlb_invalidations: u64,
}

impl std::fmt::Debug for VhostUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBackend").field("rings", &self.rings.len()).finish()
    }
}

fn invalid(what: &'static str) -> VuError {
    tracing::warn!(what, "vhost-user request refused");
    VuError::InvalidOperation(what)
}

impl VhostUserBackend {
    /// Backend state for a new connection to `device`: with `poll`, queue workers busy-poll; at
    /// most `threads` worker threads (queue group `g` on thread `g % threads`), which poll for
    /// up to `poll_max` after work before they sleep.
    pub fn new(device: Arc<dyn Device>, poll: bool, threads: usize, poll_max: Duration) -> Self {
        let features = device.features() | vireo_wire::features::TRANSPORT;
        let rings = (0..device.num_queues()).map(|_| Ring::default()).collect();
        let group_size = device.group_size();
        Self {
            device,
            memory: GuestMemory::new(RetireMode::from_env()),
            features,
            acked_features: 0,
            protocol_features: 0,
            rings,
            region_files: Vec::new(),
            poll,
            workers: WorkerPool::new(threads, group_size, poll_max),
            inflight: None,
            status: 0,
            channel: Arc::new(BackendChannel::new()),
            log_kick: Arc::default(),
            iotlb_updates: 0,
            iotlb_invalidations: 0,
            transfer: None,
        }
    }

    /// Whether the driver's addresses go through an IOTLB (VIRTIO_F_ACCESS_PLATFORM).
    fn iotlb(&self) -> bool {
        self.acked_features & VIRTIO_F_ACCESS_PLATFORM != 0
    }

    /// IOTLB_MSG: an update or an invalidation (`kind` 2 or 3). An invalidation returns only when
    /// no worker and no I/O in flight uses the range (the reply is the barrier).
    pub fn iotlb_msg(&mut self, iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> Result<()> {
        if !self.iotlb() {
            return Err(invalid("IOTLB message without VIRTIO_F_ACCESS_PLATFORM"));
        }
        match kind {
            IOTLB_UPDATE => {
                let perm = Perm::from_bits(perm).ok_or_else(|| invalid("IOTLB update without access rights"))?;
                self.memory.iotlb_update(IotlbEntry { iova, size, uaddr, perm }).map_err(|e| {
                    tracing::warn!(error = %e, "IOTLB update refused");
                    VuError::InvalidParam
                })?;
                // Queues parked on a miss look again.
                self.workers.wake_all();
                self.iotlb_updates += 1;
                Ok(())
            }
            IOTLB_INVALIDATE => {
                self.memory.iotlb_invalidate(iova, size).map_err(|e| {
                    tracing::warn!(error = %e, "IOTLB invalidation refused");
                    VuError::InvalidParam
                })?;
                self.iotlb_invalidations += 1;
                Ok(())
            }
            _ => Err(invalid("IOTLB message type other than update or invalidate")),
        }
    }

    /// SET_LOG_FD: an eventfd kicked whenever a queue has set bits in the dirty log.
    pub fn set_log_fd(&mut self, fd: File) -> Result<()> {
        adopt_eventfd(&fd).map_err(|e| {
            tracing::warn!(error = %e, "SET_LOG_FD refused");
            VuError::InvalidParam
        })?;
        tracing::debug!("dirty log eventfd set");
        self.log_kick.set(Some(fd));
        Ok(())
    }

    /// A request for the device itself (SEND_RARP, NET_SET_MTU), when it offers the protocol
    /// feature that carries it.
    pub fn device_request(&mut self, request: DeviceRequest) -> Result<()> {
        let needs = match request {
            DeviceRequest::SendRarp(_) => VhostUserProtocolFeatures::RARP,
            DeviceRequest::SetMtu(_) => VhostUserProtocolFeatures::MTU,
        };
        if self.protocol_features & needs.bits() == 0 {
            return Err(invalid("device request whose protocol feature was not negotiated"));
        }
        self.device.request(request).map_err(|why| {
            tracing::warn!(?request, why, "device request refused");
            VuError::InvalidParam
        })
    }

    /// SET_BACKEND_REQ_FD.
    pub fn set_backend_req_fd(&mut self, sock: UnixStream) {
        tracing::debug!("backend channel set");
        self.channel.set(Some(sock));
    }

    /// Checks a kick, call or err descriptor (an eventfd, made non-blocking) before it is kept.
    fn adopt(fd: Option<&File>, what: &'static str) -> Result<()> {
        match fd.map(adopt_eventfd) {
            Some(Err(e)) => {
                tracing::warn!(what, error = %e, "vring descriptor refused");
                Err(VuError::InvalidParam)
            }
            _ => Ok(()),
        }
    }

    fn ring(&mut self, index: u32) -> Result<&mut Ring> {
        self.rings.get_mut(index as usize).ok_or_else(|| invalid("queue index out of range"))
    }

    /// Stops ring `index` if it runs (an index out of range is nothing to stop).
    fn stop(&mut self, index: usize) {
        let Some(r) = self.rings.get_mut(index) else { return };
        if std::mem::take(&mut r.running) {
            r.stopped = self.workers.stop(index);
            if r.stopped.is_none() {
                // Its worker thread is gone: the ring's position is unknown.
                tracing::error!(queue = index, "worker thread lost; the queue needs a reset");
                r.broken.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Starts ring `index` if everything it needs is there: memory, size, addresses, a kick fd,
    /// and (with VHOST_USER_F_PROTOCOL_FEATURES) SET_VRING_ENABLE.
    fn maybe_start(&mut self, index: usize) -> Result<()> {
        let protocol = self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let Some(r) = self.rings.get(index) else { return Err(invalid("queue index out of range")) };
        let has_kick = r.kick.is_some() || r.kick_polled;
        if r.running || r.size == 0 || r.addrs.is_none() || !has_kick || (protocol && !r.enabled) {
            return Ok(());
        }
        let Some((desc, used, avail)) = r.addrs else { return Ok(()) };
        let map = self.memory.map();
        let iotlb = self.iotlb();
        let gpa = |u: u64| {
            if iotlb {
                // Behind a vIOMMU the ring addresses are IOVAs, translated by the IOTLB.
                return Ok(GuestPhysAddr::new(u));
            }
            map.user_to_gpa(UserAddr::new(u)).map_err(|_| invalid("ring address not in guest memory"))
        };
        let packed = self.acked_features & VIRTIO_F_RING_PACKED != 0;
        let addrs = if packed {
            RingAddrs::Packed { desc: gpa(desc)?, driver: gpa(avail)?, device: gpa(used)? }
        } else {
            RingAddrs::Split { desc: gpa(desc)?, avail: gpa(avail)?, used: gpa(used)? }
        };
        // Ring writes are logged at the guest physical pages they land on (`vireo-queue`), not
        // at the frontend's `log_guest_addr`, which for a packed ring names the device area.
        let cfg = QueueConfig { size: r.size, addrs, event_idx: self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0 };
        let mut queue = Queue::new(self.memory.register_queue(), cfg).map_err(|e| {
            tracing::warn!(queue = index, error = %e, "ring refused");
            VuError::InvalidParam
        })?;
        queue.set_vring_base(r.base).map_err(|_| VuError::InvalidParam)?;
        queue.set_in_order(self.acked_features & vireo_wire::features::IN_ORDER != 0);
        if let Some((area, queue_size)) = self.inflight.as_ref() {
            if r.size > *queue_size {
                return Err(invalid("ring larger than the inflight area's queue size"));
            }
            let len = self.inflight_region_size(*queue_size);
            let region = usize::try_from(len * index as u64)
                .ok()
                .zip(usize::try_from(len).ok())
                .and_then(|(off, len)| InflightRegion::new(area.clone(), off, len).ok())
                .ok_or_else(|| invalid("inflight area too small for this queue"))?;
            queue.set_inflight(region, self.acked_features).map_err(|e| {
                tracing::warn!(queue = index, error = %e, "inflight tracking refused");
                VuError::InvalidParam
            })?;
        }
        let kick = match &r.kick {
            Some(k) => Some(k.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        let call = r.call.as_ref().and_then(|c| c.try_clone().ok());
        let broken = r.broken.clone();
        broken.store(false, std::sync::atomic::Ordering::Relaxed);
        let start = QueueStart {
            index,
            queue,
            kick,
            call,
            device: self.device.clone(),
            features: self.acked_features,
            poll: self.poll,
            broken,
            channel: self.channel.clone(),
            log_kick: self.log_kick.clone(),
        };
        self.workers.start(start).map_err(VuError::ReqHandlerError)?;
        self.rings[index].running = true;
        self.rings[index].stopped = None;
        tracing::debug!(queue = index, "queue started");
        Ok(())
    }

    /// One queue's part of the inflight area, in the layout of the negotiated ring kind (the
    /// features are set before the frontend asks for the area).
    fn inflight_region_size(&self, queue_size: u16) -> u64 {
        if self.acked_features & VIRTIO_F_RING_PACKED != 0 {
            packed_region_size(queue_size)
        } else {
            split_region_size(queue_size)
        }
    }

    /// Whether the frontend shrank a file it handed over (guest memory, the dirty log, the
    /// inflight area) and an access faulted past its new end: the connection must end (the
    /// fault itself was absorbed; see `vireo_memory`'s `sigbus.rs`).
    pub fn poisoned(&self) -> bool {
        self.memory.poisoned() || self.inflight.as_ref().is_some_and(|(m, _)| m.poisoned())
    }

    /// The protocol features the frontend acknowledged.
    pub fn acked_protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// SET_STATUS: the driver's view of the device status. Rings are stopped and reset by
    /// their own messages (QEMU writes 0 after GET_VRING_BASE), so only the value is kept.
    pub fn set_status(&mut self, status: u64) -> Result<()> {
        // NEEDS_RESET is the device's to report, not the driver's to set (QEMU ORs back what
        // GET_STATUS said).
        self.status = u8::try_from(status).map_err(|_| invalid("status beyond 8 bits"))? & !NEEDS_RESET;
        tracing::debug!(status = self.status, "device status");
        Ok(())
    }

    /// GET_STATUS: the status last set, with VIRTIO_CONFIG_S_NEEDS_RESET when a queue broke.
    pub fn status(&self) -> u64 {
        let needs_reset = self.rings.iter().any(|r| r.broken.load(std::sync::atomic::Ordering::Relaxed));
        let bit = if needs_reset { NEEDS_RESET } else { 0 };
        u64::from(self.status | bit)
    }

    /// Stops every worker (the connection is going away).
    pub fn shutdown(&mut self) {
        for i in 0..self.rings.len() {
            self.stop(i);
        }
        // A device state transfer the frontend never checked: cancelled and joined.
        self.transfer = None;
        if self.iotlb_updates + self.iotlb_invalidations > 0 {
            tracing::info!(
                updates = self.iotlb_updates,
                invalidations = self.iotlb_invalidations,
                misses = self.channel.misses_sent(),
                "vIOMMU IOTLB traffic on this connection"
            );
        }
    }

    fn specs<'f>(regions: &[VhostUserMemoryRegion], files: &'f [File]) -> Vec<RegionSpec<'f>> {
        regions
            .iter()
            .zip(files)
            .map(|(r, f)| RegionSpec {
                gpa: GuestPhysAddr::new(r.guest_phys_addr),
                size: r.memory_size,
                user_addr: UserAddr::new(r.user_addr),
                fd: f.as_fd(),
                fd_offset: r.mmap_offset,
            })
            .collect()
    }
}

impl Drop for VhostUserBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VhostUserBackendReqHandlerMut for VhostUserBackend {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> Result<()> {
        self.shutdown();
        for r in &mut self.rings {
            *r = Ring::default();
        }
        self.acked_features = 0;
        self.memory.set_iotlb_enabled(false);
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.features)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.features != 0 {
            return Err(invalid("features not offered"));
        }
        let access_platform = features & VIRTIO_F_ACCESS_PLATFORM != 0;
        if access_platform != self.iotlb() && self.rings.iter().any(|r| r.running) {
            // Ring addresses were taken as one kind of address when the rings started.
            return Err(invalid("VIRTIO_F_ACCESS_PLATFORM changed while rings run"));
        }
        if access_platform && self.protocol_features & VhostUserProtocolFeatures::BACKEND_REQ.bits() == 0 {
            // Misses could not be asked for.
            return Err(invalid("VIRTIO_F_ACCESS_PLATFORM without the backend channel"));
        }
        tracing::debug!(features = format_args!("{features:#x}"), "features acknowledged");
        if (features ^ self.acked_features) & VHOST_F_LOG_ALL != 0 {
            tracing::info!(on = features & VHOST_F_LOG_ALL != 0, "dirty logging (VHOST_F_LOG_ALL)");
        }
        self.acked_features = features;
        // VHOST_F_LOG_ALL both ways: on waits for running batches (GuestMemory::set_logging).
        self.memory.set_logging(features & VHOST_F_LOG_ALL != 0);
        self.memory.set_iotlb_enabled(access_platform);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(VuError::InvalidParam);
        }
        // Returns only when no worker can touch the old regions (the reply is the barrier).
        self.memory.set_regions(&Self::specs(ctx, &files)).map_err(|e| {
            tracing::warn!(error = %e, "memory table refused");
            VuError::InvalidParam
        })?;
        self.region_files = ctx.iter().map(|r| r.guest_phys_addr).zip(files).collect();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = self.device.max_queue_size();
        let size = u16::try_from(num).ok().filter(|&n| n > 0 && n <= max).ok_or(VuError::InvalidParam)?;
        self.ring(index)?;
        self.stop(index as usize);
        self.ring(index)?.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> Result<()> {
        let running = self.ring(index)?.running;
        self.stop(index as usize);
        let r = self.ring(index)?;
        r.addrs = Some((descriptor, used, available));
        // VHOST_VRING_F_LOG and `log` (log_guest_addr) are not needed: every ring write is logged
        // at the page it lands on, which the backend knows better than this address (for a
        // packed ring QEMU names the device area here).
        let _ = (flags, log);
        if running {
            // Carry on from where the stopped worker was.
            if let Some(q) = r.stopped.take() {
                r.base = q.vring_base();
            }
            self.maybe_start(index as usize)?;
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.ring(index)?;
        self.stop(index as usize);
        let r = self.ring(index)?;
        r.base = base;
        r.stopped = None;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.ring(index)?;
        self.stop(index as usize);
        let r = &mut self.rings[index as usize];
        r.enabled = false;
        r.kick = None;
        let value = match r.stopped.take() {
            Some(q) => q.vring_base(),
            None => r.base,
        };
        r.base = value;
        Ok(VhostUserVringState::new(index, value))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.ring(u32::from(index))?;
        Self::adopt(fd.as_ref(), "kick")?;
        let running = self.rings[usize::from(index)].running;
        self.stop(usize::from(index));
        let r = &mut self.rings[usize::from(index)];
        if running {
            if let Some(q) = r.stopped.take() {
                r.base = q.vring_base();
            }
        }
        // No fd (VHOST_USER_VRING_NOFD_MASK): the frontend will not kick; the backend polls.
        r.kick_polled = fd.is_none();
        r.kick = fd;
        self.maybe_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let running = self.ring(u32::from(index))?.running;
        Self::adopt(fd.as_ref(), "call")?;
        self.stop(usize::from(index));
        let r = self.ring(u32::from(index))?;
        r.call = fd;
        if running {
            if let Some(q) = r.stopped.take() {
                r.base = q.vring_base();
            }
            self.maybe_start(usize::from(index))?;
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.ring(u32::from(index))?;
        // Not signalled (a broken queue is reported through NEEDS_RESET), but checked like the
        // others: what a frontend hands over is either an eventfd or refused.
        Self::adopt(fd.as_ref(), "err")
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        if features & !self.device.protocol_features().bits() != 0 {
            return Err(invalid("protocol features not offered"));
        }
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.ring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop(index as usize);
            let r = &mut self.rings[index as usize];
            if let Some(q) = r.stopped.take() {
                r.base = q.vring_base();
            }
            Ok(())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        let cfg = self.device.config();
        let start = offset as usize;
        let end = start.checked_add(size as usize).ok_or(VuError::InvalidParam)?;
        let mut out = vec![0u8; size as usize];
        if start < cfg.len() {
            let n = end.min(cfg.len()) - start;
            out[..n].copy_from_slice(&cfg[start..start + n]);
        }
        Ok(out)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        Err(invalid("the configuration space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(invalid("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if usize::from(inflight.num_queues) > self.rings.len()
            || inflight.queue_size == 0
            || inflight.queue_size > self.device.max_queue_size()
        {
            return Err(invalid("inflight area for more or larger queues than the device has"));
        }
        // Zeroed memory: every queue region starts "fresh" (version 0), nothing in flight.
        let size = self.inflight_region_size(inflight.queue_size) * u64::from(inflight.num_queues);
        let fd = vireo_memory::memfd("vireo-inflight", size).map_err(VuError::ReqHandlerError)?;
        tracing::info!(queues = inflight.num_queues, queue_size = inflight.queue_size, size, "inflight area created");
        Ok((VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size), File::from(fd)))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let need = self.inflight_region_size(inflight.queue_size) * u64::from(inflight.num_queues);
        if inflight.mmap_size < need || inflight.queue_size == 0 {
            return Err(invalid("inflight area smaller than its queues need"));
        }
        let map = Mapping::from_fd(file.as_fd(), inflight.mmap_offset, inflight.mmap_size).map_err(|e| {
            tracing::warn!(error = %e, "inflight area does not map");
            VuError::InvalidParam
        })?;
        tracing::info!(queues = inflight.num_queues, queue_size = inflight.queue_size, "inflight area set");
        self.inflight = Some((Arc::new(map), inflight.queue_size));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let spec = RegionSpec {
            gpa: GuestPhysAddr::new(region.guest_phys_addr),
            size: region.memory_size,
            user_addr: UserAddr::new(region.user_addr),
            fd: fd.as_fd(),
            fd_offset: region.mmap_offset,
        };
        self.memory.add_region(&spec).map_err(|e| {
            tracing::warn!(error = %e, "region refused");
            VuError::InvalidParam
        })?;
        self.region_files.push((region.guest_phys_addr, fd));
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        self.memory
            .remove_region(
                GuestPhysAddr::new(region.guest_phys_addr),
                region.memory_size,
                UserAddr::new(region.user_addr),
            )
            .map_err(|e| {
                tracing::warn!(error = %e, "region removal refused");
                VuError::InvalidParam
            })?;
        // The region is unmapped; its file goes too (one open descriptor per removed region
        // would otherwise pile up until the next SET_MEM_TABLE).
        self.region_files.retain(|(gpa, _)| *gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(invalid("device state transfer in a phase other than stopped"));
        }
        if self.rings.iter().any(|r| r.running) {
            return Err(invalid("device state transfer while a ring runs"));
        }
        // An earlier transfer nobody checked is cancelled (and joined) here.
        self.transfer = None;
        let device = self.device.clone();
        let transfer = match direction {
            VhostTransferStateDirection::SAVE => Transfer::save(fd, device.save_state()),
            VhostTransferStateDirection::LOAD => Transfer::load(fd, move |state| device.load_state(state)),
        }
        .map_err(VuError::ReqHandlerError)?;
        tracing::info!(?direction, "device state transfer started");
        self.transfer = Some(transfer);
        Ok(None)
    }

    fn check_device_state(&mut self) -> Result<()> {
        let t = self.transfer.take().ok_or_else(|| invalid("no device state transfer to check"))?;
        t.finish().map_err(|why| {
            tracing::warn!(why, "device state transfer failed");
            VuError::InvalidParam
        })
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        tracing::info!(size = log.mmap_size, offset = log.mmap_offset, "new dirty log");
        // Returns only when no worker can write the old log any more.
        self.memory.set_dirty_log(file.as_fd(), log.mmap_offset, log.mmap_size).map_err(|e| {
            tracing::warn!(error = %e, "dirty log refused");
            VuError::InvalidParam
        })
    }
}
