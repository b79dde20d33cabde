//! Grouped-query attention and the sliding-window cache of `attn::layer`, checked against the
//! plain multi-head layer (whose every path is checked against Flax by `conformance_mha`):
//!
//! - a GQA layer (`num_kv_heads = K`) equals the Flax layer whose key/value kernels repeat each
//!   key/value head `H / K` times (forward, sown weights, prefill and decode), while its cache
//!   stores only the `K` key/value heads;
//! - decoding through a sliding-window cache of `w` tokens equals the forward pass over the
//!   whole sequence with the mask `j <= i && j > i - w` (causal, banded).

use attn::layer::{Dense, InFeatures, KvCache, MhaConfig, MhaParams, MultiHeadDotProductAttention};
use attn::{Array, Context, DType, Intermediates};

/// Deterministic values in [-1, 1) (a 64-bit LCG; the values only need to be generic).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn input(seed: u64, shape: &[usize]) -> Array {
    let n = shape.iter().product();
    Array::from_f64(DType::F64, &values(seed, n), shape.to_vec()).unwrap()
}

fn max_diff(a: &Array, b: &Array) -> f64 {
    assert_eq!(a.shape(), b.shape());
    assert_eq!(a.dtype(), b.dtype());
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `[.., K, D]` -> `[.., H, D]`: head `n` is key/value head `n / (H / K)`.
fn repeat_heads(a: &Array, heads: usize) -> Array {
    let s = a.shape();
    let r = s.len();
    let (kv, d) = (s[r - 2], s[r - 1]);
    let vals = a.to_f64_vec();
    let mut out = Vec::new();
    for row in vals.chunks_exact(kv * d) {
        for n in 0..heads {
            let g = n / (heads / kv);
            out.extend_from_slice(&row[g * d..(g + 1) * d]);
        }
    }
    let mut shape = s.to_vec();
    shape[r - 2] = heads;
    Array::from_f64(a.dtype(), &out, shape).unwrap()
}

fn repeat_dense(p: &Dense, heads: usize) -> Dense {
    Dense {
        kernel: repeat_heads(&p.kernel, heads),
        bias: p.bias.as_ref().map(|b| repeat_heads(b, heads)),
    }
}

/// A GQA layer (H = 4, K = 2, D = 4, f64) and the Flax layer with the repeated heads.
fn gqa_and_mha(normalize_qk: bool) -> (MultiHeadDotProductAttention, MultiHeadDotProductAttention) {
    let features = InFeatures::same(16);
    let mut cfg = MhaConfig::new(4);
    cfg.param_dtype = DType::F64;
    cfg.normalize_qk = normalize_qk;
    let mut gqa_cfg = cfg.clone();
    gqa_cfg.num_kv_heads = Some(2);
    let mut gqa = MultiHeadDotProductAttention::init(gqa_cfg.clone(), features, 11).unwrap();
    // Non-zero biases and LayerNorm scales, so that every parameter matters.
    let mut p = gqa.params().clone();
    let perturb = |a: &Array, seed: u64| {
        let v: Vec<f64> = a
            .to_f64_vec()
            .iter()
            .zip(values(seed, a.len()))
            .map(|(x, r)| x + 0.5 * r)
            .collect();
        Array::from_f64(a.dtype(), &v, a.shape().to_vec()).unwrap()
    };
    for (i, d) in [&mut p.query, &mut p.key, &mut p.value, &mut p.out]
        .into_iter()
        .enumerate()
    {
        d.bias = d.bias.as_ref().map(|b| perturb(b, 100 + i as u64));
    }
    p.query_ln = p.query_ln.as_ref().map(|s| perturb(s, 200));
    p.key_ln = p.key_ln.as_ref().map(|s| perturb(s, 201));
    gqa = MultiHeadDotProductAttention::new(gqa_cfg, features, p.clone()).unwrap();
    let mha_params = MhaParams {
        query: p.query.clone(),
        key: repeat_dense(&p.key, 4),
        value: repeat_dense(&p.value, 4),
        out: p.out.clone(),
        query_ln: p.query_ln.clone(),
        key_ln: p.key_ln.clone(),
    };
    let mha = MultiHeadDotProductAttention::new(cfg, features, mha_params).unwrap();
    (gqa, mha)
}

#[test]
fn gqa_forward_equals_the_layer_with_repeated_heads() {
    for normalize_qk in [false, true] {
        let (gqa, mha) = gqa_and_mha(normalize_qk);
        let x = input(1, &[2, 5, 16]);
        let kv = input(2, &[2, 7, 16]);
        let mask_vals: Vec<bool> = values(3, 2 * 5 * 7).iter().map(|v| *v > -0.5).collect();
        let mask = Array::new(mask_vals, [2, 1, 5, 7]).unwrap();
        let (mut s1, mut s2) = (Intermediates::new(), Intermediates::new());
        let y1 = gqa
            .forward(
                &x,
                Some(&kv),
                None,
                Some(&mask),
                &mut Context::deterministic().sow(&mut s1),
            )
            .unwrap();
        let y2 = mha
            .forward(
                &x,
                Some(&kv),
                None,
                Some(&mask),
                &mut Context::deterministic().sow(&mut s2),
            )
            .unwrap();
        assert_eq!(y1.shape(), &[2, 5, 16]);
        assert!(max_diff(&y1, &y2) < 1e-12, "normalize_qk {normalize_qk}");
        let (w1, w2) = (s1.attention_weights(), s2.attention_weights());
        assert_eq!(w1[0].shape(), &[2, 4, 5, 7]);
        assert!(max_diff(&w1[0], &w2[0]) < 1e-12);
        // The tiled path (no sow sink) too.
        let y3 = gqa
            .forward(&x, None, None, None, &mut Context::deterministic())
            .unwrap();
        let y4 = mha
            .forward(&x, None, None, None, &mut Context::deterministic())
            .unwrap();
        assert!(max_diff(&y3, &y4) < 1e-12);
    }
}

#[test]
fn gqa_cache_stores_only_the_kv_heads_and_decodes_as_the_repeated_layer() {
    let (gqa, mha) = gqa_and_mha(true);
    let (mut c1, mut c2) = (KvCache::new(9), KvCache::new(9));
    let prompt = input(4, &[2, 4, 16]);
    let ctx = &mut Context::deterministic();
    let y1 = gqa.prefill(&mut c1, &prompt, None, ctx).unwrap();
    let y2 = mha.prefill(&mut c2, &prompt, None, ctx).unwrap();
    assert!(max_diff(&y1, &y2) < 1e-12);
    for t in 0..3 {
        let x = input(10 + t, &[2, 1, 16]);
        let y1 = gqa.decode(&mut c1, &x, None, ctx).unwrap();
        let y2 = mha.decode(&mut c2, &x, None, ctx).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-12, "step {t}");
    }
    assert_eq!(c1.cache_index(), 7);
    let (k1, k2) = (c1.key().unwrap(), c2.key().unwrap());
    assert_eq!(k1.shape(), &[2, 9, 2, 4]);
    assert_eq!(k2.shape(), &[2, 9, 4, 4]);
    assert!(max_diff(&repeat_heads(k1, 4), k2) < 1e-12);
    assert!(max_diff(&repeat_heads(c1.value().unwrap(), 4), c2.value().unwrap()) < 1e-12);
}

