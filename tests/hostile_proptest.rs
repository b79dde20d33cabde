//! Property test over random problems, valid and invalid: random dtypes, batch ranks, shapes
//! (including empty dims), bias and mask broadcast patterns, causal masks, through both the
//! Flax-style API and the kernel layer.
//!
//! Properties: no input makes attn panic (every case runs under `catch_unwind`); an invalid
//! input returns the error variant that names its mistake; a valid input returns Flax's dtype
//! and shape and values that match `reference`, a plain f64 implementation of Flax's definition
//! written here (not attn's code), within a tolerance of the order of the conformance suite's
//! tolerances for each dtype.
//!
//! 10,000 cases by default; set `ATTN_PROPTEST_CASES` for longer runs.

use std::panic::{AssertUnwindSafe, catch_unwind};

use attn::kernel::{self, Broadcast, Geometry, Mask, Options};
use attn::{
    Array, AttnError, Context, DType, DropoutRng, Element, FlaxArgs, dot_product_attention,
    dot_product_attention_weights,
};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

// ---- the problem ----------------------------------------------------------------------------

/// A bias or mask operand: its shape and values (bias values already rounded to its dtype).
#[derive(Clone, Debug)]
struct Operand<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// One way to make a problem invalid (or none).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mistake {
    None,
    KeyHeads,
    KeyDepth,
    KeyRank,
    QueryRank,
    BatchDim,
    ValueLength,
    BiasAxis,
    MaskCount,
    DropoutRate(f64),
    QuerySliceShort,
    OutputLong,
}

#[derive(Clone, Debug)]
struct Problem {
    dtype: DType,
    batch: Vec<usize>,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    depth: usize,
    v_depth: usize,
    /// Query, key and value values, already rounded to `dtype`.
    query: Vec<f64>,
    key: Vec<f64>,
    value: Option<Vec<f64>>,
    bias: Option<(DType, Operand<f64>)>,
    mask: Option<Operand<bool>>,
    causal: bool,
    force_fp32: bool,
    /// `(rate, deterministic)`: valid problems never drop (deterministic or rate 0).
    dropout: (f64, bool),
    kernel_path: bool,
    mistake: Mistake,
}

/// A small deterministic generator for the values (proptest draws the seed).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, dtype: DType) -> Vec<f64> {
        (0..n).map(|_| round(dtype, self.next())).collect()
    }
}

fn round(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::F16 => f16::from_f64(x).to_f64(),
        _ => x,
    }
}

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

/// The raw draws of one case; `build` turns them into a problem.
#[derive(Clone, Debug)]
struct Draw {
    seed: u64,
    dtype: usize,
    batch: Vec<usize>,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    depth: usize,
    v_depth: usize,
    with_value: bool,
    /// `None`: no bias; else (dtype index, leading axes dropped, per-axis "broadcast to 1").
    bias: Option<(usize, usize, u8)>,
    mask: Option<(usize, u8)>,
    /// Axes of size 1 in the logits that the bias and mask enlarge to 2 (bits), and whether
    /// they add a leading axis of 2 (Flax-style API only, valid problems only).
    enlarge: Option<(u8, bool)>,
    causal: bool,
    force_fp32: bool,
    rate: f64,
    kernel_path: bool,
    mistake: usize,
    /// Long sequences `(q_len, kv_len)` that cross the tiled kernel's query and key blocks
    /// (64 and 256), with few heads and a small depth.
    long: Option<(usize, usize)>,
}

fn draws() -> impl Strategy<Value = Draw> {
    (
        (
            any::<u64>(),
            0..4usize,
            prop::collection::vec(prop_oneof![9 => 1..=2usize, 1 => Just(0usize)], 0..=2),
            0..=4usize,
            prop_oneof![9 => 1..=4usize, 1 => Just(0usize)],
            prop_oneof![9 => 1..=3usize, 1 => Just(0usize)],
            0..=4usize,
            0..=3usize,
        ),
        (
            any::<bool>(),
            prop::option::of((0..4usize, 0..=4usize, any::<u8>())),
            prop::option::of((0..=4usize, any::<u8>())),
            prop::option::weighted(0.3, (any::<u8>(), any::<bool>())),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(0.0), 0.0..1.0f64],
            any::<bool>(),
            prop_oneof![1 => Just(0usize), 1 => 1..12usize],
            prop::option::weighted(0.05, (1..=70usize, 0..=300usize)),
        ),
    )
        .prop_map(
            |(
                (seed, dtype, batch, q_len, kv_len, heads, depth, v_depth),
                (
                    with_value,
                    bias,
                    mask,
                    enlarge,
                    causal,
                    force_fp32,
                    rate,
                    kernel_path,
                    mistake,
                    long,
                ),
            )| Draw {
                seed,
                dtype,
                batch,
                q_len,
                kv_len,
                heads,
                depth,
                v_depth,
                with_value,
                bias,
                mask,
                enlarge,
                causal,
                force_fp32,
                rate,
                kernel_path,
                mistake,
                long,
            },
        )
}

