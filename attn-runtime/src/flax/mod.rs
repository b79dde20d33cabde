//! The Flax-style API: `dot_product_attention_weights` and `dot_product_attention` over
//! dynamically shaped [`Array`]s with every parameter of the Flax functions, and the mask
//! utilities `make_attention_mask`, `make_causal_mask`, `combine_masks`.
//!
//! Semantics are those of flax 0.12.8 (see `docs/runtime.md` and the conformance suite):
//! dtype promotion of query/key(/value), the bias and mask never cast, the query scaled by the
//! rounded reciprocal of the dtype-rounded `sqrt(depth)`, masked logits replaced by
//! `finfo(dtype).min`, the softmax dtype rules of `force_fp32_for_softmax`, NumPy broadcasting
//! of bias and mask (a bias or mask of higher rank enlarges the result, as in Flax).

pub(crate) mod expand;
mod grad;
mod masks;

use std::borrow::Cow;

pub use grad::{
    AttentionGrads, dot_product_attention_bwd, dot_product_attention_fwd,
    dot_product_attention_vjp, dot_product_attention_weights_vjp,
};
pub use masks::{PairwiseFn, combine_masks, make_attention_mask, make_causal_mask};

use crate::array::Array;
use crate::context::{Context, DropoutRng};
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements, try_filled};
use crate::kernel::{
    self, Align, Broadcast, Geometry, Mask, Options, Precision, Residuals, SegmentIds, Window,
    broadcast_shapes,
};
use crate::sow::Sow;
use expand::{broadcast_to, cast};

/// The keyword arguments of Flax's attention functions. `FlaxArgs::new()` (= `default()`) has
/// Flax's defaults; the builder methods set one argument each.
pub struct FlaxArgs<'a> {
    /// `bias`: added to the logits, broadcast to `[batch..., heads, q, kv]`; never cast.
    pub bias: Option<&'a Array>,
    /// `mask`: nonzero keeps, broadcast to `[batch..., heads, q, kv]`.
    pub mask: Option<&'a Array>,
    /// `broadcast_dropout` (default true).
    pub broadcast_dropout: bool,
    /// `dropout_rng`.
    pub dropout_rng: Option<DropoutRng>,
    /// `dropout_rate` (default 0).
    pub dropout_rate: f64,
    /// `deterministic` (default false).
    pub deterministic: bool,
    /// `dtype`: the computation dtype; `None` infers it by promotion.
    pub dtype: Option<DType>,
    /// `precision` (no effect on the CPU).
    pub precision: Option<Precision>,
    /// `module`: receives the weights under ("intermediates", "attention_weights").
    pub module: Option<&'a mut dyn Sow>,
    /// `force_fp32_for_softmax`.
    pub force_fp32_for_softmax: bool,
    /// The rayon pool to run on (not a Flax argument); `None` = the global pool.
    pub pool: Option<&'a rayon::ThreadPool>,
    /// Not a Flax argument: a causal mask with this alignment, ANDed with `mask` (without
    /// building it: `Align::TopLeft` is `make_causal_mask`).
    pub causal: Option<Align>,
    /// Not a Flax argument: a sliding window, ANDed with the other terms.
    pub window: Option<Window>,
    /// Not a Flax argument: `int32` query lengths of shape `batch_shape` (a scalar without
    /// batch dims); query rows `i >= len` see no key (uniform weights, as a fully masked row).
    pub query_lengths: Option<&'a Array>,
    /// Not a Flax argument: `int32` key/value lengths of shape `batch_shape`; keys `j >= len`
    /// are masked.
    pub kv_lengths: Option<&'a Array>,
    /// Not a Flax argument: `int32` segment ids `(query [batch.., q_len], key [batch..,
    /// kv_len])`; a query sees only the keys of its own segment.
    pub segment_ids: Option<(&'a Array, &'a Array)>,
}

impl Default for FlaxArgs<'_> {
    fn default() -> Self {
        FlaxArgs {
            bias: None,
            mask: None,
            broadcast_dropout: true,
            dropout_rng: None,
            dropout_rate: 0.0,
            deterministic: false,
            dtype: None,
            precision: None,
            module: None,
            force_fp32_for_softmax: false,
            pool: None,
            causal: None,
            window: None,
            query_lengths: None,
            kv_lengths: None,
            segment_ids: None,
        }
    }
}

