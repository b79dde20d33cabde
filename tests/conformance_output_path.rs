//! Every `dot_product_attention` conformance case through the tiled output path: called without
//! a sow sink, the runtime computes the output without materializing the weights
//! (`attn-runtime/src/kernel/flash/`).
//! `tests/conformance.rs` runs every case with a sink, through the weights path; together every
//! case passes through both paths. Fails when no case file is found.

#[path = "support/conformance.rs"]
mod conformance;

use conformance::Route;

#[test]
fn every_output_case_passes_through_the_tiled_path() {
    let dir = conformance::default_dir();
    let files = conformance::case_files(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the conformance cases ({e}); set {} to their directory",
            conformance::DIR_VAR
        )
    });
    let outcomes: Vec<_> = files
        .iter()
        .filter_map(|f| conformance::run_file_via(f, Route::Output))
        .collect();
    assert!(
        outcomes.len() >= 50,
        "only {} dot_product_attention cases in {}",
        outcomes.len(),
        dir.display()
    );
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.to_string())
        .collect();
    println!(
        "{} passed, {} failed",
        outcomes.len() - failed.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        outcomes.len(),
        failed.join("\n")
    );
}
