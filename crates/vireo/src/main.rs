//! The `vireo` command line.

// Figures are printed as floats on purpose.
#![allow(clippy::cast_precision_loss)]

use std::process::ExitCode;

mod bench;

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
    tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MemoryDemo { workers, remaps, retire } => memory_demo(workers, remaps, retire),
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
