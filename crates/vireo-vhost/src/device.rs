//! The device seam: what a device implements to be served by the backend.
//!
//! # The contract
//!
//! A [`Device`] says what it offers (feature bits, protocol features, configuration space, how
//! many queues) and, when the frontend starts a *group* of its queues, hands the backend a
//! [`QueueHandler`] for that group ([`Device::activate`], with the features the driver
//! acknowledged). A group is a run of consecutive queues served together, by one handler, on one
//! worker thread: one queue for a block device, a receive/transmit pair (and its tap queue) for a
//! network device.
//!
//! The worker thread owns the group's started queues ([`Ring`]) and drives the handler:
//!
//! * it polls the kick eventfds of the group's queues (and reads them: a kick is only "look
//!   again"), and the handler's own descriptors with the interest the handler declares
//!   ([`QueueHandler::interest`]: readable, writable or both; the worker never reads or writes
//!   them);
//! * it calls [`QueueHandler::run`] when a kick came, a declared descriptor is ready, the handler
//!   asked to run again ([`Progress::again`]), a queue is busy-polled, or the worker spins after
//!   work ([`Events::spin`]: keep notifications off and make one round);
//! * the handler does its work in batches on the rings it chooses ([`Ring::process`],
//!   [`Ring::serve`]): the batch is a reader of the invalidation protocol, the only place guest
//!   memory is touched, and it is bounded (`vireo_queue::Queue::set_batch_limit`), so a handler
//!   that pops in a loop still lets every invalidation in between batches;
//! * before a queue leaves the group (GET_VRING_BASE, a ring moved, the connection ends) the
//!   worker calls [`QueueHandler::stop`]: the handler completes or gives back everything of that
//!   queue, so that the position the frontend reads has nothing outstanding; when a queue breaks
//!   (the driver wrote something a device must refuse) it calls [`QueueHandler::broken`].
//!
//! What a handler must not do, because the protocol's guarantees rest on it:
//!
//! * hold a guest pointer outside a batch, except behind an `IoPin` (an I/O the kernel still
//!   performs; the invalidation that retires its region waits for the pin). A chain the handler
//!   cannot serve now (no packet for a receive buffer, a full port) is given back with
//!   `QueueBatch::rewind`, not held: "the reply is the barrier" must never become "the reply
//!   waits for the network";
//! * block on anything the frontend or the guest controls: its descriptors are non-blocking and
//!   polled by the worker.
//!
//! # Why the line is here
//!
//! rust-vmm's vhost-user-backend gives each device a `handle_event` over its queues' kicks and
//! lets it pick `queues_per_thread`; Firecracker activates a device with its negotiated features
//! and gives it its own event handler. Vireo takes both: groups with a handler activated with the
//! acknowledged features, driven by events the handler declares. What stays in the backend is
//! what every device must get right the same way: the batch and its bound, kicks and interrupts
//! (EVENT_IDX), IOTLB misses (a queue parked without blocking), broken queues, busy polling and
//! the spin window, stopping. What a device decides is when to pop, what to do with a chain, and
//! what else to wait for.

use std::os::fd::BorrowedFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

pub use crate::ring::{publish, Call, Pass, Ring, ServeResult};

/// The protocol features a device gets unless it says otherwise.
pub const DEFAULT_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::STATUS)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::DEVICE_STATE)
    .union(VhostUserProtocolFeatures::RESET_DEVICE);

/// A virtio device served over vhost-user.
pub trait Device: Send + Sync + 'static {
    /// Device-specific virtio feature bits offered (transport bits are added by the backend).
    fn features(&self) -> u64;
    /// The vhost-user protocol features the device supports (the backend offers these).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DEFAULT_PROTOCOL_FEATURES
    }
    /// The device configuration space (GET_CONFIG).
    fn config(&self) -> Vec<u8>;
    /// How many queues the device has.
    fn num_queues(&self) -> usize;
    /// The largest queue size it accepts.
    fn max_queue_size(&self) -> u16;
    /// How many consecutive queues form a group (served by one handler on one thread).
    fn group_size(&self) -> usize {
        1
    }
    /// A handler for group `group` (queues `group * group_size()..`), with the virtio features
    /// the driver acknowledged. Called when the first queue of the group starts; the handler is
    /// dropped when the last one stops. An error leaves the queue broken (NEEDS_RESET).
    fn activate(&self, group: usize, features: u64) -> std::io::Result<Box<dyn QueueHandler>>;
    /// The device's state for a migration (vhost-user DEVICE_STATE), saved on the source with
    /// every ring stopped; what the destination's [`Device::load_state`] takes. The default is
    /// no state.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes a source's state on the destination: an error fails the migration through
    /// CHECK_DEVICE_STATE before the guest runs here. The default takes only an empty state.
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes of device state for a device that has none", state.len()))
        }
    }
    /// A request from the frontend for the device itself (SEND_RARP, NET_SET_MTU), on the
    /// connection's thread. The default refuses it.
    fn request(&self, request: DeviceRequest) -> Result<(), String> {
        Err(format!("{request:?} is not supported by this device"))
    }
}

