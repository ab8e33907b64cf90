//! `policy-agent observe`: the flows the running agent named, from its observe socket
//! (`policy-agent run --observe-socket`), like `hubble observe`: the stored ones that
//! match, then with `--follow` new ones as they come. One line per flow, or `-o json`
//! (one JSON object per line, the flow log's fields).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{CliError, OutputFormat};
use crate::flows::{DEFAULT_OBSERVE_SOCKET, Filter, Flow, Request};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's observe socket.
    #[arg(long, default_value = DEFAULT_OBSERVE_SOCKET)]
    pub socket: PathBuf,
    /// Keep printing new flows as they come.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Flows from or to this pod (NAMESPACE/NAME).
    #[arg(long)]
    pub pod: Option<String>,
    /// Flows with an end in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows with this verdict (`audit`: allowed, and audited policies would deny).
    #[arg(long, value_parser = ["allowed", "denied", "audit"])]
    pub verdict: Option<String>,
    /// Only flows of the last DURATION (`30s`, `5m`, `2h`).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Only the last N stored flows (then new ones, with --follow).
    #[arg(long)]
    pub last: Option<usize>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h), e.g. 5m"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// How long `observe` without `--follow` waits for the agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    if let Some(pod) = &args.pod {
        if !pod.contains('/') {
            return Err(CliError::Usage(format!("--pod {pod:?}: expected NAMESPACE/NAME")));
        }
    }
    let since_unix_ns = args.since.map(|d| crate::flows::names::realtime_ns().saturating_sub(d.as_nanos() as u64));
    let req = Request {
        follow: args.follow,
        last: args.last,
        since_unix_ns,
        filter: Filter { namespace: args.namespace, pod: args.pod, verdict: args.verdict },
    };
    let mut stream = UnixStream::connect(&args.socket).map_err(|e| {
        CliError::Usage(format!(
            "cannot reach the agent's observe socket {}: {e} (is `policy-agent run` running on this node, with --observe-socket?)",
            args.socket.display()
        ))
    })?;
    let mut line = serde_json::to_string(&req).map_err(|e| CliError::Usage(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(|e| CliError::Usage(format!("writing to {}: {e}", args.socket.display())))?;
    if !args.follow {
        // The agent answers from memory at once; a socket that accepts and never answers
        // (a stuck or foreign server) must not hang the command. With --follow, new flows
        // may take any time to come.
        let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    }
    let reader = BufReader::new(stream);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for l in reader.lines() {
        let l = l.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                CliError::Usage(format!("no answer from {} within {} s", args.socket.display(), ANSWER_TIMEOUT.as_secs()))
            }
            _ => CliError::Usage(format!("reading from {}: {e}", args.socket.display())),
        })?;
        let text = match args.output {
            // Data only: a line that is not JSON is reported, never mixed into the output.
            OutputFormat::Json if serde_json::from_str::<serde_json::Value>(&l).is_err() => {
                super::note(&format!("error: {} sent a line that is not JSON: {l:?}", args.socket.display()));
                continue;
            }
            OutputFormat::Json => l,
            OutputFormat::Text => match serde_json::from_str::<Flow>(&l) {
                Ok(f) => f.text(),
                // `{"lost": N}` (a slow reader) and errors: shown as they are.
                Err(_) => l,
            },
        };
        let written = out.write_all(text.as_bytes()).and_then(|()| out.write_all(b"\n"));
        // Each line as it comes with --follow.
        let written = written.and_then(|()| if args.follow { out.flush() } else { Ok(()) });
        match written {
            Ok(()) => {}
            // A reader that went away (`observe | head`) ends the output quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(CliError::Usage(format!("writing the output: {e}"))),
        }
    }
    match out.flush() {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(CliError::Usage(format!("writing the output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
