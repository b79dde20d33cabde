//! Hostile inputs of the backward pass, table-driven like `hostile_inputs.rs`: cotangents of
//! the wrong shape or dtype (including one from another call), gradient buffers of the wrong
//! length, a bias gradient without a bias, and the forward's own bad inputs — each must return
//! exactly the error written here, and never panic (every case runs under `catch_unwind`).

use std::panic::{AssertUnwindSafe, catch_unwind};

use attn::jax_nn::{self, JaxArgs};
use attn::kernel::{self, Broadcast, Geometry, Grads, JaxOptions, Mask, Options};
use attn::{
    Array, AttnError, Context, DType, DropoutRng, FlaxArgs, dot_product_attention_bwd,
    dot_product_attention_fwd, dot_product_attention_vjp, dot_product_attention_weights_vjp,
};

fn zeros(dtype: DType, shape: &[usize]) -> Array {
    let n = shape.iter().product();
    Array::from_f64(dtype, &vec![0.0; n], shape.to_vec()).unwrap()
}

fn f32s(shape: &[usize]) -> Array {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    Array::new(data, shape.to_vec()).unwrap()
}

/// Runs `f` under `catch_unwind` and compares its error with `want` (through `Debug`).
fn expect_error(name: &str, want: AttnError, f: impl FnOnce() -> Result<(), AttnError>) {
    let got = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{name}: panicked"));
    match got {
        Ok(()) => panic!("{name}: expected {want:?}, got Ok"),
        Err(e) => assert_eq!(format!("{e:?}"), format!("{want:?}"), "{name}: {e}"),
    }
}

fn shape_error(what: &str, expected: &[usize], found: &[usize]) -> AttnError {
    AttnError::InvalidArgument {
        argument: "cotangent",
        reason: format!("expected the shape of the {what}, {expected:?}, found {found:?}"),
    }
}

#[test]
fn flax_cotangents_of_the_wrong_shape_or_dtype() {
    let (q, k, v) = (
        f32s(&[2, 3, 4, 5]),
        f32s(&[2, 6, 4, 5]),
        f32s(&[2, 6, 4, 7]),
    );
    let vjp = |c: &Array| {
        dot_product_attention_vjp(&q, &k, &v, c, FlaxArgs::new().deterministic(true)).map(drop)
    };
    // The output is [2, 3, 4, 7]: a cotangent of the weights' shape belongs to another call.
    for found in [
        vec![2, 3, 4, 5],
        vec![3, 4, 7],
        vec![2, 4, 3, 6],
        vec![2, 3, 4, 7, 1],
        vec![],
    ] {
        expect_error(
            "flax output cotangent shape",
            shape_error("output", &[2, 3, 4, 7], &found),
            || vjp(&zeros(DType::F32, &found)),
        );
    }
    for found in [DType::F64, DType::BF16, DType::F16, DType::Bool, DType::I32] {
        expect_error(
            "flax output cotangent dtype",
            AttnError::DType {
                tensor: "cotangent",
                expected: DType::F32,
                found,
            },
            || vjp(&zeros(found, &[2, 3, 4, 7])),
        );
    }
    // bf16 inputs: the output (and so the cotangent) is bf16.
    let qb = q.astype(DType::BF16);
    let (kb, vb) = (k.astype(DType::BF16), v.astype(DType::BF16));
    expect_error(
        "bf16 call, f32 cotangent",
        AttnError::DType {
            tensor: "cotangent",
            expected: DType::BF16,
            found: DType::F32,
        },
        || {
            let c = zeros(DType::F32, &[2, 3, 4, 7]);
            dot_product_attention_vjp(&qb, &kb, &vb, &c, FlaxArgs::new()).map(drop)
        },
    );
    // The weights' VJP wants the weights' shape [2, 4, 3, 6].
    expect_error(
        "flax weights cotangent shape",
        shape_error("weights", &[2, 4, 3, 6], &[2, 3, 4, 7]),
        || {
            let c = zeros(DType::F32, &[2, 3, 4, 7]);
            dot_product_attention_weights_vjp(&q, &k, &c, FlaxArgs::new()).map(drop)
        },
    );
    // With force_fp32_for_softmax and f16 inputs the weights are f32.
    expect_error(
        "f16 weights with forced f32 softmax",
        AttnError::DType {
            tensor: "cotangent",
            expected: DType::F32,
            found: DType::F16,
        },
        || {
            let c = zeros(DType::F16, &[2, 4, 3, 6]);
            let (qh, kh) = (q.astype(DType::F16), k.astype(DType::F16));
            let args = FlaxArgs::new().force_fp32_for_softmax(true);
            dot_product_attention_weights_vjp(&qh, &kh, &c, args).map(drop)
        },
    );
}

