//! Times the weights path (`kernel::attention_weights`) on a few shapes:
//!
//! ```text
//! cargo run --release -p attn-runtime --example weights_timing -- [THREADS] [RUNS]
//! ```
//!
//! Prints, per shape and dtype, the median over RUNS calls (default 7, after one warm-up call)
//! in GFLOP/s with flops = 2·B·H·L·L·D (the `q·kᵀ` product only), on a pool of THREADS threads
//! (default 2). Bias, mask and dropout are off, then f32 rows with a causal mask, a `[B,1,1,L]`
//! key-padding mask (the last eighth of each batch's keys masked) and a `[H,L,L]` bias.

use std::time::Instant;

use attn_runtime::half::bf16;
use attn_runtime::kernel::{Broadcast, Geometry, Mask, Options, attention_weights};
use attn_runtime::{Context, Element};

/// Deterministic inputs in [-2, 2) (a fixed LCG; the values do not matter for the timing).
fn inputs<E: Element>(n: usize, seed: u64) -> Vec<E> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            E::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
        })
        .collect()
}

/// Median seconds of `runs` weight computations at `(b, h, l, d)`, without bias or mask.
fn median_seconds<E: Element>(
    pool: &attn_runtime::rayon::ThreadPool,
    shape: [usize; 4],
    runs: usize,
) -> f64 {
    median_seconds_with::<E>(pool, shape, runs, None, &Mask::none())
}

/// Median seconds of `runs` weight computations at `(b, h, l, d)` with a bias and a mask.
fn median_seconds_with<E: Element>(
    pool: &attn_runtime::rayon::ThreadPool,
    shape: [usize; 4],
    runs: usize,
    bias: Option<&Broadcast<'_, E>>,
    mask: &Mask<'_>,
) -> f64 {
    let [b, h, l, d] = shape;
    let query = inputs::<E>(b * l * h * d, 1);
    let key = inputs::<E>(b * l * h * d, 2);
    let mut out = vec![E::default(); b * h * l * l];
    let geom = Geometry {
        batch_shape: &[b],
        q_len: l,
        kv_len: l,
        heads: h,
        kv_heads: h,
        qk_depth: d,
        v_depth: d,
    };
    let mut times = Vec::with_capacity(runs);
    for run in 0..=runs {
        let mut ctx = Context {
            deterministic: true,
            pool: Some(pool),
            ..Context::default()
        };
        let start = Instant::now();
        attention_weights::<E, E, E, _, _, _, _>(
            &geom,
            &query,
            &key,
            bias,
            mask,
            &Options::default(),
            &mut ctx,
            &mut out,
        )
        .expect("valid call");
        if run > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(2, |a| a.parse().expect("THREADS"));
    let runs: usize = args.next().map_or(7, |a| a.parse().expect("RUNS"));
    let pool = attn_runtime::rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    println!("threads {threads}, median of {runs} runs, GFLOP/s = 2·B·H·L²·D / time");
    for shape in [[4, 8, 512, 64], [1, 16, 2048, 64], [2, 12, 512, 64]] {
        let flops = 2.0 * (shape[0] * shape[1] * shape[2] * shape[2] * shape[3]) as f64;
        let f32_s = median_seconds::<f32>(&pool, shape, runs);
        let bf16_s = median_seconds::<bf16>(&pool, shape, runs);
        println!(
            "B,H,L,D = {:?}: f32 {:7.1} GFLOP/s ({:.2} ms)  bf16 {:7.1} GFLOP/s ({:.2} ms)",
            shape,
            flops / f32_s / 1e9,
            f32_s * 1e3,
            flops / bf16_s / 1e9,
            bf16_s * 1e3
        );
    }
    let report = |what: &str, shape: [usize; 4], seconds: f64| {
        let flops = 2.0 * (shape[0] * shape[1] * shape[2] * shape[2] * shape[3]) as f64;
        println!(
            "B,H,L,D = {shape:?}: f32 {what:<16} {:7.1} GFLOP/s ({:.2} ms)",
            flops / seconds / 1e9,
            seconds * 1e3
        );
    };
    let big = [1, 16, 2048, 64];
    report(
        "causal",
        big,
        median_seconds_with::<f32>(&pool, big, runs, None, &Mask::causal()),
    );
    let [b, h, l, _] = [4, 8, 512, 64];
    let padding: Vec<bool> = (0..b * l).map(|k| k % l < l - l / 8).collect();
    let padding = Broadcast::new("mask", &padding, &[b, 1, 1, l]).expect("mask shape");
    let mask = Mask::dense(padding);
    let shape = [b, h, l, 64];
    report(
        "key padding",
        shape,
        median_seconds_with::<f32>(&pool, shape, runs, None, &mask),
    );
    let bias = inputs::<f32>(h * l * l, 3);
    let bias = Broadcast::new("bias", &bias, &[h, l, l]).expect("bias shape");
    report(
        "bias [H,L,L]",
        shape,
        median_seconds_with::<f32>(&pool, shape, runs, Some(&bias), &Mask::none()),
    );
}
