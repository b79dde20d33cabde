//! Property test over hostile inputs of the backward API: random problems, each with at most
//! one mistake, through the four gradient entry points —
//! `dot_product_attention_vjp`, the pair `dot_product_attention_fwd` / `dot_product_attention_bwd`,
//! `dot_product_attention_weights_vjp` (Flax-style) and `jax_nn::dot_product_attention_vjp`.
//!
//! A problem has 0 to 2 batch dims of size 0 to 3 (zero-size dims included), `q_len` and
//! `kv_len` in 0..=6, 1 to 4 query heads with key/value heads equal to them or a divisor of
//! them (grouped-query attention), depths 1..=8 (`v_depth` = `depth` for jax.nn, whose value
//! has the key's shape), inputs of f32, f64, bf16 or f16 with values in [-2, 2], and optionally
//! a float bias and a bool mask of broadcastable (never enlarging) shapes, a causal mask
//! (`attn::kernel::Align`), a sliding window, query and key/value lengths, and (Flax only)
//! dropout at rate 0.3 with `deterministic = false` and a `DropoutRng` seed.
//!
//! The mistakes: a cotangent of the wrong shape (one axis one larger or smaller, an axis
//! missing or extra) or dtype; for `_bwd`, an `output` of the wrong shape or dtype and
//! residuals of another call (another query, dropout seed, causal flag, a mask added or
//! removed, a mask differing in one element, a bias differing in one value, one more query or
//! key/value row), given with this call's output or the other call's; lengths that are
//! negative or beyond their sequence; a mask or bias whose shape does not broadcast.
//!
//! Properties: no call panics (each runs under `catch_unwind`); without a mistake the call
//! returns gradients of their inputs' shapes and dtypes (a bias gradient exactly when a bias
//! was given; no value gradient for the weights' VJP) whose values are all finite; with a
//! mistake it returns the error variant that names the offending argument (`cotangent`,
//! `output`, `residuals`, `query_lengths`/`kv_lengths`, `query_seq_lengths`/
//! `key_value_seq_lengths`, `mask`, `bias`), and its `Display` text starts with that name.
//!
//! 10,000 cases by default (about a second in the test profile); set `ATTN_PROPTEST_CASES`
//! for longer runs and `ATTN_PROPTEST_RANDOM=1` for new seeds.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use attn::jax_nn::{self, JaxArgs};
use attn::kernel::{Align, Window};
use attn::{
    Array, AttentionGrads, AttnError, DType, DropoutRng, FlaxArgs, dot_product_attention_bwd,
    dot_product_attention_fwd, dot_product_attention_vjp, dot_product_attention_weights_vjp,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

// ---- the problem ----------------------------------------------------------------------------

/// The gradient entry point a case calls.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    /// `dot_product_attention_vjp`.
    Vjp,
    /// `dot_product_attention_fwd`, then `dot_product_attention_bwd`.
    FwdBwd,
    /// `dot_product_attention_weights_vjp`.
    WeightsVjp,
    /// `jax_nn::dot_product_attention_vjp`.
    Jax,
}

const APIS: [Api; 4] = [Api::Vjp, Api::FwdBwd, Api::WeightsVjp, Api::Jax];
const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];
const DTYPES: [DType; 6] = [
    DType::F32,
    DType::F64,
    DType::BF16,
    DType::F16,
    DType::Bool,
    DType::I32,
];

/// A change that makes a shape wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ShapeChange {
    /// Axis `axis` one larger, or one smaller (`down`, when it is not 0).
    DimOff { axis: usize, down: bool },
    /// Axis `axis` removed.
    Missing { axis: usize },
    /// An axis of size 1 inserted before axis `at`.
    Extra { at: usize },
}

/// The one mistake of a case (or none).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mistake {
    /// A valid call.
    None,
    /// The cotangent of the forward's result, its shape changed.
    CotangentShape(ShapeChange),
    /// The cotangent in another dtype (any of the six, bool and int32 included).
    CotangentDType(DType),
    /// `_bwd` only.
    OutputShape(ShapeChange),
    /// `_bwd` only.
    OutputDType(DType),
    /// `_bwd` only: the output and residuals of a forward with another query.
    ResidualsOtherQuery,
    /// `_bwd` only: ... of a forward with another dropout seed.
    ResidualsOtherSeed,
    /// `_bwd` only: ... of a forward with the mask added or removed.
    ResidualsOtherMask,
    /// `_bwd` only: ... of a forward with the causal mask added or removed.
    ResidualsOtherCausal,
    /// `_bwd` only: ... of a forward whose mask (of the same shape) differs in one element.
    ResidualsOtherMaskBit,
    /// `_bwd` only: ... of a forward whose bias (of the same shape) differs in one element.
    ResidualsOtherBiasValue,
    /// `_bwd` only: ... of a forward with one more query (`kv: false`) or key/value row.
    ResidualsOtherLength { kv: bool },
    /// One query (or key/value) length set to `value` (negative or beyond the sequence).
    Lengths { kv: bool, value: i32 },
    /// A mask whose shape does not broadcast to the logits.
    MaskShape,
    /// A bias whose shape does not broadcast to the logits.
    BiasShape,
}