#[test]
fn flax_vjp_checks_what_the_forward_checks() {
    let (q, v) = (f32s(&[3, 4, 5]), f32s(&[6, 4, 7]));
    let c = zeros(DType::F32, &[3, 4, 7]);
    expect_error(
        "key depth",
        AttnError::Axis {
            tensor: "key",
            axis: "depth (axis -1)".into(),
            expected: "5, the depth of query".into(),
            found: 6,
        },
        || dot_product_attention_vjp(&q, &f32s(&[6, 4, 6]), &v, &c, FlaxArgs::new()).map(drop),
    );
    expect_error(
        "dropout without an rng",
        AttnError::MissingDropoutRng { rate: 0.5 },
        || {
            let args = FlaxArgs::new().dropout_rate(0.5);
            dot_product_attention_vjp(&q, &f32s(&[6, 4, 5]), &v, &c, args).map(drop)
        },
    );
}

fn residuals_error() -> AttnError {
    AttnError::InvalidArgument {
        argument: "residuals",
        reason: "expected the residuals of this call (the same shapes, dtypes, options, dropout \
                 generator, query, key, value and output); these belong to another call"
            .into(),
    }
}

#[test]
fn residuals_and_outputs_of_another_call() {
    let (q, k, v) = (
        f32s(&[2, 3, 4, 5]),
        f32s(&[2, 6, 4, 5]),
        f32s(&[2, 6, 4, 7]),
    );
    let c = f32s(&[2, 3, 4, 7]);
    let (out, saved) = dot_product_attention_fwd(&q, &k, &v, FlaxArgs::new()).unwrap();
    // The right call works.
    dot_product_attention_bwd(&q, &k, &v, &out, &saved, &c, FlaxArgs::new()).unwrap();
    // Another query of the same shape (another batch of data).
    let q2 = Array::from_f64(DType::F32, &vec![0.25; 2 * 3 * 4 * 5], vec![2, 3, 4, 5]).unwrap();
    expect_error("another query", residuals_error(), || {
        dot_product_attention_bwd(&q2, &k, &v, &out, &saved, &c, FlaxArgs::new()).map(drop)
    });
    // Another call's output.
    let (out2, saved2) = dot_product_attention_fwd(&q2, &k, &v, FlaxArgs::new()).unwrap();
    expect_error("another output", residuals_error(), || {
        dot_product_attention_bwd(&q, &k, &v, &out2, &saved, &c, FlaxArgs::new()).map(drop)
    });
    expect_error("another call's residuals", residuals_error(), || {
        dot_product_attention_bwd(&q, &k, &v, &out, &saved2, &c, FlaxArgs::new()).map(drop)
    });
    // Other options: causal, a dropout generator of another seed.
    expect_error("other options", residuals_error(), || {
        let args = FlaxArgs::new().causal(attn::kernel::Align::TopLeft);
        dot_product_attention_bwd(&q, &k, &v, &out, &saved, &c, args).map(drop)
    });
    let dropout = |seed| {
        FlaxArgs::new()
            .dropout_rate(0.3)
            .deterministic(false)
            .dropout_rng(DropoutRng::new(seed))
    };
    let (out3, saved3) = dot_product_attention_fwd(&q, &k, &v, dropout(1)).unwrap();
    dot_product_attention_bwd(&q, &k, &v, &out3, &saved3, &c, dropout(1)).unwrap();
    expect_error("another dropout seed", residuals_error(), || {
        dot_product_attention_bwd(&q, &k, &v, &out3, &saved3, &c, dropout(2)).map(drop)
    });
    // Residuals of another shape (a shorter query).
    let q4 = f32s(&[2, 2, 4, 5]);
    let c4 = f32s(&[2, 2, 4, 7]);
    let (out4, _) = dot_product_attention_fwd(&q4, &k, &v, FlaxArgs::new()).unwrap();
    expect_error("residuals of another shape", residuals_error(), || {
        dot_product_attention_bwd(&q4, &k, &v, &out4, &saved, &c4, FlaxArgs::new()).map(drop)
    });
    // An output of the wrong shape or dtype.
    expect_error(
        "output shape",
        AttnError::InvalidArgument {
            argument: "output",
            reason: "expected the forward's output, of shape [2, 3, 4, 7], found [2, 3, 4, 5]"
                .into(),
        },
        || dot_product_attention_bwd(&q, &k, &v, &q, &saved, &c, FlaxArgs::new()).map(drop),
    );
    expect_error(
        "output dtype",
        AttnError::DType {
            tensor: "output",
            expected: DType::F32,
            found: DType::F64,
        },
        || {
            let o = out.astype(DType::F64);
            dot_product_attention_bwd(&q, &k, &v, &o, &saved, &c, FlaxArgs::new()).map(drop)
        },
    );
    // A cotangent of the wrong shape, as for the VJP.
    expect_error(
        "cotangent shape",
        shape_error("output", &[2, 3, 4, 7], &[2, 3, 4, 5]),
        || dot_product_attention_bwd(&q, &k, &v, &out, &saved, &q, FlaxArgs::new()).map(drop),
    );
}

