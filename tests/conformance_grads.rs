//! The stored gradients (`grads`) of every conformance case through attn's VJPs, on both
//! backward paths: `../shared/conformance/cases` (Flax, `$ATTN_CONFORMANCE_DIR`) and
//! `../shared/conformance/jax_nn` (`$ATTN_JAX_NN_DIR`): family A through
//! `attn::jax_nn::dot_product_attention_vjp`, family B through the Flax-style VJP with the mask
//! as its structure and as the stored dense mask. Each test prints one line per case and the
//! counts, and fails when it finds no case with gradients.

// The verdict of a case set, shared by the runners below.
#[path = "support/grads.rs"]
mod grads;
#[path = "support/tally.rs"]
mod tally;

use grads::{CASES, JAX_NN, MaskForm, Route, Set};
use tally::assert_passes;

fn run(var: &str, sub: &str, set: Set, route: Route) {
    assert_passes(grads::check_set(var, sub, set, route));
}

#[test]
fn flax_cases_weights_path() {
    run(CASES.0, CASES.1, Set::Flax, Route::Weights);
}

#[test]
fn flax_cases_tiled_path() {
    run(CASES.0, CASES.1, Set::Flax, Route::Tiled);
}

#[test]
fn flax_cases_saved_residuals() {
    run(CASES.0, CASES.1, Set::Flax, Route::Saved);
}

#[test]
fn jax_nn_family_b_structure_saved_residuals() {
    run(
        JAX_NN.0,
        JAX_NN.1,
        Set::Structured(MaskForm::Structure),
        Route::Saved,
    );
}

#[test]
fn jax_nn_family_a_weights_path() {
    run(JAX_NN.0, JAX_NN.1, Set::JaxNn, Route::Weights);
}

#[test]
fn jax_nn_family_a_tiled_path() {
    run(JAX_NN.0, JAX_NN.1, Set::JaxNn, Route::Tiled);
}

#[test]
fn jax_nn_family_b_structure_weights_path() {
    let set = Set::Structured(MaskForm::Structure);
    run(JAX_NN.0, JAX_NN.1, set, Route::Weights);
}

#[test]
fn jax_nn_family_b_structure_tiled_path() {
    let set = Set::Structured(MaskForm::Structure);
    run(JAX_NN.0, JAX_NN.1, set, Route::Tiled);
}

#[test]
fn jax_nn_family_b_dense_mask_weights_path() {
    let set = Set::Structured(MaskForm::Dense);
    run(JAX_NN.0, JAX_NN.1, set, Route::Weights);
}

#[test]
fn jax_nn_family_b_dense_mask_tiled_path() {
    let set = Set::Structured(MaskForm::Dense);
    run(JAX_NN.0, JAX_NN.1, set, Route::Tiled);
}