impl Mistake {
    /// A short name, for the tally of cases per mistake.
    fn label(self) -> &'static str {
        match self {
            Mistake::None => "none",
            Mistake::CotangentShape(_) => "cotangent shape",
            Mistake::CotangentDType(_) => "cotangent dtype",
            Mistake::OutputShape(_) => "output shape",
            Mistake::OutputDType(_) => "output dtype",
            Mistake::ResidualsOtherQuery => "residuals: other query",
            Mistake::ResidualsOtherSeed => "residuals: other seed",
            Mistake::ResidualsOtherMask => "residuals: other mask",
            Mistake::ResidualsOtherCausal => "residuals: other causal",
            Mistake::ResidualsOtherMaskBit => "residuals: other mask bit",
            Mistake::ResidualsOtherBiasValue => "residuals: other bias value",
            Mistake::ResidualsOtherLength { .. } => "residuals: other length",
            Mistake::Lengths { value, .. } if value < 0 => "lengths negative",
            Mistake::Lengths { .. } => "lengths beyond",
            Mistake::MaskShape => "mask shape",
            Mistake::BiasShape => "bias shape",
        }
    }
}

/// The keyword arguments of one call, owned (Flax's or jax.nn's, by [`Api`]).
#[derive(Clone, Debug)]
struct Spec {
    bias: Option<Array>,
    mask: Option<Array>,
    causal: Option<Align>,
    window: Option<Window>,
    dropout_seed: Option<u64>,
    query_lengths: Option<Array>,
    kv_lengths: Option<Array>,
}

/// For the residual mistakes of `_bwd`: another forward call (its own arguments, and inputs
/// where they differ), whose residuals `_bwd` receives with this call's output (`own_output`)
/// or with the other call's.
#[derive(Clone, Debug)]
struct Other {
    spec: Spec,
    query: Option<Array>,
    key: Option<Array>,
    value: Option<Array>,
    own_output: bool,
}

/// One case: the inputs, the cotangent, the arguments of the backward call (`bwd`) and, for
/// `_bwd`, of the forward whose output and residuals it receives (`fwd`, valid) and of
/// another forward whose residuals it receives instead (`other`).
#[derive(Clone, Debug)]
struct Problem {
    api: Api,
    dtype: DType,
    query: Array,
    key: Array,
    /// Unused by the weights' VJP.
    value: Array,
    cotangent: Array,
    /// The shape of the forward's result the cotangent belongs to.
    result_shape: Vec<usize>,
    bwd: Spec,
    fwd: Spec,
    other: Option<Other>,
    mistake: Mistake,
}

/// A small deterministic generator for the values (proptest draws the seed).
struct Values(u64);

impl Values {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// `n` values in [-2, 2).
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| 2.0 * self.next()).collect()
    }

    /// An integer in `0..=max`.
    fn upto(&mut self, max: usize) -> usize {
        let x = (self.next() + 1.0) / 2.0;
        ((x * (max + 1) as f64) as usize).min(max)
    }

    /// An array of `dtype` and `shape` with values in [-2, 2) (rounded to `dtype`; bool:
    /// nonzero is true, int32: truncated).
    fn array(&mut self, dtype: DType, shape: &[usize]) -> Array {
        let data = self.vec(shape.iter().product());
        array(dtype, &data, shape)
    }
}

/// `Array::from_f64`, for shapes and data built here (a failure is this test's bug).
fn array(dtype: DType, data: &[f64], shape: &[usize]) -> Array {
    Array::from_f64(dtype, data, shape.to_vec()).expect("the test built a consistent array")
}

/// An int32 lengths array.
fn lengths(values: Vec<i32>, shape: &[usize]) -> Array {
    Array::new(values, shape.to_vec()).expect("the test built a consistent lengths array")
}

