//! `vireo blk`'s serving modes, as a user runs them: `--threads` (fewer worker threads than
//! queues) and `--client` (Vireo connects to the frontend's socket and reconnects when it goes).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_driver::blk::{req, status};
use vireo_driver::{pattern, BlkDevice, BlkOptions};

struct Scratch {
    dir: PathBuf,
    child: Option<Child>,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vireo-modes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, child: None }
    }

    fn spawn(&mut self, args: &[&str], sock: &Path) {
        let child = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .arg("blk")
            .args(args)
            .arg("--socket-path")
            .arg(sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vireo");
        self.child = Some(child);
    }

    /// Starts `vireo blk` with exactly `args` (no socket path added).
    fn spawn_raw(&mut self, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .arg("blk")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vireo");
        self.child = Some(child);
    }

    /// Waits up to 5 s for `vireo` to exit on its own; `why` is the failure message.
    fn wait_exit(&mut self, why: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running vireo");
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{why}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no socket at {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects, retrying for a while: the socket file appears at bind, a moment before the backend
/// listens on it.
fn connect(sock: &Path, opts: &BlkOptions) -> BlkDevice {
    let t = Instant::now();
    loop {
        match BlkDevice::connect(sock, opts) {
            Ok(dev) => return dev,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "cannot connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a pattern on every queue and reads it back.
fn exercise(dev: &mut BlkDevice, seed: u64) {
    for q in 0..dev.num_queues() {
        let data = pattern(seed + q as u64, 8192);
        let sector = 64 * q as u64;
        assert_eq!(dev.run_on(q, req::OUT, sector, Some(&data), 0).unwrap().0, status::OK);
        let (st, back) = dev.run_on(q, req::IN, sector, None, 8192).unwrap();
        assert_eq!(st, status::OK);
        assert_eq!(back, data, "queue {q}");
    }
}

fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("vireo-worker"))
        .count()
}

#[test]
fn four_queues_on_two_worker_threads() {
    let mut s = Scratch::new("threads");
    let sock = s.dir.join("vhost.sock");
    s.spawn(&["--null", "64M", "--num-queues", "4", "--threads", "2", "--poll-max-ns", "0"], &sock);
    wait_for(&sock);
    let opts = BlkOptions { num_queues: 4, queue_size: 64, slots: 8, max_request: 8192, ..BlkOptions::default() };
    let mut dev = connect(&sock, &opts);
    assert_eq!(dev.num_queues(), 4);
    exercise(&mut dev, 1);
    assert_eq!(worker_threads(s.pid()), 2, "four queues share two worker threads");
}

#[test]
fn client_mode_connects_and_reconnects() {
    let mut s = Scratch::new("client");
    let sock = s.dir.join("frontend.sock");
    let image = s.dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    // Vireo starts first and waits (with backoff) for the frontend's socket to appear.
    s.spawn(&["--client", "--image", image.to_str().unwrap(), "--num-queues", "2"], &sock);
    std::thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(&sock).unwrap();
    let opts = BlkOptions { num_queues: 2, queue_size: 64, slots: 8, max_request: 8192, ..BlkOptions::default() };
    for round in 0..3 {
        let (stream, _) = listener.accept().unwrap();
        let mut dev = BlkDevice::with_stream(stream, &opts).unwrap();
        exercise(&mut dev, 100 * round);
        // The frontend goes away; Vireo connects again.
    }
}

/// SIGTERM while a frontend is connected and I/O has been done: `vireo blk` stops its queues,
/// exits with success, and removes its socket.
#[test]
fn sigterm_with_a_frontend_connected_exits_and_removes_the_socket() {
    let mut s = Scratch::new("sigterm");
    let sock = s.dir.join("vhost.sock");
    let image = s.dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    s.spawn(&["--image", image.to_str().unwrap()], &sock);
    wait_for(&sock);
    let opts = BlkOptions { queue_size: 64, slots: 8, max_request: 8192, ..BlkOptions::default() };
    let mut dev = connect(&sock, &opts);
    exercise(&mut dev, 7);
    let pid = rustix::process::Pid::from_raw(i32::try_from(s.pid()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = s.wait_exit("vireo did not exit on SIGTERM with a frontend connected");
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket is removed");
    drop(dev);
}

/// Keeps `fd` open across exec (the child inherits it, as from a management layer).
fn inheritable(fd: &impl std::os::fd::AsFd) -> String {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).unwrap();
    std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()).to_string()
}

/// vhost-user's backend conventions: `--fd` with an inherited listening socket (served one
/// frontend after another) or an inherited connected one (served until it goes, then exit), and
/// `--print-capabilities`.
#[test]
fn inherited_sockets_and_capabilities() {
    let opts = BlkOptions { queue_size: 64, slots: 8, max_request: 8192, ..BlkOptions::default() };
    let mut s = Scratch::new("fd-listen");
    let path = s.dir.join("made-by-someone-else.sock");
    let listener = UnixListener::bind(&path).unwrap();
    s.spawn_raw(&["--null", "8M", "--fd", &inheritable(&listener)]);
    drop(listener);
    for round in 0..2 {
        let mut dev = BlkDevice::connect(&path, &opts).unwrap();
        exercise(&mut dev, 40 + round);
    }

    let mut s = Scratch::new("fd-stream");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    s.spawn_raw(&["--null", "8M", "--fd", &inheritable(&theirs)]);
    drop(theirs);
    let mut dev = BlkDevice::with_stream(ours, &opts).unwrap();
    exercise(&mut dev, 50);
    drop(dev);
    let status = s.wait_exit("vireo did not exit when its only frontend went away");
    assert!(status.success(), "{status}");

    let out = Command::new(env!("CARGO_BIN_EXE_vireo")).args(["blk", "--print-capabilities"]).output().unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "block");
    assert!(caps["features"].as_array().unwrap().contains(&serde_json::json!("read-only")));
}

/// `vireo bench` against `vireo blk --null`, as the README's benchmark runs it, on both ring
/// layouts at depths where the driver sleeps on interrupts between requests (depth 1: every
/// request waits for its interrupt, and the device re-enables notifications before each) and
/// where it does not: every run completes requests. (A packed ring once lost the race between
/// re-enabling notifications and a request made available meanwhile, and depth 1 stalled.)
#[test]
fn bench_runs_on_both_ring_layouts_at_low_and_high_depth() {
    let mut s = Scratch::new("bench");
    let sock = s.dir.join("blk.sock");
    s.spawn(&["--null", "64M"], &sock);
    wait_for(&sock);
    for ring in ["split", "packed"] {
        for depth in ["1", "2", "32"] {
            let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
                .args(["bench", "--socket-path"])
                .arg(&sock)
                .args(["--ring", ring, "--iodepth", depth, "--runtime", "1", "--json"])
                .output()
                .expect("run vireo bench");
            assert!(out.status.success(), "{ring} depth {depth}: {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout);
            let ios = text
                .split("\"ios\":")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            assert!(ios > 100, "{ring} depth {depth}: {ios} requests completed in a second");
        }
    }
}
