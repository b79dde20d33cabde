//! Projection layers declared with `attention!` (`inputs_q`, `heads`, ..), loaded from the
//! checkpoints of `../shared/conformance/mha/` (or `$ATTN_MHA_CONFORMANCE_DIR`), against the
//! outputs Flax stored in each case file, under the case's tolerances.

// The verdict of a case set, shared by the runners below.
#[path = "support/mha.rs"]
mod mha;
#[path = "support/tally.rs"]
mod tally;

use attn::layer::LayerElement;
use attn::{Array, Const, Context, Element, Intermediates, Shape, Tensor, TensorView, attention};

attention! {
    /// `f32_mask_causal`: the case's `make_causal_mask` written as `mask: causal`.
    struct MaskCausal {
        inputs_q: [B, T, E = 16],
        heads: 4,
        mask: causal,
    }

    /// `f32_cross_kv_feature_sizes`: inputs of 32, 24 and 16 features.
    struct CrossFeatureSizes {
        inputs_q: [B, T, 32],
        inputs_k: [B, S, 24],
        inputs_v: [B, S, 16],
        heads: 4,
    }

    /// `f32_e96_qkv16_out8`.
    struct QkvOut {
        inputs_q: [B, T, E = 96],
        heads: 2,
        qkv_features: 16,
        out_features: 8,
    }

    /// `f32_mask_padding_cross`: a mask tensor, and the sown weights.
    struct PaddingCross {
        inputs_q: [B, T, E = 16],
        inputs_k: [B, S, E],
        heads: 2,
        mask: [B, 1, T, S],
        sow: attention_weights,
    }

    /// `f32_normalize_qk_nobias_cross`.
    struct NormalizeNoBias {
        inputs_q: [B, T, E = 16],
        inputs_k: [B, S, E],
        inputs_v: [B, S, E],
        heads: 4,
        use_bias: false,
        normalize_qk: true,
    }

    /// `bf16_self_dtype`: computes in bf16 (Flax casts the f32 inputs to bf16 first).
    struct Bf16Self {
        inputs_q: [B, T, E = 32],
        heads: 4,
        dtype: bf16,
    }

    /// `f64_self`: f64 parameters and inputs, `dtype` left to Flax's promotion.
    struct F64Self {
        inputs_q: [B, T, E = 32],
        heads: 4,
        param_dtype: f64,
    }

    /// `f32_self_nobatch_e16_h2`: no batch dims.
    struct NoBatch {
        inputs_q: [T, E = 16],
        heads: 2,
    }

    /// `dec_f32_prefill`: the cache of `max_length = 10`.
    struct Decoder {
        inputs_q: [B, T, E = 32],
        heads: 2,
        cache: 10,
    }
}

fn case(name: &str) -> (mha::Case, std::path::PathBuf) {
    let dir = mha::default_dir();
    let case = mha::load(&dir.join(format!("{name}.json"))).expect("the case file");
    (case, dir)
}

fn checkpoint(dir: &std::path::Path, case: &mha::Case) -> Vec<u8> {
    std::fs::read(dir.join(case.checkpoint_files().0)).expect("the msgpack checkpoint")
}

/// The case's input `name` as elements of `T` (converted from the stored dtype).
fn data<T: LayerElement>(case: &mha::Case, name: &str) -> Vec<T> {
    let array = case.input(name).expect("input").expect("present");
    let array = array.astype(T::DTYPE);
    array.as_slice::<T>().expect("converted").to_vec()
}

fn shape_of(case: &mha::Case, name: &str) -> Vec<usize> {
    case.input(name)
        .expect("input")
        .expect("present")
        .shape()
        .to_vec()
}

fn to_array<T: LayerElement + Element, S: Shape>(tensor: Tensor<T, S>) -> Array {
    let dims = tensor.shape().dims();
    Array::new(tensor.into_vec(), dims).expect("a tensor's data matches its shape")
}

