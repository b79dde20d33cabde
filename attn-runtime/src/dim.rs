//! Dimensions known at compile time ([`Const<N>`]) or at run time (`usize`), and shapes as
//! tuples of them (the dfdx pattern; equality checks after nalgebra's `DimEq`).

use core::fmt::Debug;

/// One dimension of a shape: a compile-time size ([`Const<N>`]) or a run-time size (`usize`).
pub trait Dim: Copy + Eq + Debug + Send + Sync + 'static {
    /// The size of this dimension.
    fn size(&self) -> usize;
    /// Builds the dimension from a size; `None` if a static dimension has another size.
    fn from_size(n: usize) -> Option<Self>;
}

/// A dimension whose size `N` is known at compile time.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Const<const N: usize>;

/// Prints the size, as the type is written: `Const<12>`.
impl<const N: usize> Debug for Const<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Const<{N}>")
    }
}

impl<const N: usize> Dim for Const<N> {
    #[inline(always)]
    fn size(&self) -> usize {
        N
    }
    fn from_size(n: usize) -> Option<Self> {
        (n == N).then_some(Const)
    }
}

impl Dim for usize {
    #[inline(always)]
    fn size(&self) -> usize {
        *self
    }
    fn from_size(n: usize) -> Option<Self> {
        Some(n)
    }
}

/// A dimension whose size is a compile-time constant.
pub trait ConstDim: Dim + Default {
    /// The size.
    const SIZE: usize;
}

impl<const N: usize> ConstDim for Const<N> {
    const SIZE: usize = N;
}

/// Equality of two dimensions that an `attention!` declaration gave the same name.
///
/// Two static dims must be the same type (checked by the compiler, with this trait's message);
/// a static and a run-time dim, or two run-time dims, are compared at run time by [`DimEq::dim_eq`].
#[diagnostic::on_unimplemented(
    message = "attention dimension mismatch: `{Self}` vs `{Rhs}`",
    label = "this dimension must equal the one declared in `attention!`",
    note = "dimensions with the same name in an `attention!` declaration must have the same size; \
            use `usize` for a dimension that is only known at run time"
)]
pub trait DimEq<Rhs: Dim>: Dim {
    /// Whether the two sizes are equal.
    fn dim_eq(self, rhs: Rhs) -> bool;
}

impl<D: Dim> DimEq<D> for D {
    #[inline(always)]
    fn dim_eq(self, rhs: D) -> bool {
        self.size() == rhs.size()
    }
}

impl<const N: usize> DimEq<usize> for Const<N> {
    #[inline(always)]
    fn dim_eq(self, rhs: usize) -> bool {
        N == rhs
    }
}

impl<const N: usize> DimEq<Const<N>> for usize {
    #[inline(always)]
    fn dim_eq(self, _rhs: Const<N>) -> bool {
        self == N
    }
}

/// A shape: a tuple of [`Dim`]s, outermost first (row-major), of rank 0 to 8.
pub trait Shape: Copy + Debug + Send + Sync + 'static {
    /// The number of dimensions.
    const RANK: usize;
    /// The sizes, outermost first.
    fn dims(&self) -> Vec<usize>;
    /// The number of elements, or `None` if the product overflows `usize`.
    fn num_elements(&self) -> Option<usize> {
        self.dims()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

macro_rules! tuple_shape {
    ($rank:literal; $($d:ident $i:tt),*) => {
        impl<$($d: Dim),*> Shape for ($($d,)*) {
            const RANK: usize = $rank;
            fn dims(&self) -> Vec<usize> {
                vec![$(self.$i.size()),*]
            }
        }
    };
}

tuple_shape!(0;);
tuple_shape!(1; A 0);
tuple_shape!(2; A 0, B 1);
tuple_shape!(3; A 0, B 1, C 2);
tuple_shape!(4; A 0, B 1, C 2, D 3);
tuple_shape!(5; A 0, B 1, C 2, D 3, E 4);
tuple_shape!(6; A 0, B 1, C 2, D 3, E 4, F 5);
tuple_shape!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_shape!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// The number of elements of a shape given as sizes, or `None` if the shape is too big.
///
/// NumPy's rule (`array is too big`): the product of the nonzero dims must fit, whatever the
/// order of the dims; a shape with a 0 then has 0 elements. (Folding left to right accepted
/// `[0, 2^62, 6]` but not `[2^62, 6, 0]`, and strides computed from the right overflowed.)
pub fn checked_product(dims: &[usize]) -> Option<usize> {
    let nonzero = dims
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(if dims.contains(&0) { 0 } else { nonzero })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn const_and_runtime_dims() {
        assert_eq!(Const::<4>.size(), 4);
        assert_eq!(Const::<4>::from_size(4), Some(Const));
        assert_eq!(Const::<4>::from_size(5), None);
        assert!(Const::<3>.dim_eq(3usize));
        assert!(!7usize.dim_eq(Const::<3>));
        assert_eq!((Const::<2>, 3usize, Const::<4>).dims(), vec![2, 3, 4]);
        assert_eq!(<(usize, usize)>::RANK, 2);
        assert_eq!((usize::MAX, 2usize).num_elements(), None);
        assert_eq!(().num_elements(), Some(1));
    }

    #[test]
    fn const_debug_prints_its_size() {
        assert_eq!(format!("{:?}", Const::<12>), "Const<12>");
        assert_eq!(format!("{:?}", (4usize, Const::<64>)), "(4, Const<64>)");
    }
}
