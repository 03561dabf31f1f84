//! The pool of I/O threads that [`crate::engine::threads::ThreadEngine`] runs data reads and
//! writes on (QEMU's thread pool): threads that mostly wait in the kernel, hence more of them
//! than CPUs. A process that confines its threads with seccomp starts the pool first
//! ([`start_pool`]) so every thread installs the filter before any I/O.

use std::sync::{Arc, Mutex, OnceLock};

/// Threads of the I/O pool: the most data reads or writes in flight at once.
pub const MAX_THREADS: usize = 64;

/// Code every I/O thread runs first, before any I/O (e.g. installing its seccomp filter).
pub type ThreadStart = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

fn build_pool(start: Option<(ThreadStart, Arc<Mutex<Vec<String>>>)>) -> Option<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new()
        .num_threads(MAX_THREADS)
        .thread_name(|i| format!("block-io-{i}"));
    if let Some((start, failures)) = start {
        b = b.start_handler(move |i| {
            if let Err(e) = start() {
                if let Ok(mut f) = failures.lock() {
                    f.push(format!("I/O thread {i}: {e}"));
                }
            }
        });
    }
    b.build().ok()
}

/// Starts the I/O pool now, running `start` first on each of its threads, and waits until
/// every thread has run it. A process that confines its threads (seccomp, which stops them
/// from creating threads) calls this before confining the threads that issue batches;
/// otherwise the pool starts on first use. Fails if the pool is already running or `start`
/// failed on any thread.
pub fn start_pool(start: ThreadStart) -> Result<(), String> {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut built_here = false;
    let pool = POOL.get_or_init(|| {
        built_here = true;
        build_pool(Some((start, failures.clone())))
    });
    if !built_here {
        return Err("the block I/O thread pool is already running".into());
    }
    let Some(pool) = pool else {
        return Err("cannot start the block I/O threads".into());
    };
    // Returns once every thread has started (and so has run `start`).
    pool.broadcast(|_| ());
    let failures = failures
        .lock()
        .map_err(|_| "an I/O thread panicked while starting".to_string())?;
    match failures.first() {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}

/// The pool that runs parallel data I/O: MAX_THREADS threads that mostly wait in the
/// kernel (hence more threads than CPUs, like QEMU's thread pool).
pub(crate) fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| build_pool(None)).as_ref()
}
