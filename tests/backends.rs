//! Every kernel backend (instruction set) of this build, checked on its own: for each backend
//! the CPU has, a child process runs with `ATTN_MAX_ISA` set to it and checks that the kernels
//! really run with it ([`attn::kernel::Isa::active`]), then runs
//!
//! - the conformance cases of every set (`cases/`, `jax_nn/`, `mha/`, with their gradients),
//! - a sweep against a float64 reference written here (`backends/reference.rs`): depths 8 to
//!   128 (80 and 96 too), lengths that are not a multiple of any block, GQA, MQA, causal
//!   masks, biases, every float dtype, both kernel paths,
//! - the thread-count checks of `tests/support/threads.rs` (bits equal on 1, 2 and 3 threads).
//!
//! A backend the CPU lacks gives trials marked **ignored** (`test avx512_bf16::… ... ignored`),
//! with a line naming the missing CPU features: never a pass. `cargo test --test backends --
//! --ignored` runs them anyway, and they fail, saying that the backend could not be selected.

// The verdict of a case set, shared by the runners below.
#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/grads.rs"]
mod grads;
#[path = "support/jax_nn.rs"]
mod jax_nn;
#[path = "support/mha.rs"]
mod mha;
#[path = "backends/reference.rs"]
mod reference;
#[path = "support/tally.rs"]
mod tally;
#[path = "support/threads.rs"]
mod threads;

use std::process::{Command, ExitCode, Output};

use attn::kernel::Isa;
use libtest_mimic::{Arguments, Failed, Trial};

/// The environment variable that makes this binary a child running one check.
const CHILD: &str = "ATTN_BACKENDS_CHECK";

/// A check: `Ok(report)` or `Err(report naming the failures)`.
type Check = fn() -> Result<String, String>;

/// The checks each backend runs, by name.
const CHECKS: [(&str, Check); 7] = [
    ("flax_cases", flax_cases),
    ("jax_nn_cases", jax_nn_cases),
    ("mha_cases", mha_cases),
    ("gradient_cases", gradient_cases),
    ("float64_reference", reference::check),
    ("threads_forward", threads::check_forward),
    ("threads_gradients", threads::check_gradients),
];

fn flax_cases() -> Result<String, String> {
    let weights = conformance::check_every_case(conformance::Route::Weights)?;
    let output = conformance::check_every_case(conformance::Route::Output)?;
    Ok(format!("{weights}\n{output}"))
}

fn jax_nn_cases() -> Result<String, String> {
    use jax_nn::{Family, Mask, Route};
    let runs = [
        (Family::JaxNn, Route::Output, Mask::Structure),
        (Family::JaxNn, Route::Weights, Mask::Structure),
        (Family::FlaxStructured, Route::Output, Mask::Structure),
        (Family::FlaxStructured, Route::Weights, Mask::Structure),
        (Family::FlaxStructured, Route::Output, Mask::Dense),
        (Family::FlaxStructured, Route::Weights, Mask::Dense),
    ];
    let reports: Result<Vec<String>, String> = (runs.into_iter())
        .map(|(family, route, mask)| jax_nn::check_family(family, route, mask))
        .collect();
    Ok(reports?.join("\n"))
}

fn mha_cases() -> Result<String, String> {
    Ok(format!(
        "{}\n{}",
        mha::check_forward()?,
        mha::check_gradients()?
    ))
}

fn gradient_cases() -> Result<String, String> {
    use grads::{CASES, JAX_NN, MaskForm, Route, Set};
    let structure = Set::Structured(MaskForm::Structure);
    let dense = Set::Structured(MaskForm::Dense);
    let runs = [
        (CASES, Set::Flax, Route::Weights),
        (CASES, Set::Flax, Route::Tiled),
        (CASES, Set::Flax, Route::Saved),
        (JAX_NN, Set::JaxNn, Route::Weights),
        (JAX_NN, Set::JaxNn, Route::Tiled),
        (JAX_NN, structure, Route::Weights),
        (JAX_NN, structure, Route::Tiled),
        (JAX_NN, structure, Route::Saved),
        (JAX_NN, dense, Route::Weights),
        (JAX_NN, dense, Route::Tiled),
    ];
    let reports: Result<Vec<String>, String> = (runs.into_iter())
        .map(|((var, sub), set, route)| grads::check_set(var, sub, set, route))
        .collect();
    Ok(reports?.join("\n"))
}

