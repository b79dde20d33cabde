//! Regression tests of issue 12 (hardening), one per finding: the reproducers of the issue,
//! each asserting the result (Flax's, or an error naming the tensor, axis and sizes) and a bound
//! on the memory it takes.
//!
//! This binary has its own global allocator: it counts the bytes live and their peak, and
//! refuses (returns null) any allocation that would bring the live bytes over `CAP` (256 MiB),
//! as a capped address space would. A fallible allocation then becomes an `AttnError`; an
//! infallible one aborts this whole binary, which fails the test run. The tests take a lock so
//! that each measures only its own allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use attn::kernel::{self, Broadcast, Geometry, Mask, Options};
use attn::{
    Array, AttnError, Context, DType, DropoutRng, FlaxArgs, Intermediates, PairwiseFn,
    combine_masks, dot_product_attention, dot_product_attention_weights, make_attention_mask,
    make_causal_mask,
};

/// The memory cap: what a few-hundred-MB limit leaves after the test harness.
const CAP: usize = 256 << 20;

struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        let live = LIVE.fetch_add(size, Ordering::SeqCst) + size;
        if live > CAP {
            LIVE.fetch_sub(size, Ordering::SeqCst);
            return std::ptr::null_mut();
        }
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's layout has a nonzero size (GlobalAlloc's contract).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            let grow = new_size - old;
            let live = LIVE.fetch_add(grow, Ordering::SeqCst) + grow;
            if live > CAP {
                LIVE.fetch_sub(grow, Ordering::SeqCst);
                return std::ptr::null_mut();
            }
            PEAK.fetch_max(live, Ordering::SeqCst);
        } else {
            LIVE.fetch_sub(old - new_size, Ordering::SeqCst);
        }
        // SAFETY: forwarded unchanged; `ptr` and `layout` come from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by every test for its whole body: the counters are global, so a test allocating its
/// inputs (or calling attn unmeasured) beside another's measurement would be counted in it.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` alone, returning its result, the peak of the bytes allocated during it above what
/// was live before, and its wall time.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let start = Instant::now();
    let out = f();
    let time = start.elapsed();
    (out, PEAK.load(Ordering::SeqCst) - base, time)
}

/// [`measure`] of `f(setup())`, with `setup` run under the same lock (its allocations are not
/// counted, and do not land in another test's measurement).
fn measure_after<S, T>(setup: impl FnOnce() -> S, f: impl FnOnce(&S) -> T) -> (T, usize, Duration) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inputs = setup();
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let start = Instant::now();
    let out = f(&inputs);
    let time = start.elapsed();
    (out, PEAK.load(Ordering::SeqCst) - base, time)
}

const MB: usize = 1 << 20;

fn empty_f32(shape: &[usize]) -> Array {
    Array::new(Vec::<f32>::new(), shape.to_vec()).unwrap()
}

fn assert_empty(a: &Array, dtype: DType, shape: &[usize]) {
    assert_eq!(a.dtype(), dtype);
    assert_eq!(a.shape(), shape);
    assert!(a.is_empty());
}

/// Finding 1: the bias/mask stride loop overflowed (a panic with overflow checks on) when a dim
/// of the operand was 0 and the others multiplied past `usize`. Such a shape is too big (NumPy's
/// rule: the nonzero dims must multiply to a `usize`), an error naming it; one that fits gives
/// the empty result.
#[test]
fn finding_1_empty_bias_with_huge_dims_is_an_error_or_an_empty_result() {
    let _alone = alone();
    let e = Array::new(Vec::<f32>::new(), vec![0, 1, 6, 1 << 62]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`array` shape [0, 1, 6, 4611686018427387904]: the number of elements overflows usize"
    );
    let q = empty_f32(&[0, 6, 1, 1]);
    let k = empty_f32(&[0, 1 << 60, 1, 1]);
    let bias = empty_f32(&[0, 1, 6, 1 << 60]);
    let (r, peak, _) =
        measure(|| dot_product_attention_weights(&q, &k, FlaxArgs::new().bias(&bias)));
    assert_empty(&r.unwrap(), DType::F32, &[0, 1, 6, 1 << 60]);
    assert!(peak < MB, "{peak} bytes for an empty result");

    // The kernel layer, with a mask of the shape.
    let data: Vec<bool> = Vec::new();
    let e = Broadcast::new("mask", &data, &[0, 1, 6, 1 << 62]).unwrap_err();
    assert!(
        matches!(e, AttnError::Overflow { tensor: "mask", .. }),
        "{e}"
    );
    let (r, peak, _) = measure(|| {
        let mask = Broadcast::new("mask", &data, &[0, 1, 6, 1 << 60])?;
        let geom = Geometry {
            batch_shape: &[0],
            q_len: 6,
            kv_len: 1 << 60,
            heads: 1usize,
            kv_heads: 1usize,
            qk_depth: 1usize,
            v_depth: 0usize,
        };
        let mut ctx = Context {
            deterministic: true,
            dropout_rng: None,
            sow: None,
            pool: None,
        };
        let mut out: Vec<f32> = Vec::new();
        kernel::attention_weights::<f32, f32, f32, _, _, _, _>(
            &geom,
            &[],
            &[],
            None,
            &Mask::dense(mask),
            &Options::default(),
            &mut ctx,
            &mut out,
        )
    });
    r.unwrap();
    assert!(peak < MB, "{peak} bytes for an empty result");
}

