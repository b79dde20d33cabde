//! [`Context`]: the run-time arguments of an attention call that are not tensors
//! (`deterministic`, `dropout_rng`, the sow sink and the thread pool).

use core::convert::Infallible;
use core::fmt;

use rayon::prelude::*;

use rand_pcg::Pcg32;

use crate::sow::Sow;

/// The stream (increment) of every dropout generator. One fixed stream: independence between
/// seeds comes from scrambling the seed into the state, never from PCG stream numbers (the
/// `rand_pcg` docs warn that different streams can be correlated).
const DROPOUT_STREAM: u64 = 0xa02b_df6e_83c8_4b31;

/// The randomness of dropout (Flax's `dropout_rng`): a seed for one `rand_pcg::Pcg32` stream.
///
/// The keep decision of the dropout mask element at logical (row-major) index `n` is the
/// `n`-th 32-bit draw of that stream, so the mask depends only on the seed and the element's
/// index: the same for any thread count or tiling.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DropoutRng {
    seed: u64,
}

impl DropoutRng {
    /// A dropout RNG from a seed.
    pub fn new(seed: u64) -> Self {
        DropoutRng { seed }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The generator positioned at draw 0. The state is the seed scrambled by SplitMix64, so
    /// neighbouring seeds give unrelated masks.
    pub fn generator(&self) -> Pcg32 {
        let mut z = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Pcg32::new(z, DROPOUT_STREAM)
    }
}

/// The run-time context of an attention call: one argument of every generated method.
///
/// `Context::default()` has Flax's defaults: `deterministic = false`, no RNG, no sow sink, the
/// global rayon pool (dropout is still off with the default rate 0).
#[derive(Default)]
pub struct Context<'a> {
    /// Flax's `deterministic`: true turns dropout off.
    pub deterministic: bool,
    /// Flax's `dropout_rng`; required when dropout is active.
    pub dropout_rng: Option<DropoutRng>,
    /// Flax's `module`: receives the attention weights (after softmax, before dropout).
    pub sow: Option<&'a mut dyn Sow>,
    /// The rayon pool to run on; `None` = rayon's global pool.
    pub pool: Option<&'a rayon::ThreadPool>,
}

impl Context<'static> {
    /// Dropout off, nothing sown, global pool.
    pub fn deterministic() -> Context<'static> {
        Context {
            deterministic: true,
            ..Context::default()
        }
    }

    /// Dropout on (at the layer's rate), drawn from `seed`.
    pub fn with_dropout(seed: u64) -> Context<'static> {
        Context {
            deterministic: false,
            dropout_rng: Some(DropoutRng::new(seed)),
            ..Context::default()
        }
    }
}

impl<'a> Context<'a> {
    /// Sets `deterministic`.
    pub fn set_deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }

    /// Sets the dropout RNG.
    pub fn dropout_rng(mut self, rng: DropoutRng) -> Self {
        self.dropout_rng = Some(rng);
        self
    }

    /// Sows the attention weights into `sink`.
    pub fn sow<'b>(self, sink: &'b mut dyn Sow) -> Context<'b>
    where
        'a: 'b,
    {
        Context {
            deterministic: self.deterministic,
            dropout_rng: self.dropout_rng,
            sow: Some(sink),
            pool: self.pool,
        }
    }

    /// Runs on `pool` instead of rayon's global pool.
    pub fn pool<'b>(self, pool: &'b rayon::ThreadPool) -> Context<'b>
    where
        'a: 'b,
    {
        Context {
            deterministic: self.deterministic,
            dropout_rng: self.dropout_rng,
            sow: self.sow.map(|s| -> &'b mut dyn Sow { s }),
            pool: Some(pool),
        }
    }

    /// A context that borrows this one (for calling several layers with the same context).
    pub fn reborrow(&mut self) -> Context<'_> {
        Context {
            deterministic: self.deterministic,
            dropout_rng: self.dropout_rng,
            sow: match &mut self.sow {
                Some(s) => Some(&mut **s),
                None => None,
            },
            pool: self.pool,
        }
    }

    /// Where this context's parallel work runs.
    pub(crate) fn threads(&self) -> Threads<'a> {
        Threads(self.pool)
    }
}

/// Where a call's parallel work runs: a [`Context`]'s pool, or (`None`) the pool of the
/// calling thread if it is a rayon worker, else rayon's global pool. Unlike a `Context` it is
/// `Copy` and `Sync`, so work already running on the pool can pass it on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Threads<'a>(pub(crate) Option<&'a rayon::ThreadPool>);

impl Threads<'_> {
    /// Runs `run` on every task, as [`Threads::try_for_each`] does.
    pub(crate) fn for_each<T: Send>(self, tasks: Vec<T>, run: impl Fn(T) + Sync) {
        let Ok(()) = self.try_for_each(tasks, |task| -> Result<(), Infallible> {
            run(task);
            Ok(())
        });
    }

    /// Runs `run` on every task and returns the first error met (tasks not yet started when
    /// one fails may be skipped): a parallel iterator on the pool (see [`Threads::install`]
    /// for where it starts), or one task after the other on the caller's thread when the pool
    /// has a single thread. Which thread runs a task never changes its result: every task
    /// writes its own part.
    pub(crate) fn try_for_each<T: Send, E: Send>(
        self,
        tasks: Vec<T>,
        run: impl Fn(T) -> Result<(), E> + Sync,
    ) -> Result<(), E> {
        match self.place() {
            Place::Alone => tasks.into_iter().try_for_each(run),
            Place::Inside | Place::Outside => {
                self.install(|| tasks.into_par_iter().with_max_len(1).try_for_each(&run))
            }
        }
    }

    /// Runs `f` with this pool as the current one and returns its result: in place on a worker
    /// of the pool, and on the caller's thread when the pool has a single thread (whose work
    /// is all sequential anyway, so no hand-over is needed: [`Threads::try_for_each`] then
    /// runs its tasks in order); else handed over to a worker of the pool and back. A hand-over
    /// costs tens of microseconds when the workers sleep, so a call makes one and nests its
    /// parallel steps inside.
    ///
    /// (The caller does not work next to the pool's workers: pools are sized to the cores,
    /// and a third thread on two cores made decoding 30% slower, an idle worker spinning.)
    pub(crate) fn install<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match (self.place(), self.0) {
            (Place::Inside | Place::Alone, _) => f(),
            (Place::Outside, Some(pool)) => pool.install(f),
            (Place::Outside, None) => rayon::scope(|_| f()),
        }
    }

    /// Where work of this pool runs when it starts on the calling thread.
    fn place(self) -> Place {
        let (inside, threads) = match self.0 {
            Some(pool) => (
                pool.current_thread_index().is_some(),
                pool.current_num_threads(),
            ),
            None => (
                rayon::current_thread_index().is_some(),
                rayon::current_num_threads(),
            ),
        };
        match (inside, threads) {
            (true, _) => Place::Inside,
            (false, 1) => Place::Alone,
            (false, _) => Place::Outside,
        }
    }
}

/// Where the calling thread stands to a pool ([`Threads::install`]).
#[derive(Clone, Copy)]
enum Place {
    /// A worker of the pool.
    Inside,
    /// Outside a pool of one thread.
    Alone,
    /// Outside a pool of several threads.
    Outside,
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("deterministic", &self.deterministic)
            .field("dropout_rng", &self.dropout_rng)
            .field("sow", &self.sow.is_some())
            .field("pool", &self.pool.map(|p| p.current_num_threads()))
            .finish()
    }
}
