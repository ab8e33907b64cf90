//! Running a case on real traffic: emulated nodes (network namespaces; routed or bridged,
//! one or two joined by a link) with the case's pods spread over them, serving TCP, UDP and
//! SCTP on 80 and 81, a ClusterIP Service per pod made as kube-proxy makes it (iptables
//! DNAT in every node), the real `policy-agent run --manifests` in every node, and the
//! case's steps written as manifests. Probes connect for real, polled until the matrix
//! matches the expectation or a deadline passes, as upstream does.
//!
//! Each Service is also a LoadBalancer (NodePorts [`node_port`], ingress IP
//! [`load_balancer_ip`]). A case with `from: outside` probes gets an outside network: a
//! namespace linked to every node, whose two clients reach each pod through the NodePort
//! of the pod's own node or its LoadBalancer IP (routed to that node), with kube-proxy's
//! DNAT and, for `externalTrafficPolicy: Cluster`, its masquerade.
//!
//! A case's own Services (`services:`, see [`crate::service`]) get kube-proxy's rules in
//! every node, rewritten at each step as their endpoints change; the steps' pod and
//! namespace lifecycle changes are `live`'s. `outside` holds the outside network.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use policy_agent::matrix::Probe;
use policy_model::Family;

use crate::agent_process::AgentProcess;
use crate::case::{Case, Expect, ProbeSource, ProbeSpec, ProbeTarget, Reachability, Via, outside_address};
use crate::cluster::{Families, SERVED_PORTS};
use crate::model::{CaseOutcome, ProbeOutcome};
use crate::netns::{NetnsHandle, unique};
use crate::topology::Topology;
use crate::traffic::{ProbeEnd, probe_end_in, probe_in};

mod live;
mod outside;

use live::Live;
use outside::Outside;

pub use crate::cluster::node_name;

/// Where probes connect: the Service ClusterIP (upstream's way) or the pod's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeTo {
    Service,
    Pod,
}

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub families: Families,
    pub probe_to: ProbeTo,
    /// How long a probe may take to match (upstream: 10 s).
    pub deadline: Duration,
    pub topology: Topology,
    /// Nodes the pods are spread over (1 or 2), one agent each.
    pub nodes: usize,
}

impl RunOptions {
    /// One routed node, probes to Services, upstream's 10 s deadline.
    pub fn new(families: Families) -> RunOptions {
        RunOptions { families, probe_to: ProbeTo::Service, deadline: Duration::from_secs(10), topology: Topology::Routed, nodes: 1 }
    }
}

/// The NodePort of pod `index`'s Service for `port` (80 or 81), the same for every protocol.
pub fn node_port(index: usize, port: u16) -> u16 {
    30000 + 2 * index as u16 + (port - SERVED_PORTS[0])
}

/// The NodePort of the same Service with `externalTrafficPolicy: Local` (no masquerade).
pub fn node_port_local(index: usize, port: u16) -> u16 {
    node_port(index, port) + 1000
}

/// The LoadBalancer ingress IP of pod `index`'s Service.
pub fn load_balancer_ip(index: usize, family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => format!("203.0.113.{}", 128 + index).parse().unwrap(),
        Family::Ipv6 => format!("2001:db8:2::{:x}", 0x80 + index).parse().unwrap(),
    }
}

/// Runs one case; errors are setup failures (the case then counts as failed).
pub fn run_case(case: &Case, opts: RunOptions) -> Result<CaseOutcome, String> {
    let mut live = Live::create(case, opts)?;
    // One agent per node. Each detects its node devices: with two nodes, the uplink gets the
    // post-DNAT egress check of Service traffic leaving the node.
    let mut agents = Vec::new();
    for node in &live.nodes {
        agents.push((node.name.clone(), AgentProcess::start(&node.ns, &node.name, live.dir.path(), &[])?));
    }
    for (name, agent) in &mut agents {
        agent.wait_ready(Duration::from_secs(15)).map_err(|e| format!("agent on {name}: {e}"))?;
    }
    // Connections kept across steps (`open`, `reuse`).
    let mut kept: BTreeMap<String, (std::net::TcpStream, crate::case::Connection)> = BTreeMap::new();
    let mut outcome = CaseOutcome { name: case.name.clone(), probes: Vec::new(), errors: Vec::new() };
    for (si, step) in case.steps.iter().enumerate() {
        live.apply_lifecycle(step).map_err(|e| format!("step {}: {e}", si + 1))?;
        live.apply_objects(step).map_err(|e| format!("step {}: {e}", si + 1))?;
        live.sync_services().map_err(|e| format!("step {}: {e}", si + 1))?;
        for spec in &step.probes {
            let expected = Reachability::parse(&spec.expect).map_err(|e| e.to_string())?;
            let probe = Probe { port: spec.port, protocol: spec.protocol };
            let cells = probe_cells(&live, spec, &expected);
            let observed = poll_matrix(&cells, &expected, probe, opts, case.blocked_must_drop)?;
            let wrong = differences(&expected, &observed);
            outcome.probes.push(ProbeOutcome { step: si, probe, expected, observed, wrong });
        }
        // After the probes, which show the step's changes in force (a `connected` answer
        // before them would prove nothing).
        for (name, want) in &step.reuse {
            let (stream, c) = kept.get_mut(name).ok_or(format!("reuse: no connection {name}"))?;
            let got = poll_exchange(stream, *want, opts.deadline);
            outcome.probes.push(crate::model::reuse_outcome(si, c, *want, got));
        }
        for (name, c) in &step.open {
            let from = live.pods.get(&c.from).ok_or(format!("open {name}: {} does not run", c.from))?;
            let to = live.pods.get(&c.to).ok_or(format!("open {name}: {} does not run", c.to))?;
            let stream = open_connection(&from.net.ns.handle(), live.pod_destination(to, c.port), opts.deadline)
                .map_err(|e| format!("step {}: open {name}: {} -> {}: {e}", si + 1, c.from, c.to))?;
            kept.insert(name.clone(), (stream, c.clone()));
        }
    }
    for (name, mut agent) in agents {
        agent.stop();
        if let Some(e) = agent.log_text().lines().find(|l| l.contains("ERROR")) {
            outcome.errors.push(format!("agent on {name}: {e}"));
        }
    }
    Ok(outcome)
}

