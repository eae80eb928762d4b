//! Worker threads. A connection has a pool of them (`--threads`, one per queue group by default);
//! each serves a set of groups from one `poll` loop over their queues' kick eventfds and the
//! descriptors their handlers declare, and drives the handlers (`device.rs` has the contract).
//!
//! A thread owns the queues it serves. Starting a queue hands it over through the thread's
//! command channel; stopping one asks for it back, and the thread first has the handler complete
//! everything of it in flight, so that GET_VRING_BASE reads a position with nothing outstanding.
//! Nothing here waits on the frontend, and the control thread waits only for a reply the worker
//! gives without needing anything the control thread holds.
//!
//! After work a thread keeps polling for up to `poll_max` (`--poll-max-ns`) before it sleeps in
//! `poll(2)`, as QEMU's iothreads do: a request that arrives, or an I/O that completes, within it
//! costs no wake-up.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::channel::BackendChannel;
use crate::device::{Device, Events, Progress, QueueHandler, Queues};
use crate::notify::{drain, LogKick};
use crate::ring::Ring;

/// What the control side hands a worker thread to start a queue.
pub(crate) struct QueueStart {
    pub index: usize,
    pub queue: Queue,
    /// `None`: the frontend gave no kick fd; the ring is busy-polled.
    pub kick: Option<File>,
    pub call: Option<File>,
    pub device: Arc<dyn Device>,
    /// The virtio features the driver acknowledged (for the handler).
    pub features: u64,
    /// Busy-poll this ring instead of waiting for kicks.
    pub poll: bool,
    /// Set when the queue breaks.
    pub broken: Arc<AtomicBool>,
    /// Where IOTLB misses go.
    pub channel: Arc<BackendChannel>,
    /// SET_LOG_FD's eventfd.
    pub log_kick: Arc<LogKick>,
}

enum Command {
    Start(Box<QueueStart>),
    /// Stop queue `index`, complete its requests in flight, and send it back.
    Stop(usize, mpsc::SyncSender<Option<Queue>>),
}

struct PoolThread {
    wake: EventFd,
    /// Set before a command is sent: the thread's busy loops look at it and return to the main
    /// loop, so that a stop never waits behind a queue that keeps having work.
    pending: Arc<AtomicBool>,
    commands: mpsc::Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

/// The longest a worker keeps polling its rings and handlers after work before it sleeps in
/// `poll(2)` (`--poll-max-ns`), as QEMU's iothreads do (`poll-max-ns`, 32 µs there). Vireo's
/// workers yield the core while they spin idle, so a longer window costs the other threads
/// little, and it covers the time a driver takes to consume a deep queue's completions and refill
/// it (A/B runs in BENCHMARKS.md: at depth 128 on one queue, 100 µs gave about twice the IOPS of
/// 32 µs).
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(100);

/// A connection's worker threads.
pub(crate) struct WorkerPool {
    threads: Vec<PoolThread>,
    /// How many threads to use at most.
    max_threads: usize,
    /// Queues per group (a group is served by one thread).
    group_size: usize,
    /// The longest a thread polls after work before it sleeps.
    poll_max: Duration,
}

impl WorkerPool {
    /// A pool of at most `max_threads` threads (created when first needed), serving groups of
    /// `group_size` queues.
    pub fn new(max_threads: usize, group_size: usize, poll_max: Duration) -> Self {
        Self { threads: Vec::new(), max_threads: max_threads.max(1), group_size: group_size.max(1), poll_max }
    }

