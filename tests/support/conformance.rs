//! Runs Flax conformance case files (`../shared/conformance/cases/*.json`, schema in that
//! directory's README) through attn's public Flax-style API and compares every expected tensor:
//! same dtype, same shape, and `|actual - expected| <= atol + rtol·|expected|` element by
//! element. Shared by `tests/conformance.rs` and `examples/conformance.rs`.
//!
//! `grads` are checked by `tests/conformance_grads.rs` (runner `tests/support/grads.rs`).
//!
//! `tests/layers.rs` runs cases through `attention!`-generated layers instead, with
//! [`load`], [`Case::input`] and [`run_case_with`]; items one user of this file does not need
//! are allowed to be unused there.
#![allow(dead_code)]

use super::tally;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use attn::{
    Array, DType, FlaxArgs, Intermediates, PairwiseFn, Precision, combine_masks,
    dot_product_attention, dot_product_attention_weights, make_attention_mask, make_causal_mask,
};
use serde::Deserialize;

/// The environment variable that overrides the case directory.
pub const DIR_VAR: &str = "ATTN_CONFORMANCE_DIR";

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

/// One case file (fields the runner needs).
#[derive(Deserialize, Debug)]
pub struct Case {
    name: String,
    function: String,
    params: serde_json::Value,
    inputs: BTreeMap<String, Option<TensorJson>>,
    expected: BTreeMap<String, Option<TensorJson>>,
    tolerance: BTreeMap<String, Tol>,
}

/// The comparison of one expected tensor.
#[derive(Debug)]
pub struct Check {
    /// The expected tensor's name.
    pub tensor: String,
    /// The worst `|actual - expected| / (atol + rtol·|expected|)` (infinite for a mismatch of a
    /// zero-tolerance element, NaN never passes).
    pub worst: f64,
    /// Why the tensor failed beyond the values (dtype or shape), if it did.
    pub problem: Option<String>,
}

impl Check {
    fn passed(&self) -> bool {
        self.problem.is_none() && self.worst <= 1.0
    }
}

/// The result of one case.
#[derive(Debug)]
pub struct Outcome {
    /// The case name.
    pub name: String,
    /// One entry per expected tensor.
    pub checks: Vec<Check>,
    /// An error that stopped the case (loading, or attn returned an error).
    pub error: Option<String>,
}

impl Outcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(Check::passed)
    }

    /// The worst error/tolerance ratio over all checks.
    pub fn worst(&self) -> f64 {
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
            "{:<40} {verdict}  checked {:<32} worst |err|/tol = {:.3}",
            self.name,
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

/// The case directory: `$ATTN_CONFORMANCE_DIR`, else `../shared/conformance/cases` next to the
/// workspace root.
pub fn default_dir() -> PathBuf {
    match std::env::var_os(DIR_VAR) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/cases"),
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

/// Which kernel path a case goes through. The runtime picks the path from what a call needs,
/// so the route forces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Weights returned or sown: the materialized weights path; every expected tensor is checked.
    Weights,
    /// `dot_product_attention` without a sow sink: the tiled output path; only `output` is
    /// checked, and cases of other functions are not run.
    Output,
}

/// Loads and runs one case file through `route`; `None` if the case has no such route (a
/// function other than `dot_product_attention` on [`Route::Output`]).
pub fn run_file_via(path: &Path, route: Route) -> Option<Outcome> {
    let case = match load(path) {
        Ok(case) => case,
        Err(e) => {
            return Some(Outcome {
                name: path.display().to_string(),
                checks: Vec::new(),
                error: Some(e),
            });
        }
    };
    match route {
        Route::Weights => Some(run_case(&case)),
        Route::Output if case.function == "dot_product_attention" => Some(run_case_checking(
            &case,
            |c| c.actual_via(Route::Output),
            |name| name == "output",
        )),
        Route::Output => None,
    }
}

/// Loads and runs one case file.
pub fn run_file(path: &Path) -> Outcome {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let loaded = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str::<Case>(&text).map_err(|e| e.to_string()));
    match loaded {
        Ok(case) => run_case(&case),
        Err(e) => Outcome {
            name: stem,
            checks: Vec::new(),
            error: Some(e),
        },
    }
}

fn dtype(name: &str) -> Result<DType, String> {
    DType::from_name(name).ok_or_else(|| format!("unknown dtype {name:?}"))
}

