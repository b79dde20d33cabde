//! Hostile and random inputs of the `jax.nn`-style entry point (`attn::jax_nn`): every bad
//! argument gets the `AttnError` naming it, never a panic; extreme sizes give an empty result or
//! a size error; random valid calls (GQA, causal, windows, lengths, bias, mask) match a plain f64
//! reference that builds the mask densely and follows jax.nn's rules (scale after the dot,
//! hidden logits `-0.7 · f32::MAX`, rows that see no key uniform, padded query rows zero).

use std::panic::{AssertUnwindSafe, catch_unwind};

use attn::jax_nn::{JaxArgs, JaxOutput, dot_product_attention};
use attn::{Array, AttnError, DType, Intermediates};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn f32s(shape: &[usize]) -> Array {
    let n: usize = if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    };
    let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    Array::new(v, shape.to_vec()).unwrap()
}

fn i32s(v: &[i32]) -> Array {
    Array::new(v.to_vec(), vec![v.len()]).unwrap()
}

/// Runs a call under `catch_unwind`: a panic fails the test.
fn call(
    q: &Array,
    k: &Array,
    v: &Array,
    args: impl FnOnce() -> JaxArgs<'static>,
) -> Result<JaxOutput, AttnError> {
    catch_unwind(AssertUnwindSafe(|| dot_product_attention(q, k, v, args())))
        .unwrap_or_else(|_| panic!("jax_nn::dot_product_attention panicked"))
}

fn leak(a: Array) -> &'static Array {
    Box::leak(Box::new(a))
}

/// The error of a call, with its message.
fn error(r: Result<JaxOutput, AttnError>) -> (AttnError, String) {
    let e = r.expect_err("an error was expected");
    let text = e.to_string();
    (e, text)
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let q = f32s(&[2, 3, 4, 8]);
    let kv = f32s(&[2, 5, 2, 8]);
    let none = JaxArgs::default;

    let (e, t) = error(call(&f32s(&[3, 8]), &kv, &kv, none));
    assert!(
        matches!(
            e,
            AttnError::Rank {
                tensor: "query",
                ..
            }
        ),
        "{t}"
    );
    let (e, t) = error(call(&q, &f32s(&[5, 2, 8]), &kv, none));
    assert!(matches!(e, AttnError::Rank { tensor: "key", .. }), "{t}");
    let qi = Array::new(vec![1i32; 2 * 3 * 4 * 8], vec![2, 3, 4, 8]).unwrap();
    let (e, t) = error(call(&qi, &kv, &kv, none));
    assert!(
        matches!(
            e,
            AttnError::InvalidArgument {
                argument: "query",
                ..
            }
        ),
        "{t}"
    );
    let k64 = Array::new(vec![0.5f64; 2 * 5 * 2 * 8], vec![2, 5, 2, 8]).unwrap();
    let (e, t) = error(call(&q, &k64, &kv, none));
    assert!(matches!(e, AttnError::DType { tensor: "key", .. }), "{t}");
    let (e, t) = error(call(&q, &kv, &f32s(&[2, 5, 2, 7]), none));
    assert!(
        matches!(
            e,
            AttnError::Axis {
                tensor: "value",
                ..
            }
        ),
        "{t}"
    );
    let (_, t) = error(call(&q, &f32s(&[3, 5, 2, 8]), &f32s(&[3, 5, 2, 8]), none));
    assert!(t.contains("batch"), "{t}");
    // K = 3 does not divide N = 4; K = 0 with N > 0.
    let k3 = f32s(&[2, 5, 3, 8]);
    let (e, t) = error(call(&q, &k3, &k3, none));
    assert!(matches!(e, AttnError::Axis { tensor: "key", .. }), "{t}");
    assert!(t.contains("divisor of the 4 query heads"), "{t}");
    let k0 = f32s(&[2, 5, 0, 8]);
    let (e, t) = error(call(&q, &k0, &k0, none));
    assert!(matches!(e, AttnError::Axis { tensor: "key", .. }), "{t}");

    let bias5 = leak(f32s(&[1, 1, 1, 1, 1]));
    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        bias: Some(bias5),
        ..JaxArgs::default()
    }));
    assert!(matches!(e, AttnError::Rank { tensor: "bias", .. }), "{t}");
    let bias_heads = leak(f32s(&[3, 3, 5]));
    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        bias: Some(bias_heads),
        ..JaxArgs::default()
    }));
    assert!(
        matches!(e, AttnError::Broadcast { tensor: "bias", .. }),
        "{t}"
    );
    let bias_int = leak(Array::new(vec![1i32; 15], vec![3, 5]).unwrap());
    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        bias: Some(bias_int),
        ..JaxArgs::default()
    }));
    assert!(
        matches!(
            e,
            AttnError::InvalidArgument {
                argument: "bias",
                ..
            }
        ),
        "{t}"
    );
    let mask_f32 = leak(f32s(&[3, 5]));
    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        mask: Some(mask_f32),
        ..JaxArgs::default()
    }));
    assert!(matches!(e, AttnError::DType { tensor: "mask", .. }), "{t}");

    // Lengths: int32, one per batch element, within the sequence.
    let len_f32 = leak(Array::new(vec![1.0f32, 2.0], vec![2]).unwrap());
    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        query_seq_lengths: Some(len_f32),
        ..JaxArgs::default()
    }));
    assert!(
        matches!(
            e,
            AttnError::DType {
                tensor: "query_seq_lengths",
                ..
            }
        ),
        "{t}"
    );
    for (bad, what) in [
        (&[1, 2, 3][..], "one length per batch element"),
        (&[-1, 2][..], "found -1"),
        (&[1, 6][..], "found 6"),
    ] {
        let lengths = leak(i32s(bad));
        let (_, t) = error(call(&q, &kv, &kv, || JaxArgs {
            key_value_seq_lengths: Some(lengths),
            ..JaxArgs::default()
        }));
        assert!(
            t.contains("key_value_seq_lengths") && t.contains(what),
            "{bad:?}: {t}"
        );
    }
    let beyond = leak(i32s(&[4, 1]));
    let (_, t) = error(call(&q, &kv, &kv, || JaxArgs {
        query_seq_lengths: Some(beyond),
        ..JaxArgs::default()
    }));
    assert!(
        t.contains("query_seq_lengths") && t.contains("found 4"),
        "{t}"
    );

    let (e, t) = error(call(&q, &kv, &kv, || JaxArgs {
        return_residual: true,
        module: Some(Box::leak(Box::new(Intermediates::new()))),
        ..JaxArgs::default()
    }));
    assert!(
        matches!(
            e,
            AttnError::InvalidArgument {
                argument: "return_residual",
                ..
            }
        ),
        "{t}"
    );
}

