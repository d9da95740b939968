//! Every `/proc` reading the benchmarks take (Linux): this process's memory and CPU time, a
//! thread's CPU time, another process's peak RSS. Each returns `None` where `/proc` is unavailable
//! or unreadable, so a bench reports "n/a" rather than failing.

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    peak_rss_in(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Peak resident set size (`VmHWM`) of process `pid`, in bytes.
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    peak_rss_in(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// CPU seconds (user + system) this process has used.
pub fn cpu_seconds() -> Option<f64> {
    cpu_split_in(&std::fs::read_to_string("/proc/self/stat").ok()?).map(|(u, s)| u + s)
}

/// This thread's id, from `/proc/thread-self/stat`.
pub fn current_tid() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// CPU seconds (user + system) thread `tid` of this process has used.
pub fn thread_cpu_seconds(tid: u64) -> Option<f64> {
    thread_cpu_split(tid).map(|(u, s)| u + s)
}

/// CPU seconds (user, system) thread `tid` of this process has used.
pub fn thread_cpu_split(tid: u64) -> Option<(f64, f64)> {
    cpu_split_in(&std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?)
}

/// Nanoseconds thread `tid` of this process has spent on a CPU (user + system), from
/// `/proc/self/task/{tid}/schedstat`: exact, where `stat`'s user/system split counts 10 ms ticks.
pub fn thread_cpu_ns(tid: u64) -> Option<u64> {
    schedstat_ns(&std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?)
}

/// A thread's CPU time, read at one moment: exact total and the tick-counted user/system split.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThreadCpu {
    /// User seconds (10 ms ticks).
    pub user_s: f64,
    /// System seconds (10 ms ticks).
    pub sys_s: f64,
    /// User + system nanoseconds, exact (`None` where schedstat is unavailable).
    pub ns: Option<u64>,
}

/// Thread `tid`'s CPU time now (`None` where `/proc` is unreadable).
pub fn thread_cpu(tid: u64) -> Option<ThreadCpu> {
    let (user_s, sys_s) = thread_cpu_split(tid)?;
    Some(ThreadCpu { user_s, sys_s, ns: thread_cpu_ns(tid) })
}

/// Whether this process runs as root (real uid 0, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// `VmHWM` of a `status` file, in bytes.
fn peak_rss_in(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (utime, stime) of a `stat` file, in seconds.
fn cpu_split_in(stat: &str) -> Option<(f64, f64)> {
    // Fields after the parenthesised command name (which may hold spaces); utime and stime are
    // the 14th and 15th fields.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // Clock ticks: USER_HZ is 100 on every Linux target kole runs on.
    Some((utime / 100.0, stime / 100.0))
}

/// The first field of a `schedstat` file: time on a CPU, in nanoseconds.
fn schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

fn page_size() -> u64 {
    // Every Linux target kole runs on uses 4 KiB base pages; statm counts in those.
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_nanoseconds_and_grows_with_work() {
        assert_eq!(schedstat_ns("123456789 42 7\n"), Some(123_456_789));
        assert_eq!(schedstat_ns(""), None);
        assert_eq!(schedstat_ns("x 1 2"), None);
        let tid = current_tid().unwrap();
        let before = thread_cpu_ns(tid).unwrap();
        // Spin until the thread has used 20 ms more: schedstat must see it.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu_ns(tid).unwrap() < before + 20_000_000 {
            x = x.wrapping_add(std::hint::black_box(1));
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "schedstat did not grow");
        }
        assert!(x > 0);
        let split = thread_cpu(tid).unwrap();
        assert!(split.ns.unwrap() >= before + 20_000_000);
    }
}