impl<'a> FlaxArgs<'a> {
    /// Flax's defaults: no bias or mask, `broadcast_dropout = true`, rate 0,
    /// `deterministic = false`, dtype inferred, no module, no forced fp32 softmax.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets `bias`.
    pub fn bias(mut self, bias: &'a Array) -> Self {
        self.bias = Some(bias);
        self
    }
    /// Sets `mask`.
    pub fn mask(mut self, mask: &'a Array) -> Self {
        self.mask = Some(mask);
        self
    }
    /// Sets `broadcast_dropout`.
    pub fn broadcast_dropout(mut self, on: bool) -> Self {
        self.broadcast_dropout = on;
        self
    }
    /// Sets `dropout_rng`.
    pub fn dropout_rng(mut self, rng: DropoutRng) -> Self {
        self.dropout_rng = Some(rng);
        self
    }
    /// Sets `dropout_rate`.
    pub fn dropout_rate(mut self, rate: f64) -> Self {
        self.dropout_rate = rate;
        self
    }
    /// Sets `deterministic`.
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
    /// Sets `dtype`.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }
    /// Sets `precision`.
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = Some(precision);
        self
    }
    /// Sets `module` (the sow sink).
    pub fn module(mut self, module: &'a mut dyn Sow) -> Self {
        self.module = Some(module);
        self
    }
    /// Sets `force_fp32_for_softmax`.
    pub fn force_fp32_for_softmax(mut self, on: bool) -> Self {
        self.force_fp32_for_softmax = on;
        self
    }
    /// Runs on `pool`.
    pub fn pool(mut self, pool: &'a rayon::ThreadPool) -> Self {
        self.pool = Some(pool);
        self
    }
    /// Adds a causal mask with `align` (see [`FlaxArgs::causal`]).
    pub fn causal(mut self, align: Align) -> Self {
        self.causal = Some(align);
        self
    }
    /// Adds a sliding window.
    pub fn window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }
    /// Adds `int32` query lengths `[batch..]`.
    pub fn query_lengths(mut self, lengths: &'a Array) -> Self {
        self.query_lengths = Some(lengths);
        self
    }
    /// Adds `int32` key/value lengths `[batch..]`.
    pub fn kv_lengths(mut self, lengths: &'a Array) -> Self {
        self.kv_lengths = Some(lengths);
        self
    }
    /// Adds `int32` segment ids, query `[batch.., q_len]` and key `[batch.., kv_len]`.
    pub fn segment_ids(mut self, query: &'a Array, key: &'a Array) -> Self {
        self.segment_ids = Some((query, key));
        self
    }
}

/// Flax's `dot_product_attention_weights(query, key, ...)`: `query [batch..., q, heads, d]`,
/// `key [batch..., kv, heads, d]` -> weights `[batch..., heads, q, kv]`.
pub fn dot_product_attention_weights(
    query: &Array,
    key: &Array,
    args: FlaxArgs<'_>,
) -> Result<Array, AttnError> {
    attend(query, key, None, Mode::Forward, args).map(Outcome::into_forward)
}

/// Flax's `dot_product_attention(query, key, value, ...)`: `value [batch..., kv, heads, dv]`
/// -> output `[batch..., q, heads, dv]`.
pub fn dot_product_attention(
    query: &Array,
    key: &Array,
    value: &Array,
    args: FlaxArgs<'_>,
) -> Result<Array, AttnError> {
    attend(query, key, Some(value), Mode::Forward, args).map(Outcome::into_forward)
}

/// What [`attend`] is asked for.
#[derive(Clone, Copy)]
enum Mode<'m> {
    /// The forward's result.
    Forward,
    /// The output and the residuals its backward needs ([`dot_product_attention_fwd`]).
    ForwardSaving,
    /// The gradients, recomputing what the forward knew.
    Vjp { cotangent: &'m Array },
    /// The gradients from the forward's output and residuals ([`dot_product_attention_bwd`]).
    Bwd {
        output: &'m Array,
        residuals: &'m Residuals,
        cotangent: &'m Array,
    },
}

impl<'m> Mode<'m> {
    fn cotangent(self) -> Option<&'m Array> {
        match self {
            Mode::Vjp { cotangent } | Mode::Bwd { cotangent, .. } => Some(cotangent),
            Mode::Forward | Mode::ForwardSaving => None,
        }
    }
}

/// What [`attend`] computes, by [`Mode`].
enum Outcome {
    Forward(Array),
    Saved(Array, Residuals),
    Grads(AttentionGrads),
}

