//! Bad inputs give errors that name the tensor, axis, expectation and finding; empty dims and
//! enlarging masks behave as Flax does; the typed kernel layer works with static dims.

use attn_runtime::kernel::{self, Broadcast, Geometry, Mask, Options};
use attn_runtime::{
    Array, AttnError, Const, Context, DType, DropoutRng, FlaxArgs, Intermediates, combine_masks,
    dot_product_attention, dot_product_attention_weights, make_causal_mask,
};

fn arr(shape: &[usize]) -> Array {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.4)
        .collect();
    Array::from_f64(DType::F32, &data, shape.to_vec()).unwrap()
}

fn err_text(r: Result<Array, AttnError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn shape_errors_name_tensor_axis_expected_found() {
    let q = arr(&[2, 4, 3, 8]);
    let e = err_text(dot_product_attention_weights(
        &arr(&[4, 8]),
        &arr(&[4, 8]),
        FlaxArgs::new(),
    ));
    assert!(
        e.contains("`query`") && e.contains("rank at least 3") && e.contains("[4, 8]"),
        "{e}"
    );
    let e = err_text(dot_product_attention_weights(
        &q,
        &arr(&[5, 3, 8]),
        FlaxArgs::new(),
    ));
    assert!(e.contains("`key` must have rank 4"), "{e}");
    let e = err_text(dot_product_attention_weights(
        &q,
        &arr(&[2, 5, 2, 8]),
        FlaxArgs::new(),
    ));
    assert_eq!(
        e,
        "`key` axis heads (axis -2): expected 3, as in query, or a divisor of it (grouped-query \
         attention), found 2"
    );
    let e = err_text(dot_product_attention_weights(
        &q,
        &arr(&[2, 5, 3, 7]),
        FlaxArgs::new(),
    ));
    assert_eq!(
        e,
        "`key` axis depth (axis -1): expected 8, the depth of query, found 7"
    );
    let e = err_text(dot_product_attention_weights(
        &q,
        &arr(&[3, 5, 3, 8]),
        FlaxArgs::new(),
    ));
    assert_eq!(e, "`key` axis batch 0: expected 2, as in query, found 3");
    let k = arr(&[2, 5, 3, 8]);
    let e = err_text(dot_product_attention(
        &q,
        &k,
        &arr(&[2, 6, 3, 8]),
        FlaxArgs::new(),
    ));
    assert_eq!(
        e,
        "`value` axis kv_len (axis -3): expected 5, the length of key, found 6"
    );
    let bias = arr(&[3, 4, 4]);
    let e = err_text(dot_product_attention_weights(
        &q,
        &k,
        FlaxArgs::new().bias(&bias),
    ));
    assert!(
        e.starts_with("`bias` of shape [3, 4, 4] does not broadcast"),
        "{e}"
    );
    assert!(e.contains("axis 2 has size 4, expected 1 or 5"), "{e}");
    let mask = Array::new(vec![true; 6], [6]).unwrap();
    let e = err_text(dot_product_attention_weights(
        &q,
        &k,
        FlaxArgs::new().mask(&mask),
    ));
    assert!(e.starts_with("`mask` of shape [6]"), "{e}");
}

#[test]
fn dropout_arguments_are_checked() {
    let (q, k) = (arr(&[4, 2, 8]), arr(&[5, 2, 8]));
    for rate in [-0.1, 1.5, f64::NAN] {
        let e = err_text(dot_product_attention_weights(
            &q,
            &k,
            FlaxArgs::new().dropout_rate(rate),
        ));
        assert!(e.contains("`dropout_rate` must be in [0, 1]"), "{e}");
    }
    let e = err_text(dot_product_attention_weights(
        &q,
        &k,
        FlaxArgs::new().dropout_rate(0.1),
    ));
    assert!(e.contains("`dropout_rng` is required"), "{e}");
    // deterministic or rate 0: no rng needed.
    assert!(
        dot_product_attention_weights(
            &q,
            &k,
            FlaxArgs::new().dropout_rate(0.1).deterministic(true)
        )
        .is_ok()
    );
}

#[test]
fn kernel_checks_slices_dtypes_and_overflow() {
    let geom = Geometry {
        batch_shape: &[2],
        q_len: 3,
        kv_len: 4,
        heads: Const::<2>,
        kv_heads: Const::<2>,
        qk_depth: 5usize,
        v_depth: Const::<1>,
    };
    let q = vec![0.5f32; 2 * 3 * 2 * 5];
    let k = vec![0.25f32; 2 * 4 * 2 * 5];
    let mut out = vec![0.0f32; 2 * 2 * 3 * 4];
    let mut ctx = Context::deterministic();
    let none = None::<&Broadcast<'_, f32>>;
    let opts = Options::default();
    kernel::attention_weights(
        &geom,
        &q,
        &k,
        none,
        &Mask::causal(),
        &opts,
        &mut ctx,
        &mut out,
    )
    .unwrap();
    // Causal, constant logits: row i is uniform over the first i + 1 keys.
    assert_eq!(&out[..4], &[1.0, 0.0, 0.0, 0.0]);
    assert_eq!(&out[4..8], &[0.5, 0.5, 0.0, 0.0]);
    let e = kernel::attention_weights(
        &geom,
        &q[1..],
        &k,
        none,
        &Mask::none(),
        &opts,
        &mut ctx,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`query` of shape [2, 3, 2, 5] needs 60 elements, but the slice has 59"
    );
    let mut short = vec![0.0f32; 47];
    let e = kernel::attention_weights(
        &geom,
        &q,
        &k,
        none,
        &Mask::none(),
        &opts,
        &mut ctx,
        &mut short,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("`weights` of shape [2, 2, 3, 4] needs 48"),
        "{e}"
    );
    let mut wrong = vec![0.0f64; 48];
    let e = kernel::attention_weights(
        &geom,
        &q,
        &k,
        none,
        &Mask::none(),
        &opts,
        &mut ctx,
        &mut wrong,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`weights` must have dtype float32, found float64"
    );
    let huge = Geometry {
        batch_shape: &[usize::MAX, 2],
        ..geom
    };
    let e = kernel::attention_weights(
        &huge,
        &q,
        &k,
        none,
        &Mask::none(),
        &opts,
        &mut ctx,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, AttnError::Overflow { .. }), "{e}");
    let data = [true; 3];
    let e = Broadcast::new("mask", &data, &[2, 2]).unwrap_err();
    assert!(e.to_string().contains("needs 4 elements"), "{e}");
}

