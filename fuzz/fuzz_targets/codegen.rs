//! Fuzz target: any UTF-8 text that lexes as Rust tokens goes through the macro's stages as
//! plain functions (both pipelines: attention cores and projection layers). Properties: nothing
//! panics; a declaration that validates expands to Rust items; the macro's full output (code,
//! or `compile_error!`s plus stub layers) is always Rust items; every error has a message.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use proc_macro2::TokenStream;

fuzz_target!(|data: &[u8]| {
    if let Ok(source) = std::str::from_utf8(data)
        && let Ok(tokens) = TokenStream::from_str(source)
    {
        check(tokens, source);
    }
    // Spans of parsed text are kept in a thread-local source map; drop them so that memory
    // stays flat over millions of inputs.
    proc_macro2::extra::invalidate_current_thread_spans();
});

fn check(tokens: TokenStream, source: &str) {
    // `try_attention` runs both pipelines: attention cores and projection layers (`inputs_q`).
    match attn_codegen::try_attention(tokens.clone()) {
        Ok(code) => {
            if let Err(e) = syn::parse2::<syn::File>(code.clone()) {
                panic!("expansion is not Rust items ({e}) for:\n{source}\n---\n{code}");
            }
        }
        Err(errors) => {
            for error in errors {
                assert!(
                    !error.to_string().is_empty(),
                    "empty message for:\n{source}"
                );
            }
        }
    }
    let full = attn_codegen::attention(tokens);
    if let Err(e) = syn::parse2::<syn::File>(full.clone()) {
        panic!("macro output is not Rust items ({e}) for:\n{source}\n---\n{full}");
    }
}
