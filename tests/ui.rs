//! Compile tests of `attention!` (trybuild): every compile-time error has a case under
//! `tests/ui/fail/` with the compiler's full output in its `.stderr`; the cases under
//! `tests/ui/pass/` must build and run. Because there are pass cases, trybuild runs a full
//! `cargo build` (not `cargo check`), so errors that only appear after monomorphization would
//! show up too. Re-bless with `TRYBUILD=overwrite cargo test --test ui` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
