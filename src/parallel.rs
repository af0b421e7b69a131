//! The one thread pool dino_rs computes on. Sized by `DINO_RS_NUM_THREADS` (else all cores) and
//! replaceable at run time by [`set_num_threads`]; rayon's global pool is left to the host program.

use std::sync::{Arc, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

/// The pool and the process that started its threads.
struct Shared {
    pid: u32,
    pool: Arc<ThreadPool>,
}

static POOL: RwLock<Option<Shared>> = RwLock::new(None);

fn default_threads() -> usize {
    std::env::var("DINO_RS_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("dino-rs-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::invalid(format!("cannot start {n} threads: {e}")))
}

/// The current pool, created on first use. After `fork()` (Python's multiprocessing with the fork
/// start method) the child inherits the pool but none of its threads, so work sent to it would
/// wait forever: a child builds its own pool of the same size instead.
pub fn pool() -> Arc<ThreadPool> {
    let pid = std::process::id();
    if let Some(s) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if s.pid == pid {
            return s.pool.clone();
        }
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        if s.pid == pid {
            return s.pool.clone();
        }
    }
    let n = match slot.take() {
        Some(inherited) => {
            let n = inherited.pool.current_num_threads();
            // Its threads live in the parent: dropping it here would signal workers that do not exist.
            std::mem::forget(inherited);
            n
        }
        None => default_threads(),
    };
    let pool = build(n).expect("a thread pool of the default size");
    *slot = Some(Shared {
        pid,
        pool: pool.clone(),
    });
    pool
}

/// Replaces the pool with one of `n` threads; work already running finishes on the old one.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("number of threads must be at least 1, got 0"));
    }
    let new = build(n)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(Shared {
        pid: std::process::id(),
        pool: new,
    });
    Ok(())
}

pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` on the dino_rs pool, under the caller's [`crate::ops::OpsPolicy`] (a thread-local
/// the pool thread would not otherwise see).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let policy = crate::ops::OpsPolicy::current();
    pool().install(move || policy.with(f))
}

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one of several tasks that between them keep the pool busy (one slice of a batch
/// each): the kernels it calls, gemm included, work on this thread only. Split again across the
/// pool, each gemm would hand every thread a fixed share and wait at its end for the slowest, while
/// the other threads have whole tasks of their own to run.
pub fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.set(self.0);
        }
    }
    let _restore = Restore(ALONE.replace(true));
    f()
}

/// Whether this thread runs inside [`alone`].
pub fn is_alone() -> bool {
    ALONE.get()
}

/// The fewest items a parallel loop may hand to another thread (rayon's `with_min_len`): all of
/// them inside [`alone`], so that the loop runs on this thread without splitting.
pub fn min_len() -> usize {
    if is_alone() {
        usize::MAX
    } else {
        1
    }
}
