//! Locking shared state: a lock a panicking thread held is taken over as it is (every value
//! behind these locks stays consistent between statements), never turned into a second panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a panicking thread held it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
