//! The pool of I/O threads that [`crate::engine::threads::ThreadEngine`] runs data reads and
//! writes on (QEMU's thread pool): threads that mostly wait in the kernel, hence more of them
//! than CPUs. A process that confines its threads with seccomp starts the pool first
//! ([`start_pool`]) so every thread installs the filter before any I/O.

use std::sync::{Arc, Mutex, OnceLock};

use crate::Error;

/// Threads of the I/O pool: the most data reads or writes in flight at once.
pub const MAX_THREADS: usize = 64;

/// Why an I/O thread's start code failed (the caller's own error, e.g. a seccomp filter
/// that could not be installed).
pub type ThreadStartError = Box<dyn std::error::Error + Send + Sync>;

/// Code every I/O thread runs first, before any I/O (e.g. installing its seccomp filter).
pub type ThreadStart = Box<dyn Fn() -> Result<(), ThreadStartError> + Send + Sync>;

/// The start code's failures, by thread index.
type Failures = Arc<Mutex<Vec<(usize, ThreadStartError)>>>;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

fn build_pool(
    start: Option<(ThreadStart, Failures)>,
) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let mut b = rayon::ThreadPoolBuilder::new()
        .num_threads(MAX_THREADS)
        .thread_name(|i| format!("block-io-{i}"));
    if let Some((start, failures)) = start {
        b = b.start_handler(move |i| {
            if let Err(e) = start() {
                if let Ok(mut f) = failures.lock() {
                    f.push((i, e));
                }
            }
        });
    }
    b.build()
}

/// Starts the I/O pool now, running `start` first on each of its threads, and waits until
/// every thread has run it. A process that confines its threads (seccomp, which stops them
/// from creating threads) calls this before confining the threads that issue batches;
/// otherwise the pool starts on first use. Fails if the pool is already running or `start`
/// failed on any thread (the first failure is returned).
pub fn start_pool(start: ThreadStart) -> Result<(), Error> {
    let failures: Failures = Arc::new(Mutex::new(Vec::new()));
    let mut built_here = false;
    let mut build_error = None;
    let pool = POOL.get_or_init(|| {
        built_here = true;
        build_pool(Some((start, failures.clone())))
            .map_err(|e| build_error = Some(e))
            .ok()
    });
    if let Some(e) = build_error {
        return Err(Error::IoPoolBuild(e));
    }
    // (A pool another call built, or failed to build, is "already running" too.)
    let (true, Some(pool)) = (built_here, pool) else {
        return Err(Error::IoPoolRunning);
    };
    // Returns once every thread has started (and so has run `start`).
    pool.broadcast(|_| ());
    let mut failures = failures.lock().map_err(|_| Error::IoPoolPanicked)?;
    let first = failures.drain(..).next();
    match first {
        Some((thread, source)) => Err(Error::IoThreadStart { thread, source }),
        None => Ok(()),
    }
}

/// The pool that runs parallel data I/O: MAX_THREADS threads that mostly wait in the
/// kernel (hence more threads than CPUs, like QEMU's thread pool).
pub(crate) fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| build_pool(None).ok()).as_ref()
}
