//! Property tests of the Flax-style API: rows of the weights sum to 1, masked entries are 0,
//! fully masked rows are uniform, dropout keeps `1 - rate` with the right scale and broadcast
//! pattern, results are bit-identical for 1 and 2 threads, and the API agrees with a plain
//! reference implementation (written here, f64 math) on random shapes and broadcast patterns.

use attn::{
    Array, DType, DropoutRng, FlaxArgs, dot_product_attention, dot_product_attention_weights,
};
use proptest::prelude::*;

/// A small deterministic generator for tensor data (proptest picks the seed).
struct Data(u64);

impl Data {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    fn bools(&mut self, n: usize, p_keep: f64) -> Vec<bool> {
        (0..n).map(|_| (self.next() + 1.0) / 2.0 < p_keep).collect()
    }
}

/// Sizes of a random problem, and the shapes of its bias and mask.
#[derive(Clone, Debug)]
struct Problem {
    batch: Vec<usize>,
    heads: usize,
    q: usize,
    kv: usize,
    d: usize,
    dv: usize,
    bias: Option<Vec<usize>>,
    mask: Option<Vec<usize>>,
    seed: u64,
}

impl Problem {
    /// `[batch..., heads, q, kv]`
    fn logits_shape(&self) -> Vec<usize> {
        let mut s = self.batch.clone();
        s.extend([self.heads, self.q, self.kv]);
        s
    }
}

/// A shape that broadcasts to `full`: some axes set to 1, some leading axes dropped.
fn operand_shape(full: Vec<usize>) -> impl Strategy<Value = Vec<usize>> {
    let n = full.len();
    (proptest::collection::vec(any::<bool>(), n), 0..n).prop_map(move |(ones, drop)| {
        full.iter()
            .zip(&ones)
            .map(|(&s, &one)| if one { 1 } else { s })
            .skip(drop)
            .collect()
    })
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        proptest::collection::vec(1usize..4, 0..3),
        1usize..4,
        1usize..6,
        1usize..7,
        1usize..6,
        1usize..5,
        any::<u64>(),
    )
        .prop_flat_map(|(batch, heads, q, kv, d, dv, seed)| {
            let mut full = batch.clone();
            full.extend([heads, q, kv]);
            (
                proptest::option::of(operand_shape(full.clone())),
                proptest::option::of(operand_shape(full)),
            )
                .prop_map(move |(bias, mask)| Problem {
                    batch: batch.clone(),
                    heads,
                    q,
                    kv,
                    d,
                    dv,
                    bias,
                    mask,
                    seed,
                })
        })
}

struct Inputs {
    query: Vec<f64>,
    key: Vec<f64>,
    value: Vec<f64>,
    bias: Option<Vec<f64>>,
    mask: Option<Vec<bool>>,
}

fn inputs(p: &Problem) -> Inputs {
    let mut g = Data(p.seed);
    let nb: usize = p.batch.iter().product();
    Inputs {
        query: g.vec(nb * p.q * p.heads * p.d, 2.0),
        key: g.vec(nb * p.kv * p.heads * p.d, 2.0),
        value: g.vec(nb * p.kv * p.heads * p.dv, 1.0),
        bias: p.bias.as_ref().map(|s| g.vec(s.iter().product(), 3.0)),
        mask: p.mask.as_ref().map(|s| g.bools(s.iter().product(), 0.7)),
    }
}

fn shape(batch: &[usize], tail: [usize; 3]) -> Vec<usize> {
    let mut s = batch.to_vec();
    s.extend(tail);
    s
}

fn arrays(
    p: &Problem,
    x: &Inputs,
    dtype: DType,
) -> (Array, Array, Array, Option<Array>, Option<Array>) {
    let q = Array::from_f64(dtype, &x.query, shape(&p.batch, [p.q, p.heads, p.d])).unwrap();
    let k = Array::from_f64(dtype, &x.key, shape(&p.batch, [p.kv, p.heads, p.d])).unwrap();
    let v = Array::from_f64(dtype, &x.value, shape(&p.batch, [p.kv, p.heads, p.dv])).unwrap();
    let b = x
        .bias
        .as_ref()
        .map(|b| Array::from_f64(dtype, b, p.bias.clone().unwrap()).unwrap());
    let m = x
        .mask
        .as_ref()
        .map(|m| Array::new(m.clone(), p.mask.clone().unwrap()).unwrap());
    (q, k, v, b, m)
}