/// Finding 2: the output path cloned the per-batch offset table of a mask with an infallible
/// allocation (1 GiB here: an abort under the cap).
#[test]
fn finding_2_empty_output_with_a_huge_batch_allocates_nothing() {
    let _alone = alone();
    let q = empty_f32(&[1 << 27, 0, 1, 1]);
    let m = Array::new(vec![true], vec![1]).unwrap();
    let (r, peak, _) = measure(|| dot_product_attention(&q, &q, &q, FlaxArgs::new().mask(&m)));
    assert_empty(&r.unwrap(), DType::F32, &[1 << 27, 0, 1, 1]);
    assert!(peak < MB, "{peak} bytes for an empty result");
}

/// Finding 3: resolving a bias or mask took 8 bytes per batch element before anything checked
/// that the result is empty; a 0-element mask that enlarges the batch copied the query first;
/// the kernel's dtype check of the output ran only after those allocations.
#[test]
fn finding_3_empty_results_and_cheap_errors_come_before_allocations() {
    let _alone = alone();
    let q = empty_f32(&[1 << 28, 1, 0, 1]);
    let bias = Array::new(vec![0.5f32], vec![1]).unwrap();
    let (r, peak, _) = measure(|| dot_product_attention(&q, &q, &q, FlaxArgs::new().bias(&bias)));
    assert_empty(&r.unwrap(), DType::F32, &[1 << 28, 1, 0, 1]);
    assert!(peak < MB, "{peak} bytes for an empty result");

    // A 0-element mask that enlarges the batch (2^20) and empties the key axis.
    let q = Array::new(vec![0.25f32; 64 * 64], vec![1, 64, 1, 64]).unwrap();
    let k = Array::new(vec![0.5f32; 64], vec![1, 1, 1, 64]).unwrap();
    let m = Array::new(Vec::<bool>::new(), vec![1 << 20, 1, 1, 0]).unwrap();
    let (r, peak, _) = measure(|| dot_product_attention_weights(&q, &k, FlaxArgs::new().mask(&m)));
    assert_empty(&r.unwrap(), DType::F32, &[1 << 20, 1, 64, 0]);
    assert!(peak < MB, "{peak} bytes for an empty result");

    // The kernel layer: a wrong output dtype is reported without allocating per batch element.
    let data = [true];
    let (r, peak, _) = measure(|| {
        let mask = Broadcast::new("mask", &data, &[1])?;
        let geom = Geometry {
            batch_shape: &[1 << 28],
            q_len: 1,
            kv_len: 1,
            heads: 0usize,
            kv_heads: 0usize,
            qk_depth: 1usize,
            v_depth: 1usize,
        };
        let mut ctx = Context {
            deterministic: true,
            dropout_rng: None,
            sow: None,
            pool: None,
        };
        let mut out: Vec<f64> = Vec::new();
        kernel::attention::<f32, f32, f64, _, _, _, _>(
            &geom,
            &[],
            &[],
            &[],
            None,
            &Mask::dense(mask),
            &Options::default(),
            &mut ctx,
            &mut out,
        )
    });
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::DType {
                tensor: "output",
                ..
            }
        ),
        "{e}"
    );
    assert!(peak < MB, "{peak} bytes for a dtype error");
}

