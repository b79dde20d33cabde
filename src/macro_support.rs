//! Helpers that `attention!`-generated code calls (through `attn::__private`); not public API.

use attn_runtime::{AttnError, Const, Context, Dim};

/// `Self` is the static size that an `attention!` declaration gave the dim `Name`.
///
/// Implemented only for `Const<N>` with `N` the declared size, so a tensor of another static size
/// (or a run-time `usize`) in that position fails to compile with a message naming the dim:
/// `Name` is a marker type generated with the dim's name.
#[diagnostic::on_unimplemented(
    message = "dimension `{Name}` is declared as `{Size}`, but a tensor passed here has `{Self}`",
    label = "`{Name}` must be `{Size}` in every tensor passed here",
    note = "the `attention!` declaration fixes `{Name}`; build the tensor's shape with `{Size}` \
            in that position (or declare the dim without a size to choose it at run time)"
)]
pub trait Declared<Name, Size>: Dim {}

impl<Name, const N: usize> Declared<Name, Const<N>> for Const<N> {}

/// Checks that two uses of the run-time dim `dim` have the same size.
///
/// # Errors
///
/// [`AttnError::DimMismatch`] naming the dim, both tensors and both sizes.
#[inline]
pub fn same_dim<D: Dim>(
    dim: &'static str,
    (first, first_dim): (&'static str, D),
    (second, second_dim): (&'static str, D),
) -> Result<(), AttnError> {
    if first_dim.size() == second_dim.size() {
        Ok(())
    } else {
        Err(AttnError::DimMismatch {
            dim,
            first,
            first_size: first_dim.size(),
            second,
            second_size: second_dim.size(),
        })
    }
}

/// Checks, for a layer whose `key`/`value` heads are declared with another dim than `query`'s
/// (grouped-query attention) and chosen at run time, that they divide the query heads, as the
/// runtime requires (query head `n` reads key/value head `n / (heads / kv_heads)`).
///
/// # Errors
///
/// [`AttnError::Axis`] naming both dims and both sizes.
#[inline]
pub fn kv_heads_divide<H: Dim, G: Dim>(
    (heads_dim, heads): (&'static str, H),
    (kv_heads_dim, kv_heads): (&'static str, G),
) -> Result<(), AttnError> {
    let (heads, kv_heads) = (heads.size(), kv_heads.size());
    let divides = if kv_heads == 0 {
        heads == 0
    } else {
        heads.is_multiple_of(kv_heads)
    };
    if divides {
        Ok(())
    } else {
        Err(AttnError::Axis {
            tensor: "key",
            axis: format!("heads `{kv_heads_dim}` (axis -2)"),
            expected: format!(
                "a divisor of the {heads} heads of `query` (`{heads_dim}`), for grouped-query \
                 attention"
            ),
            found: kv_heads,
        })
    }
}

/// The same context without its sow sink: for layers declared without `sow`, which never sow
/// (as Flax's functions do not without `module`).
pub fn without_sow<'c>(ctx: &'c mut Context<'_>) -> Context<'c> {
    let mut ctx = ctx.reborrow();
    ctx.sow = None;
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_heads_divide_names_both_dims() {
        assert_eq!(kv_heads_divide(("H", 32usize), ("G", 8usize)), Ok(()));
        assert_eq!(kv_heads_divide(("H", 32usize), ("G", 1usize)), Ok(()));
        assert_eq!(kv_heads_divide(("H", 0usize), ("G", 1usize)), Ok(()));
        assert_eq!(kv_heads_divide(("H", 0usize), ("G", 0usize)), Ok(()));
        let error = kv_heads_divide(("H", 32usize), ("G", 5usize)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "`key` axis heads `G` (axis -2): expected a divisor of the 32 heads of `query` \
             (`H`), for grouped-query attention, found 5"
        );
        assert!(kv_heads_divide(("H", 4usize), ("G", 0usize)).is_err());
        assert!(kv_heads_divide(("H", 4usize), ("G", 8usize)).is_err());
    }

    #[test]
    fn same_dim_names_both_sizes() {
        assert_eq!(same_dim("T", ("query", 7usize), ("key", 7usize)), Ok(()));
        let error = same_dim("T", ("query", 7usize), ("key", 9usize)).unwrap_err();
        assert_eq!(
            error,
            AttnError::DimMismatch {
                dim: "T",
                first: "query",
                first_size: 7,
                second: "key",
                second_size: 9
            }
        );
    }
}