/// The element of a row-major operand of `shape` that NumPy broadcasting maps to `index` of
/// `target` (written independently of the library).
fn broadcast_get<T: Copy>(data: &[T], shape: &[usize], target: &[usize], index: &[usize]) -> T {
    let lead = target.len() - shape.len();
    let mut flat = 0;
    for (a, &n) in shape.iter().enumerate() {
        let i = if n == 1 { 0 } else { index[lead + a] };
        flat = flat * n + i;
    }
    data[flat]
}

/// Reference attention in f64, straight from the definition: logits = q·k / sqrt(d) + bias,
/// masked logits replaced by f64::MIN, softmax over kv, output = weights · v.
fn reference(p: &Problem, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let nb: usize = p.batch.iter().product();
    let (h_n, q_n, k_n, d, dv) = (p.heads, p.q, p.kv, p.d, p.dv);
    let target = p.logits_shape();
    let mut weights = vec![0.0; nb * h_n * q_n * k_n];
    let mut output = vec![0.0; nb * q_n * h_n * dv];
    for b in 0..nb {
        // batch multi-index of b
        let mut bidx = vec![0; p.batch.len()];
        let mut r = b;
        for a in (0..p.batch.len()).rev() {
            bidx[a] = r % p.batch[a];
            r /= p.batch[a];
        }
        for h in 0..h_n {
            for i in 0..q_n {
                let mut row = vec![0.0; k_n];
                for (j, x_ij) in row.iter_mut().enumerate() {
                    let mut idx = bidx.clone();
                    idx.extend([h, i, j]);
                    let mut s = 0.0;
                    for c in 0..d {
                        s += x.query[((b * q_n + i) * h_n + h) * d + c]
                            * x.key[((b * k_n + j) * h_n + h) * d + c];
                    }
                    let mut logit = s / (d as f64).sqrt();
                    if let Some(bias) = &x.bias {
                        logit += broadcast_get(bias, p.bias.as_ref().unwrap(), &target, &idx);
                    }
                    let masked = x.mask.as_ref().is_some_and(|mask| {
                        !broadcast_get(mask, p.mask.as_ref().unwrap(), &target, &idx)
                    });
                    if masked {
                        logit = f64::MIN;
                    }
                    *x_ij = logit;
                }
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..k_n {
                    let w = e[j] / z;
                    weights[((b * h_n + h) * q_n + i) * k_n + j] = w;
                    for c in 0..dv {
                        output[((b * q_n + i) * h_n + h) * dv + c] +=
                            w * x.value[((b * k_n + j) * h_n + h) * dv + c];
                    }
                }
            }
        }
    }
    (weights, output)
}

fn close(a: &[f64], e: &[f64], atol: f64, rtol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), e.len());
    for (i, (x, y)) in a.iter().zip(e).enumerate() {
        prop_assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "element {}: {} vs reference {}",
            i,
            x,
            y
        );
    }
    Ok(())
}