/// Finding 4: f64, `force_fp32_for_softmax` and a value depth of 0 computed every logit of an
/// empty output (and took memory per head).
#[test]
fn finding_4_an_empty_output_computes_no_logit() {
    let _alone = alone();
    let (heads, len) = (1 << 14, 64);
    let n = len * heads;
    let q = Array::new(vec![0.5f64; n], vec![1, len, heads, 1]).unwrap();
    let v = Array::new(Vec::<f64>::new(), vec![1, len, heads, 0]).unwrap();
    let args = || FlaxArgs::new().force_fp32_for_softmax(true);
    let (r, peak, time) = measure(|| dot_product_attention(&q, &q, &v, args()));
    assert_empty(&r.unwrap(), DType::F64, &[1, len, heads, 0]);
    assert!(peak < MB, "{peak} bytes for an empty result");
    // 64 M logits before the fix (seconds); nothing now.
    assert!(
        time < Duration::from_millis(500),
        "{time:?} for an empty result"
    );
}

/// Finding 5: the mask helpers converted with infallible allocations after a fallible first
/// buffer (an abort under a cap), and peaked at several times the result.
#[test]
fn finding_5_mask_helpers_stay_within_the_result_and_fail_cleanly() {
    let _alone = alone();
    // 2 GiB of f64: an error under the cap, not an abort.
    let (r, _, _) = measure(|| make_causal_mask(&[1024, 512], 0, DType::F64));
    let e = r.unwrap_err();
    assert!(
        matches!(e, AttnError::Allocation { tensor: "mask", .. }),
        "{e}"
    );

    // 32 MiB of f64: the peak is the result (plus a little), not bool + f64 + copy.
    let (r, peak, _) = measure(|| make_causal_mask(&[64, 256], 0, DType::F64));
    let m = r.unwrap();
    assert_eq!(m.shape(), &[64, 1, 256, 256]);
    let d = m.as_slice::<f64>().unwrap();
    for (n, &x) in d.iter().enumerate().step_by(97) {
        let (i, j) = (n / 256 % 256, n % 256);
        assert_eq!(x, if i >= j { 1.0 } else { 0.0 });
    }
    let result = d.len() * 8;
    // Before: a bool mask, its f64 copy and the converted result (2.1 times the result).
    assert!(peak < 2 * result, "{peak} bytes for {result}");
    drop(m);

    // Two int32 [2048] to f32 (16 MiB): a bool buffer and the result, no index tables.
    let x = Array::new((0..2048).collect::<Vec<i32>>(), vec![2048]).unwrap();
    let y = Array::new((0..2048).rev().collect::<Vec<i32>>(), vec![2048]).unwrap();
    let (r, peak, _) =
        measure(|| make_attention_mask(&x, &y, PairwiseFn::GreaterEqual, 0, DType::F32));
    let m = r.unwrap();
    assert_eq!(m.shape(), &[1, 2048, 2048]);
    let d = m.as_slice::<f32>().unwrap();
    assert_eq!(d[0], 0.0); // 0 >= 2047
    assert_eq!(d[2047], 1.0); // 0 >= 0
    assert_eq!(d[2047 * 2048], 1.0); // 2047 >= 2047
    let result = d.len() * 4;
    assert!(peak < result + result / 3, "{peak} bytes for {result}");
}

/// Weights `[1, 1, 2, kv]` of a query `[NaN, 1]` (two rows of depth 1) with dropout at rate 0.5.
fn nan_query_call(kv: usize) -> (Array, Array, Array) {
    let q = Array::new(vec![f32::NAN, 1.0], vec![1, 2, 1, 1]).unwrap();
    let kd: Vec<f32> = (0..kv).map(|j| (j as f32 * 0.37).sin()).collect();
    let k = Array::new(kd.clone(), vec![1, kv, 1, 1]).unwrap();
    let v = Array::new(kd, vec![1, kv, 1, 1]).unwrap();
    (q, k, v)
}

