//! Results are bit-identical for any thread count, on shapes large enough that each
//! (batch, head) is split into several blocks of queries (the kernels' unit of parallel work),
//! with bias, mask and dropout, for every input dtype; and the dropout mask of such a call is
//! still the serial walk of the seed's stream.

use attn_runtime::rayon::{ThreadPool, ThreadPoolBuilder};
use attn_runtime::{
    Array, DType, DropoutRng, FlaxArgs, dot_product_attention, dot_product_attention_weights,
};
use rand_core::RngCore;

/// `[batch, len, heads, depth]` for query/key/value; 150 queries span 2 or 3 query blocks.
const B: usize = 2;
const H: usize = 3;
const Q: usize = 150;
const D: usize = 8;

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Values in [-3, 3) from a fixed LCG.
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0
        })
        .collect()
}

/// Weights and output (as f64 bit patterns) of one call on `threads` threads.
fn run(threads: usize, dtype: DType, kv: usize, dropout: bool) -> (Vec<u64>, Vec<u64>) {
    let array = |seed, len, shape: Vec<usize>| {
        Array::from_f64(dtype, &values(B * len * H * D, seed), shape).unwrap()
    };
    let query = array(1, Q, vec![B, Q, H, D]);
    let key = array(2, kv, vec![B, kv, H, D]);
    let value = array(3, kv, vec![B, kv, H, D]);
    let bias = Array::from_f64(DType::F32, &values(H * Q * kv, 4), vec![H, Q, kv]).unwrap();
    let keep: Vec<bool> = values(B * kv, 5).iter().map(|&x| x > -2.0).collect();
    let mask = Array::new(keep, vec![B, 1, 1, kv]).unwrap();
    let pool = pool(threads);
    let args = || {
        FlaxArgs::new()
            .bias(&bias)
            .mask(&mask)
            .dropout_rate(if dropout { 0.25 } else { 0.0 })
            .broadcast_dropout(false)
            .dropout_rng(DropoutRng::new(7))
            .pool(&pool)
    };
    let bits = |a: Array| a.to_f64_vec().iter().map(|x| x.to_bits()).collect();
    let weights = dot_product_attention_weights(&query, &key, args()).unwrap();
    let output = dot_product_attention(&query, &key, &value, args()).unwrap();
    (bits(weights), bits(output))
}

#[test]
fn bit_identical_for_one_to_four_threads_across_query_blocks() {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for (kv, dropout) in [(600, false), (1100, true)] {
            let one = run(1, dtype, kv, dropout);
            for threads in [2, 3, 4] {
                assert!(
                    run(threads, dtype, kv, dropout) == one,
                    "{dtype}, kv {kv}, dropout {dropout}: {threads} threads differ from 1"
                );
            }
        }
    }
}

#[test]
fn dropout_mask_is_the_serial_stream_across_query_blocks() {
    let kv = 1100;
    let (rate, seed) = (0.4, 11);
    let query = Array::new(vec![0.1f32; B * Q * H * D], [B, Q, H, D]).unwrap();
    let key = Array::new(vec![0.2f32; B * kv * H * D], [B, kv, H, D]).unwrap();
    let threshold = ((1.0 - rate) * 4_294_967_296.0f64).round() as u64;
    for broadcast in [false, true] {
        let mut rng = DropoutRng::new(seed).generator();
        let draws = if broadcast { Q * kv } else { B * H * Q * kv };
        let serial: Vec<bool> = (0..draws)
            .map(|_| u64::from(rng.next_u32()) < threshold)
            .collect();
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            let args = FlaxArgs::new()
                .dropout_rate(rate)
                .broadcast_dropout(broadcast)
                .dropout_rng(DropoutRng::new(seed))
                .pool(&pool);
            let w = dot_product_attention_weights(&query, &key, args).unwrap();
            for (n, x) in w.to_f64_vec().into_iter().enumerate() {
                let k = x != 0.0;
                let want = serial[if broadcast { n % (Q * kv) } else { n }];
                assert_eq!(
                    k, want,
                    "broadcast {broadcast}, {threads} threads, element {n}"
                );
            }
        }
    }
}