fn pool(threads: usize) -> attn::rayon::ThreadPool {
    attn::rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn agrees_with_reference_f64_and_f32(p in problem()) {
        let x = inputs(&p);
        let (w_ref, o_ref) = reference(&p, &x);
        let (q, k, v, b, m) = arrays(&p, &x, DType::F64);
        let mut args = FlaxArgs::new();
        if let Some(b) = &b { args = args.bias(b); }
        if let Some(m) = &m { args = args.mask(m); }
        let out = dot_product_attention(&q, &k, &v, args).unwrap();
        prop_assert_eq!(out.dtype(), DType::F64);
        prop_assert_eq!(out.shape().to_vec(), shape(&p.batch, [p.q, p.heads, p.dv]));
        close(&out.to_f64_vec(), &o_ref, 1e-13, 1e-11)?;
        let mut args = FlaxArgs::new();
        if let Some(b) = &b { args = args.bias(b); }
        if let Some(m) = &m { args = args.mask(m); }
        let w = dot_product_attention_weights(&q, &k, args).unwrap();
        prop_assert_eq!(w.shape().to_vec(), p.logits_shape());
        close(&w.to_f64_vec(), &w_ref, 1e-13, 1e-11)?;

        // float32 inputs (the f64 values rounded): the reference on the rounded inputs.
        let rounded = Inputs {
            query: x.query.iter().map(|&v| v as f32 as f64).collect(),
            key: x.key.iter().map(|&v| v as f32 as f64).collect(),
            value: x.value.iter().map(|&v| v as f32 as f64).collect(),
            bias: x.bias.as_ref().map(|b| b.iter().map(|&v| v as f32 as f64).collect()),
            mask: x.mask.clone(),
        };
        let (w_ref, o_ref) = reference(&p, &rounded);
        let (q, k, v, b, m) = arrays(&p, &x, DType::F32);
        let mut args = FlaxArgs::new();
        if let Some(b) = &b { args = args.bias(b); }
        if let Some(m) = &m { args = args.mask(m); }
        let mut sink = attn::Intermediates::new();
        let out = dot_product_attention(&q, &k, &v, args.module(&mut sink)).unwrap();
        prop_assert_eq!(out.dtype(), DType::F32);
        close(&out.to_f64_vec(), &o_ref, 1e-5, 1e-4)?;
        close(&sink.attention_weights()[0].to_f64_vec(), &w_ref, 1e-6, 1e-4)?;
    }

    #[test]
    fn rows_sum_to_one_masked_are_zero_fully_masked_uniform(p in problem()) {
        let x = inputs(&p);
        let (q, k, _, b, m) = arrays(&p, &x, DType::F64);
        let mut args = FlaxArgs::new();
        if let Some(b) = &b { args = args.bias(b); }
        if let Some(m) = &m { args = args.mask(m); }
        let w = dot_product_attention_weights(&q, &k, args).unwrap().to_f64_vec();
        let target = p.logits_shape();
        for (r, row) in w.chunks(p.kv).enumerate() {
            let sum: f64 = row.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-12, "row {} sums to {}", r, sum);
            let Some(mask) = &x.mask else { continue };
            // multi-index of the row
            let mut idx = vec![0; target.len()];
            let mut rem = r;
            for a in (0..target.len() - 1).rev() {
                idx[a] = rem % target[a];
                rem /= target[a];
            }
            let keeps: Vec<bool> = (0..p.kv).map(|j| {
                idx[target.len() - 1] = j;
                broadcast_get(mask, p.mask.as_ref().unwrap(), &target, &idx)
            }).collect();
            if keeps.iter().any(|&k| k) {
                for (j, &keep) in keeps.iter().enumerate() {
                    if !keep { prop_assert_eq!(row[j], 0.0, "masked entry {} of row {}", j, r); }
                }
            } else {
                for &v in row { prop_assert!((v - 1.0 / p.kv as f64).abs() < 1e-15, "fully masked row {} not uniform: {:?}", r, row); }
            }
        }
    }

    #[test]
    fn bit_identical_for_one_and_two_threads(p in problem(), broadcast in any::<bool>(), seed in any::<u64>()) {
        let x = inputs(&p);
        let run = |threads: usize, dtype: DType| {
            let pool = pool(threads);
            let (q, k, v, b, m) = arrays(&p, &x, dtype);
            let mut args = FlaxArgs::new()
                .pool(&pool)
                .dropout_rate(0.3)
                .broadcast_dropout(broadcast)
                .dropout_rng(DropoutRng::new(seed));
            if let Some(b) = &b { args = args.bias(b); }
            if let Some(m) = &m { args = args.mask(m); }
            let mut sink = attn::Intermediates::new();
            let out = dot_product_attention(&q, &k, &v, args.module(&mut sink)).unwrap();
            (out, sink.attention_weights()[0].clone())
        };
        for dtype in [DType::F32, DType::BF16] {
            let (o1, w1) = run(1, dtype);
            let (o2, w2) = run(2, dtype);
            let bits = |a: &Array| a.to_f64_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&o1), bits(&o2));
            prop_assert_eq!(bits(&w1), bits(&w2));
        }
    }
}

