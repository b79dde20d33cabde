//! The `attention!` procedural macro. All logic lives in `attn-codegen`.
