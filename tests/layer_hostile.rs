//! Hostile inputs of `attn::layer`: truncated, bit-flipped and re-written checkpoint files of
//! every `mha/` case (missing, mis-shaped, mis-typed and unexpected parameters, a wrong path
//! inside the tree), and misuse of the KV cache. Each is an `AttnError` naming the parameter
//! path or the argument, with what was expected and what was found; never a panic; and a cache
//! is left exactly as it was by a failed call.
//!
//! The proptest at the end corrupts random bytes of random checkpoint files
//! (`ATTN_LAYER_PROPTEST_CASES`, default 1024 cases: about a second).

// The verdict of a case set, shared by the runners below.
#[path = "support/mha.rs"]
mod mha;
#[path = "support/tally.rs"]
mod tally;

use std::path::PathBuf;
use std::sync::OnceLock;

use attn::layer::{InFeatures, KvCache, MhaConfig, MultiHeadDotProductAttention};
use attn::{Array, AttnError, Context, DType, DropoutRng};
use proptest::prelude::*;
use rmpv::Value;

/// One checkpoint file of a case, with what is needed to load it.
struct File {
    name: String,
    safetensors: bool,
    bytes: Vec<u8>,
    config: MhaConfig,
    features: InFeatures,
}

impl File {
    fn load(&self, bytes: &[u8], path: &str) -> Result<MultiHeadDotProductAttention, AttnError> {
        let (c, f) = (self.config.clone(), self.features);
        if self.safetensors {
            MultiHeadDotProductAttention::from_safetensors(c, f, bytes, path)
        } else {
            MultiHeadDotProductAttention::from_msgpack(c, f, bytes, path)
        }
    }
}

/// Every checkpoint file of the `mha/` set, read once.
fn files() -> &'static [File] {
    static FILES: OnceLock<Vec<File>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir: PathBuf = mha::default_dir();
        let mut out = Vec::new();
        for path in mha::case_files(&dir).expect("the mha case directory") {
            let case = mha::load(&path).expect("a case file");
            let config = mha::config(&case).expect("the case's config");
            let features = case.features().expect("the case's features");
            let (msgpack, safetensors) = case.checkpoint_files();
            for (file, st) in [(Some(msgpack), false), (safetensors, true)] {
                let Some(file) = file else { continue };
                out.push(File {
                    name: file.to_owned(),
                    safetensors: st,
                    bytes: std::fs::read(dir.join(file)).expect("a checkpoint file"),
                    config: config.clone(),
                    features,
                });
            }
        }
        assert!(out.len() >= 42, "{} checkpoint files", out.len());
        out
    })
}

/// The parts of an `AttnError::Checkpoint`, or a failure naming the error.
fn checkpoint_error(
    r: Result<MultiHeadDotProductAttention, AttnError>,
) -> (String, String, String) {
    match r {
        Err(AttnError::Checkpoint {
            path,
            expected,
            found,
        }) => {
            assert!(!path.is_empty() && !expected.is_empty() && !found.is_empty());
            (path, expected, found)
        }
        Err(e) => panic!("expected a checkpoint error, got {e:?}"),
        Ok(_) => panic!("expected a checkpoint error, the file loaded"),
    }
}

#[test]
fn every_truncated_checkpoint_is_an_error_naming_the_file() {
    let mut n = 0;
    for f in files() {
        assert!(f.load(&f.bytes, "params").is_ok(), "{} loads", f.name);
        let len = f.bytes.len();
        let mut cuts = vec![0, 1, 2, 3, 5, 8, 9, 16, 64, len / 3, len / 2, 2 * len / 3];
        cuts.extend([len - 64, len - 9, len - 8, len - 2, len - 1]);
        cuts.extend((0..len).step_by(len / 23 + 1));
        for cut in cuts.into_iter().filter(|c| *c < len) {
            let (path, expected, found) = checkpoint_error(f.load(&f.bytes[..cut], "params"));
            assert_eq!(
                path, "<file>",
                "{} cut at {cut}: {expected} / {found}",
                f.name
            );
            n += 1;
        }
    }
    println!("{n} truncated files rejected");
}

