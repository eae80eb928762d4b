//! Vireo's virtio-net device (virtio 1.2 5.1), served through `vireo-vhost`.
//!
//! The device has `queue_pairs` receive/transmit pairs (queues `2k` and `2k + 1`); each pair is
//! one group on the device seam, served by a [`pair::Pair`] handler on one worker thread. The
//! control queue stays with the frontend (QEMU and DPDK both keep it). What is on the other side
//! of the device ([`Port`]):
//!
//! * a kernel tap (`tap.rs`): one tap queue per pair; frames move between the guest's buffers and
//!   the tap with `readv`/`writev` straight on the chains, the virtio-net header as the guest
//!   wrote it (the tap's header length and offloads are set from the negotiated features);
//! * a sink, a source and a loopback, for measurements and tests: the sink reads every byte of
//!   every frame the guest sends, the source writes frames into every receive buffer the guest
//!   posts, the loopback sends every frame back with its MAC addresses swapped.
//!
//! # Invariants, and where each is enforced
//!
//! * **A buffer waiting for a frame is not held** (`pair.rs`): receive chains are popped only
//!   when a frame is there to put in them (or is being read into them, within the batch), and
//!   given back with `rewind` otherwise; a transmit chain the port cannot take now is given back
//!   the same way. So a memory-table change never waits for traffic.
//! * **What the guest writes is checked before the port sees it** (`header.rs`): a transmit
//!   chain shorter than the header, a runt or over-long frame, or a header asking for an offload
//!   the driver did not negotiate is dropped and counted; the queue goes on.
//! * **Every receive buffer written is logged** while dirty logging is on, before the used
//!   element that exposes it (`pair.rs`, through `Batch::log_write`; `complete_singles` on the
//!   source's fast path).
//! * **Nothing blocks a worker**: the tap is non-blocking and polled (readable while the
//!   receive ring has buffers, writable while a frame waits for room).

#![warn(missing_docs)]

pub mod frames;
pub mod header;
mod pair;
pub mod tap;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use vireo_vhost::{Device, DeviceRequest, QueueHandler, VhostUserProtocolFeatures};
use vireo_wire::features::net as f;

pub use frames::Mac;
pub use tap::{Tap, TapError};

/// What is on the other side of the device.
#[derive(Debug)]
pub enum Port {
    /// A kernel tap, one tap queue per queue pair.
    Tap(Arc<Tap>),
    /// Consumes every frame the guest sends (reading each byte) and drops it.
    Sink,
    /// Fills every receive buffer the guest posts with a frame of this many bytes.
    Source {
        /// Frame length without the virtio-net header (60 for "64-byte" frames: the FCS is
        /// not carried).
        frame_len: usize,
    },
    /// Sends every frame back to the guest with its MAC addresses swapped.
    Loopback,
}

/// Device options.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Receive/transmit queue pairs offered.
    pub queue_pairs: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// The guest's MAC (configuration space, VIRTIO_NET_F_MAC), where the source sends to
    /// (broadcast without one).
    pub mac: Option<Mac>,
    /// The MTU offered (VIRTIO_NET_F_MTU and NET_SET_MTU), or 1500 not offered.
    pub mtu: Option<u16>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { queue_pairs: 1, queue_size: 1024, mac: None, mtu: None }
    }
}

/// One queue's counters, readable while the device runs ([`Stats`]).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Frames moved (received into the guest, or sent by it).
    pub frames: AtomicU64,
    /// Their bytes, without the virtio-net header.
    pub bytes: AtomicU64,
    /// Frames dropped: no room in the guest's buffers, a truncated read, a full port.
    pub drops: AtomicU64,
    /// What the guest got wrong: chains shorter than the header, headers with offloads not
    /// negotiated, runt or over-long frames, receive chains with no writable buffer.
    pub errors: AtomicU64,
    /// The sink's checksum: the sum of every byte of every frame consumed.
    pub checksum: AtomicU64,
    /// The queue broke (the guest wrote something no device may accept; NEEDS_RESET).
    pub broken: AtomicBool,
}

/// Every queue's counters.
#[derive(Debug)]
pub struct Stats {
    queues: Vec<QueueCounters>,
}

impl Stats {
    fn new(n: usize) -> Self {
        Self { queues: (0..n).map(|_| QueueCounters::default()).collect() }
    }

    /// Queue `i`'s counters.
    pub fn queue(&self, i: usize) -> Option<&QueueCounters> {
        self.queues.get(i)
    }

    /// The counters as JSON: `{"queues": [{"queue": 0, "kind": "rx", "frames": ..}, ..]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                serde_json::json!({
                    "queue": i,
                    "kind": if i % 2 == 0 { "rx" } else { "tx" },
                    "frames": q.frames.load(Relaxed),
                    "bytes": q.bytes.load(Relaxed),
                    "drops": q.drops.load(Relaxed),
                    "errors": q.errors.load(Relaxed),
                    "checksum": q.checksum.load(Relaxed),
                    "broken": q.broken.load(Relaxed),
                })
            })
            .collect();
        serde_json::json!({ "queues": queues })
    }
}

