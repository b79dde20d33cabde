//! Stage 1: the syntax of an `attention!` invocation, exactly as written.
//!
//! The grammar is permissive about values: every entry is `name: value` and a value is a `+`-list
//! of terms (a shape `[..]`, an identifier, a literal, or any other tokens). Which names exist and
//! which values they take is decided by [`mod@crate::validate`], so that a wrong value or a misspelt
//! name becomes one of many accumulated errors instead of stopping the parser. Only a broken layer
//! header (`pub struct Name { .. }`) is fatal.

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::parse::{ParseStream, Parser};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, Lit, LitInt, Token, Visibility};

/// Every layer declared in one `attention!` invocation.
pub struct Input {
    /// The declarations, in source order.
    pub layers: Vec<LayerSyntax>,
}

/// `#[doc..] pub struct Name { entry, entry, .. }`
pub struct LayerSyntax {
    /// Outer attributes (validated: only doc comments are allowed).
    pub attrs: Vec<Attribute>,
    /// Visibility of the generated struct.
    pub vis: Visibility,
    /// The `struct` keyword.
    pub struct_token: Token![struct],
    /// The layer's name.
    pub ident: Ident,
    /// The entries that could be read.
    pub entries: Vec<Entry>,
    /// Syntax errors inside the braces that did not stop the parser (reported with the others).
    pub errors: Vec<syn::Error>,
}

/// One `name: value` entry.
pub struct Entry {
    /// Doc comments on the entry.
    pub attrs: Vec<Attribute>,
    /// The name before the colon.
    pub key: Ident,
    /// The value after the colon.
    pub value: Value,
}

/// `term + term + ..` (usually a single term).
pub struct Value {
    /// The terms, at least one.
    pub terms: Vec<Term>,
    /// All tokens of the value, for spans and for printing.
    pub tokens: TokenStream,
}

/// One term of a value.
pub enum Term {
    /// `[dim, dim, ..]`
    Shape(ShapeSyntax),
    /// A bare identifier (including `true` and `false`).
    Ident(Ident),
    /// A literal, with an optional leading minus sign.
    Lit {
        /// The `-`, if any.
        minus: Option<Span>,
        /// The literal.
        lit: Lit,
    },
    /// `name(arg, arg, ..)`, as in `causal(bottom_right)` or `window(512, 0)`.
    Call {
        /// The name before the parentheses.
        name: Ident,
        /// Span of the parentheses.
        span: Span,
        /// The arguments, split at top-level commas (each possibly empty; a trailing comma
        /// adds none).
        args: Vec<Arg>,
    },
    /// Anything else; always an error where it appears.
    Other(TokenStream),
}

/// One argument of a [`Term::Call`].
pub struct Arg {
    /// The tokens between two commas (empty in `window(1,, 2)`).
    pub tokens: TokenStream,
    /// Where the argument is: its tokens, or for an empty argument the `,` that follows it.
    pub span: Span,
}

/// `[dim, dim, ..]`
pub struct ShapeSyntax {
    /// Span of the brackets.
    pub span: Span,
    /// The dims, outermost first.
    pub dims: Vec<DimSyntax>,
}

/// One dimension of a shape.
pub enum DimSyntax {
    /// `T`: a dimension whose size is known at run time (unless bound elsewhere).
    Named(Ident),
    /// `H = 12`: a named dimension with a static size. `size` is checked by the validator.
    Bound {
        /// The name.
        name: Ident,
        /// The tokens after `=`.
        size: Term,
    },
    /// `64`: an unnamed static dimension.
    Size(LitInt),
    /// Anything else; the tokens (possibly empty) and where they are.
    Malformed(TokenStream, Span),
}

impl Term {
    /// The tokens of this term, for error spans.
    pub fn to_token_stream(&self) -> TokenStream {
        match self {
            Term::Shape(shape) => {
                let mut group = proc_macro2::Group::new(Delimiter::Bracket, TokenStream::new());
                group.set_span(shape.span);
                TokenTree::Group(group).into()
            }
            Term::Ident(ident) => ident.to_token_stream(),
            Term::Call { name, span, args } => {
                let mut inner = TokenStream::new();
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        inner.extend([TokenTree::Punct(punct(',', *span))]);
                    }
                    inner.extend(arg.tokens.clone());
                }
                let mut group = proc_macro2::Group::new(Delimiter::Parenthesis, inner);
                group.set_span(*span);
                let mut tokens = name.to_token_stream();
                tokens.extend([TokenTree::Group(group)]);
                tokens
            }
            Term::Lit { minus, lit } => {
                let mut tokens = TokenStream::new();
                if let Some(span) = minus {
                    tokens.extend([TokenTree::Punct(punct('-', *span))]);
                }
                lit.to_tokens(&mut tokens);
                tokens
            }
            Term::Other(tokens) => tokens.clone(),
        }
    }
}