/// One cell's client: a namespace, and the source address it binds (TCP only), if any.
type Client = (NetnsHandle, Option<IpAddr>);

/// A probe's cells: per row and column, the client (none if the row's pod does not run)
/// and the addresses the column stands for (none if its pod does not run): a pod's (its
/// Service's, or its NodePort from outside), every node's, or a Service's.
fn probe_cells(live: &Live, spec: &ProbeSpec, expected: &Reachability) -> Vec<Vec<(Option<Client>, Vec<SocketAddr>)>> {
    let family = live.family;
    let port = spec.port;
    let resolved = live.resolved();
    let column = |t: &String| -> Vec<SocketAddr> {
        match (spec.from, spec.to) {
            (_, ProbeTarget::Nodes) => live
                .nodes
                .iter()
                .filter_map(|n| n.addresses.iter().copied().find(|a| Family::of(*a) == family))
                .map(|a| SocketAddr::new(a, port))
                .collect(),
            (ProbeSource::Outside, ProbeTarget::Services) => resolved
                .iter()
                .find(|s| &s.key == t)
                .and_then(|s| s.outside_destination(port, spec.via == Via::LoadBalancer, family, |n| Outside::node_side(n, family)))
                .into_iter()
                .collect(),
            (_, ProbeTarget::Services) => {
                resolved.iter().find(|s| &s.key == t).map(|s| s.destinations(port, spec.protocol, family)).unwrap_or_default()
            }
            (ProbeSource::Outside, ProbeTarget::Pods) => {
                let Some(to) = live.pods.get(t) else { return Vec::new() };
                let node_side = Outside::node_side(live.node_of(to), family);
                vec![match spec.via {
                    Via::NodePort => SocketAddr::new(node_side, node_port(to.index, port)),
                    Via::NodePortLocal => SocketAddr::new(node_side, node_port_local(to.index, port)),
                    Via::LoadBalancer => SocketAddr::new(load_balancer_ip(to.index, family), port),
                }]
            }
            // The node reaches its pods at their own addresses, as kubelet probes do.
            (ProbeSource::Node, ProbeTarget::Pods) => {
                live.pods.get(t).and_then(|to| to.spec.ip(family)).map(|a| vec![SocketAddr::new(a, port)]).unwrap_or_default()
            }
            (_, ProbeTarget::Pods) => live.pods.get(t).map(|to| vec![live.pod_destination(to, port)]).unwrap_or_default(),
        }
    };
    let client = |r: &String, t: &String| -> Option<Client> {
        match spec.from {
            ProbeSource::Outside => {
                let o = live.outside.as_ref().expect("made when a probe needs it");
                Some((o.ns.handle(), Some(outside_address(r, family).expect("validated rows"))))
            }
            ProbeSource::Node => {
                // The column pod's own node, from its InternalIP.
                let node = &live.nodes[live.node_of(live.pods.get(t)?)];
                Some((node.ns.handle(), node.addresses.iter().copied().find(|a| Family::of(*a) == family)))
            }
            ProbeSource::Pods => live.pods.get(r).map(|p| (p.net.ns.handle(), None)),
        }
    };
    let columns: Vec<Vec<SocketAddr>> = expected.targets.iter().map(column).collect();
    expected.pods.iter().map(|r| expected.targets.iter().zip(&columns).map(|(t, c)| (client(r, t), c.clone())).collect()).collect()
}

fn differences(expected: &Reachability, observed: &Reachability) -> Vec<(String, String)> {
    let mut wrong = Vec::new();
    for (i, from) in expected.pods.iter().enumerate() {
        for (j, to) in expected.targets.iter().enumerate() {
            let want = expected.cells[i][j];
            if want != Expect::Unchecked && observed.cells[i][j] != want {
                wrong.push((from.clone(), to.clone()));
            }
        }
    }
    wrong
}

