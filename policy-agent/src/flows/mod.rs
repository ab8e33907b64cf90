//! Flow visibility: the kernel's flow events (`PA_FLOWS`) read, named and published.
//!
//! - [`reader`]: the ring buffer, read as events arrive (tokio `AsyncFd`);
//! - [`names::Names`]: address owners and table provenance with a short history, so each
//!   event is named with the state current when the kernel made it;
//! - [`Hub`]: the last flows in memory (default 10,000), and a stream of new ones, behind
//!   the observe socket ([`socket`]) that `policy-agent observe` reads;
//! - [`log::FlowLog`]: `--flow-log stdout|FILE`, one JSON object per line, rotated by size.

pub mod log;
pub mod names;
pub mod reader;
pub mod record;
pub mod socket;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use names::Names;
pub use record::Flow;

/// Where `observe` finds the agent by default.
pub const DEFAULT_OBSERVE_SOCKET: &str = "/run/policy-agent/observe.sock";
/// Flows kept in memory by default.
pub const DEFAULT_RING: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("opening the flow events ring buffer {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("flow events: {0}")]
    Io(#[from] std::io::Error),
}

/// What `observe` asks for (one JSON line on the socket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Keep streaming new flows after the stored ones.
    #[serde(default)]
    pub follow: bool,
    /// Only the last N stored flows that match.
    #[serde(default)]
    pub last: Option<usize>,
    /// Only flows at or after this time.
    #[serde(default)]
    pub since_unix_ns: Option<u64>,
    #[serde(flatten)]
    pub filter: Filter,
}

/// Which flows: every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Either end in this namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Either end is this pod (`namespace/name`).
    #[serde(default)]
    pub pod: Option<String>,
    /// `allowed`, `denied` or `audit`.
    #[serde(default)]
    pub verdict: Option<String>,
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        let ends = [&f.source, &f.destination];
        if let Some(ns) = &self.namespace {
            if !ends.iter().any(|e| e.namespace.as_deref() == Some(ns.as_str())) {
                return false;
            }
        }
        if let Some(pod) = &self.pod {
            let is = |e: &record::End| match (&e.namespace, &e.pod) {
                (Some(n), Some(p)) => pod.split_once('/') == Some((n.as_str(), p.as_str())),
                _ => false,
            };
            if !ends.iter().any(|e| is(e)) {
                return false;
            }
        }
        if let Some(v) = &self.verdict {
            if !f.verdict.eq_ignore_ascii_case(v) {
                return false;
            }
        }
        true
    }
}

/// A flow with its sequence number.
pub type Sequenced = (u64, Arc<Flow>);

/// The last flows, and the stream of new ones. Each flow has a sequence number, so a
/// reader that takes the stored ones and then follows sees each flow once.
pub struct Hub {
    /// The stored flows, oldest first, and the next sequence number.
    ring: Mutex<(VecDeque<Sequenced>, u64)>,
    capacity: usize,
    tx: broadcast::Sender<Sequenced>,
}

impl Hub {
    pub fn new(capacity: usize) -> Hub {
        let (tx, _) = broadcast::channel(4096);
        Hub { ring: Mutex::new((VecDeque::with_capacity(capacity.min(65_536)), 0)), capacity: capacity.max(1), tx }
    }

    pub fn publish(&self, flow: Flow) {
        let flow = Arc::new(flow);
        let mut g = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        g.1 += 1;
        let seq = g.1;
        if g.0.len() >= self.capacity {
            g.0.pop_front();
        }
        g.0.push_back((seq, flow.clone()));
        drop(g);
        // No receiver is not an error.
        let _ = self.tx.send((seq, flow));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Sequenced> {
        self.tx.subscribe()
    }

    /// The stored flows that match, oldest first, and the last sequence number stored.
    pub fn snapshot(&self, req: &Request) -> (Vec<Arc<Flow>>, u64) {
        let g = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<Flow>> =
            g.0.iter()
                .filter(|(_, f)| req.since_unix_ns.is_none_or(|t| f.time_unix_ns >= t) && req.filter.matches(f))
                .map(|(_, f)| f.clone())
                .collect();
        if let Some(n) = req.last {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        (out, g.1)
    }

    /// The most recent stored flows of `subject` (a local pod) with verdict `verdict`, newest last.
    pub fn recent(&self, subject: &str, verdict: &str, n: usize) -> Vec<Arc<Flow>> {
        let g = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<Flow>> =
            g.0.iter().rev().filter(|(_, f)| f.subject == subject && f.verdict == verdict).take(n).map(|(_, f)| f.clone()).collect();
        out.reverse();
        out
    }
}

/// The flow parts of the agent's configuration.
#[derive(Debug, Clone)]
pub struct FlowOptions {
    /// Which events the kernel makes, and how many at most.
    pub events: crate::datapath::FlowConfig,
    pub log: Option<log::LogTarget>,
    /// A file flow log is rotated (to `FILE.1`) when it reaches this size.
    pub log_max_bytes: u64,
    /// The observe socket; `None`: not served.
    pub socket: Option<PathBuf>,
    /// Flows kept in memory.
    pub ring: usize,
}

impl Default for FlowOptions {
    fn default() -> FlowOptions {
        FlowOptions {
            events: crate::datapath::FlowConfig::default(),
            log: None,
            log_max_bytes: 100 * 1024 * 1024,
            socket: Some(PathBuf::from(DEFAULT_OBSERVE_SOCKET)),
            ring: DEFAULT_RING,
        }
    }
}

/// The state shared by the reader, the reconciler (which keeps [`Names`] current) and the
/// socket.
#[derive(Clone)]
pub struct Flows {
    pub names: Arc<Mutex<Names>>,
    pub hub: Arc<Hub>,
}

impl Flows {
    pub fn new(node: &str, ring: usize) -> Flows {
        Flows { names: Arc::new(Mutex::new(Names::new(node))), hub: Arc::new(Hub::new(ring)) }
    }
}
