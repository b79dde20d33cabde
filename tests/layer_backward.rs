//! The training methods of `attention!` layers against the gradients JAX stored in the
//! conformance cases: `forward_with_residuals`, then `backward` with the case's cotangent, for
//! batch ranks 0, 1 and 2, static and run-time dims, biases of several broadcast shapes, mask
//! tensors, grouped-query heads, every mask structure (causal alignments, windows, key
//! lengths, segment ids; family B of `jax_nn/`, given as the layer's structure, not as the
//! stored dense mask), f32, bf16 and f16. Each gradient must have its input's dtype and shape
//! and be within the case's stored `grad_*` tolerance.
//!
//! Grouped-query heads are checked on `jax.nn.dot_product_attention` cases without a mask
//! (family A): without masking, jax.nn and Flax compute the same function in f32.
//!
//! `weights_backward` has no stored cases (JAX stores gradients of the output); it is checked
//! against `backward` through the chain rule: with `d_weights = d_output · valueᵀ` (computed
//! here by plain loops), the query and key gradients of both methods must agree.

#[path = "support/case_views.rs"]
mod case_views;
// The verdict of a case set, shared by the runners below.
#[path = "support/grads.rs"]
mod grads;
#[path = "support/tally.rs"]
mod tally;

use attn::{
    Array, AttentionGrads, AttnError, Const, Context, Gradients, Intermediates, Scalar, Shape,
    Tensor, TensorView, attention,
};
use case_views::{array, b1ts, b11s, bt_8_64, d3, d4, d5, dims, one_hts, view};
use grads::{Case, check_grads};
use half::{bf16, f16};

attention! {
    struct Plain { query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv] }
    struct PlainNoBatch { query: [T, H, D], key: [S, H, D], value: [S, H, Dv] }
    struct PlainBatch2 {
        query: [B1, B2, T, H, D], key: [B1, B2, S, H, D], value: [B1, B2, S, H, Dv],
    }
    struct Static8x64 { query: [B, T, H = 8, D = 64], key: [B, S, H, D], value: [B, S, H, D] }
    /// A layer that sows: its backward must still compute (and sow nothing).
    struct Sowing {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], sow: attention_weights,
    }
    struct BiasHeads {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], bias: [1, H, T, S],
    }
    struct BiasKeys { query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], bias: [S] }
    struct MaskAndBias {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        bias: [1, H, T, S], mask: [B, 1, T, S],
    }
    struct KeyPadding {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], mask: [B, 1, T, S],
    }
    struct Grouped { query: [B, T, H, D], key: [B, S, K, D], value: [B, S, K, Dv] }
    struct CausalBottomRight {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], mask: causal(bottom_right),
    }
    struct SegmentsCausal {
        query: [B, T, H, D], key: [B, T, H, D], value: [B, T, H, Dv], mask: causal + segment_ids,
    }
    struct KvLengths {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], mask: kv_lengths,
    }
    struct SlidingWindow {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        mask: causal(bottom_right) + window(4, 0),
    }
    struct Bf16SegmentsBias {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        bias: [B, 1, 1, S], mask: segment_ids, dtype: bf16,
    }
    struct F16WindowOffset {
        query: [T, H, D], key: [S, H, D], value: [S, H, Dv],
        mask: window(2, 2, offset = 7), dtype: f16,
    }
}

fn err(e: AttnError) -> String {
    e.to_string()
}

/// A gradient of a layer as an `Array`; `()` (no such input) as `None`.
trait IntoGrad {
    fn into_grad(self) -> Option<Array>;
}

impl IntoGrad for () {
    fn into_grad(self) -> Option<Array> {
        None
    }
}

impl<T: Scalar, S: Shape> IntoGrad for Tensor<T, S> {
    fn into_grad(self) -> Option<Array> {
        Some(array(self))
    }
}

fn into_grads<Q: IntoGrad, K: IntoGrad, V: IntoGrad, B: IntoGrad>(
    g: Gradients<Q, K, V, B>,
) -> Result<AttentionGrads, String> {
    let missing = |what: &str| format!("the layer returned no {what} gradient");
    Ok(AttentionGrads {
        query: g.query.into_grad().ok_or_else(|| missing("query"))?,
        key: g.key.into_grad().ok_or_else(|| missing("key"))?,
        value: g.value.into_grad(),
        bias: g.bias.into_grad(),
    })
}

/// `[B]`-shaped operands (lengths).
fn d1(a: &Array) -> Result<(usize,), String> {
    let [b] = dims(a)?;
    Ok((b,))
}

/// `[B, T]`-shaped operands (segment ids).
fn d2(a: &Array) -> Result<(usize, usize), String> {
    let [b, t] = dims(a)?;
    Ok((b, t))
}