impl Outcome {
    fn into_forward(self) -> Array {
        match self {
            Outcome::Forward(a) | Outcome::Saved(a, _) => a,
            // (Only `attend` with a cotangent computes gradients.)
            Outcome::Grads(_) => unreachable!("a forward call computed gradients"),
        }
    }
}

/// Flax's `promote_dtype`: the `dtype=` argument, or the promotion of the inputs (an inexact
/// result; `float32` if the promotion is bool/int).
fn computation_dtype(inputs: &[&Array], dtype: Option<DType>) -> Result<DType, AttnError> {
    if let Some(d) = dtype {
        if !d.is_float() {
            return Err(AttnError::InvalidArgument {
                argument: "dtype",
                reason: format!("must be a float dtype, found {d}"),
            });
        }
        return Ok(d);
    }
    let promoted = inputs
        .iter()
        .map(|a| a.dtype())
        .reduce(DType::promote)
        .unwrap_or(DType::F32);
    Ok(if promoted.is_float() {
        promoted
    } else {
        DType::F32.promote(promoted)
    })
}

/// The shape checks of Flax's asserts, with messages that name the axis.
fn check_shapes(query: &Array, key: &Array, value: Option<&Array>) -> Result<(), AttnError> {
    let rank_msg = "at least 3: [batch..., length, heads, depth]";
    for (name, a) in [("query", Some(query)), ("key", Some(key)), ("value", value)] {
        if let Some(a) = a.filter(|a| a.ndim() < 3) {
            return Err(AttnError::Rank {
                tensor: name,
                expected: rank_msg.into(),
                found: a.shape().to_vec(),
            });
        }
    }
    let (qs, ks) = (query.shape(), key.shape());
    let rank = qs.len();
    let others = [("key", Some(ks)), ("value", value.map(Array::shape))];
    for (name, s) in others.into_iter().filter_map(|(n, s)| s.map(|s| (n, s))) {
        if s.len() != rank {
            return Err(AttnError::Rank {
                tensor: name,
                expected: format!("{rank}, the rank of query"),
                found: s.to_vec(),
            });
        }
        for a in 0..rank - 3 {
            if s[a] != qs[a] {
                return Err(AttnError::Axis {
                    tensor: name,
                    axis: format!("batch {a}"),
                    expected: format!("{}, as in query", qs[a]),
                    found: s[a],
                });
            }
        }
        // Grouped-query attention: key/value heads dividing the query heads.
        let (h, g) = (qs[rank - 2], s[rank - 2]);
        let divides = g > 0 && h.is_multiple_of(g) || g == h;
        if !divides || name == "value" && g != ks[rank - 2] {
            return Err(AttnError::Axis {
                tensor: name,
                axis: "heads (axis -2)".into(),
                expected: if name == "value" {
                    format!("{}, as in key", ks[rank - 2])
                } else {
                    format!("{h}, as in query, or a divisor of it (grouped-query attention)")
                },
                found: g,
            });
        }
    }
    if ks[rank - 1] != qs[rank - 1] {
        return Err(AttnError::Axis {
            tensor: "key",
            axis: "depth (axis -1)".into(),
            expected: format!("{}, the depth of query", qs[rank - 1]),
            found: ks[rank - 1],
        });
    }
    if let Some(v) = value {
        let vs = v.shape();
        if vs[rank - 3] != ks[rank - 3] {
            return Err(AttnError::Axis {
                tensor: "value",
                axis: "kv_len (axis -3)".into(),
                expected: format!("{}, the length of key", ks[rank - 3]),
                found: vs[rank - 3],
            });
        }
    }
    Ok(())
}

/// The sizes of a call after NumPy broadcasting with the bias and mask. A bias or mask may
/// enlarge the batch, heads, q or kv axes of the result, as in Flax (whose einsums broadcast
/// query, key and value along them); such inputs are then broadcast (copied) to the result's
/// layout before the kernel runs.
struct Layout {
    batch_shape: Vec<usize>,
    heads: usize,
    q_len: usize,
    kv_len: usize,
}

