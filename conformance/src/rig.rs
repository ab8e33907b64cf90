//! A one-node test rig: pods in network namespaces serving TCP, UDP and SCTP on 80 and
//! 81, and the real enforcement (compiler → maps → tc programs) running in the node's
//! namespace, driven by model changes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use policy_agent::datapath::{Budget, Enforcer, FlowConfig, MapSizes, PodInterface, SyncReport};
use policy_ebpf::{Counters, CtKey, CtValue};
use policy_model::{Change, Namespace, Node, NodeCompiler, ObjectKey, Pod, Prefix, Protocol};

use crate::netns::{NetnsError, unique};
use crate::topology::{NodeNet, PodNet};
use crate::traffic::{Servers, probe, probe_tcp_from, serve};

pub const NODE: &str = "node-1";
pub const NODE_V4: &str = "10.250.0.1";
pub const NODE_V6: &str = "fd10:250::1";

enum Command {
    Apply(Vec<Change>, mpsc::Sender<Result<SyncReport, String>>),
    /// Apply, syncing `writes` map writes at a time with `pause` between steps; replies
    /// with each step's report and the state of every pod after it.
    ApplyStepwise(Vec<Change>, usize, Duration, mpsc::Sender<Result<Vec<Step>, String>>),
    EntryCounts(mpsc::Sender<(usize, usize)>),
    Services(Vec<Prefix>, mpsc::Sender<Result<(), String>>),
    ServicePlacement([Vec<Prefix>; 3], mpsc::Sender<Result<(), String>>),
    AttachNodeDevices(Vec<String>, mpsc::Sender<Result<(), String>>),
    Counters(ObjectKey, mpsc::Sender<Option<[Counters; 2]>>),
    Conntrack(mpsc::Sender<Vec<(CtKey, CtValue)>>),
    /// Stop, leaving the pins (and so enforcement) in place.
    Exit,
}

/// One sync step: its report, and every pod's state after it.
pub type Step = (SyncReport, Vec<PodStep>);

/// A pod's state after one sync step.
#[derive(Debug, Clone)]
pub struct PodStep {
    pub pod: ObjectKey,
    /// The agent's status says fail-closed.
    pub fail_closed: bool,
    /// The kernel's `ENDPOINTS` entry of its IPv4 address is flagged fail-closed.
    pub kernel_fail_closed: bool,
}

pub struct RigPod {
    pub net: PodNet,
    _servers: Servers,
}

pub struct Rig {
    pub node: NodeNet,
    pub pods: BTreeMap<ObjectKey, RigPod>,
    pub pin_dir: PathBuf,
    agent: Option<(mpsc::Sender<Command>, JoinHandle<()>)>,
    interfaces: BTreeMap<ObjectKey, PodInterface>,
    sizes: MapSizes,
    /// The flow events the agent's programs report; `None`: as `POLICY_AGENT_FLOW_EVENTS`
    /// says (see `Enforcer::new`).
    flows: Option<FlowConfig>,
    /// Everything applied so far, to replay into a restarted agent.
    history: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("agent: {0}")]
    Agent(String),
}

/// Map sizes for tests: small, so many rigs fit in memory at once.
pub fn test_sizes() -> MapSizes {
    MapSizes { peer_entries: 65_536, port_entries: 16_384, conntrack: 16_384, ..MapSizes::default() }
}

