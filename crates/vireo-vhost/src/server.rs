//! The server loop: where a connection comes from (a socket we listen on, one we were handed,
//! one we connect to) and serving it until the frontend goes away or we are told to stop.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::VhostUserBackend;
use crate::device::Device;
use crate::dispatch;

/// Errors of the server loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be set up.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An inherited listening socket could not be used.
    #[error("the listening socket cannot be used: {0}")]
    Listener(#[source] std::io::Error),
}

/// Where the frontend's connection comes from.
#[derive(Debug)]
pub enum Endpoint {
    /// Listen on this path (created, and removed at the end; a stale socket file is replaced),
    /// one frontend at a time.
    Listen(PathBuf),
    /// A listening socket someone else made (vhost-user's `--fd`: a management layer bound it
    /// and passed it down), one frontend at a time.
    Listener(UnixListener),
    /// One connected frontend (an inherited connected socket; the message fuzzer), served until
    /// it goes away.
    Stream(UnixStream),
    /// Connect to the frontend's socket (QEMU's `server=on` chardev), and connect again, with a
    /// delay that doubles from 50 ms to 2 s, whenever the connection ends or cannot be made.
    Connect(PathBuf),
}

/// How [`serve`] serves a device.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Busy-poll every started queue instead of waiting for kicks.
    pub poll: bool,
    /// Worker threads per connection (queue group `g` on thread `g % threads`); `None`: one per
    /// group.
    pub threads: Option<usize>,
    /// How long a worker polls after work before it sleeps (`--poll-max-ns`); `None`:
    /// [`crate::DEFAULT_POLL_MAX`].
    pub poll_max: Option<Duration>,
}

/// Serves `device` at `endpoint` until `stop` is set (looked at least every 200 ms, also while a
/// frontend is connected) or, for a single stream, until its frontend goes away.
pub fn serve(
    endpoint: Endpoint,
    device: Arc<dyn Device>,
    stop: &AtomicBool,
    opts: &ServeOptions,
) -> Result<(), ServeError> {
    match endpoint {
        Endpoint::Listen(path) => {
            let listen_err = |e: std::io::Error| ServeError::Listen { path: path.display().to_string(), source: e };
            // A stale socket file (a killed predecessor) is replaced; the caller checks that no
            // live backend answers on it first.
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(listen_err)?;
            tracing::info!(socket = %path.display(), "listening");
            let served = serve_listener(&listener, &device, stop, opts).map_err(listen_err);
            let _ = std::fs::remove_file(&path);
            served
        }
        Endpoint::Listener(listener) => serve_listener(&listener, &device, stop, opts).map_err(ServeError::Listener),
        Endpoint::Stream(sock) => {
            serve_connection(&sock, new_backend(&device, opts), stop);
            Ok(())
        }
        Endpoint::Connect(path) => {
            serve_client(&path, &device, stop, opts);
            Ok(())
        }
    }
}

fn new_backend(device: &Arc<dyn Device>, opts: &ServeOptions) -> VhostUserBackend {
    let groups = device.num_queues().div_ceil(device.group_size().max(1));
    let threads = opts.threads.unwrap_or(groups);
    VhostUserBackend::new(device.clone(), opts.poll, threads, opts.poll_max.unwrap_or(crate::DEFAULT_POLL_MAX))
}

/// Waits up to 200 ms for `fd` to become readable (or hung up); says whether it did.
fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 200_000_000 };
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// Serves one connection until the frontend goes away or `stop` is set; then stops every
/// queue and releases the connection's memory.
/// Returns true when the connection ended on a protocol or socket error (not a disconnect).
fn serve_connection(sock: &UnixStream, mut backend: VhostUserBackend, stop: &AtomicBool) -> bool {
    use std::os::fd::AsFd;
    tracing::info!("frontend connected");
    // A message is read whole once its header arrived; a frontend that stalls half-way through
    // one must not hold the connection's thread (and `stop`) for ever.
    if let Err(e) = sock.set_read_timeout(Some(Duration::from_secs(10))) {
        tracing::warn!(error = %e, "cannot set a read timeout");
    }
    // Replies too: a frontend that does not read its socket must not hold us.
    if let Err(e) = sock.set_write_timeout(Some(Duration::from_secs(10))) {
        tracing::warn!(error = %e, "cannot set a write timeout");
    }
    let mut failed = false;
    while !stop.load(Relaxed) {
        if backend.poisoned() {
            tracing::error!(
                "the frontend shrank memory it handed over (an access faulted past its end): dropping the connection"
            );
            failed = true;
            break;
        }
        // Look at `stop` (and the poison) at least every 200 ms, also while a frontend is
        // connected.
        if !wait_readable(sock.as_fd()) {
            continue;
        }
        let msg = match dispatch::recv_message(sock) {
            Ok(Some(m)) => m,
            Ok(None) | Err(dispatch::ProtocolError::Disconnected) => {
                tracing::info!("frontend disconnected");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping the connection");
                failed = true;
                break;
            }
        };
        let code = msg.code;
        match dispatch::handle_message(&mut backend, msg) {
            Ok(Some(reply)) => {
                if let Err(e) = dispatch::send_reply(sock, code, &reply) {
                    tracing::warn!(error = %e, "reply failed; dropping the connection");
                    failed = true;
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "dropping the connection");
                failed = true;
                break;
            }
        }
    }
    backend.shutdown();
    failed
}

/// Serves a listening socket one frontend at a time, until `stop` is set.
fn serve_listener(
    listener: &UnixListener,
    device: &Arc<dyn Device>,
    stop: &AtomicBool,
    opts: &ServeOptions,
) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    listener.set_nonblocking(true)?;
    while !stop.load(Relaxed) {
        match listener.accept() {
            Ok((sock, _)) => {
                if let Err(e) = sock.set_nonblocking(false) {
                    tracing::warn!(error = %e, "cannot use the connection");
                    continue;
                }
                let _ = serve_connection(&sock, new_backend(device, opts), stop);
            }
            // Wake for a connection at once, and at least every 200 ms to look at `stop`.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener.as_fd());
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// Client mode: connect to the frontend's socket; when the connection ends (or cannot be made),
/// try again after a delay that doubles from 50 ms up to 2 s, until `stop`.
fn serve_client(path: &std::path::Path, device: &Arc<dyn Device>, stop: &AtomicBool, opts: &ServeOptions) {
    let mut delay = Duration::from_millis(50);
    let mut announced = false;
    while !stop.load(Relaxed) {
        match UnixStream::connect(path) {
            Ok(sock) => {
                announced = false;
                if serve_connection(&sock, new_backend(device, opts), stop) {
                    // Refused by us or broken: wait before trying again, or a frontend that
                    // keeps sending what we refuse would spin this loop.
                    sleep_unless_stopped(delay, stop);
                    delay = (delay * 2).min(Duration::from_secs(2));
                } else {
                    delay = Duration::from_millis(50);
                }
            }
            Err(e) => {
                if !announced {
                    tracing::info!(socket = %path.display(), error = %e, "waiting for the frontend's socket");
                    announced = true;
                }
                sleep_unless_stopped(delay, stop);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    let until = std::time::Instant::now() + delay;
    while std::time::Instant::now() < until && !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
