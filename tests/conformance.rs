//! Every Flax conformance case (../shared/conformance/cases, or `$ATTN_CONFORMANCE_DIR`) through
//! the public Flax-style API: dtype, shape and the stored tolerance of every expected tensor.
//! Fails when no case file is found. Gradients (`grads`) are checked by `conformance_grads.rs`.

// The verdict of a case set, shared by the runners below.
#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/tally.rs"]
mod tally;

use conformance::Route;
use tally::assert_passes;

#[test]
fn every_conformance_case_passes() {
    assert_passes(conformance::check_every_case(Route::Weights));
}
