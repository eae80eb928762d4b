//! Worker threads. A connection has a pool of them (`--threads`, one per queue by default); each
//! serves a set of queues from one poll loop over their kick eventfds and their engines'
//! completion fds, processes the rings in batches, and signals the call eventfds. A queue
//! without a kick fd (the frontend's "no fd" case) or in `--poll` mode is busy-polled instead.
//!
//! A thread owns the `Queue`s it serves. Starting a queue hands it over through the thread's
//! command channel; stopping one asks for it back, and the thread first completes every request
//! of it in flight, so that GET_VRING_BASE reads a position with nothing outstanding. Nothing
//! here waits on the frontend, and the control thread waits only for a reply the worker gives
//! without needing anything the control thread holds.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use vireo_memory::Perm;
use vireo_queue::{Queue, QueueBatch, QueueError, UsedToken};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{BackendChannel, LogKick};
use crate::device::{Device, Engine};

/// What the control side hands a worker thread to start a queue.
pub(crate) struct QueueStart {
    pub index: usize,
    pub queue: Queue,
    /// `None`: the frontend gave no kick fd; the ring is busy-polled.
    pub kick: Option<File>,
    pub call: Option<File>,
    pub device: Arc<dyn Device>,
    /// Busy-poll this ring instead of waiting for kicks.
    pub poll: bool,
    /// Set when the driver breaks the queue.
    pub broken: Arc<std::sync::atomic::AtomicBool>,
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
    pending: Arc<std::sync::atomic::AtomicBool>,
    commands: mpsc::Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

/// A connection's worker threads.
pub(crate) struct WorkerPool {
    threads: Vec<PoolThread>,
    /// How many threads to use at most.
    max_threads: usize,
    /// The longest a thread polls after work before it sleeps (`--poll-max-ns`).
    spin_max: std::time::Duration,
}

impl WorkerPool {
    /// A pool of at most `max_threads` threads (created when first needed).
    pub fn new(max_threads: usize, spin_max: std::time::Duration) -> Self {
        Self { threads: Vec::new(), max_threads: max_threads.max(1), spin_max }
    }

    /// The most threads the pool makes.
    pub fn max_threads(&self) -> usize {
        self.max_threads
    }

    fn thread_for(&mut self, index: usize) -> std::io::Result<&PoolThread> {
        let t = index % self.max_threads;
        while self.threads.len() <= t {
            let n = self.threads.len();
            let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
            let wake2 = wake.try_clone()?;
            let (tx, rx) = mpsc::channel();
            let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let thread = WorkerThread {
                wake: wake2,
                pending: pending.clone(),
                commands: rx,
                queues: Vec::new(),
                spin: self.spin_max,
                spin_max: self.spin_max,
            };
            let handle = std::thread::Builder::new().name(format!("vireo-worker-{n}")).spawn(move || thread.run())?;
            self.threads.push(PoolThread { wake, pending, commands: tx, handle: Some(handle) });
        }
        Ok(&self.threads[t])
    }

