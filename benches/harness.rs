//! The attn side of `bench/compare.sh`: times one kernel path on grid cases and prints one JSON
//! object per measurement (the same fields as `bench/peers.py`).
//!
//! ```text
//! harness --threads 2 --what WHAT [--case NAME]... [--reps N]
//! ```
//!
//! `WHAT`: `output` / `weights` (the grid, `bench/compare.py --suite grid`), `structured`
//! (issue 13's cases), `layer` (issue 14's), `fwd_bwd` (issue 16's: forward + backward on
//! the f32 grid cases and the memory case), `bandwidth` (streaming read of 512 MiB).
//!
//! Each measurement: 2 warm-up calls, then calls until at least 0.4 s and 5 calls have passed
//! (at most 200), median; a call slower than 1 s gets 1 warm-up and 3 timed calls.
//! `bench/peers.py` times the peers the same way. `--tiny` (structured) runs each case shrunk as
//! the CI smoke test does, `--dump DIR` (structured) writes the output of the last call as
//! little-endian f32 to `DIR/<case>.f32` (to check the peers' semantics against attn). `--reps N` runs exactly N calls without
//! warm-up (peak-memory runs); `--reps 0` (or `--what inputs`, the grid's output path) only
//! allocates and fills the buffers (the baseline of a peak-memory run).

// Shared by the benches and the CI smoke test; each uses part of it.
#[allow(dead_code)]
#[path = "grid.rs"]
mod grid;
#[allow(dead_code)]
#[path = "support/suites.rs"]
mod suites;

use std::time::Instant;

use grid::{Buffers, Case, GRID, LAYER, MEMORY_CASE, STRUCTURED, STRUCTURED_MEMORY};
use rayon::prelude::*;

struct Args {
    threads: usize,
    what: String,
    cases: Vec<String>,
    reps: Option<usize>,
    tiny: bool,
    dump: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        what: "output".into(),
        cases: Vec::new(),
        reps: None,
        tiny: false,
        dump: None,
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
            "--case" => args.cases.push(value()?),
            "--tiny" => args.tiny = true,
            "--dump" => args.dump = Some(value()?),
            // Passed by `cargo bench`.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
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
            let t = Instant::now();
            f();
            let slow = t.elapsed().as_secs_f64() > 1.0;
            if slow {
                for _ in 0..3 {
                    let t = Instant::now();
                    f();
                    times.push(t.elapsed().as_secs_f64());
                }
            } else {
                f();
            }
            let start = Instant::now();
            while !slow
                && times.len() < 200
                && (times.len() < 5 || start.elapsed().as_secs_f64() < 0.4)
            {
                let t = Instant::now();
                f();
                times.push(t.elapsed().as_secs_f64());
            }
        }
    }
    if times.is_empty() {
        return (0.0, 0.0, 0);
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
    let result = match args.what.as_str() {
        "output" | "weights" | "inputs" => grid_cases(&args, &pool),
        "structured" => structured_cases(&args, &pool),
        "layer" => layer_cases(&args, &pool),
        "fwd_bwd" => fwd_bwd_cases(&args, &pool),
        other => Err(format!("unknown --what {other}")),
    };
    if let Err(e) = result {
        eprintln!("harness: {e}");
        std::process::exit(2);
    }
}

/// The named cases of `table` (all of `default` when no `--case` is given).
fn select<'c, C: std::fmt::Display>(
    names: &[String],
    table: &'c [C],
    default: usize,
) -> Result<Vec<&'c C>, String> {
    if names.is_empty() {
        return Ok(table[..default].iter().collect());
    }
    names
        .iter()
        .map(|n| {
            table
                .iter()
                .find(|c| c.to_string() == *n)
                .ok_or(format!("unknown case {n} for this --what"))
        })
        .collect()
}

/// One JSON line: the common fields, then `extra` (`"key": value, ...`).
fn emit(args: &Args, impl_name: &str, case: &str, t: (f64, f64, usize), extra: &str) {
    let (med, min, reps) = t;
    println!(
        "{{\"lib\": \"attn\", \"threads\": {}, \"impl\": \"{impl_name}\", \"what\": \"{}\", \"case\": \"{case}\", \"median_s\": {med}, \"min_s\": {min}, \"reps\": {reps}{extra}}}",
        args.threads, args.what
    );
}

