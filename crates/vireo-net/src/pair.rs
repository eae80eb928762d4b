//! One receive/transmit queue pair on the device seam ([`Pair`]): the group of queues `2k`
//! (receive) and `2k + 1` (transmit), and the port queue behind them.
//!
//! Nothing is held between batches. A receive chain is popped only when a frame is there to put
//! in it: the tap is read straight into chains popped for the read, and the ones the frame did
//! not need are given back (`QueueBatch::rewind`); a transmit chain the port cannot take now goes
//! back the same way. When the receive ring is empty while a frame waits, the pair asks for the
//! ring's kick and stops polling the port until it comes; when the tap is full, it polls the tap
//! for room and leaves the transmit ring alone.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use vireo_memory::Batch;
use vireo_queue::{AvailPosition, Buffer, Chain, Popped, QueueBatch, QueueError, Single, UsedToken};
use vireo_vhost::{Events, Interest, Pass, Progress, QueueHandler, Queues, Ring};
use vireo_wire::features::net as f;

use crate::header::{header_len, max_rx_frame, max_tx_frame, NetHeader, TxError};
use crate::tap::Tap;
use crate::Stats;

const RX: usize = 0;
const TX: usize = 1;

/// The most buffers one receive read spreads over (well under IOV_MAX).
const MAX_RX_IOVECS: usize = 256;

/// What is behind the pair.
pub(crate) enum PortQueue {
    /// Queue `pair` of this tap.
    Tap(Arc<Tap>),
    Sink,
    /// The frame to write (without the virtio-net header).
    Source(Vec<u8>),
    Loopback,
}

/// One direction's counters, kept here and stored into the shared [`Stats`] after every run
/// (a plain store: this thread is their only writer; an atomic add per frame would cost more
/// than the frame).
#[derive(Clone, Copy, Debug, Default)]
struct Local {
    frames: u64,
    bytes: u64,
    drops: u64,
    errors: u64,
    checksum: u64,
}

/// A receive chain popped for the frame being placed.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    token: UsedToken,
    writable: usize,
    /// Its buffers in the batch's buffer list.
    first: usize,
    count: usize,
    /// The ring position after it (to give back the chains after it).
    after: AvailPosition,
}

/// The receive chains popped for one frame.
struct RxSet {
    /// The position before the first (to give them all back).
    start: AvailPosition,
    /// Writable bytes of all of them.
    capacity: usize,
    /// The ring ran out before `capacity` reached what was asked for (with mergeable buffers).
    partial: bool,
}

/// The pair's handler.
pub(crate) struct Pair {
    pair: usize,
    port: PortQueue,
    features: u64,
    hdr_len: usize,
    mrg: bool,
    max_tx: usize,
    max_rx: usize,
    /// The source's virtio-net header and frame, written as one.
    source: Vec<u8>,
    /// The loopback's copy of the frame being returned.
    scratch: Vec<u8>,
    chains: Vec<RxChain>,
    /// Allocations reused from batch to batch (see `recycle`).
    spare: Vec<Buffer<'static>>,
    taken: Vec<Popped>,
    rx: Local,
    tx: Local,
    stats: Arc<Stats>,
    /// A frame waits (in the tap, or a transmit chain in loopback) and the receive ring had no
    /// buffer: wait for its kick, and do not poll the tap for reading meanwhile.
    rx_starved: bool,
    /// The tap would block a write: wait until it is writable.
    tx_blocked: bool,
}

fn load(stats: &Stats, i: usize) -> Local {
    stats.queue(i).map_or_else(Local::default, |q| Local {
        frames: q.frames.load(Relaxed),
        bytes: q.bytes.load(Relaxed),
        drops: q.drops.load(Relaxed),
        errors: q.errors.load(Relaxed),
        checksum: q.checksum.load(Relaxed),
    })
}

