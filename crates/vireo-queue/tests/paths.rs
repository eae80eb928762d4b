//! The cached path against the translating path on the same ring images: the cached walkers
//! (`pop`'s fast path, `pop_each`'s loops) may only doubt a chain and hand it to the general
//! walker, never accept one it refuses nor resolve one differently. Ring images are generated
//! chain by chain, mostly well formed, each field sometimes pushed just past what is allowed (a
//! readable buffer after a writable one, a zero length, a buffer across the two regions or
//! outside guest memory, an indirect descriptor inside a chain or with NEXT, a table of the
//! wrong length, a `next` out of range, a loop), so that the runs reach deep into the batch
//! before a queue breaks. Both runs see the same chains, break at the same point, and leave the
//! same bytes in guest memory.
#![allow(clippy::cast_possible_truncation)] // small test values

use proptest::prelude::*;
use vireo_driver::GuestRam;
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Chain, Queue, QueueConfig, RingAddrs};

const REGION: u64 = 64 << 10;
const SIZE: u16 = 32;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where indirect tables go (32 entries of 16 bytes each, one table per chain).
const TABLES: u64 = 0x4000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

#[derive(Debug, Clone)]
struct BufSpec {
    /// 0-5 in region 0, 6 in region 1, 7 across the boundary, 8 outside RAM.
    place: u8,
    /// 0 zero, 1-8 ordinary, 9 huge.
    len: u8,
    writable: bool,
}

#[derive(Debug, Clone)]
struct ChainSpec {
    bufs: Vec<BufSpec>,
    indirect: bool,
    /// 0-11 none; 12 readable after writable; 13 an INDIRECT flag on a middle buffer; 14 `next`
    /// out of range; 15 a loop; 16 INDIRECT with NEXT; 17 table length not a multiple of 16.
    fault: u8,
}

fn buf() -> impl Strategy<Value = BufSpec> {
    (0u8..9, 0u8..10, any::<bool>()).prop_map(|(place, len, writable)| BufSpec {
        place: if place > 5 { place } else { 0 },
        len: if len == 0 && place % 3 != 0 { 1 } else { len },
        writable,
    })
}

fn chain() -> impl Strategy<Value = ChainSpec> {
    (prop::collection::vec(buf(), 1..5), any::<bool>(), 0u8..18).prop_map(|(mut bufs, indirect, fault)| {
        // Readable buffers first, as a driver must, unless the fault says otherwise.
        bufs.sort_by_key(|b| b.writable);
        ChainSpec { bufs, indirect, fault }
    })
}

fn addr_len(b: &BufSpec, k: usize) -> (u64, u32) {
    let len = match b.len {
        0 => 0,
        9 => u32::MAX - 8,
        n => 32 * u32::from(n),
    };
    let addr = match b.place {
        6 => REGION + 0x1000 + 512 * k as u64,
        7 => REGION - 16,
        8 => 2 * REGION + 0x100,
        _ => 0x8000 + 512 * k as u64,
    };
    (addr, len)
}

fn desc(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..16].copy_from_slice(&b.to_le_bytes());
    d
}

