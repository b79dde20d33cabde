//! Flax conformance cases run through `attention!`-generated layers (not only through the
//! dynamic API): every dtype (f32, f64, bf16, f16, with and without `force_fp32_for_softmax`),
//! every mask kind (none, `causal`, a mask tensor, `causal + [..]`, with and without a bias),
//! batch ranks 0, 1 and 2, static (`H = 8, D = 64`) and run-time dims, and both methods:
//! `forward` with the weights sown, and `forward` without a sow sink (which lets the runtime take
//! its output-only path) checked together with `weights`. Each expected tensor of a case must
//! have the case's dtype and shape and be within its stored tolerance.
//!
//! A `causal` layer gets no mask tensor: its generated mask is compared with the case's
//! `make_causal_mask` output. A `causal + [..]` layer is given the case's combined mask, which
//! already holds the causal part, so the result must not change.

#[path = "support/case_views.rs"]
mod case_views;
// The verdict of a case set, shared by the runners below.
#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/tally.rs"]
mod tally;

use std::collections::BTreeMap;

use attn::{AttnError, Context, Intermediates, Scalar, Shape, Tensor, attention};
use case_views::{array, b1ts, b11s, bt_8_64, d3, d4, d5, one_hts, view};
use conformance::{Actual, Case};
use half::{bf16, f16};

attention! {
    struct F32NoBatch { query: [T, H, D], key: [S, H, D], value: [S, H, Dv], sow: attention_weights }
    struct F32Batch1 { query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], sow: attention_weights }
    struct F32Batch2 {
        query: [B1, B2, T, H, D], key: [B1, B2, S, H, D], value: [B1, B2, S, H, Dv],
        sow: attention_weights,
    }
    struct F32Static {
        query: [B, T, H = 8, D = 64], key: [B, S, H, D], value: [B, S, H, Dv = 64],
        sow: attention_weights,
    }
    struct F32Causal {
        query: [B, T, H, D], key: [B, T, H, D], value: [B, T, H, Dv],
        mask: causal, sow: attention_weights,
    }
    struct F32CausalWeightsB2 { query: [B1, B2, T, H, D], key: [B1, B2, T, H, D], mask: causal }
    struct F32KeyPadding {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        mask: [B, 1, T, S], sow: attention_weights,
    }
    struct F32CausalAndPadding {
        query: [B, T, H, D], key: [B, T, H, D], value: [B, T, H, Dv],
        mask: causal + [B, 1, T, T], sow: attention_weights,
    }
    struct F32MaskAndBias {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        bias: [1, H, T, S], mask: [B, 1, T, S], sow: attention_weights,
    }
    struct F32PrecisionHighest {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        precision: highest, sow: attention_weights,
    }

    struct F64Batch1 {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        dtype: f64, sow: attention_weights,
    }
    struct F64NoBatch { query: [T, H, D], key: [S, H, D], value: [S, H, Dv], dtype: f64, sow: attention_weights }
    struct F64CausalAndPadding {
        query: [B, T, H, D], key: [B, T, H, D], value: [B, T, H, Dv],
        mask: [B, 1, T, T] + causal, dtype: f64, sow: attention_weights,
    }
    struct F64ForceFp32 {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        dtype: f64, force_fp32_for_softmax: true, sow: attention_weights,
    }
    struct F64Weights { query: [B, T, H, D], key: [B, S, H, D], mask: [B, 1, T, S], dtype: f64 }

    struct Bf16Batch1 {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        dtype: bf16, sow: attention_weights,
    }
    struct Bf16NoBatch { query: [T, H, D], key: [S, H, D], value: [S, H, Dv], dtype: bf16, sow: attention_weights }
    struct Bf16Batch2 {
        query: [B1, B2, T, H, D], key: [B1, B2, S, H, D], value: [B1, B2, S, H, Dv],
        dtype: bf16, sow: attention_weights,
    }
    struct Bf16ForceFp32Causal {
        query: [B, T, H, D], key: [B, T, H, D], value: [B, T, H, Dv],
        mask: causal, dtype: bf16, force_fp32_for_softmax: true, sow: attention_weights,
    }
    struct Bf16MaskAndBias {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        bias: [1, H, T, S], mask: [B, 1, T, S], dtype: bf16, sow: attention_weights,
    }
    struct Bf16Weights { query: [B, T, H, D], key: [B, S, H, D], dtype: bf16 }

    struct F16Batch1 {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        dtype: f16, sow: attention_weights,
    }
    struct F16NoBatch { query: [T, H, D], key: [S, H, D], value: [S, H, Dv], dtype: f16, sow: attention_weights }
    struct F16ForceFp32MaskAndBias {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv],
        bias: [B, 1, 1, S], mask: [B, H, T, S],
        dtype: f16, force_fp32_for_softmax: true, sow: attention_weights,
    }
    struct F16ForceFp32Weights {
        query: [B, T, H, D], key: [B, S, H, D], dtype: f16, force_fp32_for_softmax: true,
    }
}

