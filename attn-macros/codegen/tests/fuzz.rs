//! Fuzz-style property tests of the whole macro: random declarations drawn from the grammar,
//! and token-level mutations (delete, duplicate, swap, replace) of the examples' declarations.
//!
//! For every input: no panic, and either code that parses as Rust items, or errors that each
//! point at a token of the input (a non-empty byte range), never at nothing. The fallback
//! expansion (errors plus stub layers) must parse as Rust items too.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A runner with `default` cases (or `ATTN_FUZZ_CASES`), from a fixed seed so that CI is
/// reproducible; `ATTN_FUZZ_RANDOM=1` draws a fresh seed for longer local runs.
fn runner(default: u32) -> TestRunner {
    let cases = std::env::var("ATTN_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("ATTN_FUZZ_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    }
}

/// Runs the macro on `source` and checks the properties above.
fn check(source: &str, reached: &AtomicUsize) -> Result<(), TestCaseError> {
    let Ok(tokens) = TokenStream::from_str(source) else {
        // Not even tokens (unbalanced delimiters): rustc rejects it before the macro runs.
        return Ok(());
    };
    reached.fetch_add(1, Ordering::Relaxed);
    let empty = tokens.is_empty();
    let outcome = std::panic::catch_unwind(|| {
        (
            attn_codegen::try_attention(tokens.clone()),
            attn_codegen::attention(tokens.clone()),
        )
    });
    let Ok((result, full)) = outcome else {
        return Err(TestCaseError::fail(format!("panicked on:\n{source}")));
    };
    prop_assert!(
        syn::parse2::<syn::File>(full.clone()).is_ok(),
        "expansion is not Rust items for:\n{source}\n---\n{full}"
    );
    match result {
        Ok(code) => {
            prop_assert!(syn::parse2::<syn::File>(code).is_ok());
        }
        Err(errors) => {
            for error in errors {
                let range = error.span().byte_range();
                prop_assert!(
                    empty || range.start < range.end,
                    "error without a span: {error}\nfor:\n{source}"
                );
                prop_assert!(range.end <= source.len() + 1, "span outside input");
            }
        }
    }
    Ok(())
}

// ---------- random declarations from the grammar ----------

fn dim_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "B", "B2", "T", "S", "H", "G", "D", "Dv", "X", "batch", "len", "heads", "seq", "Nh", "f32",
        "_", "H1",
    ])
    .prop_map(str::to_owned)
}

fn dim() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => dim_name(),
        2 => (dim_name(), prop::sample::select(vec!["1", "2", "8", "12", "64", "0", "1.5", "-3", "N", "99999999999999999999999"]))
            .prop_map(|(n, s)| format!("{n} = {s}")),
        2 => prop::sample::select(vec!["1", "2", "64", "7usize", "3u8"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["", "B + 1", "H =", "= 4", "[T]", "'a", "\"x\""]).prop_map(str::to_owned),
    ]
}

fn shape() -> impl Strategy<Value = String> {
    prop::collection::vec(dim(), 0..9).prop_map(|dims| format!("[{}]", dims.join(", ")))
}

fn value_for(key: &'static str) -> BoxedStrategy<String> {
    let any_value = prop::sample::select(vec![
        "0.1",
        "1.0",
        "-0.2",
        "2",
        "true",
        "false",
        "f32",
        "bf16",
        "float32",
        "highest",
        "HIGH",
        "causal",
        "casual",
        "attention_weights",
        "\"w\"",
        "x.y",
        "Some(1)",
        "0.5 + 0.5",
    ])
    .prop_map(str::to_owned);
    let main: BoxedStrategy<String> = match key {
        "query" | "key" | "value" | "bias" => shape().boxed(),
        "mask" => prop_oneof![
            1 => Just("causal".to_owned()),
            1 => shape(),
            1 => shape().prop_map(|s| format!("causal + {s}")),
            1 => shape().prop_map(|s| format!("{s} + {s} + causal")),
            3 => mask_terms(1..5),
        ]
        .boxed(),
        "dropout_rate" => prop::sample::select(vec![
            "0.0", "0.1", "0.99", "1.0", "1", "-0.1", "1e-3", "nan",
        ])
        .prop_map(str::to_owned)
        .boxed(),
        "scale" => prop::sample::select(vec!["0.125", "1", "0", "-1.0", "1e400"])
            .prop_map(str::to_owned)
            .boxed(),
        "dtype" => prop::sample::select(vec![
            "f32",
            "f64",
            "bf16",
            "f16",
            "float16",
            "i32",
            "jnp.bfloat16",
            "jax.numpy.float32",
            "np.float16",
            "np.int8",
            "torch.float32",
            "torch::kFloat16",
            "tf.float64",
            "\"float32\"",
            "\"jnp.bfloat16\"",
            "np.dtype(\"f4\")",
            "jnp.",
            ".float32",
            "np..float16",
        ])
        .prop_map(str::to_owned)
        .boxed(),
        "precision" => prop::sample::select(vec!["default", "high", "highest", "HIGHEST", "max"])
            .prop_map(str::to_owned)
            .boxed(),
        _ => prop::sample::select(vec!["true", "false", "attention_weights", "yes"])
            .prop_map(str::to_owned)
            .boxed(),
    };
    prop_oneof![6 => main, 1 => any_value].boxed()
}

