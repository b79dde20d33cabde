//! Reading a shape's dims: names, static sizes (never 0), malformed dims and their separators,
//! and the layer's table of named dims.

use super::*;

/// A dim of a shape after the first checks; `None` where the dim itself was wrong.
pub(super) struct DimUse {
    pub(super) axis: Option<Axis>,
    pub(super) span: Span,
}

/// The layer's named dims, built while reading shapes in declaration order.
#[derive(Default)]
pub(super) struct DimTable {
    pub(super) dims: Vec<NamedDim>,
    /// For each name with a size: the span of the size that bound it.
    pub(super) bound_at: BTreeMap<String, (usize, Span)>,
}

impl DimTable {
    pub(super) fn use_name(&mut self, name: &Ident) {
        if !self.dims.iter().any(|d| d.name == *name) {
            self.dims.push(NamedDim {
                name: name.clone(),
                size: None,
                line: line_of(name.span()),
                span: name.span(),
            });
        }
    }

    pub(super) fn bind(&mut self, name: &Ident, size: usize, span: Span, errors: &mut Errors) {
        self.use_name(name);
        let key = name.to_string();
        if let Some(&(first, first_span)) = self.bound_at.get(&key) {
            if first != size {
                errors.with_note(
                    span,
                    format!(
                        "`{name}` is bound to two sizes: {size} here and {first} above; \
                         a name means the same size everywhere in a declaration"
                    ),
                    first_span,
                    format!("`{name}` first bound to {first} here"),
                );
            }
            return;
        }
        self.bound_at.insert(key, (size, span));
        if let Some(dim) = self.dims.iter_mut().find(|d| d.name == *name) {
            dim.size = Some(size);
            dim.line = line_of(span);
            dim.span = name.span();
        }
    }

    pub(super) fn size_of(&self, name: &Ident) -> Option<usize> {
        self.dims
            .iter()
            .find(|d| d.name == *name)
            .and_then(|d| d.size)
    }
}

/// Names a dim may not have: they would shadow a type that the generated code uses.
pub(super) const RESERVED_DIM_NAMES: &[&str] = &[
    "bool", "char", "str", "f16", "f32", "f64", "bf16", "i8", "i16", "i32", "i64", "i128", "isize",
    "u8", "u16", "u32", "u64", "u128", "usize", "Self", "self", "_",
];

pub(super) fn check_dim_name(name: &Ident, errors: &mut Errors) -> bool {
    let text = name.to_string();
    if RESERVED_DIM_NAMES.contains(&text.as_str()) {
        errors.at(
            name.span(),
            format!("`{text}` cannot name a dim: it is a type or keyword; choose another name"),
        );
        false
    } else if syn::parse2::<Ident>(name.to_token_stream()).is_err() {
        errors.at(
            name.span(),
            format!("`{text}` is a keyword and cannot name a dim; choose another name"),
        );
        false
    } else {
        true
    }
}

pub(super) fn parse_size(lit: &LitInt, errors: &mut Errors) -> Option<usize> {
    if !matches!(lit.suffix(), "" | "usize") {
        errors.at(
            lit.span(),
            format!(
                "a dim size is a plain integer, such as `{}`",
                lit.base10_digits()
            ),
        );
        return None;
    }
    match lit.base10_parse::<usize>() {
        Ok(size) => Some(size),
        Err(_) => {
            errors.at(lit.span(), "this dim size does not fit in `usize`");
            None
        }
    }
}

pub(super) fn zero_size_message(name: Option<&Ident>) -> String {
    let run_time = match name {
        Some(name) => format!("write `{name}` without a size"),
        None => "write a name such as `T`".to_owned(),
    };
    format!(
        "a static size of 0 would make every tensor with this dim empty; a static size is at \
         least 1 ({run_time} to choose the size at run time, where 0 is allowed)"
    )
}

pub(super) const DIM_FORMS: &str =
    "expected a name (`T`), a name with a static size (`H = 12`) or a size (`64`)";

