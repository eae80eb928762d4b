//! `vireo-benches queue`: per-chain cost of the device side of a virtqueue (pop, walk, translate
//! the buffers, add used) for Vireo's cached path, Vireo's translating path, rust-vmm's
//! virtio-queue over vm-memory, and an unvalidated raw-pointer loop, on the same rings.
//!
//! The driver's work (refilling the rings) is done outside the timed region; every variant
//! processes identical chains on rings of its own in the same guest RAM.

use std::hint::black_box;
use std::sync::atomic::{fence, Ordering};

use serde_json::{json, Value};
use vireo_driver::GuestRam;
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Queue, QueueConfig, RingAddrs};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use crate::harness::{interleave, round, IntervalTimer};

const SIZE: u16 = 256;
const BUF: u32 = 512;
const RAM: u64 = 16 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    packed: bool,
    descs: u16,
    indirect: bool,
}

impl Case {
    fn chains(&self) -> u16 {
        let ring_descs = if self.indirect { 1 } else { self.descs };
        128.min(SIZE / ring_descs)
    }
    fn ring_descs(&self) -> u16 {
        if self.indirect {
            1
        } else {
            self.descs
        }
    }
}

const CASES: [Case; 5] = [
    Case { name: "split-1desc", packed: false, descs: 1, indirect: false },
    Case { name: "split-4desc", packed: false, descs: 4, indirect: false },
    Case { name: "split-indirect", packed: false, descs: 4, indirect: true },
    Case { name: "packed-1desc", packed: true, descs: 1, indirect: false },
    Case { name: "packed-4desc", packed: true, descs: 4, indirect: false },
];

use vireo_driver::desc_bytes as desc;

fn at(base: GuestPhysAddr, off: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(base.raw() + off)
}

/// One set of rings for one contender, and the driver-side position in it.
struct Rings {
    desc: GuestPhysAddr,
    avail: GuestPhysAddr,
    used: GuestPhysAddr,
    avail_idx: u16,
    /// Packed: next slot to re-mark and its wrap counter.
    slot: u16,
    wrap: bool,
}

struct Rig {
    ram: GuestRam,
    case: Case,
    bufs: Vec<GuestPhysAddr>,
    tables: Vec<GuestPhysAddr>,
}

impl Rig {
    fn new(case: Case) -> Self {
        let mut ram = GuestRam::single(RAM).expect("guest RAM");
        let n = usize::from(case.chains()) * usize::from(case.descs);
        let bufs = (0..n).map(|_| ram.alloc(u64::from(BUF), 64).expect("buffer")).collect();
        let mut rig = Self { ram, case, bufs, tables: Vec::new() };
        if case.indirect {
            for c in 0..case.chains() {
                let t = rig.ram.alloc(16 * u64::from(case.descs), 16).expect("table");
                for j in 0..case.descs {
                    let last = j + 1 == case.descs;
                    let flags = if last { F_WRITE } else { F_NEXT };
                    let b = rig.bufs[usize::from(c * case.descs + j)];
                    rig.ram.write(at(t, 16 * u64::from(j)), &desc(b.raw(), BUF, flags, j + 1)).expect("write");
                }
                rig.tables.push(t);
            }
        }
        rig
    }

    /// The ring descriptor for descriptor `j` of chain `c` (split layout: flags, next).
    fn split_desc(&self, c: u16, j: u16) -> [u8; 16] {
        let k = self.case.descs;
        if self.case.indirect {
            return desc(self.tables[usize::from(c)].raw(), 16 * u32::from(k), F_INDIRECT, 0);
        }
        let last = j + 1 == k;
        let flags = if last { F_WRITE } else { F_NEXT };
        desc(self.bufs[usize::from(c * k + j)].raw(), BUF, flags, c * k + j + 1)
    }