fn punct(ch: char, span: Span) -> proc_macro2::Punct {
    let mut punct = proc_macro2::Punct::new(ch, proc_macro2::Spacing::Alone);
    punct.set_span(span);
    punct
}

/// Parses an invocation. Fails only when a layer header cannot be read; mistakes inside the
/// braces are kept in [`LayerSyntax::errors`].
pub fn parse(tokens: TokenStream) -> syn::Result<Input> {
    // Where "expected .. after this" errors point when the input ends early: its last token.
    let last = tokens
        .clone()
        .into_iter()
        .last()
        .map_or_else(Span::call_site, |tree| tree.span());
    let parser = |input: ParseStream| {
        let mut layers = Vec::new();
        if input.is_empty() {
            return Err(input.error(
                "expected a layer declaration: `struct Name { query: [..], key: [..], .. }`",
            ));
        }
        while !input.is_empty() {
            layers.push(parse_layer(input, last)?);
        }
        Ok(Input { layers })
    };
    parser.parse2(tokens)
}

/// An error at the next token, or at the input's last token if there is no next one.
fn expected(input: ParseStream, last: Span, message: &str) -> syn::Error {
    if input.is_empty() {
        syn::Error::new(last, message)
    } else {
        input.error(message)
    }
}

fn parse_layer(input: ParseStream, last: Span) -> syn::Result<LayerSyntax> {
    let attrs = input.call(Attribute::parse_outer)?;
    let vis: Visibility = input.parse()?;
    if !input.peek(Token![struct]) {
        return Err(expected(
            input,
            last,
            "expected `struct`: a layer is declared as `struct Name { query: [..], key: [..], .. }`",
        ));
    }
    let struct_token: Token![struct] = input.parse()?;
    if !input.peek(Ident) {
        return Err(expected(
            input,
            last,
            "expected the layer's name after `struct`",
        ));
    }
    let ident: Ident = input.parse()?;
    if input.peek(Token![<]) {
        return Err(input.error(
            "an `attention!` layer takes no generic parameters: they are derived from the dims",
        ));
    }
    if !input.peek(syn::token::Brace) {
        return Err(expected(
            input,
            last,
            "expected `{ .. }` with the layer's entries, such as `{ query: [B, T, H, D], .. }`",
        ));
    }
    let content;
    syn::braced!(content in input);
    let body: TokenStream = content.parse()?;
    let mut layer = LayerSyntax {
        attrs,
        vis,
        struct_token,
        ident,
        entries: Vec::new(),
        errors: Vec::new(),
    };
    parse_entries(body, &mut layer);
    if input.peek(Token![;]) {
        let semi: Token![;] = input.parse()?;
        layer.errors.push(syn::Error::new(
            semi.span,
            "unexpected `;` after a layer declaration",
        ));
    }
    Ok(layer)
}

/// Splits `tokens` at top-level commas. Each part keeps its tokens; the span of each separating
/// comma is returned alongside so that an empty part can be pointed at.
fn split_commas(tokens: TokenStream) -> Vec<(Vec<TokenTree>, Span)> {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    for tree in tokens {
        match &tree {
            TokenTree::Punct(p) if p.as_char() == ',' => {
                parts.push((std::mem::take(&mut current), p.span()));
            }
            _ => current.push(tree),
        }
    }
    if !current.is_empty() {
        let span = current.last().map_or_else(Span::call_site, TokenTree::span);
        parts.push((current, span));
    }
    parts
}

