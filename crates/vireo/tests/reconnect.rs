//! The backend killed with SIGKILL in the middle of writes and started again on the same socket:
//! with the inflight area (INFLIGHT_SHMFD) the new process resubmits exactly what the dead one
//! had taken and not completed. Every write is acknowledged exactly once (the driver refuses a
//! completion for a request not in flight) and is on disk afterwards.
#![allow(clippy::cast_possible_truncation)] // write numbers below 8000 index a Vec

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_driver::blk::{req, status};
use vireo_driver::{pattern, BlkDevice, BlkOptions};

const BLOCK: usize = 4096;
const WRITES: u64 = 8000;
const KILLS: [u64; 8] = [600, 1500, 2400, 3300, 4200, 5100, 6000, 6900];

struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(sock: &Path, image: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .args(["blk", "--num-queues", "2", "--direct", "--socket-path"])
            .arg(sock)
            .arg("--image")
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vireo");
        Self { child: Some(child) }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

/// A directory removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn connect_retry(sock: &Path, f: &mut dyn FnMut() -> Result<(), vireo_driver::BlkError>) {
    let t = Instant::now();
    loop {
        if sock.exists() {
            match f() {
                Ok(()) => return,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "cannot connect: {e}"),
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn data(n: u64) -> Vec<u8> {
    pattern(0x5eed_0000 + n, BLOCK)
}

#[test]
fn sigkill_during_writes_loses_nothing_and_completes_nothing_twice() {
    sigkill_during_writes(false);
}

/// The same on packed rings, whose inflight region keeps copies of the descriptors in flight
/// (the ring itself has been written over by completions).
#[test]
fn sigkill_during_writes_on_packed_rings() {
    sigkill_during_writes(true);
}

fn sigkill_during_writes(packed: bool) {
    let dir: PathBuf = std::env::temp_dir().join(format!("vireo-reconnect-{packed}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Removed however the test ends (a failed assertion unwinds through it); declared before the
    // daemon, so the daemon is killed first.
    let _dir_guard = RemoveOnDrop(dir.clone());
    let (sock, image) = (dir.join("vhost.sock"), dir.join("disk.img"));
    std::fs::File::create(&image).unwrap().set_len(WRITES * BLOCK as u64).unwrap();

    let mut daemon = Daemon::start(&sock, &image);
    let opts = BlkOptions {
        num_queues: 2,
        queue_size: 128,
        slots: 32,
        max_request: BLOCK,
        inflight: true,
        packed,
        ..BlkOptions::default()
    };
    let mut dev = None;
    connect_retry(&sock, &mut || {
        dev = Some(BlkDevice::connect(&sock, &opts)?);
        Ok(())
    });
    let mut dev = dev.unwrap();
    assert_eq!(dev.num_queues(), 2);
    assert_eq!(dev.features() & (1 << 34) != 0, packed);

    // (queue, slot) -> write number, for the writes in flight.
    let mut in_flight: HashMap<(usize, u16), u64> = HashMap::new();
    let mut acked = vec![false; WRITES as usize];
    let (mut next, mut done) = (0u64, 0u64);
    let mut kills = KILLS.iter().peekable();
    let mut outstanding_at_kill = Vec::new();
    let (mut out_of_order, mut out_of_order_at_kill) = (0u64, Vec::new());
    let mut last_progress = Instant::now();
    let mut completions = Vec::new();
    while done < WRITES {
        for q in 0..2 {
            while next < WRITES && dev.free_slots(q) > 0 {
                let slot = dev.submit(q, req::OUT, next * (BLOCK as u64 / 512), Some(&data(next)), 0).unwrap();
                in_flight.insert((q, slot), next);
                next += 1;
            }
            dev.kick(q).unwrap();
        }
        completions.clear();
        dev.wait_any(Duration::from_millis(100), &mut completions).expect("no completion twice, no bad id");
        for &(q, c) in &completions {
            let n = in_flight.remove(&(q, c.slot)).expect("completion for a request in flight");
            // Out of order: an older write on the same queue is still outstanding.
            if in_flight.iter().any(|(&(q2, _), &m)| q2 == q && m < n) {
                out_of_order += 1;
            }
            assert_eq!(c.status, status::OK, "write {n}");
            assert!(!acked[n as usize], "write {n} acknowledged twice");
            acked[n as usize] = true;
            done += 1;
            last_progress = Instant::now();
        }
        // Kill while the backend is busy: right after it completed part of a
        // pipeline it had fully taken, so that it dies with requests taken and not completed.
        if kills.peek().is_some_and(|&&k| done >= k) && !in_flight.is_empty() {
            kills.next();
            outstanding_at_kill.push(in_flight.len());
            out_of_order_at_kill.push(out_of_order);
            daemon.kill();
            let _ = std::fs::remove_file(&sock);
            daemon = Daemon::start(&sock, &image);
            connect_retry(&sock, &mut || dev.reconnect(&sock));
            last_progress = Instant::now();
        }
        assert!(
            last_progress.elapsed() < Duration::from_secs(10),
            "no completion for 10 s with {} writes outstanding: requests were lost",
            in_flight.len()
        );
    }
    eprintln!(
        "writes outstanding at each SIGKILL: {outstanding_at_kill:?}; completions out of order so far: \
         {out_of_order_at_kill:?}, in all: {out_of_order}"
    );
    assert_eq!(outstanding_at_kill.len(), KILLS.len());
    drop(dev);
    daemon.kill();

    let disk = std::fs::read(&image).unwrap();
    for n in 0..WRITES {
        let at = (n as usize) * BLOCK;
        assert!(disk[at..at + BLOCK] == data(n)[..], "write {n} is not on disk");
    }
}