fn err(e: AttnError) -> String {
    e.to_string()
}

/// The context of a case: its `deterministic` flag (the layers have no dropout) and a sink.
fn context<'s>(case: &Case, sink: &'s mut Intermediates) -> Result<Context<'s>, String> {
    Ok(Context::default()
        .set_deterministic(case.param_bool("deterministic")?)
        .sow(sink))
}

/// `forward`'s output plus the weights it sowed.
fn forward_results<T: Scalar, S: Shape>(
    output: Tensor<T, S>,
    sink: &Intermediates,
) -> Result<Actual, String> {
    let sown = sink.attention_weights();
    if sown.len() != 1 {
        return Err(format!(
            "expected 1 sown weights array, found {}",
            sown.len()
        ));
    }
    Ok(BTreeMap::from([
        ("attention_weights".to_owned(), Some(sown[0].clone())),
        ("output".to_owned(), Some(array(output))),
    ]))
}

fn weights_results<T: Scalar, S: Shape>(weights: Tensor<T, S>) -> Actual {
    BTreeMap::from([
        ("attention_weights".to_owned(), Some(array(weights))),
        ("output".to_owned(), None),
    ])
}

type Runner = fn(&Case) -> Result<Actual, String>;

/// A runner that calls `$layer.forward` with query, key and value of element type `$elem`
/// shaped by `$shape`, then the extra operands `input: element => shape` (e.g. the mask).
macro_rules! forward {
    ($layer:expr, $elem:ty, $shape:expr $(, $extra:ident: $extra_elem:ty => $extra_shape:expr)*) => {
        |case: &Case| -> Result<Actual, String> {
            let (q, k, v) = (case.required("query")?, case.required("key")?, case.required("value")?);
            $( let $extra = case.required(stringify!($extra))?; )*
            let mut sink = Intermediates::new();
            let output = $layer
                .forward(
                    view::<$elem, _>(&q, $shape(&q)?)?,
                    view::<$elem, _>(&k, $shape(&k)?)?,
                    view::<$elem, _>(&v, $shape(&v)?)?,
                    $( view::<$extra_elem, _>(&$extra, $extra_shape(&$extra)?)?, )*
                    &mut context(case, &mut sink)?,
                )
                .map_err(err)?;
            forward_results(output, &sink)
        }
    };
}