/// Dropout: the kept fraction is close to `1 - rate`, kept weights are the undropped weights
/// times `1 / keep` (in the computation dtype), and the broadcast mask is the same for every
/// batch element and head (and differs between them without broadcast).
#[test]
fn dropout_keep_rate_scale_and_broadcast_pattern() {
    let (b, h, q, kv, d) = (2, 3, 40, 50, 8);
    let mut g = Data(11);
    let query = Array::from_f64(DType::F32, &g.vec(b * q * h * d, 1.0), [b, q, h, d]).unwrap();
    let key = Array::from_f64(DType::F32, &g.vec(b * kv * h * d, 1.0), [b, kv, h, d]).unwrap();
    let plain = dot_product_attention_weights(&query, &key, FlaxArgs::new())
        .unwrap()
        .to_f64_vec();
    for (rate, broadcast) in [(0.25, true), (0.25, false), (0.6, true)] {
        let args = FlaxArgs::new()
            .dropout_rate(rate)
            .broadcast_dropout(broadcast)
            .dropout_rng(DropoutRng::new(5));
        let dropped = dot_product_attention_weights(&query, &key, args)
            .unwrap()
            .to_f64_vec();
        let multiplier = (1.0f32 / (1.0 - rate) as f32) as f64;
        let mut kept = 0usize;
        for (w, p) in dropped.iter().zip(&plain) {
            if *w != 0.0 {
                kept += 1;
                let want = (p * multiplier) as f32 as f64;
                assert!(
                    (w - want).abs() <= 1e-7 * want.abs(),
                    "kept weight {w}, expected {want}"
                );
            }
        }
        let frac = kept as f64 / dropped.len() as f64;
        // 12000 Bernoulli draws (4000 independent ones when broadcast): 5 sigma is < 0.04.
        assert!(
            (frac - (1.0 - rate)).abs() < 0.04,
            "kept fraction {frac} for rate {rate}"
        );
        let pattern = |bh: usize| -> Vec<bool> {
            dropped[bh * q * kv..(bh + 1) * q * kv]
                .iter()
                .map(|w| *w != 0.0)
                .collect()
        };
        let same = (1..b * h).all(|bh| pattern(bh) == pattern(0));
        assert_eq!(
            same, broadcast,
            "rate {rate}: mask shared by all (batch, head) = {same}"
        );
    }
    // Rate 1 drops everything (Flax gives NaN: 0/0); deterministic turns dropout off.
    let zeros = dot_product_attention_weights(
        &query,
        &key,
        FlaxArgs::new()
            .dropout_rate(1.0)
            .dropout_rng(DropoutRng::new(1)),
    )
    .unwrap();
    assert!(zeros.to_f64_vec().iter().all(|&w| w == 0.0));
    let off = dot_product_attention_weights(
        &query,
        &key,
        FlaxArgs::new().dropout_rate(0.5).deterministic(true),
    )
    .unwrap();
    assert_eq!(off.to_f64_vec(), plain);
}