    fn rings(&mut self) -> Rings {
        let n = u64::from(SIZE);
        let (desc_a, avail, used) = if self.case.packed {
            (
                self.ram.alloc(16 * n, 16).expect("ring"),
                self.ram.alloc(4, 4).expect("ring"),
                self.ram.alloc(4, 4).expect("ring"),
            )
        } else {
            (
                self.ram.alloc(16 * n, 16).expect("ring"),
                self.ram.alloc(6 + 2 * n, 2).expect("ring"),
                self.ram.alloc(6 + 8 * n, 4).expect("ring"),
            )
        };
        let r = Rings { desc: desc_a, avail, used, avail_idx: 0, slot: 0, wrap: true };
        if !self.case.packed {
            let rd = self.case.ring_descs();
            for c in 0..self.case.chains() {
                for j in 0..rd {
                    self.ram.write(at(r.desc, 16 * u64::from(c * rd + j)), &self.split_desc(c, j)).expect("write");
                }
            }
            // Every slot names a chain, so each batch finds its heads whatever the lap.
            for s in 0..SIZE {
                let head = (s % self.case.chains()) * rd;
                self.ram.write(at(r.avail, 4 + 2 * u64::from(s)), &head.to_le_bytes()).expect("write");
            }
        }
        r
    }

    /// The driver's side of one batch: make `chains()` chains available again (untimed).
    fn refill(&self, r: &mut Rings) {
        let chains = self.case.chains();
        if !self.case.packed {
            r.avail_idx = r.avail_idx.wrapping_add(chains);
            let s = self.ram.slice(r.avail, 4).expect("avail");
            s.store_u16(2, r.avail_idx.to_le(), Ordering::Release).expect("avail idx");
            return;
        }
        let k = self.case.descs;
        for c in 0..chains {
            for j in 0..k {
                let avail_bits = if r.wrap { F_AVAIL } else { F_USED };
                let last = j + 1 == k;
                let flags = avail_bits | if last { F_WRITE } else { F_NEXT };
                let b = self.bufs[usize::from(c * k + j)];
                self.ram.write(at(r.desc, 16 * u64::from(r.slot)), &desc(b.raw(), BUF, c, flags)).expect("write");
                r.slot += 1;
                if r.slot == SIZE {
                    r.slot = 0;
                    r.wrap = !r.wrap;
                }
            }
        }
        fence(Ordering::SeqCst);
    }
}

/// Runs `batches` batches: refill (untimed), then `device` (timed). Nanoseconds per chain.
fn measure(timer: &IntervalTimer, rig: &Rig, r: &mut Rings, batches: u32, mut device: impl FnMut()) -> f64 {
    let mut ns = 0.0;
    for _ in 0..batches {
        rig.refill(r);
        ns += timer.time(&mut device);
    }
    ns / (f64::from(batches) * f64::from(rig.case.chains()))
}

fn vireo_queue(mem: &GuestMemory, rig: &Rig, r: &Rings) -> Queue {
    let addrs = if rig.case.packed {
        RingAddrs::Packed { desc: r.desc, driver: r.avail, device: r.used }
    } else {
        RingAddrs::Split { desc: r.desc, avail: r.avail, used: r.used }
    };
    Queue::new(mem.register_queue(), QueueConfig { size: SIZE, addrs, event_idx: true }).expect("queue")
}

fn vireo_batch(q: &mut Queue, chains: u16) {
    let (n, _notify) = q
        .process(|qb| {
            let mut n = 0;
            while n < chains {
                let Some(c) = qb.pop().expect("pop") else { break };
                let t = c.token();
                black_box(c.segments());
                qb.add_used(t, BUF).expect("used");
                n += 1;
            }
            n
        })
        .expect("batch");
    assert_eq!(n, chains, "every chain found");
}

