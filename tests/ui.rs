//! Compile tests of `attention!` (trybuild): every compile-time error has a case under
//! `tests/ui/fail/` with the compiler's full output in its `.stderr`; the cases under
//! `tests/ui/pass/` must build and run, and so must every ```` ```rust ```` block of README.md
//! (tag a block ```` ```rust,ignore ```` or ```` ```text ```` to leave it out).
//! Because there are pass cases, trybuild runs a full `cargo build` (not `cargo check`), so
//! errors that only appear after monomorphization would show up too. Re-bless with
//! `TRYBUILD=overwrite cargo test --test ui` and review the diff.

use std::path::PathBuf;

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
    for block in readme_rust_blocks() {
        cases.pass(block);
    }
}

/// Writes each ```` ```rust ```` block of README.md to its own file as a program: lines hidden
/// from the reader with rustdoc's `# ` prefix are unhidden, a block without `fn main` gets an
/// empty one, and unused items are allowed, as in a doctest. (The README is not a doctest: it is
/// not part of the crate docs.)
fn readme_rust_blocks() -> Vec<PathBuf> {
    let readme = include_str!("../README.md");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readme");
    std::fs::create_dir_all(&dir).expect("the target dir is writable");
    let mut blocks = Vec::new();
    let mut lines = readme.lines().enumerate();
    while let Some((start, line)) = lines.next() {
        if line.trim_end() != "```rust" {
            continue;
        }
        let mut program = String::from("#![allow(unused)]\n");
        for (_, line) in lines.by_ref().take_while(|(_, l)| l.trim_end() != "```") {
            let shown = line
                .strip_prefix("# ")
                .unwrap_or(if line == "#" { "" } else { line });
            program.push_str(shown);
            program.push('\n');
        }
        if !program.contains("fn main") {
            program.push_str("\nfn main() {}\n");
        }
        let path = dir.join(format!("readme_line_{}.rs", start + 1));
        std::fs::write(&path, program).expect("the target dir is writable");
        blocks.push(path);
    }
    assert!(blocks.len() >= 2, "README.md has its two Rust examples");
    blocks
}