#[test]
fn flipped_bytes_load_or_fail_with_a_checkpoint_error() {
    let mut errors = 0;
    let mut loaded = 0;
    for f in files() {
        let len = f.bytes.len();
        for at in (0..len).step_by(len / 40 + 1).chain([0, 1, len - 1]) {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bytes = f.bytes.clone();
                bytes[at] ^= mask;
                match f.load(&bytes, "params") {
                    Ok(layer) => {
                        loaded += 1;
                        run_forward(&layer, f.features);
                    }
                    Err(e) => {
                        assert!(matches!(e, AttnError::Checkpoint { .. }), "{e:?}");
                        errors += 1;
                    }
                }
            }
        }
    }
    println!("flipped bytes: {errors} errors, {loaded} loaded (the flip hit array data)");
    assert!(errors > 0 && loaded > 0);
}

/// A forward pass of a (possibly corrupt-valued) layer: must not panic.
fn run_forward(layer: &MultiHeadDotProductAttention, f: InFeatures) {
    let input = |e: usize| Array::new(vec![0.25f32; 3 * e], [3, e]).unwrap();
    let (q, k, v) = (input(f.q), input(f.k), input(f.v));
    let _ = layer.forward(&q, Some(&k), Some(&v), None, &mut Context::deterministic());
}

// ---- re-written msgpack trees ----

fn map_entry<'v>(v: &'v mut Value, key: &str) -> &'v mut Value {
    let Value::Map(entries) = v else {
        panic!("not a map")
    };
    &mut entries
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(key))
        .unwrap_or_else(|| panic!("no key {key}"))
        .1
}