/// The raw draws of one case; [`build`] turns them into a [`Problem`].
#[derive(Clone, Debug)]
struct Draw {
    api: usize,
    seed: u64,
    dtype: usize,
    batch: Vec<usize>,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    /// Picks the key/value heads among the divisors of `heads`.
    group: usize,
    depth: usize,
    v_depth: usize,
    /// `(dtype index, leading axes dropped, axes made 1 (bits))`.
    bias: Option<(usize, usize, u8)>,
    /// `(leading axes dropped, axes made 1 (bits))`.
    mask: Option<(usize, u8)>,
    /// `Some(bottom_right)`.
    causal: Option<bool>,
    /// `(left, right, bottom_right)`.
    window: Option<(usize, usize, bool)>,
    dropout_seed: Option<u64>,
    query_lengths: bool,
    kv_lengths: bool,
    /// `(which of the mistakes that apply, detail)`.
    mistake: Option<(usize, usize)>,
}

/// The strategy of [`Draw`]s: a batch dim of size 0 one time in four, `q_len` or `kv_len` 0
/// one time in seven, each option present half the time (a window 30%), a mistake half the
/// time.
fn draws() -> impl Strategy<Value = Draw> {
    (
        (
            0..4usize,
            any::<u64>(),
            0..4usize,
            prop::collection::vec(prop_oneof![3 => 1..=3usize, 1 => Just(0usize)], 0..=2),
            0..=6usize,
            0..=6usize,
            1..=4usize,
            0..4usize,
            1..=8usize,
            1..=8usize,
        ),
        (
            prop::option::of((0..4usize, 0..6usize, any::<u8>())),
            prop::option::of((0..6usize, any::<u8>())),
            prop::option::of(any::<bool>()),
            prop::option::weighted(0.3, (0..=3usize, 0..=3usize, any::<bool>())),
            prop::option::of(any::<u64>()),
            any::<bool>(),
            any::<bool>(),
            prop::option::of((0..64usize, 0..64usize)),
        ),
    )
        .prop_map(
            |(
                (api, seed, dtype, batch, q_len, kv_len, heads, group, depth, v_depth),
                (bias, mask, causal, window, dropout_seed, query_lengths, kv_lengths, mistake),
            )| Draw {
                api,
                seed,
                dtype,
                batch,
                q_len,
                kv_len,
                heads,
                group,
                depth,
                v_depth,
                bias,
                mask,
                causal,
                window,
                dropout_seed,
                query_lengths,
                kv_lengths,
                mistake,
            },
        )
}

/// The logits shape a bias or mask broadcasts to: Flax's `[batch..., heads, q, kv]`, or
/// jax.nn's `[B, N, T, S]` (`B = 1` without a batch dim).
fn logits_shape(
    api: Api,
    batch: &[usize],
    heads: usize,
    q_len: usize,
    kv_len: usize,
) -> Vec<usize> {
    let mut s = if api == Api::Jax {
        vec![batch.first().copied().unwrap_or(1)]
    } else {
        batch.to_vec()
    };
    s.extend_from_slice(&[heads, q_len, kv_len]);
    s
}

/// A broadcastable operand shape: `logits` without `drop` leading axes, the axes whose bit is
/// set in `ones` made 1 (never larger than `logits`: nothing enlarges the result).
fn operand_shape(logits: &[usize], drop: usize, ones: u8) -> Vec<usize> {
    let drop = drop % (logits.len() + 1);
    logits[drop..]
        .iter()
        .enumerate()
        .map(|(a, &n)| if ones >> a & 1 == 1 { 1 } else { n })
        .collect()
}

/// `shape` (right-aligned with `logits`) with one axis made a size that does not broadcast:
/// `t + 1` against a logits size `t >= 1`, 2 against 0. For Flax (`!one_breaks`), an axis
/// whose logits size is 1 is no candidate: a larger size there enlarges the result instead.
fn break_operand(
    shape: &[usize],
    logits: &[usize],
    pick: usize,
    one_breaks: bool,
) -> Option<Vec<usize>> {
    let off = logits.len() - shape.len();
    let candidates: Vec<usize> = (0..shape.len())
        .filter(|&a| one_breaks || logits[off + a] != 1)
        .collect();
    let &a = candidates.get(pick % candidates.len().max(1))?;
    let t = logits[off + a];
    let mut s = shape.to_vec();
    s[a] = if t == 0 { 2 } else { t + 1 };
    Some(s)
}

/// `shape` changed by `change`.
fn change_shape(shape: &[usize], change: ShapeChange) -> Vec<usize> {
    let mut s = shape.to_vec();
    match change {
        ShapeChange::DimOff { axis, down } => {
            s[axis] = if down && s[axis] > 0 {
                s[axis] - 1
            } else {
                s[axis] + 1
            };
        }
        ShapeChange::Missing { axis } => {
            s.remove(axis);
        }
        ShapeChange::Extra { at } => s.insert(at, 1),
    }
    s
}