impl Pair {
    pub(crate) fn new(pair: usize, port: PortQueue, features: u64, mtu: u16, stats: Arc<Stats>) -> Self {
        let hdr_len = header_len(features);
        let mrg = features & f::MRG_RXBUF != 0;
        let mut source = Vec::new();
        if let PortQueue::Source(frame) = &port {
            source = vec![0u8; hdr_len];
            if hdr_len == 12 {
                // num_buffers: one chain per frame.
                source[10] = 1;
            }
            source.extend_from_slice(frame);
        }
        Self {
            pair,
            port,
            features,
            hdr_len,
            mrg,
            max_tx: max_tx_frame(features, mtu),
            max_rx: max_rx_frame(features, mtu),
            source,
            scratch: Vec::new(),
            chains: Vec::new(),
            spare: Vec::with_capacity(4 * SINK_BURST),
            taken: Vec::with_capacity(SINK_BURST),
            rx: load(&stats, 2 * pair),
            tx: load(&stats, 2 * pair + 1),
            stats,
            rx_starved: false,
            tx_blocked: false,
        }
    }

    fn publish_stats(&self, rx_broken: bool, tx_broken: bool) {
        for (i, l, broken) in [(2 * self.pair, &self.rx, rx_broken), (2 * self.pair + 1, &self.tx, tx_broken)] {
            if let Some(q) = self.stats.queue(i) {
                q.frames.store(l.frames, Relaxed);
                q.bytes.store(l.bytes, Relaxed);
                q.drops.store(l.drops, Relaxed);
                q.errors.store(l.errors, Relaxed);
                q.checksum.store(l.checksum, Relaxed);
                if broken {
                    q.broken.store(true, Relaxed);
                }
            }
        }
    }
}

/// Checks what the guest sent: `readable` bytes, the header (whose first 10 bytes are `h`)
/// then the frame; returns the frame's length.
fn check_tx(
    readable: u32,
    h: &[u8; 10],
    hdr_len: usize,
    features: u64,
    max: usize,
    local: &mut Local,
) -> Result<usize, TxError> {
    let res = (readable as usize)
        .checked_sub(hdr_len)
        .ok_or(TxError::ShortChain { len: readable, need: hdr_len })
        .and_then(|frame| NetHeader::decode(h).check_tx(features, frame, max).map(|()| frame));
    if let Err(e) = &res {
        local.errors += 1;
        tracing::debug!(error = %e, "frame from the guest dropped");
    }
    res
}

/// [`check_tx`] on a chain.
fn check_chain(
    chain: &Chain<'_>,
    hdr_len: usize,
    features: u64,
    max: usize,
    local: &mut Local,
) -> Result<usize, TxError> {
    let mut h = [0u8; 10];
    chain.read_at(0, &mut h);
    check_tx(chain.readable_len(), &h, hdr_len, features, max, local)
}

/// The first bytes of the readable buffers of a chain.
fn read_head(bufs: &[Buffer<'_>], out: &mut [u8]) {
    let mut done = 0;
    for b in bufs.iter().filter(|b| !b.writable) {
        if done == out.len() {
            break;
        }
        let n = b.slice.len().min(out.len() - done);
        let _ = b.slice.copy_to(0, &mut out[done..done + n]);
        done += n;
    }
}

/// How many chains the sink takes before it reads them: their buffers are prefetched first, so
/// that the cache misses on frames another core just wrote overlap instead of following each
/// other.
const SINK_BURST: usize = 32;

/// How many buffers ahead of the one being read the sink prefetches.
const PREFETCH_AHEAD: usize = 6;

/// The sink's work on one chain (`bufs`, its buffers): every byte of the frame read (summed),
/// the frame counted.
fn consume(bufs: &[Buffer<'_>], readable: u32, hdr_len: usize, features: u64, max: usize, local: &mut Local) {
    let mut h = [0u8; 10];
    match bufs.first().and_then(|b| b.slice.get::<[u8; 10]>(0).filter(|_| !b.writable)) {
        Some(first) => h = first,
        None => read_head(bufs, &mut h),
    }
    let Ok(frame_len) = check_tx(readable, &h, hdr_len, features, max, local) else { return };
    let mut skip = hdr_len;
    let mut sum = 0u64;
    for b in bufs.iter().filter(|b| !b.writable) {
        let len = b.slice.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        sum += b.slice.byte_sum(skip, len - skip).unwrap_or(0);
        skip = 0;
    }
    local.frames += 1;
    local.bytes += frame_len as u64;
    local.checksum = local.checksum.wrapping_add(sum);
}

/// A vector emptied and given back for views of another batch, its allocation kept (the in-place
/// collect reuses it: both element types are the same size): the per-batch lists of buffers cost
/// no allocation.
pub(crate) fn recycle<'b>(mut v: Vec<Buffer<'_>>) -> Vec<Buffer<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("the vector is empty")).collect()
}