fn layout(
    query: &Array,
    key: &Array,
    bias: Option<&Array>,
    mask: Option<&Array>,
) -> Result<Layout, AttnError> {
    let (qs, ks) = (query.shape(), key.shape());
    let rank = qs.len();
    let mut logits = qs[..rank - 3].to_vec();
    logits.extend_from_slice(&[qs[rank - 2], qs[rank - 3], ks[rank - 3]]);
    let mut shapes: Vec<&[usize]> = vec![&logits];
    let mut names = vec!["logits"];
    for (name, a) in [("bias", bias), ("mask", mask)] {
        if let Some(a) = a {
            shapes.push(a.shape());
            names.push(name);
        }
    }
    let full = broadcast_shapes(&shapes).map_err(|k| {
        // Name the first axis where the operand disagrees with what came before it.
        let before = broadcast_shapes(&shapes[..k]).unwrap_or_default();
        let s = shapes[k];
        let r = before.len().max(s.len());
        let axis = (0..s.len())
            .find(|&a| {
                let t = (r - s.len() + a)
                    .checked_sub(r - before.len())
                    .map_or(1, |i| before[i]);
                s[a] != 1 && t != 1 && s[a] != t
            })
            .unwrap_or(0);
        AttnError::Broadcast {
            tensor: names[k],
            shape: s.to_vec(),
            target: before,
            axis,
        }
    })?;
    let n = full.len();
    let out = Layout {
        batch_shape: full[..n - 3].to_vec(),
        heads: full[n - 3],
        q_len: full[n - 2],
        kv_len: full[n - 1],
    };
    Ok(out)
}

fn attend(
    query: &Array,
    key: &Array,
    value: Option<&Array>,
    mode: Mode<'_>,
    args: FlaxArgs<'_>,
) -> Result<Outcome, AttnError> {
    check_shapes(query, key, value)?;
    let mut inputs = vec![query, key];
    inputs.extend(value);
    let compute = computation_dtype(&inputs, args.dtype)?;
    let layout = layout(query, key, args.bias, args.mask)?;
    let bias_dtype = args.bias.map(|b| {
        if b.dtype().is_float() {
            b.dtype()
        } else {
            // JAX promotes a bool/int bias to the logits' float dtype.
            compute
        }
    });
    macro_rules! with_float {
        ($dtype:expr, $T:ident => $body:expr) => {
            match $dtype {
                DType::F32 => {
                    type $T = f32;
                    $body
                }
                DType::F64 => {
                    type $T = f64;
                    $body
                }
                DType::BF16 => {
                    type $T = half::bf16;
                    $body
                }
                _ => {
                    type $T = half::f16;
                    $body
                }
            }
        };
    }
    with_float!(compute, E => with_float!(bias_dtype.unwrap_or(compute), B => {
        let dropout_active = !args.deterministic && args.dropout_rate > 0.0;
        let opts = options(&args);
        let plan = kernel::result_dtypes(compute, bias_dtype, &opts, dropout_active);
        let result = if value.is_some() { plan.output } else { plan.dropped_weights };
        with_float!(result, R => run::<E, B, R>(query, key, value, mode, &layout, args, opts))
    }))
}

fn options(args: &FlaxArgs<'_>) -> Options {
    Options {
        scale: None,
        dropout_rate: args.dropout_rate,
        broadcast_dropout: args.broadcast_dropout,
        force_fp32_for_softmax: args.force_fp32_for_softmax,
        precision: args.precision.unwrap_or_default(),
    }
}

/// Broadcasts a `[batch..., len, heads, depth]` input to the (possibly enlarged) layout; `heads`
/// is the layout's heads, or the key/value heads of grouped-query attention.
fn fit_input<'x, E: Element>(
    name: &'static str,
    data: Cow<'x, [E]>,
    shape: &[usize],
    layout: &Layout,
    (len, heads): (usize, usize),
) -> Result<Cow<'x, [E]>, AttnError> {
    let rank = shape.len();
    let mut target = layout.batch_shape.clone();
    target.extend_from_slice(&[len, heads, shape[rank - 1]]);
    if target == shape {
        return Ok(data);
    }
    // The copy is of the enlarged shape, not the caller's: say so in the error.
    let enlarged = match name {
        "query" => "query (broadcast to the batch and heads of bias/mask)",
        "key" => "key (broadcast to the batch and heads of bias/mask)",
        _ => "value (broadcast to the batch and heads of bias/mask)",
    };
    Ok(Cow::Owned(broadcast_to(enlarged, &data, shape, &target)?))
}

