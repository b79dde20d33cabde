//! Pretty-printing of `attention!` expansions, shared by the `attn-expand` viewer and the
//! expansion snapshot tests (`tests/expand.rs` of the `attn` crate).

#![deny(missing_docs)]

use proc_macro2::TokenStream;

/// Formats generated items with prettyplease. Tokens that are not a sequence of items (never
/// produced by `attn-codegen`) are returned as plain token text.
pub fn pretty(tokens: TokenStream) -> String {
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}

/// The pretty-printed expansion of every `attention!` invocation in `source`, in order, each
/// preceded by a `// attention! at line N` comment. On failure: every error of every invocation
/// (or the Rust syntax error of the file), with spans that give line and column in `source`.
pub fn expand_source(source: &str) -> Result<String, Vec<syn::Error>> {
    let file = syn::parse_file(source).map_err(|error| vec![error])?;
    let invocations = attn_codegen::invocations(&file);
    if invocations.is_empty() {
        return Err(vec![syn::Error::new(
            proc_macro2::Span::call_site(),
            "no `attention!` invocation found",
        )]);
    }
    let mut output = String::new();
    let mut errors = Vec::new();
    for mac in invocations {
        let line = mac
            .path
            .segments
            .first()
            .map_or(0, |segment| segment.ident.span().start().line);
        match attn_codegen::try_attention(mac.tokens) {
            Ok(tokens) => {
                output.push_str(&format!("// attention! at line {line}\n"));
                output.push_str(&pretty(tokens));
            }
            Err(error) => errors.extend(error),
        }
    }
    if errors.is_empty() {
        Ok(output)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_every_invocation_formatted() {
        let source = "use attn::attention;\n\
                      attention! { struct A { query: [T, H, D], key: [S, H, D] } }\n\
                      fn main() { attn::attention! { struct B { query: [T, H, D], key: [T, H, D] } } }\n";
        let text = expand_source(source).unwrap();
        assert!(text.starts_with("// attention! at line 2\n"));
        assert!(text.contains("// attention! at line 3\n"));
        assert!(text.contains("pub fn weights<T, H, D, S>(\n"));
        assert!(text.contains("\nstruct B;\n"));
    }

    #[test]
    fn errors_carry_their_position_in_the_file() {
        let source = "attention! {\n    struct A {\n        query: [T, H, D],\n        key: [S, H, D],\n        dtpye: f32,\n    }\n}\n";
        let errors = expand_source(source).unwrap_err();
        assert_eq!(errors.len(), 1);
        let start = errors[0].span().start();
        assert_eq!((start.line, start.column), (5, 8));
        assert!(errors[0].to_string().contains("did you mean `dtype`?"));
    }

    #[test]
    fn a_file_without_attention_is_an_error() {
        assert!(expand_source("fn main() {}").is_err());
        assert!(expand_source("fn main( {}").is_err());
    }
}
