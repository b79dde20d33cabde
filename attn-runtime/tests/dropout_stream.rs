//! The dropout mask is a pure function of (seed, logical index): element `n` of the mask
//! (row-major over `[q, kv]` when broadcast, over `[batch..., heads, q, kv]` otherwise) is kept
//! iff the `n`-th draw of the seed's single Pcg32 stream is below `round(keep · 2^32)`. Checked
//! against a serial walk of the stream, for 1, 2 and 3 threads.

use attn_runtime::rayon::ThreadPoolBuilder;
use attn_runtime::{Array, DType, DropoutRng, FlaxArgs, dot_product_attention_weights};
use rand_core::RngCore;

fn kept_pattern(threads: usize, broadcast: bool, rate: f64, seed: u64) -> Vec<bool> {
    let (b, h, q, kv, d) = (2, 3, 7, 11, 4);
    let query = Array::new(vec![0.1f32; b * q * h * d], [b, q, h, d]).unwrap();
    let key = Array::new(vec![0.2f32; b * kv * h * d], [b, kv, h, d]).unwrap();
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let args = FlaxArgs::new()
        .dropout_rate(rate)
        .broadcast_dropout(broadcast)
        .dropout_rng(DropoutRng::new(seed))
        .pool(&pool);
    let w = dot_product_attention_weights(&query, &key, args).unwrap();
    assert_eq!(w.dtype(), DType::F32);
    w.to_f64_vec().iter().map(|&x| x != 0.0).collect()
}

#[test]
fn mask_is_the_serial_stream_for_any_thread_count() {
    let (bh, q, kv) = (6, 7, 11);
    for (rate, broadcast, seed) in [(0.3, false, 1u64), (0.3, true, 2), (0.9, false, 99)] {
        let threshold = ((1.0 - rate) * 4_294_967_296.0f64).round() as u64;
        let mut rng = DropoutRng::new(seed).generator();
        let draws = if broadcast { q * kv } else { bh * q * kv };
        let serial: Vec<bool> = (0..draws)
            .map(|_| u64::from(rng.next_u32()) < threshold)
            .collect();
        let expected: Vec<bool> = (0..bh * q * kv)
            .map(|n| serial[if broadcast { n % (q * kv) } else { n }])
            .collect();
        for threads in [1, 2, 3] {
            assert_eq!(
                kept_pattern(threads, broadcast, rate, seed),
                expected,
                "rate {rate}, broadcast {broadcast}, {threads} threads"
            );
        }
    }
}

#[test]
fn different_seeds_give_different_masks() {
    assert_ne!(
        kept_pattern(1, false, 0.5, 1),
        kept_pattern(1, false, 0.5, 2)
    );
}