fn to_array(t: &TensorJson) -> Result<Array, String> {
    Array::from_f64(dtype(&t.dtype)?, &t.data, t.shape.clone()).map_err(|e| e.to_string())
}

impl Case {
    /// The case name (the file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `"dot_product_attention"`, `"dot_product_attention_weights"`, ...
    pub fn function(&self) -> &str {
        &self.function
    }

    /// An input as an array of its stored dtype (`None` if absent or null).
    pub fn input(&self, name: &str) -> Result<Option<Array>, String> {
        match self.inputs.get(name) {
            Some(Some(t)) => to_array(t).map(Some),
            _ => Ok(None),
        }
    }

    /// An input that must be present.
    pub fn required(&self, name: &str) -> Result<Array, String> {
        self.input(name)?
            .ok_or_else(|| format!("input {name:?} missing"))
    }

    /// A string parameter (`None` if absent or null).
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params.get(key).and_then(|v| v.as_str())
    }

    /// A boolean parameter that must be present.
    pub fn param_bool(&self, key: &str) -> Result<bool, String> {
        self.params
            .get(key)
            .and_then(|v| v.as_bool())
            .ok_or_else(|| format!("param {key:?} missing"))
    }

    fn param_usize(&self, key: &str) -> Result<usize, String> {
        self.params
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| format!("param {key:?} missing"))
    }

    /// Runs the case's function; returns name -> actual tensor (None for an expected null).
    fn actual(&self) -> Result<BTreeMap<String, Option<Array>>, String> {
        self.actual_via(Route::Weights)
    }

    /// [`Case::actual`] through `route`: on [`Route::Output`], `dot_product_attention` runs
    /// without a sow sink and only `output` is returned.
    fn actual_via(&self, route: Route) -> Result<BTreeMap<String, Option<Array>>, String> {
        let mut out = BTreeMap::new();
        let err = |e: attn::AttnError| e.to_string();
        match self.function.as_str() {
            "dot_product_attention" | "dot_product_attention_weights" => {
                let query = self.required("query")?;
                let key = self.required("key")?;
                let bias = self.input("bias")?;
                let mask = self.input("mask")?;
                let mut sink = Intermediates::new();
                let mut args = FlaxArgs::new()
                    .force_fp32_for_softmax(self.param_bool("force_fp32_for_softmax")?)
                    .deterministic(self.param_bool("deterministic")?)
                    .broadcast_dropout(self.param_bool("broadcast_dropout")?)
                    .dropout_rate(
                        self.params
                            .get("dropout_rate")
                            .and_then(|v| v.as_f64())
                            .unwrap_or(0.0),
                    );
                if let Some(d) = self.param_str("dtype") {
                    args = args.dtype(dtype(d)?);
                }
                if let Some(p) = self.param_str("precision") {
                    args = args.precision(match p {
                        "DEFAULT" => Precision::Default,
                        "HIGH" => Precision::High,
                        "HIGHEST" => Precision::Highest,
                        other => return Err(format!("unknown precision {other:?}")),
                    });
                }
                if let Some(b) = &bias {
                    args = args.bias(b);
                }
                if let Some(m) = &mask {
                    args = args.mask(m);
                }
                if self.function == "dot_product_attention" && route == Route::Output {
                    let value = self.required("value")?;
                    let output = dot_product_attention(&query, &key, &value, args).map_err(err)?;
                    out.insert("output".to_owned(), Some(output));
                } else if self.function == "dot_product_attention" {
                    let value = self.required("value")?;
                    let output =
                        dot_product_attention(&query, &key, &value, args.module(&mut sink))
                            .map_err(err)?;
                    let sown = sink.attention_weights();
                    if sown.len() != 1 {
                        return Err(format!(
                            "expected 1 sown weights array, found {}",
                            sown.len()
                        ));
                    }
                    out.insert("attention_weights".to_owned(), Some(sown[0].clone()));
                    out.insert("output".to_owned(), Some(output));
                } else {
                    let w = dot_product_attention_weights(&query, &key, args).map_err(err)?;
                    out.insert("attention_weights".to_owned(), Some(w));
                    out.insert("output".to_owned(), None);
                }
            }
            "make_causal_mask" => {
                let x = self.required("x")?;
                let m = make_causal_mask(
                    x.shape(),
                    self.param_usize("extra_batch_dims")?,
                    dtype(self.param_str("dtype").unwrap_or("float32"))?,
                )
                .map_err(err)?;
                out.insert("mask".to_owned(), Some(m));
            }
            "make_attention_mask" => {
                let q = self.required("query_input")?;
                let k = self.required("key_input")?;
                let f = self.param_str("pairwise_fn").unwrap_or("multiply");
                let f =
                    PairwiseFn::from_name(f).ok_or_else(|| format!("unknown pairwise_fn {f:?}"))?;
                let m = make_attention_mask(
                    &q,
                    &k,
                    f,
                    self.param_usize("extra_batch_dims")?,
                    dtype(self.param_str("dtype").unwrap_or("float32"))?,
                )
                .map_err(err)?;
                out.insert("mask".to_owned(), Some(m));
            }
            "combine_masks" => {
                let names = self
                    .params
                    .get("args")
                    .and_then(|v| v.as_array())
                    .ok_or("param \"args\" missing")?;
                let mut masks = Vec::new();
                for n in names {
                    masks.push(match n.as_str() {
                        Some(n) => Some(self.required(n)?),
                        None => None,
                    });
                }
                let refs: Vec<Option<&Array>> = masks.iter().map(Option::as_ref).collect();
                let m = combine_masks(&refs, dtype(self.param_str("dtype").unwrap_or("float32"))?)
                    .map_err(err)?;
                out.insert("mask".to_owned(), m);
            }
            other => return Err(format!("unknown function {other:?}")),
        }
        Ok(out)
    }
}

