//! Grouped-query attention: key/value heads that divide the query heads.

use super::*;

impl Structure<'_> {
    /// The heads of `key` against those of `query`: the same, or (grouped-query attention; 1 is
    /// multi-query attention) a divisor. When both are static and do not divide, an error at
    /// `key`'s heads. When either is chosen at run time, the generated code checks it at entry.
    pub(super) fn kv_heads(&self, key: &ShapeEntry, query: &ShapeEntry, errors: &mut Errors) {
        let dim = &key.dims[key.dims.len() - 2];
        let query_dim = &query.dims[query.dims.len() - 2];
        let (Some(axis), Some(query_axis)) = (&dim.axis, &query_dim.axis) else {
            return;
        };
        if self.same(axis, query_axis) {
            return;
        }
        let described = |axis: &Axis| match (axis, self.size(axis)) {
            (Axis::Named(name), Some(n)) => format!("`{name}` = {n}"),
            (axis, _) => show(axis),
        };
        if let (Some(kv), Some(heads)) = (self.size(axis), self.size(query_axis))
            && (kv == 0 || heads % kv != 0)
        {
            // The divisors are listed for head counts a layer can have (not for 2^40).
            let divisors = if heads <= 4096 {
                let divisors: Vec<String> = (1..=heads)
                    .filter(|d| heads % d == 0)
                    .map(|d| d.to_string())
                    .collect();
                format!(": one of {}", divisors.join(", "))
            } else {
                String::new()
            };
            errors.at(
                dim.span,
                format!(
                    "`key` has {} heads, which does not divide the {} heads of `query`; \
                     grouped-query attention needs key/value heads that divide the query heads \
                     (query head `n` reads key/value head `n / (heads / kv_heads)`){divisors}",
                    described(axis),
                    described(query_axis),
                ),
            );
        }
    }
}
