//! Finding the `attention!` invocations of a Rust file (for the expansion viewer, the snapshot
//! tests and the fuzz test, which work on source files rather than inside the compiler).

use syn::visit::Visit;

/// Every `attention! { .. }` (or `attn::attention! { .. }`) invocation in `file`, in source
/// order, wherever it stands (at the top level, in a module or in a function body).
pub fn invocations(file: &syn::File) -> Vec<syn::Macro> {
    let mut found = Invocations(Vec::new());
    found.visit_file(file);
    found.0
}

struct Invocations(Vec<syn::Macro>);

impl Visit<'_> for Invocations {
    fn visit_macro(&mut self, mac: &syn::Macro) {
        if mac
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "attention")
        {
            self.0.push(mac.clone());
        }
    }
}
