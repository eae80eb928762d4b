//! `vireo net`: serve a virtio-net device over vhost-user.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use vireo_net::{NetConfig, NetDevice, Port, Stats, Tap};

use crate::serve;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("port").args(["tap", "sink", "source", "loopback"]).required(true)))]
pub struct NetArgs {
    #[command(flatten)]
    serve: serve::ServeArgs,
    /// Attach to the kernel tap NAME, creating it if it does not exist (IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR | IFF_MULTI_QUEUE, one tap queue per queue pair; it goes when vireo exits).
    /// An existing tap made with `ip tuntap add dev NAME mode tap multi_queue vnet_hdr` is used
    /// as it is. Frames move between the guest's buffers and the tap with readv/writev, the
    /// virtio-net header as the guest wrote it.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Consume every frame the guest sends and drop it, reading every byte (the guest-TX
    /// benchmark); counts frames, bytes and a checksum (the sum of every byte).
    #[arg(long)]
    sink: bool,
    /// Fill the guest's receive queues as fast as it posts buffers with frames of
    /// --packet-size bytes (the guest-RX benchmark): Ethernet/IPv4/UDP with valid checksums,
    /// to --mac (broadcast without it).
    #[arg(long)]
    source: bool,
    /// Send every frame the guest sends back to it with source and destination MAC swapped.
    #[arg(long)]
    loopback: bool,
    /// Receive/transmit queue pairs offered (VIRTIO_NET_F_MQ above one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
    queue_pairs: u16,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=32768))]
    queue_size: u16,
    /// The guest's MAC address (offered in the configuration space, VIRTIO_NET_F_MAC; where
    /// --source sends to).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// The MTU offered to the guest (VIRTIO_NET_F_MTU; the driver may lower it with
    /// NET_SET_MTU). Without it, 1500 and not offered.
    #[arg(long, value_parser = clap::value_parser!(u16).range(68..=65535))]
    mtu: Option<u16>,
    /// --source: the length of each frame, as Ethernet counts it (with the 4-byte FCS, which
    /// the device does not carry: 64 writes 60 bytes of frame).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(64..=1518))]
    packet_size: u16,
    /// A Unix socket on which the counters are served: each connection gets one JSON document
    /// (per queue: frames, bytes, drops, errors, checksum, broken) and is closed.
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
}

/// `--print-capabilities`: vhost-user.json defines no features for a net backend.
const CAPABILITIES: &str = r#"{
  "type": "net"
}"#;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] vireo_net::TapError),
    #[error(transparent)]
    Serve(#[from] serve::Error),
    #[error("stats socket {path}: {source}")]
    Stats { path: String, source: std::io::Error },
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address (six hex bytes separated by colons)"));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{p:?} is not a hex byte"))?;
    }
    Ok(mac)
}

/// Serves the counters at `path` until `stop`.
fn stats_server(path: PathBuf, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> Result<(), NetError> {
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|source| NetError::Stats { path: path.display().to_string(), source })?;
    listener.set_nonblocking(true).map_err(|source| NetError::Stats { path: path.display().to_string(), source })?;
    std::thread::Builder::new()
        .name("vireo-stats".into())
        .spawn(move || {
            while !stop.load(Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                        let _ = writeln!(s, "{}", stats.to_json());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            let _ = std::fs::remove_file(&path);
        })
        .map_err(|source| NetError::Stats { path: String::new(), source })?;
    Ok(())
}

pub fn run(a: NetArgs) -> Result<(), NetError> {
    if a.serve.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let endpoint = a.serve.endpoint()?;
    let port = if let Some(name) = &a.tap {
        Port::Tap(Arc::new(Tap::open(name, usize::from(a.queue_pairs))?))
    } else if a.sink {
        Port::Sink
    } else if a.source {
        Port::Source { frame_len: usize::from(a.packet_size) - 4 }
    } else {
        Port::Loopback
    };
    let cfg = NetConfig { queue_pairs: a.queue_pairs, queue_size: a.queue_size, mac: a.mac, mtu: a.mtu };
    let device = NetDevice::new(port, cfg);
    let stats = device.stats();
    let stop_stats = Arc::new(AtomicBool::new(false));
    if let Some(path) = &a.stats_socket {
        stats_server(path.clone(), stats.clone(), stop_stats.clone())?;
    }
    let served = a.serve.run(endpoint, Arc::new(device));
    stop_stats.store(true, Relaxed);
    eprintln!("vireo net: {}", stats.to_json());
    served?;
    Ok(())
}