#[test]
fn empty_dims_behave_like_flax() {
    // kv_len 0: empty weights; the output is an empty sum, 0 (flax 0.12.8 observed).
    let w =
        dot_product_attention_weights(&arr(&[2, 3, 4]), &arr(&[0, 3, 4]), FlaxArgs::new()).unwrap();
    assert_eq!(w.shape(), &[3, 2, 0]);
    let o = dot_product_attention(
        &arr(&[2, 3, 4]),
        &arr(&[0, 3, 4]),
        &arr(&[0, 3, 5]),
        FlaxArgs::new(),
    )
    .unwrap();
    assert_eq!(o.shape(), &[2, 3, 5]);
    assert!(o.to_f64_vec().iter().all(|&x| x == 0.0));
    // q_len 0, heads 0, batch 0: empty results.
    let o = dot_product_attention(
        &arr(&[0, 3, 4]),
        &arr(&[2, 3, 4]),
        &arr(&[2, 3, 5]),
        FlaxArgs::new(),
    )
    .unwrap();
    assert_eq!(o.shape(), &[0, 3, 5]);
    let o = dot_product_attention(
        &arr(&[0, 2, 1, 4]),
        &arr(&[0, 3, 1, 4]),
        &arr(&[0, 3, 1, 5]),
        FlaxArgs::new(),
    )
    .unwrap();
    assert_eq!(o.shape(), &[0, 2, 1, 5]);
    let w =
        dot_product_attention_weights(&arr(&[2, 0, 4]), &arr(&[3, 0, 4]), FlaxArgs::new()).unwrap();
    assert_eq!(w.shape(), &[0, 2, 3]);
    // depth 0: all logits are 0, so the output is the mean of the value rows.
    let v = Array::new(vec![1.0f32, 2.0, 3.0, 5.0], [2, 1, 2]).unwrap();
    let o = dot_product_attention(&arr(&[3, 1, 0]), &arr(&[2, 1, 0]), &v, FlaxArgs::new()).unwrap();
    assert_eq!(o.to_f64_vec(), vec![2.0, 3.5, 2.0, 3.5, 2.0, 3.5]);
}

