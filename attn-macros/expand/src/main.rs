//! `attn-expand FILE.rs..`: prints the expansion of every `attention!` in each FILE, formatted
//! with prettyplease, on stable Rust. Errors in a declaration are printed as `file:line:col`
//! messages (exit code 1), as the compiler would report them.
//!
//! ```text
//! cargo run -p attn-expand -- examples/gpt2.rs
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() || paths.iter().any(|p| p == "-h" || p == "--help") {
        eprintln!(
            "usage: attn-expand FILE.rs..\n\n\
             Prints the expansion of every `attention!` invocation in each file."
        );
        return ExitCode::from(2);
    }
    let mut status = ExitCode::SUCCESS;
    for path in &paths {
        let source = match std::fs::read_to_string(path) {
            Ok(source) => source,
            Err(error) => {
                eprintln!("{path}: cannot read: {error}");
                status = ExitCode::FAILURE;
                continue;
            }
        };
        match attn_expand::expand_source(&source) {
            Ok(text) => {
                println!("// Expansion of {path}");
                print!("{text}");
            }
            Err(errors) => {
                for error in errors {
                    let start = error.span().start();
                    eprintln!("{path}:{}:{}: error: {error}", start.line, start.column + 1);
                }
                status = ExitCode::FAILURE;
            }
        }
    }
    status
}
