//! Every case of `../shared/conformance/mha/` (or `$ATTN_MHA_CONFORMANCE_DIR`) through
//! `attn::layer::MultiHeadDotProductAttention`, loaded from the case's checkpoint files: the
//! forward (outputs, sown weights, decode caches) and, for the cases that store them, the
//! gradients of the inputs and of every parameter.

// The verdict of a case set, shared by the runners below.
#[path = "support/mha.rs"]
mod mha;
#[path = "support/tally.rs"]
mod tally;

use tally::assert_passes;

#[test]
fn every_mha_case_passes_from_its_checkpoint_files() {
    assert_passes(mha::check_forward());
}

#[test]
fn every_mha_gradient_case_passes() {
    assert_passes(mha::check_gradients());
}
