//! What a device implements to be served by the backend.

use vireo_memory::Batch;
use vireo_queue::Chain;

/// A virtio device served over vhost-user. Requests are handled synchronously, one chain at a
/// time, on the queue's worker thread.
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
}
