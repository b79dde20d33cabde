//! Expansion snapshots: the pretty-printed expansion (prettyplease) of every `attention!` in
//! `examples/*.rs` must equal the checked-in `tests/expand/<example>.expanded.rs`.
//!
//! After an intended change of the generated code, re-bless with
//! `ATTN_BLESS=1 cargo test --test expand` and review the diff like any other code change.

use std::path::Path;

#[test]
fn every_example_expands_as_its_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bless = std::env::var_os("ATTN_BLESS").is_some();
    let mut examples: Vec<_> = std::fs::read_dir(root.join("examples"))
        .expect("examples/ exists")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .collect();
    examples.sort();
    let mut checked = 0;
    let mut stale = Vec::new();
    for example in &examples {
        let source = std::fs::read_to_string(example).unwrap();
        if !source.contains("attention!") {
            continue;
        }
        let name = example.file_stem().unwrap().to_string_lossy();
        let expanded = match attn_expand::expand_source(&source) {
            Ok(text) => text,
            Err(errors) => {
                let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
                panic!("examples/{name}.rs does not expand: {messages:#?}");
            }
        };
        let expanded = format!(
            "// The expansion of the `attention!` declarations in examples/{name}.rs.\n\
             // Checked by tests/expand.rs; regenerate with `ATTN_BLESS=1 cargo test --test expand`.\n\n\
             {expanded}"
        );
        let snapshot = root
            .join("tests/expand")
            .join(format!("{name}.expanded.rs"));
        checked += 1;
        if bless {
            std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
            std::fs::write(&snapshot, &expanded).unwrap();
            continue;
        }
        let Ok(expected) = std::fs::read_to_string(&snapshot) else {
            stale.push(format!("{}: missing", snapshot.display()));
            continue;
        };
        if expected != expanded {
            let line = expected
                .lines()
                .zip(expanded.lines())
                .position(|(a, b)| a != b)
                .map_or_else(
                    || expected.lines().count().min(expanded.lines().count()) + 1,
                    |i| i + 1,
                );
            stale.push(format!(
                "{}: differs from the expansion from line {line}:\n  snapshot:  {}\n  expansion: {}",
                snapshot.display(),
                expected.lines().nth(line - 1).unwrap_or("<end>"),
                expanded.lines().nth(line - 1).unwrap_or("<end>"),
            ));
        }
    }
    assert!(checked >= 5, "expected the five examples, found {checked}");
    assert!(
        stale.is_empty(),
        "stale expansion snapshots (re-bless with ATTN_BLESS=1 after reviewing):\n{}",
        stale.join("\n")
    );
}
