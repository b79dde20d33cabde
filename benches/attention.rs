//! `cargo bench --bench attention`: every grid shape through both kernel paths, on a rayon pool
//! of `ATTN_BENCH_THREADS` threads (default 2). Throughput is reported as items/s where one
//! item is one floating-point operation (4·B·H·Lq·Lk·D for the output, 2·… for the weights,
//! dense even for causal), so `Gitem/s` reads as GFLOP/s; the output benchmarks also report
//! the bytes of K and V read per second (the figure that matters for the decode case). The side-by-side comparison with JAX and PyTorch is
//! `bench/compare.sh`.

// Shared by the benches and the CI smoke test; each uses part of it.
#[allow(dead_code)]
#[path = "grid.rs"]
mod grid;

use std::sync::OnceLock;

use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};
use grid::{Buffers, Case, GRID};

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("ATTN_BENCH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(2);
        grid::pool(threads)
    })
}

#[divan::bench(args = GRID, sample_count = 10, sample_size = 1)]
fn output(bencher: Bencher<'_, '_>, case: &Case) {
    let mut buffers = Buffers::new(case, false);
    bencher
        .counter(ItemsCount::new(case.flops(false) as u64))
        .counter(BytesCount::new(case.kv_bytes() as u64))
        .bench_local(|| buffers.run_output(pool()).expect("attention"));
}

#[divan::bench(args = GRID, sample_count = 10, sample_size = 1)]
fn weights(bencher: Bencher<'_, '_>, case: &Case) {
    let mut buffers = Buffers::new(case, true);
    bencher
        .counter(ItemsCount::new(case.flops(true) as u64))
        .bench_local(|| buffers.run_weights(pool()).expect("attention_weights"));
}

fn main() {
    divan::main();
}
