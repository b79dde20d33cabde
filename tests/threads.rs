//! Results do not depend on the number of threads (the checks are in
//! `tests/support/threads.rs`; `tests/backends.rs` runs them once per kernel backend).

#[path = "support/threads.rs"]
mod threads;

#[test]
fn the_forward_does_not_depend_on_the_thread_count() {
    match threads::check_forward() {
        Ok(report) => println!("{report}"),
        Err(problem) => panic!("{problem}"),
    }
}

#[test]
fn gradients_do_not_depend_on_the_thread_count() {
    match threads::check_gradients() {
        Ok(report) => println!("{report}"),
        Err(problem) => panic!("{problem}"),
    }
}