/// Finding 6: dropout wrote 0 for a dropped NaN weight; Flax multiplies (`NaN · 0 = NaN`).
#[test]
fn finding_6_dropout_keeps_nan() {
    let _alone = alone();
    let kv = 64;
    let (q, k, v) = nan_query_call(kv);
    let args = || {
        FlaxArgs::new()
            .dropout_rate(0.5)
            .dropout_rng(DropoutRng::new(7))
    };
    let w = dot_product_attention_weights(&q, &k, args()).unwrap();
    let w = w.as_slice::<f32>().unwrap();
    assert!(w[..kv].iter().all(|x| x.is_nan()), "{:?}", &w[..kv]);
    // The other row is finite, and dropout did drop (rate 0.5 over 64 keys).
    assert!(w[kv..].iter().all(|x| x.is_finite()));
    assert!(w[kv..].contains(&0.0));
    // The output: the tiled path (no sow) and the materialized one (sown weights).
    let out = dot_product_attention(&q, &k, &v, args()).unwrap();
    let out = out.as_slice::<f32>().unwrap();
    assert!(out[0].is_nan() && out[1].is_finite(), "{out:?}");
    let mut sown = Intermediates::new();
    let out = dot_product_attention(&q, &k, &v, args().module(&mut sown)).unwrap();
    let out = out.as_slice::<f32>().unwrap();
    assert!(out[0].is_nan() && out[1].is_finite(), "{out:?}");

    // Fully masked rows with f64 and force_fp32_for_softmax are NaN, and stay NaN through dropout.
    let q = Array::new(vec![0.5f64, 1.0], vec![1, 2, 1, 1]).unwrap();
    let k = Array::new(
        (0..kv).map(|j| j as f64 / 9.0).collect::<Vec<_>>(),
        vec![1, kv, 1, 1],
    )
    .unwrap();
    let mask: Vec<bool> = (0..2 * kv).map(|n| n >= kv).collect();
    let mask = Array::new(mask, vec![1, 1, 2, kv]).unwrap();
    let w = dot_product_attention_weights(&q, &k, args().mask(&mask).force_fp32_for_softmax(true))
        .unwrap();
    // Dropout active: the dropped weights are in the output dtype, float64.
    assert_eq!(w.dtype(), DType::F64);
    let w = w.as_slice::<f64>().unwrap();
    assert!(w[..kv].iter().all(|x| x.is_nan()), "{:?}", &w[..kv]);
    assert!(w[kv..].iter().all(|x| x.is_finite()) && w[kv..].contains(&0.0));
}

/// Finding 7: `make_attention_mask` and `combine_masks` named axis 0 whatever axis differed.
#[test]
fn finding_7_mask_helper_errors_name_the_axis() {
    let _alone = alone();
    let a = Array::new(vec![0i32; 40], vec![4, 2, 5]).unwrap();
    let b = Array::new(vec![0i32; 84], vec![4, 3, 7]).unwrap();
    let e = make_attention_mask(&a, &b, PairwiseFn::Multiply, 0, DType::F32).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("`key_input`"), "{text}");
    assert!(
        text.contains("axis 1 has size 3, expected 1 or 2"),
        "{text}"
    );
    // Different lengths on the last axes are legal.
    let c = Array::new(vec![1i32; 28], vec![4, 1, 7]).unwrap();
    let m = make_attention_mask(&a, &c, PairwiseFn::Multiply, 0, DType::F32).unwrap();
    assert_eq!(m.shape(), &[4, 2, 1, 5, 7]);

    let x = Array::new(vec![true; 6], vec![1, 2, 3]).unwrap();
    let y = Array::new(vec![true; 12], vec![1, 4, 3]).unwrap();
    let e = combine_masks(&[Some(&x), Some(&y)], DType::Bool).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("axis 1 has size 4, expected 1 or 2"),
        "{text}"
    );
}