/// The sink's batch: chains taken `SINK_BURST` at a time, their buffers prefetched, then read,
/// then completed.
#[allow(clippy::too_many_arguments)]
fn sink_pass<'b>(
    qb: &mut QueueBatch<'b, '_>,
    call: &vireo_vhost::Call,
    bufs: &mut Vec<Buffer<'b>>,
    taken: &mut Vec<Popped>,
    hdr_len: usize,
    features: u64,
    max: usize,
    local: &mut Local,
) -> Result<bool, QueueError> {
    let mut worked = false;
    loop {
        bufs.clear();
        taken.clear();
        if qb.pop_burst(SINK_BURST, bufs, taken)? == 0 {
            return Ok(worked);
        }
        // Prefetched a few chains ahead of the one being read: enough to overlap the misses,
        // few enough not to stall on the CPU's outstanding-miss limit.
        let mut ahead = bufs.iter();
        for b in ahead.by_ref().take(PREFETCH_AHEAD) {
            b.slice.prefetch(hdr_len + 128);
        }
        let mut at = 0;
        for p in taken.iter() {
            for b in ahead.by_ref().take(p.buffers) {
                b.slice.prefetch(hdr_len + 128);
            }
            consume(&bufs[at..at + p.buffers], p.readable, hdr_len, features, max, local);
            at += p.buffers;
        }
        qb.add_used_many(taken.iter().map(|p| (p.token, 0)))?;
        // Each burst goes back to the driver at once (as DPDK's vhost returns each dequeue
        // burst): it can refill while the next one is read.
        vireo_vhost::publish(qb, call)?;
        worked = true;
    }
}

/// Writes `frame` (header included) into one single-buffer receive chain: the source's fast
/// path (`complete_singles`).
fn fill_single(s: &Single<'_>, frame: &[u8], hdr_len: usize, local: &mut Local) -> u32 {
    if !s.writable || s.buf.len() < frame.len() {
        // A buffer the device cannot write, or too small for the frame (and, on this path, the
        // only buffer of its chain): the guest gets it back empty.
        local.errors += 1;
        return 0;
    }
    if s.buf.copy_from(0, frame).is_err() {
        local.errors += 1;
        return 0;
    }
    local.frames += 1;
    local.bytes += (frame.len() - hdr_len) as u64;
    // A frame is at most 64 KiB.
    u32::try_from(frame.len()).unwrap_or(u32::MAX)
}

