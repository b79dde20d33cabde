//! Results are bit-identical for 1, 2 and 3 threads: the forward on both paths (output, and
//! weights sown), and the gradients on both backward paths and on the tiled path reading a
//! forward's residuals (`dot_product_attention_fwd` / `_bwd`). Shapes with several query and
//! key blocks per head, GQA (key/value gradients summed over a group), a broadcast bias (its
//! gradient summed over batch, heads and queries), a causal term and dropout. The summation
//! order is fixed by the shape, never by the scheduling. Used by `tests/threads.rs` and, once
//! per kernel backend, by `tests/backends.rs`.
#![allow(dead_code)]

use attn::kernel::Align;
use attn::{
    Array, AttentionGrads, DType, DropoutRng, FlaxArgs, Intermediates, dot_product_attention,
    dot_product_attention_bwd, dot_product_attention_fwd, dot_product_attention_vjp,
};

/// Which backward computes the gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Weights,
    Tiled,
    Saved,
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

fn grads(pool: &rayon::ThreadPool, dtype: DType, route: Route) -> AttentionGrads {
    let (b, q, kv, h, g, d) = (2, 150, 170, 4, 2, 16);
    let arr = |shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Array::new(data(n, seed), shape).unwrap().astype(dtype)
    };
    let query = arr(vec![b, q, h, d], 1);
    let key = arr(vec![b, kv, g, d], 2);
    let value = arr(vec![b, kv, g, d], 3);
    let bias = Array::new(data(h * kv, 4), vec![h, 1, kv]).unwrap();
    let out_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        dtype
    };
    let cot = arr(vec![b, q, h, d], 5).astype(out_dtype);
    let mut sink = Intermediates::new();
    let args = || {
        FlaxArgs::new()
            .bias(&bias)
            .causal(Align::BottomRight)
            .dropout_rate(0.2)
            .dropout_rng(DropoutRng::new(7))
            .pool(pool)
    };
    match route {
        Route::Weights => {
            dot_product_attention_vjp(&query, &key, &value, &cot, args().module(&mut sink))
        }
        Route::Tiled => dot_product_attention_vjp(&query, &key, &value, &cot, args()),
        Route::Saved => {
            let (out, saved) = dot_product_attention_fwd(&query, &key, &value, args()).unwrap();
            dot_product_attention_bwd(&query, &key, &value, &out, &saved, &cot, args())
        }
    }
    .unwrap()
}

fn bits(a: &Array) -> Vec<u64> {
    a.to_f64_vec().iter().map(|x| x.to_bits()).collect()
}

/// Pools of 1, 2 and 3 threads.
fn pools() -> Vec<rayon::ThreadPool> {
    [1, 2, 3]
        .iter()
        .map(|&n| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build();
            pool.expect("a thread pool")
        })
        .collect()
}

/// The forward's output (and the sown weights on the weights path) on `pool`.
fn forward(pool: &rayon::ThreadPool, dtype: DType, sown: bool) -> Vec<Array> {
    let (b, q, kv, h, g, d) = (2, 300, 257, 4, 2, 64);
    let arr = |shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Array::new(data(n, seed), shape).unwrap().astype(dtype)
    };
    let (query, key, value) = (
        arr(vec![b, q, h, d], 1),
        arr(vec![b, kv, g, d], 2),
        arr(vec![b, kv, g, d], 3),
    );
    let bias = Array::new(data(h * kv, 4), vec![h, 1, kv]).unwrap();
    let mut sink = Intermediates::new();
    let mut args = FlaxArgs::new()
        .bias(&bias)
        .causal(Align::BottomRight)
        .dropout_rate(0.1)
        .dropout_rng(DropoutRng::new(9))
        .pool(pool);
    if sown {
        args = args.module(&mut sink);
    }
    let output = dot_product_attention(&query, &key, &value, args).unwrap();
    let mut results = vec![output];
    results.extend(sink.attention_weights().iter().cloned());
    results
}

/// The forward on 1, 2 and 3 threads: output path and weights path, every float dtype.
pub fn check_forward() -> Result<String, String> {
    let pools = pools();
    let mut checked = 0;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for sown in [false, true] {
            let reference = forward(&pools[0], dtype, sown);
            for (pool, threads) in pools[1..].iter().zip([2, 3]) {
                let other = forward(pool, dtype, sown);
                for (n, (r, o)) in reference.iter().zip(&other).enumerate() {
                    if bits(r) != bits(o) {
                        return Err(format!(
                            "{dtype}, weights sown: {sown}: result {n} differs between 1 and {threads} threads"
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    Ok(format!(
        "forward: {checked} results bit-identical on 1, 2 and 3 threads"
    ))
}

/// The gradients on 1, 2 and 3 threads: every backward route, f32, bf16 and f64.
pub fn check_gradients() -> Result<String, String> {
    let pools = pools();
    let mut checked = 0;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for route in [Route::Weights, Route::Tiled, Route::Saved] {
            let reference = grads(&pools[0], dtype, route);
            for (pool, threads) in pools[1..].iter().zip([2, 3]) {
                let other = grads(pool, dtype, route);
                let pairs = [
                    ("query", Some(&reference.query), Some(&other.query)),
                    ("key", Some(&reference.key), Some(&other.key)),
                    ("value", reference.value.as_ref(), other.value.as_ref()),
                    ("bias", reference.bias.as_ref(), other.bias.as_ref()),
                ];
                for (name, r, o) in pairs {
                    let (Some(r), Some(o)) = (r, o) else {
                        return Err(format!("{dtype} {route:?}: no gradient of {name}"));
                    };
                    if bits(r) != bits(o) {
                        return Err(format!(
                            "{dtype} {route:?}: the gradient of {name} differs between 1 and {threads} threads"
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    Ok(format!(
        "gradients: {checked} gradients bit-identical on 1, 2 and 3 threads"
    ))
}
