//! The verdict over the cases of one conformance set: a line per case, the counts, and an
//! error listing the failures. The runners of every set (`conformance.rs`, `grads.rs`,
//! `jax_nn.rs`, `mha.rs`) report through it, so that a test binary and the per-backend
//! harness (`tests/backends.rs`) read the same verdict.
#![allow(dead_code)]

use std::fmt::Display;

/// One case's verdict: whether it passed, and its report line.
pub trait Verdict: Display {
    /// Whether every check of the case passed.
    fn passed(&self) -> bool;
}

/// `Ok(report)` when there is at least one case and every case passed, else `Err` naming the
/// failures (or that no case was found). The report is one line per case, then the counts.
pub fn tally<V: Verdict>(label: &str, outcomes: &[V]) -> Result<String, String> {
    if outcomes.is_empty() {
        return Err(format!("{label}: no case found"));
    }
    let mut report: String = outcomes.iter().map(|o| format!("{o}\n")).collect();
    let failed: Vec<String> = (outcomes.iter().filter(|o| !o.passed()))
        .map(|o| o.to_string())
        .collect();
    report.push_str(&format!(
        "{label}: {} cases, {} passed, {} failed",
        outcomes.len(),
        outcomes.len() - failed.len(),
        failed.len()
    ));
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "{report}\n{label}: {} of {} cases failed:\n{}",
            failed.len(),
            outcomes.len(),
            failed.join("\n")
        ))
    }
}

/// Prints the report of a passing set; panics with the report of a failing one (for `#[test]`s).
pub fn assert_passes(result: Result<String, String>) {
    match result {
        Ok(report) => println!("{report}"),
        Err(report) => panic!("{report}"),
    }
}