/// bf16 weights of query blocks long enough for the weights path's tiled logits product (on
/// CPUs with AVX512-BF16 it multiplies bf16 pairs): against float64 math on the same bf16
/// inputs, with the softmax in f32 (`force_fp32_for_softmax`). Flax rounds the scaled query and
/// the logits to bf16, so each logit moves by at most ε = 2⁻⁸ · scale · Σₖ|qₖ·kₖ|, and a weight
/// by a factor within exp(±2ε) (its own logit and the normalizer). A wrong pairing of the depth
/// or a wrong key panel is off by far more.
#[test]
fn bf16_weights_of_long_query_blocks_match_float64_math() {
    // Depth 64 and 40: whole and partial 16×16 tiles of key pairs; depth 9: an odd depth.
    for (b, h, q, kv, d) in [(2, 3, 40, 100, 64), (1, 2, 20, 50, 40), (1, 2, 33, 70, 9)] {
        let mut g = Data(23 + d as u64);
        let qv = g.vec(b * q * h * d, 1.0);
        let kvv = g.vec(b * kv * h * d, 1.0);
        let query = Array::from_f64(DType::BF16, &qv, [b, q, h, d]).unwrap();
        let key = Array::from_f64(DType::BF16, &kvv, [b, kv, h, d]).unwrap();
        let args = FlaxArgs::new().force_fp32_for_softmax(true);
        let got = dot_product_attention_weights(&query, &key, args)
            .unwrap()
            .to_f64_vec();
        let (qb, kb) = (query.to_f64_vec(), key.to_f64_vec());
        let (qb, kb) = (&qb, &kb);
        let scale = 1.0 / (d as f64).sqrt();
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..q {
                    let terms = |j: usize| {
                        (0..d).map(move |k| {
                            qb[((bi * q + i) * h + hi) * d + k]
                                * kb[((bi * kv + j) * h + hi) * d + k]
                        })
                    };
                    let logits: Vec<f64> = (0..kv).map(|j| terms(j).sum::<f64>() * scale).collect();
                    let eps = (0..kv)
                        .map(|j| 2f64.powi(-8) * scale * terms(j).map(f64::abs).sum::<f64>())
                        .fold(0.0, f64::max);
                    let rel = (2.0 * eps).exp() - 1.0 + 1e-6;
                    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = logits.iter().map(|x| (x - max).exp()).sum();
                    for (j, l) in logits.iter().enumerate() {
                        let want = (l - max).exp() / sum;
                        let w = got[((bi * h + hi) * q + i) * kv + j];
                        assert!(
                            (w - want).abs() <= rel * want,
                            "d={d} [{bi},{hi},{i},{j}]: got {w}, want {want} (bound {rel})"
                        );
                    }
                }
            }
        }
    }
}

/// bf16 weights are stored by the row pass itself when nothing reads them afterwards. The
/// structured causal mask (whose masked tail the row pass fills without computing it) and the
/// same mask given as a tensor (every logit computed, then masked) must give the same bits,
/// with exact zeros above the diagonal and rows summing to 1 up to bf16 rounding.
#[test]
fn bf16_weights_with_a_causal_mask_match_the_same_mask_as_a_tensor() {
    use attn::kernel::attention_weights;
    use attn::{Broadcast, Context, Geometry, Mask, Options};
    use half::bf16;

    // 40 queries: the blocked path with bf16 products where the CPU has them; 5: short queries.
    for (b, h, q, kv, d) in [(2, 3, 40, 70, 64), (1, 2, 5, 9, 8)] {
        let mut g = Data(91 + q as u64);
        let to_bf16 = |v: Vec<f64>| v.into_iter().map(bf16::from_f64).collect::<Vec<_>>();
        let query = to_bf16(g.vec(b * q * h * d, 2.0));
        let key = to_bf16(g.vec(b * kv * h * d, 2.0));
        let geom = Geometry {
            batch_shape: &[b],
            q_len: q,
            kv_len: kv,
            heads: h,
            kv_heads: h,
            qk_depth: d,
            v_depth: d,
        };
        let causal: Vec<bool> = (0..q * kv).map(|ij| ij % kv <= ij / kv).collect();
        let tensor = Broadcast::new("mask", &causal, &[q, kv]).unwrap();
        let weights = |mask: &Mask<'_>| {
            let mut out = vec![bf16::ZERO; b * h * q * kv];
            let mut ctx = Context::deterministic();
            attention_weights(
                &geom,
                &query,
                &key,
                None::<&Broadcast<'_, bf16>>,
                mask,
                &Options::default(),
                &mut ctx,
                &mut out,
            )
            .unwrap();
            out
        };
        let structured = weights(&Mask::causal());
        let explicit = weights(&Mask::dense(tensor));
        for (n, (s, e)) in structured.iter().zip(&explicit).enumerate() {
            assert_eq!(
                s.to_bits(),
                e.to_bits(),
                "shape {:?}, weight {n}",
                (b, h, q, kv, d)
            );
        }
        for (r, row) in structured.chunks(kv).enumerate() {
            let i = r % q;
            assert!(
                row[i + 1..].iter().all(|w| w.to_bits() == 0),
                "row {r}: {row:?}"
            );
            let sum: f64 = row.iter().map(|w| w.to_f64()).sum();
            assert!(
                (sum - 1.0).abs() <= kv as f64 * 2f64.powi(-8),
                "row {r} sums to {sum}"
            );
        }
    }
}