/// One batch through `pop_each`: pop, walk and complete in one loop, as the backend's workers do.
fn vireo_each_batch(q: &mut Queue, chains: u16) {
    let (n, _notify) = q
        .process(|qb| {
            qb.pop_each(usize::from(chains), |c| {
                black_box(c.segments());
                Some(BUF)
            })
            .expect("pop_each")
        })
        .expect("batch");
    assert_eq!(n, usize::from(chains), "every chain found");
}

/// One batch through the batch API (`complete_singles`): what a device whose chains are single
/// buffers completed at once uses (a receive queue, a null disk). Chains of another shape go
/// through `pop`.
fn vireo_singles_batch(q: &mut Queue, chains: u16) {
    let (n, _notify) = q
        .process(|qb| {
            let mut n = 0usize;
            while n < usize::from(chains) {
                let got = qb.complete_singles(usize::from(chains) - n, |s| {
                    black_box(s.buf);
                    BUF
                });
                if got == 0 {
                    let Some(c) = qb.pop().expect("pop") else { break };
                    let t = c.token();
                    black_box(c.segments());
                    qb.add_used(t, BUF).expect("used");
                    n += 1;
                    continue;
                }
                n += got;
            }
            n
        })
        .expect("batch");
    assert_eq!(n, usize::from(chains), "every chain found");
}

/// The unvalidated loop: what the work costs with raw pointers and no checks at all.
struct Raw {
    base: *mut u8,
    next_avail: u16,
    next_used: u16,
    wrap: bool,
}

impl Raw {
    /// # Safety
    /// The rings and buffers of `rig` lie in the mapping at `self.base`.
    unsafe fn split_batch(&mut self, r: (GuestPhysAddr, GuestPhysAddr, GuestPhysAddr)) {
        let (base, n) = (self.base, u64::from(SIZE));
        // SAFETY: every address is a ring or buffer address of the rig, inside the
        // mapping at `base`; this loop trusts the driver completely, which is its point.
        unsafe {
            let table = base.add(r.0.raw() as usize);
            let avail = base.add(r.1.raw() as usize);
            let used = base.add(r.2.raw() as usize);
            let idx = (avail.add(2) as *const u16).read_volatile();
            fence(Ordering::Acquire);
            while self.next_avail != idx {
                let slot = u64::from(self.next_avail) % n;
                let head = (avail.add(4 + 2 * slot as usize) as *const u16).read_volatile();
                let mut d = (table.add(16 * head as usize) as *const [u64; 2]).read_volatile();
                // Split descriptor: addr, then len (bits 0-31), flags (32-47), next (48-63).
                if (d[1] >> 32) as u16 & F_INDIRECT != 0 {
                    let t = base.add(d[0] as usize);
                    let mut i = 0usize;
                    loop {
                        let e = (t.add(16 * i) as *const [u64; 2]).read_volatile();
                        black_box(base.add(e[0] as usize));
                        if (e[1] >> 32) as u16 & F_NEXT == 0 {
                            break;
                        }
                        i = usize::from((e[1] >> 48) as u16);
                    }
                } else {
                    loop {
                        black_box(base.add(d[0] as usize));
                        let flags = (d[1] >> 32) as u16;
                        if flags & F_NEXT == 0 {
                            break;
                        }
                        let next = (d[1] >> 48) as u16;
                        d = (table.add(16 * next as usize) as *const [u64; 2]).read_volatile();
                    }
                }
                let u = used.add(4 + 8 * (u64::from(self.next_used) % n) as usize) as *mut u64;
                u.write_volatile((u64::from(BUF) << 32) | u64::from(head));
                self.next_used = self.next_used.wrapping_add(1);
                self.next_avail = self.next_avail.wrapping_add(1);
            }
            fence(Ordering::Release);
            (used.add(2) as *mut u16).write_volatile(self.next_used);
        }
    }

