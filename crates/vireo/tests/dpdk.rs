//! `vireo net` driven by a frontend Vireo did not write: DPDK's virtio-user PMD, through
//! `dpdk-testpmd` and through `tests/dpdk/loopback_check.c` (a DPDK application that checks every
//! frame the loopback returns). Split and packed rings, one and two queue pairs, mergeable
//! buffers on and off.
//!
//! DPDK comes from Debian's `dpdk-dev` (`./scripts/test.sh` installs it); it runs without huge
//! pages. The tests run one at a time (`.config/nextest.toml`): each busy-polls a core.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn require_dpdk() {
    let found = Command::new("sh").args(["-c", "command -v dpdk-testpmd && pkg-config --exists libdpdk"]).output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "DPDK is not installed (dpdk-testpmd, libdpdk): `apt-get install dpdk-dev`, as ./scripts/test.sh does"
    );
}

/// The loopback checker, built once per test run.
fn checker() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/dpdk/loopback_check.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("loopback_check");
        let flags = Command::new("pkg-config").args(["--cflags", "--libs", "libdpdk"]).output().expect("pkg-config");
        let flags = String::from_utf8_lossy(&flags.stdout).to_string();
        let st = Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .args(flags.split_whitespace())
            .status()
            .expect("gcc");
        assert!(st.success(), "building {}", src.display());
        out
    })
}

/// A `vireo net` process and its scratch directory, both gone when dropped.
struct VireoNet {
    dir: PathBuf,
    child: Option<Child>,
}

impl VireoNet {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("vireo-dpdk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .arg("net")
            .args(args)
            .arg("--socket-path")
            .arg(dir.join("net.sock"))
            .arg("--stats-socket")
            .arg(dir.join("stats.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vireo net");
        let me = Self { dir, child: Some(child) };
        let t = Instant::now();
        while !(me.sock().exists() && me.dir.join("stats.sock").exists()) {
            assert!(t.elapsed() < Duration::from_secs(10), "vireo net did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("net.sock")
    }

    /// The counters (the stats socket's JSON).
    fn stats(&self) -> serde_json::Value {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.join("stats.sock")).expect("stats socket");
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str(&text).expect("stats JSON")
    }

    fn counter(&self, queue: usize, what: &str) -> u64 {
        self.stats()["queues"][queue][what].as_u64().unwrap_or(u64::MAX)
    }
}

impl Drop for VireoNet {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&c), rustix::process::Signal::INT);
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// DPDK's run directory for `prefix`, removed when dropped.
struct Prefix(String);

impl Prefix {
    fn new(name: &str) -> Self {
        Self(format!("vireo-test-{name}-{}", std::process::id()))
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.0));
    }
}

fn eal(prefix: &Prefix, vdev: &str) -> Vec<String> {
    ["--no-pci", "--no-huge", "-m", "512", &format!("--file-prefix={}", prefix.0), "--vdev", vdev]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Runs the loopback checker against `vireo net --loopback`; returns its output.
fn loopback(name: &str, pairs: u16, devargs: &str, frames: u64) -> (Output, serde_json::Value) {
    require_dpdk();
    let net = VireoNet::start(name, &["--loopback", "--queue-pairs", &pairs.to_string()]);
    let prefix = Prefix::new(name);
    let vdev = format!("net_virtio_user0,path={},queues={pairs}{devargs}", net.sock().display());
    let out = Command::new(checker())
        .arg("-l")
        .arg("0")
        .args(eal(&prefix, &vdev))
        .arg("--")
        .arg(pairs.to_string())
        .arg(frames.to_string())
        .output()
        .expect("run the checker");
    // The backend has counted everything once the checker has all its frames back.
    (out, net.stats())
}

fn check_loopback(name: &str, pairs: u16, devargs: &str) {
    let frames = 50_000;
    let (out, stats) = loopback(name, pairs, devargs, frames);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("received={}", frames * u64::from(pairs))), "{text}");
    for q in 0..usize::from(2 * pairs) {
        let c = &stats["queues"][q];
        assert_eq!(c["frames"].as_u64(), Some(frames), "{name}: queue {q}: {c}");
        assert_eq!(c["errors"].as_u64(), Some(0), "{name}: queue {q}: {c}");
        assert_eq!(c["drops"].as_u64(), Some(0), "{name}: queue {q}: {c}");
    }
}