type Runner = fn(&Case) -> Result<AttentionGrads, String>;

/// A runner: `$layer.forward_with_residuals` on the case's query, key, value (element `$elem`,
/// shaped by `$shape`) and the extra operands `arg: element = "case input" => shape`, then
/// `$layer.backward` with the case's cotangent.
macro_rules! backward {
    ($layer:expr, $elem:ty, $shape:expr
     $(, $extra:ident: $extra_elem:ty = $input:literal => $extra_shape:expr)*) => {
        |case: &Case| -> Result<AttentionGrads, String> {
            let (q, k, v) = (case.required("query")?, case.required("key")?, case.required("value")?);
            let cotangent = case.cotangent()?;
            $( let $extra = case.required($input)?; )*
            let (q, k, v) = (
                view::<$elem, _>(&q, $shape(&q)?)?,
                view::<$elem, _>(&k, $shape(&k)?)?,
                view::<$elem, _>(&v, $shape(&v)?)?,
            );
            $( let $extra = view::<$extra_elem, _>(&$extra, $extra_shape(&$extra)?)?; )*
            let deterministic = case.param_bool("deterministic").unwrap_or(true);
            let mut sink = Intermediates::new();
            let mut ctx = Context::default().set_deterministic(deterministic).sow(&mut sink);
            let (output, residuals) = $layer
                .forward_with_residuals(q, k, v, $($extra,)* &mut ctx)
                .map_err(err)?;
            let d_output = view(&cotangent, output.shape())?;
            let grads = $layer
                .backward(q, k, v, $($extra,)* output.view(), &residuals, d_output, &mut ctx)
                .map_err(err)?;
            let sown = sink.attention_weights().len();
            if sown > 1 {
                return Err(format!("the backward sowed ({sown} arrays sown in all)"));
            }
            into_grads(grads)
        }
    };
}

fn cases() -> Vec<(&'static str, &'static str, Runner)> {
    vec![
        ("cases", "f32_b1_basic", backward!(Plain, f32, d4)),
        (
            "cases",
            "f32_nobatch_basic",
            backward!(PlainNoBatch, f32, d3),
        ),
        ("cases", "f32_depth33", backward!(PlainNoBatch, f32, d3)),
        ("cases", "f32_b2_basic", backward!(PlainBatch2, f32, d5)),
        ("cases", "f32_decode_q1_kv70", backward!(Plain, f32, d4)),
        ("cases", "f32_odd_17x33", backward!(Plain, f32, d4)),
        (
            "cases",
            "f32_heads8_depth64",
            backward!(Static8x64, f32, bt_8_64),
        ),
        ("cases", "f32_large_logits_1e4", backward!(Sowing, f32, d4)),
        (
            "cases",
            "f32_bias_1hqk",
            backward!(BiasHeads, f32, d4, bias: f32 = "bias" => one_hts),
        ),
        (
            "cases",
            "f32_bias_k_rank1",
            backward!(BiasKeys, f32, d4, bias: f32 = "bias" => d1),
        ),
        (
            "cases",
            "f32_mask_and_bias",
            backward!(MaskAndBias, f32, d4,
                bias: f32 = "bias" => one_hts, mask: bool = "mask" => b1ts),
        ),
        (
            "cases",
            "f32_mask_kv_padding",
            backward!(KeyPadding, f32, d4, mask: bool = "mask" => b1ts),
        ),
        ("jax_nn", "jnn_f32_mqa", backward!(Grouped, f32, d4)),
        ("jax_nn", "jnn_f32_mha_b2", backward!(Grouped, f32, d4)),
        (
            "jax_nn",
            "flx_f32_causal_br_5x37",
            backward!(CausalBottomRight, f32, d4),
        ),
        (
            "jax_nn",
            "flx_f32_causal_br_q_gt_kv",
            backward!(CausalBottomRight, f32, d4),
        ),
        (
            "jax_nn",
            "flx_f32_segments_causal",
            backward!(SegmentsCausal, f32, d4,
                query_segment_ids: i32 = "query_segment_ids" => d2,
                kv_segment_ids: i32 = "key_segment_ids" => d2),
        ),
        (
            "jax_nn",
            "flx_f32_key_lengths",
            backward!(KvLengths, f32, d4, kv_lengths: i32 = "key_lengths" => d1),
        ),
        (
            "jax_nn",
            "flx_f32_key_lengths_zero",
            backward!(KvLengths, f32, d4, kv_lengths: i32 = "key_lengths" => d1),
        ),
        (
            "jax_nn",
            "flx_f32_window_causal_br",
            backward!(SlidingWindow, f32, d4),
        ),
        (
            "jax_nn",
            "flx_bf16_segments_bias",
            backward!(Bf16SegmentsBias, bf16, d4,
                bias: bf16 = "bias" => b11s,
                query_segment_ids: i32 = "query_segment_ids" => d2,
                kv_segment_ids: i32 = "key_segment_ids" => d2),
        ),
        (
            "jax_nn",
            "flx_f16_window_offset",
            backward!(F16WindowOffset, f16, d3),
        ),
    ]
}

