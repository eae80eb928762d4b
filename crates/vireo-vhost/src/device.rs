//! What a device implements to be served by the backend.

use std::os::fd::BorrowedFd;

use vireo_memory::Batch;
use vireo_queue::{Chain, QueueError, UsedToken};

/// A virtio device served over vhost-user.
///
/// Requests are handled on the queue's worker thread: synchronously through
/// [`Device::handle`], or, when the device gives the queue an [`Engine`], started there and
/// completed later (out of order), as an io_uring backend does.
pub trait Device: Send + Sync + 'static {
    /// Device-specific virtio feature bits offered (transport bits are added by the backend).
    fn features(&self) -> u64;
    /// The device configuration space.
    fn config(&self) -> Vec<u8>;
    /// How many queues the device has.
    fn num_queues(&self) -> usize;
    /// The largest queue size it accepts.
    fn max_queue_size(&self) -> u16;
    /// Handles one chain from queue `queue`; returns how many bytes it wrote into the chain's
    /// writable part (the used length). `mem` is the batch's memory, for logging.
    fn handle(&self, queue: usize, chain: &Chain<'_>, mem: &Batch<'_>) -> u32;
    /// The device's state for a migration (vhost-user DEVICE_STATE), saved on the source with
    /// every ring stopped; what the destination's [`Device::load_state`] takes. The default is
    /// no state.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes a source's state on the destination: an error (a state this device cannot take:
    /// another disk, say) fails the migration through CHECK_DEVICE_STATE before the guest runs
    /// here. The default takes only an empty state.
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes of device state for a device that has none", state.len()))
        }
    }
    /// An asynchronous engine for queue `queue`, or `None` to handle every chain synchronously.
    /// Called each time the queue starts; the engine lives as long as the queue's worker.
    fn engine(&self, queue: usize) -> std::io::Result<Option<Box<dyn Engine>>> {
        let _ = queue;
        Ok(None)
    }
}

/// A queue's asynchronous request engine.
///
/// The worker calls, per batch: [`Engine::reap`] (finished requests become used elements),
/// [`Engine::start`] for each chain it pops, then [`Engine::submit`]. A started request holds
/// I/O pins on the guest regions its buffers are in (`Batch::io_pin`): an invalidation of those
/// regions waits until the request is reaped, so the kernel never reads or writes memory the
/// frontend has taken back. Reaping needs nothing the invalidating side holds.
pub trait Engine: Send {
    /// Starts `chain`: `Some(len)` when it completed at once (the worker logs `len` written
    /// bytes and adds the used element), `None` when it is in flight and [`Engine::reap`] will
    /// return `token` later.
    fn start(&mut self, chain: &Chain<'_>, mem: &Batch<'_>, token: UsedToken) -> Option<u32>;
    /// Hands the requests started since the last call to the kernel.
    fn submit(&mut self) -> std::io::Result<()>;
    /// Finishes the requests that completed: writes their status into guest memory through
    /// `mem`, logs what they wrote, releases their pins, and appends `(token, used length)`.
    /// A request whose writes the dirty log cannot record (a log smaller than guest memory) is
    /// finished but not appended, and the error is returned after the others are: the worker
    /// publishes what was appended and breaks the queue, so a write the log lacks is never
    /// exposed (as on the synchronous path).
    fn reap(&mut self, mem: &Batch<'_>, out: &mut Vec<(UsedToken, u32)>) -> Result<(), QueueError>;
    /// A file descriptor that becomes readable when requests complete (the worker polls it with
    /// the kick); reading 8 bytes from it re-arms it.
    fn completion_fd(&self) -> BorrowedFd<'_>;
    /// Requests in flight.
    fn in_flight(&self) -> usize;
    /// Blocks until at least one request in flight has completed (draining on stop).
    fn wait(&mut self) -> std::io::Result<()>;
    /// Waits for every request in flight and drops them without touching guest memory (the
    /// queue broke: nothing more is written to it); their pins are released.
    fn discard(&mut self);
    /// Requests started but not yet handed to the kernel (a submission failed and must be
    /// retried): the worker comes back without waiting for a kick.
    fn pending_submit(&self) -> bool {
        false
    }
}