#[test]
fn higher_rank_mask_or_bias_enlarges_the_result() {
    // FLAX_SEMANTICS §1 step 7: mask [7, h, q, k] with unbatched query -> weights [7, h, q, k].
    let (q, k, v) = (arr(&[3, 2, 4]), arr(&[5, 2, 4]), arr(&[5, 2, 6]));
    let keep: Vec<bool> = (0..7 * 2 * 3 * 5).map(|i| i % 4 != 1).collect();
    let mask = Array::new(keep.clone(), [7, 2, 3, 5]).unwrap();
    let w = dot_product_attention_weights(&q, &k, FlaxArgs::new().mask(&mask)).unwrap();
    assert_eq!(w.shape(), &[7, 2, 3, 5]);
    let o = dot_product_attention(&q, &k, &v, FlaxArgs::new().mask(&mask)).unwrap();
    assert_eq!(o.shape(), &[7, 3, 2, 6]);
    // Each batch element equals the unbatched call with that slice of the mask.
    for b in [0, 4] {
        let slice = Array::new(keep[b * 30..(b + 1) * 30].to_vec(), [2, 3, 5]).unwrap();
        let wb = dot_product_attention_weights(&q, &k, FlaxArgs::new().mask(&slice)).unwrap();
        assert_eq!(
            &w.to_f64_vec()[b * 30..(b + 1) * 30],
            wb.to_f64_vec().as_slice()
        );
        let ob = dot_product_attention(&q, &k, &v, FlaxArgs::new().mask(&slice)).unwrap();
        assert_eq!(
            &o.to_f64_vec()[b * 36..(b + 1) * 36],
            ob.to_f64_vec().as_slice()
        );
    }
    // Shapes observed with flax 0.12.8: heads, q and kv enlarged by a mask.
    let ones = |s: &[usize]| Array::new(vec![true; s.iter().product()], s.to_vec()).unwrap();
    let o = dot_product_attention(
        &arr(&[2, 1, 4]),
        &arr(&[5, 1, 4]),
        &arr(&[5, 1, 3]),
        FlaxArgs::new().mask(&ones(&[3, 2, 5])),
    )
    .unwrap();
    assert_eq!(o.shape(), &[2, 3, 3]);
    let o = dot_product_attention(
        &arr(&[1, 2, 4]),
        &arr(&[5, 2, 4]),
        &arr(&[5, 2, 3]),
        FlaxArgs::new().mask(&ones(&[2, 6, 5])),
    )
    .unwrap();
    assert_eq!(o.shape(), &[6, 2, 3]);
    let w = dot_product_attention_weights(
        &arr(&[3, 2, 4]),
        &arr(&[1, 2, 4]),
        FlaxArgs::new().mask(&ones(&[2, 3, 5])),
    )
    .unwrap();
    assert_eq!(w.shape(), &[2, 3, 5]);
    assert!(w.to_f64_vec().iter().all(|&x| (x - 0.2).abs() < 1e-7));
}

