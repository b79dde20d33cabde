//! Keeps docs/errors.md honest.
//!
//! - Run-time errors: every variant of `AttnError` (read from attn-runtime/src/error.rs, so a
//!   new variant fails this test until it is catalogued) has an entry in the catalogue; its
//!   example input below produces that variant, and the message it prints is the one the
//!   catalogue quotes under the variant's heading.
//! - Compile-time errors: every message the catalogue quotes appears in the `.stderr` of the
//!   trybuild case it names (tests/ui/fail/*.rs) — so the catalogue quotes what the compiler
//!   really prints — and every error message in tests/ui/**/*.stderr is in the catalogue.
//!   When trybuild cases change, regenerate that part of the catalogue from them with
//!   `ATTN_BLESS_ERRORS=1 cargo test -p attn --test errors_catalogue` and review the diff.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use attn::kernel::{self, Broadcast, Geometry, Mask, Options};
use attn::layer::{InFeatures, KvCache, MhaConfig, MultiHeadDotProductAttention};
use attn::{
    Array, AttnError, Const, Context, DType, FlaxArgs, TensorView, attention, combine_masks,
    dot_product_attention_weights,
};

attention! {
    /// A layer whose query length `T` is also the key length.
    struct SelfAttention {
        query: [T, H = 1, D = 2],
        key: [T, H, D],
        value: [T, H, D],
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(shape: &[usize]) -> Array {
    let n = shape.iter().product();
    Array::new(vec![0.5f32; n], shape.to_vec()).unwrap()
}

/// The example of each variant, as in docs/errors.md: (variant, error, message).
fn runtime_examples() -> Vec<(&'static str, AttnError, &'static str)> {
    let err = |r: Result<Array, AttnError>| r.expect_err("the example must fail");
    let mut examples = Vec::new();

    // DimMismatch: a generated layer called with `T` = 3 in query but 2 in key.
    let data = [0.5f32; 6];
    let three = TensorView::new(&data, (3usize, Const::<1>, Const::<2>)).unwrap();
    let two = TensorView::new(&data[..4], (2usize, Const::<1>, Const::<2>)).unwrap();
    let e = SelfAttention
        .forward(three, two, two, &mut Context::deterministic())
        .expect_err("T differs");
    examples.push((
        "DimMismatch",
        e,
        "dimension `T`: `query` has 3 but `key` has 2",
    ));

    let e = err(dot_product_attention_weights(
        &f32s(&[3, 4]),
        &f32s(&[5, 4]),
        FlaxArgs::new(),
    ));
    examples.push((
        "Rank",
        e,
        "`query` must have rank at least 3: [batch..., length, heads, depth], but has shape [3, 4] (rank 2)",
    ));

    let e = err(dot_product_attention_weights(
        &f32s(&[3, 2, 4]),
        &f32s(&[5, 3, 4]),
        FlaxArgs::new(),
    ));
    examples.push((
        "Axis",
        e,
        "`key` axis heads (axis -2): expected 2, as in query, or a divisor of it (grouped-query attention), found 3",
    ));

    let e = TensorView::new(&[0.0f32; 5], (2usize, 3usize)).unwrap_err();
    examples.push((
        "Length",
        e,
        "`tensor view` of shape [2, 3] needs 6 elements, but the slice has 5",
    ));

    let e = Array::new(Vec::<f32>::new(), [usize::MAX, 2, 0]).unwrap_err();
    examples.push((
        "Overflow",
        e,
        "`array` shape [18446744073709551615, 2, 0]: the number of elements overflows usize",
    ));

    let bias = f32s(&[2, 3, 4]);
    let e = err(dot_product_attention_weights(
        &f32s(&[3, 2, 4]),
        &f32s(&[5, 2, 4]),
        FlaxArgs::new().bias(&bias),
    ));
    examples.push((
        "Broadcast",
        e,
        "`bias` of shape [2, 3, 4] does not broadcast to [2, 3, 5]: axis 2 has size 4, expected 1 or 5",
    ));

    // DType: the kernel layer with an f64 buffer for f32 weights.
    let geom = Geometry {
        batch_shape: &[],
        q_len: 1,
        kv_len: 1,
        heads: 1usize,
        kv_heads: 1usize,
        qk_depth: 1usize,
        v_depth: 0usize,
    };
    let mut out = [0.0f64; 1];
    let e = kernel::attention_weights(
        &geom,
        &[1.0f32],
        &[1.0f32],
        None::<&Broadcast<'_, f32>>,
        &Mask::none(),
        &Options::default(),
        &mut Context::deterministic(),
        &mut out,
    )
    .unwrap_err();
    examples.push((
        "DType",
        e,
        "`weights` must have dtype float32, found float64",
    ));

    let e = err(dot_product_attention_weights(
        &f32s(&[3, 2, 4]),
        &f32s(&[5, 2, 4]),
        FlaxArgs::new()
            .dropout_rate(1.5)
            .dropout_rng(attn::DropoutRng::new(0)),
    ));
    examples.push((
        "DropoutRate",
        e,
        "`dropout_rate` must be in [0, 1], found 1.5",
    ));

    let e = err(dot_product_attention_weights(
        &f32s(&[3, 2, 4]),
        &f32s(&[5, 2, 4]),
        FlaxArgs::new().dropout_rate(0.1),
    ));
    examples.push((
        "MissingDropoutRng",
        e,
        "`dropout_rng` is required: dropout is active (deterministic = false, dropout_rate = 0.1); \
         pass a dropout RNG, or set deterministic = true",
    ));

    let a = Array::new(vec![true; 4], [2, 2]).unwrap();
    let b = Array::new(vec![true; 4], [1, 2, 2]).unwrap();
    let e = combine_masks(&[Some(&a), Some(&b)], DType::Bool).unwrap_err();
    examples.push((
        "MaskRanks",
        e,
        "`combine_masks`: masks must have the same rank, found shapes [2, 2], [1, 2, 2]",
    ));

    let e = err(dot_product_attention_weights(
        &f32s(&[3, 2, 4]),
        &f32s(&[5, 2, 4]),
        FlaxArgs::new().dtype(DType::I32),
    ));
    examples.push((
        "InvalidArgument",
        e,
        "`dtype`: must be a float dtype, found int32",
    ));

    // Allocation: empty inputs whose weights would need 2^60 f32 (2^62 bytes).
    let q = Array::new(Vec::<f32>::new(), [1 << 30, 1, 0]).unwrap();
    let e = err(dot_product_attention_weights(&q, &q, FlaxArgs::new()));
    examples.push((
        "Allocation",
        e,
        "cannot allocate 1152921504606846976 elements for `weights`",
    ));

    // Checkpoint: a msgpack file `{"params": {}}` has none of the layer's parameters.
    let empty_params = [&[0x81, 0xa6][..], b"params", &[0x80]].concat();
    let e = MultiHeadDotProductAttention::from_msgpack(
        MhaConfig::new(2),
        InFeatures::same(4),
        &empty_params,
        "params",
    )
    .expect_err("no parameters");
    examples.push((
        "Checkpoint",
        e,
        "checkpoint `params/query/kernel`: expected float32 [4, 2, 2], found no such entry",
    ));

    // CacheCapacity: two tokens into a cache of one.
    let layer = MultiHeadDotProductAttention::init(MhaConfig::new(2), InFeatures::same(4), 0)
        .expect("a layer");
    let e = layer
        .decode(
            &mut KvCache::new(1),
            &f32s(&[2, 4]),
            None,
            &mut Context::deterministic(),
        )
        .expect_err("cache full");
    examples.push((
        "CacheCapacity",
        e,
        "KV cache full: capacity 1, holds 0, 2 more requested (the cache is unchanged)",
    ));
    examples
}

/// The variant names of `pub enum AttnError` in the runtime's source.
fn declared_variants() -> Vec<String> {
    let source = read(&root().join("attn-runtime/src/error.rs"));
    let start = source
        .find("pub enum AttnError {")
        .expect("AttnError in error.rs");
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("end of the enum")];
    body.lines()
        .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
        .map(str::trim)
        .filter(|l| l.chars().next().is_some_and(char::is_uppercase))
        .map(|l| {
            l.split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The catalogue's sections: heading line -> the lines of its ```text blocks.
fn text_blocks(doc: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_text = false;
    let mut in_other = false;
    for line in doc.lines() {
        if in_text || in_other {
            if line.trim_start().starts_with("```") {
                in_text = false;
                in_other = false;
            } else if in_text && let Some(section) = sections.last_mut() {
                section.1.push(line.to_owned());
            }
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            sections.push((heading.trim().to_owned(), Vec::new()));
        } else if line.trim_start() == "```text" {
            in_text = true;
        } else if line.trim_start().starts_with("```") {
            in_other = true;
        }
    }
    sections
}

fn catalogue() -> String {
    read(&root().join("docs/errors.md"))
}

#[test]
fn every_runtime_error_variant_is_catalogued_with_its_message() {
    let examples = runtime_examples();
    let declared = declared_variants();
    assert!(declared.len() >= 12, "parsed variants: {declared:?}");
    let covered: BTreeSet<&str> = examples.iter().map(|(v, _, _)| *v).collect();
    for variant in &declared {
        assert!(
            covered.contains(variant.as_str()),
            "AttnError::{variant} has no example in tests/errors_catalogue.rs"
        );
    }
    let sections = text_blocks(&catalogue());
    for (variant, error, message) in &examples {
        let debug = format!("{error:?}");
        assert!(
            debug.starts_with(&format!("{variant} ")) || debug == *variant,
            "the {variant} example produced {debug}"
        );
        assert_eq!(error.to_string(), *message, "message of {variant}");
        let heading = format!("`AttnError::{variant}`");
        let (_, lines) = sections
            .iter()
            .find(|(h, _)| *h == heading)
            .unwrap_or_else(|| panic!("docs/errors.md has no section ### {heading}"));
        assert!(
            lines.iter().any(|l| l == message),
            "docs/errors.md, {heading}: the message must be quoted as printed:\n{message}\nfound:\n{}",
            lines.join("\n")
        );
    }
}

/// `error...` headlines of a compiler output (the message lines of trybuild's `.stderr`).
fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .map(str::to_owned)
        .collect()
}

fn stderr_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            stderr_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "stderr") {
            out.push(path);
        }
    }
}