/// Compares one actual tensor with its expected tensor.
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
        check.problem = Some(format!(
            "{} elements != expected {}",
            actual.len(),
            e.data.len()
        ));
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
        if ratio > check.worst {
            check.worst = ratio;
        }
    }
    check
}

/// Runs one parsed case and compares every expected tensor.
pub fn run_case(case: &Case) -> Outcome {
    run_case_with(case, Case::actual)
}

/// The actual tensors of a case by expected name (`None` for an expected null).
pub type Actual = BTreeMap<String, Option<Array>>;

/// Compares every expected tensor of `case` with what `compute` returns for it (used to run the
/// cases through other implementations, such as `attention!`-generated layers).
pub fn run_case_with(
    case: &Case,
    compute: impl FnOnce(&Case) -> Result<Actual, String>,
) -> Outcome {
    run_case_checking(case, compute, |_| true)
}

/// [`run_case_with`], comparing only the expected tensors whose name `checked` accepts.
fn run_case_checking(
    case: &Case,
    compute: impl FnOnce(&Case) -> Result<Actual, String>,
    checked: impl Fn(&str) -> bool,
) -> Outcome {
    let mut outcome = Outcome {
        name: case.name.clone(),
        checks: Vec::new(),
        error: None,
    };
    match compute(case) {
        Err(e) => outcome.error = Some(e),
        Ok(actual) => {
            for (name, expected) in case.expected.iter().filter(|(n, _)| checked(n)) {
                let got = actual.get(name).and_then(Option::as_ref);
                if !actual.contains_key(name) {
                    outcome.checks.push(Check {
                        tensor: name.clone(),
                        worst: f64::INFINITY,
                        problem: Some("not produced by the runner".into()),
                    });
                    continue;
                }
                outcome.checks.push(compare(
                    name,
                    got,
                    expected.as_ref(),
                    case.tolerance.get(name).copied(),
                ));
            }
        }
    }
    outcome
}

impl tally::Verdict for Outcome {
    fn passed(&self) -> bool {
        Outcome::passed(self)
    }
}

/// Every case of the directory through `route`: [`Route::Weights`] runs every case and checks
/// every expected tensor; [`Route::Output`] runs the `dot_product_attention` cases on the tiled
/// path (at least 50 of them) and checks their output.
pub fn check_every_case(route: Route) -> Result<String, String> {
    let dir = default_dir();
    let files = case_files(&dir).map_err(|e| {
        format!("cannot read the conformance cases ({e}); set {DIR_VAR} to their directory")
    })?;
    let outcomes: Vec<Outcome> = match route {
        Route::Weights => files.iter().map(|f| run_file(f)).collect(),
        Route::Output => (files.iter())
            .filter_map(|f| run_file_via(f, Route::Output))
            .collect(),
    };
    if route == Route::Output && outcomes.len() < 50 {
        return Err(format!(
            "only {} dot_product_attention cases in {}",
            outcomes.len(),
            dir.display()
        ));
    }
    tally::tally(&format!("Flax cases, {route:?} route"), &outcomes)
}
