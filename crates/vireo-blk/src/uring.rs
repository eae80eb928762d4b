//! The io_uring engine: one ring per queue. Reads and writes are submitted as `readv`/`writev`
//! on the guest's buffers, flushes as `fsync(DATASYNC)`; completions arrive out of order and are
//! reaped by the queue's worker, which then writes the status byte and adds the used element.
//!
//! A request in flight holds an [`IoPin`] on every guest region its buffers touch, so the kernel
//! never reads or writes a mapping the frontend has taken back: an invalidation waits for the
//! reap. Everything else (GET_ID, DISCARD, WRITE_ZEROES, refused requests) runs synchronously.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vireo_memory::{Batch, GuestPhysAddr, GuestSlice, IoPin};
use vireo_queue::{Chain, QueueError, UsedToken};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{data_iovecs, req, Inner, Storage, S_IOERR, S_OK};

/// O_DIRECT wants buffers, lengths and offsets aligned to the logical block size; 512 is what
/// every device Linux supports accepts at least.
const DIRECT_ALIGN: usize = 512;

#[derive(Debug)]
struct Request {
    token: UsedToken,
    /// Bytes the kernel must transfer for success (0 for a flush).
    expected: usize,
    /// A read: the data lands in the writable part.
    read: bool,
    /// Host address of the status byte: valid while `_pins` hold its region (an address looked
    /// up again at the reap could meet a new memory table or IOTLB).
    status: std::ptr::NonNull<u8>,
    writable_len: u32,
    /// The writable segments, for the dirty log.
    writable: Vec<(GuestPhysAddr, u32)>,
    /// The kernel reads this array at submission; it lives until the reap to be safe.
    iov: Vec<libc::iovec>,
    _pins: Vec<IoPin>,
}

// SAFETY: the iovecs point into guest memory that the pins keep mapped; they are only handed to
// the kernel, never dereferenced by Rust, so moving the request between threads is sound.
unsafe impl Send for Request {}

/// A queue's io_uring.
pub(crate) struct UringEngine {
    ring: IoUring,
    event: EventFd,
    dev: Arc<Inner>,
    queue: usize,
    slab: Vec<Option<Request>>,
    free: Vec<usize>,
    in_flight: usize,
    unsubmitted: usize,
    cqes: Vec<(u64, i32)>,
}

