//! The observe socket: a client writes one JSON [`Request`] line, and reads flows as
//! JSON lines: the stored ones that match, then, with `follow`, new ones as they come.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::broadcast::error::RecvError;
use tracing::debug;

use super::{Hub, Request};

/// Serves `hub` on a unix socket at `path` (an old socket file there is replaced) until
/// the process ends. Each client is served by a thread of its own, with blocking I/O (a
/// few operators' `observe` at a time).
pub async fn serve(path: &Path, hub: Arc<Hub>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        let hub = hub.clone();
        std::thread::spawn(move || {
            if let Err(e) = client(stream, &hub) {
                debug!(error = %e, "observe client gone");
            }
        });
    }
}

fn client(stream: std::os::unix::net::UnixStream, hub: &Hub) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let mut wr = std::io::BufWriter::new(&stream);
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("bad request: {e}") }).to_string() + "\n";
            wr.write_all(msg.as_bytes())?;
            return wr.flush();
        }
    };
    // Subscribed before the snapshot: nothing falls between the two.
    let mut rx = hub.subscribe();
    let (stored, last_seq) = hub.snapshot(&req);
    for f in stored {
        serde_json::to_writer(&mut wr, &*f).map_err(std::io::Error::other)?;
        wr.write_all(b"\n")?;
    }
    wr.flush()?;
    if !req.follow {
        return stream.shutdown(std::net::Shutdown::Write);
    }
    loop {
        match rx.blocking_recv() {
            Ok((seq, f)) => {
                if seq <= last_seq || !req.filter.matches(&f) || req.since_unix_ns.is_some_and(|t| f.time_unix_ns < t) {
                    continue;
                }
                serde_json::to_writer(&mut wr, &*f).map_err(std::io::Error::other)?;
                wr.write_all(b"\n")?;
                wr.flush()?;
            }
            Err(RecvError::Lagged(n)) => {
                let msg = serde_json::json!({ "lost": n }).to_string() + "\n";
                wr.write_all(msg.as_bytes())?;
                wr.flush()?;
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
