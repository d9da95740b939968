//! A small progress bar on standard error, for the demo's long steps.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress bar: redrawn in place on a terminal (at most ten times a second), one line at the
/// end otherwise.
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
}

impl Progress {
    /// Starts a bar for `total` units of work.
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Self {
            label: label.into(),
            total: total.max(1),
            done: 0,
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Sets how much is done.
    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        if self.tty && self.last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            self.draw(false);
        }
    }

    /// Finishes the bar with a final line, returning the elapsed seconds.
    pub fn finish(mut self, note: &str) -> f64 {
        self.done = self.total;
        let secs = self.started.elapsed().as_secs_f64();
        self.draw(true);
        let mut e = std::io::stderr();
        let _ = writeln!(e, " {note}");
        secs
    }

    fn draw(&mut self, last: bool) {
        const WIDTH: usize = 30;
        let frac = self.done as f64 / self.total as f64;
        let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
        let line = format!(
            "{:<34} [{bar}] {:>5.1}% {:>7.2} s",
            self.label,
            frac * 100.0,
            self.started.elapsed().as_secs_f64()
        );
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r{line}");
        } else if last {
            let _ = write!(e, "{line}");
        }
        let _ = e.flush();
        self.last_draw = Some(Instant::now());
    }
}
