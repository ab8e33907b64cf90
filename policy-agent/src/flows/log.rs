//! `--flow-log stdout|FILE`: one JSON object per line ([`super::Flow`]); a file is
//! rotated to `FILE.1` (replacing it) when it reaches its size limit.

use std::io::Write;
use std::path::PathBuf;

use super::Flow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for LogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<LogTarget, String> {
        match s {
            "" => Err("an empty --flow-log".into()),
            "stdout" | "-" => Ok(LogTarget::Stdout),
            path => Ok(LogTarget::File(PathBuf::from(path))),
        }
    }
}

pub struct FlowLog {
    target: LogTarget,
    out: Box<dyn Write + Send>,
    written: u64,
    max_bytes: u64,
}

impl FlowLog {
    pub fn open(target: LogTarget, max_bytes: u64) -> std::io::Result<FlowLog> {
        let (out, written): (Box<dyn Write + Send>, u64) = match &target {
            LogTarget::Stdout => (Box::new(std::io::stdout()), 0),
            LogTarget::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Box::new(std::io::BufWriter::new(f)), len)
            }
        };
        Ok(FlowLog { target, out, written, max_bytes: max_bytes.max(4096) })
    }

    /// Writes a batch of flows and flushes.
    pub fn write(&mut self, flows: &[Flow]) -> std::io::Result<()> {
        for f in flows {
            let mut line = serde_json::to_vec(f).map_err(std::io::Error::other)?;
            line.push(b'\n');
            self.out.write_all(&line)?;
            self.written += line.len() as u64;
            if self.written >= self.max_bytes {
                self.rotate()?;
            }
        }
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let LogTarget::File(path) = &self.target else { return Ok(()) };
        self.out.flush()?;
        let mut old = path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(path, &old)?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        self.out = Box::new(std::io::BufWriter::new(f));
        self.written = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &std::path::Path) -> usize {
        std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// A file past its limit moves to `FILE.1` (replacing the older one) and writing goes
    /// on in a new `FILE`: at most twice the limit on disk, the newest flows kept.
    #[test]
    fn a_file_log_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows/flows.log");
        let mut log = FlowLog::open(LogTarget::File(path.clone()), 4096).unwrap();
        let flow = crate::flows::record::sample("x/b", serde_json::json!([]));
        let per_line = serde_json::to_vec(&flow).unwrap().len() as u64 + 1;
        let per_file = 4096_u64.div_ceil(per_line) as usize;
        for _ in 0..per_file * 2 + 3 {
            log.write(std::slice::from_ref(&flow)).unwrap();
        }
        let rotated = path.with_file_name("flows.log.1");
        assert_eq!(lines(&rotated), per_file, "FILE.1 holds one full file");
        assert_eq!(lines(&path), 3, "FILE holds what came after the last rotation");
        assert!(std::fs::metadata(&path).unwrap().len() < 4096);
        // Reopened, it goes on where it was (appending, counting what is there).
        drop(log);
        let mut log = FlowLog::open(LogTarget::File(path.clone()), 4096).unwrap();
        log.write(std::slice::from_ref(&flow)).unwrap();
        assert_eq!(lines(&path), 4);
    }
}