    /// Hands a queue to its thread (queue `i` goes to thread `i % threads`).
    pub fn start(&mut self, start: QueueStart) -> std::io::Result<()> {
        let t = self.thread_for(start.index)?;
        t.pending.store(true, std::sync::atomic::Ordering::SeqCst);
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
        let t = self.threads.get(index % self.max_threads)?;
        let (tx, rx) = mpsc::sync_channel(1);
        t.pending.store(true, std::sync::atomic::Ordering::SeqCst);
        t.commands.send(Command::Stop(index, tx)).ok()?;
        t.wake.write(1).ok()?;
        rx.recv().ok().flatten()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for t in &mut self.threads {
            // Closing the channel ends the thread once it has drained its queues.
            let (dead, _) = mpsc::channel();
            t.commands = dead;
            let _ = t.wake.write(1);
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// A queue waiting for an IOTLB entry. It is not processed (nothing of the chain that missed
/// was consumed; it is walked again from the start) until the IOTLB generation moves past
/// `generation`, read before the batch that missed, so an update that raced with the miss is
/// never waited for.
struct Parked {
    generation: u64,
    iova: u64,
    perm: Perm,
    asked: std::time::Instant,
}

/// How many chains a pass pops and completes between two publications of the used index. One:
/// the driver sees each completion at once. A publication costs a full fence and a read of the
/// driver's event index, but sharing one among several chains cost more than it saved on a
/// null device (interleaved runs at depth 32: 2.9-3.2 M IOPS publishing every 4 chains,
/// 1.1-1.2 M every 16, 3.6-3.7 M after each; BENCHMARKS.md).
const PUBLISH_EVERY: usize = 1;

/// How long a parked queue waits before it asks again (the frontend may have dropped the miss,
/// or found no mapping: a guest that made an unmapped IOVA available waits here for ever, as
/// it would with the kernel's vhost, without holding anything up).
const MISS_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// One queue served by a worker thread.
struct Served {
    index: usize,
    /// Declared (so dropped) before `queue`: an engine dropped with I/O in flight waits for the
    /// kernel while the queue's memory registration still holds the regions off retirement.
    engine: Option<Box<dyn Engine>>,
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    device: Arc<dyn Device>,
    poll: bool,
    broken: bool,
    broken_flag: Arc<std::sync::atomic::AtomicBool>,
    done: Vec<(UsedToken, u32)>,
    /// Completions reaped while parked, added to the used ring once the queue runs again.
    stash: Vec<(UsedToken, u32)>,
    /// A reap while parked found a write the dirty log could not record: the queue breaks once
    /// the stash is in the ring.
    stash_error: Option<QueueError>,
    /// Waiting for the frontend to answer an IOTLB miss.
    parked: Option<Parked>,
    channel: Arc<BackendChannel>,
    log_kick: Arc<LogKick>,
    idle: u32,
    /// The last `run` stopped with work left (see `MAX_PASSES`), or the engine could not submit.
    backlog: bool,
}

impl Served {
    fn new(s: QueueStart) -> Self {
        let engine = match s.device.engine(s.index) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(queue = s.index, error = %e, "no I/O engine; requests are handled synchronously");
                None
            }
        };
        let poll = s.poll || s.kick.is_none();
        Self {
            index: s.index,
            queue: s.queue,
            kick: s.kick,
            call: s.call,
            device: s.device,
            engine,
            poll,
            broken: false,
            broken_flag: s.broken,
            done: Vec::new(),
            stash: Vec::new(),
            stash_error: None,
            parked: None,
            channel: s.channel,
            log_kick: s.log_kick,
            idle: 0,
            backlog: false,
        }
    }

    /// One pass over the ring: completions first, then every available chain. Returns how many
    /// chains were popped.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        index: usize,
        call: Option<&File>,
        device: &dyn Device,
        engine: &mut Option<Box<dyn Engine>>,
        done: &mut Vec<(UsedToken, u32)>,
        stash: &mut Vec<(UsedToken, u32)>,
        qb: &mut QueueBatch<'_, '_>,
    ) -> Result<u32, QueueError> {
        let mem = qb.memory();
        qb.add_used_many(stash.drain(..))?;
        if let Some(engine) = engine.as_mut() {
            done.clear();
            let reaped = engine.reap(mem, done);
            qb.add_used_many(done.iter().copied())?;
            // A write the log could not record: the rest are published, the queue breaks.
            reaped?;
        }
        // Completions go out as soon as they are made, not at the end of the pass: a driver
        // that is running sees them while the device works on what follows, so the two sides
        // overlap instead of taking turns (EVENT_IDX keeps this from costing interrupts: one
        // is sent only when the driver has asked for one since the last).
        if qb.publish()? {
            signal(call);
        }
        // Chains are popped, handled and completed by `pop_each` (the cached walker, and the
        // used element written in the same loop), and what completed is published after every
        // `PUBLISH_EVERY`: a running driver sees completions while the device works on what
        // follows, so the two sides overlap instead of taking turns (EVENT_IDX keeps this from
        // costing interrupts: one is sent only when the driver has asked for one since).
        let mut n = 0u32;
        let popped = loop {
            let got = qb.pop_each(PUBLISH_EVERY, |chain| match engine.as_mut() {
                Some(engine) => engine.start(chain, mem, chain.token()),
                None => Some(device.handle(index, chain, mem)),
            });
            match got {
                // An IOTLB miss (or a broken queue): what was started still goes to the kernel.
                Err(e) => break Err(e),
                Ok(k) => {
                    // k <= PUBLISH_EVERY, which fits u32.
                    n += u32::try_from(k).unwrap_or(u32::MAX);
                    if qb.publish()? {
                        signal(call);
                    }
                    if k < PUBLISH_EVERY {
                        break Ok(n);
                    }
                }
            }
        };
        if let Some(engine) = engine.as_mut() {
            if let Err(e) = engine.submit() {
                tracing::error!(queue = index, error = %e, "I/O submission failed");
            }
        }
        popped
    }