/// Mask terms joined by `+`, or now and then by another operator or separator (`&`, `|`, `,`,
/// nothing), as written by someone used to another library.
fn mask_terms(count: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    let join = prop::sample::select(vec![
        " + ", " + ", " + ", " + ", " + ", " & ", " | ", ", ", " ",
    ]);
    prop::collection::vec((mask_term(), join), count).prop_map(|terms| {
        let mut text = String::new();
        for (i, (term, join)) in terms.iter().enumerate() {
            if i > 0 {
                text.push_str(join);
            }
            text.push_str(term);
        }
        text
    })
}

/// One term of a mask (issue 13's grammar, right and wrong): joined by `+` in `value_for`.
fn mask_term() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "causal",
            "causal(top_left)",
            "causal(bottom_right)",
            "causal(offset = 3)",
            "causal(offset = -2)",
            "causal(offset = 0)",
            "window(512, 0)",
            "window(0, 0)",
            "window(4, 4, bottom_right)",
            "window(2, 1, offset = -1)",
            "query_lengths",
            "kv_lengths",
            "segment_ids",
        ])
        .prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "causal()",
            "causal(offset)",
            "causal(offset = )",
            "causal(offset = 1.5)",
            "causal(offset = 99999999999999999999)",
            "causal(lower_right)",
            "causal(bottom_right, top_left)",
            "causal(offset = 1, bottom_right)",
            "causal[bottom_right]",
            "window",
            "window()",
            "window(512)",
            "window(-1, 0)",
            "window(1, 2, 3)",
            "window(1, 2, sideways)",
            "window(L, 0)",
            "window(18446744073709551616, 0)",
            "window(1,, 2)",
            "window(, 2)",
            "window(1, 2,)",
            "window(,)",
            "causal(,)",
            "causal(bottom_right,)",
            "window(1; 2)",
            "causal[bottom_right]",
            "window(4096 0)",
            "lengths",
            "lengths(query)",
            "query_lengths(B)",
            "segments",
            "segment_ids[B, T]",
            "is_causal",
            "make_causal_mask(x)",
            "causal(bottom_right) causal",
            "-causal",
            "1",
        ])
        .prop_map(str::to_owned),
        1 => shape(),
    ]
}

fn entry() -> impl Strategy<Value = String> {
    // Every key of the grammar, `query` and `key` twice as often (every layer needs them), and
    // some names that are not keys.
    let keys = attn_codegen::validate::KEYS.iter().copied();
    let key = prop::sample::select(
        keys.chain([
            "query",
            "key",
            "dropout",
            "heads",
            "causal",
            "deterministic",
        ])
        .collect::<Vec<_>>(),
    );
    (key, any::<u8>()).prop_flat_map(|(key, style)| {
        value_for(key).prop_map(move |value| match style % 16 {
            0 => format!("{key} {value}"),
            1 => format!("{key} = {value}"),
            2 => format!("/// doc\n{key}: {value}"),
            _ => format!("{key}: {value}"),
        })
    })
}

fn declaration() -> impl Strategy<Value = String> {
    let header = prop::sample::select(vec![
        "pub struct Layer",
        "struct Layer",
        "/// Doc.\npub(crate) struct Layer",
        "#[derive(Debug)] struct Layer",
        "struct Layer<T>",
        "pub Layer",
        "struct",
    ]);
    // Mostly `,` between entries; sometimes another framework's or language's separator.
    let separator = prop::sample::select(vec![",", ",", ",", ",", ",", ",", ";", "|", "", "."]);
    let entries = prop::collection::vec((entry(), separator), 0..12);
    (header, entries, any::<bool>()).prop_map(|(header, entries, trailing)| {
        let mut body = String::new();
        for (i, (entry, separator)) in entries.iter().enumerate() {
            if i > 0 {
                body.push_str(separator);
                body.push_str("\n    ");
            }
            body.push_str(entry);
        }
        if trailing {
            body.push(',');
        }
        format!("{header} {{\n    {body}\n}}")
    })
}