fn grid_cases(args: &Args, pool: &rayon::ThreadPool) -> Result<(), String> {
    let table: Vec<Case> = GRID.iter().chain([&MEMORY_CASE]).copied().collect();
    let reps = if args.what == "inputs" {
        Some(0)
    } else {
        args.reps
    };
    for case in select(&args.cases, &table, GRID.len())? {
        let weights = args.what == "weights";
        let mut buffers = Buffers::new(case, weights);
        let (med, min, reps) = if weights {
            time(reps, || {
                buffers.run_weights(pool).expect("attention_weights")
            })
        } else {
            time(reps, || buffers.run_output(pool).expect("attention"))
        };
        std::hint::black_box(&buffers);
        if reps == 0 {
            continue;
        }
        let flops = case.flops(weights);
        let impl_name = if weights {
            "attn weights path"
        } else {
            "attn output path"
        };
        let extra = format!(
            ", \"flops\": {flops}, \"gflops\": {}, \"kv_bytes\": {}, \"gbps\": {}",
            flops / med / 1e9,
            case.kv_bytes(),
            case.kv_bytes() / med / 1e9
        );
        emit(args, impl_name, case.name, (med, min, reps), &extra);
    }
    Ok(())
}

fn structured_cases(args: &Args, pool: &rayon::ThreadPool) -> Result<(), String> {
    let table: Vec<_> = STRUCTURED
        .iter()
        .chain(STRUCTURED_MEMORY)
        .copied()
        .collect();
    for case in select(&args.cases, &table, STRUCTURED.len())? {
        let case = if args.tiny { &case.tiny() } else { case };
        let mut buffers = suites::StructuredBuffers::new(case);
        let t = time(args.reps, || {
            buffers.run(pool).expect("structured attention")
        });
        std::hint::black_box(&buffers);
        if let Some(dir) = &args.dump {
            let bytes: Vec<u8> = buffers
                .output()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            std::fs::write(format!("{dir}/{}.f32", case.name), bytes).map_err(|e| e.to_string())?;
        }
        if t.2 == 0 {
            continue;
        }
        let extra = format!(
            ", \"kv_bytes\": {}, \"gbps\": {}",
            case.kv_bytes(),
            case.kv_bytes() / t.0 / 1e9
        );
        emit(args, "attn", case.name, t, &extra);
    }
    Ok(())
}

fn layer_cases(args: &Args, pool: &rayon::ThreadPool) -> Result<(), String> {
    for case in select(&args.cases, LAYER, LAYER.len())? {
        let mut bench = suites::LayerBench::new(case, pool).map_err(|e| e.to_string())?;
        let t = time(args.reps, || bench.run(pool, false).expect("layer"));
        if t.2 == 0 {
            std::hint::black_box(&bench);
            continue;
        }
        let mut extra = String::new();
        if case.decode {
            // The same step over an empty cache: the difference is the time of reading the
            // cache (the projections' cost is the same in both).
            let e = time(args.reps, || bench.run(pool, true).expect("layer"));
            extra = format!(
                ", \"empty_median_s\": {}, \"cache_bytes\": {}, \"param_bytes\": {}",
                e.0,
                case.cache_bytes(),
                case.param_bytes()
            );
        }
        emit(args, "attn layer", case.name, t, &extra);
    }
    Ok(())
}

fn fwd_bwd_cases(args: &Args, pool: &rayon::ThreadPool) -> Result<(), String> {
    let f32_grid: Vec<Case> = GRID
        .iter()
        .filter(|c| c.dtype == grid::Dtype::F32)
        .chain([&MEMORY_CASE])
        .copied()
        .collect();
    for case in select(&args.cases, &f32_grid, f32_grid.len() - 1)? {
        let mut bench = suites::FwdBwd::new(case).map_err(|e| e.to_string())?;
        let t = time(args.reps, || bench.run(pool).expect("forward + backward"));
        std::hint::black_box(&bench);
        if t.2 == 0 {
            continue;
        }
        emit(args, "attn fwd+bwd", case.name, t, "");
    }
    Ok(())
}
