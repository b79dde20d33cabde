//! Every case of `../shared/conformance/mha/` (or `$ATTN_MHA_CONFORMANCE_DIR`) through
//! `attn::layer::MultiHeadDotProductAttention`, loaded from the case's checkpoint files: the
//! forward (outputs, sown weights, decode caches) and, for the cases that store them, the
//! gradients of the inputs and of every parameter.

#[path = "support/mha.rs"]
mod mha;

#[test]
fn every_mha_case_passes_from_its_checkpoint_files() {
    let dir = mha::default_dir();
    let files = mha::case_files(&dir).expect("the mha case directory");
    assert!(!files.is_empty(), "no mha cases in {}", dir.display());
    let (mut passed, mut failed) = (0, 0);
    let mut report = String::new();
    for file in &files {
        for outcome in mha::run_file(file) {
            report.push_str(&format!("{outcome}\n"));
            if outcome.passed() {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    println!(
        "{report}{} case files: {passed} runs passed, {failed} failed",
        files.len()
    );
    assert_eq!(failed, 0, "{report}");
    assert!(passed >= files.len());
}

#[test]
fn every_mha_gradient_case_passes() {
    let dir = mha::default_dir();
    let files = mha::case_files(&dir).expect("the mha case directory");
    let outcomes: Vec<mha::Outcome> = files.iter().filter_map(|f| mha::run_grads(f)).collect();
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.to_string())
        .collect();
    for o in &outcomes {
        println!("{o}");
    }
    println!(
        "{} cases with gradients: {} passed, {} failed",
        outcomes.len(),
        outcomes.len() - failed.len(),
        failed.len()
    );
    assert!(
        !outcomes.is_empty(),
        "no mha case with gradients in {}",
        dir.display()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