/// Whether `tokens` start like a mask term (`causal`, `window(..)`, `[..]`, ..), which after a
/// `mask` entry means a `,` where a `+` belongs.
fn starts_mask_term(tokens: &[TokenTree]) -> bool {
    match tokens {
        [TokenTree::Ident(ident), rest @ ..] => {
            [
                "causal",
                "window",
                "query_lengths",
                "kv_lengths",
                "segment_ids",
            ]
            .iter()
            .any(|term| ident == term)
                && !matches!(rest.first(), Some(TokenTree::Punct(p)) if p.as_char() == ':')
        }
        [TokenTree::Group(group), ..] => group.delimiter() == Delimiter::Bracket,
        _ => false,
    }
}

fn parse_entries(body: TokenStream, layer: &mut LayerSyntax) {
    let mut previous_comma: Option<Span> = None;
    for (tokens, comma_span) in split_commas(body) {
        let after_mask = layer
            .entries
            .last()
            .is_some_and(|entry| entry.key == "mask");
        if let (true, Some(comma)) = (after_mask && starts_mask_term(&tokens), previous_comma) {
            layer.errors.push(syn::Error::new(
                comma,
                "the terms of a mask are joined with `+`, not `,`: \
                 `mask: causal + window(512, 0)`",
            ));
            previous_comma = Some(comma_span);
            continue;
        }
        previous_comma = Some(comma_span);
        if tokens.is_empty() {
            layer.errors.push(syn::Error::new(
                comma_span,
                "unexpected `,`: expected an entry such as `query: [B, T, H, D]`",
            ));
            continue;
        }
        for tokens in split_semicolons(tokens, &mut layer.errors) {
            for tokens in split_missing_commas(tokens, &mut layer.errors) {
                match parse_entry(tokens) {
                    Ok(entry) => layer.entries.push(entry),
                    Err(error) => layer.errors.push(error),
                }
            }
        }
    }
}