#[test]
fn extreme_sizes_give_empty_results_or_size_errors() {
    // A zero beside a huge dim: an empty output (and residual) without work or allocation.
    let q = f32s(&[0, 1 << 20, 4, 8]);
    let k = f32s(&[0, 1 << 20, 2, 8]);
    let out = call(&q, &k, &k, || JaxArgs {
        is_causal: true,
        return_residual: true,
        ..JaxArgs::default()
    })
    .unwrap();
    assert_eq!(out.output.shape(), &[0, 1 << 20, 4, 8]);
    assert!(out.output.is_empty());
    assert_eq!(out.residual.unwrap().shape(), &[0, 1 << 20, 4]);
    // The logits `[0, 4, 2^40, 2^40]` are too big by NumPy's rule even when empty (the rule
    // of the Flax-style API, docs/runtime.md): a size error naming them, not a panic.
    let q = f32s(&[0, 1 << 40, 4, 8]);
    let k = f32s(&[0, 1 << 40, 2, 8]);
    match call(&q, &k, &k, JaxArgs::default) {
        Err(AttnError::Overflow { shape, .. }) => assert_eq!(shape, [0, 4, 1 << 40, 1 << 40]),
        other => panic!("expected a size error, got {other:?}"),
    }
    // No keys: the output is an empty sum (zeros), as jax's einsum gives.
    let q = f32s(&[1, 3, 2, 4]);
    let k = f32s(&[1, 0, 2, 4]);
    let out = call(&q, &k, &k, JaxArgs::default).unwrap();
    assert_eq!(out.output.shape(), &[1, 3, 2, 4]);
    assert!(out.output.to_f64_vec().iter().all(|&x| x == 0.0));
    // Depth 0 with huge other dims: the residual is the result's size, checked.
    let q = f32s(&[1 << 20, 1 << 20, 1 << 22, 0]);
    let r = call(&q, &q, &q, || JaxArgs {
        return_residual: true,
        ..JaxArgs::default()
    });
    match r {
        Err(AttnError::Overflow { .. } | AttnError::Allocation { .. }) => {}
        other => panic!("expected a size error, got {other:?}"),
    }
}

// ---- random valid calls against a dense f64 reference ----------------------------------------

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    kv_heads: usize,
    group: usize,
    depth: usize,
    causal: bool,
    window: Option<(usize, usize)>,
    q_lengths: Option<Vec<i32>>,
    kv_lengths: Option<Vec<i32>>,
    bias: bool,
    mask: bool,
    scale: Option<f64>,
    seed: u64,
}

fn problems() -> impl Strategy<Value = Problem> {
    (
        (
            1usize..3,
            0usize..6,
            0usize..7,
            1usize..3,
            1usize..3,
            1usize..5,
        ),
        (any::<bool>(), proptest::option::of((0usize..4, 0usize..4))),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        (proptest::option::of(0.05f64..2.0), any::<u64>()),
    )
        .prop_flat_map(
            |((batch, q_len, kv_len, kv_heads, group, depth), (causal, window), flags, rest)| {
                let lens = |n: usize| proptest::collection::vec(0..=n as i32, batch);
                (
                    Just((batch, q_len, kv_len, kv_heads, group, depth)),
                    Just((causal, window)),
                    Just(flags),
                    Just(rest),
                    lens(q_len),
                    lens(kv_len),
                )
            },
        )
        .prop_map(
            |(
                (batch, q_len, kv_len, kv_heads, group, depth),
                (causal, window),
                (ql, kl, bias, mask),
                (scale, seed),
                qlv,
                klv,
            )| Problem {
                batch,
                q_len,
                kv_len,
                kv_heads,
                group,
                depth,
                causal,
                window,
                q_lengths: ql.then_some(qlv),
                kv_lengths: kl.then_some(klv),
                bias,
                mask,
                scale,
                seed,
            },
        )
}