#[test]
fn jax_nn_cotangents_of_the_wrong_shape_or_dtype() {
    let (q, k) = (f32s(&[2, 3, 4, 8]), f32s(&[2, 5, 2, 8]));
    let vjp = |c: &Array| jax_nn::dot_product_attention_vjp(&q, &k, &k, c, JaxArgs::default());
    expect_error(
        "jax cotangent shape",
        shape_error("output", &[2, 3, 4, 8], &[2, 3, 2, 8]),
        || vjp(&zeros(DType::F32, &[2, 3, 2, 8])).map(drop),
    );
    expect_error(
        "jax cotangent dtype",
        AttnError::DType {
            tensor: "cotangent",
            expected: DType::F32,
            found: DType::F64,
        },
        || vjp(&zeros(DType::F64, &[2, 3, 4, 8])).map(drop),
    );
}

#[test]
fn kernel_backward_checks_its_slices() {
    let batch = [2usize];
    let geom = Geometry {
        batch_shape: &batch,
        q_len: 3,
        kv_len: 4,
        heads: 2usize,
        kv_heads: 1usize,
        qk_depth: 5usize,
        v_depth: 6usize,
    };
    let q = vec![0.1f32; 2 * 3 * 2 * 5];
    let k = vec![0.2f32; 2 * 4 * 5];
    let v = vec![0.3f32; 2 * 4 * 6];
    let bias_data = vec![0.0f32; 4];
    let bias = Broadcast::new("bias", &bias_data, &[4]).unwrap();
    let run = |cot_len: usize, lens: [usize; 3], bias_grad: Option<usize>, with_bias: bool| {
        let cot = vec![1.0f32; cot_len];
        let (mut gq, mut gk, mut gv) = (
            vec![0f32; lens[0]],
            vec![0f32; lens[1]],
            vec![0f32; lens[2]],
        );
        let mut gb = bias_grad.map(|n| vec![0f32; n]);
        let grads = Grads {
            query: &mut gq,
            key: &mut gk,
            value: &mut gv,
            bias: gb.as_deref_mut(),
        };
        let mut ctx = Context::deterministic();
        kernel::attention_backward(
            &geom,
            &q,
            &k,
            &v,
            with_bias.then_some(&bias),
            &Mask::none(),
            &Options::default(),
            &mut ctx,
            &cot,
            grads,
        )
    };
    let good = [q.len(), k.len(), v.len()];
    assert!(run(2 * 3 * 2 * 6, good, Some(4), true).is_ok());
    expect_error(
        "cotangent length",
        AttnError::Length {
            tensor: "cotangent",
            shape: vec![2, 3, 2, 6],
            expected: 72,
            found: 71,
        },
        || run(71, good, None, false),
    );
    expect_error(
        "grad key length",
        AttnError::Length {
            tensor: "grad key",
            shape: vec![2, 4, 1, 5],
            expected: 40,
            found: 80,
        },
        || run(72, [q.len(), 80, v.len()], None, false),
    );
    expect_error(
        "grad bias length",
        AttnError::Length {
            tensor: "grad bias",
            shape: vec![4],
            expected: 4,
            found: 3,
        },
        || run(72, good, Some(3), true),
    );
    expect_error(
        "grad bias without a bias",
        AttnError::InvalidArgument {
            argument: "grad bias",
            reason: "expected none: the call has no bias".into(),
        },
        || run(72, good, Some(4), false),
    );
    // jax.nn's backward: the same checks.
    expect_error(
        "jax kernel cotangent length",
        AttnError::Length {
            tensor: "cotangent",
            shape: vec![2, 3, 2, 6],
            expected: 72,
            found: 10,
        },
        || {
            let cot = vec![0f32; 10];
            let (mut gq, mut gk, mut gv) = (
                vec![0f32; good[0]],
                vec![0f32; good[1]],
                vec![0f32; good[2]],
            );
            let grads = Grads::<f32, f32> {
                query: &mut gq,
                key: &mut gk,
                value: &mut gv,
                bias: None,
            };
            kernel::jax_attention_backward(
                &geom,
                &q,
                &k,
                &v,
                None,
                &Mask::none(),
                &JaxOptions::default(),
                &mut Context::deterministic(),
                &cot,
                grads,
            )
        },
    );
}