impl UringEngine {
    pub(crate) fn new(dev: Arc<Inner>, queue: usize) -> std::io::Result<Self> {
        let entries = u32::from(dev.cfg.queue_size.max(1)).next_power_of_two();
        let ring = IoUring::new(entries)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Self {
            ring,
            event,
            dev,
            queue,
            slab: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            unsubmitted: 0,
            cqes: Vec::new(),
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the entry's buffers (the iovec array in the slab and the guest memory it
            // names, pinned) stay valid until its completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
    }

    /// Plans an asynchronous read, write or flush; `None` sends the chain to the synchronous
    /// path (other request types, refusals, out-of-range or malformed requests).
    fn plan(&self, chain: &Chain<'_>) -> Option<(u32, u64)> {
        let Storage::File { .. } = &self.dev.storage else { return None };
        if chain.writable_len() == 0 {
            return None;
        }
        let (kind, sector) = Inner::header(chain)?;
        if kind == req::FLUSH {
            return Some((kind, 0));
        }
        // Refusals and empty transfers are answered by the synchronous path.
        let (off, len) = self.dev.rw_extent(kind, sector, chain)?;
        (len > 0).then_some((kind, off))
    }

    fn finish(
        &mut self,
        slot: usize,
        res: i32,
        mem: &Batch<'_>,
        out: &mut Vec<(UsedToken, u32)>,
    ) -> Result<(), QueueError> {
        let Some(r) = self.slab.get_mut(slot).and_then(Option::take) else {
            tracing::error!(queue = self.queue, slot, "io_uring completion for no request");
            return Ok(());
        };
        self.free.push(slot);
        self.in_flight -= 1;
        let ok = usize::try_from(res).is_ok_and(|n| n == r.expected);
        if !ok {
            tracing::warn!(queue = self.queue, res, expected = r.expected, "I/O failed");
        }
        let status = if ok { S_OK } else { S_IOERR };
        // SAFETY: `r.status` points at a byte inside a buffer of the chain, in a region the
        // request's pins keep mapped (and, behind an IOTLB, translated) until `r` is dropped
        // below; the slice lives only for this write.
        let view = unsafe { GuestSlice::new(r.status, 1) };
        if let Err(e) = view.write(0, status) {
            tracing::warn!(queue = self.queue, error = %e, "status byte not writable");
        }
        // The used length, as the synchronous path counts it.
        let written =
            if ok && r.read { u32::try_from(r.expected).unwrap_or(u32::MAX).saturating_add(1) } else { r.writable_len };
        if mem.logging() {
            let mut left = written;
            for &(gpa, len) in &r.writable {
                let n = len.min(left);
                if n == 0 {
                    break;
                }
                // Not completed: a write the log lacks is never exposed (`Engine::reap`).
                mem.log_write(gpa, u64::from(n)).map_err(|e| QueueError::mem(gpa, u64::from(n), e))?;
                left -= n;
            }
        }
        out.push((r.token, written));
        // Dropping `r` releases its pins: an invalidation waiting for them may now go on.
        Ok(())
    }
}

fn aligned(iov: &[libc::iovec], off: u64) -> bool {
    off.is_multiple_of(DIRECT_ALIGN as u64)
        && iov.iter().all(|v| (v.iov_base as usize).is_multiple_of(DIRECT_ALIGN) && v.iov_len % DIRECT_ALIGN == 0)
}

/// Reads the completion eventfd so that it polls quiet again.
pub(crate) fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
}

/// What the queue's handler calls, per batch: [`UringEngine::reap`] (finished requests become
/// used elements), [`UringEngine::start`] for each chain it pops, then [`UringEngine::submit`].
/// A started request holds I/O pins on the guest regions its buffers are in
/// (`Chain::io_pins`): an invalidation of those regions waits until the request is reaped, so the
/// kernel never reads or writes memory the frontend has taken back. Reaping needs nothing the
/// invalidating side holds.
impl UringEngine {
    /// Starts `chain`: `Some(len)` when it completed at once (the caller logs `len` written
    /// bytes and adds the used element), `None` when it is in flight and [`UringEngine::reap`]
    /// will return `token` later.
    pub(crate) fn start(&mut self, chain: &Chain<'_>, mem: &Batch<'_>, token: UsedToken) -> Option<u32> {
        let Some((kind, off)) = self.plan(chain) else { return Some(self.dev.handle_sync(chain)) };
        let mut pins = Vec::with_capacity(2);
        chain.io_pins(mem, &mut pins);
        let mut writable = Vec::new();
        let mut status = None;
        for i in 0..chain.segments() {
            let Some((gpa, w, s)) = chain.segment(i) else { return Some(self.dev.handle_sync(chain)) };
            if w {
                let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
                writable.push((gpa, len));
                // Segments are never empty; the last byte of the last writable one.
                status = std::ptr::NonNull::new(s.as_ptr().wrapping_add(s.len() - 1));
            }
        }
        // No writable byte for the status (plan() refused those already): synchronous path.
        let Some(status) = status else { return Some(self.dev.handle_sync(chain)) };
        let read = kind == req::IN;
        let mut iov = Vec::with_capacity(chain.segments());
        if kind != req::FLUSH {
            data_iovecs(chain, !read, &mut iov);
        }
        let expected = iov.iter().map(|v| v.iov_len).sum();
        let file = match &self.dev.storage {
            Storage::File { file, .. } => file,
            Storage::Null { .. } => return Some(self.dev.handle_sync(chain)),
        };
        // A read into guest RAM that is a file on a filesystem goes through the page cache:
        // the kernel would otherwise write into those pages through a pin, behind the
        // filesystem's back (`MemoryMap::has_file_pages`).
        let fd = match &self.dev.direct {
            Some(d) if kind != req::FLUSH && aligned(&iov, off) && !(read && mem.has_file_pages()) => d.as_raw_fd(),
            _ => file.as_raw_fd(),
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slab.push(None);
            self.slab.len() - 1
        });
        let iov_len = u32::try_from(iov.len()).unwrap_or(u32::MAX);
        let request =
            Request { token, expected, read, status, writable_len: chain.writable_len(), writable, iov, _pins: pins };
        let iov_ptr = request.iov.as_ptr();
        self.slab[slot] = Some(request);
        let entry = match kind {
            req::IN => opcode::Readv::new(types::Fd(fd), iov_ptr, iov_len).offset(off).build(),
            req::OUT => opcode::Writev::new(types::Fd(fd), iov_ptr, iov_len).offset(off).build(),
            _ => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(slot as u64);
        self.in_flight += 1;
        if let Err(e) = self.push(entry) {
            tracing::error!(queue = self.queue, error = %e, "io_uring submission failed; request done synchronously");
            self.slab[slot] = None;
            self.free.push(slot);
            self.in_flight -= 1;
            return Some(self.dev.handle_sync(chain));
        }
        None
    }

