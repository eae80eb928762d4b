//! Inflight recovery (vhost-user INFLIGHT_SHMFD): a restarted backend reconciles the record a
//! killed one left with the rings, and hands out again, oldest first, every chain the driver
//! still waits for (`inflight.rs` and `inflight_packed.rs` keep the records themselves).

use crate::batch::{with_access, Access, QueueBatch};
use crate::descriptors::read_desc;
use crate::error::QueueError;
use crate::inflight::Inflight;
use crate::queue::{Kind, QueueState};
use crate::rings::{Area, RingAccess};

impl QueueBatch<'_, '_> {
    #[cold]
    pub(crate) fn recover_inflight(&mut self, features: u64) -> Result<(), QueueError> {
        self.ensure_used_known().map_err(|e| self.fail(e))?;
        let used = self.state.next_used;
        let Some(inf) = self.inflight.as_mut() else { return Ok(()) };
        let count = inf.recover(used, features).map_err(|e| self.fail(e))?;
        if count > 0 {
            tracing::info!(resubmit = count, used, "inflight chains from a previous backend will be resubmitted");
            // Every chain before these in the ring is complete: the next new one follows them.
            self.state.next_avail = used.wrapping_add(count);
            if let Kind::Split { avail_shadow, .. } = self.kind {
                *avail_shadow = self.state.next_avail;
            }
        }
        Ok(())
    }

    #[cold]
    pub(crate) fn recover_packed_inflight(&mut self, features: u64) -> Result<(), QueueError> {
        let (used, used_wrap) = (self.state.next_used, self.state.used_wrap);
        let Some(inf) = self.packed_inflight.as_deref_mut() else { return Ok(()) };
        let access = &self.access;
        let flags_at = |slot: u16| {
            let off = 16 * usize::from(slot) + 14;
            let f = match access {
                Access::Direct(d) => d.read::<u16>(Area::Desc, off),
                Access::Translated(t) => t.read::<u16>(Area::Desc, off),
            };
            f.map(u16::from_le)
        };
        let resume = inf.recover(features, used, used_wrap, flags_at);
        let resume = resume.map_err(|e| self.fail(e))?;
        if let Some(r) = resume {
            let count = self.packed_inflight.as_ref().map_or(0, |i| i.resubmit.len());
            tracing::info!(
                resubmit = count,
                used = r.used,
                "inflight chains from a previous backend will be resubmitted"
            );
            *self.state = QueueState {
                next_avail: r.next_avail,
                avail_wrap: r.avail_wrap,
                next_used: r.used,
                used_wrap: r.used_wrap,
            };
            *self.signalled = r.used;
        }
        Ok(())
    }

    /// Hands out again a packed chain a previous backend took and did not complete, from the
    /// copies of its descriptors in the inflight region.
    #[cold]
    pub(crate) fn pop_resubmit_packed(&mut self) -> Result<Option<(u16, u16)>, QueueError> {
        let Some(inf) = self.packed_inflight.as_deref() else { return Ok(None) };
        let Some(&head) = inf.resubmit.front() else { return Ok(None) };
        let res = inf.chain_entries(head).and_then(|(entries, id)| {
            let num = u16::try_from(entries.len()).unwrap_or(u16::MAX);
            let (walked_id, count) =
                crate::packed::walk_packed(self.mem, num, self.segs, |i| inf.copy(entries[usize::from(i)]))?;
            if count != num || walked_id != id {
                return Err(QueueError::Config { what: "inflight copies do not form the recorded chain" });
            }
            Ok((id, num))
        });
        match res {
            Ok((id, num)) => {
                if let Some(i) = self.packed_inflight.as_mut() {
                    i.resubmit.pop_front();
                }
                Ok(Some((id, num)))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Records a packed chain just taken from ring slots `head_slot..+count`: its descriptors are
    /// copied into the inflight region while the ring still holds them.
    #[cold]
    pub(crate) fn packed_take(&mut self, head_slot: u16, count: u16) -> Result<(), QueueError> {
        let size = self.cfg.size;
        let mut descs = Vec::with_capacity(usize::from(count));
        let mut slot = head_slot;
        for _ in 0..count {
            descs.push(with_access!(self, r => read_desc(r, slot))?);
            slot = if slot + 1 == size { 0 } else { slot + 1 };
        }
        match self.packed_inflight.as_mut().map(|i| i.take(&descs)) {
            Some(Err(e)) => Err(self.fail(e)),
            _ => Ok(()),
        }
    }

    /// Hands out again a chain a previous backend took and did not complete.
    #[cold]
    pub(crate) fn pop_resubmit(&mut self) -> Result<Option<(u16, u16)>, QueueError> {
        let head = self.inflight.as_ref().and_then(|i| i.resubmit.front().copied());
        let Some(head) = head else { return Ok(None) };
        let res = with_access!(self, r => crate::split::walk_split(r, self.mem, self.cfg.size, head, self.segs));
        match res {
            Ok(()) => {
                // Taken off the list only now: after an IOTLB miss the same head is tried again.
                if let Some(i) = self.inflight.as_mut() {
                    i.resubmit.pop_front();
                }
                Ok(Some((head, 1)))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Records `head` in the inflight area, if there is one: taken (`mark`) or completed
    /// (`link`). A region the frontend corrupted breaks the queue.
    #[cold]
    pub(crate) fn inflight_record(
        &mut self,
        head: u16,
        op: fn(&mut Inflight, u16) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        match self.inflight.as_mut().map(|i| op(i, head)) {
            Some(Err(e)) => Err(self.fail(e)),
            _ => Ok(()),
        }
    }
}
