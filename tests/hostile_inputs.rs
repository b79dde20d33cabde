//! Hostile inputs, table-driven: every bad or extreme input a caller can build, with the exact
//! error attn must return or the result Flax computes for it. Every case also runs under
//! `catch_unwind`: a panic fails the test whatever the case expects.
//!
//! Expected values are not taken from attn: errors are written out in full, results are either
//! analytic (uniform rows, one-hot rows, zeros) or computed by the plain f64 reference below,
//! which follows `jax.nn.softmax` literally (`max` propagates NaN, `exp(x - max)`, divide by the
//! sum), so NaN and infinity travel exactly as they do through Flax.

use std::panic::{AssertUnwindSafe, catch_unwind};

use attn::kernel::{self, Broadcast, Geometry, Mask, Options, SegmentIds};
use attn::{
    Array, AttnError, Context, DType, DropoutRng, FlaxArgs, Tensor, TensorView, TensorViewMut,
    combine_masks, dot_product_attention, dot_product_attention_weights, make_attention_mask,
    make_causal_mask,
};
use half::{bf16, f16};

/// What a case must produce.
enum Expect {
    /// Exactly this error (compared through `Debug`, so a NaN rate compares equal to itself).
    Error(AttnError),
    /// An error of this variant (where which buffer fails first is the kernel's business).
    Variant(&'static str),
    /// Either an empty result of this shape (a kernel that never materializes the huge
    /// intermediate) or an `Allocation` error (one that tries and is refused): never an abort.
    EmptyOrAllocation(Vec<usize>),
    /// An array of this dtype and shape whose values match `values` (NaN where `values` has
    /// NaN, the same infinity, else within `1e-6 · (1 + |expected|)`).
    Values {
        dtype: DType,
        shape: Vec<usize>,
        values: Vec<f64>,
    },
}

struct Case {
    name: &'static str,
    run: Box<dyn Fn() -> Result<Array, AttnError>>,
    expect: Expect,
}

fn case(
    name: &'static str,
    run: impl Fn() -> Result<Array, AttnError> + 'static,
    expect: Expect,
) -> Case {
    Case {
        name,
        run: Box::new(run),
        expect,
    }
}

fn error(e: AttnError) -> Expect {
    Expect::Error(e)
}

fn values(dtype: DType, shape: &[usize], values: Vec<f64>) -> Expect {
    Expect::Values {
        dtype,
        shape: shape.to_vec(),
        values,
    }
}

/// Deterministic inputs in [-1, 1): a small hash of the index and a salt.
fn ramp(n: usize, salt: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let mut x =
                (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt.wrapping_mul(0xbf58_476d);
            x ^= x >> 29;
            (x % 2000) as f64 / 1000.0 - 1.0
        })
        .collect()
}

fn f32_array(shape: &[usize], data: &[f64]) -> Array {
    Array::from_f64(DType::F32, data, shape.to_vec()).expect("test array")
}

fn input(shape: &[usize], salt: u64) -> Array {
    let n = shape.iter().product();
    f32_array(shape, &ramp(n, salt))
}

/// `input` with some elements replaced.
fn input_with(shape: &[usize], salt: u64, replace: &[(usize, f64)]) -> Array {
    let n = shape.iter().product();
    let mut data = ramp(n, salt);
    for &(i, x) in replace {
        data[i] = x;
    }
    f32_array(shape, &data)
}

/// Flax's weights for rank-3 inputs `q [q_len, h, d]`, `k [kv, h, d]` in f64, with an optional
/// bias `[h, q_len, kv]` (added) and mask `[h, q_len, kv]` (false -> `finfo(f32).min`).
fn reference_weights(
    q: &Array,
    k: &Array,
    bias: Option<&[f64]>,
    mask: Option<&[bool]>,
) -> Vec<f64> {
    let (qs, ks) = (q.shape(), k.shape());
    let (q_len, heads, depth, kv) = (qs[0], qs[1], qs[2], ks[0]);
    let (qv, kvv) = (q.to_f64_vec(), k.to_f64_vec());
    let mut out = Vec::new();
    for h in 0..heads {
        for i in 0..q_len {
            let mut row: Vec<f64> = (0..kv)
                .map(|j| {
                    let dot: f64 = (0..depth)
                        .map(|d| qv[(i * heads + h) * depth + d] * kvv[(j * heads + h) * depth + d])
                        .sum();
                    dot / (depth as f64).sqrt()
                })
                .collect();
            for (j, x) in row.iter_mut().enumerate() {
                let at = (h * q_len + i) * kv + j;
                if let Some(b) = bias {
                    *x += b[at];
                }
                if mask.is_some_and(|m| !m[at]) {
                    *x = f32::MIN as f64;
                }
            }
            out.extend(softmax(&row));
        }
    }
    out
}

/// `jax.nn.softmax` over one row, in f64: the max propagates NaN.
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| {
        if x.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(x)
        }
    });
    let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// `output[i, h, :] = Σ_j weights[h, i, j] · value[j, h, :]` for rank-3 inputs.
fn reference_output(weights: &[f64], v: &Array, q_len: usize) -> Vec<f64> {
    let vs = v.shape();
    let (kv, heads, dv) = (vs[0], vs[1], vs[2]);
    let vv = v.to_f64_vec();
    let mut out = vec![0.0; q_len * heads * dv];
    for i in 0..q_len {
        for h in 0..heads {
            for d in 0..dv {
                out[(i * heads + h) * dv + d] = (0..kv)
                    .map(|j| weights[(h * q_len + i) * kv + j] * vv[(j * heads + h) * dv + d])
                    .sum();
            }
        }
    }
    out
}

