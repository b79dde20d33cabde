//! Runs the `grads` of the conformance cases through attn's VJPs: `cases/` (Flax
//! `dot_product_attention`), `jax_nn/` family A (`jax.nn.dot_product_attention`, through
//! `attn::jax_nn::dot_product_attention_vjp`) and family B (`flax.linen.dot_product_attention`
//! with structured masks, given as their structure and, once more, as the stored dense mask).
//! Each stored gradient (`query`, `key`, `value`, `bias`) is compared with the case's
//! `grad_*` tolerance: same dtype, same shape, `|actual - expected| <= atol + rtol·|expected|`.
#![allow(dead_code)]

use super::tally;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use attn::jax_nn::{JaxArgs, dot_product_attention_vjp as jax_vjp};
use attn::kernel::{Align, Window};
use attn::{
    Array, AttentionGrads, DType, FlaxArgs, Intermediates, Precision, dot_product_attention_bwd,
    dot_product_attention_fwd, dot_product_attention_vjp,
};
use serde::Deserialize;

/// One tensor of a case file.
#[derive(Deserialize, Debug)]
pub struct TensorJson {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// A tolerance of a case file.
#[derive(Deserialize, Debug, Clone, Copy)]
pub struct Tol {
    atol: f64,
    rtol: f64,
}

/// One case file (the fields the runner needs).
#[derive(Deserialize, Debug)]
pub struct Case {
    name: String,
    function: String,
    params: serde_json::Value,
    inputs: BTreeMap<String, Option<TensorJson>>,
    grads: Option<BTreeMap<String, Option<TensorJson>>>,
    tolerance: BTreeMap<String, Tol>,
}

/// Which backward computes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A sow sink: the materialized weights path.
    Weights,
    /// No sink: the tiled path.
    Tiled,
    /// `dot_product_attention_fwd`, then `dot_product_attention_bwd` with its residuals (the
    /// tiled path reading the saved logsumexp). Flax-style sets only.
    Saved,
}

/// How a family-B mask is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskForm {
    /// `params.mask_structure` with the int32 inputs.
    Structure,
    /// The stored dense bool mask.
    Dense,
}

/// The result of one case.
#[derive(Debug)]
pub struct Outcome {
    /// The case name.
    pub name: String,
    /// What ran.
    pub how: String,
    /// `(gradient, worst |err|/tol, problem)`.
    pub checks: Vec<(String, f64, Option<String>)>,
    /// An error that stopped the case.
    pub error: Option<String>,
}

impl Outcome {
    /// Whether every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && !self.checks.is_empty()
            && self.checks.iter().all(|(_, w, p)| p.is_none() && *w <= 1.0)
    }

    fn worst(&self) -> f64 {
        self.checks
            .iter()
            .map(|c| c.1)
            .fold(0.0, |a, b| if b.is_nan() || b > a { b } else { a })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let names: Vec<&str> = self.checks.iter().map(|c| c.0.as_str()).collect();
        write!(
            f,
            "{:<40} {verdict}  {:<22} checked {:<34} worst |err|/tol = {:.3}",
            self.name,
            self.how,
            names.join(", "),
            self.worst()
        )?;
        if let Some(e) = &self.error {
            write!(f, "  error: {e}")?;
        }
        for (n, w, p) in &self.checks {
            if let Some(p) = p {
                write!(f, "  {n}: {p}")?;
            } else if *w > 1.0 || w.is_nan() {
                write!(f, "  {n}: {w:.3}")?;
            }
        }
        Ok(())
    }
}

/// `$var`, else `../shared/conformance/<sub>` next to the workspace root.
pub fn dir(var: &str, sub: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/conformance")
            .join(sub),
    }
}

/// Every case file in `dir` (`*.json` except `index.json`), sorted.
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

/// Reads and parses one case file.
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

impl Case {
    /// The case name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The case's function.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// Whether the case stores gradients.
    pub fn has_grads(&self) -> bool {
        self.grads.is_some()
    }

