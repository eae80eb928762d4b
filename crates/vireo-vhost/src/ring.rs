//! A started queue as its worker thread holds it ([`Ring`]): the `Queue`, its kick and call
//! descriptors, and what every device must handle the same way around a batch: interrupts, the
//! dirty log's eventfd, IOTLB misses (the queue is parked, not blocked) and broken queues.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_memory::{Batch, Perm};
use vireo_queue::{Queue, QueueBatch, QueueError};

use crate::channel::BackendChannel;
use crate::notify::{EventNotifier, LogKick};

/// How long a parked queue waits before it asks again (the frontend may have dropped the miss,
/// or found no mapping: a guest that made an unmapped IOVA available waits here for ever, as
/// it would with the kernel's vhost, without holding anything up).
const MISS_RETRY: Duration = Duration::from_millis(500);

/// Batches in a row one [`Ring::serve`] runs before it returns with work left (the thread's
/// other queues and commands get their turn first).
const MAX_PASSES: u32 = 64;

/// A queue's call eventfd: interrupts the driver. Never blocks (`EventNotifier`).
#[derive(Debug, Default)]
pub struct Call(Option<EventNotifier>);

impl Call {
    pub(crate) fn new(fd: Option<File>) -> Self {
        Self(fd.map(EventNotifier::new))
    }

    /// Interrupts the driver.
    pub fn signal(&self) {
        if let Some(n) = &self.0 {
            n.notify();
        }
    }
}

/// Publishes the used elements added so far and interrupts the driver if it asked for it.
pub fn publish(qb: &mut QueueBatch<'_, '_>, call: &Call) -> Result<(), QueueError> {
    if qb.publish()? {
        call.signal();
    }
    Ok(())
}

/// A queue waiting for an IOTLB entry. It is not processed (nothing of the chain that missed
/// was consumed; it is walked again from the start) until the IOTLB generation moves past
/// `generation`, read before the batch that missed, so an update that raced with the miss is
/// never waited for.
#[derive(Debug)]
struct Parked {
    generation: u64,
    iova: u64,
    perm: Perm,
    asked: Instant,
}

/// What one pass of [`Ring::serve`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Work was done.
    pub worked: bool,
    /// The pass stopped because something other than the ring must come first (the port is
    /// full, or has nothing to put in the buffers): no more batches, and no kick asked for.
    pub blocked: bool,
}

impl Pass {
    /// A pass that ran until the ring had nothing more (or the batch reached its bound).
    pub fn done(worked: bool) -> Self {
        Self { worked, blocked: false }
    }
}

/// What [`Ring::serve`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeResult {
    /// Some pass did work.
    pub worked: bool,
    /// The ring still has work (a batch reached its bound, or the passes ran out).
    pub again: bool,
    /// The last pass was blocked ([`Pass::blocked`]).
    pub blocked: bool,
}

/// One started queue of a group.
#[derive(Debug)]
pub struct Ring {
    index: usize,
    queue: Queue,
    pub(crate) kick: Option<File>,
    call: Call,
    /// Busy-polled: no kick fd, or `--poll`.
    pub(crate) polled: bool,
    /// A kick arrived since the handler last looked.
    pub(crate) kicked: bool,
    broken: bool,
    /// The handler has been told (`QueueHandler::broken`).
    pub(crate) broken_reported: bool,
    broken_flag: Arc<AtomicBool>,
    parked: Option<Parked>,
    channel: Arc<BackendChannel>,
    log_kick: Arc<LogKick>,
}

