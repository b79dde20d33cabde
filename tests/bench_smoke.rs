//! CI smoke test of the benchmarks: every grid case, shrunk to microseconds (`Case::tiny`),
//! through both kernel paths with the benchmark code itself (`benches/grid.rs`), on 2 threads.
//! The real measurements are `cargo bench` and `bench/compare.sh` (not run in CI).

#[allow(dead_code)]
#[path = "../benches/grid.rs"]
mod grid;

#[test]
fn every_benchmark_case_runs_both_paths() {
    let pool = grid::pool(2);
    for case in grid::GRID.iter().chain([&grid::MEMORY_CASE]) {
        let tiny = case.tiny();
        assert!(
            tiny.flops(false) > 0.0 && tiny.kv_bytes() > 0.0,
            "{}",
            case.name
        );
        let mut buffers = grid::Buffers::new(&tiny, true);
        buffers
            .run_output(&pool)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        buffers
            .run_weights(&pool)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let results = buffers.results();
        assert!(!results.is_empty(), "{}", case.name);
        assert!(
            results.iter().all(|x| x.is_finite()) && results.iter().any(|&x| x != 0.0),
            "{}: results not finite or all zero",
            case.name
        );
    }
}