/// The heading that starts the generated compile-time part of docs/errors.md.
const COMPILE_TIME: &str = "## Compile-time errors";

/// The `attention! { .. }` invocations of a source file.
fn invocations(source: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("attention! {") {
        let body = &rest[start..];
        let mut depth = 0usize;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push(&body[..end]);
        rest = &body[end..];
    }
    found
}

/// The compile-time part of the catalogue, generated from tests/ui/fail: per case, its doc
/// comment, its declaration (or, for type errors at a call site, the whole program) and its
/// error messages.
fn compile_time_section() -> String {
    let fail = root().join("tests/ui/fail");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&fail)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    cases.retain(|p| p.extension().is_some_and(|e| e == "stderr"));
    cases.sort();
    let mut out = format!(
        "{COMPILE_TIME} (`attention!` and the type checker)\n\n\
         Generated from the trybuild cases (`ATTN_BLESS_ERRORS=1 cargo test -p attn --test \
         errors_catalogue`): each case's declaration and the messages the compiler prints for \
         it. Errors in a declaration point at the offending token, and one build reports all of \
         them; a tensor of the wrong static shape fails type-checking at the call.\n"
    );
    for stderr_path in cases {
        let source = read(&stderr_path.with_extension("rs"));
        let mut messages = error_lines(&read(&stderr_path));
        messages.dedup();
        let name = stderr_path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        out.push_str(&format!("\n### `tests/ui/fail/{name}.rs`\n\n"));
        let doc: Vec<&str> = source
            .lines()
            .filter_map(|l| l.strip_prefix("//!").map(str::trim))
            .collect();
        if !doc.is_empty() {
            out.push_str(&format!("{}\n\n", doc.join(" ")));
        }
        let type_errors = messages.iter().any(|m| m.starts_with("error["));
        let code = if type_errors || invocations(&source).is_empty() {
            source
                .lines()
                .filter(|l| !l.starts_with("//!") && !l.starts_with("use "))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            invocations(&source).join("\n\n")
        };
        out.push_str(&format!(
            "```rust\n{}\n```\n\n```text\n{}\n```\n",
            code.trim(),
            messages.join("\n")
        ));
    }
    out
}