    /// # Safety
    /// As for `split_batch`.
    unsafe fn packed_batch(&mut self, desc: GuestPhysAddr, chains: u16) {
        let base = self.base;
        // SAFETY: as in `split_batch`.
        unsafe {
            let ring = base.add(desc.raw() as usize);
            for _ in 0..chains {
                let mut count = 0u16;
                let id = loop {
                    let d = ring.add(16 * usize::from(self.next_avail));
                    let w = (d as *const [u64; 2]).read_volatile();
                    black_box(base.add(w[0] as usize));
                    let flags = (w[1] >> 48) as u16;
                    count += 1;
                    self.next_avail = (self.next_avail + 1) % SIZE;
                    if flags & F_NEXT == 0 {
                        break (w[1] >> 32) as u16;
                    }
                };
                let u = ring.add(16 * usize::from(self.next_used));
                (u.add(8) as *mut u32).write_volatile(BUF);
                (u.add(12) as *mut u16).write_volatile(id);
                let f = if self.wrap { F_AVAIL | F_USED } else { 0 };
                fence(Ordering::Release);
                (u.add(14) as *mut u16).write_volatile(f);
                let next = self.next_used + count;
                if next >= SIZE {
                    self.wrap = !self.wrap;
                }
                self.next_used = next % SIZE;
            }
        }
    }
}