fn run<E: Element, B: Element, R: Element>(
    query: &Array,
    key: &Array,
    value: Option<&Array>,
    mode: Mode<'_>,
    layout: &Layout,
    args: FlaxArgs<'_>,
    opts: Options,
) -> Result<Outcome, AttnError> {
    let cotangent = mode.cotangent();
    let rank = query.ndim();
    let (qs, ks) = (query.shape(), key.shape());
    // Cheap checks first: the result's size, and whether there is anything to compute. An
    // empty result nobody sows returns before any copy, cast or task (whose sizes scale with
    // dims that multiply to nothing here).
    let mut result_shape = layout.batch_shape.clone();
    match value {
        Some(v) => {
            result_shape.extend_from_slice(&[layout.q_len, layout.heads, v.shape()[rank - 1]])
        }
        None => result_shape.extend_from_slice(&[layout.heads, layout.q_len, layout.kv_len]),
    }
    let result_name = if value.is_some() { "output" } else { "weights" };
    // The kernel's check of the key/value heads (grouped-query attention), which an empty
    // result must not skip.
    let (heads, kv_heads) = (layout.heads, ks[rank - 2]);
    if kv_heads != heads
        && (kv_heads == 0 && heads > 0 || kv_heads > 0 && !heads.is_multiple_of(kv_heads))
    {
        return Err(AttnError::Axis {
            tensor: "key",
            axis: "heads (axis -2)".into(),
            expected: format!("a divisor of the query's {heads} heads"),
            found: kv_heads,
        });
    }
    // The dtypes of lengths and segment ids are checked before an empty result returns (their
    // values and shapes are not read then: there is no row they could apply to).
    for (argument, a) in [
        ("query_lengths", args.query_lengths),
        ("kv_lengths", args.kv_lengths),
        ("query_segment_ids", args.segment_ids.map(|(q, _)| q)),
        ("kv_segment_ids", args.segment_ids.map(|(_, k)| k)),
    ] {
        if let Some(a) = a
            && a.dtype() != DType::I32
        {
            return Err(AttnError::DType {
                tensor: argument,
                expected: DType::I32,
                found: a.dtype(),
            });
        }
    }
    if let Some(c) = cotangent {
        grad::check_cotangent::<R>(c, &result_shape, result_name)?;
    }
    if let Mode::Bwd { output, .. } = mode {
        grad::check_output::<R>(output, &result_shape)?;
    }
    if num_elements(result_name, &result_shape)? == 0
        && args.module.is_none()
        && matches!(mode, Mode::Forward)
    {
        let ctx = Context {
            deterministic: args.deterministic,
            dropout_rng: args.dropout_rng,
            sow: None,
            pool: None,
        };
        kernel::check_dropout(&opts, &ctx, E::DTYPE)?;
        return Array::new(Vec::<R>::new(), result_shape).map(Outcome::Forward);
    }
    // Key/value heads: the layout's, or fewer (grouped-query attention, never broadcast).
    let kv_heads = if ks[rank - 2] == qs[rank - 2] {
        layout.heads
    } else {
        ks[rank - 2]
    };
    let q = fit_input(
        "query",
        cast::<E>("query", query)?,
        qs,
        layout,
        (layout.q_len, layout.heads),
    )?;
    let k = fit_input(
        "key",
        cast::<E>("key", key)?,
        ks,
        layout,
        (layout.kv_len, kv_heads),
    )?;
    let v = value
        .map(|v| {
            let at = (layout.kv_len, kv_heads);
            fit_input("value", cast::<E>("value", v)?, v.shape(), layout, at)
        })
        .transpose()?;
    let bias_data = args.bias.map(|b| cast::<B>("bias", b)).transpose()?;
    let bias = match (&bias_data, args.bias) {
        (Some(d), Some(b)) => Some(Broadcast::new("bias", d, b.shape())?),
        _ => None,
    };
    let mask_data: Option<Cow<'_, [bool]>> = args
        .mask
        .map(|m| match m.as_slice::<bool>() {
            Some(s) => Ok(Cow::Borrowed(s)),
            None => m.try_bool_vec("mask").map(Cow::Owned),
        })
        .transpose()?;
    let mut mask = match (&mask_data, args.mask) {
        (Some(d), Some(m)) => Mask::dense(Broadcast::new("mask", d, m.shape())?),
        _ => Mask::none(),
    };
    let query_lengths = int32s(
        "query_lengths",
        args.query_lengths,
        &layout.batch_shape,
        None,
    )?;
    let kv_lengths = int32s("kv_lengths", args.kv_lengths, &layout.batch_shape, None)?;
    let (q_ids, kv_ids) = match args.segment_ids {
        Some((q, k)) => (
            int32s(
                "query_segment_ids",
                Some(q),
                &layout.batch_shape,
                Some(layout.q_len),
            )?,
            int32s(
                "kv_segment_ids",
                Some(k),
                &layout.batch_shape,
                Some(layout.kv_len),
            )?,
        ),
        None => (None, None),
    };
    if let Some(align) = args.causal {
        mask = mask.with_causal(align);
    }
    if let Some(window) = args.window {
        mask = mask.with_window(window);
    }
    if let Some(l) = &query_lengths {
        mask = mask.with_query_lengths(l);
    }
    if let Some(l) = &kv_lengths {
        mask = mask.with_kv_lengths(l);
    }
    if let (Some(query), Some(key)) = (&q_ids, &kv_ids) {
        mask = mask.with_segment_ids(SegmentIds { query, key });
    }

    let geom = Geometry {
        batch_shape: &layout.batch_shape,
        q_len: layout.q_len,
        kv_len: layout.kv_len,
        heads: layout.heads,
        kv_heads,
        qk_depth: qs[rank - 1],
        v_depth: value.map_or(0, |v| v.shape()[rank - 1]),
    };
    let mut ctx = Context {
        deterministic: args.deterministic,
        dropout_rng: args.dropout_rng,
        sow: args.module,
        pool: args.pool,
    };
    if let Some(c) = cotangent {
        let inputs = grad::Inputs {
            query,
            key,
            value,
            bias: args.bias,
        };
        let operands = grad::Operands {
            query: &q,
            key: &k,
            value: v.as_deref(),
            bias: bias.as_ref(),
        };
        let saved = match mode {
            Mode::Bwd {
                output, residuals, ..
            } => Some((output, residuals)),
            _ => None,
        };
        return grad::backward::<E, B, R>(
            &geom, operands, &mask, &opts, &mut ctx, c, saved, inputs,
        )
        .map(Outcome::Grads);
    }
    let mut shape = layout.batch_shape.clone();
    match &v {
        Some(v) => {
            shape.extend_from_slice(&[layout.q_len, layout.heads, geom.v_depth]);
            let mut out = try_filled("output", num_elements("output", &shape)?, R::default())?;
            if let Mode::ForwardSaving = mode {
                let residuals = kernel::attention_fwd(
                    &geom,
                    &q,
                    &k,
                    v,
                    bias.as_ref(),
                    &mask,
                    &opts,
                    &mut ctx,
                    &mut out,
                )?;
                return Ok(Outcome::Saved(Array::new(out, shape)?, residuals));
            }
            kernel::attention(
                &geom,
                &q,
                &k,
                v,
                bias.as_ref(),
                &mask,
                &opts,
                &mut ctx,
                &mut out,
            )?;
            Array::new(out, shape).map(Outcome::Forward)
        }
        None => {
            shape.extend_from_slice(&[layout.heads, layout.q_len, layout.kv_len]);
            let mut out = try_filled("weights", num_elements("weights", &shape)?, R::default())?;
            kernel::attention_weights(
                &geom,
                &q,
                &k,
                bias.as_ref(),
                &mask,
                &opts,
                &mut ctx,
                &mut out,
            )?;
            Array::new(out, shape).map(Outcome::Forward)
        }
    }
}

/// An `int32` argument of shape `batch_shape` (plus `[len]` when given), as one value per
/// element; broadcast along batch dims of size 1 (as NumPy would against the layout).
fn int32s<'a>(
    argument: &'static str,
    a: Option<&'a Array>,
    batch_shape: &[usize],
    len: Option<usize>,
) -> Result<Option<Cow<'a, [i32]>>, AttnError> {
    let Some(a) = a else { return Ok(None) };
    if a.dtype() != DType::I32 {
        return Err(AttnError::DType {
            tensor: argument,
            expected: DType::I32,
            found: a.dtype(),
        });
    }
    let mut target = batch_shape.to_vec();
    target.extend(len);
    let Some(data) = a.as_slice::<i32>() else {
        unreachable!("an int32 array holds i32")
    };
    if a.shape() == target.as_slice() {
        return Ok(Some(Cow::Borrowed(data)));
    }
    broadcast_to(argument, data, a.shape(), &target).map(|v| Some(Cow::Owned(v)))
}
