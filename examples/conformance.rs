//! Checks attn against Flax conformance case files, e.g. ones generated for your own model:
//!
//! ```text
//! cargo run --release --example conformance -- DIR [DIR ...]
//! ```
//!
//! Runs every `*.json` case of each DIR: the attention-function cases (`cases/`) and the
//! `flax.linen.MultiHeadDotProductAttention` cases (`mha/`, loaded from their `.msgpack` and
//! `.safetensors` checkpoint files; decode cases step by step and as one multi-token call).
//! Prints one line per run (name, PASS/FAIL, worst |error| / tolerance, and for `mha/` runs the
//! tensors it compared) and ends with `N passed, M failed`; the exit status is non-zero if any
//! run fails or no case is found. Without DIR it uses `$ATTN_CONFORMANCE_DIR` (or
//! ../shared/conformance/cases) and `$ATTN_MHA_CONFORMANCE_DIR` (or ../shared/conformance/mha).

#[path = "../tests/support/conformance.rs"]
mod conformance;
#[path = "../tests/support/mha.rs"]
mod mha;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![conformance::default_dir(), mha::default_dir()];
    }
    let mut files = Vec::new();
    for dir in &dirs {
        match conformance::case_files(dir) {
            Ok(f) => files.extend(f),
            Err(e) => {
                eprintln!("cannot read {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if files.is_empty() {
        eprintln!("no case files (*.json) in {dirs:?}");
        return ExitCode::FAILURE;
    }
    let (mut passed, mut failed) = (0, 0);
    let mut count = |ok: bool| {
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    };
    for file in &files {
        if mha::is_mha_file(file) {
            for outcome in mha::run_file(file) {
                println!("{outcome}  checked: {}", outcome.checked());
                count(outcome.passed());
            }
        } else {
            let outcome = conformance::run_file(file);
            println!("{outcome}");
            count(outcome.passed());
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