attn::attention! {
    /// Run-time dims only, so mistakes in them reach the run-time checks.
    struct Trainable {
        query: [B, T, H, D], key: [B, S, H, D], value: [B, S, H, Dv], mask: kv_lengths,
        dropout_rate: 0.2,
    }
}

#[test]
fn generated_layer_backward_rejects_inputs_of_another_call() {
    use attn::{Context, TensorView};
    let (b, t, s, h, d) = (2, 3, 5, 2, 4);
    let data = |n: usize, seed: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    };
    let (qd, kd, vd) = (
        data(b * t * h * d, 0.0),
        data(b * s * h * d, 1.0),
        data(b * s * h * d, 2.0),
    );
    let q = TensorView::new(&qd, (b, t, h, d)).unwrap();
    let k = TensorView::new(&kd, (b, s, h, d)).unwrap();
    let v = TensorView::new(&vd, (b, s, h, d)).unwrap();
    let lengths = [5i32, 2];
    let len = TensorView::new(&lengths, (b,)).unwrap();
    let train = || Context::with_dropout(7);
    let (out, saved) = Trainable
        .forward_with_residuals(q, k, v, len, &mut train())
        .unwrap();
    let cd = data(b * t * h * d, 3.0);
    let c = TensorView::new(&cd, (b, t, h, d)).unwrap();
    // The right call works.
    Trainable
        .backward(q, k, v, len, out.view(), &saved, c, &mut train())
        .unwrap();

    // A cotangent whose run-time dims are swapped (same number of elements).
    let swapped = TensorView::new(&cd, (t, b, h, d)).unwrap();
    expect_error(
        "cotangent with swapped dims",
        AttnError::DimMismatch {
            dim: "B",
            first: "query",
            first_size: b,
            second: "d_output",
            second_size: t,
        },
        || {
            Trainable
                .backward(q, k, v, len, out.view(), &saved, swapped, &mut train())
                .map(drop)
        },
    );
    // An output of another length.
    let short = TensorView::new(&out.as_slice()[..h * d * 4], (b, 2, h, d)).unwrap();
    expect_error(
        "output of another length",
        AttnError::DimMismatch {
            dim: "T",
            first: "query",
            first_size: t,
            second: "output",
            second_size: 2,
        },
        || {
            Trainable
                .backward(q, k, v, len, short, &saved, c, &mut train())
                .map(drop)
        },
    );
    // Another dropout seed, other lengths, another query: residuals of another call.
    expect_error("another dropout seed", residuals_error(), || {
        let mut other = Context::with_dropout(8);
        Trainable
            .backward(q, k, v, len, out.view(), &saved, c, &mut other)
            .map(drop)
    });
    let other_lengths = [4i32, 2];
    let other_len = TensorView::new(&other_lengths, (b,)).unwrap();
    expect_error("other lengths", residuals_error(), || {
        Trainable
            .backward(q, k, v, other_len, out.view(), &saved, c, &mut train())
            .map(drop)
    });
    let other_qd = data(b * t * h * d, 9.0);
    let other_q = TensorView::new(&other_qd, (b, t, h, d)).unwrap();
    expect_error("another query", residuals_error(), || {
        Trainable
            .backward(other_q, k, v, len, out.view(), &saved, c, &mut train())
            .map(drop)
    });
    // Bad lengths are rejected by the backward as by the forward.
    let bad_lengths = [6i32, -1];
    let bad = TensorView::new(&bad_lengths, (b,)).unwrap();
    let forward_error = Trainable
        .forward(q, k, v, bad, &mut train())
        .expect_err("lengths past the keys");
    expect_error("lengths past the keys", forward_error, || {
        Trainable
            .backward(q, k, v, bad, out.view(), &saved, c, &mut train())
            .map(drop)
    });
    // weights_backward: a cotangent of the weights with swapped run-time dims.
    let wd = data(b * h * t * s, 4.0);
    let d_weights = TensorView::new(&wd, (b, h, s, t)).unwrap();
    expect_error(
        "weights cotangent with swapped dims",
        AttnError::DimMismatch {
            dim: "T",
            first: "query",
            first_size: t,
            second: "d_weights",
            second_size: s,
        },
        || {
            Trainable
                .weights_backward(q, k, len, d_weights, &mut train())
                .map(drop)
        },
    );
}

