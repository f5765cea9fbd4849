//! The server's own cost, read from Linux's `/proc`: CPU time and context switches summed over
//! its threads, and resident memory. `kiln bench` divides two snapshots by the requests between
//! them to report CPU time and wake-ups per request.

use std::path::Path;

use kiln_wire::ProcessStats;

/// A snapshot of this process; fields that cannot be read (not Linux) stay 0.
pub fn sample() -> ProcessStats {
    let mut stats = ProcessStats::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return stats;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        // A thread can exit between the listing and the reads: it then adds nothing.
        let Some(status) = read(&dir.join("status")) else { continue };
        stats.threads += 1;
        stats.voluntary_switches += field(&status, "voluntary_ctxt_switches:");
        stats.involuntary_switches += field(&status, "nonvoluntary_ctxt_switches:");
        // The first field of schedstat is the thread's time on a CPU, in nanoseconds.
        let on_cpu_ns = read(&dir.join("schedstat"))
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        stats.cpu_seconds += on_cpu_ns as f64 / 1e9;
    }
    stats.allocations = crate::telemetry::alloc::allocations();
    stats.rss_bytes = read(Path::new("/proc/self/status")).map_or(0, |s| field(&s, "VmRSS:") * 1024);
    stats
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The number after `name` on its line of a `/proc` status file, or 0.
fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_counts_this_process_s_threads_cpu_and_memory() {
        let spin = std::thread::spawn(|| {
            let started = std::time::Instant::now();
            let mut x = 0u64;
            while started.elapsed() < std::time::Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let stats = sample();
        spin.join().expect("spinner");
        assert!(stats.threads >= 2, "{stats:?}");
        assert!(stats.cpu_seconds >= 0.02, "{stats:?}");
        assert!(stats.voluntary_switches >= 1, "{stats:?}");
        assert!(stats.rss_bytes > 1 << 20, "{stats:?}");
    }

    #[test]
    fn a_status_field_is_read_by_its_name_and_a_missing_one_is_zero() {
        let status = "Name:\tkiln\nVmRSS:\t  5120 kB\nvoluntary_ctxt_switches:\t42\n";
        assert_eq!(field(status, "VmRSS:"), 5120);
        assert_eq!(field(status, "voluntary_ctxt_switches:"), 42);
        assert_eq!(field(status, "nonvoluntary_ctxt_switches:"), 0);
    }
}
