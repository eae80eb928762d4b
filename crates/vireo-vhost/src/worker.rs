//! A queue's worker thread: wait for a kick, process the queue in batches, signal the call
//! eventfd, until told to stop. The thread owns the `Queue` and hands it back when it ends, so
//! that GET_VRING_BASE can read its position.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vireo_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::device::Device;

/// A running queue.
pub(crate) struct Worker {
    stop: EventFd,
    thread: JoinHandle<Queue>,
}

impl Worker {
    pub fn start(
        index: usize,
        queue: Queue,
        kick: File,
        call: Option<File>,
        device: Arc<dyn Device>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(0)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("vireo-queue-{index}"))
            .spawn(move || run(index, queue, kick, call, stop2, device))?;
        Ok(Self { stop, thread })
    }

    /// Stops the worker and waits for it: from here no thread touches the queue.
    pub fn stop(self) -> Option<Queue> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
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