/// A shape change drawn from `detail` for a shape of rank `rank`.
fn shape_change(detail: usize, rank: usize) -> ShapeChange {
    match detail % 3 {
        0 => ShapeChange::DimOff {
            axis: detail / 3 % rank,
            down: detail / 3 / rank % 2 == 1,
        },
        1 => ShapeChange::Missing {
            axis: detail / 3 % rank,
        },
        _ => ShapeChange::Extra {
            at: detail / 3 % (rank + 1),
        },
    }
}

/// A dtype other than `dtype`, drawn from `detail`.
fn other_dtype(dtype: DType, detail: usize) -> DType {
    let others: Vec<DType> = DTYPES.into_iter().filter(|&d| d != dtype).collect();
    others[detail % others.len()]
}

/// The kinds of mistake that `build` can make in a problem (each needs something to act on).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    CotangentShape,
    CotangentDType,
    OutputShape,
    OutputDType,
    OtherQuery,
    OtherSeed,
    OtherMask,
    OtherCausal,
    OtherMaskBit,
    OtherBiasValue,
    OtherLength,
    LengthsNegative,
    LengthsBeyond,
    MaskShape,
    BiasShape,
}

/// The problem of `d`: its inputs, arguments and cotangent, with the mistake (picked among
/// those that apply to it) made.
fn build(d: &Draw) -> Problem {
    let api = APIS[d.api];
    let jax = api == Api::Jax;
    let dtype = FLOATS[d.dtype];
    let mut values = Values(d.seed);
    let mut batch = d.batch.clone();
    if jax {
        // jax.nn takes [T, N, H] or [B, T, N, H].
        batch.truncate(1);
    }
    let (q_len, kv_len, heads) = (d.q_len, d.kv_len, d.heads);
    let divisors: Vec<usize> = (1..=heads).filter(|g| heads.is_multiple_of(*g)).collect();
    let kv_heads = divisors[d.group % divisors.len()];
    let depth = d.depth;
    let v_depth = if jax { depth } else { d.v_depth };
    let shape = |len: usize, h: usize, depth: usize| {
        let mut s = batch.clone();
        s.extend_from_slice(&[len, h, depth]);
        s
    };
    let query = values.array(dtype, &shape(q_len, heads, depth));
    let key = values.array(dtype, &shape(kv_len, kv_heads, depth));
    let value = values.array(dtype, &shape(kv_len, kv_heads, v_depth));
    let logits = logits_shape(api, &batch, heads, q_len, kv_len);
    let bias_shape = d
        .bias
        .map(|(t, drop, ones)| (FLOATS[t], operand_shape(&logits, drop, ones)));
    let mask_shape = d
        .mask
        .map(|(drop, ones)| operand_shape(&logits, drop, ones));
    let mask_of = |values: &mut Values, shape: &[usize]| {
        let data: Vec<bool> = (0..shape.iter().product())
            .map(|_| values.next() < 0.4)
            .collect();
        Array::new(data, shape.to_vec()).expect("the test built a consistent mask")
    };
    let align = |bottom_right: bool| {
        if bottom_right && !jax {
            Align::BottomRight
        } else {
            Align::TopLeft
        }
    };
    // Lengths: int32 of the batch shape for Flax, [B] for jax.nn.
    let lengths_shape = if jax {
        vec![batch.first().copied().unwrap_or(1)]
    } else {
        batch.clone()
    };
    let n_lengths: usize = lengths_shape.iter().product();
    let lengths_of = |values: &mut Values, len: usize| {
        let v = (0..n_lengths).map(|_| values.upto(len) as i32).collect();
        lengths(v, &lengths_shape)
    };
    let mut spec = Spec {
        bias: bias_shape.as_ref().map(|(t, s)| values.array(*t, s)),
        mask: mask_shape.as_ref().map(|s| mask_of(&mut values, s)),
        causal: d.causal.map(align),
        window: d.window.map(|(left, right, br)| Window {
            left,
            right,
            align: align(br),
        }),
        dropout_seed: d.dropout_seed.filter(|_| !jax),
        query_lengths: d.query_lengths.then(|| lengths_of(&mut values, q_len)),
        kv_lengths: d.kv_lengths.then(|| lengths_of(&mut values, kv_len)),
    };
    let result_shape = match api {
        Api::Vjp | Api::FwdBwd => shape(q_len, heads, v_depth),
        Api::WeightsVjp => logits.clone(),
        Api::Jax => shape(q_len, heads, depth),
    };

    // The mistakes that apply to this problem.
    let mut kinds = vec![Kind::CotangentShape, Kind::CotangentDType];
    if api == Api::FwdBwd {
        kinds.extend([
            Kind::OutputShape,
            Kind::OutputDType,
            Kind::OtherMask,
            Kind::OtherCausal,
            Kind::OtherLength,
        ]);
        if !query.is_empty() {
            kinds.push(Kind::OtherQuery);
        }
        if spec.dropout_seed.is_some() {
            kinds.push(Kind::OtherSeed);
        }
        if spec.mask.as_ref().is_some_and(|m| !m.is_empty()) {
            kinds.push(Kind::OtherMaskBit);
        }
        if spec.bias.as_ref().is_some_and(|b| !b.is_empty()) {
            kinds.push(Kind::OtherBiasValue);
        }
    }
    if n_lengths > 0 {
        kinds.extend([Kind::LengthsNegative, Kind::LengthsBeyond]);
    }
    // A bias or mask that does not broadcast: the drawn shape (the logits' when none was
    // drawn) with one axis broken; failing that (for Flax, when its every axis meets a logits
    // axis of size 1), the logits' shape with one axis broken; failing that, no such mistake.
    let full = |s: Option<&Vec<usize>>| s.cloned().unwrap_or_else(|| logits.clone());
    let broken_mask = (0..2).find_map(|k| {
        let s = if k == 0 {
            full(mask_shape.as_ref())
        } else {
            logits.clone()
        };
        break_operand(&s, &logits, d.mistake.map_or(0, |m| m.1), jax)
    });
    let broken_bias = (0..2).find_map(|k| {
        let s = if k == 0 {
            full(bias_shape.as_ref().map(|b| &b.1))
        } else {
            logits.clone()
        };
        break_operand(&s, &logits, d.mistake.map_or(0, |m| m.1), jax)
    });
    if broken_mask.is_some() {
        kinds.push(Kind::MaskShape);
    }
    if broken_bias.is_some() {
        kinds.push(Kind::BiasShape);
    }

    let fwd = spec.clone();
    let mut other = None;
    // Another call: `spec` changed by `f`, this call's inputs unless `f` replaces them.
    let mut another = |detail: usize, f: &mut dyn FnMut(&mut Other)| {
        let mut o = Other {
            spec: spec.clone(),
            query: None,
            key: None,
            value: None,
            own_output: detail >> 5 & 1 == 1,
        };
        f(&mut o);
        other = Some(o);
    };
    let mut cotangent_shape = result_shape.clone();
    let mut cotangent_dtype = dtype;
    let mistake = match d.mistake {
        None => Mistake::None,
        Some((which, detail)) => match kinds[which % kinds.len()] {
            Kind::CotangentShape => {
                let c = shape_change(detail, result_shape.len());
                cotangent_shape = change_shape(&result_shape, c);
                Mistake::CotangentShape(c)
            }
            Kind::CotangentDType => {
                cotangent_dtype = other_dtype(dtype, detail);
                Mistake::CotangentDType(cotangent_dtype)
            }
            Kind::OutputShape => Mistake::OutputShape(shape_change(detail, result_shape.len())),
            Kind::OutputDType => Mistake::OutputDType(other_dtype(dtype, detail)),
            Kind::OtherQuery => {
                let mut q = query.to_f64_vec();
                let i = detail % q.len();
                q[i] += 0.5;
                let q = array(dtype, &q, query.shape());
                another(detail, &mut |o| o.query = Some(q.clone()));
                Mistake::ResidualsOtherQuery
            }
            Kind::OtherSeed => {
                another(detail, &mut |o| {
                    o.spec.dropout_seed = o
                        .spec
                        .dropout_seed
                        .map(|s| s.wrapping_add(1 + detail as u64));
                });
                Mistake::ResidualsOtherSeed
            }
            Kind::OtherMask => {
                let added = mask_of(&mut values, &[kv_len]);
                another(detail, &mut |o| {
                    o.spec.mask = match o.spec.mask {
                        Some(_) => None,
                        None => Some(added.clone()),
                    };
                });
                Mistake::ResidualsOtherMask
            }
            Kind::OtherCausal => {
                let added = align(detail % 2 == 1);
                another(detail, &mut |o| {
                    o.spec.causal = match o.spec.causal {
                        Some(_) => None,
                        None => Some(added),
                    };
                });
                Mistake::ResidualsOtherCausal
            }
            Kind::OtherMaskBit => {
                another(detail, &mut |o| {
                    o.spec.mask = o.spec.mask.take().map(|m| {
                        let mut bits = m.to_bool_vec();
                        let i = detail % bits.len();
                        bits[i] = !bits[i];
                        Array::new(bits, m.shape().to_vec())
                            .expect("the test kept the mask's shape")
                    });
                });
                Mistake::ResidualsOtherMaskBit
            }
            Kind::OtherBiasValue => {
                another(detail, &mut |o| {
                    o.spec.bias = o.spec.bias.take().map(|b| {
                        let mut x = b.to_f64_vec();
                        let i = detail % x.len();
                        x[i] += 0.5;
                        array(b.dtype(), &x, b.shape())
                    });
                });
                Mistake::ResidualsOtherBiasValue
            }
            Kind::OtherLength => {
                // One more row. The other call has no bias or mask (this call's may not fit
                // it); another query length changes the output's shape, so `_bwd` then gets
                // this call's output.
                let kv = detail % 2 == 1;
                let (q2, k2, v2) = if kv {
                    (
                        None,
                        Some(values.array(dtype, &shape(kv_len + 1, kv_heads, depth))),
                        Some(values.array(dtype, &shape(kv_len + 1, kv_heads, v_depth))),
                    )
                } else {
                    (
                        Some(values.array(dtype, &shape(q_len + 1, heads, depth))),
                        None,
                        None,
                    )
                };
                another(detail, &mut |o| {
                    o.spec.bias = None;
                    o.spec.mask = None;
                    o.query = q2.clone();
                    o.key = k2.clone();
                    o.value = v2.clone();
                    o.own_output |= !kv;
                });
                Mistake::ResidualsOtherLength { kv }
            }
            k @ (Kind::LengthsNegative | Kind::LengthsBeyond) => {
                let kv = detail % 2 == 1;
                let len = if kv { kv_len } else { q_len } as i32;
                let value = if k == Kind::LengthsNegative {
                    [-1, -7, i32::MIN][detail / 2 % 3]
                } else {
                    [len + 1, len + 5, i32::MAX][detail / 2 % 3]
                };
                let slot = if kv {
                    &mut spec.kv_lengths
                } else {
                    &mut spec.query_lengths
                };
                let seq = if kv { kv_len } else { q_len };
                let mut v: Vec<i32> = match slot.take() {
                    Some(a) => a.as_slice::<i32>().map(<[i32]>::to_vec).unwrap_or_default(),
                    None => lengths_of(&mut values, seq)
                        .as_slice::<i32>()
                        .map(<[i32]>::to_vec)
                        .unwrap_or_default(),
                };
                let i = detail / 6 % v.len();
                v[i] = value;
                *slot = Some(lengths(v, &lengths_shape));
                Mistake::Lengths { kv, value }
            }
            Kind::MaskShape => {
                let s = broken_mask.clone().unwrap_or_default();
                spec.mask = Some(mask_of(&mut values, &s));
                Mistake::MaskShape
            }
            Kind::BiasShape => {
                let s = broken_bias.clone().unwrap_or_default();
                let t = bias_shape.as_ref().map_or(dtype, |b| b.0);
                spec.bias = Some(values.array(t, &s));
                Mistake::BiasShape
            }
        },
    };
    let cotangent = values.array(cotangent_dtype, &cotangent_shape);
    Problem {
        api,
        dtype,
        query,
        key,
        value,
        cotangent,
        result_shape,
        bwd: spec,
        fwd,
        other,
        mistake,
    }
}