    /// An input of the case, if stored.
    pub fn input(&self, name: &str) -> Result<Option<Array>, String> {
        match self.inputs.get(name) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    /// An input of the case that must be stored.
    pub fn required(&self, name: &str) -> Result<Array, String> {
        self.input(name)?
            .ok_or_else(|| format!("input {name:?} missing"))
    }

    fn param(&self, key: &str) -> Option<&serde_json::Value> {
        self.params.get(key).filter(|v| !v.is_null())
    }

    /// A boolean parameter of the case.
    pub fn param_bool(&self, key: &str) -> Result<bool, String> {
        self.param(key)
            .and_then(|v| v.as_bool())
            .ok_or_else(|| format!("param {key:?} missing"))
    }

    fn param_usize(&self, key: &str) -> Result<usize, String> {
        self.param(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| format!("param {key:?} missing"))
    }

    /// The stored cotangent of the output.
    pub fn cotangent(&self) -> Result<Array, String> {
        match self.grads.as_ref().and_then(|g| g.get("cotangent")) {
            Some(Some(t)) => to_array(t),
            _ => Err("no cotangent".into()),
        }
    }

    /// The Flax keyword arguments of a `cases/` case or of a family-B case.
    fn flax_args<'a>(
        &self,
        bias: Option<&'a Array>,
        mask: Option<&'a Array>,
    ) -> Result<FlaxArgs<'a>, String> {
        let mut args = FlaxArgs::new()
            .deterministic(self.param_bool("deterministic").unwrap_or(true))
            .force_fp32_for_softmax(self.param_bool("force_fp32_for_softmax").unwrap_or(false))
            .broadcast_dropout(self.param_bool("broadcast_dropout").unwrap_or(true))
            .dropout_rate(
                self.param("dropout_rate")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0),
            );
        if let Some(d) = self.param("dtype").and_then(|v| v.as_str()) {
            args = args.dtype(dtype(d)?);
        }
        if let Some(p) = self.param("precision").and_then(|v| v.as_str()) {
            args = args.precision(match p {
                "DEFAULT" => Precision::Default,
                "HIGH" => Precision::High,
                "HIGHEST" => Precision::Highest,
                other => return Err(format!("unknown precision {other:?}")),
            });
        }
        if let Some(b) = bias {
            args = args.bias(b);
        }
        if let Some(m) = mask {
            args = args.mask(m);
        }
        Ok(args)
    }

    /// A `cases/` case (Flax, dense mask).
    fn run_flax(&self, route: Route) -> Result<AttentionGrads, String> {
        let (q, k, v) = (
            self.required("query")?,
            self.required("key")?,
            self.required("value")?,
        );
        let (bias, mask) = (self.input("bias")?, self.input("mask")?);
        let args = self.flax_args(bias.as_ref(), mask.as_ref())?;
        let c = self.cotangent()?;
        if route == Route::Saved {
            return fwd_bwd(&q, &k, &v, &c, || {
                self.flax_args(bias.as_ref(), mask.as_ref())
            });
        }
        let mut sink = Intermediates::new();
        let args = match route {
            Route::Weights => args.module(&mut sink),
            Route::Tiled | Route::Saved => args,
        };
        dot_product_attention_vjp(&q, &k, &v, &c, args).map_err(|e| e.to_string())
    }

    /// A family-B case, its mask as structure or dense.
    fn run_structured(&self, route: Route, form: MaskForm) -> Result<AttentionGrads, String> {
        let (query, key, value) = (
            self.required("query")?,
            self.required("key")?,
            self.required("value")?,
        );
        let bias = self.input("bias")?;
        let dense = self.input("mask")?;
        let q_ids = self.input("query_segment_ids")?;
        let k_ids = self.input("key_segment_ids")?;
        let key_lengths = self.input("key_lengths")?;
        let (q_len, kv_len) = (self.param_usize("q_len")?, self.param_usize("kv_len")?);
        let build = || -> Result<FlaxArgs<'_>, String> {
            let mut args = match form {
                MaskForm::Dense => self.flax_args(bias.as_ref(), dense.as_ref())?,
                MaskForm::Structure => self.flax_args(bias.as_ref(), None)?,
            };
            if form == MaskForm::Structure {
                let structure = self.param("mask_structure").ok_or("no mask_structure")?;
                let leaves: Vec<&serde_json::Value> =
                    match structure.get("kind").and_then(|k| k.as_str()) {
                        Some("and") => structure
                            .get("terms")
                            .and_then(|t| t.as_array())
                            .ok_or("an \"and\" without terms")?
                            .iter()
                            .collect(),
                        _ => vec![structure],
                    };
                for leaf in leaves {
                    let kind = leaf.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                    let align = || -> Result<Align, String> {
                        let offset = leaf
                            .get("q_offset")
                            .and_then(|o| o.as_i64())
                            .ok_or("q_offset")?;
                        let align = match leaf.get("align").and_then(|a| a.as_str()) {
                            Some("top_left") => Align::TopLeft,
                            Some("bottom_right") => Align::BottomRight,
                            Some("offset") => Align::Offset(offset),
                            other => return Err(format!("unknown align {other:?}")),
                        };
                        if align.q_offset(q_len, kv_len) != offset {
                            return Err(format!("{align:?} does not give q_offset {offset}"));
                        }
                        Ok(align)
                    };
                    let size = |k: &str| -> Result<usize, String> {
                        leaf.get(k)
                            .and_then(|v| v.as_u64())
                            .map(|v| v as usize)
                            .ok_or_else(|| format!("window {k}"))
                    };
                    args = match kind {
                        "causal" => args.causal(align()?),
                        "window" => args.window(Window {
                            left: size("left")?,
                            right: size("right")?,
                            align: align()?,
                        }),
                        "segment" => args.segment_ids(
                            q_ids.as_ref().ok_or("query_segment_ids missing")?,
                            k_ids.as_ref().ok_or("key_segment_ids missing")?,
                        ),
                        "key_lengths" => {
                            args.kv_lengths(key_lengths.as_ref().ok_or("key_lengths missing")?)
                        }
                        other => return Err(format!("unknown mask leaf {other:?}")),
                    };
                }
            }
            Ok(args)
        };
        let args = build()?;
        let c = self.cotangent()?;
        if route == Route::Saved {
            return fwd_bwd(&query, &key, &value, &c, build);
        }
        let mut sink = Intermediates::new();
        let args = match route {
            Route::Weights => args.module(&mut sink),
            Route::Tiled | Route::Saved => args,
        };
        dot_product_attention_vjp(&query, &key, &value, &c, args).map_err(|e| e.to_string())
    }

    /// A family-A case (jax.nn).
    fn run_jax_nn(&self, route: Route) -> Result<AttentionGrads, String> {
        let (query, key, value) = (
            self.required("query")?,
            self.required("key")?,
            self.required("value")?,
        );
        let bias = self.input("bias")?;
        let mask = self.input("mask")?;
        let ql = self.input("query_seq_lengths")?;
        let kl = self.input("key_value_seq_lengths")?;
        let window = match self.param("local_window_size") {
            None => None,
            Some(v) if v.is_u64() => {
                let w = v.as_u64().unwrap_or(0) as usize;
                Some((w, w))
            }
            Some(v) => {
                let lr = v.as_array().ok_or("local_window_size")?;
                let get = |n: usize| lr.get(n).and_then(|x| x.as_u64()).map(|x| x as usize);
                Some((
                    get(0).ok_or("local_window_size[0]")?,
                    get(1).ok_or("local_window_size[1]")?,
                ))
            }
        };
        let mut sink = Intermediates::new();
        let args = JaxArgs {
            bias: bias.as_ref(),
            mask: mask.as_ref(),
            scale: self.param("scale").and_then(|v| v.as_f64()),
            is_causal: self.param_bool("is_causal")?,
            query_seq_lengths: ql.as_ref(),
            key_value_seq_lengths: kl.as_ref(),
            local_window_size: window,
            return_residual: false,
            module: match route {
                Route::Weights => Some(&mut sink),
                Route::Tiled | Route::Saved => None,
            },
            pool: None,
        };
        let c = self.cotangent()?;
        jax_vjp(&query, &key, &value, &c, args).map_err(|e| e.to_string())
    }
}

