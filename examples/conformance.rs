//! Checks attn against conformance case files produced by the real Flax and JAX, e.g. ones
//! generated for your own model:
//!
//! ```text
//! cargo run --release --example conformance -- [DIR ...]
//! ```
//!
//! Each file is run through the public APIs its set calls for, recognised by its `function`
//! field: Flax's `dot_product_attention(_weights)` (the weights path, and the output path for
//! `dot_product_attention`), `jax.nn.dot_product_attention` and Flax with structured masks (both
//! paths; Flax's also with the stored dense mask), and `MultiHeadDotProductAttention` (from each
//! of its checkpoint files). Prints one line per run — the case, PASS/FAIL, the route, the
//! tensors it checked and the worst |error| / tolerance — then, for a case with stored `grads`,
//! one line per backward path naming the gradients it checked; it ends with `N passed, M failed`;
//! the exit status is non-zero if any run fails or no case is found. Without DIR it runs the
//! three sets of ../shared/conformance (`cases`, `jax_nn`, `mha`, or `$ATTN_CONFORMANCE_DIR`,
//! `$ATTN_JAX_NN_DIR`, `$ATTN_MHA_CONFORMANCE_DIR`).

// The verdict of a case set, shared by the runners below.
#[path = "../tests/support/conformance.rs"]
mod conformance;
#[path = "../tests/support/grads.rs"]
mod grads;
#[path = "../tests/support/jax_nn.rs"]
mod jax_nn;
#[path = "../tests/support/mha.rs"]
mod mha;
#[path = "../tests/support/tally.rs"]
mod tally;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// One line of the report: its text and whether it passed.
struct Line {
    text: String,
    passed: bool,
}

/// Every run of one case file, by the set its `function` names, then its stored gradients.
fn run(file: &Path) -> Vec<Line> {
    let mut lines = run_forward(file);
    lines.extend(run_grads(file));
    lines
}

/// The stored `grads` of a case (if any) through the VJPs, on both backward paths; Flax's
/// structured cases with the mask as its structure and as the stored dense mask.
fn run_grads(file: &Path) -> Vec<Line> {
    let Ok(case) = grads::load(file) else {
        return Vec::new();
    };
    let sets = [
        grads::Set::Flax,
        grads::Set::JaxNn,
        grads::Set::Structured(grads::MaskForm::Structure),
        grads::Set::Structured(grads::MaskForm::Dense),
    ];
    let mut lines = Vec::new();
    for set in sets {
        for route in [grads::Route::Weights, grads::Route::Tiled] {
            if let Some(o) = grads::run_case(&case, set, route) {
                lines.push(Line {
                    passed: o.passed(),
                    text: format!("{o}"),
                });
            }
        }
    }
    lines
}

/// The forward runs of one case file (and, for an `mha/` case, its gradients).
fn run_forward(file: &Path) -> Vec<Line> {
    if mha::is_mha_file(file) {
        return mha::run_file(file)
            .into_iter()
            .chain(mha::run_grads(file))
            .map(|o| Line {
                passed: o.passed(),
                text: format!("{o}"),
            })
            .collect();
    }
    let structured = [
        (jax_nn::Route::Output, jax_nn::Mask::Structure),
        (jax_nn::Route::Weights, jax_nn::Mask::Structure),
        (jax_nn::Route::Output, jax_nn::Mask::Dense),
        (jax_nn::Route::Weights, jax_nn::Mask::Dense),
    ];
    let lines: Vec<Line> = structured
        .into_iter()
        .filter_map(|(route, mask)| jax_nn::run_file(file, route, mask))
        .map(|o| Line {
            passed: o.passed(),
            text: format!("{o}"),
        })
        .collect();
    if !lines.is_empty() {
        return lines;
    }
    [conformance::Route::Weights, conformance::Route::Output]
        .into_iter()
        .filter_map(|route| conformance::run_file_via(file, route).map(|o| (route, o)))
        .map(|(route, o)| Line {
            passed: o.passed(),
            text: format!("{o}  ({route:?} path)"),
        })
        .collect()
}

fn main() -> ExitCode {
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![
            conformance::default_dir(),
            jax_nn::default_dir(),
            mha::default_dir(),
        ];
    }
    let (mut passed, mut failed) = (0, 0);
    for dir in &dirs {
        let files = match conformance::case_files(dir) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cannot read {e}");
                return ExitCode::FAILURE;
            }
        };
        for file in files.iter().filter(|f| !f.ends_with("index.json")) {
            for line in run(file) {
                println!("{}", line.text);
                if line.passed {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
