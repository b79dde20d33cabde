//! The cases of ../shared/conformance/jax_nn (or `$ATTN_JAX_NN_DIR`) through the public APIs:
//! family A (`jax.nn.dot_product_attention`) through `attn::jax_nn` on the output path (output,
//! residual, residual_neg_inf) and the weights path (output); family B
//! (`flax.linen.dot_product_attention` with structured masks) through the Flax-style API with the
//! mask as its structure on both paths, and once more with the stored dense mask. Each test fails
//! when it finds no case of its family.

#[path = "support/jax_nn.rs"]
mod jax_nn;

use jax_nn::{Family, Mask, Route};

fn run(family: Family, route: Route, mask: Mask) {
    let dir = jax_nn::default_dir();
    let files = jax_nn::case_files(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the jax_nn cases ({e}); set {} to their directory",
            jax_nn::DIR_VAR
        )
    });
    let outcomes: Vec<_> = files
        .iter()
        .filter(|f| {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            // Cheap pre-filter by the public naming (jnn_* family A, flx_* family B); the
            // runner checks the `function` field itself.
            match (family, name.as_deref()) {
                (Family::JaxNn, Some(n)) => !n.starts_with("flx_"),
                (Family::FlaxStructured, Some(n)) => !n.starts_with("jnn_"),
                _ => false,
            }
        })
        .filter_map(|f| jax_nn::run_file(f, route, mask))
        .collect();
    assert!(
        !outcomes.is_empty(),
        "no {family:?} case files in {}",
        dir.display()
    );
    for o in &outcomes {
        println!("{o}");
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.to_string())
        .collect();
    println!(
        "{family:?} {route:?} {mask:?}: {} passed, {} failed",
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
