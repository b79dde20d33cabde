//! The non-shape options (Flax's keyword arguments): `dropout_rate`, `scale`, the booleans,
//! `dtype`, `precision` and `sow`.

use super::*;

pub(super) fn single_term<'a>(entry: &'a Entry, errors: &mut Errors) -> Option<&'a Term> {
    match entry.value.terms.as_slice() {
        [term] => Some(term),
        _ => {
            errors.spanned(
                &entry.value.tokens,
                format!("`{}` takes a single value", entry.key),
            );
            None
        }
    }
}

pub(super) fn number(term: &Term) -> Option<f64> {
    let (minus, value) = match term {
        Term::Lit {
            minus,
            lit: Lit::Float(f),
        } => (minus, f.base10_parse::<f64>().ok()?),
        Term::Lit {
            minus,
            lit: Lit::Int(i),
        } => (minus, i.base10_parse::<f64>().ok()?),
        _ => return None,
    };
    Some(if minus.is_some() { -value } else { value })
}

pub(super) fn read_bool(entry: &Entry, errors: &mut Errors) -> Option<bool> {
    match single_term(entry, errors)? {
        Term::Ident(ident) if ident == "true" => Some(true),
        Term::Ident(ident) if ident == "false" => Some(false),
        other => {
            errors.spanned(
                other.to_token_stream(),
                format!("`{}` expects `true` or `false`", entry.key),
            );
            None
        }
    }
}

pub(super) fn read_choice<'a>(
    entry: &Entry,
    what: &str,
    choices: &[&'a str],
    aliases: &[(&str, &'a str)],
    errors: &mut Errors,
) -> Option<&'a str> {
    let term = single_term(entry, errors)?;
    let Term::Ident(ident) = term else {
        errors.spanned(
            term.to_token_stream(),
            format!("`{}` expects one of {}", entry.key, list(choices)),
        );
        return None;
    };
    let text = ident.to_string();
    if let Some(choice) = choices.iter().find(|c| **c == text) {
        return Some(choice);
    }
    let hint = aliases
        .iter()
        .find(|(alias, _)| *alias == text)
        .map(|(_, choice)| *choice)
        .or_else(|| suggest::nearest(&text, choices))
        .map_or(String::new(), |s| format!("did you mean `{s}`? "));
    errors.at(
        ident.span(),
        format!(
            "unknown {what} `{text}`; {hint}expected one of {}",
            list(choices)
        ),
    );
    None
}

/// The options; a wrong one is reported and left at Flax's default.
pub(super) fn read_options(
    entries: &BTreeMap<&'static str, &Entry>,
    errors: &mut Errors,
) -> Options {
    let mut options = Options {
        dtype: DType::F32,
        dropout_rate: 0.0,
        broadcast_dropout: true,
        precision: Precision::Default,
        force_fp32_for_softmax: false,
        sow: false,
        scale: None,
    };
    if let Some(entry) = entries.get("dropout_rate")
        && let Some(term) = single_term(entry, errors)
    {
        match number(term) {
            Some(rate) if (0.0..1.0).contains(&rate) => options.dropout_rate = rate,
            Some(rate) => {
                errors.spanned(
                    term.to_token_stream(),
                    format!(
                        "`dropout_rate` must be in [0, 1) (the fraction of weights dropped); \
                         found {rate}"
                    ),
                );
            }
            None => {
                errors.spanned(
                    term.to_token_stream(),
                    "`dropout_rate` expects a number in [0, 1), such as `0.1`",
                );
            }
        }
    }
    if let Some(entry) = entries.get("scale")
        && let Some(term) = single_term(entry, errors)
    {
        match number(term) {
            Some(scale) if scale.is_finite() && scale > 0.0 => options.scale = Some(scale),
            _ => {
                errors.spanned(
                    term.to_token_stream(),
                    "`scale` expects a positive number, such as `0.125` \
                     (the default is `1 / sqrt(depth)`)",
                );
            }
        }
    }
    for (key, slot) in [
        ("broadcast_dropout", &mut options.broadcast_dropout),
        (
            "force_fp32_for_softmax",
            &mut options.force_fp32_for_softmax,
        ),
    ] {
        if let Some(entry) = entries.get(key)
            && let Some(value) = read_bool(entry, errors)
        {
            *slot = value
        }
    }
    if let Some(entry) = entries.get("dtype")
        && let Some(term) = single_term(entry, errors)
    {
        match read_dtype(term, errors) {
            Some("f32") => options.dtype = DType::F32,
            Some("f64") => options.dtype = DType::F64,
            Some("bf16") => options.dtype = DType::BF16,
            Some(_) => options.dtype = DType::F16,
            None => {}
        }
    }
    if let Some(entry) = entries.get("precision") {
        let aliases = [
            ("DEFAULT", "default"),
            ("HIGH", "high"),
            ("HIGHEST", "highest"),
            ("Default", "default"),
            ("High", "high"),
            ("Highest", "highest"),
        ];
        let foreign = entry
            .value
            .terms
            .as_slice()
            .first()
            .and_then(|term| match term {
                Term::Other(tokens) if entry.value.terms.len() == 1 => {
                    dotted_path(tokens).map(|path| (tokens, path))
                }
                _ => None,
            });
        let choice = match foreign {
            // `jax.lax.Precision.HIGHEST`, `lax.Precision.HIGH`
            Some((tokens, path)) => {
                let last = path.last().map_or("", String::as_str);
                let hint = aliases
                    .iter()
                    .find(|(alias, _)| *alias == last)
                    .map_or(format!("one of {}", list(PRECISIONS)), |(_, choice)| {
                        format!("`precision: {choice}`")
                    });
                errors.spanned(
                    tokens,
                    format!(
                        "`{}` is JAX's spelling of the precision; write {hint}",
                        path.join(".")
                    ),
                );
                None
            }
            None => read_choice(entry, "precision", PRECISIONS, &aliases, errors),
        };
        match choice {
            Some("default") => options.precision = Precision::Default,
            Some("high") => options.precision = Precision::High,
            Some(_) => options.precision = Precision::Highest,
            None => {}
        }
    }
    if let Some(entry) = entries.get("sow") {
        match single_term(entry, errors) {
            Some(Term::Ident(ident)) if ident == "attention_weights" => options.sow = true,
            Some(other) => {
                errors.spanned(
                    other.to_token_stream(),
                    "`sow` takes `attention_weights`: the layer then sows its weights into the \
                     context's sink under Flax's (\"intermediates\", \"attention_weights\"); \
                     leave `sow` out to sow nothing",
                );
            }
            None => {}
        }
    }
    if options.dtype == DType::F64
        && options.force_fp32_for_softmax
        && options.dropout_rate > 0.0
        && let Some(entry) = entries.get("force_fp32_for_softmax")
    {
        errors.at(
            entry.key.span(),
            "with `dtype: f64`, `force_fp32_for_softmax` and a `dropout_rate`, Flax returns \
                 float32 weights without dropout but float64 weights with it; a layer's weights \
                 have one type, so choose two of the three",
        );
    }
    options
}
