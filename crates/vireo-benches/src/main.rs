//! Side-by-side benchmarks of Vireo against its peers, in one run, as ratios.
//!
//! `cargo run --release -p vireo-benches -- memory|queue|net-invalidation|net-profile --json`

// Measurement arithmetic converts between counts, nanoseconds and floats on purpose.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]

mod harness;
mod memory;
mod net_churn;
mod queue;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Vireo against its peers, side by side in one run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    /// Print one JSON object instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    /// Fewer and shorter runs (a smoke test of the harness, not figures to quote).
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum Bench {
    /// Address translation vs vm-memory, the protocol's read side, invalidation latency.
    Memory,
    /// Per-chain cost of pop + walk + add used vs virtio-queue and a raw-pointer loop.
    Queue,
    /// Invalidation reply latency while a 64-byte stream runs through the network device (guest
    /// TX into the sink, guest RX from the source), and the packet rate kept, against the same
    /// stream with no invalidations, interleaved.
    NetInvalidation {
        /// Memory-table changes per second during the "churn" runs.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds per run (default 5; 0.5 with --quick).
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// For profiling the network device: `--frames` 64-byte frames through it in each direction,
    /// event-driven (a kick per refill), with the frames moved. Under callgrind (see
    /// BENCHMARKS.md) it gives instructions per frame.
    NetProfile {
        /// Frames to move in each direction.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let mut out = match cli.bench {
        Bench::Memory => memory::run(cli.quick),
        Bench::Queue => queue::run(cli.quick),
        Bench::NetInvalidation { rate, seconds } => net_churn::run(cli.quick, rate, seconds),
        Bench::NetProfile { frames } => net_churn::profile(if cli.quick { frames.min(10_000) } else { frames }),
    };
    // Figures differ between kinds of CPU (BENCHMARKS.md keeps a table per machine).
    out["cpu"] = serde_json::Value::from(vireo_driver::cpu_model());
    if cli.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
}
