//! Checks attn against Flax conformance case files, e.g. ones generated for your own model:
//!
//! ```text
//! cargo run --release --example conformance -- DIR
//! ```
//!
//! Prints one line per case (name, PASS/FAIL, worst |error| / tolerance) and ends with
//! `N passed, M failed`; the exit status is non-zero if any case fails or none is found.
//! Without DIR it uses `$ATTN_CONFORMANCE_DIR` or ../shared/conformance/cases.

#[path = "../tests/support/conformance.rs"]
mod conformance;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(conformance::default_dir, PathBuf::from);
    let files = match conformance::case_files(&dir) {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => {
            eprintln!("no case files (*.json) in {}", dir.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot read {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let outcome = conformance::run_file(file);
        println!("{outcome}");
        if outcome.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
