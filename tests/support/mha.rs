//! Runs the `mha/` conformance cases (`flax.linen.MultiHeadDotProductAttention`, schema in
//! `../shared/conformance/README.md`, section "Set `mha/`") through
//! `attn::layer::MultiHeadDotProductAttention`, loading the parameters from each case's
//! checkpoint files (`.msgpack`, and `.safetensors` where present). Every expected tensor is
//! compared (dtype, shape, `|actual - expected| <= atol + rtol·|expected|`); the loaded
//! parameters must equal the JSON's bit for bit. [`run_grads`] checks a case's `grads`
//! through [`MultiHeadDotProductAttention::vjp`] and the pullback's `backward`.
//!
//! Decode cases run Flax's procedure (one token per call over a cache of `max_length`), and
//! once more with all steps in one multi-token call (same outputs and caches expected).
#![allow(dead_code)]

use super::tally;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use attn::layer::{InFeatures, KvCache, MhaConfig, MultiHeadDotProductAttention};
use attn::{Array, Context, DType, Intermediates, Precision};
use serde::Deserialize;

/// The environment variable that overrides the case directory.
pub const DIR_VAR: &str = "ATTN_MHA_CONFORMANCE_DIR";

/// The `function` of the mha cases.
pub const FUNCTION: &str = "flax.linen.MultiHeadDotProductAttention";

/// One tensor of a case file.
#[derive(Deserialize, Debug)]
pub struct TensorJson {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// A tolerance.
#[derive(Deserialize, Debug, Clone, Copy)]
pub struct Tol {
    atol: f64,
    rtol: f64,
}

/// The checkpoint files of a case.
#[derive(Deserialize, Debug)]
pub struct CheckpointJson {
    msgpack: String,
    safetensors: Option<String>,
}

/// One mha case file.
#[derive(Deserialize, Debug)]
pub struct Case {
    name: String,
    function: String,
    checkpoint: CheckpointJson,
    params: serde_json::Value,
    inputs: BTreeMap<String, Option<TensorJson>>,
    expected: BTreeMap<String, Option<TensorJson>>,
    /// `cotangent`, then the gradient of every input and parameter (`null` for an input that
    /// was not passed); absent or `null` for cases without gradients.
    #[serde(default)]
    grads: Option<BTreeMap<String, Option<TensorJson>>>,
    tolerance: BTreeMap<String, Tol>,
}

/// The comparison of one tensor.
#[derive(Debug)]
pub struct Check {
    /// Tensor name.
    pub tensor: String,
    /// Worst error / tolerance.
    pub worst: f64,
    /// A dtype/shape/presence problem.
    pub problem: Option<String>,
}

impl Check {
    /// Whether the tensor matched (dtype, shape, values within the case's tolerance).
    pub fn passed(&self) -> bool {
        self.problem.is_none() && self.worst <= 1.0
    }
}

/// The result of one case run from one checkpoint file.
#[derive(Debug)]
pub struct Outcome {
    /// `<case> [msgpack]`, `<case> [safetensors]`, ...
    pub name: String,
    /// One entry per compared tensor.
    pub checks: Vec<Check>,
    /// An error that stopped the run.
    pub error: Option<String>,
}

impl Outcome {
    /// The outcome of a run named `name` that compared `checks`, or stopped with an error.
    pub fn of(name: String, checks: Result<Vec<Check>, String>) -> Outcome {
        match checks {
            Ok(checks) => Outcome {
                name,
                checks,
                error: None,
            },
            Err(e) => Outcome {
                name,
                checks: Vec::new(),
                error: Some(e),
            },
        }
    }

    /// Whether everything passed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(Check::passed)
    }

