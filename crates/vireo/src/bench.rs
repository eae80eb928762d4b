//! `vireo bench`: a load generator over the userspace vhost-user block driver, in fio's
//! vocabulary, for any vhost-user-blk backend (Vireo, qemu-storage-daemon, SPDK).

// Statistics convert between counts, nanoseconds and floats on purpose.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;
use vireo_driver::blk::{req, status};
use vireo_driver::{BlkDevice, BlkError, BlkOptions, Completion};

/// The I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, half each.
    Randrw,
}

/// The ring layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RingKind {
    /// Split virtqueues.
    Split,
    /// Packed virtqueues (if the backend offers them).
    Packed,
}

/// How the driver's vIOMMU maps guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IommuArg {
    /// All of guest RAM in one entry per region, before the rings start.
    Premapped,
    /// Nothing up front; every backend miss answered with a 4 KiB page.
    OnDemand,
}

/// `vireo bench` options (fio's names where fio has one).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Block size (bytes; k/m suffixes allowed).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub iodepth: u16,
    /// Queues to drive (one driver thread drives them all).
    #[arg(long, default_value_t = 1)]
    pub numjobs: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub runtime: f64,
    /// Bytes of the disk to use (default: all of it).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Write verifiable patterns and check every read of a block written in this run; at the
    /// end, read back and check every block written.
    #[arg(long)]
    pub verify: bool,
    /// Poll the used rings instead of waiting on call eventfds.
    #[arg(long)]
    pub poll: bool,
    /// On split rings, store the available index only at the kick, once per batch (as DPDK's
    /// virtio PMD does) instead of at every request (as Linux's virtio driver does).
    #[arg(long)]
    pub publish_at_kick: bool,
    /// Back guest RAM with huge pages (reserve them first: /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub hugepages: bool,
    /// Ring layout.
    #[arg(long, value_enum, default_value_t = RingKind::Split)]
    pub ring: RingKind,
    /// Memory-table changes per second during the run (SET_MEM_TABLE re-sent: the backend
    /// remaps under running queues).
    #[arg(long, default_value_t = 0)]
    pub churn: u32,
    /// Act as a vIOMMU (VIRTIO_F_ACCESS_PLATFORM): the backend translates every address through
    /// IOTLB entries the driver sends, for all of guest RAM up front (`premapped`) or a page per
    /// miss (`on-demand`). With `--churn`, each change is then an IOTLB invalidation of all of
    /// guest RAM instead of a memory table.
    #[arg(long, value_enum)]
    pub iommu: Option<IommuArg>,
    /// Dirty logging on for the run (SET_LOG_BASE with a log memfd, then VHOST_F_LOG_ALL).
    #[arg(long)]
    pub log_all: bool,
    /// Also report the CPU time per I/O of this process id (the backend's).
    #[arg(long)]
    pub backend_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A byte count with an optional k/m/g suffix (powers of two), as fio and QEMU take them.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|e| format!("bad size {s:?}: {e}"))
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The driver.
    #[error(transparent)]
    Blk(#[from] BlkError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// A request failed.
    #[error("request on queue {queue} failed with status {status} ({what})")]
    Status {
        /// Queue.
        queue: usize,
        /// Status byte.
        status: u8,
        /// Read or write.
        what: &'static str,
    },
    /// Verification failed.
    #[error("verify failed: block {block} (sector {sector}) does not hold what was written")]
    Verify {
        /// Block index.
        block: u64,
        /// Its first sector.
        sector: u64,
    },
}

/// Log-linear latency histogram: 64 sub-buckets per power of two (about 1.5% resolution).
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    fn new() -> Self {
        Self { counts: vec![0; 64 * 64], total: 0 }
    }
    fn bucket(ns: u64) -> usize {
        if ns < 64 {
            return ns as usize;
        }
        let top = 63 - ns.leading_zeros() as usize; // >= 6
        let sub = ((ns >> (top - 6)) & 63) as usize;
        ((top - 5) * 64 + sub).min(64 * 64 - 1)
    }
    fn value(b: usize) -> u64 {
        if b < 64 {
            return b as u64;
        }
        let top = b / 64 + 5;
        let sub = (b % 64) as u64;
        (64 + sub) << (top - 6)
    }
    fn add(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
    }
    fn percentile(&self, p: f64) -> u64 {
        let want = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value(b);
            }
        }
        0
    }
}

fn cpu_ns_self() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