/// Random structured masks (causal with an alignment, a window, query/kv lengths, segment ids)
/// with grouped key/value heads, through the kernel layer on both paths (weights: the
/// materialized driver; output without weights: the tiled driver), against a plain f64
/// reference that builds the mask densely, repeats K/V per query head and gives a row with no
/// visible key uniform weights over all keys (Flax).
mod structured {
    use super::Data;
    use attn::kernel::{Align, SegmentIds, Window, attention, attention_weights};
    use attn::{Broadcast, Context, Geometry, Mask, Options};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    struct Structured {
        batch: usize,
        heads: usize,
        group: usize,
        q: usize,
        kv: usize,
        d: usize,
        causal: Option<Align>,
        window: Option<(usize, usize, Align)>,
        query_lengths: bool,
        kv_lengths: bool,
        segments: Option<i32>,
        seed: u64,
    }

    fn align() -> impl Strategy<Value = Align> {
        prop_oneof![
            Just(Align::TopLeft),
            Just(Align::BottomRight),
            (-8i64..8).prop_map(Align::Offset),
        ]
    }

    fn structured() -> impl Strategy<Value = Structured> {
        (
            (
                1usize..3,
                1usize..4,
                1usize..3,
                1usize..40,
                1usize..150,
                1usize..9,
            ),
            (
                proptest::option::of(align()),
                proptest::option::of((0usize..40, 0usize..40, align())),
                any::<bool>(),
                any::<bool>(),
                proptest::option::of(1i32..4),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (batch, kv_heads, group, q, kv, d),
                    (causal, window, query_lengths, kv_lengths, segments, seed),
                )| Structured {
                    batch,
                    heads: kv_heads * group,
                    group,
                    q,
                    kv,
                    d,
                    causal,
                    window,
                    query_lengths,
                    kv_lengths,
                    segments,
                    seed,
                },
            )
    }

    struct Inputs {
        query: Vec<f32>,
        key: Vec<f32>,
        value: Vec<f32>,
        ql: Vec<i32>,
        kl: Vec<i32>,
        qs: Vec<i32>,
        ks: Vec<i32>,
    }

    fn inputs(p: &Structured) -> Inputs {
        let mut g = Data(p.seed);
        let kvh = p.heads / p.group;
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        let query = f(g.vec(p.batch * p.q * p.heads * p.d, 2.0));
        let key = f(g.vec(p.batch * p.kv * kvh * p.d, 2.0));
        let value = f(g.vec(p.batch * p.kv * kvh * p.d, 1.0));
        let len = |g: &mut Data, n: usize| ((g.next() + 1.0) / 2.0 * (n as f64 + 1.0)) as i32;
        let ql = (0..p.batch)
            .map(|_| len(&mut g, p.q).min(p.q as i32))
            .collect();
        let kl = (0..p.batch)
            .map(|_| len(&mut g, p.kv).min(p.kv as i32))
            .collect();
        let n = p.segments.unwrap_or(1);
        // Sorted ids, as packing gives them (and any order is allowed).
        let ids = |len: usize| (0..len).map(move |t| (t as i32 * n) / len as i32);
        let qs = (0..p.batch).flat_map(|_| ids(p.q)).collect();
        let ks = (0..p.batch).flat_map(|_| ids(p.kv)).collect();
        Inputs {
            query,
            key,
            value,
            ql,
            kl,
            qs,
            ks,
        }
    }

    /// Whether query `(b, i)` sees key `j`, written from the definitions.
    fn visible(p: &Structured, x: &Inputs, b: usize, i: usize, j: usize) -> bool {
        let (i64_, j64) = (i as i64, j as i64);
        let pos = |a: Align| {
            i64_ + match a {
                Align::TopLeft => 0,
                Align::BottomRight => p.kv as i64 - p.q as i64,
                Align::Offset(o) => o,
            }
        };
        p.causal.is_none_or(|a| j64 <= pos(a))
            && p.window
                .is_none_or(|(l, r, a)| pos(a) - l as i64 <= j64 && j64 <= pos(a) + r as i64)
            && (!p.query_lengths || (i as i32) < x.ql[b])
            && (!p.kv_lengths || (j as i32) < x.kl[b])
            && (p.segments.is_none() || x.qs[b * p.q + i] == x.ks[b * p.kv + j])
    }