fn compare(name: &str, a: Option<&Array>, e: Option<&TensorJson>, tol: Option<Tol>) -> Check {
    let (a, e) = match (a, e) {
        (None, None) => return (name.to_owned(), 0.0, None),
        (Some(a), Some(e)) => (a, e),
        (a, _) => {
            let p = format!(
                "expected {}, got {}",
                if a.is_some() { "null" } else { "a tensor" },
                if a.is_some() { "a tensor" } else { "null" }
            );
            return (name.to_owned(), f64::INFINITY, Some(p));
        }
    };
    let Some(tol) = tol else {
        return (name.to_owned(), f64::INFINITY, Some("no tolerance".into()));
    };
    if a.dtype().name() != e.dtype {
        let p = format!("dtype {} != expected {}", a.dtype(), e.dtype);
        return (name.to_owned(), f64::INFINITY, Some(p));
    }
    if a.shape() != e.shape.as_slice() {
        let p = format!("shape {:?} != expected {:?}", a.shape(), e.shape);
        return (name.to_owned(), f64::INFINITY, Some(p));
    }
    let mut worst = 0.0f64;
    for (x, y) in a.to_f64_vec().iter().zip(&e.data) {
        let err = (x - y).abs();
        let bound = tol.atol + tol.rtol * y.abs();
        let ratio = if err == 0.0 {
            0.0
        } else if bound == 0.0 || err.is_nan() {
            f64::INFINITY
        } else {
            err / bound
        };
        if ratio > worst || ratio.is_nan() {
            worst = ratio;
        }
    }
    (name.to_owned(), worst, None)
}

