//! Every `dot_product_attention` conformance case through the tiled output path: called without
//! a sow sink, the runtime computes the output without materializing the weights
//! (`attn-runtime/src/kernel/flash/`).
//! `tests/conformance.rs` runs every case with a sink, through the weights path; together every
//! case passes through both paths. Fails when no case file is found.

// The verdict of a case set, shared by the runners below.
#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/tally.rs"]
mod tally;

use conformance::Route;
use tally::assert_passes;

#[test]
fn every_output_case_passes_through_the_tiled_path() {
    assert_passes(conformance::check_every_case(Route::Output));
}
