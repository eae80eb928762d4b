//! DEVICE_STATE transfers (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE): the device's state goes
//! through a descriptor the front-end gave (a pipe, typically), on a thread of its own, since the
//! front-end reads or writes the other end only after Vireo has replied.
//!
//! The front-end controls that descriptor, so the thread never blocks on it: it polls with a
//! short timeout, gives up after `DEADLINE`, and stops at once when the connection ends
//! (`Transfer` is cancelled and joined on drop). A front-end that keeps its end open without
//! reading or writing costs one failed transfer, not a thread for ever.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a transfer waits for the front-end.
const DEADLINE: Duration = Duration::from_secs(30);
/// How long CHECK_DEVICE_STATE waits for a transfer still running.
const CHECK_WAIT: Duration = Duration::from_secs(2);
/// The most state a destination reads (a block device's is a few dozen bytes).
pub const MAX_STATE: usize = 1 << 20;

/// A transfer in progress.
pub struct Transfer {
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Transfer {
    /// Writes `state` to `fd`, then closes it (the front-end reads to end of file).
    pub fn save(fd: File, state: Vec<u8>) -> std::io::Result<Self> {
        Self::spawn(move |cancel| write_all(&fd, &state, cancel))
    }

    /// Reads `fd` to end of file (at most `MAX_STATE` bytes) and hands the bytes to `load`.
    pub fn load(fd: File, load: impl FnOnce(&[u8]) -> Result<(), String> + Send + 'static) -> std::io::Result<Self> {
        Self::spawn(move |cancel| load(&read_to_end(&fd, cancel)?))
    }

    fn spawn(f: impl FnOnce(&AtomicBool) -> Result<(), String> + Send + 'static) -> std::io::Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let thread = {
            let cancel = cancel.clone();
            std::thread::Builder::new().name("vireo-device-state".into()).spawn(move || f(&cancel))?
        };
        Ok(Self { cancel, thread: Some(thread) })
    }

    /// Waits for the transfer and says how it went (CHECK_DEVICE_STATE). The front-end checks
    /// after it has finished its side, so the transfer is done or about to be; one that is not
    /// within `CHECK_WAIT` is cancelled and fails, rather than hold the connection's thread.
    pub fn finish(mut self) -> Result<(), String> {
        let t = Instant::now();
        while self.thread.as_ref().is_some_and(|h| !h.is_finished()) && t.elapsed() < CHECK_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.thread.as_ref().is_some_and(|h| !h.is_finished()) {
            self.cancel.store(true, Relaxed);
            let _ = self.thread.take().map(JoinHandle::join);
            return Err("the transfer had not finished when it was checked".into());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the transfer thread panicked".into()),
            None => Err("no transfer".into()),
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.cancel.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until `fd` is ready for `flags`, for at most 50 ms at a time; false on cancel or
/// deadline.
fn ready(fd: &File, flags: rustix::event::PollFlags, cancel: &AtomicBool, until: Instant) -> bool {
    loop {
        if cancel.load(Relaxed) || Instant::now() >= until {
            return false;
        }
        let mut fds = [rustix::event::PollFd::new(fd, flags)];
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return true, // let the read or write report it
        }
    }
}

fn nonblocking(fd: &File) -> Result<(), String> {
    let flags = rustix::fs::fcntl_getfl(fd.as_fd()).map_err(|e| format!("descriptor flags: {e}"))?;
    rustix::fs::fcntl_setfl(fd.as_fd(), flags | rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| format!("descriptor flags: {e}"))
}

fn write_all(fd: &File, mut data: &[u8], cancel: &AtomicBool) -> Result<(), String> {
    nonblocking(fd)?;
    let until = Instant::now() + DEADLINE;
    while !data.is_empty() {
        if !ready(fd, rustix::event::PollFlags::OUT, cancel, until) {
            return Err("the front-end did not read the state in time".into());
        }
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("writing the state: {e}")),
        }
    }
    Ok(())
}

fn read_to_end(fd: &File, cancel: &AtomicBool) -> Result<Vec<u8>, String> {
    nonblocking(fd)?;
    let until = Instant::now() + DEADLINE;
    let mut state = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if !ready(fd, rustix::event::PollFlags::IN, cancel, until) {
            return Err("the front-end did not finish sending the state in time".into());
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return Ok(state),
            Ok(n) => {
                state.extend_from_slice(&buf[..n]);
                if state.len() > MAX_STATE {
                    return Err("device state larger than 1 MiB".into());
                }
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("reading the state: {e}")),
        }
    }
}