    /// What the run compared: the tensors by name, the loaded parameters as a count (e.g.
    /// `output, attention_weights, 8 params`).
    pub fn checked(&self) -> String {
        let params = self
            .checks
            .iter()
            .filter(|c| c.tensor.starts_with("params/"))
            .count();
        let mut names: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.tensor.starts_with("params/"))
            .map(|c| c.tensor.clone())
            .collect();
        if params > 0 {
            names.push(format!("{params} params bit-exact"));
        }
        names.join(", ")
    }

    fn worst(&self) -> f64 {
        self.checks
            .iter()
            .map(|c| c.worst)
            .fold(0.0, |a, b| if b.is_nan() || b > a { b } else { a })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(
            f,
            "{:<52} {verdict}  checked {:<32} worst |err|/tol = {:.3}",
            self.name,
            self.checked(),
            self.worst()
        )?;
        if let Some(e) = &self.error {
            write!(f, "  error: {e}")?;
        }
        for c in &self.checks {
            if let Some(p) = &c.problem {
                write!(f, "  {}: {p}", c.tensor)?;
            } else if c.worst > 1.0 || c.worst.is_nan() {
                write!(f, "  {}: {:.3}", c.tensor, c.worst)?;
            }
        }
        Ok(())
    }
}

/// `$ATTN_MHA_CONFORMANCE_DIR`, else `../shared/conformance/mha`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os(DIR_VAR) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/mha"),
    }
}

/// The `*.json` case files of `dir` (not `index.json`), sorted.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name().is_some_and(|n| n != "index.json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Whether a JSON file is an mha case (its `function`).
pub fn is_mha_file(path: &Path) -> bool {
    #[derive(Deserialize)]
    struct Head {
        function: String,
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Head>(&t).ok())
        .is_some_and(|h| h.function == FUNCTION)
}