/// The logits shape `[batch..., heads, q_len, kv_len]`.
fn logits_shape(p: &Problem) -> Vec<usize> {
    let mut s = p.batch.clone();
    s.extend_from_slice(&[p.heads, p.q_len, p.kv_len]);
    s
}

/// An operand shape: the logits shape without `drop` leading axes, with the axes whose bit is
/// set in `ones` broadcast (size 1), and, with `enlarge`, axes of size 1 whose bit is set made
/// 2 and (when no axis was dropped) a leading axis of 2: a bias or mask that enlarges the
/// result, as Flax allows.
fn pattern(target: &[usize], drop: usize, ones: u8, enlarge: Option<(u8, bool)>) -> Vec<usize> {
    let drop = drop.min(target.len());
    let (grow, lead) = enlarge.unwrap_or((0, false));
    let mut shape: Vec<usize> = target[drop..]
        .iter()
        .enumerate()
        .map(
            |(a, &n)| match (ones >> (a % 8) & 1, n, grow >> (a % 8) & 1) {
                (1, _, _) => 1,
                (_, 1, 1) => 2,
                _ => n,
            },
        )
        .collect();
    if lead && drop == 0 {
        shape.insert(0, 2);
    }
    shape
}

/// NumPy's broadcast of the logits shape with the bias and mask shapes: the result's shape.
fn full_shape(p: &Problem) -> Vec<usize> {
    let mut shapes = vec![logits_shape(p)];
    shapes.extend(p.bias.iter().map(|(_, b)| b.shape.clone()));
    shapes.extend(p.mask.iter().map(|m| m.shape.clone()));
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    let mut full = vec![1; rank];
    for s in &shapes {
        for (a, &n) in s.iter().enumerate() {
            let f = &mut full[rank - s.len() + a];
            if *f == 1 {
                *f = n;
            }
        }
    }
    full
}

fn build(d: &Draw) -> Problem {
    let dtype = FLOATS[d.dtype];
    let mut values = Values(d.seed);
    let mistakes = [
        Mistake::None,
        Mistake::KeyHeads,
        Mistake::KeyDepth,
        Mistake::KeyRank,
        Mistake::QueryRank,
        Mistake::BatchDim,
        Mistake::ValueLength,
        Mistake::BiasAxis,
        Mistake::MaskCount,
        Mistake::DropoutRate([-0.1, 1.5, f64::NAN, f64::INFINITY][(d.seed % 4) as usize]),
        Mistake::QuerySliceShort,
        Mistake::OutputLong,
    ];
    let mut p = Problem {
        dtype,
        batch: d.batch.clone(),
        q_len: d.q_len,
        kv_len: d.kv_len,
        heads: d.heads,
        depth: d.depth,
        v_depth: d.v_depth,
        query: Vec::new(),
        key: Vec::new(),
        value: None,
        bias: None,
        mask: None,
        // Causal masks and 16-bit bias-free shortcuts are kernel-layer features.
        causal: d.causal && d.kernel_path,
        force_fp32: d.force_fp32 && !d.kernel_path,
        // A rate with `deterministic = true`, or rate 0 with `deterministic = false`.
        dropout: if d.rate > 0.0 {
            (d.rate, true)
        } else {
            (0.0, false)
        },
        kernel_path: d.kernel_path,
        mistake: mistakes[d.mistake],
    };
    if let Some((q_len, kv_len)) = d.long {
        p.q_len = q_len;
        p.kv_len = kv_len;
        p.heads = p.heads.min(2);
        p.depth = p.depth.min(3);
        p.v_depth = p.v_depth.min(3);
        p.batch.truncate(1);
    }
    let nb: usize = p.batch.iter().product();
    p.query = values.vec(nb * p.q_len * p.heads * p.depth, dtype);
    p.key = values.vec(nb * p.kv_len * p.heads * p.depth, dtype);
    if d.with_value {
        p.value = Some(values.vec(nb * p.kv_len * p.heads * p.v_depth, dtype));
    }
    let target = logits_shape(&p);
    let enlarge = d
        .enlarge
        .filter(|_| !p.kernel_path && mistakes[d.mistake] == Mistake::None);
    if let Some((bias_dtype, drop, ones)) = d.bias {
        // The kernel layer takes the bias in the computation dtype here.
        let bias_dtype = if p.kernel_path {
            dtype
        } else {
            FLOATS[bias_dtype]
        };
        let shape = pattern(&target, drop, ones, enlarge);
        let data = values.vec(shape.iter().product(), bias_dtype);
        p.bias = Some((bias_dtype, Operand { shape, data }));
    }
    if let Some((drop, ones)) = d.mask {
        let shape = pattern(&target, drop, ones, enlarge);
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| values.next() < 0.4).collect();
        p.mask = Some(Operand { shape, data });
    }
    p.mistake = effective(&p);
    p
}