#[test]
fn generated_backward_matches_jax_gradients() {
    let mut failed = Vec::new();
    let all = cases();
    for (set, name, runner) in &all {
        let var = match *set {
            "cases" => "ATTN_CONFORMANCE_DIR",
            _ => "ATTN_JAX_NN_DIR",
        };
        let dir = grads::dir(var, set);
        let path = dir.join(format!("{name}.json"));
        let case = grads::load(&path).unwrap_or_else(|e| panic!("cannot load {path:?}: {e}"));
        assert_eq!(case.name(), *name);
        let outcome = check_grads(&case, "layer backward", runner(&case))
            .unwrap_or_else(|| panic!("{name} stores no gradients"));
        println!("{outcome}");
        if !outcome.passed() {
            failed.push(outcome.to_string());
        }
    }
    println!("{} cases, {} failed", all.len(), failed.len());
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}

attention! {
    /// Weights and output of the same declaration, for the chain-rule check.
    struct ChainRule {
        query: [B, T, H, D], key: [B, S, K, D], value: [B, S, K, Dv],
        bias: [1, H, T, S], mask: causal(bottom_right) + kv_lengths,
    }
}

/// Reproducible values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut x = (i ^ seed.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 29;
            (x % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

#[test]
fn weights_backward_agrees_with_backward_by_the_chain_rule() -> Result<(), AttnError> {
    let (b, t, s, h, k, d, dv) = (2, 5, 9, 4, 2, 8, 3);
    let q = values(b * t * h * d, 1);
    let kk = values(b * s * k * d, 2);
    let v = values(b * s * k * dv, 3);
    let bias = values(h * t * s, 4);
    let lengths = [9i32, 6];
    let d_out = values(b * t * h * dv, 5);
    let q = TensorView::new(&q, (b, t, h, d))?;
    let kk = TensorView::new(&kk, (b, s, k, d))?;
    let v = TensorView::new(&v, (b, s, k, dv))?;
    let bias = TensorView::new(&bias, (Const::<1>, h, t, s))?;
    let lengths = TensorView::new(&lengths, (b,))?;
    let d_output = TensorView::new(&d_out, (b, t, h, dv))?;
    let mut ctx = Context::deterministic();
    let layer = ChainRule;

    let (output, residuals) = layer.forward_with_residuals(q, kk, v, bias, lengths, &mut ctx)?;
    let through_output = layer.backward(
        q,
        kk,
        v,
        bias,
        lengths,
        output.view(),
        &residuals,
        d_output,
        &mut ctx,
    )?;

    // d_weights[b, n, i, j] = sum_e d_output[b, i, n, e] · value[b, j, n / (h / k), e]
    let mut d_weights = vec![0.0f32; b * h * t * s];
    let (vs, ds) = (v.as_slice(), d_output.as_slice());
    for bi in 0..b {
        for n in 0..h {
            for i in 0..t {
                for j in 0..s {
                    let mut acc = 0.0f64;
                    for e in 0..dv {
                        let dout = ds[((bi * t + i) * h + n) * dv + e];
                        let val = vs[((bi * s + j) * k + n / (h / k)) * dv + e];
                        acc += f64::from(dout) * f64::from(val);
                    }
                    d_weights[((bi * h + n) * t + i) * s + j] = acc as f32;
                }
            }
        }
    }
    let d_weights = TensorView::new(&d_weights, (b, h, t, s))?;
    let through_weights = layer.weights_backward(q, kk, bias, lengths, d_weights, &mut ctx)?;

    let close = |what: &str, x: &[f32], y: &[f32]| {
        assert_eq!(x.len(), y.len(), "{what}");
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            scale > 1e-3,
            "{what}: the gradient is zero, so the check proves nothing"
        );
        for (i, (a, e)) in x.iter().zip(y).enumerate() {
            assert!(
                (a - e).abs() <= 1e-5 + 1e-4 * scale,
                "{what}[{i}]: weights_backward {a} vs backward {e}"
            );
        }
    };
    close(
        "query",
        through_weights.query.as_slice(),
        through_output.query.as_slice(),
    );
    close(
        "key",
        through_weights.key.as_slice(),
        through_output.key.as_slice(),
    );
    close(
        "bias",
        through_weights.bias.as_slice(),
        through_output.bias.as_slice(),
    );
    assert_eq!(through_weights.value, ());
    assert_eq!(through_output.value.shape(), (b, s, k, dv));
    Ok(())
}
