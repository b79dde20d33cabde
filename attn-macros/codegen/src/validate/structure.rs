//! Cross-shape checks: ranks, batch dims, matching dims of query/key/value, and the broadcast
//! of bias and mask to the logits.

use super::*;

/// What a bias or mask dim must match: `[batch.., heads, q_len, kv_len]` of the logits.
pub(super) struct Targets {
    /// `(axis, description)`, outermost first.
    pub(super) axes: Vec<(Option<Axis>, String)>,
}

impl Targets {
    pub(super) fn new(query: &ShapeEntry, key: &ShapeEntry) -> Targets {
        let rank = query.dims.len();
        let batch = rank - 3;
        let mut axes: Vec<(Option<Axis>, String)> = query.dims[..batch]
            .iter()
            .enumerate()
            .map(|(i, d)| (d.axis.clone(), format!("batch dim {} of `query`", i + 1)))
            .collect();
        axes.push((
            query.dims[rank - 2].axis.clone(),
            "the heads of `query`".into(),
        ));
        axes.push((
            query.dims[rank - 3].axis.clone(),
            "the length of `query`".into(),
        ));
        let key_rank = key.dims.len();
        axes.push((
            key.dims[key_rank - 3].axis.clone(),
            "the length of `key`".into(),
        ));
        Targets { axes }
    }
}

/// Cross-shape checks.
pub(super) struct Structure<'t> {
    pub(super) table: &'t DimTable,
}

pub(super) fn show(axis: &Axis) -> String {
    match axis {
        Axis::Named(name) => format!("`{name}`"),
        Axis::Size(n) => format!("`{n}`"),
    }
}

impl Structure<'_> {
    /// Two dims are the same if they have the same name or the same static size.
    pub(super) fn same(&self, a: &Axis, b: &Axis) -> bool {
        let size = |axis: &Axis| match axis {
            Axis::Named(name) => self.table.size_of(name),
            Axis::Size(n) => Some(*n),
        };
        match (a, b) {
            (Axis::Named(x), Axis::Named(y)) if x == y => true,
            _ => matches!((size(a), size(b)), (Some(x), Some(y)) if x == y),
        }
    }

    pub(super) fn rank(&self, name: &str, shape: &ShapeEntry, errors: &mut Errors) -> bool {
        let rank = shape.dims.len();
        if shape.dims.iter().any(|dim| dim.axis.is_none()) {
            // A malformed dim (already reported) may hide or merge dims: no rank error now.
            return (3..=MAX_RANK).contains(&rank);
        }
        if rank < 3 {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` needs at least 3 dims, `[len, heads, depth]` after any batch dims; \
                     found {rank}"
                ),
            );
            false
        } else if rank > MAX_RANK {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {rank} dims; at most {MAX_RANK} are supported \
                     ({} batch dims)",
                    MAX_RANK - 3
                ),
            );
            false
        } else {
            true
        }
    }

    /// Whether the number of batch dims agrees (the dims themselves are reported one by one).
    pub(super) fn same_batch(
        &self,
        name: &str,
        shape: &ShapeEntry,
        query: &ShapeEntry,
        errors: &mut Errors,
    ) -> bool {
        let batch = shape.dims.len() - 3;
        let query_batch = query.dims.len() - 3;
        if batch != query_batch {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {batch} batch dims but `query` has {query_batch}; \
                     the batch dims of query, key and value must be the same"
                ),
            );
            return false;
        }
        for (i, (dim, query_dim)) in shape.dims.iter().zip(&query.dims).take(batch).enumerate() {
            if let (Some(axis), Some(query_axis)) = (&dim.axis, &query_dim.axis)
                && !self.same(axis, query_axis)
            {
                errors.at(
                    dim.span,
                    format!(
                        "batch dim {} of `{name}` is {} but `query` has {} there; \
                             the batch dims of query, key and value must be the same",
                        i + 1,
                        show(axis),
                        show(query_axis)
                    ),
                );
            }
        }
        true
    }

    pub(super) fn size(&self, axis: &Axis) -> Option<usize> {
        match axis {
            Axis::Named(name) => self.table.size_of(name),
            Axis::Size(n) => Some(*n),
        }
    }

    /// Compares dim `from_end` (0 = last) of `shape` with dim `other_from_end` of `other`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn same_axis(
        &self,
        shape: &ShapeEntry,
        from_end: usize,
        what: &str,
        other: &ShapeEntry,
        other_from_end: usize,
        other_what: &str,
        errors: &mut Errors,
    ) {
        let dim = &shape.dims[shape.dims.len() - 1 - from_end];
        let other_dim = &other.dims[other.dims.len() - 1 - other_from_end];
        if let (Some(axis), Some(other_axis)) = (&dim.axis, &other_dim.axis)
            && !self.same(axis, other_axis)
        {
            errors.at(
                dim.span,
                format!(
                    "`{}` has {what} {} but `{}` has {other_what} {}; \
                         use the same name or size",
                    shape.entry.key,
                    show(axis),
                    other.entry.key,
                    show(other_axis)
                ),
            );
        }
    }

    pub(super) fn broadcast(
        &self,
        name: &str,
        shape: &ShapeEntry,
        targets: &Targets,
        errors: &mut Errors,
    ) {
        let rank = shape.dims.len();
        let max = targets.axes.len();
        if rank > max {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {rank} dims but the logits `[batch.., heads, q_len, kv_len]` \
                     have {max}; a {name} may have fewer dims, not more"
                ),
            );
            return;
        }
        let offset = max - rank;
        for (dim, (target, what)) in shape.dims.iter().zip(&targets.axes[offset..]) {
            let (Some(axis), Some(target)) = (&dim.axis, target) else {
                continue;
            };
            if matches!(axis, Axis::Size(1)) || self.same(axis, target) {
                continue;
            }
            errors.at(
                dim.span,
                format!(
                    "this `{name}` dim must be `1` or {} ({what}); found {}",
                    show(target),
                    show(axis)
                ),
            );
        }
    }
}