    /// Parks the queue on the miss `e` and asks the frontend for the entry.
    fn park(&mut self, generation: u64, e: &QueueError) {
        let Some((iova, perm)) = e.iotlb_miss() else { return };
        tracing::debug!(queue = self.index, iova, ?perm, "IOTLB miss; queue parked");
        self.parked = Some(Parked { generation, iova, perm, asked: std::time::Instant::now() });
        self.ask(iova, perm);
        // Completions already in the engine (their eventfd was read before this pass) are
        // reaped now, not at the next wake-up: an invalidation may be waiting for their pins.
        self.reap_parked();
    }

    /// Reaps what completed while the queue cannot touch its ring; the used elements wait in
    /// `stash`.
    fn reap_parked(&mut self) {
        if let Some(engine) = self.engine.as_mut() {
            // Requests a failed submission left behind hold pins too: an invalidation could wait
            // for them for ever while the queue waits for the frontend.
            if engine.pending_submit() {
                if let Err(e) = engine.submit() {
                    tracing::error!(queue = self.index, error = %e, "I/O submission failed");
                }
            }
            if engine.in_flight() > 0 {
                let stash = &mut self.stash;
                if let Err(e) = self.queue.with_memory(|mem| engine.reap(mem, stash)) {
                    // What was stashed goes into the ring below; the failed request never does.
                    self.stash_error = Some(e);
                }
            }
        }
        if self.stash.is_empty() {
            return;
        }
        // The completions go into the used ring now if the rings are there (the miss was a
        // buffer's): a frontend that never answers must not keep finished requests from the
        // guest. A ring miss leaves them stashed.
        let stash = &mut self.stash;
        let res = self.queue.process(|qb| {
            for (token, len) in stash.drain(..) {
                qb.add_used(token, len)?;
            }
            Ok::<(), QueueError>(())
        });
        match res {
            Ok((Ok(()), notify)) => self.signal(notify),
            Err(e) if e.is_iotlb_miss() => {}
            Ok((Err(e), _)) | Err(e) => self.break_queue(&e),
        }
        if let Some(e) = self.stash_error.take() {
            self.break_queue(&e);
        }
    }

    fn ask(&self, iova: u64, perm: Perm) {
        if let Err(err) = self.channel.iotlb_miss(iova, perm) {
            tracing::warn!(queue = self.index, iova, error = %err, "IOTLB miss not sent; asking again later");
        }
    }

