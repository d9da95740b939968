//! Process groups: signalling a workload's whole group, stopping it (SIGTERM, grace, SIGKILL),
//! and the record that lets a later runtime find a group an earlier one started.
//!
//! Signalling a group needs `kill(-pgid, sig)`, which std does not offer (`Child::kill` signals
//! one process): that is what `rustix` is for.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// How often a stopping group is checked.
const STOP_POLL: Duration = Duration::from_millis(10);

/// Sends `sig` to process group `pgid`; a group that is already gone is fine.
pub(super) fn signal_group(pgid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) {
        // ESRCH: nobody left in the group. EPERM cannot happen for groups this agent started.
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// What `/proc/PID/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// Its start time, in clock ticks since boot: with the pid, it names one process for good
    /// (pids are reused, this pair is not).
    pub start: u64,
    /// Exited but not reaped yet.
    pub zombie: bool,
}

/// Reads `/proc/PID/stat`; `None` when there is no such process (or no `/proc`).
pub(super) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    // Field 22 (starttime) is the 20th after the name.
    let start = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { start, zombie: state == "Z" })
}

/// `<workload dir>/pid`: which process group runs the workload now, written when it starts and
/// removed when it stopped, so that a runtime started after an agent crash finds what is left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PidRecord {
    /// The workload id, for messages.
    pub id: String,
    /// Its version.
    pub version: u64,
    /// The group leader's pid (the group id).
    pub pid: u32,
    /// The leader's start time ([`ProcStat::start`]); 0 when it could not be read.
    pub start: u64,
    /// The spec's stop grace period.
    pub grace_ms: u32,
}

impl PidRecord {
    pub(super) const FILE: &'static str = "pid";

    /// No group at all (a job that only removes a directory).
    pub(super) const NONE: Self = Self { id: String::new(), version: 0, pid: 0, start: 0, grace_ms: 0 };

    fn encode(&self) -> String {
        format!(
            "id={}\nversion={}\npid={}\nstart={}\ngrace_ms={}\n",
            self.id, self.version, self.pid, self.start, self.grace_ms
        )
    }

    /// Parses a record; `None` for anything else (a torn or foreign file).
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut rec = PidRecord { id: String::new(), version: 0, pid: 0, start: 0, grace_ms: 0 };
        let mut seen = 0u8;
        for line in text.lines() {
            let (key, value) = line.split_once('=')?;
            let bit = match key {
                "id" => {
                    rec.id = value.to_owned();
                    1
                }
                "version" => {
                    rec.version = value.parse().ok()?;
                    2
                }
                "pid" => {
                    rec.pid = value.parse().ok()?;
                    4
                }
                "start" => {
                    rec.start = value.parse().ok()?;
                    8
                }
                "grace_ms" => {
                    rec.grace_ms = value.parse().ok()?;
                    16
                }
                _ => return None,
            };
            seen |= bit;
        }
        (seen == 31 && rec.pid > 1).then_some(rec)
    }

    /// Writes the record into `dir` atomically (a crash leaves the old record or the new one).
    pub(super) fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("pid.tmp");
        fs::write(&tmp, self.encode())?;
        fs::rename(&tmp, dir.join(Self::FILE))
    }

    /// Whether the group this record names may still hold processes this agent started: the
    /// leader runs with the recorded start time, or no process has the leader's pid any more (a
    /// group id stays allocated while any member lives, so members are ours). `false` when the pid
    /// now belongs to another process, or the start time was never known.
    pub(super) fn may_be_ours(&self) -> bool {
        if self.start == 0 {
            return false;
        }
        proc_stat(self.pid).is_none_or(|s| s.start == self.start)
    }
}

/// The work of stopping one workload instance; run on its own thread so that the agent's event
/// loop never waits out a grace period, and removals run side by side.
#[derive(Debug)]
pub(super) struct StopJob {
    /// Our child (the group leader), when this runtime started it; `None` for a group left by an
    /// earlier runtime, watched through `/proc`.
    pub child: Option<Child>,
    /// The group, as recorded.
    pub record: PidRecord,
    /// The workload's directory: its pid record is removed once the group is gone.
    pub dir: PathBuf,
    /// Remove the whole directory (logs included) afterwards: the workload was removed.
    pub remove_dir: bool,
    /// Earlier stop jobs of the same directory, waited for first.
    pub after: Vec<std::thread::JoinHandle<()>>,
}

impl StopJob {
    /// SIGTERM to the group; once the leader exits, or the grace period is over, SIGKILL to the
    /// whole group (what is left once the leader is gone gets no grace of its own, as in a
    /// container whose init exits); then reap the leader and drop the record.
    pub(super) fn run(mut self) {
        for job in std::mem::take(&mut self.after) {
            let _ = job.join();
        }
        let pgid = self.record.pid;
        let watch_stale = self.child.is_none() && self.record.may_be_ours();
        if self.child.is_some() || watch_stale {
            signal_group(pgid, Signal::TERM);
            let deadline = Instant::now() + Duration::from_millis(u64::from(self.record.grace_ms));
            while !self.leader_gone() && Instant::now() < deadline {
                std::thread::sleep(STOP_POLL);
            }
            signal_group(pgid, Signal::KILL);
            if let Some(child) = self.child.as_mut() {
                let _ = child.wait();
            }
        }
        if self.remove_dir {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            let _ = fs::remove_file(self.dir.join(PidRecord::FILE));
        }
    }

    fn leader_gone(&mut self) -> bool {
        match self.child.as_mut() {
            // An error means it cannot be waited for: nothing more to wait for.
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => proc_stat(self.record.pid).is_none_or(|s| s.zombie || s.start != self.record.start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_ones_are_refused() {
        let rec = PidRecord { id: "ns/web".into(), version: 7, pid: 4242, start: 123_456, grace_ms: 500 };
        assert_eq!(PidRecord::parse(&rec.encode()), Some(rec.clone()));
        let text = rec.encode();
        assert_eq!(PidRecord::parse(&text[..text.len() / 2]), None);
        assert_eq!(PidRecord::parse("pid=1\n"), None);
        assert_eq!(PidRecord::parse(&text.replace("pid=4242", "pid=1")), None, "never signal init");
        assert_eq!(PidRecord::parse(&format!("{text}extra=1\n")), None);
    }

    #[test]
    fn proc_stat_reads_this_process() {
        let me = proc_stat(std::process::id()).expect("/proc of this process");
        assert!(me.start > 0 && !me.zombie);
        assert_eq!(proc_stat(std::process::id()), Some(me), "the start time does not change");
    }
}