#[test]
fn sow_gets_pre_dropout_weights_in_the_softmax_dtype() {
    let q = Array::from_f64(DType::BF16, &arr(&[2, 4, 2, 8]).to_f64_vec(), [2, 4, 2, 8]).unwrap();
    let k = Array::from_f64(DType::BF16, &arr(&[2, 5, 2, 8]).to_f64_vec(), [2, 5, 2, 8]).unwrap();
    let v = Array::from_f64(DType::BF16, &arr(&[2, 5, 2, 3]).to_f64_vec(), [2, 5, 2, 3]).unwrap();
    let mut sink = Intermediates::new();
    let args = FlaxArgs::new()
        .force_fp32_for_softmax(true)
        .dropout_rate(0.5)
        .dropout_rng(DropoutRng::new(3))
        .module(&mut sink);
    let o = dot_product_attention(&q, &k, &v, args).unwrap();
    assert_eq!(o.dtype(), DType::F32);
    let sown = sink.attention_weights();
    assert_eq!(sown.len(), 1);
    assert_eq!(sown[0].dtype(), DType::F32);
    let plain = dot_product_attention_weights(&q, &k, FlaxArgs::new().force_fp32_for_softmax(true))
        .unwrap();
    assert_eq!(
        sown[0], plain,
        "sown weights are the weights before dropout"
    );
}

#[test]
fn mask_helper_errors() {
    let a = Array::new(vec![true; 4], [1, 4]).unwrap();
    let b = Array::new(vec![true; 4], [4]).unwrap();
    let e = combine_masks(&[Some(&a), None, Some(&b)], DType::F32).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`combine_masks`: masks must have the same rank, found shapes [1, 4], [4]"
    );
    assert!(combine_masks(&[None, None], DType::F32).unwrap().is_none());
    assert!(make_causal_mask(&[], 0, DType::F32).is_err());
    let m = make_causal_mask(&[2, 3], 1, DType::Bool).unwrap();
    assert_eq!(m.shape(), &[1, 2, 1, 3, 3]);
}

/// The weights path computes only the causally visible logits of each query block; the rest
/// must still be exact: 0, or — in a row whose visible keys an explicit mask hides — Flax's
/// uniform `1/kv` over all keys, the causally masked ones included (every logit is `big_neg`).
fn causal_and_fully_masked_row<E: attn_runtime::Element>(eps: f64) {
    let (q_len, kv_len) = (5, 7);
    let geom = Geometry {
        batch_shape: &[],
        q_len,
        kv_len,
        heads: 1usize,
        kv_heads: 1usize,
        qk_depth: 2usize,
        v_depth: 2usize,
    };
    let q: Vec<E> = (0..q_len * 2)
        .map(|i| E::from_f32(i as f32 * 0.3 - 1.0))
        .collect();
    let k: Vec<E> = (0..kv_len * 2)
        .map(|i| E::from_f32(0.7 - i as f32 * 0.2))
        .collect();
    // Row 2 hides its visible keys 0..=2 (and keeps keys 3.., which the causal rule hides).
    let mut keep = vec![true; q_len * kv_len];
    for j in 0..kv_len {
        keep[2 * kv_len + j] = j > 2;
    }
    let mask = Mask::causal().with_dense(Broadcast::new("mask", &keep, &[q_len, kv_len]).unwrap());
    // Every weight must be written, whatever the buffer held.
    let mut out = vec![E::from_f32(f32::NAN); q_len * kv_len];
    let mut ctx = Context::deterministic();
    kernel::attention_weights(
        &geom,
        &q,
        &k,
        None::<&Broadcast<'_, E>>,
        &mask,
        &Options::default(),
        &mut ctx,
        &mut out,
    )
    .unwrap();
    let w: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    for (i, row) in w.chunks(kv_len).enumerate() {
        if i == 2 {
            for &x in row {
                assert!((x - 1.0 / kv_len as f64).abs() <= eps, "row {i}: {row:?}");
            }
            continue;
        }
        assert!(row[i + 1..].iter().all(|&x| x == 0.0), "row {i}: {row:?}");
        assert!(row[..=i].iter().all(|&x| x > 0.0), "row {i}: {row:?}");
        assert!(
            (row.iter().sum::<f64>() - 1.0).abs() <= eps * 8.0,
            "{row:?}"
        );
    }
}

#[test]
fn causal_rows_skip_hidden_logits_exactly() {
    causal_and_fully_masked_row::<f32>(1e-7);
    causal_and_fully_masked_row::<f64>(1e-15);
    causal_and_fully_masked_row::<attn_runtime::half::bf16>(4e-3);
}