    /// `[batch, heads, q, kv]` weights and `[batch, q, heads, d]` output in f64.
    fn reference(p: &Structured, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
        let kvh = p.heads / p.group;
        let scale = 1.0 / (p.d as f32).sqrt() as f64;
        let mut weights = Vec::new();
        let mut out = vec![0.0; p.batch * p.q * p.heads * p.d];
        for b in 0..p.batch {
            for h in 0..p.heads {
                let g = h / p.group;
                for i in 0..p.q {
                    let logits: Vec<Option<f64>> = (0..p.kv)
                        .map(|j| {
                            visible(p, x, b, i, j).then(|| {
                                (0..p.d)
                                    .map(|t| {
                                        let q = x.query[((b * p.q + i) * p.heads + h) * p.d + t];
                                        let k = x.key[((b * p.kv + j) * kvh + g) * p.d + t];
                                        q as f64 * k as f64
                                    })
                                    .sum::<f64>()
                                    * scale
                            })
                        })
                        .collect();
                    let max = logits
                        .iter()
                        .flatten()
                        .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let row: Vec<f64> = if max == f64::NEG_INFINITY {
                        vec![1.0 / p.kv as f64; p.kv]
                    } else {
                        let e: Vec<f64> = logits
                            .iter()
                            .map(|l| l.map_or(0.0, |l| (l - max).exp()))
                            .collect();
                        let s: f64 = e.iter().sum();
                        e.iter().map(|e| e / s).collect()
                    };
                    for (j, w) in row.iter().enumerate() {
                        for t in 0..p.d {
                            out[((b * p.q + i) * p.heads + h) * p.d + t] +=
                                w * x.value[((b * p.kv + j) * kvh + g) * p.d + t] as f64;
                        }
                    }
                    weights.extend(row);
                }
            }
        }
        (weights, out)
    }

    fn mask<'a>(p: &Structured, x: &'a Inputs) -> Mask<'a> {
        let mut m = Mask::none();
        if let Some(a) = p.causal {
            m = m.with_causal(a);
        }
        if let Some((left, right, align)) = p.window {
            m = m.with_window(Window { left, right, align });
        }
        if p.query_lengths {
            m = m.with_query_lengths(&x.ql);
        }
        if p.kv_lengths {
            m = m.with_kv_lengths(&x.kl);
        }
        if p.segments.is_some() {
            m = m.with_segment_ids(SegmentIds {
                query: &x.qs,
                key: &x.ks,
            });
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn structured_masks_and_grouped_heads_match_a_dense_reference(p in structured()) {
            let x = inputs(&p);
            let (want_w, want_o) = reference(&p, &x);
            let batch = [p.batch];
            let geom = Geometry {
                batch_shape: &batch,
                q_len: p.q,
                kv_len: p.kv,
                heads: p.heads,
                kv_heads: p.heads / p.group,
                qk_depth: p.d,
                v_depth: p.d,
            };
            let m = mask(&p, &x);
            let none = None::<&Broadcast<'_, f32>>;
            let opts = Options::default();
            let mut w = vec![0.0f32; want_w.len()];
            attention_weights(&geom, &x.query, &x.key, none, &m, &opts,
                &mut Context::deterministic(), &mut w).unwrap();
            for (n, (&got, &want)) in w.iter().zip(&want_w).enumerate() {
                prop_assert!((got as f64 - want).abs() <= 2e-6 + 1e-5 * want.abs(),
                    "weight {n}: got {got}, want {want}");
            }
            let mut o = vec![0.0f32; want_o.len()];
            attention(&geom, &x.query, &x.key, &x.value, none, &m, &opts,
                &mut Context::deterministic(), &mut o).unwrap();
            for (n, (&got, &want)) in o.iter().zip(&want_o).enumerate() {
                prop_assert!((got as f64 - want).abs() <= 1e-5 + 1e-5 * want.abs(),
                    "output {n}: got {got}, want {want}");
            }
        }
    }
}