/// Writes the chains into a fresh image; returns it (as one byte vector over both regions).
fn image(chains: &[ChainSpec], packed: bool) -> Vec<u8> {
    let mut mem = vec![0u8; (2 * REGION) as usize];
    let mut put = |at: u64, bytes: &[u8]| mem[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    let mut slot = 0u16;
    let mut heads = Vec::new();
    for (c, spec) in chains.iter().enumerate() {
        let n = spec.bufs.len();
        let mut flags: Vec<u16> = spec.bufs.iter().map(|b| if b.writable { F_WRITE } else { 0 }).collect();
        match spec.fault {
            12 if n > 1 => {
                flags[0] = F_WRITE;
                flags[n - 1] = 0;
            }
            13 if n > 2 => flags[1] |= F_INDIRECT,
            _ => {}
        }
        let ring_descs = if spec.indirect { 1 } else { n as u16 };
        if slot + ring_descs > SIZE {
            break;
        }
        let head = slot;
        heads.push(head);
        let avail_flags = |wrap: bool| if wrap { F_AVAIL } else { F_USED };
        if spec.indirect {
            let table = TABLES + 512 * c as u64;
            for (k, b) in spec.bufs.iter().enumerate() {
                let (addr, len) = addr_len(b, k + 8 * c);
                let last = k + 1 == n;
                let f = flags[k] | if last || packed { 0 } else { F_NEXT };
                let next = if spec.fault == 14 && k == 0 {
                    40
                } else if spec.fault == 15 && last {
                    0
                } else {
                    k as u16 + 1
                };
                let d = if packed {
                    desc(addr, len, 0, f)
                } else {
                    desc(addr, len, if spec.fault == 15 && last { f | F_NEXT } else { f }, next)
                };
                put(table + 16 * k as u64, &d);
            }
            let mut tlen = 16 * n as u32;
            if spec.fault == 17 {
                tlen += 8;
            }
            let f = F_INDIRECT | if spec.fault == 16 { F_NEXT } else { 0 };
            let d = if packed { desc(table, tlen, c as u16, f | avail_flags(true)) } else { desc(table, tlen, f, 0) };
            put(DESC + 16 * u64::from(slot), &d);
            slot += 1;
        } else {
            for (k, b) in spec.bufs.iter().enumerate() {
                let (addr, len) = addr_len(b, k + 8 * c);
                let last = k + 1 == n;
                let mut f = flags[k] | if last { 0 } else { F_NEXT };
                let mut next = slot + 1;
                if spec.fault == 14 && k == 0 && !last {
                    next = SIZE + 3;
                }
                if spec.fault == 15 && last {
                    f |= F_NEXT;
                    next = head;
                }
                let d =
                    if packed { desc(addr, len, c as u16, f | avail_flags(true)) } else { desc(addr, len, f, next) };
                put(DESC + 16 * u64::from(slot), &d);
                slot += 1;
            }
        }
    }
    if !packed {
        put(AVAIL, &0u16.to_le_bytes());
        put(AVAIL + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            put(AVAIL + 4 + 2 * i as u64, &h.to_le_bytes());
        }
    }
    mem
}

type Seen = Vec<(u16, u16, u32, u32, Vec<(u64, usize, bool)>)>;

/// Runs the device over `img` on the cached or the translating path, through `pop_each` or
/// `pop` (completing every other chain at once with `pop_each`); returns what it saw, whether
/// the queue broke, and guest memory afterwards.
fn run(img: &[u8], packed: bool, translating: bool, each: bool) -> (Seen, bool, Vec<u8>) {
    let ram = GuestRam::new(&[(0, REGION), (REGION, REGION)]).unwrap();
    ram.write(GuestPhysAddr::new(0), img).unwrap();
    let mem = GuestMemory::new(RetireMode::ProtNone { keep: 4 });
    mem.set_regions(&ram.specs()).unwrap();
    let addrs = if packed {
        RingAddrs::Packed {
            desc: GuestPhysAddr::new(DESC),
            driver: GuestPhysAddr::new(AVAIL),
            device: GuestPhysAddr::new(USED),
        }
    } else {
        RingAddrs::Split {
            desc: GuestPhysAddr::new(DESC),
            avail: GuestPhysAddr::new(AVAIL),
            used: GuestPhysAddr::new(USED),
        }
    };
    let mut q = Queue::new(mem.register_queue(), QueueConfig { size: SIZE, addrs, event_idx: true }).unwrap();
    q.set_force_translating(translating);
    let mut seen = Seen::new();
    let mut record = |c: &Chain<'_>| {
        let segs = (0..c.segments())
            .map(|i| {
                let (gpa, w, s) = c.segment(i).unwrap();
                (gpa.raw(), s.len(), w)
            })
            .collect();
        seen.push((c.token().id, c.token().ring_descs, c.readable_len(), c.writable_len(), segs));
    };
    let res = q.process(|qb| {
        let mut later = Vec::new();
        if each {
            let mut now = false;
            qb.pop_each(usize::from(SIZE), |c| {
                record(c);
                now = !now;
                if now {
                    Some(c.writable_len().min(8))
                } else {
                    later.push((c.token(), 3));
                    None
                }
            })?;
        } else {
            while let Some(c) = qb.pop()? {
                record(&c);
                later.push((c.token(), c.writable_len().min(8)));
            }
        }
        for (t, n) in later {
            qb.add_used(t, n)?;
        }
        Ok::<(), vireo_queue::QueueError>(())
    });
    let broke = !matches!(res, Ok((Ok(()), _)));
    assert_eq!(broke, q.broken().is_some());
    let mut out = vec![0u8; img.len()];
    ram.read(GuestPhysAddr::new(0), &mut out).unwrap();
    (seen, broke, out)
}