// ---- the calls ------------------------------------------------------------------------------

/// Flax's keyword arguments from `s`.
fn flax_args(s: &Spec) -> FlaxArgs<'_> {
    let mut a = FlaxArgs::new();
    if let Some(b) = &s.bias {
        a = a.bias(b);
    }
    if let Some(m) = &s.mask {
        a = a.mask(m);
    }
    if let Some(c) = s.causal {
        a = a.causal(c);
    }
    if let Some(w) = s.window {
        a = a.window(w);
    }
    if let Some(seed) = s.dropout_seed {
        a = a
            .dropout_rate(0.3)
            .deterministic(false)
            .dropout_rng(DropoutRng::new(seed));
    }
    if let Some(l) = &s.query_lengths {
        a = a.query_lengths(l);
    }
    if let Some(l) = &s.kv_lengths {
        a = a.kv_lengths(l);
    }
    a
}

/// jax.nn's keyword arguments from `s` (causal and windows top-left aligned, as jax's are).
fn jax_args(s: &Spec) -> JaxArgs<'_> {
    JaxArgs {
        bias: s.bias.as_ref(),
        mask: s.mask.as_ref(),
        is_causal: s.causal.is_some(),
        query_seq_lengths: s.query_lengths.as_ref(),
        key_value_seq_lengths: s.kv_lengths.as_ref(),
        local_window_size: s.window.map(|w| (w.left, w.right)),
        ..JaxArgs::default()
    }
}

