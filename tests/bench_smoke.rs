//! CI smoke test of the benchmarks: every case of every suite, shrunk to microseconds (`tiny`),
//! through the benchmark code itself (`benches/grid.rs`, `benches/support/suites.rs`: a
//! subdirectory, or cargo would make it a bench target), on 2 threads.
//! The real measurements are `cargo bench` and `bench/compare.sh` (not run in CI).

#[allow(dead_code)]
#[path = "../benches/grid.rs"]
mod grid;
#[allow(dead_code)]
#[path = "../benches/support/suites.rs"]
mod suites;

fn numbers(name: &str, results: &[f32]) {
    assert!(!results.is_empty(), "{name}");
    assert!(
        results.iter().all(|x| x.is_finite()) && results.iter().any(|&x| x != 0.0),
        "{name}: results not finite or all zero"
    );
}

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
        numbers(case.name, &buffers.results());
    }
}

#[test]
fn every_structured_case_runs() {
    let pool = grid::pool(2);
    for case in grid::STRUCTURED.iter().chain(grid::STRUCTURED_MEMORY) {
        let tiny = case.tiny();
        assert!(tiny.kv_bytes() > 0.0 && tiny.qkvo_bytes() > tiny.kv_bytes());
        let mut buffers = suites::StructuredBuffers::new(&tiny);
        buffers
            .run(&pool)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        numbers(case.name, &buffers.output());
    }
    // Packed with segment ids (causal within each) computes what the sequences run one by one
    // compute (the same inputs: the packed row is the sequences laid end to end).
    let tiny = |name: &str| {
        grid::STRUCTURED
            .iter()
            .find(|c| c.name == name)
            .expect("case")
            .tiny()
    };
    let mut packed = suites::StructuredBuffers::new(&tiny("packed8_h8_l4096_d64"));
    let mut one = suites::StructuredBuffers::new(&tiny("one_by_one8_h8_l4096_d64"));
    packed.run(&pool).unwrap();
    one.run(&pool).unwrap();
    let (a, b) = (packed.output(), one.output());
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5),
        "packed != one by one"
    );
    // The causal tensor computes what the declared causal mask computes.
    let mut tensor = suites::StructuredBuffers::new(&tiny("causal_tensor_h8_l4095_d64"));
    let mut declared = suites::StructuredBuffers::new(&tiny("causal_h8_l4095_d64"));
    tensor.run(&pool).unwrap();
    declared.run(&pool).unwrap();
    let (a, b) = (tensor.output(), declared.output());
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5),
        "tensor != declared"
    );
}

#[test]
fn every_layer_case_runs() {
    let pool = grid::pool(2);
    for case in grid::LAYER {
        let tiny = case.tiny();
        assert!(tiny.cache_bytes() > 0.0 && tiny.param_bytes() > 0.0);
        let mut bench =
            suites::LayerBench::new(&tiny, &pool).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for empty in [false, true, false] {
            bench
                .run(&pool, empty)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let out = bench.output.as_ref().expect("an output");
            let want = if tiny.decode { 1 } else { tiny.len };
            assert_eq!(out.shape(), &[1, want, tiny.features], "{}", case.name);
            let v: Vec<f32> = out.to_f64_vec().iter().map(|&x| x as f32).collect();
            numbers(case.name, &v);
        }
    }
}

#[test]
fn every_forward_backward_case_runs() {
    let pool = grid::pool(2);
    for case in grid::GRID.iter().chain([&grid::MEMORY_CASE]) {
        if case.dtype != grid::Dtype::F32 {
            continue;
        }
        let mut bench = suites::FwdBwd::new(&case.tiny()).unwrap();
        bench
            .run(&pool)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(bench.results.len(), 4, "{}", case.name);
        for a in &bench.results {
            let v: Vec<f32> = a.to_f64_vec().iter().map(|&x| x as f32).collect();
            numbers(case.name, &v);
        }
    }
}
