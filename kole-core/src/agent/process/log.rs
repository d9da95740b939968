//! Capped, rotated log files, fed by a reader thread per output stream of a workload.
//!
//! The child writes into a pipe, not a file, so the runtime sees every byte and can rotate: a file
//! the child held open itself could only be rotated by copy-and-truncate, which loses lines.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Bytes read from a pipe at a time: the whole memory a stream's reader holds.
const CHUNK: usize = 8 * 1024;

/// One log file (`stdout.log`) and its `keep` older generations (`stdout.log.1` newest).
#[derive(Debug)]
pub(super) struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

/// A log shared by every instance of a workload (a restarted process and the draining reader of
/// the previous one write through the same rotation).
pub(super) type SharedLog = Arc<Mutex<RotatingLog>>;

impl RotatingLog {
    /// Opens (appending to) `path`; a file already at the cap is rotated at the first write.
    pub(super) fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Self { path, file: Some(file), size, max_bytes: max_bytes.max(1), keep })
    }

    /// Appends `buf`, rotating whenever the file reaches the cap: a file holds at most
    /// `max_bytes`, cut after the last whole line that fits when there is one. Write errors (a
    /// full disk) drop the bytes: the child must never block on a log.
    pub(super) fn write(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.size >= self.max_bytes {
                self.rotate();
            }
            let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
            let n = if buf.len() <= room {
                buf.len()
            } else {
                // Keep lines whole across files when a line ends within the room.
                match buf[..room].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    // Start the line in a fresh file rather than split it.
                    None if self.size > 0 => {
                        self.rotate();
                        continue;
                    }
                    // A line longer than a whole file is cut.
                    None => room,
                }
            };
            if let Some(file) = self.file.as_mut() {
                let _ = file.write_all(&buf[..n]);
            }
            self.size += n as u64;
            if n < buf.len() {
                // The rest starts the next file.
                self.size = self.max_bytes;
            }
            buf = &buf[n..];
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(generation(&self.path, i), generation(&self.path, i + 1));
            }
            let _ = std::fs::rename(&self.path, generation(&self.path, 1));
        }
        self.file = open_append(&self.path).ok();
        self.size = 0;
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// `stdout.log.N`.
pub(super) fn generation(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Copies `stream` into `log` until the stream ends (every writer of the pipe is gone).
pub(super) fn spawn_reader(
    name: String,
    mut stream: impl Read + Send + 'static,
    log: SharedLog,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let write = |bytes: &[u8]| log.lock().unwrap_or_else(PoisonError::into_inner).write(bytes);
        // Whole lines go to the log, so that rotation never splits one; the unfinished tail waits
        // for its end, up to a full buffer (a longer line is written in pieces).
        let mut buf = [0u8; CHUNK];
        let mut filled = 0;
        loop {
            match stream.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => {
                    let end = filled + n;
                    match buf[..end].iter().rposition(|&b| b == b'\n') {
                        Some(i) => {
                            write(&buf[..=i]);
                            buf.copy_within(i + 1..end, 0);
                            filled = end - i - 1;
                        }
                        None if end == CHUNK => {
                            write(&buf);
                            filled = 0;
                        }
                        None => filled = end,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        write(&buf[..filled]);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kole-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_at_the_cap_on_line_boundaries_and_keeps_the_newest() {
        let dir = scratch("rotate");
        let path = dir.join("stdout.log");
        let mut log = RotatingLog::open(path.clone(), 20, 2).unwrap();
        for i in 0..20 {
            log.write(format!("line {i:02}\n").as_bytes());
        }
        // 8-byte lines, 20-byte files: two lines per file; the newest 3 files survive.
        assert_eq!(read(&path), "line 18\nline 19\n");
        assert_eq!(read(&generation(&path, 1)), "line 16\nline 17\n");
        assert_eq!(read(&generation(&path, 2)), "line 14\nline 15\n");
        assert!(!generation(&path, 3).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_longer_than_the_cap_is_cut_and_reopening_appends() {
        let dir = scratch("long");
        let path = dir.join("stderr.log");
        let mut log = RotatingLog::open(path.clone(), 4, 1).unwrap();
        log.write(b"abcdefghij");
        assert_eq!((read(&generation(&path, 1)), read(&path)), ("efgh".to_owned(), "ij".to_owned()));
        drop(log);
        let mut log = RotatingLog::open(path.clone(), 4, 1).unwrap();
        log.write(b"k\nlm");
        assert_eq!((read(&generation(&path, 1)), read(&path)), ("ijk\n".to_owned(), "lm".to_owned()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keep_zero_keeps_only_the_current_file() {
        let dir = scratch("keep0");
        let path = dir.join("stdout.log");
        let mut log = RotatingLog::open(path.clone(), 3, 0).unwrap();
        log.write(b"ab\ncd\n");
        assert_eq!(read(&path), "cd\n");
        assert!(!generation(&path, 1).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
