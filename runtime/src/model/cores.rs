//! The machine's cores as forward passes see them. A guest holds a core for its whole life
//! ([`Busy`]: instantiation, its own work, its other waits, which over-counts and only errs
//! towards not spreading) but gives it back while it waits for a model call ([`Waiting`]); a
//! forward pass on the CPU holds one while it runs. With spreading on, a CPU pass of a model in
//! this process that starts with cores idle spreads over them: its replica runs that pass on
//! more libtorch threads than configured ([`Cores::threads_for_pass`]). So a lone request need
//! not be held to one core while the others idle, and a loaded server, whose cores are all
//! taken, runs every pass on its replicas' own threads, as configured.
//!
//! The count is process-wide ([`machine`]): every model's replicas and every engine's guests
//! share the machine. Spreading is off unless `[server] spread_idle_cores = true`: on the 2-core
//! VMs Kiln is measured on, a MiniLM pass spread over both cores made a lone request slower
//! (84-92 → 68 req/s, 120 more thread wake-ups a request), though the same pass in Python runs
//! 1.7x faster on two threads than on one (docs/BENCHMARKS.md, issue 27).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The most threads a spread pass runs on: past a handful, a pass of milliseconds gains little
/// more, and each replica thread that spreads keeps its own pool of libtorch threads.
const MAX_SPREAD: usize = 8;

/// Cores, and how many are held now.
#[derive(Debug)]
pub struct Cores {
    cores: usize,
    busy: AtomicUsize,
    spread: AtomicBool,
}

/// This process's cores (its CPU affinity and cgroup quota respected).
pub fn machine() -> &'static Cores {
    static MACHINE: OnceLock<Cores> = OnceLock::new();
    MACHINE.get_or_init(|| Cores::new(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)))
}

impl Cores {
    pub fn new(cores: usize) -> Cores {
        Cores { cores, busy: AtomicUsize::new(0), spread: AtomicBool::new(false) }
    }

    /// Whether passes spread over idle cores (they do not until told to).
    pub fn set_spreading(&self, spread: bool) {
        self.spread.store(spread, Ordering::Relaxed);
    }

    pub fn spreading(&self) -> bool {
        self.spread.load(Ordering::Relaxed)
    }

    /// Cores nobody holds now.
    pub fn idle(&self) -> usize {
        self.cores.saturating_sub(self.busy.load(Ordering::Relaxed))
    }

    /// One core held, for as long as the guard lives. With spreading off nothing reads the
    /// count, so nothing is counted: every request would otherwise touch one shared atomic four
    /// times for nobody.
    pub fn take(&'static self) -> Busy {
        if !self.spreading() {
            return Busy(None);
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(Some(self))
    }

    /// A core given back, for as long as the guard lives, by whoever holds a [`Busy`]: a guest
    /// waiting for its model call. Each guard undoes only what it did, so once the guards that
    /// straddle a change of [`Cores::set_spreading`] are gone the count is right again;
    /// meanwhile it can be off by them. (The server sets spreading once, before serving.)
    pub fn wait(&'static self) -> Waiting {
        if !self.spreading() {
            return Waiting(None);
        }
        self.busy.fetch_sub(1, Ordering::Relaxed);
        Waiting(Some(self))
    }

    /// The libtorch threads a CPU pass that holds a core of its own runs on: its replica's
    /// `configured` threads, or its own core and every idle one (up to [`MAX_SPREAD`]) when that
    /// is more and spreading is on.
    pub fn threads_for_pass(&self, configured: u32) -> u32 {
        if !self.spread.load(Ordering::Relaxed) {
            return configured;
        }
        configured.max(u32::try_from((1 + self.idle()).min(MAX_SPREAD)).unwrap_or(1))
    }
}

/// A core held (see [`Cores::take`]), if counted.
#[derive(Debug)]
pub struct Busy(Option<&'static Cores>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(cores) = self.0 {
            cores.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A core given back for a while (see [`Cores::wait`]), if counted.
#[derive(Debug)]
pub struct Waiting(Option<&'static Cores>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(cores) = self.0 {
            cores.busy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_spreads_over_the_cores_nobody_holds_and_only_those() {
        let cores: &'static Cores = Box::leak(Box::new(Cores::new(4)));
        cores.set_spreading(true);
        let pass = cores.take();
        assert_eq!((cores.idle(), cores.threads_for_pass(1)), (3, 4), "alone: every core");
        let guest = cores.take();
        assert_eq!((cores.idle(), cores.threads_for_pass(1)), (2, 3));
        {
            // The guest waits for its model call: its core is free meanwhile.
            let _waiting = cores.wait();
            assert_eq!(cores.idle(), 3);
        }
        assert_eq!(cores.idle(), 2);
        drop(guest);
        let crowd: Vec<Busy> = (0..4).map(|_| cores.take()).collect();
        assert_eq!(cores.idle(), 0);
        assert_eq!(cores.threads_for_pass(1), 1, "every core taken: the configured threads");
        assert_eq!(cores.threads_for_pass(3), 3, "never fewer than configured");
        drop(crowd);
        assert_eq!(cores.threads_for_pass(1), 4);
        cores.set_spreading(false);
        assert_eq!((cores.threads_for_pass(1), cores.threads_for_pass(2)), (1, 2), "spreading off: as configured");
        // Off, nothing is counted; a guard taken before undoes its own count.
        let uncounted = cores.take();
        assert_eq!(cores.idle(), 3);
        drop(pass);
        assert_eq!(cores.idle(), 4);
        // Taken off and waited on after spreading is on again: right again once both go.
        cores.set_spreading(true);
        let waiting = cores.wait();
        drop(waiting);
        drop(uncounted);
        assert_eq!((cores.idle(), cores.busy.load(Ordering::Relaxed)), (4, 0));
        let many: &'static Cores = Box::leak(Box::new(Cores::new(64)));
        many.set_spreading(true);
        let _pass = many.take();
        assert_eq!(many.threads_for_pass(1), MAX_SPREAD as u32, "at most a handful");
    }
}