/// Pops receive chains until their writable bytes reach `need` (one chain without mergeable
/// buffers). When the ring runs out first the chains taken so far are returned as `partial`
/// (given back at once if the batch stopped at its bound rather than at the ring's end); `None`
/// when there were none. A chain with no writable buffer (the guest's error) is completed empty,
/// with those taken before it for this frame, and counted.
fn take_rx<'b>(
    qb: &mut QueueBatch<'b, '_>,
    bufs: &mut Vec<Buffer<'b>>,
    chains: &mut Vec<RxChain>,
    need: usize,
    mrg: bool,
    local: &mut Local,
) -> Result<Option<RxSet>, QueueError> {
    bufs.clear();
    chains.clear();
    let mut start = qb.avail_position();
    let mut capacity = 0usize;
    loop {
        let Some(p) = qb.pop_buffers(bufs)? else {
            if chains.is_empty() || qb.exhausted() {
                qb.rewind(start)?;
                return Ok(None);
            }
            return Ok(Some(RxSet { start, capacity, partial: true }));
        };
        let first = bufs.len() - p.buffers;
        if p.writable == 0 {
            local.errors += 1;
            tracing::debug!(id = p.token.id, "receive chain without a writable buffer");
            for c in chains.drain(..) {
                qb.add_used(c.token, 0)?;
            }
            qb.add_used(p.token, 0)?;
            bufs.clear();
            capacity = 0;
            start = qb.avail_position();
            continue;
        }
        chains.push(RxChain {
            token: p.token,
            writable: p.writable as usize,
            first,
            count: p.buffers,
            after: qb.avail_position(),
        });
        capacity += p.writable as usize;
        if capacity >= need || !mrg || bufs.len() >= MAX_RX_IOVECS {
            return Ok(Some(RxSet { start, capacity, partial: false }));
        }
    }
}

/// The writable buffers of `chains`, in order.
fn writable<'a, 'b>(bufs: &'a [Buffer<'b>], chains: &'a [RxChain]) -> impl Iterator<Item = &'a Buffer<'b>> + 'a {
    chains.iter().flat_map(move |c| bufs[c.first..c.first + c.count].iter().filter(|b| b.writable))
}

