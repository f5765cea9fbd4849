//! Locks that a panic does not take down with it.
//!
//! Kiln catches panics where they can happen (a guest's host call, a backend's forward pass) and
//! carries on, so a lock held at the time is poisoned while the data behind it is whole: every
//! writer leaves it consistent between statements. Taking the lock anyway is right everywhere in
//! the server; these methods say so once instead of at each of its ~60 locks.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`], poisoned or not.
pub trait MutexExt<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], poisoned or not.
pub trait RwLockExt<T: ?Sized> {
    fn reading(&self) -> RwLockReadGuard<'_, T>;
    fn writing(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn reading(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn writing(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panic_is_still_taken_with_its_data() {
        let (mutex, rw) = (Mutex::new(1), RwLock::new(2));
        let _ = std::panic::catch_unwind(|| {
            let (_m, _w) = (mutex.lock(), rw.write());
            panic!("poison both");
        });
        assert!(mutex.is_poisoned() && rw.is_poisoned());
        *mutex.locked() += 1;
        *rw.writing() += 1;
        assert_eq!((*mutex.locked(), *rw.reading()), (2, 3));
    }
}
