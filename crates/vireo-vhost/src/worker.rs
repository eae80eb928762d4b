//! A queue's worker thread: wait for a kick (or a completion of its engine), process the queue
//! in batches, signal the call eventfd, until told to stop. The thread owns the `Queue` and hands
//! it back when it ends, so that GET_VRING_BASE can read its position.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vireo_queue::{Queue, QueueBatch, QueueError, UsedToken};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, Engine};

/// A running queue.
pub(crate) struct Worker {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<Queue>,
}

impl Worker {
    /// Starts a worker; with `poll` it busy-polls the ring (no kicks, one core per queue).
    pub fn start(
        index: usize,
        queue: Queue,
        kick: File,
        call: Option<File>,
        device: Arc<dyn Device>,
        poll: bool,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(0)?;
        let stop2 = stop.try_clone()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stopping2 = stopping.clone();
        let engine = device.engine(index)?;
        let thread = std::thread::Builder::new().name(format!("vireo-queue-{index}")).spawn(move || {
            let mut w = Work { index, device, engine, call, done: Vec::new() };
            let mut queue = queue;
            if poll {
                w.run_polling(&mut queue, &stopping2);
            } else {
                w.run(&mut queue, &kick, &stop2);
            }
            w.drain(&mut queue);
            queue
        })?;
        Ok(Self { stop, stopping, thread })
    }

    /// Stops the worker and waits for it: from here no thread touches the queue, and no request
    /// of it is in flight.
    pub fn stop(self) -> Option<Queue> {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

struct Work {
    index: usize,
    device: Arc<dyn Device>,
    engine: Option<Box<dyn Engine>>,
    call: Option<File>,
    done: Vec<(UsedToken, u32)>,
}

impl Work {
    /// One pass over the ring: completions first, then every available chain. Returns how many
    /// chains were popped.
    fn pass(&mut self, qb: &mut QueueBatch<'_, '_>) -> Result<u32, QueueError> {
        let mem = qb.memory();
        if let Some(engine) = self.engine.as_mut() {
            self.done.clear();
            engine.reap(mem, &mut self.done);
            for &(token, len) in &self.done {
                qb.add_used(token, len)?;
            }
        }
        let mut n = 0u32;
        while let Some(chain) = qb.pop()? {
            let token = chain.token();
            let finished = match self.engine.as_mut() {
                Some(engine) => engine.start(&chain, mem, token),
                None => Some(self.device.handle(self.index, &chain, mem)),
            };
            if let Some(written) = finished {
                chain.log_written(mem, written)?;
                qb.add_used(token, written)?;
            }
            n += 1;
        }
        if let Some(engine) = self.engine.as_mut() {
            if let Err(e) = engine.submit() {
                tracing::error!(queue = self.index, error = %e, "I/O submission failed");
            }
        }
        Ok(n)
    }

    fn signal(&mut self, notify: bool) {
        if notify {
            if let Some(c) = self.call.as_mut() {
                let _ = c.write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Completes every request in flight before the queue is handed back.
    fn drain(&mut self, queue: &mut Queue) {
        while self.engine.as_ref().is_some_and(|e| e.in_flight() > 0) {
            if let Some(e) = self.engine.as_mut() {
                if let Err(err) = e.wait() {
                    tracing::error!(queue = self.index, error = %err, "waiting for I/O failed");
                    return;
                }
            }
            let res = queue.process(|qb| {
                let mem = qb.memory();
                self.done.clear();
                if let Some(e) = self.engine.as_mut() {
                    e.reap(mem, &mut self.done);
                }
                for &(token, len) in &self.done {
                    qb.add_used(token, len)?;
                }
                Ok::<(), QueueError>(())
            });
            match res {
                Ok((Ok(()), notify)) => self.signal(notify),
                Ok((Err(e), _)) | Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "queue broken while draining");
                    if let Some(e) = self.engine.as_mut() {
                        e.discard();
                    }
                    return;
                }
            }
        }
    }

    /// Busy-polling: process the ring continuously with driver notifications off, until stopped.
    fn run_polling(&mut self, queue: &mut Queue, stop: &AtomicBool) {
        let mut idle = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let res = queue.process(|qb| {
                qb.disable_notification()?;
                self.pass(qb)
            });
            match res {
                Ok((Ok(n), notify)) => {
                    self.signal(notify);
                    // Spin while there is work; after a long idle stretch give the core away.
                    let busy = n > 0 || self.engine.as_ref().is_some_and(|e| e.in_flight() > 0);
                    idle = if busy { 0 } else { idle.saturating_add(1) };
                    if idle > 100_000 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Ok((Err(e), _)) | Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "queue broken; it stays stopped until reset");
                    if let Some(e) = self.engine.as_mut() {
                        e.discard();
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        }
    }

    fn run(&mut self, queue: &mut Queue, kick: &File, stop: &EventFd) {
        // SAFETY: `stop` lives for the whole loop.
        let stop_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(stop)) };
        let kick_fd = kick.as_fd();
        let mut broken = false;
        // The first pass runs without waiting for a kick: a restarted backend has chains to
        // resubmit (inflight tracking) or buffers made available while no backend listened.
        let mut first = true;
        loop {
            if !first {
                let engine_fd = self.engine.as_ref().map(|e| e.completion_fd());
                let mut fds = vec![
                    rustix::event::PollFd::new(&kick_fd, rustix::event::PollFlags::IN),
                    rustix::event::PollFd::new(&stop_fd, rustix::event::PollFlags::IN),
                ];
                if let Some(fd) = engine_fd.as_ref() {
                    fds.push(rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN));
                }
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::error!(queue = self.index, error = %e, "poll failed; worker stops");
                        return;
                    }
                }
                if !fds[1].revents().is_empty() {
                    return;
                }
                let engine_ready = fds.get(2).is_some_and(|f| !f.revents().is_empty());
                drop(fds);
                drain_fd(kick_fd);
                if engine_ready {
                    if let Some(fd) = engine_fd {
                        drain_fd(fd);
                    }
                }
            }
            first = false;
            if broken {
                continue;
            }
            loop {
                let res = queue.process(|qb| {
                    self.pass(qb)?;
                    qb.enable_notification()
                });
                match res {
                    Ok((Ok(more), notify)) => {
                        self.signal(notify);
                        if !more {
                            break;
                        }
                    }
                    Ok((Err(e), _)) | Err(e) => {
                        tracing::warn!(queue = self.index, error = %e, "queue broken; it stays stopped until reset");
                        if let Some(e) = self.engine.as_mut() {
                            e.discard();
                        }
                        broken = true;
                        break;
                    }
                }
            }
        }
    }
}

fn drain_fd(f: std::os::fd::BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(f, &mut buf);
}
