//! The cases of ../shared/conformance/jax_nn (or `$ATTN_JAX_NN_DIR`) through the public APIs:
//! family A (`jax.nn.dot_product_attention`) through `attn::jax_nn` on the output path (output,
//! residual, residual_neg_inf) and the weights path (output); family B
//! (`flax.linen.dot_product_attention` with structured masks) through the Flax-style API with the
//! mask as its structure on both paths, and once more with the stored dense mask. Each test fails
//! when it finds no case of its family.

// The verdict of a case set, shared by the runners below.
#[path = "support/jax_nn.rs"]
mod jax_nn;
#[path = "support/tally.rs"]
mod tally;

use jax_nn::{Family, Mask, Route};
use tally::assert_passes;

fn run(family: Family, route: Route, mask: Mask) {
    assert_passes(jax_nn::check_family(family, route, mask));
}

#[test]
fn jax_nn_cases_on_the_output_path_with_residual() {
    run(Family::JaxNn, Route::Output, Mask::Structure);
}

#[test]
fn jax_nn_cases_on_the_weights_path() {
    run(Family::JaxNn, Route::Weights, Mask::Structure);
}

#[test]
fn flax_structured_cases_on_the_output_path() {
    run(Family::FlaxStructured, Route::Output, Mask::Structure);
}

#[test]
fn flax_structured_cases_on_the_weights_path() {
    run(Family::FlaxStructured, Route::Weights, Mask::Structure);
}

#[test]
fn flax_structured_cases_with_the_dense_mask() {
    run(Family::FlaxStructured, Route::Output, Mask::Dense);
    run(Family::FlaxStructured, Route::Weights, Mask::Dense);
}
