//! Runs the cases of `../shared/conformance/jax_nn/` (schema: the section "Set `jax_nn/`" of that
//! directory's README) through attn's public APIs:
//!
//! - family A (`function == "jax.nn.dot_product_attention"`) through
//!   [`attn::jax_nn::dot_product_attention`]: on the output path (no sink) `output`, `residual`
//!   and `residual_neg_inf`; on the weights path (a sow sink) `output`;
//! - family B (`function == "flax.linen.dot_product_attention"`) through the Flax-style API with
//!   the mask given as its structure (`params.mask_structure` and the small int32 inputs, never
//!   the stored dense mask): on the weights path (a sow sink) `attention_weights` and `output`,
//!   on the output path `output`. [`Mask::Dense`] runs the same cases with the stored dense mask.
//!
//! Every comparison is `|actual - expected| <= atol + rtol·|expected|` with the case's own
//! tolerance, after checking dtype and shape. `grads` are not checked here.
#![allow(dead_code)]

use super::tally;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use attn::jax_nn::{JaxArgs, dot_product_attention as jax_attention};
use attn::kernel::{Align, Window};
use attn::{Array, DType, FlaxArgs, Intermediates, dot_product_attention};
use serde::Deserialize;

/// The environment variable that overrides the case directory.
pub const DIR_VAR: &str = "ATTN_JAX_NN_DIR";

/// One tensor of a case file.
#[derive(Deserialize, Debug)]
struct TensorJson {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// A tolerance of a case file.
#[derive(Deserialize, Debug, Clone, Copy)]
struct Tol {
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
    expected: BTreeMap<String, Option<TensorJson>>,
    tolerance: BTreeMap<String, Tol>,
}

/// Which family a case belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `jax.nn.dot_product_attention`.
    JaxNn,
    /// `flax.linen.dot_product_attention` with a structured mask.
    FlaxStructured,
}

/// Which kernel path a case goes through (the runtime picks the path from what a call needs,
/// so the route forces it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A sow sink: the materialized weights path.
    Weights,
    /// No sink: the tiled output path.
    Output,
}

/// How family B's mask is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// `params.mask_structure` with the int32 inputs.
    Structure,
    /// The stored dense bool mask (what flax received).
    Dense,
}

/// The comparison of one expected tensor.
#[derive(Debug)]
pub struct Check {
    /// The expected tensor's name.
    pub tensor: String,
    /// The worst `|actual - expected| / (atol + rtol·|expected|)`.
    pub worst: f64,
    /// Why the tensor failed beyond its values (dtype, shape), if it did.
    pub problem: Option<String>,
}

impl Check {
    fn passed(&self) -> bool {
        self.problem.is_none() && self.worst <= 1.0
    }
}

/// The result of one case on one route.
#[derive(Debug)]
pub struct Outcome {
    /// The case name.
    pub name: String,
    /// What was run (family, route, mask form).
    pub how: String,
    /// One entry per checked tensor.
    pub checks: Vec<Check>,
    /// An error that stopped the case.
    pub error: Option<String>,
}

impl Outcome {
    /// Whether every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(Check::passed)
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
        let checked: Vec<&str> = self.checks.iter().map(|c| c.tensor.as_str()).collect();
        write!(
            f,
            "{:<36} {verdict}  {:<28} checked {:<40} worst |err|/tol = {:.3}",
            self.name,
            self.how,
            checked.join(", "),
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

/// The case directory: `$ATTN_JAX_NN_DIR`, else `../shared/conformance/jax_nn` next to the
/// workspace root.
pub fn default_dir() -> PathBuf {
    match std::env::var_os(DIR_VAR) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/jax_nn"),
    }
}

/// Every case file in `dir` (`*.json` except `index.json`), sorted by name.
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

    /// The family, or `None` for another function.
    pub fn family(&self) -> Option<Family> {
        match self.function.as_str() {
            "jax.nn.dot_product_attention" => Some(Family::JaxNn),
            "flax.linen.dot_product_attention" => Some(Family::FlaxStructured),
            _ => None,
        }
    }