// ---- the reference --------------------------------------------------------------------------

/// Flat index into an operand of `shape` for the logits coordinate `coord` (NumPy broadcast).
fn broadcast_index(shape: &[usize], coord: &[usize]) -> usize {
    let lead = coord.len() - shape.len();
    shape.iter().enumerate().fold(0, |index, (a, &n)| {
        index * n + if n == 1 { 0 } else { coord[lead + a] }
    })
}

fn finfo_min(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f32::MIN as f64,
        DType::BF16 => bf16::MIN.to_f64(),
        DType::F16 => f16::MIN.to_f64(),
        _ => f64::MIN,
    }
}

/// Flax's weights `[batch..., heads, q, kv]` and output `[batch..., q, heads, dv]` (in the
/// shape enlarged by the bias and mask, see [`full_shape`]), in f64:
/// `softmax(where(mask, q·kᵀ/sqrt(depth) + bias, finfo(dtype).min))`, then `weights · v`, with
/// query, key and value read by NumPy broadcasting.
fn reference(p: &Problem) -> (Vec<f64>, Option<Vec<f64>>) {
    let full = full_shape(p);
    let nbf = full.len() - 3;
    let (batch, (h, q, kv)) = (&full[..nbf], (full[nbf], full[nbf + 1], full[nbf + 2]));
    let (d, dv) = (p.depth, p.v_depth);
    let nb: usize = batch.iter().product();
    let query_shape = query_shape(p);
    let key_shape = kv_shape(p, d);
    let value_shape = kv_shape(p, dv);
    let mut weights = Vec::with_capacity(nb * h * q * kv);
    let mut output = vec![0.0; nb * q * h * dv];
    let mut bc = vec![0usize; nbf];
    for b in 0..nb {
        // The batch coordinate of flat batch index `b`.
        let mut rest = b;
        for (a, &n) in batch.iter().enumerate().rev() {
            bc[a] = rest % n;
            rest /= n;
        }
        let at = |tail: [usize; 3]| -> Vec<usize> { bc.iter().copied().chain(tail).collect() };
        for head in 0..h {
            for i in 0..q {
                let mut row = Vec::with_capacity(kv);
                for j in 0..kv {
                    let dot: f64 = (0..d)
                        .map(|e| {
                            p.query[broadcast_index(&query_shape, &at([i, head, e]))]
                                * p.key[broadcast_index(&key_shape, &at([j, head, e]))]
                        })
                        .sum();
                    let mut x = if d == 0 { 0.0 } else { dot / (d as f64).sqrt() };
                    let coord = at([head, i, j]);
                    if let Some((_, bias)) = &p.bias {
                        x += bias.data[broadcast_index(&bias.shape, &coord)];
                    }
                    let masked = p
                        .mask
                        .as_ref()
                        .is_some_and(|m| !m.data[broadcast_index(&m.shape, &coord)]);
                    if masked || (p.causal && j > i) {
                        x = finfo_min(p.dtype);
                    }
                    if p.force_fp32 {
                        // `attn_weights.astype(float32)`: finfo(f64).min becomes -inf, so a
                        // fully masked f64 row is NaN in Flax.
                        x = x as f32 as f64;
                    }
                    row.push(x);
                }
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let w: Vec<f64> = e.iter().map(|x| x / sum).collect();
                if let Some(v) = &p.value {
                    for c in 0..dv {
                        output[((b * q + i) * h + head) * dv + c] = (0..kv)
                            .map(|j| w[j] * v[broadcast_index(&value_shape, &at([j, head, c]))])
                            .sum();
                    }
                }
                weights.extend(w);
            }
        }
    }
    (weights, p.value.as_ref().map(|_| output))
}

/// Flax's result dtype (FLAX_SEMANTICS.md "Dtype summary"): forced softmax gives f32 weights
/// (for any other computation dtype); the output promotes weights with the computation dtype.
fn result_dtype(p: &Problem) -> DType {
    let weights = if p.force_fp32 { DType::F32 } else { p.dtype };
    match (p.value.is_some(), weights == p.dtype) {
        (false, _) | (true, true) => weights,
        (true, false) if p.dtype == DType::F64 => DType::F64,
        (true, false) => DType::F32,
    }
}

/// `(atol, rtol)` by computation dtype, for inputs in [-1, 1): of the order of the
/// conformance suite's tolerances (bf16 keeps 8 bits, f16 11, f32 24).
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-10),
        DType::F32 => (1e-5, 1e-4),
        DType::F16 => (1e-2, 2e-2),
        _ => (6e-2, 8e-2),
    }
}