fn check(chains: &[ChainSpec], packed: bool, each: bool) -> Result<(), TestCaseError> {
    let img = image(chains, packed);
    let (a_seen, a_broke, a_mem) = run(&img, packed, false, each);
    let (b_seen, b_broke, b_mem) = run(&img, packed, true, each);
    prop_assert_eq!(a_broke, b_broke, "broken");
    prop_assert_eq!(a_seen, b_seen);
    prop_assert!(a_mem == b_mem, "guest memory differs");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn split_cached_path_matches_translating(chains in prop::collection::vec(chain(), 1..12), each in any::<bool>()) {
        check(&chains, false, each)?;
    }
    #[test]
    fn packed_cached_path_matches_translating(chains in prop::collection::vec(chain(), 1..12), each in any::<bool>()) {
        check(&chains, true, each)?;
    }
}

/// The generator reaches what it means to: well-formed chains of every shape get served, and
/// each fault breaks the queue (on both paths, which `check` compares).
#[test]
fn generated_images_exercise_both_outcomes() {
    let ok = |writable| BufSpec { place: 0, len: 2, writable };
    for packed in [false, true] {
        for indirect in [false, true] {
            let good = ChainSpec { bufs: vec![ok(false), ok(false), ok(true)], indirect, fault: 0 };
            let (seen, broke, _) = run(&image(std::slice::from_ref(&good), packed), packed, false, true);
            assert!(!broke && seen.len() == 1 && seen[0].4.len() == 3, "{packed} {indirect}: {seen:?}");
            for fault in 12..18 {
                if !indirect && (fault == 16 || fault == 17) {
                    // Faults of the indirect descriptor itself.
                    continue;
                }
                if packed && (fault == 14 || fault == 15) {
                    // Packed chains are consecutive: no `next` to get wrong.
                    continue;
                }
                let bad = ChainSpec { fault, ..good.clone() };
                let (_, broke, _) = run(&image(&[bad], packed), packed, false, true);
                assert!(broke, "packed {packed} indirect {indirect} fault {fault} was accepted");
            }
        }
    }
}

/// A chain whose buffers each fit in guest memory but whose lengths add up past 32 bits (three
/// 1.5 GiB buffers in a 4 GiB region, which the memfd leaves sparse): both paths refuse it, and
/// a chain just under the limit is served by both.
#[test]
fn length_overflow_is_refused_on_both_paths() {
    const BIG: u64 = 4 << 30;
    let chunk = 3u32 << 29; // 1.5 GiB
    for (lens, overflow) in [([chunk, chunk, chunk], true), ([chunk, chunk, (1 << 30) - 1], false)] {
        let mut outcomes = Vec::new();
        for translating in [false, true] {
            let ram = GuestRam::new(&[(0, BIG)]).unwrap();
            let put = |at: u64, bytes: &[u8]| ram.write(GuestPhysAddr::new(at), bytes).unwrap();
            for (k, &len) in lens.iter().enumerate() {
                let f = if k + 1 < lens.len() { F_NEXT | F_WRITE } else { F_WRITE };
                put(DESC + 16 * k as u64, &desc(0x10_0000, len, f, k as u16 + 1));
            }
            put(AVAIL + 2, &1u16.to_le_bytes());
            let mem = GuestMemory::new(RetireMode::Unmap);
            mem.set_regions(&ram.specs()).unwrap();
            let addrs = RingAddrs::Split {
                desc: GuestPhysAddr::new(DESC),
                avail: GuestPhysAddr::new(AVAIL),
                used: GuestPhysAddr::new(USED),
            };
            let mut q = Queue::new(mem.register_queue(), QueueConfig { size: SIZE, addrs, event_idx: false }).unwrap();
            q.set_force_translating(translating);
            let got = q.process(|qb| qb.pop_each(4, |c| Some(c.writable_len().min(1)))).unwrap().0;
            outcomes.push(got.map_err(|e| e.to_string()));
        }
        assert_eq!(outcomes[0], outcomes[1]);
        assert_eq!(outcomes[0].is_err(), overflow, "{outcomes:?}");
    }
}
