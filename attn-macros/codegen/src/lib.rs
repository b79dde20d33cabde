//! Parser, validator and code generator of the `attention!` macro.