    /// A parked queue: whether it may run again (the IOTLB moved). While it may not, I/O in
    /// flight is still completed, and the miss is sent again now and then.
    fn unpark(&mut self) -> bool {
        let Some(p) = self.parked.as_mut() else { return true };
        if self.queue.iotlb_generation() != p.generation {
            self.parked = None;
            return true;
        }
        if p.asked.elapsed() >= MISS_RETRY {
            p.asked = std::time::Instant::now();
            let (iova, perm) = (p.iova, p.perm);
            self.ask(iova, perm);
        }
        self.reap_parked();
        false
    }

    fn signal(&mut self, notify: bool) {
        if notify {
            signal(self.call.as_ref());
        }
    }

    fn break_queue(&mut self, e: &QueueError) {
        tracing::warn!(queue = self.index, error = %e, "queue broken; it stays stopped until reset");
        if let Some((iova, perm)) = e.iotlb_denied() {
            if let Err(err) = self.channel.iotlb_access_fail(iova, perm) {
                tracing::debug!(error = %err, "IOTLB access failure not reported");
            }
        }
        if let Some(e) = self.engine.as_mut() {
            e.discard();
        }
        self.broken = true;
        self.broken_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Processes the ring until it has nothing more (kick mode: with notifications re-enabled;
    /// poll mode, or `spin`: one pass with notifications off), or for at most `MAX_PASSES`
    /// passes, after which `backlog` says the ring still has work (the thread's other queues and
    /// commands get their turn first). Returns whether it did any work.
    fn run(&mut self, spin: bool) -> bool {
        self.backlog = false;
        if self.broken || !self.unpark() {
            return false;
        }
        let mut worked = false;
        let mut passes = 0u32;
        loop {
            passes += 1;
            let (index, poll) = (self.index, self.poll || spin);
            let generation = self.queue.iotlb_generation();
            let flushes = self.queue.log_flushes();
            let (device, engine, done, stash) = (&*self.device, &mut self.engine, &mut self.done, &mut self.stash);
            let call = self.call.as_ref();
            let res = self.queue.process(|qb| {
                if poll {
                    qb.disable_notification()?;
                }
                let n = Self::pass(index, call, device, engine, done, stash, qb)?;
                let more = if poll { false } else { qb.enable_notification()? };
                Ok::<(u32, bool), QueueError>((n, more))
            });
            match res {
                Ok((Ok((n, more)), notify)) => {
                    self.signal(notify);
                    if self.queue.log_flushes() != flushes {
                        self.log_kick.kick();
                    }
                    worked |= n > 0 || notify;
                    self.backlog = self.engine.as_ref().is_some_and(|e| e.pending_submit());
                    if !more {
                        return worked;
                    }
                    if passes >= MAX_PASSES {
                        self.backlog = true;
                        return worked;
                    }
                }
                Ok((Err(e), notify)) if e.is_iotlb_miss() => {
                    self.signal(notify);
                    self.park(generation, &e);
                    return worked || notify;
                }
                Err(e) if e.is_iotlb_miss() => {
                    self.park(generation, &e);
                    return worked;
                }
                Ok((Err(e), _)) | Err(e) => {
                    self.break_queue(&e);
                    return worked;
                }
            }
        }
    }

    /// Completes every request in flight (before the queue is handed back).
    fn drain(&mut self) {
        // Completions stashed while parked on an IOTLB miss go into the ring too. If the miss was
        // the ring itself, they cannot: the queue breaks (a driver that takes its rings' IOTLB
        // entries back while they are in use).
        loop {
            let in_flight = self.engine.as_ref().is_some_and(|e| e.in_flight() > 0);
            if self.broken || (!in_flight && self.stash.is_empty()) {
                break;
            }
            if let Some(Err(err)) = self.engine.as_mut().filter(|_| in_flight).map(|e| e.wait()) {
                // The requests cannot be completed into the ring: the queue is broken (the
                // guest sees NEEDS_RESET) rather than handed back as if nothing were pending.
                tracing::error!(queue = self.index, error = %err, "waiting for I/O failed");
                self.break_queue(&QueueError::Config { what: "in-flight I/O could not be completed" });
                return;
            }
            let (engine, done, stash) = (&mut self.engine, &mut self.done, &mut self.stash);
            let res = self.queue.process(|qb| {
                let mem = qb.memory();
                for (token, len) in stash.drain(..) {
                    qb.add_used(token, len)?;
                }
                done.clear();
                let reaped = engine.as_mut().map_or(Ok(()), |e| e.reap(mem, done));
                qb.add_used_many(done.iter().copied())?;
                reaped
            });
            match res {
                Ok((Ok(()), notify)) => self.signal(notify),
                Ok((Err(e), _)) | Err(e) => self.break_queue(&e),
            }
        }
    }
}

struct WorkerThread {
    wake: EventFd,
    pending: Arc<std::sync::atomic::AtomicBool>,
    commands: mpsc::Receiver<Command>,
    queues: Vec<Served>,
    /// The current spin window (adaptive, at most `spin_max`).
    spin: std::time::Duration,
    spin_max: std::time::Duration,
}

impl WorkerThread {
    /// Applies pending commands; false when the pool is gone.
    fn commands(&mut self) -> bool {
        // Cleared before the channel is read: a command sent after this is seen next time.
        self.pending.store(false, std::sync::atomic::Ordering::SeqCst);
        loop {
            match self.commands.try_recv() {
                Ok(Command::Start(s)) => {
                    let mut q = Served::new(*s);
                    tracing::debug!(queue = q.index, poll = q.poll, "queue started");
                    // The first pass runs at once: a restarted backend has chains to resubmit
                    // (inflight tracking) or buffers made available while no backend listened.
                    q.run(false);
                    self.queues.push(q);
                }
                Ok(Command::Stop(index, reply)) => {
                    let q = self.queues.iter().position(|q| q.index == index).map(|i| self.queues.swap_remove(i));
                    let _ = reply.send(q.map(|mut q| {
                        q.drain();
                        q.queue
                    }));
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => {
                    for q in &mut self.queues {
                        q.drain();
                    }
                    return false;
                }
            }
        }
    }

    fn run(mut self) {
        loop {
            let polling = self.queues.iter().any(|q| (q.poll || q.backlog) && !q.broken && q.parked.is_none());
            let parked = self.queues.iter().any(|q| q.parked.is_some() && !q.broken);
            let (ready, slept) = {
                // SAFETY: the eventfd lives as long as `self`, beyond this poll call.
                let wake = unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&self.wake)) };
                let mut watched = vec![wake];
                let mut owner = Vec::new();
                for (i, q) in self.queues.iter().enumerate() {
                    if let Some(k) = q.kick.as_ref().filter(|_| !q.poll) {
                        watched.push(k.as_fd());
                        owner.push(i);
                    }
                    if let Some(e) = q.engine.as_ref() {
                        watched.push(e.completion_fd());
                        owner.push(i);
                    }
                }
                let mut fds: Vec<_> =
                    watched.iter().map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)).collect();
                let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
                // A parked queue is looked at again when the IOTLB changes (the control thread
                // wakes every worker) and at least this often, to ask again.
                let retry = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
                let timeout = if polling {
                    Some(&zero)
                } else if parked {
                    Some(&retry)
                } else {
                    None
                };
                let slept_from = std::time::Instant::now();
                let res = rustix::event::poll(&mut fds, timeout);
                let slept = slept_from.elapsed();
                match res {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "worker poll failed; the thread stops");
                        return;
                    }
                }
                let mut ready = vec![false; self.queues.len()];
                let fired: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
                drop(fds);
                for ((fd, &i), &f) in watched[1..].iter().zip(&owner).zip(&fired[1..]) {
                    if f {
                        drain_fd(*fd);
                        ready[i] = true;
                    }
                }
                let wake_ready = fired[0];
                if wake_ready {
                    drain_fd(wake);
                }
                (ready, slept)
            };
            if !polling {
                self.adapt_spin(slept);
            }
            let mut any = false;
            for (q, r) in self.queues.iter_mut().zip(&ready) {
                if *r || q.poll || q.backlog || q.parked.is_some() {
                    let worked = q.run(false);
                    any |= worked;
                    q.idle = if worked { 0 } else { q.idle.saturating_add(1) };
                }
            }
            if !self.commands() {
                return;
            }
            if any && !polling && !self.spin.is_zero() {
                self.spin();
            }
            if polling && self.queues.iter().filter(|q| q.poll).all(|q| q.idle > 100_000) {
                // A long idle stretch: give the core away briefly.
                std::thread::yield_now();
            }
        }
    }
}

