//! The pool of I/O threads that [`crate::engine::threads::ThreadEngine`] runs data reads and
//! writes on (QEMU's thread pool): threads that mostly wait in the kernel, hence more of them
//! than CPUs. An idle thread sleeps on a condition variable and a job wakes exactly one, as
//! QEMU's pool does (a work-stealing pool's idle threads spin looking for work, which takes
//! CPU from the vCPUs when requests come one or two at a time). A process that confines its
//! threads with seccomp starts the pool first ([`start_pool`]) so every thread installs the
//! filter before any I/O.

use std::collections::VecDeque;
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};

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

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The pool's threads and the jobs waiting for one.
pub(crate) struct Pool {
    jobs: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
}

impl Pool {
    /// Runs `job` on one of the pool's threads (the first idle one).
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // (A poisoned lock: a thread panicked while holding it, which only pushes and pops.)
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.push_back(Box::new(job));
        drop(jobs);
        self.job_ready.notify_one();
    }

    /// A thread's life: the next job, run, again.
    fn serve(&self) {
        loop {
            let job = {
                let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(j) = jobs.pop_front() {
                        break j;
                    }
                    jobs = self.job_ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
                }
            };
            // A job that panics would leave its request unanswered forever (the engine
            // waits for its completion): the process ends instead, as it would on any
            // other thread's panic.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                std::process::abort();
            }
        }
    }
}

static POOL: OnceLock<Option<Arc<Pool>>> = OnceLock::new();

/// Starts the pool's threads, each running `start` (if any) first; returns once every
/// thread has run it.
fn build_pool(start: Option<(ThreadStart, Failures)>) -> std::io::Result<Arc<Pool>> {
    let pool = Arc::new(Pool {
        jobs: Mutex::new(VecDeque::new()),
        job_ready: Condvar::new(),
    });
    let start = start.map(Arc::new);
    let started = Arc::new(Barrier::new(MAX_THREADS + 1));
    for i in 0..MAX_THREADS {
        let (pool, start, started) = (pool.clone(), start.clone(), started.clone());
        // (A thread that cannot be created ends the setup with the error; those already
        // started wait at the barrier, idle, and the pool is not used.)
        std::thread::Builder::new()
            .name(format!("block-io-{i}"))
            .spawn(move || {
                if let Some(s) = &start {
                    let (code, failures) = s.as_ref();
                    if let Err(e) = code() {
                        if let Ok(mut f) = failures.lock() {
                            f.push((i, e));
                        }
                    }
                }
                started.wait();
                pool.serve();
            })?;
    }
    started.wait();
    Ok(pool)
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
    let (true, Some(_)) = (built_here, pool) else {
        return Err(Error::IoPoolRunning);
    };
    let mut failures = failures.lock().map_err(|_| Error::IoPoolPanicked)?;
    let first = failures.drain(..).next();
    match first {
        Some((thread, source)) => Err(Error::IoThreadStart { thread, source }),
        None => Ok(()),
    }
}

/// The pool that runs parallel data I/O: MAX_THREADS threads that mostly wait in the
/// kernel (hence more threads than CPUs, like QEMU's thread pool).
pub(crate) fn pool() -> Option<&'static Pool> {
    POOL.get_or_init(|| build_pool(None).ok())
        .as_ref()
        .map(|p| p.as_ref())
}