/// Splits `query: [..]; key: [..]` at each top-level `;`, reporting it: entries are separated by
/// `,` (a struct's fields), and a `;` would otherwise make the next entry part of this value.
fn split_semicolons(tokens: Vec<TokenTree>, errors: &mut Vec<syn::Error>) -> Vec<Vec<TokenTree>> {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    for tree in tokens {
        match &tree {
            TokenTree::Punct(p) if p.as_char() == ';' => {
                errors.push(syn::Error::new(
                    p.span(),
                    "entries are separated by `,`, not `;`",
                ));
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(tree),
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// Splits `query: [..] key: [..]` (a forgotten comma) into two entries, reporting the comma.
fn split_missing_commas(
    tokens: Vec<TokenTree>,
    errors: &mut Vec<syn::Error>,
) -> Vec<Vec<TokenTree>> {
    let mut entries = Vec::new();
    let mut start = 0;
    for i in 2..tokens.len().saturating_sub(1) {
        let starts_entry = matches!(
            (&tokens[i - 1], &tokens[i], &tokens[i + 1]),
            (TokenTree::Group(_) | TokenTree::Ident(_) | TokenTree::Literal(_), TokenTree::Ident(_), TokenTree::Punct(colon))
                if colon.as_char() == ':' && colon.spacing() == proc_macro2::Spacing::Alone
        );
        let after_attribute =
            matches!(&tokens[i - 2], TokenTree::Punct(hash) if hash.as_char() == '#');
        // `query: [..] | key: [..]`, `query: [..]. key: [..]`: another separator than `,`.
        let separator = match (&tokens[i - 1], &tokens[i], &tokens[i + 1]) {
            (TokenTree::Punct(sep), TokenTree::Ident(_), TokenTree::Punct(colon))
                if matches!(sep.as_char(), '|' | '.' | '/' | '&')
                    && colon.as_char() == ':'
                    && colon.spacing() == proc_macro2::Spacing::Alone =>
            {
                Some(sep)
            }
            _ => None,
        };
        if let Some(sep) = separator
            && i > start + 2
        {
            errors.push(syn::Error::new(
                sep.span(),
                format!("entries are separated by `,`, not `{}`", sep.as_char()),
            ));
            entries.push(tokens[start..i - 1].to_vec());
            start = i;
            continue;
        }
        if starts_entry && !after_attribute && i > start + 1 {
            errors.push(syn::Error::new(
                tokens[i].span(),
                format!("expected `,` before `{}`", tokens[i]),
            ));
            entries.push(tokens[start..i].to_vec());
            start = i;
        }
    }
    entries.push(tokens[start..].to_vec());
    entries
}

fn parse_entry(tokens: Vec<TokenTree>) -> syn::Result<Entry> {
    let mut rest = tokens.as_slice();
    let mut attrs = Vec::new();
    while let [TokenTree::Punct(hash), TokenTree::Group(group), tail @ ..] = rest {
        if hash.as_char() != '#' || group.delimiter() != Delimiter::Bracket {
            break;
        }
        let attr_tokens: TokenStream = rest[..2].iter().cloned().collect();
        attrs.extend(Attribute::parse_outer.parse2(attr_tokens)?);
        rest = tail;
    }
    let entry_tokens: TokenStream = rest.iter().cloned().collect();
    let (key, value_tokens) = match rest {
        [TokenTree::Ident(key), TokenTree::Punct(colon), value @ ..] if colon.as_char() == ':' => {
            (key.clone(), value)
        }
        [TokenTree::Ident(key)] => {
            return Err(syn::Error::new(
                key.span(),
                format!("expected `:` and a value after `{key}`"),
            ));
        }
        [TokenTree::Ident(key), TokenTree::Punct(p), ..] if p.as_char() == '=' => {
            return Err(syn::Error::new(
                p.span(),
                format!("expected `:` after `{key}`; entries are written `name: value`"),
            ));
        }
        [TokenTree::Ident(key), next, ..] => {
            return Err(syn::Error::new(
                next.span(),
                format!("expected `:` between `{key}` and its value"),
            ));
        }
        [] => {
            let attrs: TokenStream = tokens.iter().cloned().collect();
            return Err(syn::Error::new_spanned(
                attrs,
                "expected an entry `name: value` after this doc comment",
            ));
        }
        _ => {
            return Err(syn::Error::new_spanned(
                entry_tokens,
                "expected an entry `name: value`, such as `query: [B, T, H, D]`",
            ));
        }
    };
    if value_tokens.is_empty() {
        return Err(syn::Error::new(
            key.span(),
            format!("expected a value after `{key}:`"),
        ));
    }
    let value = parse_value(value_tokens);
    Ok(Entry { attrs, key, value })
}

fn parse_value(tokens: &[TokenTree]) -> Value {
    let mut terms = Vec::new();
    let mut current: Vec<TokenTree> = Vec::new();
    for tree in tokens {
        match tree {
            TokenTree::Punct(p) if p.as_char() == '+' => {
                terms.push(parse_term(&current, p.span()));
                current.clear();
            }
            _ => current.push(tree.clone()),
        }
    }
    let end = tokens.last().map_or_else(Span::call_site, TokenTree::span);
    terms.push(parse_term(&current, end));
    Value {
        terms,
        tokens: tokens.iter().cloned().collect(),
    }
}

/// One term; `empty_span` is used when `tokens` is empty (as in `causal +`).
fn parse_term(tokens: &[TokenTree], empty_span: Span) -> Term {
    match tokens {
        [TokenTree::Group(group)] if group.delimiter() == Delimiter::Bracket => {
            Term::Shape(ShapeSyntax {
                span: group.span(),
                dims: parse_dims(group.stream()),
            })
        }
        [TokenTree::Ident(ident)] => Term::Ident(ident.clone()),
        [TokenTree::Ident(name), TokenTree::Group(group)]
            if group.delimiter() == Delimiter::Parenthesis =>
        {
            let args = split_commas(group.stream())
                .into_iter()
                .map(|(tokens, comma)| {
                    let tokens: TokenStream = tokens.into_iter().collect();
                    let span = if tokens.is_empty() {
                        comma
                    } else {
                        tokens.span()
                    };
                    Arg { tokens, span }
                })
                .collect();
            Term::Call {
                name: name.clone(),
                span: group.span(),
                args,
            }
        }
        [TokenTree::Literal(literal)] => Term::Lit {
            minus: None,
            lit: Lit::new(literal.clone()),
        },
        [TokenTree::Punct(minus), TokenTree::Literal(literal)] if minus.as_char() == '-' => {
            Term::Lit {
                minus: Some(minus.span()),
                lit: Lit::new(literal.clone()),
            }
        }
        [] => Term::Other(TokenTree::Punct(punct('+', empty_span)).into()),
        _ => Term::Other(tokens.iter().cloned().collect()),
    }
}

fn parse_dims(tokens: TokenStream) -> Vec<DimSyntax> {
    split_commas(tokens)
        .into_iter()
        .map(|(tokens, comma_span)| parse_dim(&tokens, comma_span))
        .collect()
}

fn parse_dim(tokens: &[TokenTree], comma_span: Span) -> DimSyntax {
    match tokens {
        [TokenTree::Ident(name)] => DimSyntax::Named(name.clone()),
        [TokenTree::Literal(literal)] => match Lit::new(literal.clone()) {
            Lit::Int(int) => DimSyntax::Size(int),
            _ => DimSyntax::Malformed(tokens.iter().cloned().collect(), literal.span()),
        },
        [TokenTree::Ident(name), TokenTree::Punct(eq), size @ ..]
            if eq.as_char() == '=' && eq.spacing() == proc_macro2::Spacing::Alone =>
        {
            DimSyntax::Bound {
                name: name.clone(),
                size: parse_term(size, eq.span()),
            }
        }
        [] => DimSyntax::Malformed(TokenStream::new(), comma_span),
        _ => {
            let stream: TokenStream = tokens.iter().cloned().collect();
            let span = stream.span();
            DimSyntax::Malformed(stream, span)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn reads_entries_terms_and_dims() {
        let input = parse(quote! {
            /// Doc.
            pub struct Layer {
                query: [B, T, H = 12, 64],
                mask: causal + [B, 1, 1, S],
                dropout_rate: -0.5,
            }
        })
        .unwrap();
        let layer = &input.layers[0];
        assert_eq!(layer.ident, "Layer");
        assert!(layer.errors.is_empty());
        assert_eq!(layer.entries.len(), 3);
        let Term::Shape(shape) = &layer.entries[0].value.terms[0] else {
            panic!("query is a shape")
        };
        assert!(matches!(shape.dims[0], DimSyntax::Named(_)));
        assert!(matches!(shape.dims[2], DimSyntax::Bound { .. }));
        assert!(matches!(shape.dims[3], DimSyntax::Size(_)));
        assert_eq!(layer.entries[1].value.terms.len(), 2);
        assert!(matches!(
            layer.entries[2].value.terms[0],
            Term::Lit { minus: Some(_), .. }
        ));
    }

    #[test]
    fn doc_comments_on_entries_and_forgotten_commas() {
        let input = parse(quote! {
            struct Layer {
                /// The queries.
                query: [T, H, D]
                key: [S, H, D]
            }
        })
        .unwrap();
        let layer = &input.layers[0];
        assert_eq!(layer.entries.len(), 2);
        assert_eq!(layer.entries[0].attrs.len(), 1);
        assert_eq!(layer.errors.len(), 1);
        assert_eq!(layer.errors[0].to_string(), "expected `,` before `key`");
    }

    #[test]
    fn keeps_going_after_a_broken_entry() {
        let input = parse(quote! {
            struct Layer { query [B, T, H, D], , key: [B, S, H, D], dtype: }
        })
        .unwrap();
        let layer = &input.layers[0];
        assert_eq!(layer.errors.len(), 3);
        assert_eq!(layer.entries.len(), 1);
        assert_eq!(layer.entries[0].key, "key");
    }

    #[test]
    fn header_errors_are_fatal_and_spanned() {
        let error = parse(quote! { pub Layer { } }).err().unwrap();
        assert!(error.to_string().contains("expected `struct`"));
        let error = parse(quote! {}).err().unwrap();
        assert!(error.to_string().contains("expected a layer declaration"));
    }

    #[test]
    fn malformed_dims_are_kept() {
        let input = parse(quote! { struct L { query: [B + 1, , 1.5, H = ] } }).unwrap();
        let Term::Shape(shape) = &input.layers[0].entries[0].value.terms[0] else {
            panic!("a shape")
        };
        assert_eq!(shape.dims.len(), 4);
        assert!(matches!(shape.dims[0], DimSyntax::Malformed(..)));
        assert!(matches!(shape.dims[1], DimSyntax::Malformed(..)));
        assert!(matches!(shape.dims[2], DimSyntax::Malformed(..)));
        assert!(matches!(
            shape.dims[3],
            DimSyntax::Bound {
                size: Term::Other(_),
                ..
            }
        ));
    }
}