/// A runner that computes the output with `$layer.forward` and a context without a sow sink
/// (so the runtime may take its output-only path), and the weights with `$layer.weights`.
macro_rules! output_and_weights {
    ($layer:expr, $elem:ty, $shape:expr $(, $extra:ident: $extra_elem:ty => $extra_shape:expr)*) => {
        |case: &Case| -> Result<Actual, String> {
            let (q, k, v) = (case.required("query")?, case.required("key")?, case.required("value")?);
            $( let $extra = case.required(stringify!($extra))?; )*
            let deterministic = case.param_bool("deterministic")?;
            let (q, k, v) = (
                view::<$elem, _>(&q, $shape(&q)?)?,
                view::<$elem, _>(&k, $shape(&k)?)?,
                view::<$elem, _>(&v, $shape(&v)?)?,
            );
            $( let $extra = view::<$extra_elem, _>(&$extra, $extra_shape(&$extra)?)?; )*
            let output = $layer
                .forward(q, k, v, $($extra,)* &mut Context::default().set_deterministic(deterministic))
                .map_err(err)?;
            let weights = $layer
                .weights(q, k, $($extra,)* &mut Context::default().set_deterministic(deterministic))
                .map_err(err)?;
            Ok(BTreeMap::from([
                ("attention_weights".to_owned(), Some(array(weights))),
                ("output".to_owned(), Some(array(output))),
            ]))
        }
    };
}

/// A runner that calls `$layer.weights` (query, key and the extra operands, as in [`forward`]).
macro_rules! weights {
    ($layer:expr, $elem:ty, $shape:expr $(, $extra:ident: $extra_elem:ty => $extra_shape:expr)*) => {
        |case: &Case| -> Result<Actual, String> {
            let (q, k) = (case.required("query")?, case.required("key")?);
            $( let $extra = case.required(stringify!($extra))?; )*
            let weights = $layer
                .weights(
                    view::<$elem, _>(&q, $shape(&q)?)?,
                    view::<$elem, _>(&k, $shape(&k)?)?,
                    $( view::<$extra_elem, _>(&$extra, $extra_shape(&$extra)?)?, )*
                    &mut Context::default().set_deterministic(case.param_bool("deterministic")?),
                )
                .map_err(err)?;
            Ok(weights_results(weights))
        }
    };
}

/// Cases run with `forward` + `weights` and no sow sink (see [`output_and_weights`]).
fn output_path_cases() -> Vec<(&'static str, Runner)> {
    vec![
        (
            "f32_nobatch_basic",
            output_and_weights!(F32NoBatch, f32, d3),
        ),
        ("f32_b1_basic", output_and_weights!(F32Batch1, f32, d4)),
        ("f32_b2_basic", output_and_weights!(F32Batch2, f32, d5)),
        (
            "f32_decode_q1_kv70",
            output_and_weights!(F32Batch1, f32, d4),
        ),
        ("f32_long_65x67", output_and_weights!(F32Batch1, f32, d4)),
        ("f32_mask_causal", output_and_weights!(F32Causal, f32, d4)),
        (
            "f32_mask_kv_padding",
            output_and_weights!(F32KeyPadding, f32, d4, mask: bool => b1ts),
        ),
        (
            "f32_mask_causal_and_padding",
            output_and_weights!(F32CausalAndPadding, f32, d4, mask: bool => b1ts),
        ),
        ("f64_b1_basic", output_and_weights!(F64Batch1, f64, d4)),
        ("bf16_b1_basic", output_and_weights!(Bf16Batch1, bf16, d4)),
        (
            "bf16_force_fp32_mask",
            output_and_weights!(Bf16ForceFp32Causal, bf16, d4),
        ),
        ("f16_b1_basic", output_and_weights!(F16Batch1, f16, d4)),
    ]
}