fn weights(q: &Array, k: &Array, args: FlaxArgs<'_>) -> Result<Array, AttnError> {
    dot_product_attention_weights(q, k, args)
}

/// The kernel layer's weights for f32 inputs `q [q_len, 1, d]`, `k [kv, 1, d]` (no batch dims,
/// one head).
fn kernel_weights(
    q_len: usize,
    kv: usize,
    depth: usize,
    query: &[f32],
    key: &[f32],
    mask: &Mask<'_>,
    out_len: usize,
) -> Result<Array, AttnError> {
    let geom = Geometry {
        batch_shape: &[],
        q_len,
        kv_len: kv,
        heads: 1usize,
        kv_heads: 1usize,
        qk_depth: depth,
        v_depth: 0usize,
    };
    let mut out = vec![0.0f32; out_len];
    kernel::attention_weights(
        &geom,
        query,
        key,
        None::<&Broadcast<'_, f32>>,
        mask,
        &Options::default(),
        &mut Context::deterministic(),
        &mut out,
    )?;
    Array::new(out, [1, q_len, kv])
}

const RANK_MSG: &str = "at least 3: [batch..., length, heads, depth]";
const HUGE: usize = 1 << 30;

fn cases() -> Vec<Case> {
    let q = || input(&[3, 2, 4], 1);
    let k = || input(&[5, 2, 4], 2);
    let v = || input(&[5, 2, 3], 3);
    let w_shape = [2, 3, 5];
    vec![
        // ---- ranks -------------------------------------------------------------------------
        case(
            "query of rank 2",
            || weights(&input(&[3, 4], 1), &input(&[5, 4], 2), FlaxArgs::new()),
            error(AttnError::Rank {
                tensor: "query",
                expected: RANK_MSG.into(),
                found: vec![3, 4],
            }),
        ),
        case(
            "key of rank 4 with query of rank 3",
            move || weights(&q(), &input(&[1, 5, 2, 4], 2), FlaxArgs::new()),
            error(AttnError::Rank {
                tensor: "key",
                expected: "3, the rank of query".into(),
                found: vec![1, 5, 2, 4],
            }),
        ),
        case(
            "value of rank 2",
            move || dot_product_attention(&q(), &k(), &input(&[5, 3], 3), FlaxArgs::new()),
            error(AttnError::Rank {
                tensor: "value",
                expected: RANK_MSG.into(),
                found: vec![5, 3],
            }),
        ),
        case(
            "scalar query (rank 0)",
            || {
                weights(
                    &f32_array(&[], &[1.0]),
                    &input(&[5, 2, 4], 2),
                    FlaxArgs::new(),
                )
            },
            error(AttnError::Rank {
                tensor: "query",
                expected: RANK_MSG.into(),
                found: vec![],
            }),
        ),
        // ---- mismatched dims ---------------------------------------------------------------
        case(
            "batch dims differ",
            || {
                weights(
                    &input(&[2, 3, 2, 4], 1),
                    &input(&[3, 5, 2, 4], 2),
                    FlaxArgs::new(),
                )
            },
            error(AttnError::Axis {
                tensor: "key",
                axis: "batch 0".into(),
                expected: "2, as in query".into(),
                found: 3,
            }),
        ),
        case(
            "heads differ",
            move || weights(&q(), &input(&[5, 3, 4], 2), FlaxArgs::new()),
            error(AttnError::Axis {
                tensor: "key",
                axis: "heads (axis -2)".into(),
                expected: "2, as in query, or a divisor of it (grouped-query attention)".into(),
                found: 3,
            }),
        ),
        case(
            "depth differs",
            move || weights(&q(), &input(&[5, 2, 6], 2), FlaxArgs::new()),
            error(AttnError::Axis {
                tensor: "key",
                axis: "depth (axis -1)".into(),
                expected: "4, the depth of query".into(),
                found: 6,
            }),
        ),
        case(
            "value length differs from key",
            move || dot_product_attention(&q(), &k(), &input(&[4, 2, 3], 3), FlaxArgs::new()),
            error(AttnError::Axis {
                tensor: "value",
                axis: "kv_len (axis -3)".into(),
                expected: "5, the length of key".into(),
                found: 4,
            }),
        ),
        case(
            "value heads differ",
            move || dot_product_attention(&q(), &k(), &input(&[5, 1, 3], 3), FlaxArgs::new()),
            error(AttnError::Axis {
                tensor: "value",
                axis: "heads (axis -2)".into(),
                expected: "2, as in key".into(),
                found: 1,
            }),
        ),
        // ---- bias / mask that do not broadcast ---------------------------------------------
        case(
            "bias whose kv axis is neither 1 nor kv_len",
            move || {
                let bias = input(&[2, 3, 4], 4);
                weights(&q(), &k(), FlaxArgs::new().bias(&bias))
            },
            error(AttnError::Broadcast {
                tensor: "bias",
                shape: vec![2, 3, 4],
                target: vec![2, 3, 5],
                axis: 2,
            }),
        ),
        case(
            "mask whose heads axis is neither 1 nor heads",
            move || {
                let mask = Array::new(vec![true; 3 * 3 * 5], [3, 3, 5]).unwrap();
                weights(&q(), &k(), FlaxArgs::new().mask(&mask))
            },
            error(AttnError::Broadcast {
                tensor: "mask",
                shape: vec![3, 3, 5],
                target: vec![2, 3, 5],
                axis: 0,
            }),
        ),
        case(
            // Flax broadcasts key and value along the enlarged kv axis: five copies of the one
            // value row, whatever the weights, so the output is that row.
            "bias that enlarges kv_len, with value",
            move || {
                let q = input(&[3, 2, 4], 1);
                let k = input(&[1, 2, 4], 2);
                let v = input(&[1, 2, 3], 3);
                let bias = input(&[2, 3, 5], 4);
                dot_product_attention(&q, &k, &v, FlaxArgs::new().bias(&bias))
            },
            values(DType::F32, &[3, 2, 3], {
                let row = input(&[1, 2, 3], 3).to_f64_vec();
                (0..3).flat_map(|_| row.clone()).collect()
            }),
        ),
        case(
            "kernel: bias of higher rank than the logits",
            || {
                let (q, k) = (vec![0.5f32; 3 * 4], vec![0.25f32; 5 * 4]);
                let bias_data = vec![0.0f32; 2 * 3 * 5];
                let bias = Broadcast::new("bias", &bias_data, &[2, 1, 3, 5])?;
                let geom = Geometry {
                    batch_shape: &[],
                    q_len: 3,
                    kv_len: 5,
                    heads: 1usize,
                    kv_heads: 1usize,
                    qk_depth: 4usize,
                    v_depth: 0usize,
                };
                let mut out = vec![0.0f32; 15];
                kernel::attention_weights(
                    &geom,
                    &q,
                    &k,
                    Some(&bias),
                    &Mask::none(),
                    &Options::default(),
                    &mut Context::deterministic(),
                    &mut out,
                )?;
                Array::new(out, [1, 3, 5])
            },
            error(AttnError::Broadcast {
                tensor: "bias",
                shape: vec![2, 1, 3, 5],
                target: vec![1, 3, 5],
                axis: 0,
            }),
        ),
        // ---- slices too short / too long ---------------------------------------------------
        case(
            "tensor view over a slice one element short",
            || {
                let data = [0.0f32; 23];
                TensorView::new(&data, (2usize, 3usize, 4usize))?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Length {
                tensor: "tensor view",
                shape: vec![2, 3, 4],
                expected: 24,
                found: 23,
            }),
        ),
        case(
            "tensor view over a slice one element long",
            || {
                let data = [0.0f32; 25];
                TensorView::new(&data, (2usize, 3usize, 4usize))?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Length {
                tensor: "tensor view",
                shape: vec![2, 3, 4],
                expected: 24,
                found: 25,
            }),
        ),
        case(
            "mutable tensor view over an empty slice",
            || {
                let mut data: [f64; 0] = [];
                TensorViewMut::new(&mut data, (1usize, 1usize))?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Length {
                tensor: "tensor view",
                shape: vec![1, 1],
                expected: 1,
                found: 0,
            }),
        ),
        case(
            "owned tensor from a vector of the wrong length",
            || {
                Tensor::from_vec(vec![bf16::ZERO; 7], (2usize, 4usize))?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Length {
                tensor: "tensor",
                shape: vec![2, 4],
                expected: 8,
                found: 7,
            }),
        ),
        case(
            "kernel: query slice too short",
            || {
                let (q, k) = (vec![0.5f32; 3 * 4 - 1], vec![0.25f32; 5 * 4]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::none(), 15)
            },
            error(AttnError::Length {
                tensor: "query",
                shape: vec![3, 1, 4],
                expected: 12,
                found: 11,
            }),
        ),
        case(
            "kernel: weights buffer too long",
            || {
                let (q, k) = (vec![0.5f32; 3 * 4], vec![0.25f32; 5 * 4]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::none(), 16)
            },
            error(AttnError::Length {
                tensor: "weights",
                shape: vec![1, 3, 5],
                expected: 15,
                found: 16,
            }),
        ),
        case(
            "kernel: weights buffer of the wrong dtype",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                let geom = Geometry {
                    batch_shape: &[],
                    q_len: 3,
                    kv_len: 5,
                    heads: 1usize,
                    kv_heads: 1usize,
                    qk_depth: 4usize,
                    v_depth: 0usize,
                };
                let mut out = vec![0.0f64; 15];
                kernel::attention_weights(
                    &geom,
                    &q,
                    &k,
                    None::<&Broadcast<'_, f32>>,
                    &Mask::none(),
                    &Options::default(),
                    &mut Context::deterministic(),
                    &mut out,
                )?;
                Array::new(out, [1, 3, 5])
            },
            error(AttnError::DType {
                tensor: "weights",
                expected: DType::F32,
                found: DType::F64,
            }),
        ),
        // ---- masks of the wrong element count ----------------------------------------------
        case(
            "mask array with fewer elements than its shape",
            || {
                Array::new(vec![true; 14], [1, 3, 5])?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Length {
                tensor: "array",
                shape: vec![1, 3, 5],
                expected: 15,
                found: 14,
            }),
        ),
        case(
            "kernel: explicit mask with more elements than its shape",
            || {
                let keep = vec![true; 16];
                let mask = Mask::dense(Broadcast::new("mask", &keep, &[3, 5])?);
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                kernel_weights(3, 5, 4, &q, &k, &mask, 15)
            },
            error(AttnError::Length {
                tensor: "mask",
                shape: vec![3, 5],
                expected: 15,
                found: 16,
            }),
        ),
        // ---- structured masks and grouped heads (issue 13) ---------------------------------
        case(
            "kernel: kv length beyond the keys",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::none().with_kv_lengths(&[6]), 15)
            },
            error(AttnError::InvalidArgument {
                argument: "kv_lengths",
                reason: "expected lengths in 0..=5 (the key/value length), found 6 at batch \
                         element 0"
                    .into(),
            }),
        ),
        case(
            "kernel: negative query length",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::none().with_query_lengths(&[-1]), 15)
            },
            error(AttnError::InvalidArgument {
                argument: "query_lengths",
                reason: "expected lengths in 0..=3 (the query length), found -1 at batch element 0"
                    .into(),
            }),
        ),
        case(
            "kernel: one length per batch element",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::none().with_kv_lengths(&[5, 5]), 15)
            },
            error(AttnError::InvalidArgument {
                argument: "kv_lengths",
                reason: "expected one length per batch element (1), found 2 values".into(),
            }),
        ),
        case(
            "kernel: query segment ids of the wrong length",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                let ids = SegmentIds {
                    query: &[0, 0],
                    key: &[0; 5],
                };
                kernel_weights(3, 5, 4, &q, &k, &Mask::none().with_segment_ids(ids), 15)
            },
            error(AttnError::InvalidArgument {
                argument: "query_segment_ids",
                reason: "expected 3 ids ([batch.., 3] with 1 batch elements), found 2".into(),
            }),
        ),
        case(
            "kernel: key segment ids of the wrong length",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                let ids = SegmentIds {
                    query: &[0; 3],
                    key: &[0; 6],
                };
                kernel_weights(3, 5, 4, &q, &k, &Mask::none().with_segment_ids(ids), 15)
            },
            error(AttnError::InvalidArgument {
                argument: "kv_segment_ids",
                reason: "expected 5 ids ([batch.., 5] with 1 batch elements), found 6".into(),
            }),
        ),
        case(
            // Flax gives a row with no visible key uniform weights over all keys.
            "kernel: kv length 0: uniform rows",
            || {
                let (q, k) = (vec![0.5f32; 12], vec![0.25f32; 20]);
                kernel_weights(3, 5, 4, &q, &k, &Mask::causal().with_kv_lengths(&[0]), 15)
            },
            values(DType::F32, &[1, 3, 5], vec![0.2; 15]),
        ),
        case(
            "kernel: key/value heads not dividing the query heads",
            || {
                let geom = Geometry {
                    batch_shape: &[],
                    q_len: 1,
                    kv_len: 1,
                    heads: 3usize,
                    kv_heads: 2usize,
                    qk_depth: 1usize,
                    v_depth: 0usize,
                };
                let mut out = vec![0.0f32; 3];
                kernel::attention_weights(
                    &geom,
                    &[1.0f32; 3],
                    &[1.0f32; 2],
                    None::<&Broadcast<'_, f32>>,
                    &Mask::none(),
                    &Options::default(),
                    &mut Context::deterministic(),
                    &mut out,
                )?;
                Array::new(out, [3, 1, 1])
            },
            error(AttnError::Axis {
                tensor: "key",
                axis: "heads (axis -2)".into(),
                expected: "a divisor of the query's 3 heads".into(),
                found: 2,
            }),
        ),
        // ---- empty dims and length 1 -------------------------------------------------------
        case(
            // Flax (checked by the runtime against flax 0.12.8): empty weights.
            "kv_len 0: empty weights",
            move || weights(&q(), &input(&[0, 2, 4], 2), FlaxArgs::new()),
            values(DType::F32, &[2, 3, 0], vec![]),
        ),
        case(
            // An empty sum over no keys.
            "kv_len 0: zero output",
            move || {
                dot_product_attention(
                    &q(),
                    &input(&[0, 2, 4], 2),
                    &input(&[0, 2, 3], 3),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[3, 2, 3], vec![0.0; 18]),
        ),
        case(
            "q_len 0",
            move || weights(&input(&[0, 2, 4], 1), &k(), FlaxArgs::new()),
            values(DType::F32, &[2, 0, 5], vec![]),
        ),
        case(
            "heads 0",
            || {
                weights(
                    &input(&[3, 0, 4], 1),
                    &input(&[5, 0, 4], 2),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[0, 3, 5], vec![]),
        ),
        case(
            "a batch dim of 0",
            || {
                let q = input(&[2, 0, 3, 1, 4], 1);
                let k = input(&[2, 0, 5, 1, 4], 2);
                let v = input(&[2, 0, 5, 1, 3], 3);
                dot_product_attention(&q, &k, &v, FlaxArgs::new())
            },
            values(DType::F32, &[2, 0, 3, 1, 3], vec![]),
        ),
        case(
            // Flax: the logits of an empty dot product are 0, so every row is uniform.
            "depth 0",
            || {
                weights(
                    &input(&[3, 2, 0], 1),
                    &input(&[5, 2, 0], 2),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[2, 3, 5], vec![0.2; 30]),
        ),
        case(
            "value depth 0",
            move || dot_product_attention(&q(), &k(), &input(&[5, 2, 0], 3), FlaxArgs::new()),
            values(DType::F32, &[3, 2, 0], vec![]),
        ),
        case(
            "q_len 1 and kv_len 1: the one weight is 1",
            || {
                weights(
                    &input(&[1, 1, 4], 1),
                    &input(&[1, 1, 4], 2),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[1, 1, 1], vec![1.0]),
        ),
        case(
            "kv_len 1: the output is the value row",
            || {
                let v = input(&[1, 2, 3], 3);
                let out = dot_product_attention(
                    &input(&[4, 2, 2], 1),
                    &input(&[1, 2, 2], 2),
                    &v,
                    FlaxArgs::new(),
                )?;
                // Compare with the value row repeated 4 times.
                let row = v.to_f64_vec();
                let want: Vec<f64> = (0..4).flat_map(|_| row.clone()).collect();
                assert_eq!(out.to_f64_vec(), want);
                Ok(out)
            },
            values(DType::F32, &[4, 2, 3], {
                let row = ramp(6, 3)
                    .into_iter()
                    .map(|x| x as f32 as f64)
                    .collect::<Vec<_>>();
                (0..4).flat_map(|_| row.clone()).collect()
            }),
        ),
        // ---- sizes whose product overflows usize, and allocations too large ----------------
        case(
            "array shape whose product overflows usize",
            || Array::new(Vec::<f32>::new(), [usize::MAX, 2, 0]),
            error(AttnError::Overflow {
                tensor: "array",
                shape: vec![usize::MAX, 2, 0],
            }),
        ),
        case(
            "tensor view whose shape overflows usize",
            || {
                TensorView::new(&[0.0f32; 0], (1usize << 33, 1usize << 33, 0usize))?;
                Array::new(Vec::<f32>::new(), [0])
            },
            error(AttnError::Overflow {
                tensor: "tensor view",
                shape: vec![1 << 33, 1 << 33, 0],
            }),
        ),
        case(
            "weights whose element count overflows usize (empty inputs)",
            || {
                let q = Array::new(Vec::<f32>::new(), [1 << 32, 1, 0])?;
                weights(&q, &q, FlaxArgs::new())
            },
            error(AttnError::Overflow {
                tensor: "weights",
                shape: vec![1, 1 << 32, 1 << 32],
            }),
        ),
        case(
            "kernel: batch shape whose product overflows usize",
            || {
                let geom = Geometry {
                    batch_shape: &[usize::MAX, 2],
                    q_len: 1,
                    kv_len: 1,
                    heads: 1usize,
                    kv_heads: 1usize,
                    qk_depth: 1usize,
                    v_depth: 0usize,
                };
                let mut out: Vec<f32> = vec![];
                kernel::attention_weights(
                    &geom,
                    &[0.0f32; 0],
                    &[0.0f32; 0],
                    None::<&Broadcast<'_, f32>>,
                    &Mask::none(),
                    &Options::default(),
                    &mut Context::deterministic(),
                    &mut out,
                )?;
                Array::new(out, [0])
            },
            error(AttnError::Overflow {
                tensor: "query",
                shape: vec![usize::MAX, 2],
            }),
        ),
        case(
            // 2^60 f32 weights = 2^62 bytes: try_reserve fails, the process does not abort.
            "weights of 2^62 bytes from empty inputs",
            || {
                let q = Array::new(Vec::<f32>::new(), [HUGE, 1, 0])?;
                weights(&q, &q, FlaxArgs::new())
            },
            error(AttnError::Allocation {
                tensor: "weights",
                elements: HUGE * HUGE,
            }),
        ),
        case(
            // The output is empty, but a q × kv logits matrix would need 2^62 bytes.
            "output path whose logits scratch would need 2^62 bytes",
            || {
                let q = Array::new(Vec::<f32>::new(), [HUGE, 1, 0])?;
                dot_product_attention(&q, &q, &q, FlaxArgs::new())
            },
            Expect::EmptyOrAllocation(vec![HUGE, 1, 0]),
        ),
        case(
            // Empty tensors, but 2^40 heads: per-head bookkeeping must not be allocated blindly.
            "output path over 2^40 empty heads",
            || {
                let q = Array::new(Vec::<f32>::new(), [1, 1 << 40, 0])?;
                dot_product_attention(&q, &q, &q, FlaxArgs::new())
            },
            Expect::EmptyOrAllocation(vec![1, 1 << 40, 0]),
        ),
        case(
            "weights of 2^40 empty heads (4 TiB of weights)",
            || {
                let q = Array::new(Vec::<f32>::new(), [1, 1 << 40, 0])?;
                weights(&q, &q, FlaxArgs::new())
            },
            Expect::Variant("Allocation"),
        ),
        case(
            "causal mask of 2^31 - 1 positions (2^62 mask entries)",
            || make_causal_mask(&[(1 << 31) - 1], 0, DType::Bool),
            error(AttnError::Allocation {
                tensor: "mask",
                elements: ((1 << 31) - 1) * ((1 << 31) - 1),
            }),
        ),
        case(
            "causal mask of shape [2^40, 1] (one 2^40-element mask)",
            || make_causal_mask(&[1 << 40, 1], 0, DType::Bool),
            error(AttnError::Allocation {
                tensor: "mask",
                elements: 1 << 40,
            }),
        ),
        case(
            "causal mask with usize::MAX extra batch dims",
            || make_causal_mask(&[4], usize::MAX, DType::F32),
            error(AttnError::InvalidArgument {
                argument: "extra_batch_dims",
                reason: format!(
                    "the mask would have {} dims; at most 64 are supported (as in NumPy)",
                    usize::MAX
                ),
            }),
        ),
        // ---- NaN and infinity in query, key, value and bias --------------------------------
        case(
            "NaN in query: that query row is NaN in every head it touches",
            || {
                weights(
                    &input_with(&[3, 1, 4], 1, &[(4, f64::NAN)]),
                    &input(&[5, 1, 4], 2),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[1, 3, 5], {
                reference_weights(
                    &input_with(&[3, 1, 4], 1, &[(4, f64::NAN)]),
                    &input(&[5, 1, 4], 2),
                    None,
                    None,
                )
            }),
        ),
        case(
            "NaN in key: every row is NaN (the max of each row is NaN)",
            || {
                weights(
                    &input(&[3, 1, 4], 1),
                    &input_with(&[5, 1, 4], 2, &[(9, f64::NAN)]),
                    FlaxArgs::new(),
                )
            },
            values(DType::F32, &[1, 3, 5], vec![f64::NAN; 15]),
        ),
        case(
            "+inf in query: logits ±inf or NaN, the row is NaN",
            || {
                let q = input_with(&[2, 1, 2], 1, &[(0, f64::INFINITY)]);
                let k = f32_array(&[3, 1, 2], &[1.0, 0.5, -2.0, 0.25, 0.0, 1.0]);
                weights(&q, &k, FlaxArgs::new())
            },
            values(DType::F32, &[1, 2, 3], {
                let q = input_with(&[2, 1, 2], 1, &[(0, f64::INFINITY)]);
                let k = f32_array(&[3, 1, 2], &[1.0, 0.5, -2.0, 0.25, 0.0, 1.0]);
                reference_weights(&q, &k, None, None)
            }),
        ),
        case(
            "-inf in key: key j gets weight 0 where its logit is -inf",
            || {
                let q = f32_array(&[2, 1, 2], &[1.0, 0.5, 2.0, 0.25]);
                let k = f32_array(&[3, 1, 2], &[f64::NEG_INFINITY, 0.0, 0.5, 1.0, -1.0, 0.5]);
                weights(&q, &k, FlaxArgs::new())
            },
            values(DType::F32, &[1, 2, 3], {
                let q = f32_array(&[2, 1, 2], &[1.0, 0.5, 2.0, 0.25]);
                let k = f32_array(&[3, 1, 2], &[f64::NEG_INFINITY, 0.0, 0.5, 1.0, -1.0, 0.5]);
                reference_weights(&q, &k, None, None)
            }),
        ),
        case(
            "NaN in value: that depth component of every output row is NaN",
            move || {
                let v = input_with(&[5, 2, 3], 3, &[(3 * 2 + 4, f64::NAN)]);
                dot_product_attention(&q(), &k(), &v, FlaxArgs::new())
            },
            values(DType::F32, &[3, 2, 3], {
                let w = reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), None, None);
                reference_output(&w, &input_with(&[5, 2, 3], 3, &[(3 * 2 + 4, f64::NAN)]), 3)
            }),
        ),
        case(
            "+inf in value: that component is +inf (positive weights)",
            move || {
                let v = input_with(&[5, 2, 3], 3, &[(0, f64::INFINITY)]);
                dot_product_attention(&q(), &k(), &v, FlaxArgs::new())
            },
            values(DType::F32, &[3, 2, 3], {
                let w = reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), None, None);
                reference_output(&w, &input_with(&[5, 2, 3], 3, &[(0, f64::INFINITY)]), 3)
            }),
        ),
        case(
            "NaN in bias: that row is NaN",
            move || {
                let bias = input_with(&w_shape, 4, &[(7, f64::NAN)]);
                weights(&q(), &k(), FlaxArgs::new().bias(&bias))
            },
            values(DType::F32, &w_shape, {
                let b = input_with(&w_shape, 4, &[(7, f64::NAN)]).to_f64_vec();
                reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), Some(&b), None)
            }),
        ),
        case(
            "-inf bias on a whole row (no mask): that row is NaN, as in Flax",
            move || {
                let bias = input_with(
                    &w_shape,
                    4,
                    &(5..10).map(|j| (j, f64::NEG_INFINITY)).collect::<Vec<_>>(),
                );
                weights(&q(), &k(), FlaxArgs::new().bias(&bias))
            },
            values(DType::F32, &w_shape, {
                let b = input_with(
                    &w_shape,
                    4,
                    &(5..10).map(|j| (j, f64::NEG_INFINITY)).collect::<Vec<_>>(),
                )
                .to_f64_vec();
                reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), Some(&b), None)
            }),
        ),
        case(
            "+inf bias on one entry: inf - inf makes the row NaN",
            move || {
                let bias = input_with(&w_shape, 4, &[(0, f64::INFINITY)]);
                weights(&q(), &k(), FlaxArgs::new().bias(&bias))
            },
            values(DType::F32, &w_shape, {
                let b = input_with(&w_shape, 4, &[(0, f64::INFINITY)]).to_f64_vec();
                reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), Some(&b), None)
            }),
        ),
        case(
            "NaN bias under a mask: the masked NaN is replaced, the row is finite",
            move || {
                let bias = input_with(&w_shape, 4, &[(7, f64::NAN)]);
                let keep: Vec<bool> = (0..30).map(|i| i != 7).collect();
                let mask = Array::new(keep, w_shape)?;
                weights(&q(), &k(), FlaxArgs::new().bias(&bias).mask(&mask))
            },
            values(DType::F32, &w_shape, {
                let b = input_with(&w_shape, 4, &[(7, f64::NAN)]).to_f64_vec();
                let keep: Vec<bool> = (0..30).map(|i| i != 7).collect();
                reference_weights(
                    &input(&[3, 2, 4], 1),
                    &input(&[5, 2, 4], 2),
                    Some(&b),
                    Some(&keep),
                )
            }),
        ),
        case(
            "f16 logits that overflow to +inf: the row is NaN, as in Flax",
            || {
                let q = Array::from_f64(DType::F16, &[300.0, 300.0, 1.0, 1.0], [2, 1, 2])?;
                let k = Array::from_f64(DType::F16, &[300.0, 300.0, 0.5, 0.5], [2, 1, 2])?;
                weights(&q, &k, FlaxArgs::new())
            },
            // Row 0: q·k / sqrt(2) = 127279 > 65504 rounds to inf in f16; inf - inf = NaN.
            // Row 1: logits (600, 1) / sqrt(2): one-hot in f16.
            values(DType::F16, &[1, 2, 2], vec![f64::NAN, f64::NAN, 1.0, 0.0]),
        ),
        case(
            // Flax casts the logits to float32 for the softmax: finfo(float64).min becomes
            // -inf and a fully masked row is NaN, on the weights and the output alike.
            "f64 with force_fp32_for_softmax: a fully masked row gives a NaN output row",
            || {
                let q = Array::from_f64(DType::F64, &[0.5, -1.0], [2, 1, 1])?;
                let k = Array::from_f64(DType::F64, &[2.0, 0.25], [2, 1, 1])?;
                let v = Array::from_f64(DType::F64, &[0.75, -3.0], [2, 1, 1])?;
                let mask = Array::new(vec![true, false, false, false], [1, 2, 2])?;
                let args = FlaxArgs::new().mask(&mask).force_fp32_for_softmax(true);
                dot_product_attention(&q, &k, &v, args)
            },
            values(DType::F64, &[2, 1, 1], vec![0.75, f64::NAN]),
        ),
        // ---- dropout rates -----------------------------------------------------------------
        case(
            "dropout_rate -0.1",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new()
                        .dropout_rate(-0.1)
                        .dropout_rng(DropoutRng::new(1)),
                )
            },
            error(AttnError::DropoutRate { rate: -0.1 }),
        ),
        case(
            "dropout_rate 1.5",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new()
                        .dropout_rate(1.5)
                        .dropout_rng(DropoutRng::new(1)),
                )
            },
            error(AttnError::DropoutRate { rate: 1.5 }),
        ),
        case(
            "dropout_rate NaN",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new()
                        .dropout_rate(f64::NAN)
                        .dropout_rng(DropoutRng::new(1)),
                )
            },
            error(AttnError::DropoutRate { rate: f64::NAN }),
        ),
        case(
            "dropout_rate +inf, even when deterministic",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new()
                        .dropout_rate(f64::INFINITY)
                        .deterministic(true),
                )
            },
            error(AttnError::DropoutRate {
                rate: f64::INFINITY,
            }),
        ),
        case(
            // Flax computes 0/0 here and returns NaN weights; attn drops everything (docs/numerics.md).
            "dropout_rate 1.0: every weight dropped, zeros",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new()
                        .dropout_rate(1.0)
                        .dropout_rng(DropoutRng::new(1)),
                )
            },
            values(DType::F32, &w_shape, vec![0.0; 30]),
        ),
        case(
            "dropout_rate 1.0 with value: zero output",
            move || {
                dot_product_attention(
                    &q(),
                    &k(),
                    &v(),
                    FlaxArgs::new()
                        .dropout_rate(1.0)
                        .dropout_rng(DropoutRng::new(9)),
                )
            },
            values(DType::F32, &[3, 2, 3], vec![0.0; 18]),
        ),
        case(
            "dropout active without an rng",
            move || weights(&q(), &k(), FlaxArgs::new().dropout_rate(0.5)),
            error(AttnError::MissingDropoutRng { rate: 0.5 }),
        ),
        case(
            "dropout_rate 0.5 but deterministic: no dropout, no rng needed",
            move || {
                weights(
                    &q(),
                    &k(),
                    FlaxArgs::new().dropout_rate(0.5).deterministic(true),
                )
            },
            values(
                DType::F32,
                &w_shape,
                reference_weights(&input(&[3, 2, 4], 1), &input(&[5, 2, 4], 2), None, None),
            ),
        ),
        // ---- other arguments ---------------------------------------------------------------
        case(
            "dtype argument int32",
            move || weights(&q(), &k(), FlaxArgs::new().dtype(DType::I32)),
            error(AttnError::InvalidArgument {
                argument: "dtype",
                reason: "must be a float dtype, found int32".into(),
            }),
        ),
        case(
            "bool query and key compute in float32",
            || {
                let q = Array::new(vec![true, false, true, true], [2, 1, 2])?;
                let k = Array::new(vec![true, true, false, false], [2, 1, 2])?;
                weights(&q, &k, FlaxArgs::new())
            },
            values(DType::F32, &[1, 2, 2], {
                let q = f32_array(&[2, 1, 2], &[1.0, 0.0, 1.0, 1.0]);
                let k = f32_array(&[2, 1, 2], &[1.0, 1.0, 0.0, 0.0]);
                reference_weights(&q, &k, None, None)
            }),
        ),
        case(
            "combine_masks of different ranks",
            || {
                let a = Array::new(vec![true; 4], [2, 2])?;
                let b = Array::new(vec![true; 4], [1, 2, 2])?;
                Ok(combine_masks(&[Some(&a), None, Some(&b)], DType::Bool)?.expect("a mask"))
            },
            error(AttnError::MaskRanks {
                shapes: vec![vec![2, 2], vec![1, 2, 2]],
            }),
        ),
        case(
            "make_causal_mask of a scalar shape",
            || make_causal_mask(&[], 0, DType::F32),
            error(AttnError::Rank {
                tensor: "x",
                expected: "at least 1: [batch..., length]".into(),
                found: vec![],
            }),
        ),
        case(
            "make_attention_mask with batch dims that do not broadcast",
            || {
                let a = Array::new(vec![1i32; 6], [2, 3])?;
                let b = Array::new(vec![1i32; 12], [3, 4])?;
                make_attention_mask(&a, &b, attn::PairwiseFn::GreaterEqual, 0, DType::F32)
            },
            error(AttnError::Broadcast {
                tensor: "key_input",
                shape: vec![3, 4],
                target: vec![2, 3],
                axis: 0,
            }),
        ),
        case(
            "fully masked rows are uniform (1/kv), as in Flax",
            move || {
                let mask = Array::new(vec![false; 30], w_shape)?;
                weights(&q(), &k(), FlaxArgs::new().mask(&mask))
            },
            values(DType::F32, &w_shape, vec![0.2; 30]),
        ),
        case(
            "bf16 query with an f64 bias: logits and softmax in f64, weights bf16",
            || {
                let q = Array::from_f64(DType::BF16, &[0.5, -0.25, 1.0, 0.75], [2, 1, 2])?;
                let k = Array::from_f64(DType::BF16, &[1.0, 0.5, -0.5, 0.25], [2, 1, 2])?;
                let bias = Array::from_f64(DType::F64, &[1e300, 0.0], [1, 1, 2])?;
                weights(&q, &k, FlaxArgs::new().bias(&bias))
            },
            // A bias of 1e300 makes key 0 win every row.
            values(DType::BF16, &[1, 2, 2], vec![1.0, 0.0, 1.0, 0.0]),
        ),
        case(
            "f16 query with mask: masked entries get finfo(f16).min",
            || {
                let q = Array::new(vec![f16::from_f32(1.0); 4], [2, 1, 2])?;
                let k = Array::new(vec![f16::from_f32(1.0); 6], [3, 1, 2])?;
                let mask = Array::new(vec![true, false, false, false, false, false], [1, 2, 3])?;
                weights(&q, &k, FlaxArgs::new().mask(&mask))
            },
            // Row 0 keeps key 0 only; row 1 is fully masked: uniform 1/3 rounded to f16.
            values(DType::F16, &[1, 2, 3], {
                let third = f16::from_f64(1.0 / 3.0).to_f64();
                vec![1.0, 0.0, 0.0, third, third, third]
            }),
        ),
    ]
}