/// Requests the frontend sends for the device rather than for a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// SEND_RARP: announce the guest's MAC on the backend's port (after a migration, for a guest
    /// that cannot announce itself).
    SendRarp([u8; 6]),
    /// NET_SET_MTU: the MTU the driver set.
    SetMtu(u16),
}

/// A descriptor a handler wants the worker to poll, and for what.
#[derive(Clone, Copy, Debug)]
pub struct Interest<'a> {
    /// The descriptor (the handler's own; the worker only polls it).
    pub fd: BorrowedFd<'a>,
    /// Wake when it is readable.
    pub read: bool,
    /// Wake when it is writable.
    pub write: bool,
}

impl<'a> Interest<'a> {
    /// Readable only.
    pub fn read(fd: BorrowedFd<'a>) -> Self {
        Self { fd, read: true, write: false }
    }
}

/// What woke the handler: which of the descriptors it declared are ready, and whether the
/// worker is spinning.
#[derive(Debug, Default)]
pub struct Events {
    /// Per declared descriptor, in `interest` order: (readable, writable), or error/hang-up
    /// (reported as both, so that the handler's read or write finds out).
    ready: Vec<(bool, bool)>,
    spin: bool,
}

impl Events {
    pub(crate) fn new(spin: bool) -> Self {
        Self { ready: Vec::new(), spin }
    }

    pub(crate) fn reset(&mut self, n: usize, spin: bool) {
        self.ready.clear();
        self.ready.resize(n, (false, false));
        self.spin = spin;
    }

    pub(crate) fn set(&mut self, i: usize, read: bool, write: bool) {
        if let Some(r) = self.ready.get_mut(i) {
            r.0 |= read;
            r.1 |= write;
        }
    }

    /// Whether declared descriptor `i` is readable.
    pub fn readable(&self, i: usize) -> bool {
        self.ready.get(i).is_some_and(|r| r.0)
    }

    /// Whether declared descriptor `i` is writable.
    pub fn writable(&self, i: usize) -> bool {
        self.ready.get(i).is_some_and(|r| r.1)
    }

    /// The worker is polling (busy-poll mode, or the spin window after work): leave notifications
    /// off, make one round, and return; it calls again.
    pub fn spin(&self) -> bool {
        self.spin
    }
}

/// What a call to [`QueueHandler::run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Work was done (chains taken or completed, frames moved).
    pub worked: bool,
    /// Work is left that needs no event to start: call again soon (the thread's other groups and
    /// commands go first).
    pub again: bool,
}

impl std::ops::BitOrAssign for Progress {
    fn bitor_assign(&mut self, o: Self) {
        self.worked |= o.worked;
        self.again |= o.again;
    }
}

/// The started queues of a group, as a handler sees them: `get(i)` is the group's `i`-th queue,
/// `None` while it is not started.
pub struct Queues<'a> {
    pub(crate) rings: &'a mut [Option<Ring>],
}

impl Queues<'_> {
    /// The group's `i`-th queue, if it runs.
    pub fn get(&mut self, i: usize) -> Option<&mut Ring> {
        self.rings.get_mut(i).and_then(Option::as_mut)
    }

    /// Two of the group's queues at once (a receive and a transmit queue), each if it runs.
    pub fn pair(&mut self, a: usize, b: usize) -> (Option<&mut Ring>, Option<&mut Ring>) {
        assert_ne!(a, b, "two different queues");
        let (lo, hi) = (a.min(b), a.max(b));
        if hi >= self.rings.len() {
            return (None, None);
        }
        let (left, right) = self.rings.split_at_mut(hi);
        let (x, y) = (left[lo].as_mut(), right[0].as_mut());
        if a < b {
            (x, y)
        } else {
            (y, x)
        }
    }

    /// How many queues the group has (started or not).
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// Whether the group has no queues.
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}

/// Serves one group of a device's queues on its worker thread (see the module doc for the
/// contract).
pub trait QueueHandler: Send {
    /// The descriptors to poll besides the kicks, with their interest; asked before every sleep,
    /// so the interest may change from one to the next (a receive path waits for its port only
    /// while it has buffers, a transmit path for room only while it holds frames back).
    fn interest<'a>(&'a self, out: &mut Vec<Interest<'a>>) {
        let _ = out;
    }
    /// Does the group's work (see [`Events`] for why it was called).
    fn run(&mut self, queues: &mut Queues<'_>, events: &Events) -> Progress;
    /// Queue `queue` (its index in the group) is about to leave: complete everything of it in
    /// flight, and give back what was taken and not started. May block, for I/O the kernel has.
    fn stop(&mut self, queues: &mut Queues<'_>, queue: usize) {
        let _ = (queues, queue);
    }
    /// Queue `queue` broke (nothing more is written to it): drop what is held of it without
    /// touching guest memory; I/O the kernel still performs keeps its pins until it is done.
    fn broken(&mut self, queue: usize) {
        let _ = queue;
    }
}