// ---- running attn ---------------------------------------------------------------------------

fn query_shape(p: &Problem) -> Vec<usize> {
    let mut s = p.batch.clone();
    s.extend_from_slice(&[p.q_len, p.heads, p.depth]);
    s
}

fn kv_shape(p: &Problem, depth: usize) -> Vec<usize> {
    let mut s = p.batch.clone();
    s.extend_from_slice(&[p.kv_len, p.heads, depth]);
    s
}

fn run_flax(p: &Problem) -> Result<Array, AttnError> {
    let mut qs = query_shape(p);
    let mut ks = kv_shape(p, p.depth);
    let mut vs = kv_shape(p, p.v_depth);
    let mut key = p.key.clone();
    let mut value = p.value.clone();
    let n = ks.len();
    match p.mistake {
        Mistake::KeyHeads => ks[n - 2] += 1,
        Mistake::KeyDepth => ks[n - 1] += 1,
        Mistake::KeyRank => ks.insert(0, 1),
        Mistake::QueryRank => qs = vec![qs.iter().product(), 1],
        Mistake::BatchDim => ks[0] += 1,
        Mistake::ValueLength => vs[n - 3] += 1,
        _ => {}
    }
    // Keep every array well-formed: the mistakes above are in the shapes, not the lengths.
    key.resize(ks.iter().product(), 0.5);
    if let Some(v) = value.as_mut() {
        v.resize(vs.iter().product(), 0.5);
    }
    let query = Array::from_f64(p.dtype, &p.query, qs)?;
    let key = Array::from_f64(p.dtype, &key, ks)?;
    let value = value
        .map(|v| Array::from_f64(p.dtype, &v, vs))
        .transpose()?;
    let bias = match &p.bias {
        Some((dtype, b)) => {
            let mut shape = b.shape.clone();
            if p.mistake == Mistake::BiasAxis
                && let Some(a) = (0..shape.len()).rev().find(|&a| shape[a] >= 2)
            {
                shape[a] += 1;
            }
            let mut data = b.data.clone();
            data.resize(shape.iter().product(), 0.25);
            Some(Array::from_f64(*dtype, &data, shape)?)
        }
        None => None,
    };
    let mask = match &p.mask {
        Some(m) => {
            let mut data = m.data.clone();
            if p.mistake == Mistake::MaskCount {
                data.push(true);
            }
            Some(Array::new(data, m.shape.clone())?)
        }
        None => None,
    };
    let rate = match p.mistake {
        Mistake::DropoutRate(r) => r,
        _ => p.dropout.0,
    };
    let mut args = FlaxArgs::new()
        .dropout_rate(rate)
        .deterministic(p.dropout.1)
        .dropout_rng(DropoutRng::new(p.query.len() as u64))
        .force_fp32_for_softmax(p.force_fp32);
    if let Some(b) = &bias {
        args = args.bias(b);
    }
    if let Some(m) = &mask {
        args = args.mask(m);
    }
    match &value {
        Some(v) => dot_product_attention(&query, &key, v, args),
        None => dot_product_attention_weights(&query, &key, args),
    }
}

fn run_kernel(p: &Problem) -> Result<Array, AttnError> {
    match p.dtype {
        DType::F32 => run_kernel_as::<f32>(p),
        DType::F64 => run_kernel_as::<f64>(p),
        DType::BF16 => run_kernel_as::<bf16>(p),
        _ => run_kernel_as::<f16>(p),
    }
}