fn close(actual: f64, expected: f64) -> bool {
    if expected.is_nan() {
        return actual.is_nan();
    }
    if expected.is_infinite() {
        return actual == expected;
    }
    (actual - expected).abs() <= 1e-6 * (1.0 + expected.abs())
}

/// Tolerance per dtype: the reference is f64, the result rounds once or a few times.
fn close_in(dtype: DType, actual: f64, expected: f64) -> bool {
    let rel = match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-6,
        _ => 1e-2,
    };
    if expected.is_nan() || expected.is_infinite() {
        return close(actual, expected);
    }
    (actual - expected).abs() <= rel * (1.0 + expected.abs())
}

#[test]
fn hostile_inputs_give_the_documented_error_or_flax_result() {
    let cases = cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be distinct");
    assert!(cases.len() >= 30, "only {} cases", cases.len());

    let mut failures = Vec::new();
    for case in &cases {
        let outcome = match catch_unwind(AssertUnwindSafe(|| (case.run)())) {
            Ok(outcome) => outcome,
            Err(_) => {
                failures.push(format!("{}: PANICKED", case.name));
                continue;
            }
        };
        match (&case.expect, outcome) {
            (Expect::Error(want), Err(got)) => {
                if format!("{want:?}") != format!("{got:?}") {
                    failures.push(format!("{}: error {got:?}, expected {want:?}", case.name));
                }
                // Every error prints a message (Display never panics and is not empty).
                assert!(!got.to_string().is_empty());
            }
            (Expect::Variant(want), Err(got)) => {
                let debug = format!("{got:?}");
                if !debug.starts_with(&format!("{want} ")) {
                    failures.push(format!("{}: error {debug}, expected {want}", case.name));
                }
            }
            (Expect::EmptyOrAllocation(_), Err(got)) => {
                if !matches!(got, AttnError::Allocation { .. }) {
                    failures.push(format!("{}: error {got:?}, expected Allocation", case.name));
                }
            }
            (Expect::EmptyOrAllocation(shape), Ok(a)) => {
                if a.shape() != shape.as_slice() || !a.is_empty() {
                    failures.push(format!(
                        "{}: returned shape {:?}, expected the empty {shape:?}",
                        case.name,
                        a.shape()
                    ));
                }
            }
            (Expect::Variant(want), Ok(a)) => failures.push(format!(
                "{}: returned {:?} {:?}, expected an {want} error",
                case.name,
                a.dtype(),
                a.shape()
            )),
            (Expect::Error(want), Ok(a)) => failures.push(format!(
                "{}: returned {:?} {:?}, expected error {want:?}",
                case.name,
                a.dtype(),
                a.shape()
            )),
            (Expect::Values { .. }, Err(got)) => {
                failures.push(format!("{}: unexpected error {got:?} ({got})", case.name))
            }
            (
                Expect::Values {
                    dtype,
                    shape,
                    values,
                },
                Ok(a),
            ) => {
                if a.dtype() != *dtype || a.shape() != shape.as_slice() {
                    failures.push(format!(
                        "{}: got {:?} {:?}, expected {dtype:?} {shape:?}",
                        case.name,
                        a.dtype(),
                        a.shape()
                    ));
                    continue;
                }
                let got = a.to_f64_vec();
                let bad: Vec<String> = got
                    .iter()
                    .zip(values)
                    .enumerate()
                    .filter(|(_, (g, w))| !close_in(*dtype, **g, **w))
                    .map(|(i, (g, w))| format!("[{i}] {g} vs {w}"))
                    .take(5)
                    .collect();
                if got.len() != values.len() || !bad.is_empty() {
                    failures.push(format!("{}: values differ: {bad:?}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
