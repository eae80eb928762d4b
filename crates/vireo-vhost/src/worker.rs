//! A queue's worker thread: wait for a kick, process the queue in batches, signal the call
//! eventfd, until told to stop. The thread owns the `Queue` and hands it back when it ends, so
//! that GET_VRING_BASE can read its position.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vireo_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::device::Device;

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
        let thread = std::thread::Builder::new().name(format!("vireo-queue-{index}")).spawn(move || {
            if poll {
                run_polling(index, queue, call, &stopping2, device)
            } else {
                run(index, queue, kick, call, stop2, device)
            }
        })?;
        Ok(Self { stop, stopping, thread })
    }

    /// Stops the worker and waits for it: from here no thread touches the queue.
    pub fn stop(self) -> Option<Queue> {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// Busy-polling: process the ring continuously with driver notifications off, until stopped.
fn run_polling(
    index: usize,
    mut queue: Queue,
    mut call: Option<File>,
    stop: &AtomicBool,
    device: Arc<dyn Device>,
) -> Queue {
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let res = queue.process(|qb| {
            qb.disable_notification()?;
            let mem = qb.memory();
            let mut n = 0u32;
            while let Some(chain) = qb.pop()? {
                let written = device.handle(index, &chain, mem);
                chain.log_written(mem, written)?;
                let token = chain.token();
                qb.add_used(token, written)?;
                n += 1;
            }
            Ok::<u32, vireo_queue::QueueError>(n)
        });
        match res {
            Ok((Ok(n), notify)) => {
                if notify {
                    if let Some(c) = call.as_mut() {
                        let _ = c.write(&1u64.to_ne_bytes());
                    }
                }
                // Spin while there is work; after a long idle stretch give the core away briefly.
                idle = if n == 0 { idle.saturating_add(1) } else { 0 };
                if idle > 100_000 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            Ok((Err(e), _)) | Err(e) => {
                tracing::warn!(queue = index, error = %e, "queue broken; it stays stopped until reset");
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
    queue
}

fn drain(f: &File) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(f, &mut buf);
}

fn run(
    index: usize,
    mut queue: Queue,
    kick: File,
    mut call: Option<File>,
    stop: EventFd,
    device: Arc<dyn Device>,
) -> Queue {
    // SAFETY: `stop` lives for the whole loop.
    let stop_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&stop)) };
    let kick_fd = kick.as_fd();
    let mut broken = false;
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&kick_fd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&stop_fd, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(queue = index, error = %e, "poll failed; worker stops");
                return queue;
            }
        }
        if !fds[1].revents().is_empty() {
            return queue;
        }
        drain(&kick);
        if broken {
            continue;
        }
        loop {
            let res = queue.process(|qb| {
                let mem = qb.memory();
                while let Some(chain) = qb.pop()? {
                    let written = device.handle(index, &chain, mem);
                    chain.log_written(mem, written)?;
                    let token = chain.token();
                    qb.add_used(token, written)?;
                }
                qb.enable_notification()
            });
            match res {
                Ok((Ok(more), notify)) => {
                    if notify {
                        if let Some(c) = call.as_mut() {
                            let _ = c.write(&1u64.to_ne_bytes());
                        }
                    }
                    if !more {
                        break;
                    }
                }
                Ok((Err(e), _)) | Err(e) => {
                    tracing::warn!(queue = index, error = %e, "queue broken; it stays stopped until reset");
                    broken = true;
                    break;
                }
            }
        }
    }
}