    fn input(&self, name: &str) -> Result<Option<Array>, String> {
        match self.inputs.get(name) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    fn required(&self, name: &str) -> Result<Array, String> {
        self.input(name)?
            .ok_or_else(|| format!("input {name:?} missing"))
    }

    fn param(&self, key: &str) -> Option<&serde_json::Value> {
        self.params.get(key).filter(|v| !v.is_null())
    }

    /// Family A: the jax.nn call, output (and residual on the output path).
    fn run_jax_nn(&self, route: Route) -> Result<BTreeMap<String, Array>, String> {
        let err = |e: attn::AttnError| e.to_string();
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
                let lr = v
                    .as_array()
                    .ok_or("local_window_size: not an int or a pair")?;
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
            is_causal: self
                .param("is_causal")
                .and_then(|v| v.as_bool())
                .ok_or("param is_causal missing")?,
            query_seq_lengths: ql.as_ref(),
            key_value_seq_lengths: kl.as_ref(),
            local_window_size: window,
            return_residual: route == Route::Output,
            module: match route {
                Route::Weights => Some(&mut sink),
                Route::Output => None,
            },
            pool: None,
        };
        let got = jax_attention(&query, &key, &value, args).map_err(err)?;
        let mut out = BTreeMap::new();
        out.insert("output".to_owned(), got.output);
        if let Some(r) = got.residual {
            out.insert("residual".to_owned(), r);
        }
        if route == Route::Weights && sink.attention_weights().len() != 1 {
            return Err(format!(
                "expected 1 sown weights array (the weights path), found {}",
                sink.attention_weights().len()
            ));
        }
        Ok(out)
    }