    /// Hands the requests started since the last call to the kernel.
    pub(crate) fn submit(&mut self) -> std::io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Finishes the requests that completed: writes their status into guest memory through
    /// the pointer their pins keep valid, logs what they wrote, releases their pins, and appends
    /// `(token, used length)`. A request whose writes the dirty log cannot record (a log smaller
    /// than guest memory) is finished but not appended, and the error is returned after the
    /// others are: the caller publishes what was appended and breaks the queue, so a write the
    /// log lacks is never exposed (as on the synchronous path).
    pub(crate) fn reap(&mut self, mem: &Batch<'_>, out: &mut Vec<(UsedToken, u32)>) -> Result<(), QueueError> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        // Every completion is finished (its pins released) whatever the others' outcome.
        let mut first_error = Ok(());
        for &(ud, res) in &cqes {
            let r = self.finish(usize::try_from(ud).unwrap_or(usize::MAX), res, mem, out);
            if first_error.is_ok() {
                first_error = r;
            }
        }
        self.cqes = cqes;
        first_error
    }

    /// Becomes readable when requests complete; reading 8 bytes from it re-arms it.
    pub(crate) fn completion_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd lives as long as `self`, which the borrow is tied to.
        unsafe { BorrowedFd::borrow_raw(self.event.as_raw_fd()) }
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Blocks until at least one request in flight has completed (draining on stop).
    pub(crate) fn wait(&mut self) -> std::io::Result<()> {
        // A signal (SIGINT/SIGTERM have handlers) interrupts the wait; it is not a failure.
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.unsubmitted = 0;
        Ok(())
    }

    /// Requests started but not yet handed to the kernel (a submission failed and must be
    /// retried): the handler runs again without waiting for a kick.
    pub(crate) fn pending_submit(&self) -> bool {
        self.unsubmitted > 0
    }

    /// Waits for every request in flight and drops them without touching guest memory (the
    /// queue broke: nothing more is written to it); their pins are released as each completes.
    ///
    /// A request's pins go only with its completion: until the kernel says it is done it may
    /// still write into the guest buffers, and a region unmapped under it could be mapped again
    /// by the next memory table, which the kernel would then write into. So an error from the
    /// ring does not end the wait (the loop reaps what is there and tries again, backing off):
    /// when in doubt the region stays mapped, and the invalidation that needs it waits.
    pub(crate) fn discard(&mut self) {
        let queue = self.queue;
        let mut in_flight = self.in_flight;
        wait_out(
            self,
            &mut in_flight,
            |this| {
                let r = this.ring.submit_and_wait(1).map(|_| ());
                this.unsubmitted = 0;
                r
            },
            |this| {
                let mut reaped = 0;
                let done: Vec<u64> = this.ring.completion().map(|c| c.user_data()).collect();
                for ud in done {
                    if let Some(slot) = usize::try_from(ud).ok().filter(|&s| s < this.slab.len()) {
                        if this.slab[slot].take().is_some() {
                            this.free.push(slot);
                            reaped += 1;
                        }
                    }
                }
                this.in_flight -= reaped;
                reaped
            },
            |failures, e, left| {
                if failures == 1 {
                    tracing::error!(queue, error = %e, in_flight = left, "waiting for I/O to discard failed; retrying");
                }
            },
        );
    }
}