/// The forward pass over the whole sequence with the banded causal mask of a window `w`.
fn banded_reference(layer: &MultiHeadDotProductAttention, x: &Array, w: usize) -> Array {
    let l = x.shape()[x.ndim() - 2];
    let keep: Vec<bool> = (0..l)
        .flat_map(|i| (0..l).map(move |j| j <= i && j + w > i))
        .collect();
    let mut shape = vec![1; x.ndim() - 2];
    shape.extend_from_slice(&[1, l, l]);
    let mask = Array::new(keep, shape).unwrap();
    layer
        .forward(x, None, None, Some(&mask), &mut Context::deterministic())
        .unwrap()
}

/// Rows `from..to` of `[b, L, F]`.
fn rows(a: &Array, from: usize, to: usize) -> Array {
    let s = a.shape();
    let (l, f) = (s[1], s[2]);
    let v = a.to_f64_vec();
    let mut out = Vec::new();
    for b in 0..s[0] {
        out.extend_from_slice(&v[(b * l + from) * f..(b * l + to) * f]);
    }
    Array::from_f64(a.dtype(), &out, vec![s[0], to - from, f]).unwrap()
}

#[test]
fn sliding_window_decoding_equals_the_banded_mask() {
    for kv_heads in [None, Some(1)] {
        let mut cfg = MhaConfig::new(2);
        cfg.param_dtype = DType::F64;
        cfg.num_kv_heads = kv_heads;
        let layer = MultiHeadDotProductAttention::init(cfg, InFeatures::same(8), 5).unwrap();
        let x = input(7, &[2, 11, 8]);
        let w = 3;
        let want = banded_reference(&layer, &x, w);
        let ctx = &mut Context::deterministic();
        // Token by token.
        let mut cache = KvCache::sliding_window(w);
        for t in 0..11 {
            let y = layer
                .decode(&mut cache, &rows(&x, t, t + 1), None, ctx)
                .unwrap();
            assert!(max_diff(&y, &rows(&want, t, t + 1)) < 1e-12, "token {t}");
        }
        assert_eq!(cache.cache_index(), 11);
        assert_eq!(cache.key().unwrap().shape()[1], w);
        // Chunks of at most the window (a prompt of 3, then 2, 1, 3, 2).
        let mut cache = KvCache::sliding_window(w);
        let mut at = 0;
        for n in [3, 2, 1, 3, 2] {
            let y = layer
                .prefill(&mut cache, &rows(&x, at, at + n), None, ctx)
                .unwrap();
            assert!(
                max_diff(&y, &rows(&want, at, at + n)) < 1e-12,
                "chunk at {at}"
            );
            at += n;
        }
    }
}

