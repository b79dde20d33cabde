//! `dtype: ..`: attn's names, and the spellings of NumPy, JAX, PyTorch and others named for
//! what they are.

use super::*;

pub(super) const DTYPES: &[&str] = &["f32", "f64", "bf16", "f16"];

/// `jnp.bfloat16`, `torch::float32`: the names of a path written with `.` or `::`, if `tokens`
/// is one (at least two names).
pub(super) fn dotted_path(tokens: &TokenStream) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut expect_name = true;
    for tree in tokens.clone() {
        match tree {
            proc_macro2::TokenTree::Ident(ident) if expect_name => {
                names.push(ident.to_string());
                expect_name = false;
            }
            proc_macro2::TokenTree::Punct(p) if p.as_char() == '.' && !expect_name => {
                expect_name = true;
            }
            proc_macro2::TokenTree::Punct(p) if p.as_char() == ':' => {
                if p.spacing() == proc_macro2::Spacing::Alone {
                    expect_name = true;
                }
            }
            _ => return None,
        }
    }
    (names.len() >= 2 && !expect_name).then_some(names)
}

/// The dtype spellings of NumPy, JAX, PyTorch and C, and attn's name for each.
pub(super) const DTYPE_ALIASES: &[(&str, &str)] = &[
    ("float32", "f32"),
    ("float64", "f64"),
    ("bfloat16", "bf16"),
    ("float16", "f16"),
    ("half", "f16"),
    ("double", "f64"),
    ("float", "f32"),
    ("single", "f32"),
    ("float_", "f64"),
    ("F32", "f32"),
    ("F64", "f64"),
    ("BF16", "bf16"),
    ("F16", "f16"),
];

/// Whose spelling a dtype path is, from its first name.
pub(super) fn framework(first: &str) -> &'static str {
    match first {
        "jnp" | "jax" => "JAX's",
        "np" | "numpy" => "NumPy's",
        "torch" => "PyTorch's",
        "tf" | "tensorflow" => "TensorFlow's",
        "ml_dtypes" => "ml_dtypes'",
        "half" => "the `half` crate's",
        _ => "another library's",
    }
}

/// `dtype: ..`: one of [`DTYPES`]; other libraries' spellings name attn's.
pub(super) fn read_dtype(term: &Term, errors: &mut Errors) -> Option<&'static str> {
    let expected = format!("expected one of {}", list(DTYPES));
    let not_float = |name: &str| {
        name.starts_with("int")
            || name.starts_with("uint")
            || name.starts_with("complex")
            || name.starts_with("float8")
            || name.starts_with('i') && name[1..].parse::<u32>().is_ok()
            || name.starts_with('u') && name[1..].parse::<u32>().is_ok()
            || name == "bool"
            || name == "bool_"
    };
    let alias = |name: &str| {
        DTYPE_ALIASES
            .iter()
            .find(|(alias, _)| *alias == name)
            .map(|(_, dtype)| *dtype)
            .or_else(|| DTYPES.iter().find(|d| **d == name).copied())
    };
    match term {
        Term::Ident(ident) => {
            let text = ident.to_string();
            if let Some(dtype) = DTYPES.iter().find(|d| **d == text) {
                return Some(dtype);
            }
            let message = if let Some(dtype) = alias(&text) {
                format!(
                    "`{text}` is the NumPy/JAX name of the dtype; attn writes Rust's: `dtype: {dtype}`"
                )
            } else if not_float(&text) {
                format!(
                    "attn computes attention in floating point; `{text}` is not a floating-point dtype: {expected}"
                )
            } else {
                let hint = suggest::nearest(&text, DTYPES)
                    .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                format!("unknown dtype `{text}`; {hint}{expected}")
            };
            errors.at(ident.span(), message);
        }
        Term::Lit {
            lit: Lit::Str(string),
            ..
        } => {
            let text = string.value();
            let name = text.rsplit(['.', ':']).next().unwrap_or(&text);
            let message = match alias(name) {
                Some(dtype) => format!("the dtype is a name, not a string: `dtype: {dtype}`"),
                None => format!("the dtype is a name, not a string; {expected}"),
            };
            errors.at(string.span(), message);
        }
        Term::Other(tokens) if dotted_path(tokens).is_some() => {
            let path = dotted_path(tokens).unwrap_or_default();
            let last = path.last().map_or("", String::as_str);
            let whose = framework(&path[0]);
            let written = path.join(".");
            let message = match alias(last) {
                Some(dtype) => format!(
                    "`{written}` is {whose} spelling of the dtype; attn writes Rust's: `dtype: {dtype}`"
                ),
                None => format!(
                    "`{written}` is {whose} spelling of a dtype, which attn does not compute in; {expected}"
                ),
            };
            errors.spanned(tokens, message);
        }
        other => {
            errors.spanned(
                other.to_token_stream(),
                format!("`dtype` {expected}, such as `dtype: bf16`"),
            );
        }
    }
    None
}