/// Runs `f` under `catch_unwind`; a panic is an `Err` naming `what` and the panic message.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string payload)".into());
        format!("{what} panicked: {msg}")
    })
}

/// The backward call of `p` (for `_bwd`, after the forward that feeds it): `Err` for a panic
/// or a failed valid forward, else what the backward returned.
fn run(p: &Problem) -> Result<Result<AttentionGrads, AttnError>, String> {
    let (q, k, v, c) = (&p.query, &p.key, &p.value, &p.cotangent);
    match p.api {
        Api::Vjp => guarded("dot_product_attention_vjp", || {
            dot_product_attention_vjp(q, k, v, c, flax_args(&p.bwd))
        }),
        Api::WeightsVjp => guarded("dot_product_attention_weights_vjp", || {
            dot_product_attention_weights_vjp(q, k, c, flax_args(&p.bwd))
        }),
        Api::Jax => guarded("jax_nn::dot_product_attention_vjp", || {
            jax_nn::dot_product_attention_vjp(q, k, v, c, jax_args(&p.bwd))
        }),
        Api::FwdBwd => {
            let (out, saved) = guarded("dot_product_attention_fwd", || {
                dot_product_attention_fwd(q, k, v, flax_args(&p.fwd))
            })?
            .map_err(|e| format!("dot_product_attention_fwd of valid arguments failed: {e}"))?;
            // Residual mistakes: the residuals (and maybe the output) of another valid call.
            let (out, saved) = match &p.other {
                None => (out, saved),
                Some(o) => {
                    let (q2, k2, v2) = (
                        o.query.as_ref().unwrap_or(q),
                        o.key.as_ref().unwrap_or(k),
                        o.value.as_ref().unwrap_or(v),
                    );
                    let (out2, saved2) = guarded("dot_product_attention_fwd (other call)", || {
                        dot_product_attention_fwd(q2, k2, v2, flax_args(&o.spec))
                    })?
                    .map_err(|e| {
                        format!("dot_product_attention_fwd of other valid arguments failed: {e}")
                    })?;
                    (if o.own_output { out } else { out2 }, saved2)
                }
            };
            if out.shape() != p.result_shape || out.dtype() != p.dtype {
                return Err(format!(
                    "dot_product_attention_fwd returned {:?} {:?}, expected {:?} {:?}",
                    out.dtype(),
                    out.shape(),
                    p.dtype,
                    p.result_shape
                ));
            }
            let output = match p.mistake {
                Mistake::OutputShape(change) => {
                    let s = change_shape(&p.result_shape, change);
                    array(p.dtype, &vec![0.5; s.iter().product()], &s)
                }
                Mistake::OutputDType(t) => out.astype(t),
                _ => out,
            };
            guarded("dot_product_attention_bwd", || {
                dot_product_attention_bwd(q, k, v, &output, &saved, c, flax_args(&p.bwd))
            })
        }
    }
}

