//! The `vireo` command line.

// Figures are printed as floats on purpose.
#![allow(clippy::cast_precision_loss)]

use std::process::ExitCode;

mod bench;
mod net;
mod serve;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use vireo_memory::stress::{self, StressConfig};
use vireo_memory::RetireMode;

#[derive(Parser)]
#[command(name = "vireo", version, about = "Vireo: a vhost-user backend with direct-mapped virtqueue metadata")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Retire {
    /// Unmap retired guest memory at once (production behaviour).
    Unmap,
    /// Turn retired guest memory PROT_NONE so that any late access faults (proof mode).
    Protnone,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a disk image (or a null device) to a VMM as a vhost-user-blk backend.
    Blk(BlkArgs),
    /// Serve a network device to a VMM as a vhost-user-net backend: a kernel tap, or a sink,
    /// source or loopback.
    Net(net::NetArgs),
    /// Drive a vhost-user-blk backend from this process and measure it (fio's vocabulary).
    Bench(bench::BenchArgs),
    /// Show the invalidation protocol at work: worker threads access guest memory through cached
    /// pointers while the memory map is changed under them over and over; every access is
    /// checked against the memory files afterwards.
    MemoryDemo {
        /// Worker threads, one queue each.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Memory map changes to make (new memory tables and region remove/re-add).
        #[arg(long, default_value_t = 100_000)]
        remaps: u64,
        /// What happens to retired mappings.
        #[arg(long, value_enum, default_value_t = Retire::Protnone)]
        retire: Retire,
    },
}

#[derive(clap::Args)]
struct BlkArgs {
    #[command(flatten)]
    serve: serve::ServeArgs,
    /// The raw image file or block device to serve (`--blk-file`, the vhost-user-blk
    /// convention's name, is the same option).
    #[arg(long, alias = "blk-file", conflicts_with = "null", required_unless_present_any = ["null", "print_capabilities"])]
    image: Option<std::path::PathBuf>,
    /// Serve a null device of this size instead (k/m/g suffixes): writes are dropped, reads
    /// return whatever the buffer held, like QEMU's null-co. For measuring the data path alone.
    #[arg(long, value_parser = bench::parse_size)]
    null: Option<u64>,
    /// Refuse writes (the guest sees VIRTIO_BLK_F_RO; writes complete with IOERR).
    #[arg(long)]
    read_only: bool,
    /// Queues offered to the guest.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    num_queues: u16,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=32768))]
    queue_size: u16,
    /// The device id the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, default_value = "vireo")]
    serial: String,
    /// How image I/O is done: `io-uring` (one ring per queue, many requests in flight, completed
    /// out of order) or `sync` (preadv/pwritev on the queue's thread, one at a time). Like
    /// qemu-storage-daemon's `aio=`.
    #[arg(long, value_enum, default_value_t = AioArg::IoUring)]
    aio: AioArg,
    /// Bypass the host page cache (O_DIRECT) for reads and writes, like qemu-storage-daemon's
    /// `cache.direct=on`. Requests whose buffers are not 512-byte aligned, or are guest RAM in a
    /// regular file, go through the cache.
    #[arg(long)]
    direct: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AioArg {
    /// io_uring.
    IoUring,
    /// Synchronous preadv/pwritev.
    Sync,
}

/// Errors of `vireo blk`.
#[derive(Debug, thiserror::Error)]
enum BlkError {
    #[error("cannot open image {path}: {source}")]
    Image { path: String, source: std::io::Error },
    #[error(transparent)]
    Serve(#[from] serve::Error),
    #[error(transparent)]
    Device(#[from] vireo_blk::BlkError),
}

/// `--print-capabilities`: the vhost-user.json capabilities of a block backend. The schema
/// defines `read-only` for vhost-user-blk; the rest of what Vireo does is negotiated.
const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only"
  ]
}"#;

fn blk(a: BlkArgs) -> Result<(), BlkError> {
    if a.serve.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let endpoint = a.serve.endpoint()?;
    let storage = match (&a.image, a.null) {
        (Some(path), _) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!a.read_only)
                .open(path)
                .map_err(|source| BlkError::Image { path: path.display().to_string(), source })?;
            let size = file
                .metadata()
                .map(|m| m.len())
                .map_err(|source| BlkError::Image { path: path.display().to_string(), source })?;
            vireo_blk::Storage::File { file, size }
        }
        (None, Some(size)) => {
            if a.direct {
                tracing::warn!("--direct has no effect on a null device");
            }
            vireo_blk::Storage::Null { size }
        }
        (None, None) => unreachable!("clap requires --image or --null"),
    };
    let device = vireo_blk::BlkDevice::new(
        storage,
        vireo_blk::BlkConfig {
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            read_only: a.read_only,
            serial: a.serial,
            aio: if a.aio == AioArg::Sync { vireo_blk::Aio::Sync } else { vireo_blk::Aio::IoUring },
            direct: a.direct,
        },
    )?;
    a.serve.run(endpoint, std::sync::Arc::new(device))?;
    Ok(())
}

fn memory_demo(workers: usize, remaps: u64, retire: Retire) -> Result<bool, stress::StressError> {
    let retire = match retire {
        Retire::Unmap => RetireMode::Unmap,
        Retire::Protnone => RetireMode::ProtNone { keep: vireo_memory::mmap::DEFAULT_QUARANTINE },
    };
    println!("vireo memory-demo: {workers} workers, {remaps} memory map changes, retired mappings {retire:?}");
    let r = stress::run(StressConfig { workers, remaps, retire })?;
    let secs = r.elapsed.as_secs_f64();
    for (i, w) in r.workers.iter().enumerate() {
        let batches = w.cached_batches + w.translating_batches;
        println!(
            "  worker {i}: {batches} batches ({:.1} M/s), {:.1}% through cached pointers; ring counter {} (memory says {}), buffer counter {} (memory says {}), buffer absent {} times",
            batches as f64 / secs / 1e6,
            100.0 * w.cached_batches as f64 / batches.max(1) as f64,
            w.ring_incs,
            w.ring_in_memory,
            w.buf_incs,
            w.buf_in_memory,
            w.buf_absent,
        );
    }
    println!(
        "  {} map changes in {:.2} s ({:.1} us each); invalidation p50 {:.1} us, p99 {:.1} us",
        r.remaps,
        secs,
        secs * 1e6 / r.remaps.max(1) as f64,
        r.invalidation_p50.as_secs_f64() * 1e6,
        r.invalidation_p99.as_secs_f64() * 1e6
    );
    println!(
        "  memory: rss {} KiB -> {} KiB, mappings {} -> {}; stray writes: {}",
        r.rss_warm / 1024,
        r.rss_end / 1024,
        r.maps_warm,
        r.maps_end,
        r.stray_writes.len()
    );
    let ok = r.consistent();
    println!(
        "  result: {}",
        if ok { "every access landed exactly once, no access touched retired memory" } else { "INCONSISTENT" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MemoryDemo { workers, remaps, retire } => memory_demo(workers, remaps, retire),
        Command::Blk(args) => match blk(args) {
            Ok(()) => Ok(true),
            Err(e) => {
                eprintln!("vireo blk: {e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Net(args) => match net::run(args) {
            Ok(()) => Ok(true),
            Err(e) => {
                eprintln!("vireo net: {e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Bench(args) => match bench::run(&args) {
            Ok(()) => Ok(true),
            Err(e) => {
                eprintln!("vireo bench: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vireo: {e}");
            ExitCode::FAILURE
        }
    }
}