fn run_case(timer: &IntervalTimer, case: Case, rounds: usize, batches: u32) -> Value {
    let mut rig = Rig::new(case);
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&rig.ram.specs()).expect("regions");
    let mut r_cached = rig.rings();
    let mut r_trans = rig.rings();
    let mut r_peer = rig.rings();
    let mut r_raw = rig.rings();
    let mut r_batch = rig.rings();
    let mut r_each = rig.rings();
    let mut r_timer = rig.rings();
    let mut q_cached = vireo_queue(&mem, &rig, &r_cached);
    let mut q_batch = vireo_queue(&mem, &rig, &r_batch);
    let mut q_each = vireo_queue(&mem, &rig, &r_each);
    let mut q_trans = vireo_queue(&mem, &rig, &r_trans);
    q_trans.set_force_translating(true);
    let chains = case.chains();

    let files = rig.ram.files();
    let (gpa0, size0, fd0) = files[0];
    let file = std::fs::File::from(fd0.try_clone_to_owned().expect("dup"));
    let ranges = vec![(GuestAddress(gpa0.raw()), size0 as usize, Some(FileOffset::new(file, 0)))];
    let peer_mem = GuestMemoryMmap::<()>::from_ranges_with_files(&ranges).expect("vm-memory");
    let mut peer = {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(SIZE).expect("peer queue");
        q.set_size(SIZE);
        q.set_desc_table_address(Some(r_peer.desc.raw() as u32), Some((r_peer.desc.raw() >> 32) as u32));
        q.set_avail_ring_address(Some(r_peer.avail.raw() as u32), Some((r_peer.avail.raw() >> 32) as u32));
        q.set_used_ring_address(Some(r_peer.used.raw() as u32), Some((r_peer.used.raw() >> 32) as u32));
        q.set_event_idx(true);
        q.set_ready(true);
        q
    };
    let base = rig.ram.slice(GuestPhysAddr::new(0), RAM).expect("ram").as_ptr();
    let mut raw = Raw { base, next_avail: 0, next_used: 0, wrap: true };

    let rig = &rig;
    let mut cached = || measure(timer, rig, &mut r_cached, batches, || vireo_batch(&mut q_cached, chains));
    let mut batched = || measure(timer, rig, &mut r_batch, batches, || vireo_singles_batch(&mut q_batch, chains));
    let mut each = || measure(timer, rig, &mut r_each, batches, || vireo_each_batch(&mut q_each, chains));
    let mut translating = || measure(timer, rig, &mut r_trans, batches, || vireo_batch(&mut q_trans, chains));
    let mut peer_run = || {
        measure(timer, rig, &mut r_peer, batches, || {
            use virtio_queue::QueueT;
            for _ in 0..chains {
                let chain = peer.pop_descriptor_chain(&peer_mem).expect("peer chain");
                let head = chain.head_index();
                for d in chain {
                    black_box(peer_mem.get_slice(d.addr(), d.len() as usize).expect("peer slice"));
                }
                peer.add_used(&peer_mem, head, BUF).expect("peer used");
            }
        })
    };
    let raw_addrs = (r_raw.desc, r_raw.avail, r_raw.used);
    let mut raw_run = || {
        measure(timer, rig, &mut r_raw, batches, || {
            // SAFETY: the rings and buffers are in the guest RAM mapped at `base`.
            unsafe {
                if case.packed {
                    raw.packed_batch(raw_addrs.0, chains);
                } else {
                    raw.split_batch(raw_addrs);
                }
            }
        })
    };
    // What timing a batch costs by itself (reading the clock twice), measured like the others
    // with a device that does nothing; every figure below is net of it.
    let mut timer_run = || measure(timer, rig, &mut r_timer, batches, || {});
    // Only single-descriptor split chains have the batch API.
    let singles = !case.packed && case.descs == 1 && !case.indirect;
    // Contenders in a fixed order: the timer, pop_each, pop/add_used, translating, raw, then the
    // peer (split rings only) and the single-buffer batch API (one-descriptor split chains only).
    let mut contenders: Vec<&mut dyn FnMut() -> f64> =
        vec![&mut timer_run, &mut each, &mut cached, &mut translating, &mut raw_run];
    if !case.packed {
        contenders.push(&mut peer_run);
    }
    if singles {
        contenders.push(&mut batched);
    }
    let mut runs = interleave(rounds, &mut contenders);
    let timer_ns = runs[0].median();
    for r in &mut runs[1..] {
        for x in &mut r.0 {
            *x = (*x - timer_ns).max(0.0);
        }
    }
    let (each_ns, per_chain, translating_ns, raw_ns) =
        (runs[1].median(), runs[2].median(), runs[3].median(), runs[4].median());
    let peer_ns = runs.get(5).map(|r| r.median());
    let singles_ns = runs.get(6).map(|r| r.median());
    // Vireo's figure is its fastest cached path for the case: `pop_each`, or for chains of one
    // buffer `complete_singles` when it is faster.
    let vireo = singles_ns.map_or(each_ns, |s| s.min(each_ns));
    json!({
        "case": case.name,
        "chains_per_batch": chains,
        "vireo_ns": round(vireo),
        "vireo_pop_each_ns": round(each_ns),
        "vireo_per_chain_api_ns": round(per_chain),
        "vireo_singles_api_ns": singles_ns.map(round),
        "vireo_translating_ns": round(translating_ns),
        "virtio_queue_ns": peer_ns.map(round),
        "raw_ns": round(raw_ns),
        "ratio": peer_ns.map(|p| round(p / vireo)),
        "raw_ratio": round(vireo / raw_ns),
        "timer_ns": round(timer_ns),
        "vireo_pop_each_runs": runs[1].json(),
        "vireo_per_chain_api_runs": runs[2].json(),
        "vireo_singles_api_runs": runs.get(6).map(|r| r.json()),
        "vireo_translating_runs": runs[3].json(),
        "raw_runs": runs[4].json(),
        "virtio_queue_runs": runs.get(5).map(|r| r.json()),
        "timer_runs": runs[0].json(),
    })
}

/// The `queue` benchmark as one JSON object.
pub fn run(quick: bool) -> Value {
    let (rounds, batches) = if quick { (3, 200) } else { (7, 4000) };
    // VIREO_BENCH_CASE=name runs one case (for profiling).
    let only = std::env::var("VIREO_BENCH_CASE").ok();
    let timer = IntervalTimer::new(std::time::Duration::from_millis(50));
    let cases: Vec<Value> = CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
        .map(|&c| run_case(&timer, c, rounds, batches))
        .collect();
    json!({ "queue_size": SIZE, "buffer_bytes": BUF, "cases": cases })
}