// ---- the properties -------------------------------------------------------------------------

/// The error variant a mistake must produce.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// `AttnError::InvalidArgument { argument: name, .. }`.
    Invalid,
    /// `AttnError::DType { tensor: name, expected, found }`.
    DType { expected: DType, found: DType },
    /// `AttnError::Broadcast { tensor: name, .. }`.
    Broadcast,
}

/// The argument `p`'s mistake must be named by, and the variant; `None` without a mistake.
fn expected(p: &Problem) -> Option<(&'static str, Variant)> {
    let jax = p.api == Api::Jax;
    Some(match p.mistake {
        Mistake::None => return None,
        Mistake::CotangentShape(_) => ("cotangent", Variant::Invalid),
        Mistake::CotangentDType(found) => (
            "cotangent",
            Variant::DType {
                expected: p.dtype,
                found,
            },
        ),
        Mistake::OutputShape(_) => ("output", Variant::Invalid),
        Mistake::OutputDType(found) => (
            "output",
            Variant::DType {
                expected: p.dtype,
                found,
            },
        ),
        Mistake::ResidualsOtherQuery
        | Mistake::ResidualsOtherSeed
        | Mistake::ResidualsOtherMask
        | Mistake::ResidualsOtherCausal
        | Mistake::ResidualsOtherMaskBit
        | Mistake::ResidualsOtherBiasValue
        | Mistake::ResidualsOtherLength { .. } => ("residuals", Variant::Invalid),
        Mistake::Lengths { kv: false, .. } if jax => ("query_seq_lengths", Variant::Invalid),
        Mistake::Lengths { kv: true, .. } if jax => ("key_value_seq_lengths", Variant::Invalid),
        Mistake::Lengths { kv: false, .. } => ("query_lengths", Variant::Invalid),
        Mistake::Lengths { kv: true, .. } => ("kv_lengths", Variant::Invalid),
        Mistake::MaskShape => ("mask", Variant::Broadcast),
        Mistake::BiasShape => ("bias", Variant::Broadcast),
    })
}