fn main() -> ExitCode {
    if let Ok(check) = std::env::var(CHILD) {
        return child(&check);
    }
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    for isa in Isa::ALL.into_iter().rev() {
        if !isa.is_supported() {
            println!(
                "backend {isa}: skipped (ignored below), this CPU lacks {}",
                isa.cpu_features()
            );
        }
        for (check, _) in CHECKS {
            let trial = Trial::test(format!("{isa}::{check}"), move || parent(isa, check));
            trials.push(trial.with_ignored_flag(!isa.is_supported()));
        }
    }
    trials.push(Trial::test(
        "max_isa::a_name_of_no_backend_is_reported_and_ignored",
        unknown_name_is_ignored,
    ));
    libtest_mimic::run(&args, trials).exit_code()
}

/// `ATTN_MAX_ISA=avx9000`: a line on standard error names the value and the valid names, and
/// the kernels run with the best backend of the CPU.
fn unknown_name_is_ignored() -> Result<(), Failed> {
    let run = run_child(ACTIVE, "avx9000")?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    let best = Isa::ALL.into_iter().rev().find(|isa| isa.is_supported());
    let best = best.map_or("none", Isa::name);
    let warned = "attn: ignoring ATTN_MAX_ISA: \"avx9000\" names no instruction set; expected one of \
                  portable, avx2, avx512, avx512_bf16";
    if run.status.success() && stdout.trim() == best && stderr.trim() == warned {
        return Ok(());
    }
    Err(format!(
        "{}: stdout {stdout:?} (expected {best:?}), stderr {stderr:?}",
        run.status
    )
    .into())
}

/// Runs this executable as a child that runs `check` with `ATTN_MAX_ISA=max_isa`.
fn run_child(check: &str, max_isa: &str) -> Result<Output, Failed> {
    let exe = std::env::current_exe().map_err(|e| format!("this test's executable: {e}"))?;
    Command::new(exe)
        .env(CHILD, check)
        .env("ATTN_MAX_ISA", max_isa)
        .output()
        .map_err(|e| format!("starting the child process: {e}").into())
}

/// Runs `check` in a child process whose kernels are capped at `isa`.
fn parent(isa: Isa, check: &str) -> Result<(), Failed> {
    let run = run_child(check, isa.name())?;
    if run.status.success() {
        return Ok(());
    }
    Err(format!(
        "backend {isa}, {check}: the child process ended with {}\n{}{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    )
    .into())
}

/// The child's check that prints the backend the kernels run with (and checks nothing).
const ACTIVE: &str = "print_active";

/// The child: prints the active backend for [`ACTIVE`]; else checks that the kernels run with the backend `ATTN_MAX_ISA` names, then runs
/// `check`.
fn child(check: &str) -> ExitCode {
    if check == ACTIVE {
        println!("{}", Isa::active());
        return ExitCode::SUCCESS;
    }
    let asked = std::env::var("ATTN_MAX_ISA").unwrap_or_default();
    let active = Isa::active();
    if asked.parse::<Isa>() != Ok(active) {
        eprintln!(
            "ATTN_MAX_ISA={asked:?}, but the kernels run with {active}: this CPU cannot run the \
             backend asked for (it needs {})",
            asked
                .parse::<Isa>()
                .map_or("a known name", |isa| isa.cpu_features())
        );
        return ExitCode::FAILURE;
    }
    let Some((_, run)) = CHECKS.iter().find(|(name, _)| *name == check) else {
        eprintln!("{CHILD}={check:?} names no check");
        return ExitCode::FAILURE;
    };
    match run() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(report) => {
            println!("{report}");
            ExitCode::FAILURE
        }
    }
}