/// A grouped-query layer with static or run-time heads (dividing or not), any other layout of
/// its shapes, and a structured mask: the declarations of issue 13.
fn gqa_declaration() -> impl Strategy<Value = String> {
    let heads = prop::sample::select(vec!["H", "H = 32", "H = 12", "H = 0", "32"]);
    let kv_heads = prop::sample::select(vec!["G", "G = 8", "G = 5", "G = 1", "H", "8", "G = 0"]);
    let layout = any::<u8>();
    let mask = prop::option::of(mask_terms(1..4));
    (heads, kv_heads, layout, mask).prop_map(|(heads, kv_heads, layout, mask)| {
        // Flax's layout, PyTorch's, or one operand in each.
        let q = |len: &str, h: &str| match layout % 3 {
            0 | 2 => format!("[B, {len}, {h}, D = 128]"),
            _ => format!("[B, {h}, {len}, D = 128]"),
        };
        let kv = |len: &str, h: &str| match layout % 3 {
            0 => format!("[B, {len}, {h}, D]"),
            _ => format!("[B, {h}, {len}, D]"),
        };
        let g = kv_heads.split(' ').next().unwrap_or("G");
        let mut body = format!(
            "query: {}, key: {}, value: {}",
            q("T", heads),
            kv("S", kv_heads),
            kv("S", g)
        );
        if let Some(terms) = mask {
            body.push_str(&format!(", mask: {terms}"));
        }
        format!("pub struct Gqa {{ {body} }}")
    })
}

#[test]
fn gqa_and_structured_masks_never_panic_and_errors_are_spanned() {
    let reached = AtomicUsize::new(0);
    runner(2000)
        .run(&gqa_declaration(), |source| check(&source, &reached))
        .unwrap();
    eprintln!(
        "fuzz: {} grouped-query declarations reached the macro",
        reached.load(Ordering::Relaxed)
    );
}

#[test]
fn random_declarations_never_panic_and_errors_are_spanned() {
    let reached = AtomicUsize::new(0);
    runner(3000)
        .run(&declaration(), |source| check(&source, &reached))
        .unwrap();
    eprintln!(
        "fuzz: {} random declarations reached the macro",
        reached.load(Ordering::Relaxed)
    );
}

// ---------- token-level mutations of the examples ----------

/// The `attention!` bodies of the examples (and of the pass ui cases).
fn example_declarations() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut found = Vec::new();
    for dir in ["examples", "tests/ui/pass"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                let file = syn::parse_file(&source).unwrap();
                let invocations = attn_codegen::invocations(&file);
                found.extend(invocations.into_iter().map(|mac| mac.tokens.to_string()));
            }
        }
    }
    assert!(!found.is_empty(), "no example declarations found");
    found
}

