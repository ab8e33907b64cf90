//! Reachability between every ordered pair of pods, for chosen ports and protocols.
//!
//! Each cell is judged twice: by the reference evaluator (the API semantics) and by the
//! compiled tables the datapath would load. A disagreement is a bug in the compiler and is
//! reported, never hidden.

use std::collections::HashMap;
use std::fmt::Write as _;

use policy_model::{ClusterState, EndpointTables, Family, Flow, IpProtocol, ObjectKey, Pod, Protocol, compile_pod, verdict};
use serde::Serialize;

/// A port and protocol to probe, as `80/TCP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Probe, String> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
        let port = match port.parse::<u32>() {
            Ok(p @ 1..=65535) => p as u16,
            Ok(_) => return Err(format!("{s:?}: the port must be 1-65535")),
            Err(_) => return Err(format!("{s:?}: expected PORT/PROTOCOL, e.g. 80/TCP")),
        };
        let protocol = proto.to_ascii_uppercase().parse::<Protocol>()?;
        Ok(Probe { port, protocol })
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// The upstream e2e default grid: 80 and 81 over TCP, UDP and SCTP.
pub fn default_probes() -> Vec<Probe> {
    let mut v = Vec::new();
    for protocol in Protocol::ALL {
        for port in [80, 81] {
            v.push(Probe { port, protocol });
        }
    }
    v
}

/// One cell in one family; the JSON shape is fixed by the CLI contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub family: Family,
    pub allowed: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Matrix {
    pub results: Vec<Cell>,
    /// Pods in row/column order.
    #[serde(skip)]
    pub pods: Vec<String>,
    #[serde(skip)]
    pub probes: Vec<Probe>,
    /// Cells where the compiled tables and the reference evaluator disagree.
    #[serde(skip)]
    pub disagreements: Vec<String>,
}

/// The mark of a cell from its verdicts (one per family): `-` none, `.` all allowed, `X`
/// all blocked, `!` both.
fn mark_of(verdicts: impl Iterator<Item = bool>) -> char {
    let (mut allowed, mut blocked) = (false, false);
    for v in verdicts {
        allowed |= v;
        blocked |= !v;
    }
    match (allowed, blocked) {
        (false, false) => '-',
        (true, false) => '.',
        (false, true) => 'X',
        (true, true) => '!',
    }
}

/// Pods that take part: non-hostNetwork pods that have an address.
pub fn matrix_pods(state: &ClusterState) -> Vec<&Pod> {
    state.pods().filter(|p| !p.host_network && state.owned_ips(p).next().is_some()).collect()
}

/// Every ordered pair of `pods` (all matrix pods when `None`), for each probe and each
/// family both pods have.
pub fn compute(state: &ClusterState, probes: &[Probe], pods: Option<&[ObjectKey]>) -> Matrix {
    let all = matrix_pods(state);
    let pods: Vec<&Pod> = match pods {
        None => all,
        Some(keys) => keys.iter().filter_map(|k| all.iter().find(|p| &p.key == k).copied()).collect(),
    };
    let tables: Vec<EndpointTables> = pods.iter().map(|p| compile_pod(state, p)).collect();
    let mut m = Matrix { pods: pods.iter().map(|p| p.key.to_string()).collect(), probes: probes.to_vec(), ..Matrix::default() };
    for probe in probes {
        for (i, from) in pods.iter().enumerate() {
            for (j, to) in pods.iter().enumerate() {
                for src in state.owned_ips(from) {
                    let Some(dst) = state.owned_ips(to).find(|d| d.is_ipv4() == src.is_ipv4()) else {
                        continue;
                    };
                    let flow = Flow { src, dst, protocol: IpProtocol::from(probe.protocol), port: probe.port };
                    let allowed = verdict(state, &flow).allowed;
                    let compiled =
                        tables[i].egress.allows(dst, flow.protocol, flow.port) && tables[j].ingress.allows(src, flow.protocol, flow.port);
                    if compiled != allowed {
                        m.disagreements.push(format!(
                            "{} -> {} {probe} {}: reference says {}, compiled tables say {}",
                            from.key,
                            to.key,
                            Family::of(src),
                            word(allowed),
                            word(compiled)
                        ));
                    }
                    m.results.push(Cell {
                        from: from.key.to_string(),
                        to: to.key.to_string(),
                        port: probe.port,
                        protocol: probe.protocol,
                        family: Family::of(src),
                        allowed,
                    });
                }
            }
        }
    }
    m
}

fn word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "blocked" }
}

impl Matrix {
    /// The cell mark for `from → to` on `probe`: `.` allowed in every shared family, `X`
    /// blocked in every one, `!` allowed in one family and blocked in the other, `-` no
    /// shared family.
    pub fn mark(&self, from: &str, to: &str, probe: Probe) -> char {
        self.mark_in(from, to, probe, &[Family::Ipv4, Family::Ipv6])
    }

    /// [`Matrix::mark`] over some families only.
    pub fn mark_in(&self, from: &str, to: &str, probe: Probe, families: &[Family]) -> char {
        let cells = self.results.iter().filter(|c| {
            c.from == from && c.to == to && c.port == probe.port && c.protocol == probe.protocol && families.contains(&c.family)
        });
        mark_of(cells.map(|c| c.allowed))
    }

    /// Every (from, to, port, protocol)'s verdicts, one per family: a table's cells looked
    /// up in constant time (a scan of all results per cell made the text of a few hundred
    /// pods take minutes).
    fn verdicts(&self) -> HashMap<(&str, &str, u16, Protocol), Vec<bool>> {
        let mut index: HashMap<(&str, &str, u16, Protocol), Vec<bool>> = HashMap::new();
        for c in &self.results {
            index.entry((c.from.as_str(), c.to.as_str(), c.port, c.protocol)).or_default().push(c.allowed);
        }
        index
    }

    /// One table per probe: rows are clients, columns servers.
    pub fn render_text(&self) -> String {
        let verdicts = self.verdicts();
        let mark = |from: &str, to: &str, p: &Probe| mark_of(verdicts.get(&(from, to, p.port, p.protocol)).into_iter().flatten().copied());
        let mut out = String::new();
        let width = self.pods.iter().map(String::len).max().unwrap_or(1).max(1);
        for (n, probe) in self.probes.iter().enumerate() {
            if n > 0 {
                out.push('\n');
            }
            let _ = writeln!(out, "{probe}  (rows: from, columns: to; . allowed, X blocked)");
            let _ = write!(out, "{:width$}", "-");
            for to in &self.pods {
                let _ = write!(out, " {to:width$}");
            }
            out.push('\n');
            for from in &self.pods {
                let _ = write!(out, "{from:width$}");
                for to in &self.pods {
                    let _ = write!(out, " {:width$}", mark(from, to, probe));
                }
                out.push('\n');
            }
        }
        let mixed = || self.pods.iter().any(|f| self.pods.iter().any(|t| self.probes.iter().any(|p| matches!(mark(f, t, p), '!' | '-'))));
        if self.results.iter().any(|c| c.allowed) && self.results.iter().any(|c| !c.allowed) && mixed() {
            out.push_str("\n! allowed in one address family and blocked in the other; - no shared address family\n");
        }
        out
    }

    pub fn render_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("matrix serializes")
    }
}