fn remove_entry(v: &mut Value, key: &str) {
    let Value::Map(entries) = v else {
        panic!("not a map")
    };
    entries.retain(|(k, _)| k.as_str() != Some(key));
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

/// The `[shape, dtype, buffer]` of an ext-1 array, decoded.
fn payload(v: &Value) -> (Vec<u64>, String, Vec<u8>) {
    let Value::Ext(1, data) = v else {
        panic!("not an ndarray")
    };
    let p = rmpv::decode::read_value(&mut data.as_slice()).unwrap();
    let Value::Array(items) = p else { panic!() };
    let shape = items[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    let dtype = items[1].as_str().unwrap().to_owned();
    let buf = items[2].as_slice().unwrap().to_vec();
    (shape, dtype, buf)
}

fn ndarray(shape: &[u64], dtype: &str, buf: Vec<u8>) -> Value {
    let p = Value::Array(vec![
        Value::Array(shape.iter().map(|&d| Value::from(d)).collect()),
        Value::from(dtype),
        Value::Binary(buf),
    ]);
    Value::Ext(1, encode(&p))
}

fn shape_str(s: &[u64]) -> String {
    format!("{s:?}")
}

/// The first msgpack file of a case with biases and float32 parameters.
fn f32_msgpack_with_bias() -> &'static File {
    files()
        .iter()
        .find(|f| !f.safetensors && f.config.use_bias && f.config.param_dtype == DType::F32)
        .expect("an f32 case with biases")
}

#[test]
fn missing_misshaped_mistyped_and_unexpected_parameters_name_their_path() {
    let f = f32_msgpack_with_bias();
    let root = rmpv::decode::read_value(&mut f.bytes.as_slice()).unwrap();

    // Missing.
    let mut t = root.clone();
    remove_entry(map_entry(map_entry(&mut t, "params"), "query"), "bias");
    let (path, expected, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/query/bias");
    assert!(expected.starts_with("float32 ["), "{expected}");
    assert_eq!(found, "no such entry");

    // Mis-shaped: the key kernel [E, H, D] stored as [H, E, D] (same bytes).
    let mut t = root.clone();
    let kernel = map_entry(map_entry(map_entry(&mut t, "params"), "key"), "kernel");
    let (shape, dtype, buf) = payload(kernel);
    let swapped = [shape[1], shape[0], shape[2]];
    *kernel = ndarray(&swapped, &dtype, buf);
    let (path, expected, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/key/kernel");
    assert_eq!(expected, format!("float32 {}", shape_str(&shape)));
    assert_eq!(found, format!("float32 {}", shape_str(&swapped)));

    // Mis-typed: the out kernel as float64.
    let mut t = root.clone();
    let kernel = map_entry(map_entry(map_entry(&mut t, "params"), "out"), "kernel");
    let (shape, _, buf) = payload(kernel);
    let wide: Vec<u8> = buf
        .chunks_exact(4)
        .flat_map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
        .collect();
    *kernel = ndarray(&shape, "float64", wide);
    let (path, expected, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/out/kernel");
    assert_eq!(expected, format!("float32 {}", shape_str(&shape)));
    assert_eq!(found, format!("float64 {}", shape_str(&shape)));

    // An unknown dtype, and a buffer of the wrong size.
    let mut t = root.clone();
    let bias = map_entry(map_entry(map_entry(&mut t, "params"), "value"), "bias");
    let (shape, _, buf) = payload(bias);
    *bias = ndarray(&shape, "complex64", buf.clone());
    let (path, _, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/value/bias");
    assert!(found.contains("complex64"), "{found}");
    let bias = map_entry(map_entry(map_entry(&mut t, "params"), "value"), "bias");
    *bias = ndarray(&shape, "float32", buf[..buf.len() - 4].to_vec());
    let (path, expected, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/value/bias");
    assert!(
        expected.contains(&format!("{} bytes", buf.len())),
        "{expected}"
    );
    assert_eq!(found, format!("{} bytes", buf.len() - 4));

    // A shape whose element count overflows.
    let bias = map_entry(map_entry(map_entry(&mut t, "params"), "value"), "bias");
    *bias = ndarray(&[u64::MAX / 2, 4, 3], "float32", buf.clone());
    let (path, _, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/value/bias");
    assert!(found.contains("shape"), "{found}");

    // Unexpected: an extra parameter, and a leaf where a map should be.
    let mut t = root.clone();
    if let Value::Map(e) = map_entry(map_entry(&mut t, "params"), "query") {
        e.push((Value::from("extra"), ndarray(&[1], "float32", vec![0; 4])));
    }
    let (path, expected, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/query/extra");
    assert!(expected.contains("no such parameter"), "{expected}");
    assert_eq!(found, "float32 [1]");
    let mut t = root.clone();
    *map_entry(map_entry(&mut t, "params"), "key") = Value::from("not a module");
    let (path, _, found) = checkpoint_error(f.load(&encode(&t), "params"));
    assert_eq!(path, "params/key");
    assert_eq!(found, "a string");

    // A configuration that disagrees with the file (use_bias = false: unexpected biases).
    let mut cfg = f.config.clone();
    cfg.use_bias = false;
    let e = MultiHeadDotProductAttention::from_msgpack(cfg, f.features, &f.bytes, "params");
    let (path, expected, _) = checkpoint_error(e);
    assert!(path.ends_with("/bias"), "{path}");
    assert!(expected.contains("use_bias = false"), "{expected}");
}

#[test]
fn a_wrong_path_inside_the_tree_names_the_missing_key() {
    let f = f32_msgpack_with_bias();
    let (path, expected, found) = checkpoint_error(f.load(&f.bytes, "params/encoder/layers_0"));
    assert_eq!(path, "params/encoder");
    assert!(expected.contains("map entry"), "{expected}");
    assert!(
        found.contains("no key `encoder`") && found.contains("query"),
        "{found}"
    );
    let (path, _, found) = checkpoint_error(f.load(&f.bytes, "variables"));
    assert_eq!(path, "variables");
    assert!(found.contains("params"), "{found}");
    // One level too deep: `params/query` holds kernel and bias, not the layer.
    let (path, _, found) = checkpoint_error(f.load(&f.bytes, "params/query"));
    assert!(path.starts_with("params/query/"), "{path}");
    assert!(!found.is_empty());
    // The same layer nested inside a model loads from its path.
    let root = rmpv::decode::read_value(&mut f.bytes.as_slice()).unwrap();
    let layer = root.as_map().unwrap()[0].1.clone();
    let nested = Value::Map(vec![(
        Value::from("params"),
        Value::Map(vec![(
            Value::from("encoder"),
            Value::Map(vec![(Value::from("layers_0"), layer)]),
        )]),
    )]);
    assert!(f.load(&encode(&nested), "params/encoder/layers_0").is_ok());
    let (path, _, found) = checkpoint_error(f.load(&encode(&nested), "params/encoder/layers_1"));
    assert_eq!(path, "params/encoder/layers_1");
    assert!(found.contains("layers_0"), "{found}");
}

#[test]
fn safetensors_missing_misshaped_and_mistyped_parameters_name_their_path() {
    use safetensors::{Dtype, SafeTensors, tensor::TensorView};
    let f = files()
        .iter()
        .find(|f| f.safetensors && f.config.use_bias && f.config.param_dtype == DType::F32)
        .expect("an f32 safetensors case with biases");
    let st = SafeTensors::deserialize(&f.bytes).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    type Edit<'e> = &'e dyn Fn(&str, &mut Dtype, &mut Vec<usize>, &mut Vec<u8>) -> bool;
    let write = |edit: Edit<'_>| {
        let mut owned = Vec::new();
        for (k, d, s, b) in &tensors {
            let (mut d, mut s, mut b) = (*d, s.clone(), b.clone());
            if edit(k, &mut d, &mut s, &mut b) {
                owned.push((k.clone(), d, s, b));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let is = |k: &str, leaf: &str| k.replace('.', "/").ends_with(leaf);
    let bytes = write(&|k, _, _, _| !is(k, "key/bias"));
    let (path, _, found) = checkpoint_error(f.load(&bytes, "params"));
    assert_eq!(
        (path.as_str(), found.as_str()),
        ("params/key/bias", "no such entry")
    );
    let bytes = write(&|k, _, s, _| {
        if is(k, "query/kernel") {
            s.swap(0, 1);
        }
        true
    });
    let (path, expected, found) = checkpoint_error(f.load(&bytes, "params"));
    assert_eq!(path, "params/query/kernel");
    assert_ne!(expected, found);
    let bytes = write(&|k, d, _, b| {
        if is(k, "out/bias") {
            *d = Dtype::I32;
            b.iter_mut().for_each(|x| *x = 0);
        }
        true
    });
    let (path, expected, found) = checkpoint_error(f.load(&bytes, "params"));
    assert_eq!(path, "params/out/bias");
    assert!(
        expected.starts_with("float32") && found.starts_with("int32"),
        "{found}"
    );
    let bytes = write(&|k, d, s, b| {
        if is(k, "out/bias") {
            *d = Dtype::U8;
            *s = vec![b.len()];
        }
        true
    });
    let (path, _, found) = checkpoint_error(f.load(&bytes, "params"));
    assert_eq!((path.as_str(), found.as_str()), ("params/out/bias", "U8"));
    let (path, _, found) = checkpoint_error(f.load(&f.bytes, "params/encoder"));
    assert_eq!((path.as_str(), found.as_str()), ("params/encoder", "none"));
}

// ---- cache misuse ----

type Snapshot = (usize, Option<Array>, Option<Array>);

fn snapshot(c: &KvCache) -> Snapshot {
    (c.cache_index(), c.key().cloned(), c.value().cloned())
}

fn layer(dropout: f64) -> MultiHeadDotProductAttention {
    let mut cfg = MhaConfig::new(2);
    cfg.dropout_rate = dropout;
    MultiHeadDotProductAttention::init(cfg, InFeatures::same(8), 3).unwrap()
}

fn tokens(batch: usize, n: usize, e: usize) -> Array {
    let v: Vec<f32> = (0..batch * n * e)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    Array::new(v, [batch, n, e]).unwrap()
}

/// Runs a failing call; checks the cache is unchanged and returns the error's message.
fn fails(
    cache: &mut KvCache,
    call: impl FnOnce(&mut KvCache) -> Result<Array, AttnError>,
) -> AttnError {
    let before = snapshot(cache);
    let e = call(cache).expect_err("the call must fail");
    assert_eq!(snapshot(cache), before, "the cache changed after: {e}");
    e
}

#[test]
fn cache_misuse_is_an_error_and_leaves_the_cache_unchanged() {
    let l = layer(0.0);
    let ctx = &mut Context::deterministic();
    // A fresh cache stays empty after a failed first call.
    let mut cache = KvCache::new(4);
    let e = fails(&mut cache, |c| l.prefill(c, &tokens(2, 5, 8), None, ctx));
    assert!(matches!(
        e,
        AttnError::CacheCapacity {
            capacity: 4,
            filled: 0,
            requested: 5
        }
    ));
    assert!(cache.key().is_none());
    let bad_mask = Array::new(vec![true; 2 * 5], [2, 1, 1, 5]).unwrap();
    let e = fails(&mut cache, |c| {
        l.prefill(c, &tokens(2, 2, 8), Some(&bad_mask), ctx)
    });
    assert!(
        matches!(e, AttnError::Broadcast { tensor: "mask", .. }),
        "{e}"
    );
    assert!(cache.key().is_none());

    l.prefill(&mut cache, &tokens(2, 3, 8), None, ctx).unwrap();
    let mut twin = cache.clone();
    // Past the capacity.
    let e = fails(&mut cache, |c| l.decode(c, &tokens(2, 2, 8), None, ctx));
    assert_eq!(
        e.to_string(),
        "KV cache full: capacity 4, holds 3, 2 more requested (the cache is unchanged)"
    );
    // Wrong batch dims, feature size, dtype, token count, mask rank and mask shape.
    let e = fails(&mut cache, |c| l.decode(c, &tokens(3, 1, 8), None, ctx));
    assert!(matches!(&e, AttnError::Rank { tensor: "inputs", found, .. } if found == &[3, 1, 8]));
    assert!(e.to_string().contains("[2]"), "{e}");
    let e = fails(&mut cache, |c| l.decode(c, &tokens(2, 1, 9), None, ctx));
    assert!(
        matches!(
            e,
            AttnError::Axis {
                tensor: "inputs",
                found: 9,
                ..
            }
        ),
        "{e}"
    );
    let x64 = Array::from_f64(DType::F64, &tokens(2, 1, 8).to_f64_vec(), [2, 1, 8]).unwrap();
    let e = fails(&mut cache, |c| l.decode(c, &x64, None, ctx));
    assert!(
        matches!(
            e,
            AttnError::DType {
                expected: DType::F32,
                found: DType::F64,
                ..
            }
        ),
        "{e}"
    );
    let e = fails(&mut cache, |c| l.decode(c, &tokens(2, 0, 8), None, ctx));
    assert!(
        matches!(
            e,
            AttnError::Axis {
                tensor: "inputs",
                found: 0,
                ..
            }
        ),
        "{e}"
    );
    let rank3 = Array::new(vec![true; 4], [1, 1, 4]).unwrap();
    let e = fails(&mut cache, |c| {
        l.decode(c, &tokens(2, 1, 8), Some(&rank3), ctx)
    });
    assert!(matches!(e, AttnError::Rank { tensor: "mask", .. }), "{e}");
    // This one fails after the slot was written: the slot is restored.
    let e = fails(&mut cache, |c| {
        l.decode(c, &tokens(2, 1, 8), Some(&bad_mask), ctx)
    });
    assert!(
        matches!(e, AttnError::Broadcast { tensor: "mask", .. }),
        "{e}"
    );
    // The cache still works, exactly as one that saw none of the errors.
    let x = tokens(2, 1, 8);
    let y1 = l.decode(&mut cache, &x, None, ctx).unwrap();
    let y2 = l.decode(&mut twin, &x, None, ctx).unwrap();
    assert_eq!(y1, y2);
    assert_eq!(snapshot(&cache), snapshot(&twin));
    let e = fails(&mut cache, |c| l.decode(c, &x, None, ctx));
    assert!(matches!(e, AttnError::CacheCapacity { filled: 4, .. }));
    // A cache of capacity 0.
    let e = fails(&mut KvCache::new(0), |c| l.decode(c, &x, None, ctx));
    assert!(matches!(e, AttnError::CacheCapacity { capacity: 0, .. }));
}

#[test]
fn an_error_inside_the_attention_restores_the_written_slots() {
    // Dropout active without a dropout RNG fails in the attention call, after the keys and
    // values were written into the cache.
    let l = layer(0.5);
    let mut cache = KvCache::new(6);
    l.prefill(
        &mut cache,
        &tokens(1, 2, 8),
        None,
        &mut Context::deterministic(),
    )
    .unwrap();
    let mut live = Context::default().set_deterministic(false);
    let e = fails(&mut cache, |c| {
        l.decode(c, &tokens(1, 2, 8), None, &mut live)
    });
    assert!(matches!(e, AttnError::MissingDropoutRng { .. }), "{e}");
    let mut with_rng = Context::default()
        .set_deterministic(false)
        .dropout_rng(DropoutRng::new(1));
    l.decode(&mut cache, &tokens(1, 2, 8), None, &mut with_rng)
        .unwrap();
    assert_eq!(cache.cache_index(), 4);
}

#[test]
fn sliding_window_misuse_leaves_the_ring_unchanged() {
    let l = layer(0.0);
    let ctx = &mut Context::deterministic();
    let mut ring = KvCache::sliding_window(2);
    l.prefill(&mut ring, &tokens(1, 2, 8), None, ctx).unwrap();
    l.decode(&mut ring, &tokens(1, 1, 8), None, ctx).unwrap();
    let e = fails(&mut ring, |c| l.prefill(c, &tokens(1, 3, 8), None, ctx));
    assert!(
        matches!(
            e,
            AttnError::Axis {
                tensor: "inputs",
                found: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("at most 2 tokens"), "{e}");
    // A chunk runs token by token; a failure at its first token restores the ring.
    let bad_mask = Array::new(vec![true; 3], [1, 1, 1, 3]).unwrap();
    let e = fails(&mut ring, |c| {
        l.prefill(c, &tokens(1, 2, 8), Some(&bad_mask), ctx)
    });
    assert!(matches!(e, AttnError::Broadcast { .. }), "{e}");
    // The ring never fills up.
    for _ in 0..5 {
        l.decode(&mut ring, &tokens(1, 1, 8), None, ctx).unwrap();
    }
    assert_eq!(ring.cache_index(), 8);
}

// ---- random corruption ----

fn proptest_cases() -> u32 {
    std::env::var("ATTN_LAYER_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: proptest_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random bytes of a random checkpoint file overwritten (and maybe the file cut): loading
    /// is an `AttnError::Checkpoint` or a layer whose forward pass does not panic.
    #[test]
    fn random_corruption_never_panics(
        file in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let f = &files()[file.index(files().len())];
        let mut bytes = f.bytes.clone();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        match f.load(&bytes, "params") {
            Ok(layer) => run_forward(&layer, f.features),
            Err(e) => prop_assert!(matches!(e, AttnError::Checkpoint { .. }), "{e:?}"),
        }
    }
}

#[test]
fn pullback_rejects_cotangents_and_contexts_of_another_call() {
    use attn::layer::ArrayRef;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let layer = layer(0.3);
    let x = tokens(2, 5, 8);
    let train = || {
        Context::default()
            .set_deterministic(false)
            .dropout_rng(DropoutRng::new(11))
    };
    let xr = ArrayRef::from_array("inputs_q", &x).unwrap();
    let (y, pullback) = layer.vjp(xr, None, None, None, None, &mut train()).unwrap();
    let dy = tokens(2, 5, 8);
    // The right call works, and its input gradient has the input's shape.
    let grads = pullback.backward(&dy, &mut train()).unwrap();
    assert_eq!(grads.inputs_q.shape(), x.shape());
    assert_eq!(y.shape(), dy.shape());
    let fail = |what: &str, dy: &Array, mut ctx: Context<'_>| -> String {
        let r = catch_unwind(AssertUnwindSafe(|| pullback.backward(dy, &mut ctx)))
            .unwrap_or_else(|_| panic!("{what}: panicked"));
        r.expect_err(what).to_string()
    };
    let e = fail("cotangent shape", &tokens(2, 4, 8), train());
    assert!(
        e.contains("cotangent") && e.contains("[2, 5, 8]") && e.contains("[2, 4, 8]"),
        "{e}"
    );
    let e = fail("cotangent dtype", &dy.astype(DType::F64), train());
    assert!(e.contains("cotangent") && e.contains("float64"), "{e}");
    // Another dropout seed, or dropout switched off: not the forward's call.
    let other = Context::default()
        .set_deterministic(false)
        .dropout_rng(DropoutRng::new(12));
    let e = fail("another dropout seed", &dy, other);
    assert!(e.contains("residuals"), "{e}");
    let e = fail("deterministic backward", &dy, Context::deterministic());
    assert!(e.contains("residuals"), "{e}");
    // A bad input is rejected by vjp as by forward.
    let bad = tokens(2, 5, 7);
    let bad_ref = ArrayRef::from_array("inputs_q", &bad).unwrap();
    let e = layer
        .vjp(bad_ref, None, None, None, None, &mut train())
        .expect_err("7 features where the layer takes 8");
    assert!(e.to_string().contains("inputs_q"), "{e}");
}
