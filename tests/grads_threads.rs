//! The gradients are bit-identical for 1, 2 and 3 threads, on both backward paths and on the
//! tiled path reading a forward's residuals (`dot_product_attention_fwd` / `_bwd`): shapes with
//! several query and key blocks per head, GQA (key/value gradients summed over a group), a
//! broadcast bias (its gradient summed over batch, heads and queries), a causal term and
//! dropout. The summation order is fixed by the shape, never by the scheduling.

use attn::kernel::Align;
use attn::{
    Array, AttentionGrads, DType, DropoutRng, FlaxArgs, Intermediates, dot_product_attention_bwd,
    dot_product_attention_fwd, dot_product_attention_vjp,
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

#[test]
fn gradients_do_not_depend_on_the_thread_count() {
    let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        })
        .collect();
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        for route in [Route::Weights, Route::Tiled, Route::Saved] {
            let reference = grads(&pools[0], dtype, route);
            for pool in &pools[1..] {
                let other = grads(pool, dtype, route);
                let name = format!("{dtype} {route:?}");
                assert_eq!(bits(&reference.query), bits(&other.query), "{name} query");
                assert_eq!(bits(&reference.key), bits(&other.key), "{name} key");
                let (rv, ov) = (reference.value.as_ref(), other.value.as_ref());
                assert_eq!(bits(rv.unwrap()), bits(ov.unwrap()), "{name} value");
                let (rb, ob) = (reference.bias.as_ref(), other.bias.as_ref());
                assert_eq!(bits(rb.unwrap()), bits(ob.unwrap()), "{name} bias");
            }
        }
    }
}
