//! Running the async clients behind `http` and `chain` from a synchronous plugin call.
//!
//! Plugin calls are synchronous (wasmtime without async): a host function that needs the network must
//! block its thread until the answer comes. The futures run on a small runtime the host owns, never on the
//! caller's: the calling thread only waits on a channel. So blocking is safe from any thread — a plain
//! thread, a `spawn_blocking` thread, even (though it stalls that worker, and callers must not) a tokio
//! worker thread — and no `block_on` can panic with "cannot start a runtime from within a runtime".
//! Callers on a tokio runtime make rail calls from `tokio::task::spawn_blocking`.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

/// The host's I/O runtime: two worker threads, started on first use, alive for the process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("plugin-host-io")
            .enable_all()
            .build()
            .expect("the plugin host could not start its I/O runtime (threads or the OS timer unavailable)")
    })
}

/// The future did not finish within the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `future` on the host's I/O runtime. It is created on the calling thread, usually outside any
/// runtime, so it must not touch one before it is polled: wrap client calls in `async move { … .await }`
/// (reqwest's `send()` and tokio's `sleep()` register timers when called, and would panic there).
/// Blocks this thread until it finishes or `deadline` passes
/// (the future is then dropped, which cancels it at its next await point).
pub fn block_on<F>(future: F, deadline: Duration) -> Result<F::Output, Elapsed>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        if let Ok(output) = tokio::time::timeout(deadline, future).await {
            let _ = tx.send(output);
        }
    });
    // The timeout lives inside the task; the channel closes when the task ends either way. The extra
    // second covers scheduling, so the task's own timeout is what normally fires.
    rx.recv_timeout(deadline + Duration::from_secs(1)).map_err(|_| Elapsed)
}

/// The host's I/O runtime, for constructing clients whose background tasks must live on it (a
/// `Chain` connected here keeps its connection pool on a runtime that outlives any caller's).
pub fn handle() -> tokio::runtime::Handle {
    runtime().handle().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_until_done_or_the_deadline() {
        assert_eq!(block_on(async { 7 }, Duration::from_secs(1)), Ok(7));
        // Futures are built by the caller, outside any runtime: they must touch the runtime only when polled.
        let slow = block_on(async { tokio::time::sleep(Duration::from_secs(5)).await }, Duration::from_millis(50));
        assert_eq!(slow, Err(Elapsed));
    }

    #[test]
    fn safe_inside_a_callers_runtime() {
        let caller = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // From the runtime's own thread (what callers must avoid, but it must not panic) and from a
        // blocking thread (what they should do).
        let inline = caller.block_on(async { block_on(async { 1 }, Duration::from_secs(1)) });
        assert_eq!(inline, Ok(1));
        let blocking = caller.block_on(async {
            tokio::task::spawn_blocking(|| block_on(async { 2 }, Duration::from_secs(1))).await.unwrap()
        });
        assert_eq!(blocking, Ok(2));
    }
}
