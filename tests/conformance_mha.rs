//! Every case of `../shared/conformance/mha/` (or `$ATTN_MHA_CONFORMANCE_DIR`) through
//! `attn::layer::MultiHeadDotProductAttention`, loaded from the case's checkpoint files.

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
