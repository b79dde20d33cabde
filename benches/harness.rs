//! The attn side of `bench/compare.sh`: times one kernel path on grid cases and prints one JSON
//! object per measurement (the same fields as `bench/peers.py`).
//!
//! ```text
//! harness --threads 2 --what output|weights|bandwidth|inputs [--case NAME]... [--reps N]
//! ```
//!
//! Each measurement: 2 warm-up calls, then calls until at least 0.4 s and 5 calls have passed
//! (at most 200), median; `bench/peers.py` times the peers the same way. `--reps N` runs exactly N calls without warm-up (peak-memory runs);
//! `--what inputs` only allocates and fills the buffers (the baseline of the peak-memory run).

// Shared by the benches and the CI smoke test; each uses part of it.
#[allow(dead_code)]
#[path = "grid.rs"]
mod grid;

use std::time::Instant;

use grid::{Buffers, Case, GRID, MEMORY_CASE};
use rayon::prelude::*;

struct Args {
    threads: usize,
    what: String,
    cases: Vec<Case>,
    reps: Option<usize>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        what: "output".into(),
        cases: Vec::new(),
        reps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--what" => args.what = value()?,
            "--reps" => args.reps = Some(value()?.parse().map_err(|e| format!("--reps: {e}"))?),
            "--case" => {
                let name = value()?;
                let case = GRID
                    .iter()
                    .chain([&MEMORY_CASE])
                    .find(|c| c.name == name)
                    .ok_or(format!("unknown case {name}"))?;
                args.cases.push(*case);
            }
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.cases.is_empty() {
        args.cases = GRID.to_vec();
    }
    Ok(args)
}

/// (median, min, reps) in seconds.
fn time(reps: Option<usize>, mut f: impl FnMut()) -> (f64, f64, usize) {
    let mut times = Vec::new();
    match reps {
        Some(n) => {
            for _ in 0..n {
                let t = Instant::now();
                f();
                times.push(t.elapsed().as_secs_f64());
            }
        }
        None => {
            f();
            f();
            let start = Instant::now();
            while times.len() < 200 && (times.len() < 5 || start.elapsed().as_secs_f64() < 0.4) {
                let t = Instant::now();
                f();
                times.push(t.elapsed().as_secs_f64());
            }
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0], times.len())
}

/// Sum in 16 interleaved lanes, so that it vectorizes and reading memory is the bound.
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("harness: {e}");
            std::process::exit(2);
        }
    };
    let pool = grid::pool(args.threads);
    if args.what == "bandwidth" {
        // Sum of a 512 MiB f32 array on the pool: bytes read per second.
        let data = vec![1.0f32; 128 << 20];
        let (med, min, reps) = time(args.reps, || {
            let s: f32 = pool.install(|| data.par_chunks(1 << 16).map(lane_sum).sum());
            std::hint::black_box(s);
        });
        let bytes = (data.len() * 4) as f64;
        println!(
            "{{\"lib\": \"attn\", \"threads\": {}, \"impl\": \"attn read\", \"case\": \"read_512MiB\", \"median_s\": {med}, \"min_s\": {min}, \"reps\": {reps}, \"bytes\": {bytes}, \"gbps\": {}}}",
            args.threads,
            bytes / med / 1e9
        );
        return;
    }
    for case in &args.cases {
        let weights = args.what == "weights";
        let mut buffers = Buffers::new(case, weights);
        let (med, min, reps) = match args.what.as_str() {
            "output" => time(args.reps, || buffers.run_output(&pool).expect("attention")),
            "weights" => time(args.reps, || {
                buffers.run_weights(&pool).expect("attention_weights")
            }),
            "inputs" => (0.0, 0.0, 0),
            other => {
                eprintln!("harness: unknown --what {other}");
                std::process::exit(2);
            }
        };
        if args.what == "inputs" {
            std::hint::black_box(&buffers);
            continue;
        }
        let flops = case.flops(weights);
        let impl_name = if weights {
            "attn weights path"
        } else {
            "attn output path"
        };
        println!(
            "{{\"lib\": \"attn\", \"threads\": {}, \"impl\": \"{impl_name}\", \"what\": \"{}\", \"case\": \"{}\", \"median_s\": {med}, \"min_s\": {min}, \"reps\": {reps}, \"flops\": {flops}, \"gflops\": {}, \"kv_bytes\": {}, \"gbps\": {}}}",
            args.threads,
            args.what,
            case.name,
            flops / med / 1e9,
            case.kv_bytes(),
            case.kv_bytes() / med / 1e9
        );
    }
}
