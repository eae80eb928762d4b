//! Cross-check against a peer we did not write: rust-vmm's virtio-queue, reading the same
//! split-ring images that the model driver wrote, must see the same chains as Vireo, and the two
//! must leave identical used rings when they complete the same chains in the same order.
#![allow(clippy::cast_possible_truncation)]

use proptest::prelude::*;
use vireo_driver::{Buffer, GuestRam, SplitDriver};
use vireo_memory::{GuestMemory, GuestPhysAddr, RetireMode};
use vireo_queue::{Queue, QueueConfig, RingAddrs};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

const SIZE: u16 = 64;
const RAM: u64 = 4 << 20;

type Seen = Vec<(u16, Vec<(u64, u32, bool)>)>;

fn used_ring(ram: &GuestRam, used: GuestPhysAddr) -> Vec<u8> {
    let mut v = vec![0u8; 4 + 8 * usize::from(SIZE)];
    ram.read(used, &mut v).unwrap();
    v
}

fn case(chains: &[(Vec<(u32, bool)>, bool)], order: &[prop::sample::Index], lens: &[u32]) -> Result<(), TestCaseError> {
    let mut ram = GuestRam::single(RAM).unwrap();
    let mut drv = SplitDriver::new(&mut ram, SIZE).unwrap();
    let (desc, avail, used) = drv.addrs();
    let mut added = 0;
    for (bufs, indirect) in chains {
        let bufs: Vec<Buffer> = bufs
            .iter()
            .map(|&(len, writable)| Buffer { gpa: ram.alloc(u64::from(len), 8).unwrap(), len, writable })
            .collect();
        let need = if *indirect { 1 } else { bufs.len() };
        if drv.free() < need {
            break;
        }
        if *indirect {
            drv.add_indirect(&mut ram, &bufs).unwrap();
        } else {
            drv.add(&ram, &bufs).unwrap();
        }
        added += 1;
    }
    drv.publish(&ram, false).unwrap();

    // Vireo.
    let mem = GuestMemory::new(RetireMode::Unmap);
    mem.set_regions(&ram.specs()).unwrap();
    let mut q = Queue::new(
        mem.register_queue(),
        QueueConfig { size: SIZE, addrs: RingAddrs::Split { desc, avail, used }, event_idx: false },
    )
    .unwrap();
    let mut ours: Seen = Vec::new();
    q.process(|qb| {
        while let Some(c) = qb.pop().unwrap() {
            let segs =
                (0..c.segments()).filter_map(|i| c.segment(i)).map(|(g, w, s)| (g.raw(), s.len() as u32, w)).collect();
            ours.push((c.id, segs));
        }
    })
    .unwrap();
    let mut pending: Vec<usize> = (0..ours.len()).collect();
    let mut completion = Vec::new();
    for (k, idx) in order.iter().enumerate() {
        if pending.is_empty() {
            break;
        }
        let i = pending.remove(idx.index(pending.len()));
        completion.push((ours[i].0, lens[k % lens.len()]));
    }
    q.process(|qb| {
        for &(id, len) in &completion {
            qb.add_used(vireo_queue::UsedToken { id, ring_descs: 1 }, len).unwrap();
        }
    })
    .unwrap();
    let ours_used = used_ring(&ram, used);

    // The peer, on the same images, after the used ring is wiped.
    ram.write(used, &vec![0u8; 4 + 8 * usize::from(SIZE)]).unwrap();
    let files = ram.files();
    let file = std::fs::File::from(files[0].2.try_clone_to_owned().unwrap());
    let peer_mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        RAM as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    use virtio_queue::QueueT;
    let mut peer = virtio_queue::Queue::new(SIZE).unwrap();
    peer.set_size(SIZE);
    peer.set_desc_table_address(Some(desc.raw() as u32), Some((desc.raw() >> 32) as u32));
    peer.set_avail_ring_address(Some(avail.raw() as u32), Some((avail.raw() >> 32) as u32));
    peer.set_used_ring_address(Some(used.raw() as u32), Some((used.raw() >> 32) as u32));
    peer.set_ready(true);
    let mut theirs: Seen = Vec::new();
    while let Some(chain) = peer.pop_descriptor_chain(&peer_mem) {
        let head = chain.head_index();
        let segs = chain.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect();
        theirs.push((head, segs));
    }
    for &(id, len) in &completion {
        peer.add_used(&peer_mem, id, len).unwrap();
    }
    let theirs_used = used_ring(&ram, used);

    prop_assert_eq!(ours.len(), added);
    prop_assert_eq!(&ours, &theirs);
    prop_assert_eq!(ours_used, theirs_used);
    Ok(())
}

fn chain() -> impl Strategy<Value = (Vec<(u32, bool)>, bool)> {
    // Readable buffers first, then writable ones, as a driver builds them.
    (prop::collection::vec(1u32..4096, 0..3), prop::collection::vec(1u32..4096, 0..3), any::<bool>()).prop_filter_map(
        "empty chain",
        |(r, w, indirect)| {
            let bufs: Vec<(u32, bool)> =
                r.into_iter().map(|l| (l, false)).chain(w.into_iter().map(|l| (l, true))).collect();
            (!bufs.is_empty()).then_some((bufs, indirect))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn same_chains_and_used_ring_as_virtio_queue(
        chains in prop::collection::vec(chain(), 1..40),
        order in prop::collection::vec(any::<prop::sample::Index>(), 40),
        lens in prop::collection::vec(0u32..8192, 1..8),
    ) {
        case(&chains, &order, &lens)?;
    }
}