/// Finding 8: an overflow error named the internal enlarged shape under the input's name. The
/// query of the issue is itself too big (an error naming it); an enlarged result too big is an
/// error naming the result, with its shape.
#[test]
fn finding_8_overflow_errors_name_the_callers_shapes() {
    let _alone = alone();
    let e = Array::new(Vec::<f32>::new(), vec![1, 1, 1 << 62, 0, 5]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`array` shape [1, 1, 4611686018427387904, 0, 5]: the number of elements overflows usize"
    );
    let q = empty_f32(&[1, 1, 1 << 61, 0, 1]);
    let m = Array::new(vec![true; 6], vec![2, 3, 1, 1, 1]).unwrap();
    let (r, peak, _) = measure(|| dot_product_attention_weights(&q, &q, FlaxArgs::new().mask(&m)));
    let e = r.unwrap_err();
    assert_eq!(
        e.to_string(),
        "`weights` shape [2, 3, 0, 2305843009213693952, 2305843009213693952]: the number of \
         elements overflows usize"
    );
    assert!(peak < MB, "{peak} bytes for an error");
    // Within `usize`, the enlarged empty result.
    let q = empty_f32(&[1, 1, 1 << 20, 0, 1]);
    let (r, peak, _) = measure(|| dot_product_attention_weights(&q, &q, FlaxArgs::new().mask(&m)));
    assert_empty(&r.unwrap(), DType::F32, &[2, 3, 0, 1 << 20, 1 << 20]);
    assert!(peak < MB, "{peak} bytes for an empty result");
}

/// Finding 8, second part: a one-row (decode) call's per-thread scratch was sized for a full
/// query block of every head, about 17 times the input (16.8 MB of keys and values kept 292 MB
/// between calls). Now one task's needs: the peak during the call, scratch included (it stays
/// allocated in the worker threads), is a small fraction of the keys and values.
#[test]
fn finding_8_decode_scratch_is_sized_by_one_task() {
    let _alone = alone();
    let (kv, heads, depth) = (4096, 8, 128);
    let setup = || {
        let q = Array::new(vec![0.25f32; heads * depth], vec![1, 1, heads, depth]).unwrap();
        let kd: Vec<f32> = (0..kv * heads * depth)
            .map(|i| (i as f32 * 0.001).sin())
            .collect();
        let k = Array::new(kd.clone(), vec![1, kv, heads, depth]).unwrap();
        let v = Array::new(kd, vec![1, kv, heads, depth]).unwrap();
        (q, k, v)
    };
    let input = 2 * kv * heads * depth * 4;
    let (r, peak, _) = measure_after(setup, |(q, k, v)| {
        dot_product_attention(q, k, v, FlaxArgs::new())
    });
    assert_eq!(r.unwrap().shape(), &[1, 1, heads, depth]);
    eprintln!("decode call: {peak} bytes allocated over {input} bytes of keys and values");
    assert!(
        peak < input / 4,
        "{peak} bytes allocated by a decode call over {input} bytes of keys and values"
    );
}

/// The rule behind finding 5 on `Array` itself: the fallible conversions return an error under
/// the cap where the infallible ones would abort (40 MB of bool to 320 MB of f64).
#[test]
fn array_conversions_have_fallible_forms() {
    let _alone = alone();
    let (r, peak, _) = measure_after(
        || Array::new(vec![true; 40 << 20], vec![40 << 20]).unwrap(),
        |a| {
            (
                a.try_astype(DType::F64).map(drop),
                a.try_to_f64_vec().map(drop),
            )
        },
    );
    for e in [r.0.unwrap_err(), r.1.unwrap_err()] {
        assert!(
            matches!(e, AttnError::Allocation { tensor: "array", elements } if elements == 40 << 20),
            "{e}"
        );
    }
    assert!(peak < MB, "{peak} bytes for two refused conversions");
}

/// An empty result returns before lengths and segment ids are read, but not before their dtype
/// is checked (a cheap check, as the rule says).
#[test]
fn an_empty_result_still_checks_the_dtype_of_lengths() {
    let _alone = alone();
    let q = empty_f32(&[2, 0, 1, 4]);
    let lengths = Array::new(vec![1.0f32, 2.0], vec![2]).unwrap();
    let (r, peak, _) =
        measure(|| dot_product_attention(&q, &q, &q, FlaxArgs::new().query_lengths(&lengths)));
    assert_eq!(
        r.unwrap_err().to_string(),
        "`query_lengths` must have dtype int32, found float32"
    );
    assert!(peak < MB, "{peak} bytes for an error");
    let good = Array::new(vec![0i32, 0], vec![2]).unwrap();
    let (r, _, _) =
        measure(|| dot_product_attention(&q, &q, &q, FlaxArgs::new().query_lengths(&good)));
    assert_empty(&r.unwrap(), DType::F32, &[2, 0, 1, 4]);
}