#[test]
fn every_compile_time_message_is_pinned_by_a_ui_case_and_catalogued() {
    if std::env::var_os("ATTN_BLESS_ERRORS").is_some() {
        let doc = catalogue();
        let keep = doc.find(COMPILE_TIME).map_or(doc.as_str(), |i| &doc[..i]);
        let updated = format!("{keep}{}", compile_time_section());
        std::fs::write(root().join("docs/errors.md"), updated).expect("write docs/errors.md");
    }
    let ui = root().join("tests/ui");
    let mut files = Vec::new();
    stderr_files(&ui, &mut files);
    assert!(
        !files.is_empty(),
        "no tests/ui/**/*.stderr: the compile-time catalogue cannot be checked"
    );
    let mut pinned = BTreeSet::new();
    for file in &files {
        pinned.extend(error_lines(&read(file)));
    }
    let mut quoted = BTreeSet::new();
    for (heading, lines) in text_blocks(&catalogue()) {
        let Some(case) = heading
            .strip_prefix('`')
            .and_then(|h| h.strip_suffix('`'))
            .filter(|h| h.starts_with("tests/ui/"))
        else {
            continue;
        };
        let stderr_path = root().join(case).with_extension("stderr");
        let stderr = error_lines(&read(&stderr_path));
        let messages: Vec<&String> = lines.iter().filter(|l| l.starts_with("error")).collect();
        assert!(!messages.is_empty(), "{case}: no message quoted");
        for message in messages {
            assert!(
                stderr.contains(message),
                "docs/errors.md quotes for {case}:\n{message}\nbut {} has:\n{}",
                stderr_path.display(),
                stderr.join("\n")
            );
            quoted.insert(message.clone());
        }
    }
    let missing: Vec<&String> = pinned.difference(&quoted).collect();
    assert!(
        missing.is_empty(),
        "compile-time messages in tests/ui/**/*.stderr missing from docs/errors.md:\n{}",
        missing
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
