//! Every Flax conformance case (../shared/conformance/cases, or `$ATTN_CONFORMANCE_DIR`) through
//! the public Flax-style API: dtype, shape and the stored tolerance of every expected tensor.
//! Fails when no case file is found. Gradients (`grads`) are checked by `conformance_grads.rs`.

#[path = "support/conformance.rs"]
mod conformance;

#[test]
fn every_conformance_case_passes() {
    let dir = conformance::default_dir();
    let files = conformance::case_files(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the conformance cases ({e}); set {} to their directory",
            conformance::DIR_VAR
        )
    });
    assert!(
        !files.is_empty(),
        "no case files (*.json) in {}",
        dir.display()
    );
    let outcomes: Vec<_> = files.iter().map(|f| conformance::run_file(f)).collect();
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