type Check = (String, f64, Option<String>);

/// Which set a case comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Set {
    /// `cases/`: Flax's `dot_product_attention`.
    Flax,
    /// `jax_nn/` family A.
    JaxNn,
    /// `jax_nn/` family B, with the mask in the given form.
    Structured(MaskForm),
}

/// The forward keeping its residuals, then the backward reading them (`args()` gives the
/// same arguments twice).
fn fwd_bwd<'a>(
    q: &Array,
    k: &Array,
    v: &Array,
    c: &Array,
    args: impl Fn() -> Result<FlaxArgs<'a>, String>,
) -> Result<AttentionGrads, String> {
    let (out, saved) = dot_product_attention_fwd(q, k, v, args()?).map_err(|e| e.to_string())?;
    dot_product_attention_bwd(q, k, v, &out, &saved, c, args()?).map_err(|e| e.to_string())
}

/// Runs the gradients of one parsed case; `None` when the case has no gradients or is not of
/// `set`.
pub fn run_case(case: &Case, set: Set, route: Route) -> Option<Outcome> {
    let result = match (set, case.function.as_str()) {
        (Set::Flax, "dot_product_attention") => case.run_flax(route),
        (Set::JaxNn, "jax.nn.dot_product_attention") => case.run_jax_nn(route),
        (Set::Structured(form), "flax.linen.dot_product_attention") => {
            case.run_structured(route, form)
        }
        _ => return None,
    };
    check_grads(case, &format!("{set:?} {route:?}"), result)
}

/// Compares gradients computed by `how` with the case's stored ones; `None` when the case
/// stores no gradients.
pub fn check_grads(
    case: &Case,
    how: &str,
    result: Result<AttentionGrads, String>,
) -> Option<Outcome> {
    let grads = case.grads.as_ref()?;
    let mut outcome = Outcome {
        name: case.name.clone(),
        how: how.to_owned(),
        checks: Vec::new(),
        error: None,
    };
    match result {
        Err(e) => outcome.error = Some(e),
        Ok(g) => {
            let actual = [
                ("query", Some(&g.query)),
                ("key", Some(&g.key)),
                ("value", g.value.as_ref()),
                ("bias", g.bias.as_ref()),
            ];
            for (name, a) in actual {
                let e = grads.get(name).and_then(Option::as_ref);
                if a.is_none() && e.is_none() {
                    continue;
                }
                let tol = case.tolerance.get(&format!("grad_{name}")).copied();
                outcome.checks.push(compare(name, a, e, tol));
            }
        }
    }
    Some(outcome)
}

impl tally::Verdict for Outcome {
    fn passed(&self) -> bool {
        Outcome::passed(self)
    }
}

/// The stored gradients of every case of `set` in the directory (`$var`, else
/// `../shared/conformance/<sub>`) through `route`.
pub fn check_set(var: &str, sub: &str, set: Set, route: Route) -> Result<String, String> {
    let dir = dir(var, sub);
    let files = case_files(&dir)
        .map_err(|e| format!("cannot read the cases ({e}); set {var} to their directory"))?;
    let mut outcomes = Vec::new();
    for f in &files {
        outcomes.extend(run_case(&load(f)?, set, route));
    }
    tally::tally(&format!("{set:?} gradients, {route:?}"), &outcomes)
}

/// The Flax cases' directory: the variable and the folder under `../shared/conformance`.
pub const CASES: (&str, &str) = ("ATTN_CONFORMANCE_DIR", "cases");
/// The `jax.nn` cases' directory.
pub const JAX_NN: (&str, &str) = ("ATTN_JAX_NN_DIR", "jax_nn");