#[test]
fn a_full_cache_attends_over_the_filled_slots_only_as_flax() {
    // A cache of capacity 16 filled with 5 tokens: the 6th token sees exactly the causal
    // prefix, as in the forward pass over the 6 tokens with a causal mask.
    let mut cfg = MhaConfig::new(2);
    cfg.param_dtype = DType::F64;
    let layer = MultiHeadDotProductAttention::init(cfg, InFeatures::same(8), 9).unwrap();
    let x = input(8, &[1, 6, 8]);
    let want = banded_reference(&layer, &x, 6);
    let mut cache = KvCache::new(16);
    let ctx = &mut Context::deterministic();
    let y = layer
        .prefill(&mut cache, &rows(&x, 0, 5), None, ctx)
        .unwrap();
    assert!(max_diff(&y, &rows(&want, 0, 5)) < 1e-12);
    let mut sink = Intermediates::new();
    let y = layer
        .decode(
            &mut cache,
            &rows(&x, 5, 6),
            None,
            &mut Context::deterministic().sow(&mut sink),
        )
        .unwrap();
    assert!(max_diff(&y, &rows(&want, 5, 6)) < 1e-12);
    // Sown weights over all 16 slots, zero after the 6 filled ones.
    let w = &sink.attention_weights()[0];
    assert_eq!(w.shape(), &[1, 2, 1, 16]);
    let wv = w.to_f64_vec();
    for h in 0..2 {
        let row = &wv[h * 16..(h + 1) * 16];
        assert!(row[6..].iter().all(|v| *v == 0.0));
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

#[test]
fn a_truncated_cache_decodes_as_if_the_later_tokens_were_never_written() {
    // Fill 6 tokens of x, truncate to 4, decode token 4 of another sequence y that shares x's
    // first 4 tokens: the result is the causal forward pass over [x0..x3, y4] (the stale
    // slots 4 and 5 are not seen), and the cache index counts 5 tokens.
    let mut cfg = MhaConfig::new(2);
    cfg.param_dtype = DType::F64;
    cfg.num_kv_heads = Some(1);
    let layer = MultiHeadDotProductAttention::init(cfg, InFeatures::same(8), 11).unwrap();
    let x = input(12, &[1, 6, 8]);
    let other = input(13, &[1, 6, 8]);
    let mut joined = rows(&x, 0, 4).to_f64_vec();
    joined.extend(rows(&other, 4, 5).to_f64_vec());
    let y = Array::from_f64(DType::F64, &joined, vec![1, 5, 8]).unwrap();
    let want = banded_reference(&layer, &y, 5);
    let ctx = &mut Context::deterministic();
    let mut cache = KvCache::new(8);
    layer.prefill(&mut cache, &x, None, ctx).unwrap();
    cache.truncate(4).unwrap();
    assert_eq!(cache.cache_index(), 4);
    let got = layer
        .decode(&mut cache, &rows(&y, 4, 5), None, ctx)
        .unwrap();
    assert!(max_diff(&got, &rows(&want, 4, 5)) < 1e-12);
    assert_eq!(cache.cache_index(), 5);
    // Errors name the argument and leave the cache unchanged.
    let e = cache.truncate(6).unwrap_err().to_string();
    assert!(
        e.contains("len") && e.contains("at most cache_index = 5") && e.contains("6"),
        "{e}"
    );
    assert_eq!(cache.cache_index(), 5);
    let mut ring = KvCache::sliding_window(4);
    let e = ring.truncate(0).unwrap_err().to_string();
    assert!(e.contains("cache") && e.contains("sliding-window"), "{e}");
}
