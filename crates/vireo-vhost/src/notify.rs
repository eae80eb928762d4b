//! Eventfds the frontend hands over (kick, call, error, SET_LOG_FD): checked when they arrive,
//! and used so that nothing the frontend does with them can block a thread of ours.
//!
//! An eventfd write blocks when its counter would pass `u64::MAX - 1` and the descriptor is
//! blocking: a frontend can hand over an eventfd whose counter it set one below that and never
//! read it. A worker blocked there would hold its batch, and the next invalidation with it, for
//! ever. So every eventfd we write is made non-blocking on arrival (`O_NONBLOCK` is a property of
//! the open file description, which the frontend shares; QEMU, DPDK and rust-vmm all create
//! theirs non-blocking anyway), and a write that would block is dropped: the counter is already
//! non-zero, so the reader has a wake-up pending in any case.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

/// Why a descriptor was refused.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// Not an eventfd (a pipe, a file, a socket...).
    #[error("not an eventfd ({0})")]
    NotEventfd(String),
    /// Its flags could not be read or set.
    #[error("descriptor flags: {0}")]
    Flags(#[from] rustix::io::Errno),
}

/// Checks that `fd` is an eventfd and makes it non-blocking. A kick that is a regular file
/// would always poll readable (a worker spinning for ever); a call that is a pipe could fill.
pub fn adopt_eventfd(fd: &File) -> Result<(), FdError> {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    let kind = std::fs::read_link(&path).map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string());
    if kind != "anon_inode:[eventfd]" {
        return Err(FdError::NotEventfd(kind));
    }
    let flags = rustix::fs::fcntl_getfl(fd)?;
    if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
        rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(())
}

/// A non-blocking eventfd we signal (a queue's call, the dirty log's kick).
#[derive(Debug)]
pub struct EventNotifier(File);

impl EventNotifier {
    /// Signals through `fd`, an eventfd made non-blocking by [`adopt_eventfd`]; whatever it is,
    /// [`EventNotifier::notify`] never waits.
    pub fn new(fd: File) -> Self {
        Self(fd)
    }

    /// Adds 1 to the counter. EAGAIN (the counter is at its maximum: a wake-up is pending
    /// anyway) and every other error are dropped: the frontend owns this descriptor, and nothing
    /// it does with it may stop the caller.
    pub fn notify(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }
}

/// Reads a kick (or any readable eventfd) so that it polls quiet again; never blocks on a
/// non-blocking descriptor, whatever the frontend wrote.
pub(crate) fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
}

/// SET_LOG_FD's eventfd: kicked after a queue has set bits in the dirty log (a frontend that
/// asks for it syncs the log when kicked).
#[derive(Debug, Default)]
pub struct LogKick {
    fd: Mutex<Option<EventNotifier>>,
}

impl LogKick {
    /// The eventfd to kick (replacing any earlier one), or none.
    pub fn set(&self, fd: Option<File>) {
        *self.fd.lock().unwrap_or_else(|e| e.into_inner()) = fd.map(EventNotifier::new);
    }

    /// Signals the eventfd, if there is one (never blocks).
    pub fn kick(&self) {
        if let Some(n) = self.fd.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            n.notify();
        }
    }
}

impl AsFd for EventNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_eventfds_are_adopted_and_a_full_one_never_blocks() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(matches!(adopt_eventfd(&File::from(r)), Err(FdError::NotEventfd(_))));
        let f = tempfile_in_tmp();
        assert!(adopt_eventfd(&f).is_err());
        // A blocking eventfd one below its maximum: a blocking write would never return.
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::empty()).unwrap();
        rustix::io::write(&efd, &(u64::MAX - 2).to_ne_bytes()).unwrap();
        let efd = File::from(efd);
        adopt_eventfd(&efd).unwrap();
        let n = EventNotifier::new(efd.try_clone().unwrap());
        n.notify(); // reaches u64::MAX - 1
        n.notify(); // would block: dropped
        let mut buf = [0u8; 8];
        rustix::io::read(&efd, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), u64::MAX - 1);
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("vireo-notify-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
