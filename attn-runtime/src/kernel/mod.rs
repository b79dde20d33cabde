//! Attention kernels.

// Not called yet: wired into the runtime's dispatch when its kernel layer lands.
#[allow(dead_code)]
pub(crate) mod exp;
#[allow(dead_code)]
pub(crate) mod flash;
#[allow(dead_code)]
pub(crate) mod simd;
