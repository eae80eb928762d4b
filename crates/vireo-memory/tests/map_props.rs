//! Property tests: the memory map against a naive model, and the dirty log against a model bitmap.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsFd;

use proptest::prelude::*;
use vireo_memory::{memfd, GuestMemory, GuestPhysAddr, LogCache, RegionSpec, RetireMode, UserAddr};

const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy)]
struct R {
    gpa_page: u64,
    pages: u64,
    user_page: u64,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// The model's verdict: a set is accepted iff no two regions overlap in either space.
fn valid(set: &[R]) -> bool {
    set.iter().enumerate().all(|(i, a)| {
        set[i + 1..].iter().all(|b| {
            !overlaps((a.gpa_page, a.pages), (b.gpa_page, b.pages))
                && !overlaps((a.user_page, a.pages), (b.user_page, b.pages))
        })
    })
}

fn region() -> impl Strategy<Value = R> {
    (0u64..2048, 1u64..16, 0u64..4096).prop_map(|(gpa_page, pages, user_page)| R { gpa_page, pages, user_page })
}

fn specs<'a>(fd: &'a std::os::fd::OwnedFd, set: &[R]) -> Vec<RegionSpec<'a>> {
    set.iter()
        .map(|r| RegionSpec {
            gpa: GuestPhysAddr::new(r.gpa_page * PAGE),
            size: r.pages * PAGE,
            user_addr: UserAddr::new(r.user_page * PAGE),
            fd: fd.as_fd(),
            fd_offset: 0,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random region sets: accepted exactly when the model says so; lookups of random guest and
    /// user addresses agree with a linear scan; a refused set leaves the previous map serving.
    #[test]
    fn map_matches_naive_model(first in prop::collection::vec(region(), 1..12),
                               second in prop::collection::vec(region(), 1..40),
                               probes in prop::collection::vec((0u64..2100 * PAGE, 0u64..4200 * PAGE), 64)) {
        let fd = memfd("props", 16 * PAGE).unwrap();
        let mem = GuestMemory::new(RetireMode::Unmap);
        let mut model: Vec<R> = Vec::new();
        for set in [&first, &second] {
            let res = mem.set_regions(&specs(&fd, set));
            prop_assert_eq!(res.is_ok(), valid(set), "{:?}", res);
            if res.is_ok() {
                model = set.clone();
            }
            let map = mem.map();
            prop_assert_eq!(map.len(), model.len());
            for &(g, u) in &probes {
                let expect = model.iter().find(|r| overlaps((r.gpa_page * PAGE, r.pages * PAGE), (g, 1)));
                let got = map.translate(GuestPhysAddr::new(g));
                prop_assert_eq!(got.is_some(), expect.is_some());
                if let (Some(t), Some(r)) = (got, expect) {
                    prop_assert_eq!(t.avail, r.gpa_page * PAGE + r.pages * PAGE - g);
                    prop_assert_eq!(map.region(t.index).gpa().raw(), r.gpa_page * PAGE);
                }
                let expect_u = model.iter().find(|r| overlaps((r.user_page * PAGE, r.pages * PAGE), (u, 1)));
                let got_u = map.user_to_gpa(UserAddr::new(u)).ok();
                prop_assert_eq!(got_u.map(|g| g.raw()), expect_u.map(|r| r.gpa_page * PAGE + (u - r.user_page * PAGE)));
            }
        }
    }

    /// Random adds and removes one at a time against the model.
    #[test]
    fn add_remove_matches_model(ops in prop::collection::vec((any::<bool>(), region(), any::<prop::sample::Index>()), 1..60)) {
        let fd = memfd("props", 16 * PAGE).unwrap();
        let mem = GuestMemory::new(RetireMode::ProtNone { keep: 8 });
        let mut model: Vec<R> = Vec::new();
        for (add, r, pick) in ops {
            if add || model.is_empty() {
                let mut next = model.clone();
                next.push(r);
                let res = mem.add_region(&specs(&fd, &[r])[0]);
                prop_assert_eq!(res.is_ok(), valid(&next));
                if res.is_ok() { model = next; }
            } else {
                let victim = model.remove(pick.index(model.len()));
                mem.remove_region(GuestPhysAddr::new(victim.gpa_page * PAGE), victim.pages * PAGE, UserAddr::new(victim.user_page * PAGE)).unwrap();
            }
            let map = mem.map();
            prop_assert_eq!(map.len(), model.len());
            for r in &model {
                let t = map.translate(GuestPhysAddr::new(r.gpa_page * PAGE)).unwrap();
                prop_assert_eq!(t.avail, r.pages * PAGE);
            }
        }
    }

    /// Random writes logged through the per-queue cache land in the bitmap exactly as a model
    /// bitmap says, whatever the cache's flush points.
    #[test]
    fn dirty_log_matches_model(writes in prop::collection::vec((0u64..(1 << 24), 1u64..(64 << 10)), 1..200)) {
        let region_fd = memfd("ram", 1 << 24).unwrap();
        let mem = GuestMemory::new(RetireMode::Unmap);
        mem.set_regions(&[RegionSpec { gpa: GuestPhysAddr::new(0), size: 1 << 24, user_addr: UserAddr::new(0), fd: region_fd.as_fd(), fd_offset: 0 }]).unwrap();
        let log_bytes = (1u64 << 24) / PAGE / 8;
        let log_fd = memfd("log", log_bytes).unwrap();
        mem.set_dirty_log(log_fd.as_fd(), 0, log_bytes).unwrap();
        mem.set_logging(true);
        let mut model = vec![false; (log_bytes * 8) as usize];
        let mut q = mem.register_queue();
        for chunk in writes.chunks(7) {
            let batch = q.batch(&[]);
            for &(gpa, len) in chunk {
                let len = len.min((1 << 24) - gpa);
                batch.log_write(GuestPhysAddr::new(gpa), len).unwrap();
                for page in gpa / PAGE..=(gpa + len - 1) / PAGE {
                    model[page as usize] = true;
                }
            }
        }
        let bits: Vec<bool> =
            mem.with_dirty_log(|log| (0..model.len()).map(|p| log.is_dirty(p as u64)).collect()).unwrap();
        for (page, (&dirty, &bit)) in model.iter().zip(&bits).enumerate() {
            prop_assert_eq!(bit, dirty, "page {}", page);
        }
        // A write beyond the log is an error, not a stray bit.
        let beyond = mem.with_dirty_log(|log| LogCache::new().add(GuestPhysAddr::new(1 << 24), 1, log).is_err()).unwrap();
        prop_assert!(beyond);
    }
}
