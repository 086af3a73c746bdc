//! Blocking work (syscalls, sysfs, configfs, files) runs off the async workers through one
//! helper.

/// Runs `f` on tokio's blocking pool and returns its result; a panic in `f` is resumed
/// in the caller, as if `f` had run inline.
pub async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only when the runtime shuts down under us.
        Err(e) => panic!("blocking task cancelled: {e}"),
    }
}

/// `run_blocking` over a clone of `state` (a transport or a backend that is cheap to
/// clone): what the async trait methods of blocking implementations share.
pub async fn run_blocking_on<S, T>(state: &S, f: impl FnOnce(&S) -> T + Send + 'static) -> T
where
    S: Clone + Send + 'static,
    T: Send + 'static,
{
    let state = state.clone();
    run_blocking(move || f(&state)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_come_back_and_panics_reach_the_caller() {
        assert_eq!(run_blocking(|| 41 + 1).await, 42);
        let caught = tokio::spawn(run_blocking(|| -> u8 { panic!("inside") }))
            .await
            .expect_err("the panic propagates");
        assert!(caught.is_panic());
    }
}