impl Ring {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        queue: Queue,
        kick: Option<File>,
        call: Option<File>,
        poll: bool,
        broken_flag: Arc<AtomicBool>,
        channel: Arc<BackendChannel>,
        log_kick: Arc<LogKick>,
    ) -> Self {
        let polled = poll || kick.is_none();
        Self {
            index,
            queue,
            kick,
            call: Call::new(call),
            polled,
            kicked: true,
            broken: false,
            broken_reported: false,
            broken_flag,
            parked: None,
            channel,
            log_kick,
        }
    }

    /// The queue's index in the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the driver kicked since the last call (then cleared). The first call after the
    /// queue starts says yes: buffers may have been made available while no backend listened.
    pub fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kicked)
    }

    /// Whether the queue is busy-polled (no kick fd, or `--poll`): its notifications stay off.
    pub fn is_polled(&self) -> bool {
        self.polled
    }

    /// Whether the queue broke; it takes no more batches.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the queue waits for an IOTLB entry (batches are refused until it comes).
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// The queue's call eventfd.
    pub fn call(&self) -> &Call {
        &self.call
    }

    /// Hands the queue back (the worker stops it).
    pub(crate) fn into_queue(self) -> Queue {
        self.queue
    }

    /// Runs one batch on the queue: `f` pops and completes through the `QueueBatch`, and may
    /// [`publish`] part-way; what it added is published when it returns, the driver interrupted
    /// if it asked for it, and the dirty log's eventfd kicked if the batch logged. `None` when
    /// the queue is broken or parked, or the batch failed: an IOTLB miss parks the queue (and
    /// asks the frontend, without waiting), any other error breaks it.
    pub fn process<R>(&mut self, f: impl FnOnce(&mut QueueBatch<'_, '_>, &Call) -> Result<R, QueueError>) -> Option<R> {
        if self.broken || !self.unpark() {
            return None;
        }
        self.batch(f)
    }

    /// [`Ring::process`] also while the queue is parked: a queue whose miss was a buffer's
    /// still completes what it has in flight (a frontend that never answers must not keep
    /// finished requests from the guest); if the rings themselves miss, `None`, and nothing
    /// changes.
    pub fn process_parked<R>(
        &mut self,
        f: impl FnOnce(&mut QueueBatch<'_, '_>, &Call) -> Result<R, QueueError>,
    ) -> Option<R> {
        if self.broken {
            return None;
        }
        self.batch(f)
    }

    fn batch<R>(&mut self, f: impl FnOnce(&mut QueueBatch<'_, '_>, &Call) -> Result<R, QueueError>) -> Option<R> {
        let generation = self.queue.iotlb_generation();
        let flushes = self.queue.log_flushes();
        let call = &self.call;
        let res = self.queue.process(|qb| f(qb, call));
        if self.queue.log_flushes() != flushes {
            self.log_kick.kick();
        }
        match res {
            Ok((Ok(r), notify)) => {
                if notify {
                    self.call.signal();
                }
                Some(r)
            }
            Ok((Err(e), notify)) if e.is_iotlb_miss() => {
                if notify {
                    self.call.signal();
                }
                self.park(generation, &e);
                None
            }
            Err(e) if e.is_iotlb_miss() => {
                self.park(generation, &e);
                None
            }
            Ok((Err(e), _)) | Err(e) => {
                self.fail(&e);
                None
            }
        }
    }

    /// Runs `pass` in batches until the ring has nothing more: in kick mode (`spin` false and
    /// the queue not polled) each batch ends by asking the driver for kicks again, and another
    /// batch runs if buffers arrived meanwhile; when polling, notifications stay off and one
    /// batch runs. A batch that reached its bound is followed by another (the invalidation that
    /// waited for it goes between them), up to `MAX_PASSES`, after which `again` says the ring
    /// has work left. A pass that is blocked ends it at once, notifications left as they are.
    pub fn serve(
        &mut self,
        spin: bool,
        mut pass: impl FnMut(&mut QueueBatch<'_, '_>, &Call) -> Result<Pass, QueueError>,
    ) -> ServeResult {
        let mut out = ServeResult::default();
        let poll = spin || self.polled;
        for _ in 0..MAX_PASSES {
            let res = self.process(|qb, call| {
                if poll {
                    qb.disable_notification()?;
                }
                let p = pass(qb, call)?;
                let more = if p.blocked {
                    false
                } else if qb.exhausted() {
                    true
                } else if poll {
                    false
                } else {
                    qb.enable_notification()?
                };
                Ok((p, more))
            });
            let Some((p, more)) = res else { return out };
            out.worked |= p.worked;
            out.blocked = p.blocked;
            if !more {
                return out;
            }
        }
        out.again = true;
        out
    }

    /// Runs `f` in a memory batch that uses no ring: a parked or stopping queue still finishes
    /// the I/O it has in flight (whose pins an invalidation may be waiting for).
    pub fn with_memory<R>(&mut self, f: impl FnOnce(&Batch<'_>) -> R) -> R {
        self.queue.with_memory(f)
    }

    /// Breaks the queue (the driver wrote what the device must refuse, or the handler cannot
    /// serve it): no more batches; the frontend sees NEEDS_RESET.
    pub fn fail(&mut self, e: &QueueError) {
        if self.broken {
            return;
        }
        tracing::warn!(queue = self.index, error = %e, "queue broken; it stays stopped until reset");
        if let Some((iova, perm)) = e.iotlb_denied() {
            if let Err(err) = self.channel.iotlb_access_fail(iova, perm) {
                tracing::debug!(error = %err, "IOTLB access failure not reported");
            }
        }
        self.broken = true;
        self.broken_flag.store(true, Relaxed);
    }

    /// Parks the queue on the miss `e` and asks the frontend for the entry.
    fn park(&mut self, generation: u64, e: &QueueError) {
        let Some((iova, perm)) = e.iotlb_miss() else { return };
        tracing::debug!(queue = self.index, iova, ?perm, "IOTLB miss; queue parked");
        self.parked = Some(Parked { generation, iova, perm, asked: Instant::now() });
        self.ask(iova, perm);
    }

    fn ask(&self, iova: u64, perm: Perm) {
        if let Err(err) = self.channel.iotlb_miss(iova, perm) {
            tracing::warn!(queue = self.index, iova, error = %err, "IOTLB miss not sent; asking again later");
        }
    }

    /// Whether a parked queue may run again (the IOTLB moved); while it may not, the miss is
    /// sent again now and then.
    fn unpark(&mut self) -> bool {
        let Some(p) = self.parked.as_mut() else { return true };
        if self.queue.iotlb_generation() != p.generation {
            self.parked = None;
            return true;
        }
        if p.asked.elapsed() >= MISS_RETRY {
            p.asked = Instant::now();
            let (iova, perm) = (p.iova, p.perm);
            self.ask(iova, perm);
        }
        false
    }
}