fn assert_matches(case: &mha::Case, name: &str, actual: &Array) {
    let check = case.check(name, actual);
    assert!(check.passed(), "{}: {name}: {check:?}", case.name());
}

#[test]
fn causal_self_attention_matches_flax() {
    let (case, dir) = case("f32_mask_causal");
    let layer = MaskCausal::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let s = shape_of(&case, "inputs_q");
    let x = data::<f32>(&case, "inputs_q");
    let y = layer
        .forward(
            TensorView::new(&x, (s[0], s[1], Const::<16>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
}

#[test]
fn cross_attention_with_three_feature_sizes_matches_flax_from_both_formats() {
    let (case, dir) = case("f32_cross_kv_feature_sizes");
    let (msgpack, safetensors) = case.checkpoint_files();
    let from_msgpack =
        CrossFeatureSizes::from_msgpack(&std::fs::read(dir.join(msgpack)).unwrap(), "params")
            .unwrap();
    let from_safetensors = CrossFeatureSizes::from_safetensors(
        &std::fs::read(dir.join(safetensors.expect("a safetensors file"))).unwrap(),
        "params",
    )
    .unwrap();
    let (q, k, v) = (
        data::<f32>(&case, "inputs_q"),
        data::<f32>(&case, "inputs_k"),
        data::<f32>(&case, "inputs_v"),
    );
    let (sq, sk) = (shape_of(&case, "inputs_q"), shape_of(&case, "inputs_k"));
    for layer in [from_msgpack, from_safetensors] {
        let y = layer
            .forward(
                TensorView::new(&q, (sq[0], sq[1], Const::<32>)).unwrap(),
                TensorView::new(&k, (sk[0], sk[1], Const::<24>)).unwrap(),
                TensorView::new(&v, (sk[0], sk[1], Const::<16>)).unwrap(),
                &mut Context::deterministic(),
            )
            .unwrap();
        assert_matches(&case, "output", &to_array(y));
    }
}

#[test]
fn qkv_and_out_features_match_flax() {
    let (case, dir) = case("f32_e96_qkv16_out8");
    let layer = QkvOut::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    assert_eq!(QkvOut::QUERY_KERNEL, [96, 2, 8]);
    assert_eq!(QkvOut::OUT_KERNEL, [2, 8, 8]);
    let kernel = layer.query_kernel().unwrap();
    let stored = case.input("params/query/kernel").unwrap().unwrap();
    assert_eq!(kernel.as_slice(), stored.as_slice::<f32>().unwrap());
    let s = shape_of(&case, "inputs_q");
    let x = data::<f32>(&case, "inputs_q");
    let y = layer
        .forward(
            TensorView::new(&x, (s[0], s[1], Const::<96>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_eq!(y.shape().2, Const::<8>);
    assert_matches(&case, "output", &to_array(y));
}

#[test]
fn mask_tensor_and_sown_weights_match_flax() {
    let (case, dir) = case("f32_mask_padding_cross");
    let layer = PaddingCross::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let (sq, sk) = (shape_of(&case, "inputs_q"), shape_of(&case, "inputs_k"));
    let (q, k) = (
        data::<f32>(&case, "inputs_q"),
        data::<f32>(&case, "inputs_k"),
    );
    let mask = case.input("mask").unwrap().unwrap().to_bool_vec();
    let mut sink = Intermediates::new();
    let y = layer
        .forward(
            TensorView::new(&q, (sq[0], sq[1], Const::<16>)).unwrap(),
            TensorView::new(&k, (sk[0], sk[1], Const::<16>)).unwrap(),
            TensorView::new(&mask, (sq[0], Const::<1>, sq[1], sk[1])).unwrap(),
            &mut Context::deterministic().sow(&mut sink),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
    assert_eq!(sink.attention_weights().len(), 1);
    assert_matches(&case, "attention_weights", &sink.attention_weights()[0]);
}

#[test]
fn normalize_qk_without_bias_matches_flax() {
    let (case, dir) = case("f32_normalize_qk_nobias_cross");
    let layer = NormalizeNoBias::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let (sq, sk) = (shape_of(&case, "inputs_q"), shape_of(&case, "inputs_k"));
    let (q, k, v) = (
        data::<f32>(&case, "inputs_q"),
        data::<f32>(&case, "inputs_k"),
        data::<f32>(&case, "inputs_v"),
    );
    let y = layer
        .forward(
            TensorView::new(&q, (sq[0], sq[1], Const::<16>)).unwrap(),
            TensorView::new(&k, (sk[0], sk[1], Const::<16>)).unwrap(),
            TensorView::new(&v, (sk[0], sk[1], Const::<16>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
}

#[test]
fn bf16_and_f64_layers_match_flax() {
    let (case, dir) = case("bf16_self_dtype");
    let layer = Bf16Self::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let s = shape_of(&case, "inputs_q");
    let x = data::<attn::half::bf16>(&case, "inputs_q");
    let y = layer
        .forward(
            TensorView::new(&x, (s[0], s[1], Const::<32>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));

    let (case, dir) = case_f64();
    let layer = F64Self::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let s = shape_of(&case, "inputs_q");
    let x = data::<f64>(&case, "inputs_q");
    let y = layer
        .forward(
            TensorView::new(&x, (s[0], s[1], Const::<32>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
}

fn case_f64() -> (mha::Case, std::path::PathBuf) {
    case("f64_self")
}

#[test]
fn a_layer_without_batch_dims_matches_flax() {
    let (case, dir) = case("f32_self_nobatch_e16_h2");
    let layer = NoBatch::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let s = shape_of(&case, "inputs_q");
    let x = data::<f32>(&case, "inputs_q");
    let y = layer
        .forward(
            TensorView::new(&x, (s[0], Const::<16>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
}

fn cache_checks(case: &mha::Case, prefix: &str, cache: &DecoderCache) {
    let kv = cache.kv_cache();
    assert_matches(case, &format!("{prefix}/cached_key"), kv.key().unwrap());
    assert_matches(case, &format!("{prefix}/cached_value"), kv.value().unwrap());
    let index = Array::new(vec![cache.len() as i32], Vec::<usize>::new()).unwrap();
    assert_matches(case, &format!("{prefix}/cache_index"), &index);
}

#[test]
fn prefill_then_decode_matches_flax_decode_steps() {
    let (case, dir) = case("dec_f32_prefill");
    let layer = Decoder::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    assert_eq!(DecoderCache::CAPACITY, 10);
    // step_inputs [7, B, 1, E]: Flax fed the tokens one per call; the first 4 are the prompt.
    let steps = case.input("step_inputs").unwrap().unwrap();
    let s = steps.shape().to_vec();
    let (n, batch, e) = (s[0], s[1], s[3]);
    let values = steps.as_slice::<f32>().unwrap();
    let token = |t: usize, b: usize| &values[(t * batch + b) * e..(t * batch + b + 1) * e];
    let prefill = 4;
    let prompt: Vec<f32> = (0..batch)
        .flat_map(|b| (0..prefill).flat_map(move |t| token(t, b).to_vec()))
        .collect();
    let mut cache = DecoderCache::new();
    let ctx = &mut Context::deterministic();
    let prompt_out = layer
        .prefill(
            &mut cache,
            TensorView::new(&prompt, (batch, prefill, Const::<32>)).unwrap(),
            ctx,
        )
        .unwrap();
    cache_checks(&case, "cache_after_prefill", &cache);
    // Outputs as [N, B, 1, F], Flax's layout of step_outputs.
    let f = Decoder::OUT_FEATURES;
    let mut outputs = vec![0f32; n * batch * f];
    for b in 0..batch {
        for t in 0..prefill {
            let row = &prompt_out.as_slice()[(b * prefill + t) * f..(b * prefill + t + 1) * f];
            outputs[(t * batch + b) * f..(t * batch + b + 1) * f].copy_from_slice(row);
        }
    }
    for t in prefill..n {
        let x: Vec<f32> = (0..batch).flat_map(|b| token(t, b).to_vec()).collect();
        let y = layer
            .decode(
                &mut cache,
                TensorView::new(&x, (batch, Const::<1>, Const::<32>)).unwrap(),
                ctx,
            )
            .unwrap();
        for b in 0..batch {
            outputs[(t * batch + b) * f..(t * batch + b + 1) * f]
                .copy_from_slice(&y.as_slice()[b * f..(b + 1) * f]);
        }
    }
    let outputs = Array::new(outputs, vec![n, batch, 1, f]).unwrap();
    assert_matches(&case, "step_outputs", &outputs);
    cache_checks(&case, "cache", &cache);
    // The declared capacity is enforced: 3 more tokens fill it, a fourth is an error.
    let x = vec![0.5f32; batch * 3 * e];
    layer
        .prefill(
            &mut cache,
            TensorView::new(&x, (batch, 3, Const::<32>)).unwrap(),
            ctx,
        )
        .unwrap();
    let one = vec![0.5f32; batch * e];
    let full = layer.decode(
        &mut cache,
        TensorView::new(&one, (batch, Const::<1>, Const::<32>)).unwrap(),
        ctx,
    );
    assert!(matches!(
        full,
        Err(attn::AttnError::CacheCapacity { capacity: 10, .. })
    ));
}

#[test]
fn new_draws_flax_initializers_with_the_declared_shapes() {
    let layer = Decoder::new(7).unwrap();
    let kernel = layer.query_kernel().unwrap();
    assert_eq!(kernel.shape(), (Const::<32>, Const::<2>, Const::<16>));
    assert!(
        layer
            .query_bias()
            .unwrap()
            .as_slice()
            .iter()
            .all(|&b| b == 0.0)
    );
    // lecun_normal: truncated to 2 stddevs of sqrt(1 / fan_in) / 0.8796 (fan_in = 32).
    let bound = 2.0 * (1.0f32 / 32.0).sqrt() / 0.879_6;
    assert!(kernel.as_slice().iter().all(|w| w.abs() <= bound + 1e-6));
    assert_ne!(
        kernel.as_slice(),
        Decoder::new(8).unwrap().query_kernel().unwrap().as_slice()
    );
}

/// Every stored gradient of `case`: the inputs' (`inputs_k`/`inputs_v` `None` where the layer
/// has no such input) and the parameters' (`params`, by Flax's names).
fn assert_grads(case: &mha::Case, inputs: [Option<Array>; 3], params: &attn::layer::MhaParams) {
    let mut checks = Vec::new();
    for (name, actual) in ["inputs_q", "inputs_k", "inputs_v"]
        .into_iter()
        .zip(&inputs)
    {
        checks.push(case.check_grad(name, actual.as_ref()));
    }
    for (name, actual) in params.named() {
        checks.push(case.check_grad(&format!("params/{name}"), Some(actual)));
    }
    assert_eq!(checks.len(), 3 + params.named().len());
    for check in checks {
        assert!(check.passed(), "{}: {check:?}", case.name());
    }
}

/// The cotangent of `case` as `f32` data (it has the output's shape).
fn cotangent(case: &mha::Case) -> Vec<f32> {
    let c = case.cotangent().unwrap().expect("a case with gradients");
    c.as_slice::<f32>().expect("an f32 cotangent").to_vec()
}

#[test]
fn generated_pullback_of_causal_self_attention_matches_flax_gradients() {
    // Causal self-attention: `inputs_q` gets its query, key and value paths.
    let (case, dir) = case("f32_mask_causal");
    let layer = MaskCausal::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let s = shape_of(&case, "inputs_q");
    let x = data::<f32>(&case, "inputs_q");
    let dy = cotangent(&case);
    let mut ctx = Context::deterministic();
    let x_view = TensorView::new(&x, (s[0], s[1], Const::<16>)).unwrap();
    let (y, pullback) = layer.vjp(x_view, &mut ctx).unwrap();
    let d_output = TensorView::new(&dy, y.shape()).unwrap();
    let g = pullback.backward(d_output, &mut ctx).unwrap();
    assert_eq!((g.inputs_k, g.inputs_v), ((), ()));
    assert_grads(&case, [Some(to_array(g.inputs_q)), None, None], &g.params);
}

#[test]
fn generated_pullback_of_masked_cross_attention_matches_flax_gradients() {
    // Cross-attention with a mask tensor, `inputs_k` only: it gets the key and value paths.
    let (case, dir) = case("f32_mask_padding_cross");
    let layer = PaddingCross::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let (sq, sk) = (shape_of(&case, "inputs_q"), shape_of(&case, "inputs_k"));
    let (q, k) = (
        data::<f32>(&case, "inputs_q"),
        data::<f32>(&case, "inputs_k"),
    );
    let mask = case.input("mask").unwrap().unwrap().to_bool_vec();
    let dy = cotangent(&case);
    let mut sink = Intermediates::new();
    let mut ctx = Context::deterministic().sow(&mut sink);
    let (y, pullback) = layer
        .vjp(
            TensorView::new(&q, (sq[0], sq[1], Const::<16>)).unwrap(),
            TensorView::new(&k, (sk[0], sk[1], Const::<16>)).unwrap(),
            TensorView::new(&mask, (sq[0], Const::<1>, sq[1], sk[1])).unwrap(),
            &mut ctx,
        )
        .unwrap();
    assert_matches(&case, "output", &to_array(y));
    let g = pullback
        .backward(
            TensorView::new(&dy, (sq[0], sq[1], Const::<16>)).unwrap(),
            &mut ctx,
        )
        .unwrap();
    assert_eq!(
        sink.attention_weights().len(),
        1,
        "vjp sows once, backward never"
    );
    assert_grads(
        &case,
        [Some(to_array(g.inputs_q)), Some(to_array(g.inputs_k)), None],
        &g.params,
    );
}

#[test]
fn generated_pullback_with_three_inputs_and_qk_norm_matches_flax_gradients() {
    // Three inputs, no biases, QK LayerNorm.
    let (case, dir) = case("f32_normalize_qk_nobias_cross");
    let layer = NormalizeNoBias::from_msgpack(&checkpoint(&dir, &case), "params").unwrap();
    let (sq, sk) = (shape_of(&case, "inputs_q"), shape_of(&case, "inputs_k"));
    let (q, k, v) = (
        data::<f32>(&case, "inputs_q"),
        data::<f32>(&case, "inputs_k"),
        data::<f32>(&case, "inputs_v"),
    );
    let dy = cotangent(&case);
    let mut ctx = Context::deterministic();
    let (_, pullback) = layer
        .vjp(
            TensorView::new(&q, (sq[0], sq[1], Const::<16>)).unwrap(),
            TensorView::new(&k, (sk[0], sk[1], Const::<16>)).unwrap(),
            TensorView::new(&v, (sk[0], sk[1], Const::<16>)).unwrap(),
            &mut ctx,
        )
        .unwrap();
    let d_output = TensorView::new(&dy, (sq[0], sq[1], Const::<16>)).unwrap();
    // The cotangent's run-time dims must be the output's.
    let swapped = TensorView::new(&dy, (sq[1], sq[0], Const::<16>)).unwrap();
    assert_ne!(sq[0], sq[1], "the swap must change the shape");
    let e = pullback.backward(swapped, &mut ctx).unwrap_err();
    assert!(e.to_string().contains("d_output"), "{e}");
    let g = pullback.backward(d_output, &mut ctx).unwrap();
    assert_grads(
        &case,
        [
            Some(to_array(g.inputs_q)),
            Some(to_array(g.inputs_k)),
            Some(to_array(g.inputs_v)),
        ],
        &g.params,
    );
}