/// A flat token list: groups become their open delimiter, contents, close delimiter.
fn flatten(tokens: TokenStream, out: &mut Vec<String>) {
    for tree in tokens {
        match tree {
            TokenTree::Group(group) => {
                let (open, close) = match group.delimiter() {
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::None => ("", ""),
                };
                out.push(open.to_owned());
                flatten(group.stream(), out);
                out.push(close.to_owned());
            }
            other => out.push(other.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Replace(usize, &'static str),
}

const REPLACEMENTS: &[&str] = &[
    "[",
    "]",
    ",",
    ":",
    "=",
    "+",
    "-",
    ";",
    "#",
    "B",
    "T",
    "H",
    "causal",
    "1",
    "0",
    "64",
    "1.5",
    "true",
    "query",
    "key",
    "value",
    "mask",
    "bias",
    "dtype",
    "f64",
    "struct",
    "pub",
    "G",
    "heads",
    "window",
    "bottom_right",
    "offset",
    "query_lengths",
    "kv_lengths",
    "segment_ids",
    "jnp",
    ".",
    "|",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), prop::sample::select(REPLACEMENTS))
            .prop_map(|(i, r)| Mutation::Replace(i, r)),
    ]
}

fn apply(tokens: &mut Vec<String>, mutation: &Mutation) {
    let n = tokens.len();
    if n == 0 {
        return;
    }
    match *mutation {
        Mutation::Delete(i) => {
            tokens.remove(i % n);
        }
        Mutation::Duplicate(i) => {
            let token = tokens[i % n].clone();
            tokens.insert(i % n, token);
        }
        Mutation::Swap(a, b) => tokens.swap(a % n, b % n),
        Mutation::Replace(i, with) => tokens[i % n] = with.to_owned(),
    }
}

#[test]
fn mutated_examples_never_panic_and_errors_are_spanned() {
    let bodies: Vec<Vec<String>> = example_declarations()
        .into_iter()
        .map(|body| {
            let mut tokens = Vec::new();
            flatten(TokenStream::from_str(&body).unwrap(), &mut tokens);
            tokens
        })
        .collect();
    // The unmutated declarations must expand without errors.
    for body in &bodies {
        let source = body.join(" ");
        let tokens = TokenStream::from_str(&source).unwrap();
        assert!(attn_codegen::try_attention(tokens).is_ok(), "{source}");
    }
    let strategy = (0..bodies.len(), prop::collection::vec(mutation(), 1..4));
    let reached = AtomicUsize::new(0);
    runner(6000)
        .run(&strategy, |(which, mutations)| {
            let mut tokens = bodies[which].clone();
            for mutation in &mutations {
                apply(&mut tokens, mutation);
            }
            check(&tokens.join(" "), &reached)
        })
        .unwrap();
    eprintln!(
        "fuzz: {} mutated example declarations reached the macro",
        reached.load(Ordering::Relaxed)
    );
}

// ---------- projection layers (`inputs_q`, `heads`, `cache`) ----------

/// A projection layer: inputs of any rank (static or run-time features), heads that divide the
/// features or not, and any subset of the options with right or wrong values.
fn projection_declaration() -> impl Strategy<Value = String> {
    let input = prop::sample::select(vec![
        "[B, T, E = 64]",
        "[T, E = 64]",
        "[B, T, E]",
        "[B, T, 64]",
        "[B, T, E = 0]",
        "[E = 64]",
        "[B, T, E = 48]",
        "[C, S, 32]",
        "[B, S, E]",
        "(B, T, E)",
        "[B, T, E = 64, 2, 3, 4, 5, 6, 7]",
    ]);
    let option = prop::sample::select(vec![
        "heads: 8",
        "heads: 0",
        "heads: 7",
        "heads: x",
        "kv_heads: 2",
        "kv_heads: 3",
        "head_dim: 8",
        "head_dim: 16",
        "qkv_features: 64",
        "qkv_features: 30",
        "out_features: 32",
        "out_features: 0",
        "use_bias: false",
        "use_bias: 1",
        "normalize_qk: true",
        "mask: causal",
        "mask: causal(bottom_right)",
        "mask: [B, 1, T, T]",
        "mask: causal + [B, 1, 1, T]",
        "mask: window(3, 0)",
        "mask: [B, 9, T, T, 1]",
        "dtype: bf16",
        "dtype: float32",
        "param_dtype: f64",
        "param_dtype: int8",
        "dropout_rate: 0.1",
        "dropout_rate: 2",
        "precision: highest",
        "force_fp32_for_softmax: true",
        "sow: attention_weights",
        "cache: 128",
        "cache: 0",
        "cache: dynamic",
        "cache: sliding_window(16)",
        "cache: sliding_window()",
        "cache: sliding_window(0)",
        "cache: static",
        "num_heads: 8",
        "query: [B, T, H, D]",
        "scale: 0.5",
    ]);
    let inputs = prop::collection::vec(input, 0..4);
    let options = prop::collection::vec(option, 0..7);
    (inputs, options).prop_map(|(inputs, options)| {
        let mut entries: Vec<String> = inputs
            .iter()
            .zip(["inputs_q", "inputs_k", "inputs_v", "inputs_q"])
            .map(|(shape, name)| format!("{name}: {shape}"))
            .collect();
        entries.extend(options.iter().map(|o| (*o).to_owned()));
        format!("pub struct Projection {{ {} }}", entries.join(", "))
    })
}

#[test]
fn projection_layers_never_panic_and_errors_are_spanned() {
    let reached = AtomicUsize::new(0);
    runner(2000)
        .run(&projection_declaration(), |source| check(&source, &reached))
        .unwrap();
    eprintln!(
        "fuzz: {} projection-layer declarations reached the macro",
        reached.load(Ordering::Relaxed)
    );
}