#[test]
fn residuals_of_a_call_with_another_mask_or_bias_are_rejected() {
    // Found by the random sweep: the fingerprint held the mask's structure but not a mask
    // tensor's bits, nor the bias, so these backwards ran with the wrong mask or bias.
    // [len, heads, depth]: 2 queries, 2 keys, one head; the mask is [q_len, kv_len].
    let (q, k, v) = (f32s(&[2, 1, 1]), f32s(&[2, 1, 1]), f32s(&[2, 1, 1]));
    let c = f32s(&[2, 1, 1]);
    let mask = Array::new(vec![true, false, true, true], vec![2, 2]).unwrap();
    let all = Array::new(vec![true; 4], vec![2, 2]).unwrap();
    let (out, saved) = dot_product_attention_fwd(&q, &k, &v, FlaxArgs::new().mask(&mask)).unwrap();
    dot_product_attention_bwd(&q, &k, &v, &out, &saved, &c, FlaxArgs::new().mask(&mask)).unwrap();
    expect_error("a mask differing in one element", residuals_error(), || {
        dot_product_attention_bwd(&q, &k, &v, &out, &saved, &c, FlaxArgs::new().mask(&all))
            .map(drop)
    });
    let bias = Array::new(vec![0.5f32, -0.5], vec![2]).unwrap();
    let other = Array::new(vec![0.5f32, -0.25], vec![2]).unwrap();
    let (out, saved) = dot_product_attention_fwd(&q, &k, &v, FlaxArgs::new().bias(&bias)).unwrap();
    expect_error("a bias differing in one value", residuals_error(), || {
        dot_product_attention_bwd(&q, &k, &v, &out, &saved, &c, FlaxArgs::new().bias(&other))
            .map(drop)
    });
}

#[test]
fn backward_rejects_the_structured_inputs_the_forward_rejects() {
    // Segment ids, lengths and windows of the wrong shape or range: the VJP and the fwd/bwd
    // pair return exactly the forward's error (never a panic).
    let (q, k, v) = (
        f32s(&[2, 3, 2, 4]),
        f32s(&[2, 5, 2, 4]),
        f32s(&[2, 5, 2, 4]),
    );
    let c = f32s(&[2, 3, 2, 4]);
    let ids = |shape: &[usize]| Array::new(vec![0i32; shape.iter().product()], shape.to_vec());
    let (q_ids, k_ids, short_k) = (
        ids(&[2, 3]).unwrap(),
        ids(&[2, 5]).unwrap(),
        ids(&[2, 4]).unwrap(),
    );
    let lengths = Array::new(vec![5i32, 6], vec![2]).unwrap();
    let args = |case: usize| match case {
        0 => FlaxArgs::new().segment_ids(&q_ids, &short_k),
        1 => FlaxArgs::new().segment_ids(&k_ids, &k_ids),
        _ => FlaxArgs::new().kv_lengths(&lengths),
    };
    let names = [
        "key segment ids of the wrong length",
        "query segment ids for the keys",
        "kv length past the keys",
    ];
    for (case, name) in names.into_iter().enumerate() {
        let forward = attn::dot_product_attention(&q, &k, &v, args(case))
            .expect_err(name)
            .to_string();
        let vjp = catch_unwind(AssertUnwindSafe(|| {
            dot_product_attention_vjp(&q, &k, &v, &c, args(case))
        }))
        .unwrap_or_else(|_| panic!("{name}: panicked"))
        .expect_err(name)
        .to_string();
        assert_eq!(vjp, forward, "{name}");
        let fwd = dot_product_attention_fwd(&q, &k, &v, args(case))
            .expect_err(name)
            .to_string();
        assert_eq!(fwd, forward, "{name}");
    }
}