fn run_kernel_as<E: Element>(p: &Problem) -> Result<Array, AttnError> {
    let cast = |v: &[f64]| -> Vec<E> { v.iter().map(|&x| E::from_f64(x)).collect() };
    let mut query = cast(&p.query);
    // An empty query cannot be one short; it is made one long instead.
    if p.mistake == Mistake::QuerySliceShort && query.pop().is_none() {
        query.push(E::from_f64(0.0));
    }
    let key = cast(&p.key);
    let value = p.value.as_deref().map(cast);
    let bias_data = p.bias.as_ref().map(|(_, b)| cast(&b.data));
    let mut bias_shape = p.bias.as_ref().map(|(_, b)| b.shape.clone());
    if p.mistake == Mistake::BiasAxis
        && let Some(shape) = bias_shape.as_mut()
        && let Some(a) = (0..shape.len()).rev().find(|&a| shape[a] >= 2)
    {
        // An axis that cannot broadcast (the data is resized below to keep the length valid).
        shape[a] += 1;
    }
    let bias_data = match (&bias_data, &bias_shape) {
        (Some(d), Some(s)) => {
            let mut d = d.clone();
            d.resize(s.iter().product(), E::from_f64(0.25));
            Some(d)
        }
        _ => None,
    };
    let bias = match (&bias_data, &bias_shape) {
        (Some(d), Some(s)) => Some(Broadcast::new("bias", d, s)?),
        _ => None,
    };
    let explicit = p
        .mask
        .as_ref()
        .map(|m| Broadcast::new("mask", &m.data, &m.shape))
        .transpose()?;
    let mask = match (p.causal, explicit) {
        (false, None) => Mask::none(),
        (true, None) => Mask::causal(),
        (false, Some(m)) => Mask::dense(m),
        (true, Some(m)) => Mask::causal().with_dense(m),
    };
    let geom = Geometry {
        batch_shape: &p.batch,
        q_len: p.q_len,
        kv_len: p.kv_len,
        heads: p.heads,
        kv_heads: p.heads,
        qk_depth: p.depth,
        v_depth: p.v_depth,
    };
    let opts = Options {
        dropout_rate: match p.mistake {
            Mistake::DropoutRate(r) => r,
            _ => p.dropout.0,
        },
        ..Options::default()
    };
    let mut ctx = Context::deterministic().set_deterministic(p.dropout.1);
    let mut shape = p.batch.clone();
    match &value {
        Some(v) => {
            shape.extend_from_slice(&[p.q_len, p.heads, p.v_depth]);
            let extra = usize::from(p.mistake == Mistake::OutputLong);
            let mut out = vec![E::from_f64(0.0); shape.iter().product::<usize>() + extra];
            kernel::attention(
                &geom,
                &query,
                &key,
                v,
                bias.as_ref(),
                &mask,
                &opts,
                &mut ctx,
                &mut out,
            )?;
            Array::new(out, shape)
        }
        None => {
            shape.extend_from_slice(&[p.heads, p.q_len, p.kv_len]);
            let extra = usize::from(p.mistake == Mistake::OutputLong);
            let mut out = vec![E::from_f64(0.0); shape.iter().product::<usize>() + extra];
            kernel::attention_weights(
                &geom,
                &query,
                &key,
                bias.as_ref(),
                &mask,
                &opts,
                &mut ctx,
                &mut out,
            )?;
            Array::new(out, shape)
        }
    }
}

/// The mistake that `p` really has on its path: some mistakes need a batch dim, a value, a
/// bias or mask, or an axis of size >= 2 to exist, and some apply to one API only.
fn effective(p: &Problem) -> Mistake {
    let has_wide_bias_axis = p
        .bias
        .as_ref()
        .is_some_and(|(_, b)| b.shape.iter().any(|&n| n >= 2));
    let flax_only = matches!(
        p.mistake,
        Mistake::KeyHeads
            | Mistake::KeyDepth
            | Mistake::KeyRank
            | Mistake::QueryRank
            | Mistake::BatchDim
            | Mistake::ValueLength
            | Mistake::MaskCount
    );
    let kernel_only = matches!(p.mistake, Mistake::QuerySliceShort | Mistake::OutputLong);
    match p.mistake {
        _ if p.kernel_path && flax_only => Mistake::None,
        _ if !p.kernel_path && kernel_only => Mistake::None,
        Mistake::BatchDim if p.batch.is_empty() => Mistake::None,
        // One key head divides zero query heads (grouped-query attention, as `jax.nn`): valid.
        Mistake::KeyHeads if p.heads == 0 => Mistake::None,
        Mistake::ValueLength if p.value.is_none() => Mistake::None,
        Mistake::BiasAxis if !has_wide_bias_axis => Mistake::None,
        Mistake::MaskCount if p.mask.is_none() => Mistake::None,
        m => m,
    }
}

/// Whether `error` is the one `mistake` must produce.
fn names_the_mistake(mistake: Mistake, error: &AttnError) -> bool {
    use AttnError as E;
    match (mistake, error) {
        (Mistake::KeyHeads | Mistake::KeyDepth | Mistake::BatchDim, E::Axis { tensor, .. }) => {
            *tensor == "key"
        }
        (Mistake::KeyRank, E::Rank { tensor, .. }) => *tensor == "key",
        (Mistake::QueryRank, E::Rank { tensor, .. }) => *tensor == "query",
        (Mistake::ValueLength, E::Axis { tensor, axis, .. }) => {
            *tensor == "value" && axis.starts_with("kv_len")
        }
        (Mistake::BiasAxis, E::Broadcast { tensor, .. }) => *tensor == "bias",
        (Mistake::MaskCount, E::Length { tensor, .. }) => *tensor == "array",
        (Mistake::DropoutRate(r), E::DropoutRate { rate }) => {
            rate.to_bits() == r.to_bits() || (rate.is_nan() && r.is_nan())
        }
        (Mistake::QuerySliceShort, E::Length { tensor, .. }) => *tensor == "query",
        (Mistake::OutputLong, E::Length { tensor, .. }) => {
            *tensor == "weights" || *tensor == "output"
        }
        _ => false,
    }
}