/// Cases run with `forward` and the weights it sows (or with `weights` alone).
fn cases() -> Vec<(&'static str, Runner)> {
    vec![
        // f32, batch ranks 0, 1, 2, static dims, precision
        ("f32_nobatch_basic", forward!(F32NoBatch, f32, d3)),
        ("f32_b1_basic", forward!(F32Batch1, f32, d4)),
        ("f32_b2_basic", forward!(F32Batch2, f32, d5)),
        ("f32_b2_unit_batch", forward!(F32Batch2, f32, d5)),
        ("f32_vdepth_gt_qkdepth", forward!(F32Batch1, f32, d4)),
        ("f32_decode_q1_kv70", forward!(F32Batch1, f32, d4)),
        (
            "f32_precision_highest",
            forward!(F32PrecisionHighest, f32, d4),
        ),
        ("f32_heads8_depth64", forward!(F32Static, f32, bt_8_64)),
        // f32 masks: causal (generated), tensor, causal + tensor, mask + bias
        ("f32_mask_causal", forward!(F32Causal, f32, d4)),
        (
            "f32_mask_kv_padding",
            forward!(F32KeyPadding, f32, d4, mask: bool => b1ts),
        ),
        (
            "f32_mask_qkv_padding",
            forward!(F32KeyPadding, f32, d4, mask: bool => b1ts),
        ),
        (
            "f32_mask_causal_and_padding",
            forward!(F32CausalAndPadding, f32, d4, mask: bool => b1ts),
        ),
        (
            "f32_mask_and_bias",
            forward!(F32MaskAndBias, f32, d4, bias: f32 => one_hts, mask: bool => b1ts),
        ),
        ("w_f32_b2_causal", weights!(F32CausalWeightsB2, f32, d5)),
        // f64
        ("f64_b1_basic", forward!(F64Batch1, f64, d4)),
        ("f64_nobatch", forward!(F64NoBatch, f64, d3)),
        (
            "f64_causal_padding",
            forward!(F64CausalAndPadding, f64, d4, mask: bool => b1ts),
        ),
        ("f64_force_fp32", forward!(F64ForceFp32, f64, d4)),
        ("w_f64", weights!(F64Weights, f64, d4, mask: bool => b1ts)),
        // bf16
        ("bf16_b1_basic", forward!(Bf16Batch1, bf16, d4)),
        ("bf16_nobatch", forward!(Bf16NoBatch, bf16, d3)),
        ("bf16_b2", forward!(Bf16Batch2, bf16, d5)),
        (
            "bf16_force_fp32_mask",
            forward!(Bf16ForceFp32Causal, bf16, d4),
        ),
        (
            "bf16_mask_bias",
            forward!(Bf16MaskAndBias, bf16, d4, bias: bf16 => one_hts, mask: bool => b1ts),
        ),
        ("w_bf16", weights!(Bf16Weights, bf16, d4)),
        // f16
        ("f16_b1_basic", forward!(F16Batch1, f16, d4)),
        ("f16_nobatch_odd", forward!(F16NoBatch, f16, d3)),
        (
            "f16_force_fp32_mask_bias",
            forward!(F16ForceFp32MaskAndBias, f16, d4, bias: f16 => b11s, mask: bool => d4),
        ),
        ("w_f16_force_fp32", weights!(F16ForceFp32Weights, f16, d4)),
    ]
}

#[test]
fn conformance_cases_through_generated_layers() {
    run(&cases(), "forward with sown weights / weights");
}

#[test]
fn conformance_cases_through_generated_layers_without_sowing() {
    run(&output_path_cases(), "forward without a sink, then weights");
}

fn run(cases: &[(&str, Runner)], how: &str) {
    let dir = conformance::default_dir();
    let mut failed = Vec::new();
    for (name, runner) in cases {
        let path = dir.join(format!("{name}.json"));
        let case = conformance::load(&path).unwrap_or_else(|e| {
            panic!(
                "cannot load a conformance case ({e}); set {} to the case directory",
                conformance::DIR_VAR
            )
        });
        assert_eq!(case.name(), *name);
        let outcome = conformance::run_case_with(&case, runner);
        println!("{outcome}");
        if !outcome.passed() {
            failed.push(outcome.to_string());
        }
    }
    println!(
        "{how}: {} passed, {} failed",
        cases.len() - failed.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "through generated layers ({how}):\n{}",
        failed.join("\n")
    );
}