    /// Family B: flax's dot_product_attention with the structure (or the dense mask).
    fn run_flax(&self, route: Route, how: Mask) -> Result<BTreeMap<String, Array>, String> {
        let err = |e: attn::AttnError| e.to_string();
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
        let q_len = self
            .param("q_len")
            .and_then(|v| v.as_u64())
            .ok_or("q_len")? as usize;
        let kv_len = self
            .param("kv_len")
            .and_then(|v| v.as_u64())
            .ok_or("kv_len")? as usize;
        let mut args = FlaxArgs::new().deterministic(true);
        if let Some(b) = &bias {
            args = args.bias(b);
        }
        match how {
            Mask::Dense => {
                args = args.mask(dense.as_ref().ok_or("the case has no dense mask")?);
            }
            Mask::Structure => {
                let structure = self.param("mask_structure").ok_or("no mask_structure")?;
                let leaves = match structure.get("kind").and_then(|k| k.as_str()) {
                    Some("and") => structure
                        .get("terms")
                        .and_then(|t| t.as_array())
                        .ok_or("an \"and\" without terms")?
                        .iter()
                        .collect::<Vec<_>>(),
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
                            return Err(format!(
                                "{align:?} gives q_offset {}, the case says {offset}",
                                align.q_offset(q_len, kv_len)
                            ));
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
        }
        let mut sink = Intermediates::new();
        let mut out = BTreeMap::new();
        match route {
            Route::Output => {
                let o = dot_product_attention(&query, &key, &value, args).map_err(err)?;
                out.insert("output".to_owned(), o);
            }
            Route::Weights => {
                let o = dot_product_attention(&query, &key, &value, args.module(&mut sink))
                    .map_err(err)?;
                let sown = sink.attention_weights();
                if sown.len() != 1 {
                    return Err(format!(
                        "expected 1 sown weights array, found {}",
                        sown.len()
                    ));
                }
                out.insert("attention_weights".to_owned(), sown[0].clone());
                out.insert("output".to_owned(), o);
            }
        }
        Ok(out)
    }
}

/// Compares one actual tensor with its expected tensor; elements where `skip` is true are not
/// compared (the `-inf` residuals the file stores as 0, checked by [`compare_neg_inf`]).
fn compare(name: &str, a: &Array, e: &TensorJson, tol: Tol, skip: &[bool]) -> Check {
    let mut check = Check {
        tensor: name.to_owned(),
        worst: 0.0,
        problem: None,
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
    for (n, (x, y)) in actual.iter().zip(&e.data).enumerate() {
        if skip.get(n).copied().unwrap_or(false) {
            continue;
        }
        let err = (x - y).abs();
        let bound = tol.atol + tol.rtol * y.abs();
        let ratio = if err == 0.0 {
            0.0
        } else if bound == 0.0 || err.is_nan() {
            f64::INFINITY
        } else {
            err / bound
        };
        if ratio > check.worst {
            check.worst = ratio;
        }
    }
    check
}

/// The elements flagged in `residual_neg_inf` must be exactly `-inf` in the residual.
fn compare_neg_inf(residual: &Array, flags: &[bool]) -> Check {
    let values = residual.to_f64_vec();
    let wrong = values
        .iter()
        .zip(flags)
        .filter(|&(&v, &f)| f && v != f64::NEG_INFINITY)
        .count();
    Check {
        tensor: "residual_neg_inf".to_owned(),
        worst: if wrong == 0 { 0.0 } else { f64::INFINITY },
        problem: (wrong > 0).then(|| format!("{wrong} flagged elements are not -inf")),
    }
}

/// Runs one case file on `route` (family B with the mask given as `mask`). `None` when the
/// file is of neither family.
pub fn run_file(path: &Path, route: Route, mask: Mask) -> Option<Outcome> {
    let case = match load(path) {
        Ok(c) => c,
        Err(e) => {
            return Some(Outcome {
                name: path.display().to_string(),
                how: String::new(),
                checks: Vec::new(),
                error: Some(e),
            });
        }
    };
    let family = case.family()?;
    if family == Family::JaxNn && mask == Mask::Dense {
        return None;
    }
    let how = match (family, route, mask) {
        (Family::JaxNn, Route::Output, _) => "jax.nn output path",
        (Family::JaxNn, Route::Weights, _) => "jax.nn weights path",
        (Family::FlaxStructured, Route::Output, Mask::Structure) => "flax structure output path",
        (Family::FlaxStructured, Route::Weights, Mask::Structure) => "flax structure weights path",
        (Family::FlaxStructured, Route::Output, Mask::Dense) => "flax dense-mask output path",
        (Family::FlaxStructured, Route::Weights, Mask::Dense) => "flax dense-mask weights path",
    };
    let mut outcome = Outcome {
        name: case.name.clone(),
        how: how.to_owned(),
        checks: Vec::new(),
        error: None,
    };
    let actual = match family {
        Family::JaxNn => case.run_jax_nn(route),
        Family::FlaxStructured => case.run_flax(route, mask),
    };
    let actual = match actual {
        Ok(a) => a,
        Err(e) => {
            outcome.error = Some(e);
            return Some(outcome);
        }
    };
    let wanted: &[&str] = match (family, route) {
        (Family::JaxNn, Route::Output) => &["output", "residual"],
        (Family::JaxNn, Route::Weights) => &["output"],
        (Family::FlaxStructured, Route::Output) => &["output"],
        (Family::FlaxStructured, Route::Weights) => &["attention_weights", "output"],
    };
    let neg_inf: Vec<bool> = match case.expected.get("residual_neg_inf") {
        Some(Some(t)) => t.data.iter().map(|&x| x != 0.0).collect(),
        _ => Vec::new(),
    };
    for &name in wanted {
        let Some(Some(expected)) = case.expected.get(name) else {
            outcome.checks.push(Check {
                tensor: name.to_owned(),
                worst: f64::INFINITY,
                problem: Some("no expected tensor in the case file".into()),
            });
            continue;
        };
        let Some(got) = actual.get(name) else {
            outcome.checks.push(Check {
                tensor: name.to_owned(),
                worst: f64::INFINITY,
                problem: Some("not produced".into()),
            });
            continue;
        };
        let Some(&tol) = case.tolerance.get(name) else {
            outcome.checks.push(Check {
                tensor: name.to_owned(),
                worst: f64::INFINITY,
                problem: Some("no tolerance in the case file".into()),
            });
            continue;
        };
        let skip: &[bool] = if name == "residual" { &neg_inf } else { &[] };
        outcome.checks.push(compare(name, got, expected, tol, skip));
        if name == "residual" && !neg_inf.is_empty() {
            outcome.checks.push(compare_neg_inf(got, &neg_inf));
        }
    }
    Some(outcome)
}

impl tally::Verdict for Outcome {
    fn passed(&self) -> bool {
        Outcome::passed(self)
    }
}

/// Every case of `family` in the directory through `route`, with the mask as `mask` says.
pub fn check_family(family: Family, route: Route, mask: Mask) -> Result<String, String> {
    let dir = default_dir();
    let files = case_files(&dir).map_err(|e| {
        format!("cannot read the jax_nn cases ({e}); set {DIR_VAR} to their directory")
    })?;
    let outcomes: Vec<Outcome> = files
        .iter()
        .filter(|f| {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            // Cheap pre-filter by the public naming (jnn_* family A, flx_* family B); the
            // runner checks the `function` field itself.
            match (family, name.as_deref()) {
                (Family::JaxNn, Some(n)) => !n.starts_with("flx_"),
                (Family::FlaxStructured, Some(n)) => !n.starts_with("jnn_"),
                _ => false,
            }
        })
        .filter_map(|f| run_file(f, route, mask))
        .collect();
    tally::tally(&format!("{family:?} {route:?} {mask:?}"), &outcomes)
}