    fn thread_for(&mut self, index: usize) -> std::io::Result<&PoolThread> {
        let t = (index / self.group_size) % self.max_threads;
        while self.threads.len() <= t {
            let n = self.threads.len();
            let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
            let wake2 = wake.try_clone()?;
            let (tx, rx) = mpsc::channel();
            let pending = Arc::new(AtomicBool::new(false));
            let thread = WorkerThread {
                wake: wake2,
                pending: pending.clone(),
                commands: rx,
                groups: Vec::new(),
                group_size: self.group_size,
                spin: self.poll_max,
                poll_max: self.poll_max,
                events: Events::new(false),
            };
            let handle = std::thread::Builder::new().name(format!("vireo-worker-{n}")).spawn(move || thread.run())?;
            self.threads.push(PoolThread { wake, pending, commands: tx, handle: Some(handle) });
        }
        Ok(&self.threads[t])
    }

    /// Hands a queue to its thread (group `g` goes to thread `g % threads`).
    pub fn start(&mut self, start: QueueStart) -> std::io::Result<()> {
        let t = self.thread_for(start.index)?;
        t.pending.store(true, Ordering::SeqCst);
        t.commands.send(Command::Start(Box::new(start))).map_err(|_| std::io::Error::other("worker thread gone"))?;
        t.wake.write(1)
    }

    /// Wakes every thread: the IOTLB changed, and queues parked on a miss look again.
    pub fn wake_all(&self) {
        for t in &self.threads {
            let _ = t.wake.write(1);
        }
    }