fn cpu_ns_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second();
    Some(ticks * 1_000_000_000 / hz)
}

/// Context switches of every thread of process `pid` (voluntary and not): each is a sleep or a
/// preemption, and a sleep is followed by a wake-up someone paid for.
fn context_switches_of(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            // The thread ended between the listing and the read.
            continue;
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total = total.saturating_add(v.trim().parse::<u64>().unwrap_or(0));
            }
        }
    }
    Some(total)
}

/// A deterministic pattern for block `block`, generation `gen`.
fn fill_pattern(buf: &mut [u8], block: u64, gen: u32) {
    let mut x = vireo_driver::XorShift::new(
        block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(gen).wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    );
    for chunk in buf.chunks_mut(8) {
        let b = x.next().to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// What one slot is doing.
#[derive(Clone, Copy)]
struct InFlight {
    block: u64,
    write: bool,
    gen: u32,
    at: Instant,
}

/// Runs the benchmark and prints its report.
pub fn run(a: &BenchArgs) -> Result<(), BenchError> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err(BenchError::Options(format!("--bs {} must be a non-zero multiple of 512", a.bs)));
    }
    if a.iodepth == 0 || a.numjobs == 0 {
        return Err(BenchError::Options("--iodepth and --numjobs must be at least 1".into()));
    }
    let bs = usize::try_from(a.bs).map_err(|_| BenchError::Options("--bs too large".into()))?;
    let queue_size = (a.iodepth.saturating_mul(2)).clamp(64, 1024).next_power_of_two();
    let opts = BlkOptions {
        num_queues: a.numjobs,
        queue_size,
        packed: a.ring == RingKind::Packed,
        event_idx: true,
        max_request: bs,
        slots: a.iodepth,
        hugepages: a.hugepages,
        log_shmfd: a.log_all,
        inflight: false,
        add_mem_reg: false,
        iommu: a.iommu.map(|m| match m {
            IommuArg::Premapped => vireo_driver::IommuMode::Premapped,
            IommuArg::OnDemand => vireo_driver::IommuMode::OnDemand,
        }),
        publish_at_kick: a.publish_at_kick,
    };
    let mut dev = BlkDevice::connect(&a.socket_path, &opts)?;
    if a.ring == RingKind::Packed && dev.features() & (1 << 34) == 0 {
        return Err(BenchError::Options("the backend does not offer packed rings".into()));
    }
    if dev.num_queues() < usize::from(a.numjobs) {
        return Err(BenchError::Options(format!("the backend offers {} queues", dev.num_queues())));
    }
    let writes = matches!(a.rw, Rw::Write | Rw::Randwrite | Rw::Randrw);
    if writes && dev.read_only() {
        return Err(BenchError::Options("the backend is read-only".into()));
    }
    if a.log_all {
        dev.start_dirty_log()?;
    }
    let disk = dev.capacity_sectors() * 512;
    let span = a.size.unwrap_or(disk).min(disk);
    let blocks = span / a.bs;
    if blocks == 0 {
        return Err(BenchError::Options(format!("--size {span} holds no block of {}", a.bs)));
    }
    let nq = dev.num_queues();
    let mut inflight: Vec<Vec<Option<InFlight>>> = vec![vec![None; usize::from(a.iodepth)]; nq];
    let mut gens: Vec<u32> = if a.verify { vec![0; usize::try_from(blocks).unwrap_or(0)] } else { Vec::new() };
    let mut busy: Vec<u32> = if a.verify { vec![0; gens.len()] } else { Vec::new() };
    let mut hist = Histogram::new();
    let mut rng = vireo_driver::XorShift::new(0x2545_f491_4f6c_dd1d);
    let mut seq = 0u64;
    let mut buf = vec![0u8; bs];
    let (mut ios, mut bytes) = (0u64, 0u64);
    let mut churn_lat: Vec<u64> = Vec::new();
    let tty = std::io::stderr().is_terminal() && !a.json;
    let runtime = Duration::from_secs_f64(a.runtime.max(0.1));
    let cpu0 = cpu_ns_self();
    let backend0 = a.backend_pid.and_then(cpu_ns_of);
    let switches0 = a.backend_pid.and_then(context_switches_of);
    let notify0 = dev.notify_counts();
    let start = Instant::now();
    let mut next_report = start + Duration::from_secs(1);
    let mut next_churn = (a.churn > 0).then(|| start + Duration::from_secs_f64(1.0 / f64::from(a.churn)));
    let mut done: Vec<(usize, Completion)> = Vec::new();
    let mut submitting = true;
    loop {
        let now = Instant::now();
        if submitting && now.duration_since(start) >= runtime {
            submitting = false;
        }
        if submitting {
            for (q, slots) in inflight.iter_mut().enumerate() {
                while dev.free_slots(q) > 0 {
                    let block = match a.rw {
                        Rw::Read | Rw::Write => {
                            seq = (seq + 1) % blocks;
                            seq
                        }
                        _ => rng.next() % blocks,
                    };
                    let bi = usize::try_from(block).unwrap_or(0);
                    if a.verify && busy[bi] > 0 {
                        continue; // one request per block at a time, so reads can be checked
                    }
                    let write = match a.rw {
                        Rw::Write | Rw::Randwrite => true,
                        Rw::Randrw => rng.next() & 1 == 0,
                        _ => false,
                    };
                    let sector = block * (a.bs / 512);
                    let gen = if write && a.verify { gens[bi].wrapping_add(1).max(1) } else { 0 };
                    let slot = if write {
                        if a.verify {
                            fill_pattern(&mut buf, block, gen);
                        }
                        dev.submit(q, req::OUT, sector, Some(&buf), 0)?
                    } else {
                        dev.submit(q, req::IN, sector, None, bs)?
                    };
                    if a.verify {
                        busy[bi] += 1;
                    }
                    slots[usize::from(slot)] = Some(InFlight { block, write, gen, at: Instant::now() });
                }
                dev.kick(q)?;
            }
        }
        done.clear();
        let wait = if a.poll { Duration::ZERO } else { Duration::from_millis(100) };
        dev.wait_any(wait, &mut done)?;
        let now = Instant::now();
        for &(q, c) in &done {
            let Some(f) = inflight[q].get_mut(usize::from(c.slot)).and_then(Option::take) else { continue };
            let what = if f.write { "write" } else { "read" };
            if c.status != status::OK {
                return Err(BenchError::Status { queue: q, status: c.status, what });
            }
            hist.add(u64::try_from(now.duration_since(f.at).as_nanos()).unwrap_or(u64::MAX));
            ios += 1;
            bytes += a.bs;
            if a.verify {
                let bi = usize::try_from(f.block).unwrap_or(0);
                busy[bi] -= 1;
                if f.write {
                    gens[bi] = f.gen;
                } else if gens[bi] != 0 {
                    let got = dev.slot_data(q, c.slot, bs)?;
                    fill_pattern(&mut buf, f.block, gens[bi]);
                    if got != buf {
                        return Err(BenchError::Verify { block: f.block, sector: f.block * (a.bs / 512) });
                    }
                }
            }
        }
        if let Some(t) = next_churn {
            if now >= t && submitting {
                let took = if a.iommu.is_some() { dev.iotlb_churn()? } else { dev.resend_mem_table()? };
                churn_lat.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                next_churn = Some(t + Duration::from_secs_f64(1.0 / f64::from(a.churn)));
            }
        }
        if tty && now >= next_report {
            let secs = now.duration_since(start).as_secs_f64();
            eprint!(
                "\r[{secs:5.1}s] {:>10.0} IOPS {:>9.1} MiB/s   ",
                ios as f64 / secs,
                bytes as f64 / secs / 1048576.0
            );
            let _ = std::io::stderr().flush();
            next_report = now + Duration::from_secs(1);
        }
        let outstanding: usize = inflight.iter().map(|q| q.iter().filter(|s| s.is_some()).count()).sum();
        if !submitting && outstanding == 0 {
            break;
        }
        if !submitting && now.duration_since(start) > runtime + Duration::from_secs(30) {
            return Err(BlkError::Timeout(Duration::from_secs(30)).into());
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_ns_self().saturating_sub(cpu0);
    let notify = dev.notify_counts();
    let backend_switches = match (a.backend_pid, switches0) {
        (Some(pid), Some(s0)) => context_switches_of(pid).map(|s| s.saturating_sub(s0)),
        _ => None,
    };
    let backend_cpu = match (a.backend_pid, backend0) {
        (Some(pid), Some(c0)) => cpu_ns_of(pid).map(|c| c.saturating_sub(c0)),
        _ => None,
    };
    if tty {
        eprintln!();
    }
    let mut verified = 0u64;
    if a.verify {
        for (bi, &gen) in gens.iter().enumerate() {
            if gen == 0 {
                continue;
            }
            let block = bi as u64;
            let (st, got) = dev.read(block * (a.bs / 512), bs)?;
            if st != status::OK {
                return Err(BenchError::Status { queue: 0, status: st, what: "verify read" });
            }
            fill_pattern(&mut buf, block, gen);
            if got != buf {
                return Err(BenchError::Verify { block, sector: block * (a.bs / 512) });
            }
            verified += 1;
        }
    }
    let dirty = if a.log_all { Some(dev.dirty_pages()?) } else { None };
    let iops = ios as f64 / elapsed;
    let per_io = |ns: u64| if ios == 0 { 0.0 } else { ns as f64 / ios as f64 };
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    churn_lat.sort_unstable();
    let pct = |v: &[u64], p: usize| if v.is_empty() { 0 } else { v[(v.len() - 1) * p / 100] };
    let out = json!({
        "cpu": vireo_driver::cpu_model(),
        "rw": format!("{:?}", a.rw).to_lowercase(),
        "bs": a.bs,
        "iodepth": a.iodepth,
        "numjobs": nq,
        "ring": format!("{:?}", a.ring).to_lowercase(),
        "runtime_s": elapsed,
        "ios": ios,
        "iops": iops,
        "bw_bytes": bytes as f64 / elapsed,
        "lat_ns": { "p50": hist.percentile(50.0), "p99": hist.percentile(99.0), "p999": hist.percentile(99.9) },
        "cpu_ns_per_io": per_io(cpu),
        "backend_cpu_ns_per_io": backend_cpu.map(per_io),
        // What an I/O costs in notifications and sleeps: the driver's kicks, the backend's calls
        // (as the driver drained them), the driver's sleeps, and the backend's context switches.
        "per_io": {
            "kicks": round3(per_io(notify.kicks - notify0.kicks)),
            "calls": round3(per_io(notify.calls - notify0.calls)),
            "driver_sleeps": round3(per_io(notify.sleeps - notify0.sleeps)),
            "driver_slept_ns": round3(per_io(notify.slept_ns - notify0.slept_ns)),
            "backend_context_switches": backend_switches.map(|n| round3(per_io(n))),
        },
        "verified_blocks": verified,
        "churn": {
            "kind": if a.iommu.is_some() { "iotlb-invalidate" } else { "mem-table" },
            "changes": churn_lat.len(),
            "reply_p50_ns": pct(&churn_lat, 50),
            "reply_p99_ns": pct(&churn_lat, 99),
        },
        "iotlb_misses": dev.iotlb_misses(),
        "dirty_pages": dirty,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{:?} bs={} iodepth={} queues={} ring={:?}: {:.0} IOPS, {:.1} MiB/s, latency p50 {:.1} us p99 {:.1} us p99.9 {:.1} us, {:.0} ns CPU per I/O{}",
            a.rw,
            a.bs,
            a.iodepth,
            nq,
            a.ring,
            iops,
            bytes as f64 / elapsed / 1048576.0,
            hist.percentile(50.0) as f64 / 1000.0,
            hist.percentile(99.0) as f64 / 1000.0,
            hist.percentile(99.9) as f64 / 1000.0,
            per_io(cpu),
            backend_cpu.map(|c| format!(" (backend {:.0} ns)", per_io(c))).unwrap_or_default(),
        );
        println!(
            "per I/O: {:.3} kicks, {:.3} calls, {:.3} driver sleeps ({:.0} ns asleep){}",
            per_io(notify.kicks - notify0.kicks),
            per_io(notify.calls - notify0.calls),
            per_io(notify.sleeps - notify0.sleeps),
            per_io(notify.slept_ns - notify0.slept_ns),
            backend_switches.map(|n| format!(", {:.3} backend context switches", per_io(n))).unwrap_or_default(),
        );
        if a.verify {
            println!(
                "verify: every read of a written block matched; {verified} blocks read back and checked at the end"
            );
        }
        if !churn_lat.is_empty() {
            println!(
                "churn: {} {}, reply p50 {:.1} us p99 {:.1} us",
                churn_lat.len(),
                if a.iommu.is_some() { "IOTLB invalidations" } else { "memory-table changes" },
                pct(&churn_lat, 50) as f64 / 1000.0,
                pct(&churn_lat, 99) as f64 / 1000.0
            );
        }
        if let Some(d) = dirty {
            println!("dirty log: {d} pages marked");
        }
    }
    Ok(())
}