/// Copies `bytes` into the writable buffers of `chains` from frame offset `at`.
fn copy_into(bufs: &[Buffer<'_>], chains: &[RxChain], mut at: usize, bytes: &[u8]) {
    let mut done = 0;
    for b in writable(bufs, chains) {
        if done == bytes.len() {
            break;
        }
        let len = b.slice.len();
        if at >= len {
            at -= len;
            continue;
        }
        let n = (len - at).min(bytes.len() - done);
        let _ = b.slice.copy_from(at, &bytes[done..done + n]);
        done += n;
        at = 0;
    }
}

/// A frame of `total` bytes (header included) is in the buffers of `chains`: gives back the
/// chains it did not need, sets `num_buffers` (and clears the header's flags for a guest that
/// cannot take them), logs what was written and completes the chains it filled, each with the
/// bytes it got (all but the last full: virtio 1.2 5.1.6.4).
fn complete_rx(
    qb: &mut QueueBatch<'_, '_>,
    mem: &Batch<'_>,
    bufs: &[Buffer<'_>],
    chains: &[RxChain],
    total: usize,
    hdr_len: usize,
    guest_csum: bool,
) -> Result<(), QueueError> {
    let mut left = total;
    let mut used = 0;
    for c in chains {
        used += 1;
        if left <= c.writable {
            break;
        }
        left -= c.writable;
    }
    if used < chains.len() {
        qb.rewind(chains[used - 1].after)?;
    }
    let chains = &chains[..used];
    if hdr_len == 12 {
        // Fewer chains than the ring size, which fits u16.
        copy_into(bufs, chains, 10, &u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes());
    }
    if !guest_csum {
        // DATA_VALID (which the tap may set) needs VIRTIO_NET_F_GUEST_CSUM.
        copy_into(bufs, chains, 0, &[0]);
    }
    let mut left = total;
    for c in chains {
        let take = left.min(c.writable);
        let mut rest = take;
        for b in bufs[c.first..c.first + c.count].iter().filter(|b| b.writable) {
            if rest == 0 {
                break;
            }
            let n = rest.min(b.slice.len());
            mem.log_write(b.gpa, n as u64).map_err(|e| QueueError::mem(b.gpa, n as u64, e))?;
            rest -= n;
        }
        // take <= a chain's writable length, a u32.
        qb.add_used(c.token, u32::try_from(take).unwrap_or(u32::MAX))?;
        left -= take;
    }
    Ok(())
}

/// The last OS error of a syscall on a non-blocking descriptor, as an errno.
fn io_errno(n: isize) -> Result<usize, rustix::io::Errno> {
    usize::try_from(n).map_err(|_| {
        rustix::io::Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(rustix::io::Errno::IO)
    })
}

impl Pair {
    /// The sink: every frame the guest sends is read and dropped.
    fn sink(&mut self, tx: &mut Ring, spin: bool) -> Progress {
        tx.take_kick();
        let (hdr_len, features, max, local) = (self.hdr_len, self.features, self.max_tx, &mut self.tx);
        let (spare, taken) = (&mut self.spare, &mut self.taken);
        let r = tx.serve(spin, |qb, call| {
            let mut bufs = recycle(std::mem::take(spare));
            let res = sink_pass(qb, call, &mut bufs, taken, hdr_len, features, max, local);
            *spare = recycle(bufs);
            res.map(Pass::done)
        });
        Progress { worked: r.worked, again: r.again }
    }

    /// The source: every buffer the guest posts gets a frame. A chain that cannot hold a frame
    /// whole (the source writes one frame per chain) goes back empty and is counted as an error.
    fn source(&mut self, rx: &mut Ring, spin: bool) -> Progress {
        rx.take_kick();
        let (frame, hdr_len, local) = (&self.source, self.hdr_len, &mut self.rx);
        let r = rx.serve(spin, |qb, _| {
            qb.set_prefetch(true);
            let mut worked = false;
            loop {
                // Split rings of single buffers (what drivers post for receiving): one loop from
                // the available ring to the used ring.
                let n = qb.complete_singles(usize::MAX, |s| fill_single(&s, frame, hdr_len, local));
                worked |= n > 0;
                if qb.exhausted() {
                    break;
                }
                // Packed rings, and chains of several buffers.
                let n = qb.pop_each(usize::MAX, |chain| {
                    if chain.writable_len() as usize >= frame.len() && chain.readable_len() == 0 {
                        chain.write_at(0, frame);
                        local.frames += 1;
                        local.bytes += (frame.len() - hdr_len) as u64;
                        // A frame is at most 64 KiB.
                        Some(u32::try_from(frame.len()).unwrap_or(u32::MAX))
                    } else {
                        local.errors += 1;
                        Some(0)
                    }
                })?;
                worked |= n > 0;
                if n == 0 || qb.exhausted() {
                    break;
                }
            }
            Ok(Pass::done(worked))
        });
        Progress { worked: r.worked, again: r.again }
    }

    /// The tap's transmit side: frames from the guest written to the tap, one `writev` each on
    /// the chain's buffers.
    fn tap_tx(&mut self, tx: &mut Ring, tap: &Tap, spin: bool, events: &Events) -> Progress {
        let kicked = tx.take_kick();
        if self.tx_blocked && !events.writable(0) && !spin && !kicked {
            return Progress::default();
        }
        self.tx_blocked = false;
        let Some(q) = tap.queue(self.pair) else { return Progress::default() };
        let fd = q.as_fd().as_raw_fd();
        let (hdr_len, features, max, local) = (self.hdr_len, self.features, self.max_tx, &mut self.tx);
        let r = tx.serve(spin, |qb, _| {
            let mut worked = false;
            let mut bufs: Vec<Buffer<'_>> = Vec::new();
            let mut iov: Vec<libc::iovec> = Vec::new();
            loop {
                let pos = qb.avail_position();
                bufs.clear();
                let Some(p) = qb.pop_buffers(&mut bufs)? else { break };
                let token = p.token;
                let mut h = [0u8; 10];
                read_head(&bufs, &mut h);
                let Ok(frame_len) = check_tx(p.readable, &h, hdr_len, features, max, local) else {
                    qb.add_used(token, 0)?;
                    worked = true;
                    continue;
                };
                iov.clear();
                iov.extend(
                    bufs.iter()
                        .filter(|b| !b.writable)
                        .map(|b| libc::iovec { iov_base: b.slice.as_ptr().cast(), iov_len: b.slice.len() }),
                );
                let cnt = libc::c_int::try_from(iov.len().min(1024)).unwrap_or(1024);
                // SAFETY: every iovec names a readable guest buffer of this chain, translated in
                // this batch, which holds its region until the batch ends (after this call); the
                // kernel only reads them. No Rust reference into guest memory is formed.
                let n = unsafe { libc::writev(fd, iov.as_ptr(), cnt) };
                match io_errno(n) {
                    Ok(_) => {
                        local.frames += 1;
                        local.bytes += frame_len as u64;
                        qb.add_used(token, 0)?;
                        worked = true;
                    }
                    Err(rustix::io::Errno::AGAIN) => {
                        // The tap is full: the chain goes back, and the pair waits for room.
                        qb.rewind(pos)?;
                        return Ok(Pass { worked, blocked: true });
                    }
                    Err(e) => {
                        // Refused by the kernel (a frame it cannot take, the link down): dropped.
                        local.drops += 1;
                        tracing::debug!(error = %e, "frame not written to the tap");
                        qb.add_used(token, 0)?;
                        worked = true;
                    }
                }
            }
            Ok(Pass::done(worked))
        });
        self.tx_blocked = r.blocked;
        if self.tx_blocked {
            tracing::debug!(pair = self.pair, "tap full: waiting for room");
        }
        Progress { worked: r.worked, again: r.again }
    }

    /// The tap's receive side: the tap read straight into receive chains popped for the read.
    fn tap_rx(&mut self, rx: &mut Ring, tap: &Tap, spin: bool, events: &Events) -> Progress {
        let kicked = rx.take_kick();
        if kicked {
            self.rx_starved = false;
        }
        let poll = spin || rx.is_polled();
        if self.rx_starved && !poll {
            return Progress::default();
        }
        if !poll && !events.readable(0) && !kicked {
            // Woken for another reason (a transmit kick): the tap has nothing for us, or the
            // worker would have said so.
            return Progress::default();
        }
        let Some(q) = tap.queue(self.pair) else { return Progress::default() };
        let fd = q.as_fd().as_raw_fd();
        let need = self.hdr_len + self.max_rx;
        let (hdr_len, mrg, local, chains) = (self.hdr_len, self.mrg, &mut self.rx, &mut self.chains);
        let guest_csum = self.features & f::GUEST_CSUM != 0;
        let mut starved = false;
        let r = rx.serve(spin, |qb, _| {
            let mem = qb.memory();
            let mut worked = false;
            let mut bufs = Vec::new();
            let mut iov: Vec<libc::iovec> = Vec::new();
            let mut sentinel = [0u8; 1];
            loop {
                // With fewer buffers posted than the largest frame needs, the read goes ahead into
                // those: the tap cannot say how long its next frame is, and a guest refills its
                // ring only after it receives, so waiting for room for the largest frame could
                // wait for ever. A frame longer than the buffers is dropped, as a NIC whose ring
                // is short drops it.
                let Some(set) = take_rx(qb, &mut bufs, chains, need, mrg, local)? else {
                    starved = !qb.exhausted();
                    break;
                };
                iov.clear();
                iov.extend(
                    writable(&bufs, chains)
                        .map(|b| libc::iovec { iov_base: b.slice.as_ptr().cast(), iov_len: b.slice.len() }),
                );
                // One byte of our own after the guest's buffers: a frame longer than them would
                // be cut silently by the tap; one that reaches this byte is known to be cut.
                iov.push(libc::iovec { iov_base: sentinel.as_mut_ptr().cast(), iov_len: 1 });
                let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
                // SAFETY: every iovec but the last names a writable guest buffer popped in this
                // batch, which holds its region until the batch ends (after this call); the last
                // is `sentinel`, alive here. The kernel writes into them; no Rust reference into
                // guest memory is formed.
                let n = unsafe { libc::readv(fd, iov.as_ptr(), cnt) };
                let n = match io_errno(n) {
                    Ok(n) => n,
                    Err(e) => {
                        // Nothing to read (or the tap went away): the chains go back unconsumed.
                        qb.rewind(set.start)?;
                        if e != rustix::io::Errno::AGAIN {
                            tracing::debug!(error = %e, "tap read failed");
                        }
                        return Ok(Pass { worked, blocked: true });
                    }
                };
                if n > set.capacity || n < hdr_len + 14 {
                    // Cut (longer than the buffers the guest posted) or not a frame: dropped,
                    // the chains given back.
                    local.drops += 1;
                    qb.rewind(set.start)?;
                    continue;
                }
                complete_rx(qb, mem, &bufs, chains, n, hdr_len, guest_csum)?;
                local.frames += 1;
                local.bytes += (n - hdr_len) as u64;
                worked = true;
            }
            Ok(Pass::done(worked))
        });
        // The ring ran dry with the tap not known empty: wait for buffers (the ring's kick, asked
        // for by `serve`), and stop polling the tap meanwhile.
        self.rx_starved = starved && !r.blocked;
        if self.rx_starved {
            tracing::debug!(pair = self.pair, "receive ring without room for a frame: waiting for buffers");
        }
        Progress { worked: r.worked, again: r.again }
    }

    /// The loopback: each frame the guest sends goes back to it, MAC addresses swapped.
    fn loopback(&mut self, rx: &mut Ring, tx: &mut Ring, spin: bool) -> Progress {
        if rx.take_kick() {
            self.rx_starved = false;
        }
        let tx_kicked = tx.take_kick();
        let poll = spin || rx.is_polled() || tx.is_polled();
        if self.rx_starved && !poll && !tx_kicked {
            return Progress::default();
        }
        let mut out = Progress::default();
        let (hdr_len, features, max_tx, mrg) = (self.hdr_len, self.features, self.max_tx, self.mrg);
        let (rx_local, tx_local, chains, scratch) = (&mut self.rx, &mut self.tx, &mut self.chains, &mut self.scratch);
        for _ in 0..64 {
            let mut starved = false;
            let res = rx.process(|rqb, _| {
                let mem = rqb.memory();
                let mut rx_error = None;
                let mut rbufs = Vec::new();
                let inner = tx.process(|tqb, _| {
                    if poll {
                        tqb.disable_notification()?;
                    }
                    let mut worked = false;
                    loop {
                        let tpos = tqb.avail_position();
                        let Some(chain) = tqb.pop()? else { break };
                        let token = chain.token();
                        let Ok(frame_len) = check_chain(&chain, hdr_len, features, max_tx, tx_local) else {
                            tqb.add_used(token, 0)?;
                            worked = true;
                            continue;
                        };
                        scratch.clear();
                        scratch.resize(hdr_len + frame_len, 0);
                        chain.read_at(hdr_len, &mut scratch[hdr_len..]);
                        // The header back to the guest: no offloads (the loopback offers none).
                        scratch[..hdr_len].fill(0);
                        let (dst, src) = scratch[hdr_len..hdr_len + 12].split_at_mut(6);
                        dst.swap_with_slice(src);
                        let set = match take_rx(rqb, &mut rbufs, chains, scratch.len(), mrg, rx_local) {
                            Ok(Some(set)) if !(set.partial && set.capacity < scratch.len()) => set,
                            Ok(Some(set)) => {
                                // Not enough buffers for this frame yet: it waits in the transmit
                                // ring for more.
                                if let Err(e) = rqb.rewind(set.start) {
                                    rx_error = Some(e);
                                    break;
                                }
                                tqb.rewind(tpos)?;
                                starved = true;
                                break;
                            }
                            Ok(None) => {
                                // No receive buffer: the frame waits in the transmit ring.
                                tqb.rewind(tpos)?;
                                starved = !rqb.exhausted();
                                break;
                            }
                            Err(e) => {
                                tqb.rewind(tpos)?;
                                rx_error = Some(e);
                                break;
                            }
                        };
                        if set.capacity < scratch.len() {
                            // Too long for the guest's (non-mergeable) buffer: dropped, the
                            // buffer kept.
                            rx_local.drops += 1;
                            if let Err(e) = rqb.rewind(set.start) {
                                rx_error = Some(e);
                                break;
                            }
                        } else {
                            copy_into(&rbufs, chains, 0, scratch);
                            if let Err(e) = complete_rx(rqb, mem, &rbufs, chains, scratch.len(), hdr_len, false) {
                                rx_error = Some(e);
                                break;
                            }
                            rx_local.frames += 1;
                            rx_local.bytes += frame_len as u64;
                        }
                        tx_local.frames += 1;
                        tx_local.bytes += frame_len as u64;
                        tqb.add_used(token, 0)?;
                        worked = true;
                    }
                    let more = if starved || rx_error.is_some() {
                        false
                    } else if tqb.exhausted() {
                        true
                    } else if poll {
                        false
                    } else {
                        tqb.enable_notification()?
                    };
                    Ok((worked, more))
                });
                if let Some(e) = rx_error {
                    return Err(e);
                }
                let Some((worked, mut more)) = inner else { return Ok((false, false)) };
                if starved && !poll {
                    // Ask for the receive ring's kick; buffers that came meanwhile count.
                    if rqb.enable_notification()? {
                        starved = false;
                        more = true;
                    }
                }
                Ok((worked, more))
            });
            let Some((worked, more)) = res else { break };
            out.worked |= worked;
            self.rx_starved = starved;
            if !more {
                return out;
            }
        }
        out.again = !self.rx_starved;
        out
    }
}

impl QueueHandler for Pair {
    fn interest<'a>(&'a self, out: &mut Vec<Interest<'a>>) {
        if let PortQueue::Tap(tap) = &self.port {
            if let Some(q) = tap.queue(self.pair) {
                out.push(Interest { fd: q.as_fd(), read: !self.rx_starved, write: self.tx_blocked });
            }
        }
    }

    fn run(&mut self, queues: &mut Queues<'_>, events: &Events) -> Progress {
        let spin = events.spin();
        let (rx, tx) = queues.pair(RX, TX);
        let mut p = Progress::default();
        let (mut rx, mut tx) = (rx, tx);
        match &self.port {
            PortQueue::Sink => {
                if let Some(tx) = tx.as_deref_mut() {
                    p |= self.sink(tx, spin);
                }
                if let Some(rx) = rx.as_deref_mut() {
                    rx.take_kick();
                }
            }
            PortQueue::Source(_) => {
                if let Some(rx) = rx.as_deref_mut() {
                    p |= self.source(rx, spin);
                }
                if let Some(tx) = tx.as_deref_mut() {
                    p |= self.sink(tx, spin);
                }
            }
            PortQueue::Loopback => match (rx.as_deref_mut(), tx.as_deref_mut()) {
                (Some(rx), Some(tx)) => p |= self.loopback(rx, tx, spin),
                (_, Some(tx)) => {
                    // No receive queue yet: frames wait in the transmit ring.
                    tx.take_kick();
                }
                _ => {}
            },
            PortQueue::Tap(tap) => {
                let tap = tap.clone();
                if let Some(tx) = tx.as_deref_mut() {
                    p |= self.tap_tx(tx, &tap, spin, events);
                }
                match rx.as_deref_mut() {
                    Some(rx) => p |= self.tap_rx(rx, &tap, spin, events),
                    // Frames for a receive queue not started wait in the tap.
                    None => self.rx_starved = true,
                }
            }
        }
        let broken = |r: &Option<&mut Ring>| r.as_ref().is_some_and(|r| r.is_broken());
        self.publish_stats(broken(&rx), broken(&tx));
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let PortQueue::Tap(tap) = &self.port {
            // The pair stopped: frames hashed to its tap queue go to the others meanwhile.
            tap.deactivate(self.pair);
        }
    }
}