#[test]
fn loopback_split_one_pair() {
    check_loopback("lb-split-1", 1, "");
}

#[test]
fn loopback_packed_one_pair() {
    check_loopback("lb-packed-1", 1, ",packed_vq=1");
}

#[test]
fn loopback_split_two_pairs_without_mergeable_buffers() {
    check_loopback("lb-split-2", 2, ",mrg_rxbuf=0,in_order=0");
}

#[test]
fn loopback_packed_two_pairs() {
    check_loopback("lb-packed-2", 2, ",packed_vq=1");
}

/// testpmd's accumulated per-port counters at exit: (RX-packets, TX-packets).
fn testpmd_totals(log: &str) -> (u64, u64) {
    let block = log.rsplit("Accumulated forward statistics for all ports").next().unwrap_or("");
    let num = |key: &str| {
        block
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("RX-packets:"), num("TX-packets:"))
}

/// Runs testpmd on a virtio-user port to `sock` in `mode` for `secs`, stops it with SIGINT, and
/// returns its output.
fn testpmd(name: &str, sock: &Path, devargs: &str, mode: &str, secs: u64) -> String {
    let prefix = Prefix::new(name);
    let vdev = format!("net_virtio_user0,path={},queues=1{devargs}", sock.display());
    let child = Command::new("dpdk-testpmd")
        .args(["-l", "0,1", "--main-lcore", "1"])
        .args(eal(&prefix, &vdev))
        .args(["--", "--nb-cores=1", "--total-num-mbufs=32768", "--stats-period", "1"])
        .arg(format!("--forward-mode={mode}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dpdk-testpmd");
    std::thread::sleep(Duration::from_secs(secs));
    let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT);
    let out = child.wait_with_output().expect("testpmd output");
    String::from_utf8_lossy(&out.stdout).replace('\u{1b}', " ")
}

fn check_sink(name: &str, devargs: &str) {
    require_dpdk();
    let net = VireoNet::start(name, &["--sink"]);
    let log = testpmd(name, &net.sock(), devargs, "txonly", 3);
    let (_, sent) = testpmd_totals(&log);
    let (frames, bytes, errors) = (net.counter(1, "frames"), net.counter(1, "bytes"), net.counter(1, "errors"));
    assert!(sent > 10_000, "{name}: testpmd sent {sent} frames\n{log}");
    // Frames still in the ring when testpmd stopped the queue are not consumed.
    assert!(frames <= sent && sent - frames <= 1024, "{name}: testpmd sent {sent}, the sink consumed {frames}");
    assert_eq!(bytes, frames * 64, "{name}: every txonly frame is 64 bytes");
    assert_eq!(errors, 0, "{name}");
}

#[test]
fn sink_consumes_what_testpmd_sends_split() {
    check_sink("sink-split", "");
}

#[test]
fn sink_consumes_what_testpmd_sends_packed() {
    check_sink("sink-packed", ",packed_vq=1");
}

fn check_source(name: &str, devargs: &str) {
    require_dpdk();
    let net = VireoNet::start(name, &["--source"]);
    let log = testpmd(name, &net.sock(), devargs, "rxonly", 3);
    let (received, _) = testpmd_totals(&log);
    let (frames, errors) = (net.counter(0, "frames"), net.counter(0, "errors"));
    assert!(received > 10_000, "{name}: testpmd received {received} frames\n{log}");
    // Frames in the ring when testpmd stopped are written and not received.
    assert!(
        received <= frames && frames - received <= 1024,
        "{name}: the source wrote {frames}, testpmd received {received}"
    );
    assert_eq!(errors, 0, "{name}");
}

#[test]
fn source_fills_testpmd_split() {
    check_source("source-split", "");
}

#[test]
fn source_fills_testpmd_packed() {
    check_source("source-packed", ",packed_vq=1");
}