fn values(n: usize, seed: u64, salt: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let x = (i as u64 + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seed ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03));
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// jax.nn's result in f64 with the mask built densely.
fn reference(
    p: &Problem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    bias: &[f64],
    mask: &[bool],
) -> Vec<f64> {
    let heads = p.kv_heads * p.group;
    let (t, s, d) = (p.q_len, p.kv_len, p.depth);
    let scale = p.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut out = vec![0.0; p.batch * t * heads * d];
    for b in 0..p.batch {
        for n in 0..heads {
            let kh = n / p.group;
            for i in 0..t {
                let mut logits = vec![0.0; s];
                for (j, l) in logits.iter_mut().enumerate() {
                    let dot: f64 = (0..d)
                        .map(|x| {
                            q[((b * t + i) * heads + n) * d + x]
                                * k[((b * s + j) * p.kv_heads + kh) * d + x]
                        })
                        .sum();
                    let mut x = dot * scale;
                    if p.bias {
                        x += bias[(n * t + i) * s + j];
                    }
                    let mut visible = !p.mask || mask[(b * t + i) * s + j];
                    visible &= !p.causal || j <= i;
                    if let Some((left, right)) = p.window {
                        visible &= j + left >= i && j <= i + right;
                    }
                    if let Some(l) = &p.q_lengths {
                        visible &= (i as i32) < l[b];
                    }
                    if let Some(l) = &p.kv_lengths {
                        visible &= (j as i32) < l[b];
                    }
                    *l = if visible { x } else { -0.7 * f32::MAX as f64 };
                }
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|&x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let padded = p.q_lengths.as_ref().is_some_and(|l| i as i32 >= l[b]);
                for x in 0..d {
                    let o: f64 = if padded {
                        0.0
                    } else {
                        (0..s)
                            .map(|j| e[j] / sum * v[((b * s + j) * p.kv_heads + kh) * d + x])
                            .sum()
                    };
                    out[((b * t + i) * heads + n) * d + x] = o;
                }
            }
        }
    }
    out
}

fn check(p: &Problem) -> Result<(), String> {
    let heads = p.kv_heads * p.group;
    let (t, s, d) = (p.q_len, p.kv_len, p.depth);
    let qv = values(p.batch * t * heads * d, p.seed, 1);
    let kv = values(p.batch * s * p.kv_heads * d, p.seed, 2);
    let vv = values(p.batch * s * p.kv_heads * d, p.seed, 3);
    let bv = values(heads * t * s, p.seed, 4);
    let mv: Vec<bool> = values(p.batch * t * s, p.seed, 5)
        .iter()
        .map(|&x| x > -0.6)
        .collect();
    let arr = |v: &[f64], shape: Vec<usize>| Array::from_f64(DType::F32, v, shape).unwrap();
    // Round the inputs to f32 first, so that the reference sees what attn sees.
    let round = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<_>>();
    let (qv, kv, vv, bv) = (round(&qv), round(&kv), round(&vv), round(&bv));
    let q = arr(&qv, vec![p.batch, t, heads, d]);
    let k = arr(&kv, vec![p.batch, s, p.kv_heads, d]);
    let v = arr(&vv, vec![p.batch, s, p.kv_heads, d]);
    let bias = arr(&bv, vec![heads, t, s]);
    let mask = Array::new(mv.clone(), vec![p.batch, 1, t, s]).unwrap();
    let ql = p.q_lengths.as_deref().map(i32s);
    let kl = p.kv_lengths.as_deref().map(i32s);
    let want = reference(p, &qv, &kv, &vv, &bv, &mv);
    for weights_path in [false, true] {
        let mut sink = Intermediates::new();
        let args = JaxArgs {
            bias: p.bias.then_some(&bias),
            mask: p.mask.then_some(&mask),
            scale: p.scale,
            is_causal: p.causal,
            query_seq_lengths: ql.as_ref(),
            key_value_seq_lengths: kl.as_ref(),
            local_window_size: p.window,
            return_residual: false,
            module: if weights_path { Some(&mut sink) } else { None },
            pool: None,
        };
        let got = catch_unwind(AssertUnwindSafe(|| dot_product_attention(&q, &k, &v, args)))
            .map_err(|_| "panic".to_string())?
            .map_err(|e| format!("error {e}"))?;
        let got = got.output.to_f64_vec();
        for (n, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if (g - w).abs() > 2e-5 * (1.0 + w.abs()) {
                return Err(format!(
                    "weights path {weights_path}: element {n}: got {g}, reference {w}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn random_calls_match_a_dense_reference() {
    let config = Config {
        cases: 2_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    if let Err(e) = runner.run(&problems(), |p| check(&p).map_err(TestCaseError::fail)) {
        panic!("{e}");
    }
}