/// Waits until `in_flight` requests have all been reaped: `wait` blocks for at least one
/// completion, `reap` takes the completions there are and says how many. An error from `wait`
/// does not end the wait (see [`UringEngine::discard`]): it is reported (`report` with the count
/// of failures in a row) and retried after a back-off that grows to 100 ms, so that a persistent
/// error does not spin.
fn wait_out<S>(
    state: &mut S,
    in_flight: &mut usize,
    mut wait: impl FnMut(&mut S) -> std::io::Result<()>,
    mut reap: impl FnMut(&mut S) -> usize,
    mut report: impl FnMut(u32, &std::io::Error, usize),
) {
    let mut failures = 0u32;
    while *in_flight > 0 {
        match wait(state) {
            Ok(()) => failures = 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                failures = failures.saturating_add(1);
                report(failures, &e, *in_flight);
                // EBUSY (completions to reap first), EAGAIN or ENOMEM pass; the reap below
                // makes room, and the back-off keeps a persistent error from spinning.
                std::thread::sleep(std::time::Duration::from_millis(u64::from(failures.min(100))));
            }
        }
        *in_flight = in_flight.saturating_sub(reap(state));
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for requests in flight: wait for them
        // before their pins (and the ring) go.
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::wait_out;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// The ring's wait failing (as `submit_and_wait` can with EBUSY, ENOMEM or worse) does not
    /// end the wait for requests in flight: their pins, and the guest memory the kernel may still
    /// write into, stay until every one is reaped. (The earlier drain returned at the first such
    /// error with requests in flight, and the ring and the pins went with it.)
    #[test]
    fn an_error_from_the_ring_does_not_end_the_wait_for_requests_in_flight() {
        // Two requests the "kernel" completes 60 ms from now; every wait before then fails.
        let completes_at = Instant::now() + Duration::from_millis(60);
        let completed = Arc::new(AtomicUsize::new(0));
        let mut in_flight = 2usize;
        let (mut waits, mut errors) = (0u32, 0u32);
        wait_out(
            &mut (),
            &mut in_flight,
            |()| {
                waits += 1;
                if Instant::now() < completes_at {
                    Err(std::io::Error::from_raw_os_error(libc::EBADF))
                } else {
                    completed.store(2, Ordering::Relaxed);
                    Ok(())
                }
            },
            |()| completed.swap(0, Ordering::Relaxed),
            |failures, _, left| {
                errors = failures;
                assert_eq!(left, 2, "nothing was reaped while the ring failed");
            },
        );
        assert_eq!(in_flight, 0);
        assert!(Instant::now() >= completes_at, "returned before the requests completed");
        assert!(errors >= 2 && waits > errors, "the failing waits were retried ({errors} errors, {waits} waits)");
    }

    /// Interrupted waits are retried at once, and completions reaped one at a time count down.
    #[test]
    fn interrupted_waits_retry_and_completions_count_down() {
        let mut in_flight = 3usize;
        let mut calls = 0u32;
        wait_out(
            &mut (),
            &mut in_flight,
            |()| {
                calls += 1;
                if calls % 2 == 1 {
                    Err(std::io::Error::from(std::io::ErrorKind::Interrupted))
                } else {
                    Ok(())
                }
            },
            |()| 1,
            |_, e, _| panic!("an interrupted wait is not a failure: {e}"),
        );
        assert_eq!(in_flight, 0);
        assert_eq!(calls, 6);
    }
}