/// The longest a worker keeps polling its rings and engines after work before it sleeps in
/// `poll(2)`, as QEMU's iothreads do (`poll-max-ns`): a request that arrives, or an I/O that
/// completes, within it costs no wake-up. QEMU's default is 32 us; Vireo's workers yield the core
/// while they spin idle, so a longer window costs the other threads little, and it covers the
/// time a driver takes to consume a deep queue's completions and refill it (A/B runs in
/// BENCHMARKS.md: at depth 128 on one queue, 100 us gave about twice the IOPS of 32 us).
pub(crate) const SPIN_MAX: std::time::Duration = std::time::Duration::from_micros(100);

/// The longest one spin phase lasts however much work it finds, before the thread goes back to
/// its main loop. Commands end a spin at once (the pending flag) and the spin serves every queue
/// of the thread, so this only bounds how long new fds wait; at 2 ms the extra sleep/wake cycles
/// cost depth-32 throughput in A/B runs.
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a spin stays idle before it starts yielding its core (see `WorkerThread::spin`).
const YIELD_AFTER: std::time::Duration = std::time::Duration::from_micros(8);

/// Passes over one ring in a row before the thread turns to its other queues.
const MAX_PASSES: u32 = 64;

impl WorkerThread {
    /// The window adapts like QEMU's: a sleep shorter than the longest window means spinning
    /// longer would have caught the event (double it, from 4 us); a sleep longer than that means
    /// the spin before it waited in vain (halve it, down to none).
    fn adapt_spin(&mut self, slept: std::time::Duration) {
        if self.spin_max.is_zero() {
            return;
        }
        if slept < self.spin_max {
            self.spin = (self.spin * 2).clamp(std::time::Duration::from_micros(4).min(self.spin_max), self.spin_max);
        } else {
            self.spin /= 2;
            if self.spin < std::time::Duration::from_micros(1) {
                self.spin = std::time::Duration::ZERO;
            }
        }
    }

    /// Polls every queue, notifications off, until the spin window passes without work; then
    /// one pass with notifications on catches what arrived at the end.
    fn spin(&mut self) {
        let window = self.spin;
        let start = std::time::Instant::now();
        let limit = start + SPIN_LIMIT;
        let mut until = start + window;
        let mut last_work = start;
        loop {
            let mut worked = false;
            for q in self.queues.iter_mut() {
                worked |= q.run(true);
            }
            let now = std::time::Instant::now();
            if worked {
                until = now + window;
                last_work = now;
            } else if now >= until {
                break;
            }
            // A command waits (a ring to stop or start), or the spin has gone on long enough:
            // back to the main loop, which looks at commands and every fd.
            if self.pending.load(std::sync::atomic::Ordering::Relaxed) || now >= limit {
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
        for q in self.queues.iter_mut().filter(|q| !q.poll) {
            q.run(false);
        }
    }
}

/// Interrupts the driver through its call eventfd.
fn signal(call: Option<&File>) {
    if let Some(mut c) = call {
        let _ = c.write(&1u64.to_ne_bytes());
    }
}

fn drain_fd(f: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(f, &mut buf);
}