pub(super) fn read_dims(
    shape: &ShapeSyntax,
    table: &mut DimTable,
    errors: &mut Errors,
) -> Vec<DimUse> {
    let mut uses = Vec::new();
    for dim in &shape.dims {
        let (axis, span) = match dim {
            DimSyntax::Named(name) => {
                let ok = check_dim_name(name, errors);
                if ok {
                    table.use_name(name);
                }
                (ok.then(|| Axis::Named(name.clone())), name.span())
            }
            DimSyntax::Bound { name, size } => {
                let ok = check_dim_name(name, errors);
                let value = match size {
                    Term::Lit {
                        minus: None,
                        lit: Lit::Int(lit),
                    } => parse_size(lit, errors).map(|n| (n, lit.span())),
                    Term::Lit { minus: Some(_), .. } => {
                        errors.spanned(size.to_token_stream(), "a dim size cannot be negative");
                        None
                    }
                    other => {
                        let tokens = other.to_token_stream();
                        let found = written(&tokens);
                        errors.spanned(
                            tokens,
                            format!(
                                "the size of `{name}` must be an integer literal, \
                                 such as `{name} = 64`; found `{found}`"
                            ),
                        );
                        None
                    }
                };
                if let Some((0, span)) = value {
                    errors.at(span, zero_size_message(Some(name)));
                }
                if ok {
                    match value {
                        Some((n, span)) if n > 0 => table.bind(name, n, span, errors),
                        _ => table.use_name(name),
                    }
                }
                (ok.then(|| Axis::Named(name.clone())), name.span())
            }
            DimSyntax::Size(lit) => match parse_size(lit, errors) {
                Some(0) => {
                    errors.at(lit.span(), zero_size_message(None));
                    (None, lit.span())
                }
                size => (size.map(Axis::Size), lit.span()),
            },
            DimSyntax::Malformed(tokens, span) => {
                // `[B; T; H; D]`, `[B | T | H | D]`: another separator than `,`.
                let separator = tokens.clone().into_iter().find_map(|t| match t {
                    proc_macro2::TokenTree::Punct(p) if matches!(p.as_char(), ';' | '|') => {
                        Some(p.as_char())
                    }
                    _ => None,
                });
                let words = tokens.clone().into_iter().count() > 1
                    && tokens.clone().into_iter().all(|t| {
                        matches!(
                            t,
                            proc_macro2::TokenTree::Ident(_) | proc_macro2::TokenTree::Literal(_)
                        )
                    });
                if tokens.is_empty() {
                    errors.at(*span, format!("missing dim before this `,`: {DIM_FORMS}"));
                } else if words {
                    errors.spanned(
                        tokens,
                        format!(
                            "expected `,` between dims: `[{}]`",
                            written(tokens).split(' ').collect::<Vec<_>>().join(", ")
                        ),
                    );
                } else if let Some(separator) = separator {
                    errors.spanned(
                        tokens,
                        format!("dims are separated by `,`, not `{separator}`"),
                    );
                } else {
                    errors.spanned(
                        tokens,
                        format!("malformed dim `{}`: {DIM_FORMS}", written(tokens)),
                    );
                }
                (None, *span)
            }
        };
        uses.push(DimUse { axis, span });
    }
    uses
}

/// A shape entry whose dims were read; rank checks apply to `dims.len()`.
pub(super) struct ShapeEntry<'a> {
    pub(super) entry: &'a Entry,
    pub(super) shape: &'a ShapeSyntax,
    pub(super) dims: Vec<DimUse>,
}

pub(super) fn single_shape<'a>(entry: &'a Entry, errors: &mut Errors) -> Option<&'a ShapeSyntax> {
    match entry.value.terms.as_slice() {
        [Term::Shape(shape)] => Some(shape),
        _ => {
            let example = match entry.key.to_string().as_str() {
                "query" => "[B, T, H, D]",
                "key" | "value" => "[B, S, H, D]",
                _ => "[B, 1, T, S]",
            };
            let trees: Vec<proc_macro2::TokenTree> =
                entry.value.tokens.clone().into_iter().collect();
            let found = match trees.as_slice() {
                [proc_macro2::TokenTree::Group(group)]
                    if group.delimiter() == proc_macro2::Delimiter::Parenthesis =>
                {
                    "; found a tuple in parentheses (NumPy's and JAX's `.shape`)".to_owned()
                }
                _ => String::new(),
            };
            errors.spanned(
                &entry.value.tokens,
                format!(
                    "`{}` expects a shape in brackets, such as `{example}`{found}",
                    entry.key
                ),
            );
            None
        }
    }
}
