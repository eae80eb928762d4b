//! What every `vireo` device command shares: the vhost-user backend conventions (a socket path
//! or an inherited descriptor, client mode, `--print-capabilities`), the worker options, and
//! serving until SIGINT or SIGTERM.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vireo_vhost::{Device, Endpoint, ServeOptions};

/// How long the daemon may take to stop after SIGINT or SIGTERM before it exits anyway. Nothing
/// a frontend does can hold a thread of ours (every descriptor it hands over is non-blocking and
/// polled, replies have a write timeout), so this bounds only what the kernel holds: I/O still
/// in flight on a stuck disk, which the process's exit cancels.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The vhost-user backend options of a device command.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The vhost-user socket to listen on (created; removed on exit), or with --client the
    /// frontend's socket to connect to.
    #[arg(long, required_unless_present_any = ["fd", "print_capabilities"], conflicts_with = "fd")]
    pub socket_path: Option<std::path::PathBuf>,
    /// The vhost-user socket is this inherited file descriptor (vhost-user's backend
    /// conventions): a listening socket is served one frontend at a time, a connected one is
    /// served until that frontend goes away.
    #[arg(long, conflicts_with = "client")]
    pub fd: Option<i32>,
    /// Print the backend's capabilities as vhost-user.json describes them and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Connect to the frontend's socket (QEMU's `-chardev socket,server=on`) instead of
    /// listening, and connect again with backoff (50 ms doubling to 2 s) whenever the
    /// connection ends or the socket is not there yet.
    #[arg(long)]
    pub client: bool,
    /// Worker threads per connection; queue group g (a queue, or a queue pair for a network
    /// device) is served by thread g % N from one poll loop. Default: one thread per group.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Busy-poll the rings instead of waiting for the guest's kicks: each worker thread spins
    /// over its queues (lower latency at the price of a busy core per thread).
    #[arg(long)]
    pub poll: bool,
    /// After work, how long (in nanoseconds) a worker keeps polling its rings and descriptors
    /// before it sleeps until the next event, as QEMU's iothread `poll-max-ns`; the window
    /// adapts below it, and an idle spinning worker yields its core to any thread that wants
    /// it. 0 sleeps at once.
    #[arg(long, default_value_t = 100_000)]
    pub poll_max_ns: u64,
}

/// Errors of the shared part.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket path {0} is in use by a running backend")]
    InUse(String),
    #[error(transparent)]
    Serve(#[from] vireo_vhost::ServeError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("--fd {fd}: {why}")]
    Fd { fd: i32, why: String },
}

impl ServeArgs {
    /// Where the frontend's connection comes from. Checks the inherited descriptor, and that no
    /// live backend answers on the socket path (a socket another backend listens on must not be
    /// stolen from it).
    pub fn endpoint(&self) -> Result<Endpoint, Error> {
        if let Some(fd) = self.fd {
            return inherited_socket(fd);
        }
        let Some(path) = self.socket_path.clone() else { unreachable!("clap requires --socket-path or --fd") };
        if self.client {
            return Ok(Endpoint::Connect(path));
        }
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(Error::InUse(path.display().to_string()));
        }
        Ok(Endpoint::Listen(path))
    }

    /// Serves `device` at `endpoint` until SIGINT or SIGTERM (then within [`STOP_DEADLINE`]).
    pub fn run(&self, endpoint: Endpoint, device: Arc<dyn Device>) -> Result<(), Error> {
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).map_err(Error::Signals)?;
        }
        watchdog(stop.clone());
        let opts = ServeOptions {
            poll: self.poll,
            threads: self.threads.map(usize::from),
            poll_max: Some(Duration::from_nanos(self.poll_max_ns)),
        };
        vireo_vhost::serve(endpoint, device, &stop, &opts)?;
        Ok(())
    }
}

/// Exits the process [`STOP_DEADLINE`] after `stop` is set if it has not ended by then.
fn watchdog(stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("vireo-stop-watchdog".into()).spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(STOP_DEADLINE);
        eprintln!("vireo: still stopping {} s after the signal; exiting", STOP_DEADLINE.as_secs());
        std::process::exit(2);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no stop watchdog");
    }
}

/// Takes over the inherited descriptor `fd` as the vhost-user socket.
fn inherited_socket(fd: i32) -> Result<Endpoint, Error> {
    let bad = |why: &str| Error::Fd { fd, why: why.to_string() };
    if fd < 3 {
        return Err(bad("not an inherited descriptor (0, 1 and 2 are stdio)"));
    }
    // SAFETY: the only check a process can make that `fd` is open is to ask the kernel about
    // it, which needs a borrowed descriptor for the duration of the call; nothing is done with
    // it if it is not open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let listening =
        rustix::net::sockopt::socket_acceptconn(borrowed).map_err(|e| bad(&format!("not a socket: {e}")))?;
    // SAFETY: `fd` is an open socket (checked above) that the process was started with for this
    // purpose; nothing else in the process owns it, so this takes sole ownership.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(if listening { Endpoint::Listener(owned.into()) } else { Endpoint::Stream(owned.into()) })
}
