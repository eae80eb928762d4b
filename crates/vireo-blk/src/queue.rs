//! A block queue on the device seam: one handler per queue, serving it from its worker thread.
//!
//! Each batch first completes what the io_uring engine finished, then pops, handles and
//! completes chains in one loop (`pop_each`: a request that completes at once, a null device's
//! or a synchronous one, is completed in the same loop; an I/O that goes to the kernel is started
//! with pins and completed when reaped), and publishes after every chain: a running driver sees
//! completions while the device works on what follows, so the two sides overlap instead of taking
//! turns (EVENT_IDX keeps this from costing interrupts: one is sent only when the driver has
//! asked for one since).

use std::sync::Arc;

use vireo_queue::{QueueBatch, QueueError, UsedToken};
use vireo_vhost::{publish, Call, Events, Interest, Pass, Progress, QueueHandler, Queues, Ring};

use crate::uring::UringEngine;
use crate::Inner;

/// How many chains a pass pops and completes between two publications of the used index. One:
/// the driver sees each completion at once. A publication costs a full fence and a read of the
/// driver's event index, but sharing one among several chains cost more than it saved on a
/// null device (interleaved runs at depth 32: 2.9-3.2 M IOPS publishing every 4 chains,
/// 1.1-1.2 M every 16, 3.6-3.7 M after each; BENCHMARKS.md).
const PUBLISH_EVERY: usize = 1;

/// One queue's handler.
pub(crate) struct BlkQueue {
    dev: Arc<Inner>,
    /// Declared before nothing that matters: an engine dropped with I/O in flight waits for the
    /// kernel (`UringEngine::drop`) while the pins it holds keep the regions mapped.
    engine: Option<UringEngine>,
    done: Vec<(UsedToken, u32)>,
    /// Completions reaped while the queue was parked on an IOTLB miss, added to the used ring
    /// once the rings can be reached.
    stash: Vec<(UsedToken, u32)>,
    /// A reap while parked found a write the dirty log could not record: the queue breaks once
    /// the stash is in the ring.
    stash_error: Option<QueueError>,
}

impl BlkQueue {
    pub(crate) fn new(dev: Arc<Inner>, engine: Option<UringEngine>) -> Self {
        Self { dev, engine, done: Vec::new(), stash: Vec::new(), stash_error: None }
    }

    /// One batch: completions first, then every available chain (up to the batch's bound).
    /// Returns whether anything was done.
    fn pass(
        dev: &Inner,
        engine: &mut Option<UringEngine>,
        done: &mut Vec<(UsedToken, u32)>,
        stash: &mut Vec<(UsedToken, u32)>,
        qb: &mut QueueBatch<'_, '_>,
        call: &Call,
    ) -> Result<bool, QueueError> {
        let mem = qb.memory();
        let mut worked = !stash.is_empty();
        qb.add_used_many(stash.drain(..))?;
        if let Some(engine) = engine.as_mut() {
            done.clear();
            let reaped = engine.reap(mem, done);
            worked |= !done.is_empty();
            qb.add_used_many(done.iter().copied())?;
            // A write the log could not record: the rest are published, the queue breaks.
            reaped?;
        }
        publish(qb, call)?;
        let popped = loop {
            let got = qb.pop_each(PUBLISH_EVERY, |chain| match engine.as_mut() {
                Some(engine) => engine.start(chain, mem, chain.token()),
                None => Some(dev.handle_sync(chain)),
            });
            match got {
                // An IOTLB miss (or a broken queue): what was started still goes to the kernel.
                Err(e) => break Err(e),
                Ok(k) => {
                    worked |= k > 0;
                    publish(qb, call)?;
                    if k < PUBLISH_EVERY {
                        break Ok(worked);
                    }
                }
            }
        };
        if let Some(engine) = engine.as_mut() {
            if let Err(e) = engine.submit() {
                tracing::error!(error = %e, "I/O submission failed");
            }
        }
        popped
    }

