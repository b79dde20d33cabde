//! `attn-expand FILE.rs`: prints the expansion of every `attention!` in FILE.
fn main() {}