/// Probes every checked cell at once; again (only the cells still wrong) until they all
/// match or the deadline passes. `cells[i][j]` is row `i`'s client for column `j` and the
/// addresses that column stands for: a cell is observed as expected only when every one
/// of them behaves so.
fn poll_matrix(
    cells: &[Vec<(Option<Client>, Vec<SocketAddr>)>],
    expected: &Reachability,
    probe: Probe,
    opts: RunOptions,
    must_drop: bool,
) -> Result<Reachability, String> {
    let (n, m) = (expected.pods.len(), expected.targets.len());
    if cells.len() != n || cells.iter().any(|r| r.len() != m) {
        return Err(format!("cells for a {n}×{m} matrix expected"));
    }
    let mut observed = Reachability::unchecked(expected.pods.clone(), expected.targets.clone());
    let mut pending: Vec<(usize, usize)> =
        (0..n).flat_map(|i| (0..m).map(move |j| (i, j))).filter(|&(i, j)| expected.cells[i][j] != Expect::Unchecked).collect();
    // A checked cell needs a client and an address to probe (a pod that does not run has
    // only `-` cells: the case's validation sees to it).
    if let Some(&(i, j)) = pending.iter().find(|&&(i, j)| cells[i][j].0.is_none() || cells[i][j].1.is_empty()) {
        return Err(format!("{} -> {}: nothing running to probe", expected.pods[i], expected.targets[j]));
    }
    let deadline = Instant::now() + opts.deadline;
    loop {
        let handles: Vec<_> = pending
            .iter()
            .flat_map(|&(i, j)| cells[i][j].1.iter().map(move |&dst| (i, j, dst)))
            .map(|(i, j, dst)| {
                let (ns, src) = cells[i][j].0.clone().expect("checked above");
                (
                    i,
                    j,
                    std::thread::spawn(move || {
                        let timeout = Duration::from_millis(700);
                        if let Some(src) = src {
                            crate::traffic::probe_tcp_from_in(&ns, src, dst, timeout)
                                .map(|ok| if ok { ProbeEnd::Connected } else { ProbeEnd::Dropped })
                        } else if must_drop {
                            probe_end_in(&ns, probe.protocol, dst, timeout)
                        } else {
                            // Any failure counts as blocked (NetworkPolicy tests).
                            probe_in(&ns, probe.protocol, dst, timeout).map(|ok| if ok { ProbeEnd::Connected } else { ProbeEnd::Dropped })
                        }
                    }),
                )
            })
            .collect();
        // A cell probed at several addresses shows the first result that is not the
        // expected one, if any.
        let mut seen: BTreeMap<(usize, usize), Expect> = BTreeMap::new();
        for (i, j, h) in handles {
            let end = h.join().map_err(|_| "probe thread panicked".to_string())?.map_err(|e| e.to_string())?;
            let got = match end {
                ProbeEnd::Connected => Expect::Connected,
                ProbeEnd::Dropped => Expect::Blocked,
                ProbeEnd::Refused => Expect::Refused,
            };
            let cell = seen.entry((i, j)).or_insert(got);
            if *cell == expected.cells[i][j] {
                *cell = got;
            }
        }
        for ((i, j), got) in seen {
            observed.cells[i][j] = got;
        }
        pending.retain(|&(i, j)| observed.cells[i][j] != expected.cells[i][j]);
        if pending.is_empty() || Instant::now() >= deadline {
            return Ok(observed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One exchange on a kept connection: a byte out, a byte back within 700 ms.
fn exchange(stream: &mut std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    let _ = stream.set_read_timeout(Some(Duration::from_millis(700)));
    let mut b = [0u8; 1];
    stream.write_all(b"h").is_ok() && matches!(stream.read(&mut b), Ok(1))
}

/// Exchanges on `stream` until the outcome is `want` or `deadline` passes; the last one.
fn poll_exchange(stream: &mut std::net::TcpStream, want: crate::case::Reuse, deadline: Duration) -> crate::case::Reuse {
    use crate::case::Reuse;
    let end = Instant::now() + deadline;
    loop {
        let got = if exchange(stream) { Reuse::Connected } else { Reuse::Blocked };
        if got == want || Instant::now() >= end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP connection from the namespace behind `ns` to `dst` that has carried one
/// exchange, tried until `deadline` passes.
fn open_connection(ns: &NetnsHandle, dst: SocketAddr, deadline: Duration) -> Result<std::net::TcpStream, String> {
    let end = Instant::now() + deadline;
    loop {
        let attempt = ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_millis(700))).map_err(|e| e.to_string())?;
        if let Ok(mut s) = attempt
            && exchange(&mut s)
        {
            return Ok(s);
        }
        if Instant::now() >= end {
            return Err("no connection".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A temporary directory (removed on drop).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn tempfile_dir() -> Result<TempDir, String> {
    let p = std::env::temp_dir().join(unique("conformance-"));
    std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
    Ok(TempDir(p))
}