    /// Takes queue `index` back from its thread, with nothing of it in flight.
    pub fn stop(&mut self, index: usize) -> Option<Queue> {
        let t = self.threads.get((index / self.group_size) % self.max_threads)?;
        let (tx, rx) = mpsc::sync_channel(1);
        t.pending.store(true, Ordering::SeqCst);
        t.commands.send(Command::Stop(index, tx)).ok()?;
        t.wake.write(1).ok()?;
        rx.recv().ok().flatten()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for t in &mut self.threads {
            // Closing the channel ends the thread once it has stopped its queues.
            let (dead, _) = mpsc::channel();
            t.commands = dead;
            let _ = t.wake.write(1);
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// One group served by a worker thread.
struct Group {
    id: usize,
    rings: Vec<Option<Ring>>,
    /// Made when the group's first queue starts, dropped when its last one stops.
    handler: Option<Box<dyn QueueHandler>>,
    /// The handler asked to run again without an event.
    again: bool,
    /// Runs in a row that did no work (busy-polled groups yield their core after many).
    idle: u32,
}

impl Group {
    fn runs(&self) -> impl Iterator<Item = &Ring> {
        self.rings.iter().flatten()
    }

    /// Busy-polled: some running queue has no kick fd, or `--poll`.
    fn polled(&self) -> bool {
        self.runs().any(|r| r.polled && !r.is_broken() && !r.is_parked())
    }

    fn parked(&self) -> bool {
        self.runs().any(|r| r.is_parked() && !r.is_broken())
    }

    fn kicked(&self) -> bool {
        self.runs().any(|r| r.kicked)
    }

    /// Calls the handler and tells it about queues that broke.
    fn run(&mut self, events: &Events) -> bool {
        let Some(h) = self.handler.as_mut() else { return false };
        let p: Progress = h.run(&mut Queues { rings: &mut self.rings }, events);
        self.again = p.again;
        for (i, slot) in self.rings.iter_mut().enumerate() {
            if let Some(r) = slot.as_mut().filter(|r| r.is_broken() && !r.broken_reported) {
                r.broken_reported = true;
                h.broken(i);
            }
        }
        self.idle = if p.worked { 0 } else { self.idle.saturating_add(1) };
        p.worked
    }
}

/// Who a polled descriptor belongs to.
#[derive(Clone, Copy)]
enum Owner {
    Kick { group: usize, ring: usize },
    Handler { group: usize, index: usize },
}

struct WorkerThread {
    wake: EventFd,
    pending: Arc<AtomicBool>,
    commands: mpsc::Receiver<Command>,
    groups: Vec<Group>,
    group_size: usize,
    /// The current spin window (adaptive, at most `poll_max`).
    spin: Duration,
    poll_max: Duration,
    /// Reused for every handler call.
    events: Events,
}

/// The longest one spin phase lasts however much work it finds, before the thread goes back to
/// its main loop. Commands end a spin at once (the pending flag) and the spin serves every group
/// of the thread, so this only bounds how long new fds wait; at 2 ms the extra sleep/wake cycles
/// cost depth-32 throughput in A/B runs.
const SPIN_LIMIT: Duration = Duration::from_millis(50);

/// How long a spin stays idle before it starts yielding its core (see `WorkerThread::spin`).
const YIELD_AFTER: Duration = Duration::from_micros(8);

/// Rounds of a busy-polled thread between two looks at its descriptors and commands.
const BUSY_ROUNDS: u32 = 256;

/// A parked queue is looked at again when the IOTLB changes (the control thread wakes every
/// worker) and at least this often (100 ms), to ask again.
const PARKED_RETRY_NS: i64 = 100_000_000;

impl WorkerThread {
    /// Applies pending commands; false when the pool is gone.
    fn commands(&mut self) -> bool {
        // Cleared before the channel is read: a command sent after this is seen next time.
        self.pending.store(false, Ordering::SeqCst);
        loop {
            match self.commands.try_recv() {
                Ok(Command::Start(s)) => self.start(*s),
                Ok(Command::Stop(index, reply)) => {
                    let _ = reply.send(self.stop(index));
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => {
                    let all: Vec<usize> =
                        self.groups.iter().flat_map(|g| g.runs().map(Ring::index).collect::<Vec<_>>()).collect();
                    for index in all {
                        self.stop(index);
                    }
                    return false;
                }
            }
        }
    }

    fn start(&mut self, s: QueueStart) {
        let (group_id, local) = (s.index / self.group_size, s.index % self.group_size);
        let gi = match self.groups.iter().position(|g| g.id == group_id) {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    id: group_id,
                    rings: (0..self.group_size).map(|_| None).collect(),
                    handler: None,
                    again: false,
                    idle: 0,
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[gi];
        let mut ring = Ring::new(s.index, s.queue, s.kick, s.call, s.poll, s.broken, s.channel, s.log_kick);
        if g.handler.is_none() {
            match s.device.activate(group_id, s.features) {
                Ok(h) => g.handler = Some(h),
                Err(e) => {
                    tracing::error!(queue = s.index, error = %e, "the device could not serve this queue");
                    ring.fail(&vireo_queue::QueueError::Config { what: "the device could not be activated" });
                    ring.broken_reported = true;
                }
            }
        }
        tracing::debug!(queue = s.index, polled = ring.polled, "queue started");
        // One interrupt when a queue starts: a backend that was killed may have published used
        // elements and died before it signalled them, and a driver that waits for that interrupt
        // (a transmit queue stopped until its buffers come back) would otherwise wait for ever,
        // the new backend having nothing to complete. A spurious interrupt costs the driver a look
        // at its used ring.
        ring.call().signal();
        g.rings[local] = Some(ring);
        // The first run happens at once: a restarted backend has chains to resubmit (inflight
        // tracking) or buffers made available while no backend listened.
        let events = &mut self.events;
        events.reset(0, false);
        g.run(events);
    }

    fn stop(&mut self, index: usize) -> Option<Queue> {
        let (group_id, local) = (index / self.group_size, index % self.group_size);
        let gi = self.groups.iter().position(|g| g.id == group_id)?;
        let g = &mut self.groups[gi];
        g.rings.get(local)?.as_ref()?;
        if let Some(h) = g.handler.as_mut() {
            h.stop(&mut Queues { rings: &mut g.rings }, local);
        }
        let ring = g.rings[local].take()?;
        tracing::debug!(queue = index, broken = ring.is_broken(), "queue stopped");
        if g.rings.iter().all(Option::is_none) {
            // The group's last queue: its handler goes (a device's per-group resources with it).
            self.groups.swap_remove(gi);
        }
        Some(ring.into_queue())
    }

    fn run(mut self) {
        let mut fds: Vec<(RawFd, rustix::event::PollFlags)> = Vec::new();
        let mut owners: Vec<Owner> = Vec::new();
        let mut declared: Vec<usize> = Vec::new();
        let mut ready: Vec<bool> = Vec::new();
        let mut handler_events: Vec<Vec<(usize, bool, bool)>> = Vec::new();
        loop {
            let polling = self.groups.iter().any(|g| g.again || g.polled());
            let parked = self.groups.iter().any(Group::parked);
            fds.clear();
            owners.clear();
            declared.clear();
            fds.push((self.wake.as_raw_fd(), rustix::event::PollFlags::IN));
            let mut interest = Vec::new();
            for (gi, g) in self.groups.iter().enumerate() {
                for (ri, r) in g.rings.iter().enumerate() {
                    if let Some(k) = r.as_ref().filter(|r| !r.polled && !r.is_broken()).and_then(|r| r.kick.as_ref()) {
                        fds.push((k.as_raw_fd(), rustix::event::PollFlags::IN));
                        owners.push(Owner::Kick { group: gi, ring: ri });
                    }
                }
                interest.clear();
                if let Some(h) = g.handler.as_ref() {
                    h.interest(&mut interest);
                }
                declared.push(interest.len());
                for (i, it) in interest.iter().enumerate() {
                    let mut flags = rustix::event::PollFlags::empty();
                    if it.read {
                        flags |= rustix::event::PollFlags::IN;
                    }
                    if it.write {
                        flags |= rustix::event::PollFlags::OUT;
                    }
                    fds.push((it.fd.as_raw_fd(), flags));
                    owners.push(Owner::Handler { group: gi, index: i });
                }
            }
            drop(interest);
            let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
            let retry = rustix::event::Timespec { tv_sec: 0, tv_nsec: PARKED_RETRY_NS };
            let timeout = if polling {
                Some(&zero)
            } else if parked {
                Some(&retry)
            } else {
                None
            };
            let slept_from = Instant::now();
            let revents = {
                // SAFETY: every descriptor here belongs to `self` (the wake eventfd, the rings'
                // kicks, the handlers' own descriptors), none of which is closed or dropped
                // before this block ends: nothing else runs on this thread meanwhile.
                let borrowed: Vec<BorrowedFd<'_>> =
                    fds.iter().map(|&(fd, _)| unsafe { BorrowedFd::borrow_raw(fd) }).collect();
                let mut pfds: Vec<rustix::event::PollFd<'_>> =
                    borrowed.iter().zip(&fds).map(|(fd, &(_, flags))| rustix::event::PollFd::new(fd, flags)).collect();
                match rustix::event::poll(&mut pfds, timeout) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "worker poll failed; the thread stops");
                        return;
                    }
                }
                pfds.iter().map(|p| p.revents()).collect::<Vec<_>>()
            };
            let slept = slept_from.elapsed();
            ready.clear();
            ready.resize(self.groups.len(), false);
            handler_events.resize_with(self.groups.len(), Vec::new);
            for e in handler_events.iter_mut() {
                e.clear();
            }
            if !revents[0].is_empty() {
                // SAFETY: the wake eventfd lives as long as `self`.
                drain(unsafe { BorrowedFd::borrow_raw(fds[0].0) });
            }
            for ((&(fd, _), rev), owner) in fds[1..].iter().zip(&revents[1..]).zip(&owners) {
                if rev.is_empty() {
                    continue;
                }
                match *owner {
                    Owner::Kick { group, ring } => {
                        // SAFETY: the kick belongs to a ring of `self`, alive until it is read.
                        drain(unsafe { BorrowedFd::borrow_raw(fd) });
                        if let Some(r) = self.groups[group].rings[ring].as_mut() {
                            r.kicked = true;
                        }
                        ready[group] = true;
                    }
                    Owner::Handler { group, index } => {
                        use rustix::event::PollFlags as F;
                        let err = rev.intersects(F::ERR | F::HUP | F::NVAL);
                        let r = rev.contains(F::IN) || err;
                        let w = rev.contains(F::OUT) || err;
                        handler_events[group].push((index, r, w));
                        ready[group] = true;
                    }
                }
            }
            if !polling {
                self.adapt_spin(slept);
            }
            let mut any = false;
            for (gi, g) in self.groups.iter_mut().enumerate() {
                if ready[gi] || g.again || g.polled() || g.parked() || g.kicked() {
                    self.events.reset(declared[gi], false);
                    for &(i, r, w) in &handler_events[gi] {
                        self.events.set(i, r, w);
                    }
                    any |= g.run(&self.events);
                }
            }
            if !self.commands() {
                return;
            }
            if polling {
                self.busy();
            } else if any && !self.spin.is_zero() {
                self.spin();
            }
            if polling && self.groups.iter().filter(|g| g.polled()).all(|g| g.idle > 100_000) {
                // A long idle stretch: give the core away briefly.
                std::thread::yield_now();
            }
        }
    }

    /// Busy-polled groups (and groups with work left) run again and again without a system call
    /// in between, for `BUSY_ROUNDS` rounds, before the main loop looks at descriptors and
    /// commands again (a command cuts it short): a `poll(2)` per round would cost more than the
    /// round itself at tens of millions of frames a second.
    fn busy(&mut self) {
        for _ in 0..BUSY_ROUNDS {
            let mut any = false;
            for g in self.groups.iter_mut().filter(|g| g.again || g.polled()) {
                any = true;
                self.events.reset(0, false);
                g.run(&self.events);
            }
            if !any || self.pending.load(Ordering::Relaxed) {
                return;
            }
        }
    }

    /// The window adapts like QEMU's: a sleep shorter than the longest window means spinning
    /// longer would have caught the event (double it, from 4 µs); a sleep longer than that means
    /// the spin before it waited in vain (halve it, down to none).
    fn adapt_spin(&mut self, slept: Duration) {
        if self.poll_max.is_zero() {
            return;
        }
        if slept < self.poll_max {
            self.spin = (self.spin * 2).clamp(Duration::from_micros(4).min(self.poll_max), self.poll_max);
        } else {
            self.spin /= 2;
            if self.spin < Duration::from_micros(1) {
                self.spin = Duration::ZERO;
            }
        }
    }

    /// Runs every group in spin mode (notifications off) until the spin window passes without
    /// work; then one run in kick mode catches what arrived at the end.
    fn spin(&mut self) {
        let window = self.spin;
        let start = Instant::now();
        let limit = start + SPIN_LIMIT;
        let mut until = start + window;
        let mut last_work = start;
        loop {
            let mut worked = false;
            for g in self.groups.iter_mut() {
                // Handler descriptors are not polled here: a spinning handler looks at them
                // itself (a non-blocking read or write finds out), as it looks at its rings.
                self.events.reset(0, true);
                worked |= g.run(&self.events);
            }
            let now = Instant::now();
            if worked {
                until = now + window;
                last_work = now;
            } else if now >= until {
                break;
            }
            // A command waits (a ring to stop or start), or the spin has gone on long enough:
            // back to the main loop, which looks at commands and every fd.
            if self.pending.load(Ordering::Relaxed) || now >= limit {
                break;
            }
            if now.duration_since(last_work) < YIELD_AFTER {
                std::hint::spin_loop();
            } else {
                // Idle for a while: hand the core to any thread that wants it (the driver, on a
                // machine with as few cores as here, or this queue's neighbours), and come
                // straight back if none does. This is what lets the window be longer than
                // QEMU's without starving the threads that produce the work; the first
                // microseconds spin without it, where a shallow queue's next request arrives.
                std::thread::yield_now();
            }
        }
        for g in self.groups.iter_mut().filter(|g| !g.polled()) {
            self.events.reset(0, false);
            g.run(&self.events);
        }
    }
}