fn check(p: &Problem) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if p.kernel_path {
            run_kernel(p)
        } else {
            run_flax(p)
        }
    }))
    .map_err(|_| "attn panicked".to_owned())?;
    match (p.mistake, outcome) {
        (Mistake::None, Err(e)) => Err(format!("valid input rejected: {e}")),
        (Mistake::None, Ok(got)) => compare(p, &got),
        (m, Ok(got)) => Err(format!(
            "{m:?} accepted: returned {:?} {:?}",
            got.dtype(),
            got.shape()
        )),
        (m, Err(e)) if names_the_mistake(m, &e) => Ok(()),
        (m, Err(e)) => Err(format!("{m:?} gave another error: {e:?}")),
    }
}

fn compare(p: &Problem, got: &Array) -> Result<(), String> {
    let (weights, output) = reference(p);
    let full = full_shape(p);
    let (want, shape) = match output {
        Some(out) => {
            let n = full.len();
            let mut s = full[..n - 3].to_vec();
            s.extend_from_slice(&[full[n - 2], full[n - 3], p.v_depth]);
            (out, s)
        }
        None => (weights, full),
    };
    if got.shape() != shape.as_slice() || got.dtype() != result_dtype(p) {
        return Err(format!(
            "got {:?} {:?}, expected {:?} {shape:?}",
            got.dtype(),
            got.shape(),
            result_dtype(p)
        ));
    }
    // A forced fp32 softmax rounds an f64 computation to f32.
    let (atol, rtol) = tolerance(if p.force_fp32 && p.dtype == DType::F64 {
        DType::F32
    } else {
        p.dtype
    });
    for (i, (g, w)) in got.to_f64_vec().iter().zip(&want).enumerate() {
        let close = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !close {
            return Err(format!("element {i}: {g} vs reference {w}"));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("ATTN_PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

#[test]
fn random_problems_never_panic_and_match_the_reference() {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    // A fixed seed: CI failures reproduce. `ATTN_PROPTEST_RANDOM=1` explores new seeds.
    let mut runner = if std::env::var_os("ATTN_PROPTEST_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    // [invalid, valid, valid with a result enlarged by the bias or mask]
    let counts = std::sync::Mutex::new([0usize; 3]);
    let result = runner.run(&draws(), |d| {
        let p = build(&d);
        let valid = p.mistake == Mistake::None;
        let mut c = counts.lock().unwrap();
        c[usize::from(valid)] += 1;
        c[2] += usize::from(valid && full_shape(&p) != logits_shape(&p));
        drop(c);
        check(&p).map_err(|e| TestCaseError::fail(format!("{e}\n{p:#?}")))
    });
    let [invalid, valid, enlarged] = *counts.lock().unwrap();
    eprintln!(
        "hostile_proptest: {valid} valid ({enlarged} with a result enlarged by the bias or mask) \
         and {invalid} invalid problems"
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // Both halves of the property are exercised.
    let n = cases() as usize;
    assert!(valid >= n / 8 && invalid >= n / 8 && enlarged >= n / 100);
}

// ---- zero-size dims beside huge ones, under a memory cap (issue 12) -------------------------

/// A dim of a "zero beside huge" problem: mostly small, sometimes 0, sometimes huge (2^40 and
/// up, so that any non-empty result holding one cannot be allocated and must be an error).
fn edge_dim() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1..=3usize, 3 => Just(0usize), 3 => (40..63u32).prop_map(|k| 1usize << k)]
}

/// The raw draws of one "zero beside huge" case.
#[derive(Clone, Debug)]
struct EdgeDraw {
    /// batch dims, q_len, kv_len, heads, depth, v_depth.
    dims: (Vec<usize>, usize, usize, usize, usize, usize),
    dtype: usize,
    with_value: bool,
    /// Per logits axis of the bias/mask: 0 keep, 1 size 1, 2 size 0, 3 huge (only if 0 elsewhere).
    bias: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
    force_fp32: bool,
    dropout: bool,
    helper: u8,
}

fn edge_draws() -> impl Strategy<Value = EdgeDraw> {
    (
        (
            prop::collection::vec(edge_dim(), 0..=2),
            edge_dim(),
            edge_dim(),
            edge_dim(),
            edge_dim(),
            edge_dim(),
        ),
        0..4usize,
        any::<bool>(),
        prop::option::of(prop::collection::vec(0..4u8, 3..=5)),
        prop::option::of(prop::collection::vec(0..4u8, 3..=5)),
        any::<bool>(),
        any::<bool>(),
        0..4u8,
    )
        .prop_map(
            |(dims, dtype, with_value, bias, mask, force_fp32, dropout, helper)| EdgeDraw {
                dims,
                dtype,
                with_value,
                bias,
                mask,
                force_fp32,
                dropout,
                helper,
            },
        )
}

/// An operand shape derived from the logits shape by `pattern` (right-aligned): its element
/// count is 0 whenever it holds a huge dim.
fn edge_operand(logits: &[usize], pattern: &[u8]) -> Vec<usize> {
    let n = pattern.len().min(logits.len());
    let tail = &logits[logits.len() - n..];
    let mut s: Vec<usize> = tail
        .iter()
        .zip(pattern)
        .map(|(&t, &p)| match p {
            0 => t,
            1 => 1,
            2 if t == 1 => 0,
            3 if t == 1 => 1 << 41,
            _ => t,
        })
        .collect();
    if s.iter().any(|&x| x > 3 && x != 1 << 41) || s.contains(&(1 << 41)) {
        // Huge dims only beside a zero (an operand's data must exist).
        if !s.contains(&0) {
            if let Some(x) = s.iter_mut().find(|x| **x == 1 || **x == 0) {
                *x = 0;
            } else {
                s[0] = 0;
            }
        }
    }
    s
}

/// Makes an input of `shape`: empty data when its product is 0, else small data (a huge dim
/// with no zero beside it cannot be built, and is replaced by 1).
fn edge_array(dtype: DType, shape: &mut [usize]) -> Array {
    if !shape.contains(&0) {
        for x in shape.iter_mut().filter(|x| **x > 3) {
            *x = 1;
        }
    }
    // The nonzero dims must multiply to a `usize` (NumPy's rule): shrink later huge dims.
    while attn::dim::checked_product(shape).is_none() {
        if let Some(x) = shape.iter_mut().rev().find(|x| **x > 3) {
            *x = 1;
        }
    }
    let n: usize = if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    };
    let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    Array::from_f64(dtype, &v, shape.to_vec()).unwrap()
}

/// One "zero beside huge" case: no panic (the caller catches it), no abort (the child process
/// dies), an empty result exactly when Flax's result has no element, and an error (never an
/// attempt to compute) when a non-empty result holds a huge dim.
fn check_edge(d: &EdgeDraw) -> Result<(), String> {
    let dtype = FLOATS[d.dtype];
    let (batch, q_len, kv_len, heads, depth, v_depth) = d.dims.clone();
    let mut qs = batch.clone();
    qs.extend([q_len, heads, depth]);
    let mut ks = batch.clone();
    ks.extend([kv_len, heads, depth]);
    let mut vs = batch.clone();
    vs.extend([kv_len, heads, v_depth]);
    let q = edge_array(dtype, &mut qs);
    let k = edge_array(dtype, &mut ks);
    let v = edge_array(dtype, &mut vs);
    // The call as built (edge_array may have shrunk impossible dims): keys must agree with the
    // query on the batch, heads and depth axes, else an error is all that is checked.
    let r = qs.len();
    // The value takes part only in `dot_product_attention`.
    let value_agrees = !d.with_value
        || qs[..r - 3] == vs[..r - 3] && ks[r - 2] == vs[r - 2] && ks[r - 3] == vs[r - 3];
    let shapes_agree = qs[..r - 3] == ks[..r - 3]
        && (qs[r - 2] == ks[r - 2] || ks[r - 2] > 0 && qs[r - 2].is_multiple_of(ks[r - 2]))
        && qs[r - 1] == ks[r - 1]
        && value_agrees;
    let mut logits = qs[..r - 3].to_vec();
    logits.extend([qs[r - 2], qs[r - 3], ks[r - 3]]);
    let bias = d.bias.as_ref().map(|p| {
        let mut s = edge_operand(&logits, p);
        edge_array(dtype, &mut s)
    });
    let mask = d.mask.as_ref().map(|p| {
        let mut s = edge_operand(&logits, p);
        let b = edge_array(DType::F32, &mut s);
        b.astype(DType::Bool)
    });
    let mut args = FlaxArgs::new().force_fp32_for_softmax(d.force_fp32);
    if d.dropout {
        args = args.dropout_rate(0.5).dropout_rng(DropoutRng::new(3));
    }
    if let Some(b) = &bias {
        args = args.bias(b);
    }
    if let Some(m) = &mask {
        args = args.mask(m);
    }
    let start = std::time::Instant::now();
    let got = if d.with_value {
        dot_product_attention(&q, &k, &v, args)
    } else {
        dot_product_attention_weights(&q, &k, args)
    };
    if start.elapsed() > std::time::Duration::from_secs(2) {
        return Err(format!("{:?} for one call", start.elapsed()));
    }
    // Flax's result shape, when the shapes broadcast.
    let mut operands: Vec<&[usize]> = vec![&logits];
    operands.extend(bias.as_ref().map(Array::shape));
    operands.extend(mask.as_ref().map(Array::shape));
    if !shapes_agree {
        return got
            .err()
            .map(drop)
            .ok_or("mismatched inputs accepted".into());
    }
    let Ok(full) = kernel::broadcast_shapes(&operands) else {
        return match got {
            Err(AttnError::Broadcast { .. }) => Ok(()),
            other => Err(format!("operands do not broadcast, got {other:?}")),
        };
    };
    let n = full.len();
    let mut want = full[..n - 3].to_vec();
    if d.with_value {
        want.extend([full[n - 2], full[n - 3], vs[r - 1]]);
    } else {
        want.extend([full[n - 3], full[n - 2], full[n - 1]]);
    }
    let empty = want.contains(&0);
    let huge = want.iter().any(|&x| x > 3);
    if attn::dim::checked_product(&want).is_none() {
        // Too big even when empty (NumPy's rule): a size error.
        return match got {
            Err(AttnError::Overflow { .. }) => Ok(()),
            other => Err(format!("{want:?} overflows, got {other:?}")),
        };
    }
    match got {
        Ok(a) if empty => (a.shape() == want && a.is_empty())
            .then_some(())
            .ok_or(format!("result {:?}, Flax's is {want:?}", a.shape())),
        Err(e) if empty => Err(format!("empty result {want:?} expected, got {e}")),
        Ok(a) if huge => Err(format!("a result of {:?} was computed", a.shape())),
        Err(AttnError::Overflow { .. } | AttnError::Allocation { .. }) if huge => Ok(()),
        Err(e) if huge => Err(format!("{e}: not a size error for {want:?}")),
        // Small non-empty results: the values are the other property test's business.
        _ => Ok(()),
    }
}

/// The mask helpers on the same dims: an empty mask when the shape has a 0, else an error or a
/// small mask, never a panic or an abort.
fn check_edge_helpers(d: &EdgeDraw) -> Result<(), String> {
    let (batch, q_len, kv_len, ..) = d.dims.clone();
    let dtype = [DType::Bool, DType::F32, DType::F64, DType::I32][d.dtype];
    let mut xs = batch.clone();
    xs.push(q_len);
    let mut ys = batch;
    ys.push(kv_len);
    match d.helper {
        0 => match attn::make_causal_mask(&xs, 0, dtype) {
            Ok(m) if xs.contains(&0) => m.is_empty().then_some(()).ok_or("not empty".into()),
            _ => Ok(()),
        },
        1 => {
            let (x, y) = (
                edge_array(DType::I32, &mut xs),
                edge_array(DType::I32, &mut ys),
            );
            let pf = attn::PairwiseFn::GreaterEqual;
            attn::make_attention_mask(&x, &y, pf, 0, dtype)
                .map(drop)
                .or(Ok(()))
        }
        _ => {
            let (x, y) = (
                edge_array(DType::F32, &mut xs),
                edge_array(DType::F32, &mut ys),
            );
            attn::combine_masks(&[Some(&x), Some(&y)], dtype)
                .map(drop)
                .or(Ok(()))
        }
    }
}

fn edge_cases() -> u32 {
    std::env::var("ATTN_EDGE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Runs in the child process that `zero_dims_beside_huge_ones_under_a_memory_cap` starts (it
/// does nothing when run directly).
#[test]
fn zero_dims_beside_huge_ones_child() {
    if std::env::var_os("ATTN_EDGE_CHILD").is_none() {
        return;
    }
    let config = Config {
        cases: edge_cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = if std::env::var_os("ATTN_PROPTEST_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    let panics = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&edge_draws(), |d| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n.is_multiple_of(50_000) {
            eprintln!("zero_dims_beside_huge_ones: {n} cases done");
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            check_edge(&d).and_then(|()| check_edge_helpers(&d))
        }));
        match outcome {
            Ok(r) => r.map_err(|e| TestCaseError::fail(format!("{e}\n{d:#?}"))),
            Err(_) => {
                panics.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(TestCaseError::fail(format!("panic\n{d:#?}")))
            }
        }
    });
    eprintln!(
        "zero_dims_beside_huge_ones: {} cases, {} panics",
        edge_cases(),
        panics.into_inner()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The "zero beside huge" cases in a child process whose address space is capped (`ulimit -v`,
/// 1 GiB: the test binary and its threads take a few hundred MB of it): an infallible allocation
/// of a caller-sized buffer aborts the child, which fails this test.
#[test]
fn zero_dims_beside_huge_ones_under_a_memory_cap() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args(["--exact", "zero_dims_beside_huge_ones_child", "--nocapture"])
        .env("ATTN_EDGE_CHILD", "1")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{}",
        stderr
            .lines()
            .filter(|l| l.contains("zero_dims"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "child {:?}\n{}\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}