/// Whether `e` is `variant` naming `name`, and its message starts with `` `name` ``.
fn names(e: &AttnError, name: &str, variant: Variant) -> bool {
    let is_variant = match (e, variant) {
        (AttnError::InvalidArgument { argument, .. }, Variant::Invalid) => *argument == name,
        (
            AttnError::DType {
                tensor,
                expected,
                found,
            },
            Variant::DType {
                expected: want,
                found: got,
            },
        ) => *tensor == name && *expected == want && *found == got,
        (AttnError::Broadcast { tensor, .. }, Variant::Broadcast) => *tensor == name,
        _ => false,
    };
    is_variant && e.to_string().starts_with(&format!("`{name}`"))
}

/// A gradient must have its input's shape and dtype, and finite values.
fn same_as_input(name: &str, grad: &Array, input: &Array) -> Result<(), String> {
    if grad.shape() != input.shape() || grad.dtype() != input.dtype() {
        return Err(format!(
            "gradient of {name}: {:?} {:?}, expected its input's {:?} {:?}",
            grad.dtype(),
            grad.shape(),
            input.dtype(),
            input.shape()
        ));
    }
    match grad.to_f64_vec().iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!(
            "gradient of {name}: element {i} is {}",
            grad.to_f64_vec()[i]
        )),
        None => Ok(()),
    }
}

/// The gradients of a valid call: one per differentiable input, each like its input.
fn check_grads(p: &Problem, g: &AttentionGrads) -> Result<(), String> {
    same_as_input("query", &g.query, &p.query)?;
    same_as_input("key", &g.key, &p.key)?;
    match (p.api, &g.value) {
        (Api::WeightsVjp, None) => {}
        (Api::WeightsVjp, Some(_)) => {
            return Err("the weights' VJP returned a value gradient".into());
        }
        (_, Some(gv)) => same_as_input("value", gv, &p.value)?,
        (_, None) => return Err("no value gradient".into()),
    }
    match (&p.bwd.bias, &g.bias) {
        (Some(b), Some(gb)) => same_as_input("bias", gb, b)?,
        (None, None) => {}
        (Some(_), None) => return Err("no gradient for the float bias".into()),
        (None, Some(_)) => return Err("a bias gradient without a bias".into()),
    }
    Ok(())
}

/// Runs `p` and checks the property.
fn check(p: &Problem) -> Result<(), String> {
    let result = run(p)?;
    match (expected(p), result) {
        (None, Ok(g)) => check_grads(p, &g),
        (None, Err(e)) => Err(format!("valid call returned Err: {e} ({e:?})")),
        (Some((name, variant)), Ok(_)) => Err(format!(
            "expected an error naming `{name}` ({variant:?}), got Ok"
        )),
        (Some((name, variant)), Err(e)) if names(&e, name, variant) => Ok(()),
        (Some((name, variant)), Err(e)) => Err(format!(
            "expected an error naming `{name}` ({variant:?}), got: {e} ({e:?})"
        )),
    }
}

/// The number of cases: `ATTN_PROPTEST_CASES`, else 10,000.
fn cases() -> u32 {
    std::env::var("ATTN_PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// The sweep; prints the number of cases per API and mistake, and checks that a run of the
/// default size or larger made every mistake.
#[test]
fn hostile_backward_calls_never_panic_and_name_the_mistake() {
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
    // Cases per (API, mistake), counted while the runner explores (shrinking included).
    let tally = std::sync::Mutex::new(BTreeMap::<(String, &'static str), usize>::new());
    let result = runner.run(&draws(), |d| {
        let p = build(&d);
        if let Ok(mut t) = tally.lock() {
            *t.entry((format!("{:?}", p.api), p.mistake.label()))
                .or_default() += 1;
        }
        check(&p).map_err(|e| TestCaseError::fail(format!("{e}\n{d:?}\n{p:#?}")))
    });
    let tally = tally.into_inner().unwrap_or_default();
    for ((api, mistake), n) in &tally {
        eprintln!("{api:>10} {mistake:<24} {n}");
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every kind of mistake was exercised (on a run of the default size or larger).
    if cases() >= 2_000 {
        let labels = [
            "none",
            "cotangent shape",
            "cotangent dtype",
            "output shape",
            "output dtype",
            "residuals: other query",
            "residuals: other seed",
            "residuals: other mask",
            "residuals: other causal",
            "residuals: other mask bit",
            "residuals: other bias value",
            "residuals: other length",
            "lengths negative",
            "lengths beyond",
            "mask shape",
            "bias shape",
        ];
        for label in labels {
            assert!(
                tally.keys().any(|(_, m)| *m == label),
                "no case made the mistake {label:?}"
            );
        }
    }
}
