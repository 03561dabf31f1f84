//! Running independent data reads and writes of one batch in parallel.
//!
//! The image engine resolves a batch's metadata one request at a time (its caches are not
//! shared between threads); what is left are plain positioned reads and writes of guest data
//! that touch disjoint parts of the file. On a device with a deep queue (NVMe, or `O_DIRECT`
//! on anything) those are worth issuing together, as QEMU's thread pool or io_uring would:
//! this module runs them on a pool of I/O threads.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use crate::host_file::{HostFile, DIRECT_ALIGN};

/// Threads of the I/O pool: the most data reads or writes in flight at once.
pub const MAX_THREADS: usize = 64;

/// One data read: `buf.len()` bytes at `offset` of the file (zeros past its end).
pub(crate) struct ReadJob<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

/// One data write: the concatenation of `bufs` at `offset` of the file.
pub(crate) struct WriteJob<'a> {
    pub offset: u64,
    pub bufs: Vec<&'a [u8]>,
}

/// Reads `buf` at `offset`; the part past the end of the file reads as zeros.
pub(crate) fn read_or_zeros(file: &HostFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

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
fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| build_pool(None)).as_ref()
}

/// Runs `job` over every item of `items`, up to `threads` at a time on the I/O pool (inline
/// when there is one item, one thread, or no pool); returns the first error.
fn run<T: Send>(
    items: Vec<T>,
    threads: usize,
    job: impl Fn(T) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let threads = threads.clamp(1, MAX_THREADS).min(items.len());
    let pool = match pool() {
        Some(p) if threads > 1 => p,
        _ => return items.into_iter().try_for_each(job),
    };
    let queue = Mutex::new(items.into_iter());
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    let worker = || loop {
        let next = match queue.lock() {
            Ok(mut q) => q.next(),
            Err(_) => None,
        };
        let Some(item) = next else { break };
        if let Err(e) = job(item) {
            if let Ok(mut slot) = first_error.lock() {
                slot.get_or_insert(e);
            }
        }
    };
    pool.scope(|s| {
        for _ in 0..threads {
            s.spawn(|_| worker());
        }
    });
    match first_error.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(io::Error::other("a parallel I/O thread panicked")),
    }
}

/// Runs the reads on up to `threads` threads.
pub(crate) fn read_all(file: &HostFile, jobs: Vec<ReadJob<'_>>, threads: usize) -> io::Result<()> {
    run(jobs, threads, |j| read_or_zeros(file, j.buf, j.offset))
}

/// Runs the writes on up to `threads` threads. Under `O_DIRECT`, a write that does not cover
/// whole blocks is a read-modify-write of its partial blocks, which two writes sharing a
/// block must not do at once: those writes run one after another, after the others.
pub(crate) fn write_all(
    file: &HostFile,
    jobs: Vec<WriteJob<'_>>,
    threads: usize,
) -> io::Result<()> {
    let (whole_blocks, partial): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| {
        !file.is_direct()
            || (j.offset % DIRECT_ALIGN == 0 && crate::total_len(&j.bufs) % DIRECT_ALIGN == 0)
    });
    run(whole_blocks, threads, |j| {
        file.write_vectored_all_at(&j.bufs, j.offset)
    })?;
    partial
        .into_iter()
        .try_for_each(|j| file.write_vectored_all_at(&j.bufs, j.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_reads_and_writes_land_where_asked() {
        let dir = std::env::temp_dir().join(format!("thinvm-par-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![0u8; 64 * 4096]).unwrap();
        let f = HostFile::open(&p, false, false).unwrap();
        let data: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i ^ 0x5a; 4096]).collect();
        let jobs = data
            .iter()
            .enumerate()
            .map(|(i, d)| WriteJob {
                offset: (63 - i as u64) * 4096,
                bufs: vec![&d[..1000], &d[1000..]],
            })
            .collect();
        write_all(&f, jobs, 8).unwrap();
        let mut back = vec![vec![0u8; 4096]; 65];
        let jobs = back
            .iter_mut()
            .enumerate()
            .map(|(i, b)| ReadJob {
                offset: (64 - i as u64) * 4096,
                buf: b,
            })
            .collect();
        read_all(&f, jobs, 8).unwrap();
        assert_eq!(back[0], vec![0u8; 4096], "past the end reads as zeros");
        for i in 0..64usize {
            assert_eq!(back[i + 1], data[i], "block {i}");
        }
        let bad = HostFile::open(&p, true, false).unwrap();
        let d = [1u8; 16];
        let jobs = vec![
            WriteJob {
                offset: 0,
                bufs: vec![&d[..]],
            },
            WriteJob {
                offset: 4096,
                bufs: vec![&d[..]],
            },
        ];
        assert!(
            write_all(&bad, jobs, 2).is_err(),
            "a read-only file refuses writes"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn direct_writes_sharing_a_block_do_not_lose_each_other() {
        let dir = std::env::temp_dir().join(format!("thinvm-par-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![0u8; 16 * 4096]).unwrap();
        let Ok(f) = HostFile::open(&p, false, true) else {
            eprintln!("skipping: O_DIRECT not supported in {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        // 512-byte writes (8 per block, each a read-modify-write of its block) mixed with
        // whole-block writes, many rounds so that a race would show.
        for round in 0..20u8 {
            let small: Vec<[u8; 512]> = (0..64u8).map(|i| [i ^ round; 512]).collect();
            let big = vec![round; 8 * 4096];
            let mut jobs: Vec<WriteJob<'_>> = small
                .iter()
                .enumerate()
                .map(|(i, d)| WriteJob {
                    offset: i as u64 * 512,
                    bufs: vec![&d[..100], &d[100..]],
                })
                .collect();
            jobs.push(WriteJob {
                offset: 8 * 4096,
                bufs: vec![&big],
            });
            write_all(&f, jobs, 16).unwrap();
            let back = std::fs::read(&p).unwrap();
            for (i, d) in small.iter().enumerate() {
                assert_eq!(
                    &back[i * 512..(i + 1) * 512],
                    &d[..],
                    "round {round}, write {i}"
                );
            }
            assert_eq!(&back[8 * 4096..], &big[..], "round {round}, whole blocks");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