fn agent_loop(
    pin_dir: PathBuf,
    sizes: MapSizes,
    flows: Option<FlowConfig>,
    interfaces: BTreeMap<ObjectKey, PodInterface>,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let enforcer = match flows {
        Some(flows) => Enforcer::with_flows(&pin_dir, sizes, flows),
        None => Enforcer::new(&pin_dir, sizes),
    };
    let mut enforcer = match enforcer {
        Ok(e) => {
            let _ = ready.send(Ok(()));
            e
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let mut compiler = NodeCompiler::new(NODE);
    let lookup = |k: &ObjectKey| interfaces.get(k).cloned();
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Apply(changes, reply) => {
                let r = compiler.apply(changes);
                let rejected: Vec<String> = r.rejected.iter().map(|e| e.to_string()).collect();
                let report = enforcer.reconcile(&compiler, &lookup);
                let _ = reply.send(if rejected.is_empty() { Ok(report) } else { Err(rejected.join("; ")) });
            }
            Command::ApplyStepwise(changes, writes, pause, reply) => {
                let r = compiler.apply(changes);
                if !r.rejected.is_empty() {
                    let _ = reply.send(Err(r.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")));
                    continue;
                }
                let mut steps = Vec::new();
                loop {
                    let report = enforcer.reconcile_with(&compiler, &lookup, Budget { deadline: None, writes: Some(writes) });
                    let pods = compiler
                        .endpoints()
                        .map(|e| {
                            let pod = e.tables.pod.clone();
                            let fail_closed =
                                matches!(enforcer.sync.status(&pod), Some(policy_agent::datapath::EndpointStatus::FailClosed { .. }));
                            let v4 = e.tables.addresses.iter().find(|a| a.is_ipv4()).copied();
                            let kernel_fail_closed = v4
                                .and_then(|a| enforcer.datapath.endpoint_entry(a))
                                .is_some_and(|v| v.flags & policy_ebpf::ENDPOINT_FAIL_CLOSED != 0);
                            PodStep { pod, fail_closed, kernel_fail_closed }
                        })
                        .collect();
                    let more = report.more_work;
                    steps.push((report, pods));
                    if !more {
                        break;
                    }
                    std::thread::sleep(pause);
                }
                let _ = reply.send(Ok(steps));
            }
            Command::EntryCounts(reply) => {
                let _ = reply.send(enforcer.sync.entry_counts());
            }
            Command::Services(p, reply) => {
                let _ = reply.send(enforcer.set_services(&p));
            }
            Command::ServicePlacement([all, tcp_only, before], reply) => {
                let _ = reply.send(enforcer.set_service_deferrals(&all, &tcp_only, &before));
            }
            Command::AttachNodeDevices(names, reply) => {
                let wanted = names.into_iter().collect();
                let _ = reply.send(enforcer.set_node_devices(&wanted).into_iter().next().map_or(Ok(()), |e| Err(e.to_string())));
            }
            Command::Counters(pod, reply) => {
                let c = enforcer.sync.id_and_revision(&pod).map(|(id, _)| enforcer.datapath.counters(id));
                let _ = reply.send(c);
            }
            Command::Conntrack(reply) => {
                let _ = reply.send(enforcer.datapath.conntrack_entries());
            }
            Command::Exit => return,
        }
    }
}

impl Rig {
    /// A node with `pods` (each gets a namespace, a veth and servers on 80 and 81), and the
    /// agent enforcing on it. Namespaces and pods go to the model first.
    pub fn new(pods: Vec<Pod>) -> Result<Rig, RigError> {
        Rig::with_sizes(pods, test_sizes())
    }

    /// [`Rig::new`] with chosen map sizes.
    pub fn with_sizes(pods: Vec<Pod>, sizes: MapSizes) -> Result<Rig, RigError> {
        let node = NodeNet::create(&unique("pan"), NODE, &[NODE_V4.parse().unwrap(), NODE_V6.parse().unwrap()])?;
        let mut rig_pods = BTreeMap::new();
        let mut interfaces = BTreeMap::new();
        for (i, pod) in pods.iter().enumerate() {
            let veth = format!("pv{i}");
            let net = node.add_pod(&unique("pap"), &veth, &pod.ips)?;
            let servers = serve(&net.ns, &[80, 81])?;
            interfaces.insert(pod.key.clone(), PodInterface { name: veth.clone(), ifindex: node.ifindex(&veth)? });
            rig_pods.insert(pod.key.clone(), RigPod { net, _servers: servers });
        }
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("pa-test-")));
        let mut rig = Rig { node, pods: rig_pods, pin_dir, agent: None, interfaces, sizes, flows: None, history: Vec::new() };
        rig.start_agent()?;
        let mut changes: Vec<Change> = Vec::new();
        let mut namespaces: Vec<String> = pods.iter().map(|p| p.key.namespace.to_string()).collect();
        namespaces.sort();
        namespaces.dedup();
        changes.extend(namespaces.into_iter().map(|n| Change::UpsertNamespace(Namespace::new(n, Default::default()))));
        changes.push(Change::UpsertNode(Node { name: NODE.into(), addresses: vec![NODE_V4.parse().unwrap(), NODE_V6.parse().unwrap()] }));
        changes.extend(pods.into_iter().map(Change::UpsertPod));
        rig.apply(changes)?;
        Ok(rig)
    }

    /// Starts (or restarts) the agent in the node's namespace, replaying what was applied.
    pub fn start_agent(&mut self) -> Result<(), RigError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let pin = self.pin_dir.clone();
        let ifs = self.interfaces.clone();
        let (sizes, flows) = (self.sizes, self.flows);
        let h = self.node.ns.spawn(move || agent_loop(pin, sizes, flows, ifs, rx, ready_tx))?;
        ready_rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)?;
        self.agent = Some((tx, h));
        if !self.history.is_empty() {
            let replay = self.history.clone();
            self.send_apply(replay)?;
        }
        Ok(())
    }

    /// The flow events of the agents started from now on (see [`Rig::start_agent`]).
    pub fn set_flow_events(&mut self, flows: FlowConfig) {
        self.flows = Some(flows);
    }

    /// Stops the agent as a crash or an upgrade would: pins stay, enforcement goes on.
    pub fn stop_agent(&mut self) {
        if let Some((tx, h)) = self.agent.take() {
            let _ = tx.send(Command::Exit);
            let _ = h.join();
        }
    }

    /// Stops the agent and removes its pins: the links detach, no program is left on the path.
    /// The host-side veth of every pod, by name.
    pub fn pod_interfaces(&self) -> Vec<String> {
        self.interfaces.values().map(|i| i.name.clone()).collect()
    }

    pub fn detach(&mut self) {
        self.stop_agent();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }

    /// Keeps only the last change to each object in what a restarted agent replays: the
    /// compiler's state depends only on the latest version of every object, so the replay
    /// ends in the same state, without compiling every superseded version on the way. Only
    /// valid when the compiler accepted every change applied.
    pub fn compact_history(&mut self) {
        fn object(c: &Change) -> (u8, String) {
            match c {
                Change::UpsertNamespace(n) => (0, n.name.clone()),
                Change::DeleteNamespace(n) => (0, n.clone()),
                Change::UpsertPod(p) => (1, p.key.to_string()),
                Change::DeletePod(k) => (1, k.to_string()),
                Change::UpsertPolicy(p) => {
                    (2, format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or("")))
                }
                Change::DeletePolicy(k) => (2, k.to_string()),
                Change::UpsertNode(n) => (3, n.name.clone()),
                Change::DeleteNode(n) => (3, n.clone()),
                Change::UpsertClusterPolicy(p) => (4, p.metadata.name.clone().unwrap_or_default()),
                Change::DeleteClusterPolicy(n) => (4, n.clone()),
                Change::UpsertNodeLabels { node, .. } => (5, node.clone()),
            }
        }
        let deleted =
            |c: &Change| matches!(c, Change::DeleteNamespace(_) | Change::DeletePod(_) | Change::DeletePolicy(_) | Change::DeleteNode(_) | Change::DeleteClusterPolicy(_));
        let mut seen = std::collections::HashSet::new();
        // Latest change per object; where that is a deletion, nothing (replays start empty).
        let mut kept: Vec<Change> = self.history.drain(..).rev().filter(|c| seen.insert(object(c)) && !deleted(c)).collect();
        kept.reverse();
        self.history = kept;
    }

    fn sender(&self) -> Result<&mpsc::Sender<Command>, RigError> {
        self.agent.as_ref().map(|(tx, _)| tx).ok_or_else(|| RigError::Agent("not running".into()))
    }

    fn send_apply(&self, changes: Vec<Change>) -> Result<SyncReport, RigError> {
        let (tx, rx) = mpsc::channel();
        self.sender()?.send(Command::Apply(changes, tx)).map_err(|e| RigError::Agent(e.to_string()))?;
        let report = rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)?;
        if !report.errors.is_empty() {
            return Err(RigError::Agent(report.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")));
        }
        Ok(report)
    }

    /// Applies model changes and waits until the maps hold them.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<SyncReport, RigError> {
        self.history.extend(changes.iter().cloned());
        self.send_apply(changes)
    }

    /// Like [`Rig::apply`], but returns the sync report even when it holds errors.
    pub fn apply_report(&mut self, changes: Vec<Change>) -> Result<SyncReport, RigError> {
        self.history.extend(changes.iter().cloned());
        let (tx, rx) = mpsc::channel();
        self.sender()?.send(Command::Apply(changes, tx)).map_err(|e| RigError::Agent(e.to_string()))?;
        rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)
    }

    /// Like [`Rig::apply_report`], `writes` map writes at a time with `pause` between
    /// steps: each step's report and every pod's state after it.
    pub fn apply_stepwise(
        &mut self,
        changes: Vec<Change>,
        writes: usize,
        pause: Duration,
    ) -> Result<Vec<(SyncReport, Vec<PodStep>)>, RigError> {
        self.history.extend(changes.iter().cloned());
        let (tx, rx) = mpsc::channel();
        self.sender()?.send(Command::ApplyStepwise(changes, writes, pause, tx)).map_err(|e| RigError::Agent(e.to_string()))?;
        rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)
    }

    /// (`PEERS`, `PORTS`) entries the agent keeps.
    pub fn entry_counts(&self) -> (usize, usize) {
        let (tx, rx) = mpsc::channel();
        if self.sender().map(|s| s.send(Command::EntryCounts(tx))).is_err() {
            return (0, 0);
        }
        rx.recv().unwrap_or_default()
    }

    /// A pod's counters: [ingress, egress], summed over CPUs.
    pub fn counters(&self, pod: &str) -> Option<[Counters; 2]> {
        let (tx, rx) = mpsc::channel();
        self.sender().ok()?.send(Command::Counters(ObjectKey::parse(pod)?, tx)).ok()?;
        rx.recv().ok()?
    }

    /// The tracked connections.
    pub fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        let (tx, rx) = mpsc::channel();
        if self.sender().map(|s| s.send(Command::Conntrack(tx))).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// A TCP probe from the node itself (its own addresses).
    pub fn probe_from_node(&self, dst: IpAddr, port: u16) -> bool {
        probe(&self.node.ns, Protocol::Tcp, SocketAddr::new(dst, port), Duration::from_millis(400)).expect("probe")
    }

    /// A TCP probe from pod `from` claiming source address `src`.
    pub fn probe_spoofed(&self, from: &str, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        let ns = &self.pod(from).net.ns;
        let plen = if src.is_ipv4() { "32" } else { "128" };
        let fam = if src.is_ipv4() { "-4" } else { "-6" };
        let cidr = format!("{src}/{plen}");
        let mut add = vec![fam, "addr", "add", cidr.as_str(), "dev", "eth0"];
        if !src.is_ipv4() {
            add.push("nodad");
        }
        ns.ip(&add).expect("add spoofed address");
        let r = probe_tcp_from(ns, src, SocketAddr::new(dst, port), Duration::from_millis(400)).expect("probe");
        let _ = ns.ip(&[fam, "addr", "del", cidr.as_str(), "dev", "eth0"]);
        r
    }

    pub fn set_services(&self, prefixes: Vec<Prefix>) -> Result<(), RigError> {
        let (tx, rx) = mpsc::channel();
        self.sender()?.send(Command::Services(prefixes, tx)).map_err(|e| RigError::Agent(e.to_string()))?;
        rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)
    }

    /// Where flows to Service addresses are judged, as the agent sets it from Services:
    /// after DNAT for every protocol (`all`), for TCP only (`tcp_only`), or `before`
    /// translation (an address inside a prefix of `all`).
    pub fn set_service_placement(&self, all: Vec<Prefix>, tcp_only: Vec<Prefix>, before: Vec<Prefix>) -> Result<(), RigError> {
        let (tx, rx) = mpsc::channel();
        self.sender()?.send(Command::ServicePlacement([all, tcp_only, before], tx)).map_err(|e| RigError::Agent(e.to_string()))?;
        rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)
    }

    pub fn attach_node_devices(&self, names: &[&str]) -> Result<(), RigError> {
        let (tx, rx) = mpsc::channel();
        self.sender()?
            .send(Command::AttachNodeDevices(names.iter().map(|s| s.to_string()).collect(), tx))
            .map_err(|e| RigError::Agent(e.to_string()))?;
        rx.recv().map_err(|e| RigError::Agent(e.to_string()))?.map_err(RigError::Agent)
    }

    pub fn pod(&self, key: &str) -> &RigPod {
        self.pods.get(&ObjectKey::parse(key).expect("ns/name")).unwrap_or_else(|| panic!("no pod {key}"))
    }

    pub fn ip(&self, key: &str, v4: bool) -> IpAddr {
        self.pod(key).net.ip(v4)
    }

    /// A real connection from pod `from` to `dst:port`.
    pub fn probe_addr(&self, from: &str, dst: IpAddr, protocol: Protocol, port: u16) -> bool {
        probe(&self.pod(from).net.ns, protocol, SocketAddr::new(dst, port), Duration::from_millis(400)).expect("probe")
    }

    /// A real connection from pod `from` to pod `to` (IPv4 unless `v6`).
    pub fn probe(&self, from: &str, to: &str, protocol: Protocol, port: u16, v6: bool) -> bool {
        self.probe_addr(from, self.ip(to, !v6), protocol, port)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_agent();
        // Unpinning detaches the links and frees the maps.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