/// Loads a case file.
pub fn load(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str::<Case>(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn dtype(name: &str) -> Result<DType, String> {
    DType::from_name(name).ok_or_else(|| format!("unknown dtype {name:?}"))
}

fn to_array(t: &TensorJson) -> Result<Array, String> {
    Array::from_f64(dtype(&t.dtype)?, &t.data, t.shape.clone()).map_err(|e| e.to_string())
}

/// The layer configuration of a case (`params.module`).
pub fn config(case: &Case) -> Result<MhaConfig, String> {
    let m = &case.params["module"];
    let usize_of = |v: &serde_json::Value| v.as_u64().map(|x| x as usize);
    let mut c = MhaConfig::new(usize_of(&m["num_heads"]).ok_or("num_heads")?);
    c.qkv_features = usize_of(&m["qkv_features"]);
    c.out_features = usize_of(&m["out_features"]);
    c.use_bias = m["use_bias"].as_bool().ok_or("use_bias")?;
    c.normalize_qk = m["normalize_qk"].as_bool().ok_or("normalize_qk")?;
    c.dtype = m["dtype"].as_str().map(dtype).transpose()?;
    c.param_dtype = dtype(m["param_dtype"].as_str().ok_or("param_dtype")?)?;
    c.dropout_rate = m["dropout_rate"].as_f64().ok_or("dropout_rate")?;
    c.broadcast_dropout = m["broadcast_dropout"]
        .as_bool()
        .ok_or("broadcast_dropout")?;
    c.deterministic = m["deterministic"].as_bool();
    c.precision = match m["precision"].as_str() {
        None => None,
        Some("DEFAULT") => Some(Precision::Default),
        Some("HIGH") => Some(Precision::High),
        Some("HIGHEST") => Some(Precision::Highest),
        Some(p) => return Err(format!("unknown precision {p:?}")),
    };
    c.force_fp32_for_softmax = m["force_fp32_for_softmax"]
        .as_bool()
        .ok_or("force_fp32_for_softmax")?;
    Ok(c)
}

impl Case {
    /// The case name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An input tensor of the case (`None` when absent or null).
    pub fn input(&self, name: &str) -> Result<Option<Array>, String> {
        match self.inputs.get(name) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    fn is_decode(&self) -> bool {
        self.params["module"]["decode"].as_bool().unwrap_or(false)
    }

    /// The case's checkpoint file names (msgpack, and safetensors where present), relative to
    /// the case directory.
    pub fn checkpoint_files(&self) -> (&str, Option<&str>) {
        (
            &self.checkpoint.msgpack,
            self.checkpoint.safetensors.as_deref(),
        )
    }

    /// An expected tensor of the case (Flax's result; `None` when absent or null).
    pub fn expected(&self, name: &str) -> Result<Option<Array>, String> {
        match self.expected.get(name) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    /// Compares `actual` with the expected tensor `name` under the case's tolerance for it.
    pub fn check(&self, name: &str, actual: &Array) -> Check {
        compare(
            name,
            Some(actual),
            self.expected.get(name).and_then(Option::as_ref),
            self.tolerance.get(name).copied(),
        )
    }

    /// The stored cotangent of the output (`None` for a case without gradients).
    pub fn cotangent(&self) -> Result<Option<Array>, String> {
        match self.grads.as_ref().and_then(|g| g.get("cotangent")) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    /// Compares `actual` with the stored gradient `name` (`inputs_q`, `params/query/kernel`,
    /// ...) under the case's `grad_<name>` tolerance.
    pub fn check_grad(&self, name: &str, actual: Option<&Array>) -> Check {
        compare(
            &format!("grad {name}"),
            actual,
            self.grads
                .as_ref()
                .and_then(|g| g.get(name))
                .and_then(Option::as_ref),
            self.tolerance.get(&format!("grad_{name}")).copied(),
        )
    }

    /// Whether the case runs Flax's `decode=True` steps.
    pub fn decodes(&self) -> bool {
        self.is_decode()
    }

    /// Input features (q, k, v) from the input shapes (`inputs_k` defaults to `inputs_q`,
    /// `inputs_v` to `inputs_k`).
    pub fn features(&self) -> Result<InFeatures, String> {
        let last = |name: &str| -> Option<usize> {
            self.inputs
                .get(name)
                .and_then(Option::as_ref)
                .and_then(|t| t.shape.last().copied())
        };
        let q = last(if self.is_decode() {
            "step_inputs"
        } else {
            "inputs_q"
        })
        .ok_or("no inputs_q / step_inputs")?;
        let k = last("inputs_k").unwrap_or(q);
        let v = last("inputs_v").unwrap_or(k);
        Ok(InFeatures { q, k, v })
    }
}

/// Which checkpoint file a run loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `<name>.msgpack` (flax.serialization.to_bytes).
    Msgpack,
    /// `<name>.safetensors`.
    Safetensors,
}

/// Loads the case's layer from one checkpoint file next to the case (`None` if the case has
/// no such file).
pub fn load_layer(
    case: &Case,
    dir: &Path,
    source: Source,
) -> Option<Result<MultiHeadDotProductAttention, String>> {
    let file = match source {
        Source::Msgpack => Some(&case.checkpoint.msgpack),
        Source::Safetensors => case.checkpoint.safetensors.as_ref(),
    }?;
    Some((|| {
        let bytes = std::fs::read(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        let cfg = config(case)?;
        let features = case.features()?;
        let layer = match source {
            Source::Msgpack => {
                MultiHeadDotProductAttention::from_msgpack(cfg, features, &bytes, "params")
            }
            Source::Safetensors => {
                MultiHeadDotProductAttention::from_safetensors(cfg, features, &bytes, "params")
            }
        };
        layer.map_err(|e| format!("{file}: {e}"))
    })())
}

/// Runs every case file in `dir` from every checkpoint file it has.
pub fn run_file(path: &Path) -> Vec<Outcome> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let case = match load(path) {
        Ok(c) => c,
        Err(e) => {
            return vec![Outcome::of(path.display().to_string(), Err(e))];
        }
    };
    let mut outs = Vec::new();
    for source in [Source::Msgpack, Source::Safetensors] {
        let label = match source {
            Source::Msgpack => "msgpack",
            Source::Safetensors => "safetensors",
        };
        let Some(layer) = load_layer(&case, dir, source) else {
            continue;
        };
        let name = format!("{} [{label}]", case.name);
        let layer = match layer {
            Ok(l) => l,
            Err(e) => {
                outs.push(Outcome::of(name, Err(e)));
                continue;
            }
        };
        // The multi-token run is compared only without a user mask: a row the user mask hides
        // entirely is uniform over all slots, and in one call the later tokens' slots are
        // already written (Flax's one-token steps see zeros there).
        let masked = case.inputs.get("mask").is_some_and(Option::is_some);
        let runs: &[bool] = if case.is_decode() && source == Source::Msgpack && !masked {
            &[false, true]
        } else {
            &[false]
        };
        for &chunked in runs {
            let name = if chunked {
                format!("{} [{label}, one multi-token call]", case.name)
            } else {
                name.clone()
            };
            let checks = run_case(&case, &layer, chunked).map(|mut checks| {
                checks.extend(check_params(&case, &layer));
                checks
            });
            outs.push(Outcome::of(name, checks));
        }
    }
    if outs.is_empty() {
        outs.push(Outcome::of(
            case.name.clone(),
            Err("no checkpoint file".into()),
        ));
    }
    outs
}

/// The loaded parameters equal the JSON's, bit for bit (and dtype, shape).
fn check_params(case: &Case, layer: &MultiHeadDotProductAttention) -> Vec<Check> {
    let mut checks = Vec::new();
    let loaded: BTreeMap<String, &Array> = layer
        .params()
        .named()
        .into_iter()
        .map(|(n, a)| (format!("params/{n}"), a))
        .collect();
    for (name, t) in case.inputs.iter().filter(|(n, _)| n.starts_with("params/")) {
        let mut check = Check {
            tensor: name.clone(),
            worst: 0.0,
            problem: None,
        };
        match (loaded.get(name), t) {
            (Some(a), Some(t)) => match to_array(t) {
                Ok(e) if **a == e => {}
                Ok(_) => check.problem = Some("loaded parameter differs from the JSON".into()),
                Err(err) => check.problem = Some(err),
            },
            _ => check.problem = Some("parameter missing after loading".into()),
        }
        checks.push(check);
    }
    checks
}

/// Runs one case with a loaded layer; `chunked` runs a decode case as one multi-token call.
fn run_case(
    case: &Case,
    layer: &MultiHeadDotProductAttention,
    chunked: bool,
) -> Result<Vec<Check>, String> {
    let actual = if case.is_decode() {
        run_decode(case, layer, chunked)?
    } else {
        run_single(case, layer)?
    };
    let mut checks = Vec::new();
    for (name, expected) in &case.expected {
        if chunked
            && (name.contains("attention_weights") || name.starts_with("cache_after_prefill"))
        {
            continue; // one call sows one [B.., H, N, max_len] array and has no prompt snapshot
        }
        let a = actual.get(name).and_then(Option::as_ref);
        checks.push(compare(
            name,
            a,
            expected.as_ref(),
            case.tolerance.get(name).copied(),
        ));
    }
    Ok(checks)
}

fn call_ctx(case: &Case) -> Context<'static> {
    let det = case.params["call"]["deterministic"].as_bool();
    Context::default().set_deterministic(det.unwrap_or(false))
}

fn sow_weights(case: &Case) -> bool {
    case.params["call"]["sow_weights"]
        .as_bool()
        .unwrap_or(false)
}

fn run_single(
    case: &Case,
    layer: &MultiHeadDotProductAttention,
) -> Result<BTreeMap<String, Option<Array>>, String> {
    let q = case.input("inputs_q")?.ok_or("inputs_q missing")?;
    let k = case.input("inputs_k")?;
    let v = case.input("inputs_v")?;
    let mask = case.input("mask")?;
    let mut sink = Intermediates::new();
    let out = {
        let mut ctx = call_ctx(case);
        if sow_weights(case) {
            let mut ctx = ctx.sow(&mut sink);
            layer.forward(&q, k.as_ref(), v.as_ref(), mask.as_ref(), &mut ctx)
        } else {
            layer.forward(&q, k.as_ref(), v.as_ref(), mask.as_ref(), &mut ctx)
        }
    }
    .map_err(|e| e.to_string())?;
    let mut actual = BTreeMap::new();
    actual.insert("output".to_owned(), Some(out));
    let w = sink.attention_weights();
    if w.len() > 1 {
        return Err(format!("sown {} weights, expected 1", w.len()));
    }
    actual.insert("attention_weights".to_owned(), w.first().cloned());
    Ok(actual)
}

/// Slice `t` of a `[N, rest..]` array as `[rest..]`.
fn index0(a: &Array, t: usize) -> Result<Array, String> {
    let rest = a.shape()[1..].to_vec();
    let n: usize = rest.iter().product();
    let vals = a.to_f64_vec();
    Array::from_f64(a.dtype(), &vals[t * n..(t + 1) * n], rest).map_err(|e| e.to_string())
}

/// Stacks arrays of one shape along a new leading axis.
fn stack(items: &[Array]) -> Result<Array, String> {
    let first = items.first().ok_or("nothing to stack")?;
    let mut shape = vec![items.len()];
    shape.extend_from_slice(first.shape());
    let vals: Vec<f64> = items.iter().flat_map(Array::to_f64_vec).collect();
    Array::from_f64(first.dtype(), &vals, shape).map_err(|e| e.to_string())
}

fn cache_arrays(
    prefix: &str,
    cache: &KvCache,
    actual: &mut BTreeMap<String, Option<Array>>,
) -> Result<(), String> {
    actual.insert(format!("{prefix}/cached_key"), cache.key().cloned());
    actual.insert(format!("{prefix}/cached_value"), cache.value().cloned());
    let index = Array::new(vec![cache.cache_index() as i32], Vec::<usize>::new())
        .map_err(|e| e.to_string())?;
    actual.insert(format!("{prefix}/cache_index"), Some(index));
    Ok(())
}

fn run_decode(
    case: &Case,
    layer: &MultiHeadDotProductAttention,
    chunked: bool,
) -> Result<BTreeMap<String, Option<Array>>, String> {
    let steps = case.input("step_inputs")?.ok_or("step_inputs missing")?;
    let mask = case.input("mask")?;
    let init = &case.params["derived"]["init_input_shape"];
    let init: Vec<usize> = init
        .as_array()
        .ok_or("derived.init_input_shape missing")?
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as usize))
        .collect();
    let max_length = init[init.len().checked_sub(2).ok_or("init_input_shape rank")?];
    let prefill = case.params["derived"]["prefill_steps"]
        .as_u64()
        .unwrap_or(0) as usize;
    let n = steps.shape()[0];
    let mut cache = KvCache::new(max_length);
    let mut actual = BTreeMap::new();
    let mut sink = Intermediates::new();
    let sow = sow_weights(case);
    let run = |cache: &mut KvCache, x: &Array, sink: &mut Intermediates| {
        let mut ctx = call_ctx(case);
        if sow {
            layer.decode(cache, x, mask.as_ref(), &mut ctx.sow(sink))
        } else {
            layer.decode(cache, x, mask.as_ref(), &mut ctx)
        }
        .map_err(|e| e.to_string())
    };
    if chunked {
        // [N, B.., 1, E] -> [B.., N, E]
        let s = steps.shape();
        let (e, batch) = (s[s.len() - 1], &s[1..s.len() - 2]);
        let nb: usize = batch.iter().product();
        let vals = steps.to_f64_vec();
        let mut data = Vec::with_capacity(vals.len());
        for b in 0..nb {
            for t in 0..n {
                data.extend_from_slice(&vals[(t * nb + b) * e..(t * nb + b + 1) * e]);
            }
        }
        let mut shape = batch.to_vec();
        shape.extend_from_slice(&[n, e]);
        let x = Array::from_f64(steps.dtype(), &data, shape).map_err(|e| e.to_string())?;
        let y = run(&mut cache, &x, &mut sink)?;
        // [B.., N, F] -> [N, B.., 1, F]
        let f = *y.shape().last().ok_or("output rank")?;
        let yv = y.to_f64_vec();
        let mut out = Vec::with_capacity(yv.len());
        for t in 0..n {
            for b in 0..nb {
                out.extend_from_slice(&yv[(b * n + t) * f..(b * n + t + 1) * f]);
            }
        }
        let mut shape = vec![n];
        shape.extend_from_slice(batch);
        shape.extend_from_slice(&[1, f]);
        let outputs = Array::from_f64(y.dtype(), &out, shape).map_err(|e| e.to_string())?;
        actual.insert("step_outputs".to_owned(), Some(outputs));
        cache_arrays("cache", &cache, &mut actual)?;
        return Ok(actual);
    }
    let mut outputs = Vec::new();
    for t in 0..n {
        let x = index0(&steps, t)?;
        outputs.push(run(&mut cache, &x, &mut sink)?);
        if prefill > 0 && t + 1 == prefill {
            cache_arrays("cache_after_prefill", &cache, &mut actual)?;
        }
    }
    actual.insert("step_outputs".to_owned(), Some(stack(&outputs)?));
    let w = sink.attention_weights();
    actual.insert(
        "step_attention_weights".to_owned(),
        if w.is_empty() { None } else { Some(stack(w)?) },
    );
    cache_arrays("cache", &cache, &mut actual)?;
    Ok(actual)
}

fn compare(
    name: &str,
    actual: Option<&Array>,
    expected: Option<&TensorJson>,
    tol: Option<Tol>,
) -> Check {
    let mut check = Check {
        tensor: name.to_owned(),
        worst: 0.0,
        problem: None,
    };
    let (a, e) = match (actual, expected) {
        (None, None) => return check,
        (Some(a), Some(e)) => (a, e),
        (a, _) => {
            check.problem = Some(format!(
                "expected {}, got {}",
                if a.is_some() { "null" } else { "a tensor" },
                if a.is_some() { "a tensor" } else { "null" }
            ));
            return check;
        }
    };
    let Some(tol) = tol else {
        check.problem = Some("no tolerance in the case file".into());
        return check;
    };
    if a.dtype().name() != e.dtype {
        check.problem = Some(format!("dtype {} != expected {}", a.dtype(), e.dtype));
        return check;
    }
    if a.shape() != e.shape.as_slice() {
        check.problem = Some(format!("shape {:?} != expected {:?}", a.shape(), e.shape));
        return check;
    }
    let actual = a.to_f64_vec();
    if actual.len() != e.data.len() {
        check.problem = Some(format!("{} elements != {}", actual.len(), e.data.len()));
        return check;
    }
    for (x, y) in actual.iter().zip(&e.data) {
        let err = (x - y).abs();
        let bound = tol.atol + tol.rtol * y.abs();
        let ratio = if err == 0.0 {
            0.0
        } else if bound == 0.0 || err.is_nan() {
            f64::INFINITY
        } else {
            err / bound
        };
        if ratio > check.worst || ratio.is_nan() {
            check.worst = ratio;
        }
    }
    check
}

/// Runs the gradients of a case file (`None` when it stores none): the layer from its msgpack
/// checkpoint, `vjp` on the case's inputs, then `backward` with the stored cotangent; every
/// stored gradient (inputs and parameters) is compared under its `grad_<name>` tolerance.
pub fn run_grads(path: &Path) -> Option<Outcome> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let case = match load(path) {
        Ok(c) => c,
        Err(e) => {
            return Some(Outcome::of(path.display().to_string(), Err(e)));
        }
    };
    let stored = case.grads.as_ref()?;
    let name = format!("{} [gradients]", case.name);
    let run = || -> Result<Vec<Check>, String> {
        let layer = load_layer(&case, dir, Source::Msgpack).ok_or("no msgpack checkpoint")??;
        let q = case.input("inputs_q")?.ok_or("inputs_q missing")?;
        let k = case.input("inputs_k")?;
        let v = case.input("inputs_v")?;
        let mask = case.input("mask")?;
        let cotangent = stored
            .get("cotangent")
            .and_then(Option::as_ref)
            .ok_or("no cotangent")
            .and_then(|t| to_array(t).map_err(|_| "bad cotangent"))?;
        fn view<'a>(
            name: &'static str,
            a: &'a Option<Array>,
        ) -> Result<Option<attn::layer::ArrayRef<'a>>, attn::AttnError> {
            a.as_ref()
                .map(|a| attn::layer::ArrayRef::from_array(name, a))
                .transpose()
        }
        let err = |e: attn::AttnError| e.to_string();
        let q_ref = attn::layer::ArrayRef::from_array("inputs_q", &q).map_err(err)?;
        let (k_ref, v_ref) = (
            view("inputs_k", &k).map_err(err)?,
            view("inputs_v", &v).map_err(err)?,
        );
        let mut ctx = call_ctx(&case);
        let (_, pullback) = layer
            .vjp(q_ref, k_ref, v_ref, mask.as_ref(), None, &mut ctx)
            .map_err(err)?;
        let grads = pullback.backward(&cotangent, &mut ctx).map_err(err)?;
        let mut actual: BTreeMap<String, Option<Array>> = BTreeMap::new();
        actual.insert("inputs_q".into(), Some(grads.inputs_q));
        actual.insert("inputs_k".into(), grads.inputs_k);
        actual.insert("inputs_v".into(), grads.inputs_v);
        for (n, a) in grads.params.named() {
            actual.insert(format!("params/{n}"), Some(a.clone()));
        }
        let mut checks = Vec::new();
        for (name, expected) in stored.iter().filter(|(n, _)| *n != "cotangent") {
            let tol = case.tolerance.get(&format!("grad_{name}")).copied();
            let a = actual.remove(name).flatten();
            checks.push(compare(
                &format!("grad {name}"),
                a.as_ref(),
                expected.as_ref(),
                tol,
            ));
        }
        // A gradient we computed that the case does not store is a mismatch too.
        for (name, a) in actual {
            if a.is_some() {
                checks.push(Check {
                    tensor: format!("grad {name}"),
                    worst: f64::INFINITY,
                    problem: Some("computed, but the case stores no such gradient".into()),
                });
            }
        }
        Ok(checks)
    };
    Some(Outcome::of(name, run()))
}

impl tally::Verdict for Outcome {
    fn passed(&self) -> bool {
        Outcome::passed(self)
    }
}

/// Every case of the directory, loaded from each of its checkpoint files: outputs, sown
/// weights, decode caches (at least one run per case file).
pub fn check_forward() -> Result<String, String> {
    let dir = default_dir();
    let files = case_files(&dir)?;
    let outcomes: Vec<Outcome> = files.iter().flat_map(|f| run_file(f)).collect();
    if outcomes.len() < files.len() {
        return Err(format!(
            "{} runs for {} case files in {}",
            outcomes.len(),
            files.len(),
            dir.display()
        ));
    }
    tally::tally("mha forward", &outcomes)
}

/// The gradients of the inputs and of every parameter, for every case that stores them.
pub fn check_gradients() -> Result<String, String> {
    let files = case_files(&default_dir())?;
    let outcomes: Vec<Outcome> = files.iter().filter_map(|f| run_grads(f)).collect();
    tally::tally("mha gradients", &outcomes)
}