/// The virtio-net device.
#[derive(Debug)]
pub struct NetDevice {
    cfg: NetConfig,
    port: Port,
    stats: Arc<Stats>,
    /// The MTU the driver set (NET_SET_MTU), or the one offered.
    mtu: AtomicU16,
}

impl NetDevice {
    /// A device with `cfg` in front of `port`.
    pub fn new(port: Port, cfg: NetConfig) -> Self {
        let stats = Arc::new(Stats::new(2 * usize::from(cfg.queue_pairs.max(1))));
        let mtu = AtomicU16::new(cfg.mtu.unwrap_or(1500));
        Self { cfg, port, stats, mtu }
    }

    /// The counters, shared: read them while the device runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl Device for NetDevice {
    fn features(&self) -> u64 {
        // IN_ORDER: every port completes chains in the order it takes them (none is held while
        // another is completed; one given back is taken again before those after it), which lets
        // a driver reclaim by index alone (DPDK's in-order paths).
        let mut bits = f::MRG_RXBUF | f::STATUS | vireo_wire::features::IN_ORDER;
        if self.cfg.queue_pairs > 1 {
            bits |= f::MQ;
        }
        if self.cfg.mac.is_some() {
            bits |= f::MAC;
        }
        if self.cfg.mtu.is_some() {
            bits |= f::MTU;
        }
        bits |= match &self.port {
            // The guest announces itself after a migration when it can (QEMU then sends no
            // SEND_RARP); the offloads are the tap's.
            Port::Tap(tap) => tap.features() | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE),
            // The sink takes whatever the guest sends: checksum and segmentation offloads are
            // only counted bytes to it.
            Port::Sink => f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN | f::HOST_UFO | f::HOST_USO,
            // The source writes whole frames with valid checksums; the loopback sends back what
            // it got, which must then be what the guest can take: plain frames only.
            Port::Source { .. } | Port::Loopback => 0,
        };
        bits
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        type P = VhostUserProtocolFeatures;
        // No INFLIGHT_SHMFD (receive chains are given back unconsumed, which an inflight record
        // cannot express; QEMU does not use it for net), no DEVICE_STATE (a net device has no
        // state to carry), no CONFIG (QEMU serves the configuration space of a net device).
        let mut p =
            P::MQ | P::REPLY_ACK | P::LOG_SHMFD | P::CONFIGURE_MEM_SLOTS | P::STATUS | P::BACKEND_REQ | P::RESET_DEVICE;
        if matches!(self.port, Port::Tap(_)) {
            p |= P::RARP;
        }
        if self.cfg.mtu.is_some() {
            p |= P::MTU;
        }
        p
    }

    /// mac (6), status (2: link up), max_virtqueue_pairs (2), mtu (2).
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.cfg.mac.unwrap_or([0; 6]));
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&self.cfg.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.load(Relaxed).to_le_bytes());
        c
    }

    fn num_queues(&self) -> usize {
        2 * usize::from(self.cfg.queue_pairs.max(1))
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn group_size(&self) -> usize {
        2
    }

    fn activate(&self, pair: usize, features: u64) -> std::io::Result<Box<dyn QueueHandler>> {
        let mtu = self.mtu.load(Relaxed);
        let port = match &self.port {
            Port::Tap(tap) => {
                let hdr_len = header::header_len(features);
                tap.activate(pair, hdr_len, features).map_err(std::io::Error::other)?;
                pair::PortQueue::Tap(tap.clone())
            }
            Port::Sink => pair::PortQueue::Sink,
            Port::Source { frame_len } => {
                let src = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
                let frame = frames::udp_frame(src, self.cfg.mac.unwrap_or(frames::BROADCAST), *frame_len);
                pair::PortQueue::Source(frame)
            }
            Port::Loopback => pair::PortQueue::Loopback,
        };
        Ok(Box::new(pair::Pair::new(pair, port, features, mtu, self.stats.clone())))
    }

    fn request(&self, request: DeviceRequest) -> Result<(), String> {
        match request {
            DeviceRequest::SendRarp(mac) => match &self.port {
                Port::Tap(tap) => {
                    tap.send(&frames::rarp(mac)).map_err(|e| format!("RARP not sent on {}: {e}", tap.name()))?;
                    tracing::info!(tap = tap.name(), ?mac, "RARP sent for the guest");
                    Ok(())
                }
                _ => Err("no port to announce the guest on".into()),
            },
            DeviceRequest::SetMtu(mtu) => {
                let offered = self.cfg.mtu.ok_or("no MTU offered")?;
                if !(68..=offered).contains(&mtu) {
                    return Err(format!("MTU {mtu} outside 68..={offered}"));
                }
                self.mtu.store(mtu, Relaxed);
                Ok(())
            }
        }
    }
}