    /// Reaps what completed while the queue cannot take chains (parked on an IOTLB miss): the
    /// pins are released at once (an invalidation may be waiting for them), and the completions
    /// go into the used ring if the rings can be reached (the miss was a buffer's).
    fn reap_parked(&mut self, ring: &mut Ring) -> bool {
        let mut worked = false;
        if let Some(engine) = self.engine.as_mut() {
            // Requests a failed submission left behind hold pins too: an invalidation could wait
            // for them for ever while the queue waits for the frontend.
            if engine.pending_submit() {
                if let Err(e) = engine.submit() {
                    tracing::error!(queue = ring.index(), error = %e, "I/O submission failed");
                }
            }
            if engine.in_flight() > 0 {
                let stash = &mut self.stash;
                let before = stash.len();
                if let Err(e) = ring.with_memory(|mem| engine.reap(mem, stash)) {
                    // What was stashed goes into the ring below; the failed request never does.
                    self.stash_error = Some(e);
                }
                worked |= stash.len() > before;
            }
        }
        if !self.stash.is_empty() {
            let stash = &mut self.stash;
            ring.process_parked(|qb, _| qb.add_used_many(stash.drain(..)));
        }
        if let Some(e) = self.stash_error.take() {
            ring.fail(&e);
        }
        worked
    }
}

impl QueueHandler for BlkQueue {
    fn interest<'a>(&'a self, out: &mut Vec<Interest<'a>>) {
        if let Some(e) = &self.engine {
            out.push(Interest::read(e.completion_fd()));
        }
    }

    fn run(&mut self, queues: &mut Queues<'_>, events: &Events) -> Progress {
        let Some(ring) = queues.get(0) else { return Progress::default() };
        if let Some(e) = &self.engine {
            if events.readable(0) {
                // Re-arms the completion eventfd; what completed is reaped below.
                crate::uring::drain(e.completion_fd());
            }
        }
        if ring.is_broken() {
            return Progress::default();
        }
        if ring.is_parked() {
            // Asks again if it is time (the batch is refused while the IOTLB has not moved).
            let unparked = ring.process(|_, _| Ok(())).is_some();
            if !unparked {
                return Progress { worked: self.reap_parked(ring), again: false };
            }
        }
        let (dev, engine, done, stash) = (&*self.dev, &mut self.engine, &mut self.done, &mut self.stash);
        let served =
            ring.serve(events.spin(), |qb, call| Self::pass(dev, engine, done, stash, qb, call).map(Pass::done));
        let mut worked = served.worked;
        if ring.is_parked() {
            // Completions already in the engine (their eventfd was read before this pass) are
            // reaped now, not at the next wake-up: an invalidation may be waiting for their pins.
            worked |= self.reap_parked(ring);
        }
        let again = served.again || self.engine.as_ref().is_some_and(UringEngine::pending_submit);
        Progress { worked, again }
    }

    /// Completes every request in flight (before the queue is handed back).
    fn stop(&mut self, queues: &mut Queues<'_>, queue: usize) {
        let Some(ring) = queues.get(queue) else { return };
        loop {
            let in_flight = self.engine.as_ref().is_some_and(|e| e.in_flight() > 0);
            if ring.is_broken() || (!in_flight && self.stash.is_empty()) {
                break;
            }
            if let Some(Err(err)) = self.engine.as_mut().filter(|_| in_flight).map(UringEngine::wait) {
                // The requests cannot be completed into the ring: the queue is broken (the
                // guest sees NEEDS_RESET) rather than handed back as if nothing were pending.
                tracing::error!(queue = ring.index(), error = %err, "waiting for I/O failed");
                ring.fail(&QueueError::Config { what: "in-flight I/O could not be completed" });
                break;
            }
            // Completions stashed while parked on an IOTLB miss go into the ring too. If the miss
            // was the ring itself, they cannot: the queue breaks (a driver that takes its rings'
            // IOTLB entries back while they are in use).
            let (engine, done, stash) = (&mut self.engine, &mut self.done, &mut self.stash);
            let res = ring.process_parked(|qb, _| {
                let mem = qb.memory();
                qb.add_used_many(stash.drain(..))?;
                done.clear();
                let reaped = engine.as_mut().map_or(Ok(()), |e| e.reap(mem, done));
                qb.add_used_many(done.iter().copied())?;
                reaped
            });
            if res.is_none() && !ring.is_broken() {
                ring.fail(&QueueError::Config { what: "the rings could not be reached to complete in-flight I/O" });
            }
        }
        if ring.is_broken() {
            self.broken(queue);
        }
    }

    fn broken(&mut self, _queue: usize) {
        self.stash.clear();
        if let Some(e) = self.engine.as_mut() {
            e.discard();
        }
    }
}
