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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use policy_agent::matrix::Probe;
use policy_model::{Family, ObjectKey};
use serde_json::{Value, json};

use crate::agent_process::AgentProcess;
use crate::case::{Case, Expect, OUTSIDE_CLIENTS, ProbeSource, ProbeTarget, Reachability, Via, outside_address};
use crate::cluster::{
    Families, PROTOCOLS, PodSpec, SERVED_PORTS, expand_placeholders, host_network_pod_manifest, make_pods, namespace_manifest,
    node_addresses, node_manifest,
};
use crate::model::{CaseOutcome, ProbeOutcome, delete_key, is_cluster_policy, namespaces_of, policy_key};
use crate::netns::{Netns, NetnsHandle, unique};
use crate::topology::{NodeNet, PodNet, Topology};
use crate::traffic::{ProbeEnd, Servers, probe_end_in, probe_in, serve};

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

struct LivePod {
    spec: PodSpec,
    net: PodNet,
    _servers: Servers,
    vip: IpAddr,
    /// Its place among the case's pods (its NodePorts: [`node_port`]).
    index: usize,
}

fn vip(family: Family, index: usize) -> IpAddr {
    match family {
        Family::Ipv4 => format!("10.96.0.{}", 10 + index).parse().unwrap(),
        Family::Ipv6 => format!("fd10:96::{:x}", 10 + index).parse().unwrap(),
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

/// kube-proxy's mark for masquerade (KUBE-MARK-MASQ).
const MASQUERADE_MARK: &str = "0x4000/0x4000";

/// The outside network of `from: outside` probes: one namespace, linked to every node by a
/// veth (`out0` on the node: a node device, so the agent's programs are on it), holding
/// the outside clients' addresses.
struct Outside {
    ns: Netns,
}

impl Outside {
    /// The node side of node `i`'s link: where the outside reaches its NodePorts.
    fn node_side(i: usize, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => format!("203.0.113.{}", 4 * i + 1).parse().unwrap(),
            Family::Ipv6 => format!("2001:db8:1:{i}::1").parse().unwrap(),
        }
    }

    fn outside_side(i: usize, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => format!("203.0.113.{}", 4 * i + 2).parse().unwrap(),
            Family::Ipv6 => format!("2001:db8:1:{i}::2").parse().unwrap(),
        }
    }

    fn create(nodes: &[NodeNet]) -> Result<Outside, String> {
        let e = |e: crate::netns::NetnsError| e.to_string();
        let ns = Netns::create(&unique("cfo")).map_err(e)?;
        ns.ip(&["link", "set", "lo", "up"]).map_err(e)?;
        for family in [Family::Ipv4, Family::Ipv6] {
            for c in OUTSIDE_CLIENTS {
                let a = outside_address(c, family).expect("outside client");
                let (fam, len) = if family == Family::Ipv4 { ("-4", 32) } else { ("-6", 128) };
                ns.ip(&[fam, "addr", "add", &format!("{a}/{len}"), "dev", "lo"]).map_err(e)?;
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            let far = format!("n{i}");
            node.ns.ip(&["link", "add", "out0", "type", "veth", "peer", "name", &far, "netns", ns.name()]).map_err(e)?;
            for (family, fam, len) in [(Family::Ipv4, "-4", 30), (Family::Ipv6, "-6", 64)] {
                let (near_addr, far_addr) = (Outside::node_side(i, family), Outside::outside_side(i, family));
                let mut add = vec![fam, "addr", "add"];
                let near = format!("{near_addr}/{len}");
                let far_cidr = format!("{far_addr}/{len}");
                add.extend([near.as_str(), "dev", "out0"]);
                if family == Family::Ipv6 {
                    add.push("nodad");
                }
                node.ns.ip(&add).map_err(e)?;
                let mut add = vec![fam, "addr", "add", far_cidr.as_str(), "dev", far.as_str()];
                if family == Family::Ipv6 {
                    add.push("nodad");
                }
                ns.ip(&add).map_err(e)?;
            }
            node.ns.ip(&["link", "set", "out0", "up"]).map_err(e)?;
            ns.ip(&["link", "set", &far, "up"]).map_err(e)?;
            for (family, fam, clients) in [(Family::Ipv4, "-4", "198.51.100.0/24"), (Family::Ipv6, "-6", "2001:db8:100::/64")] {
                let via = Outside::outside_side(i, family).to_string();
                node.ns.ip(&[fam, "route", "add", clients, "via", &via, "dev", "out0"]).map_err(e)?;
                // kube-proxy's masquerade of marked traffic (KUBE-POSTROUTING): the address
                // the kernel picks for the pod's veth. With the link-local gateway on it
                // (routed), 169.254.1.1; with none (proxy-ARP), the node's own; on a
                // bridge, the bridge's.
                let tool = if family == Family::Ipv4 { "iptables" } else { "ip6tables" };
                node.ns
                    .exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", MASQUERADE_MARK, "-j", "MASQUERADE"])
                    .map_err(e)?;
            }
        }
        Ok(Outside { ns })
    }

    /// kube-proxy's rules on node `i` (`node`) for pod `index`'s port `port` from
    /// outside: its NodePorts (`externalTrafficPolicy` Cluster and Local) and its
    /// LoadBalancer IP, which the outside routes to this node. Cluster traffic is marked
    /// for the masquerade first, as KUBE-EXT chains do.
    fn serve_pod(&self, node: &NodeNet, i: usize, index: usize, backend: IpAddr, port: u16) -> Result<(), String> {
        let family = Family::of(backend);
        let e = |e: crate::netns::NetnsError| e.to_string();
        let tool = if family == Family::Ipv4 { "iptables" } else { "ip6tables" };
        let node_side = Outside::node_side(i, family);
        let lb = load_balancer_ip(index, family);
        for (dst, dport, masquerade) in
            [(node_side, node_port(index, port), true), (node_side, node_port_local(index, port), false), (lb, port, true)]
        {
            if masquerade {
                let (d, p) = (dst.to_string(), dport.to_string());
                node.ns
                    .exec(
                        tool,
                        &[
                            "-t",
                            "nat",
                            "-A",
                            "PREROUTING",
                            "-d",
                            &d,
                            "-p",
                            "tcp",
                            "--dport",
                            &p,
                            "-j",
                            "MARK",
                            "--set-xmark",
                            MASQUERADE_MARK,
                        ],
                    )
                    .map_err(e)?;
            }
            node.dnat(dst, dport, backend, port, "tcp").map_err(e)?;
        }
        // The outside's route to the LoadBalancer IP: this node (`replace`: the pod's other
        // port set it already).
        let (fam, len) = if family == Family::Ipv4 { ("-4", 32) } else { ("-6", 128) };
        let (route, via, dev) = (format!("{lb}/{len}"), node_side.to_string(), format!("n{i}"));
        self.ns.ip(&[fam, "route", "replace", &route, "via", &via, "dev", &dev]).map_err(e)?;
        Ok(())
    }
}

fn write(dir: &Path, name: &str, v: &Value) -> Result<(), String> {
    std::fs::write(dir.join(name), serde_yaml_ng::to_string(v).map_err(|e| e.to_string())?).map_err(|e| format!("{name}: {e}"))
}

/// Runs one case; errors are setup failures (the case then counts as failed).
pub fn run_case(case: &Case, opts: RunOptions) -> Result<CaseOutcome, String> {
    let family = opts.families.probe_family();
    let node_count = opts.nodes.clamp(1, 2);
    let nodes: Vec<NodeNet> = (0..node_count)
        .map(|i| NodeNet::create_with(&unique("cfn"), &node_name(i), &node_addresses(i), opts.topology, i).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if let [a, b] = nodes.as_slice() {
        NodeNet::connect(a, b).map_err(|e| format!("joining the nodes: {e}"))?;
    }
    // Servers in each node's own namespace, on the node's addresses: what upstream's
    // host-network pods (centaur) serve for its `nodes` peer tests.
    let _node_servers: Vec<Servers> =
        nodes.iter().map(|n| serve(&n.ns, &SERVED_PORTS).map_err(|e| format!("servers on {}: {e}", n.name))).collect::<Result<_, _>>()?;
    let outside = if case.steps.iter().flat_map(|s| &s.probes).any(|p| p.from == ProbeSource::Outside) {
        Some(Outside::create(&nodes)?)
    } else {
        None
    };
    let dir = tempfile_dir()?;
    let names = case.pod_names();
    let mut pods: BTreeMap<String, LivePod> = BTreeMap::new();
    let mut ns_labels: BTreeMap<String, BTreeMap<String, String>> =
        namespaces_of(&names).into_iter().map(|n| (n, BTreeMap::new())).collect();
    let mut all_specs = make_pods(&names, opts.families, node_count);
    for (i, spec) in all_specs.iter().enumerate() {
        if case.later.contains(&spec.key()) {
            continue;
        }
        let live = start_pod(&nodes, outside.as_ref(), dir.path(), family, i, spec.clone())?;
        pods.insert(spec.key(), live);
    }
    for (ns, labels) in &ns_labels {
        write(dir.path(), &format!("ns-{ns}.yaml"), &namespace_manifest(ns, labels))?;
    }
    for (i, node) in nodes.iter().enumerate() {
        write(dir.path(), &format!("node-{}.yaml", node.name), &node_manifest(&node.name, &node.addresses))?;
        write(dir.path(), &format!("host-pod-{}.yaml", node.name), &host_network_pod_manifest(i, &node.addresses))?;
    }
    // One agent per node. Each detects its node devices: with two nodes, the uplink gets the
    // post-DNAT egress check of Service traffic leaving the node.
    let mut agents = Vec::new();
    for node in &nodes {
        agents.push((node.name.clone(), AgentProcess::start(&node.ns, &node.name, dir.path(), &[])?));
    }
    for (name, agent) in &mut agents {
        agent.wait_ready(Duration::from_secs(15)).map_err(|e| format!("agent on {name}: {e}"))?;
    }

    let mut policies: BTreeMap<ObjectKey, String> = BTreeMap::new();
    // Connections kept across steps (`open`, `reuse`).
    let mut kept: BTreeMap<String, (std::net::TcpStream, crate::case::Connection)> = BTreeMap::new();
    let mut outcome = CaseOutcome { name: case.name.clone(), probes: Vec::new(), errors: Vec::new() };
    for (si, step) in case.steps.iter().enumerate() {
        for (new, old) in &step.take_over {
            take_over(&nodes, outside.as_ref(), dir.path(), family, &mut pods, &mut all_specs, new, old)?;
        }
        let specs = &all_specs;
        for manifest in step.apply.iter().chain(&step.update) {
            let mut v = manifest.clone();
            expand_placeholders(&mut v, &specs, opts.families.primary()).map_err(|e| e.to_string())?;
            let key = policy_key(&v)?;
            let file =
                if is_cluster_policy(&v) { format!("cnp-{}.yaml", key.name) } else { format!("np-{}-{}.yaml", key.namespace, key.name) };
            write(dir.path(), &file, &v)?;
            policies.insert(key, file);
        }
        for d in &step.delete {
            if let Some(file) = delete_key(d).and_then(|k| policies.remove(&k)) {
                let _ = std::fs::remove_file(dir.path().join(file));
            }
        }
        for (ns, changes) in &step.label_namespace {
            let labels = ns_labels.entry(ns.clone()).or_default();
            for (k, v) in changes {
                match v {
                    Some(v) => labels.insert(k.clone(), v.clone()),
                    None => labels.remove(k),
                };
            }
            write(dir.path(), &format!("ns-{ns}.yaml"), &namespace_manifest(ns, labels))?;
        }
        for (pod, changes) in &step.label_pod {
            let p = pods.get_mut(pod).ok_or(format!("labelPod: no pod {pod}"))?;
            for (k, v) in changes {
                match v {
                    Some(v) => p.spec.labels.insert(k.clone(), v.clone()),
                    None => p.spec.labels.remove(k),
                };
            }
            write(dir.path(), &format!("pod-{}-{}.yaml", p.spec.namespace, p.spec.name), &p.spec.manifest())?;
        }
        for spec in &step.probes {
            let expected = Reachability::parse(&spec.expect).map_err(|e| e.to_string())?;
            let probe = Probe { port: spec.port, protocol: spec.protocol };
            // The addresses behind each column: a pod's (its Service's, or its NodePort on
            // its node, from outside), or every node's. A pod that does not run (its
            // cells are `-`) has none.
            let columns: Vec<Vec<SocketAddr>> = match (spec.from, spec.to) {
                (ProbeSource::Outside, _) => expected
                    .targets
                    .iter()
                    .map(|t| {
                        let Some(to) = pods.get(t) else { return Vec::new() };
                        let home = nodes.iter().position(|n| n.name == to.spec.node).expect("the pod's node");
                        let node_side = Outside::node_side(home, family);
                        vec![match spec.via {
                            Via::NodePort => SocketAddr::new(node_side, node_port(to.index, probe.port)),
                            Via::NodePortLocal => SocketAddr::new(node_side, node_port_local(to.index, probe.port)),
                            Via::LoadBalancer => SocketAddr::new(load_balancer_ip(to.index, family), probe.port),
                        }]
                    })
                    .collect(),
                (_, ProbeTarget::Pods) => expected
                    .targets
                    .iter()
                    .map(|t| {
                        let Some(to) = pods.get(t) else { return Vec::new() };
                        let addr = match opts.probe_to {
                            ProbeTo::Service => to.vip,
                            ProbeTo::Pod => to.spec.ip(family).expect("address of the family"),
                        };
                        vec![SocketAddr::new(addr, probe.port)]
                    })
                    .collect(),
                (_, ProbeTarget::Nodes) => vec![
                    nodes
                        .iter()
                        .filter_map(|n| n.addresses.iter().copied().find(|a| Family::of(*a) == family))
                        .map(|a| SocketAddr::new(a, probe.port))
                        .collect(),
                ],
            };
            // The clients behind each row: a pod, or an outside client (from its address).
            let rows: Vec<Option<(NetnsHandle, Option<IpAddr>)>> = match (spec.from, &outside) {
                (ProbeSource::Outside, Some(o)) => {
                    expected.pods.iter().map(|c| Some((o.ns.handle(), Some(outside_address(c, family).expect("validated rows"))))).collect()
                }
                (ProbeSource::Outside, None) => unreachable!("made when a probe needs it"),
                (ProbeSource::Pods, _) => expected.pods.iter().map(|p| pods.get(p).map(|p| (p.net.ns.handle(), None))).collect(),
            };
            let observed = poll_matrix(&rows, &expected, &columns, probe, opts, case.blocked_must_drop)?;
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
            let from = pods.get(&c.from).ok_or(format!("open {name}: {} does not run", c.from))?;
            let to = pods.get(&c.to).ok_or(format!("open {name}: {} does not run", c.to))?;
            let addr = match opts.probe_to {
                ProbeTo::Service => to.vip,
                ProbeTo::Pod => to.spec.ip(family).expect("address of the family"),
            };
            let stream = open_connection(&from.net.ns.handle(), SocketAddr::new(addr, c.port), opts.deadline)
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

/// Starts pod `index` of the case (`spec`) on its node: its namespace and veth, its
/// servers, kube-proxy's rules for its Service (DNAT in every node, the hairpin
/// masquerade, the NodePort when there is an outside network), and its manifests.
fn start_pod(nodes: &[NodeNet], outside: Option<&Outside>, dir: &Path, family: Family, i: usize, spec: PodSpec) -> Result<LivePod, String> {
    let home = nodes.iter().find(|n| n.name == spec.node).ok_or(format!("pod {} on unknown node {}", spec.key(), spec.node))?;
    let net = home.add_pod(&unique("cfp"), &format!("cf{i}"), &spec.ips).map_err(|e| e.to_string())?;
    let servers = serve(&net.ns, &SERVED_PORTS).map_err(|e| e.to_string())?;
    let vip = vip(family, i);
    let backend = spec.ip(family).ok_or("pod without an address of the probe family")?;
    // kube-proxy's DNAT, port = targetPort, in every node, and its hairpin masquerade
    // (KUBE-SEP marks traffic from the endpoint itself): a pod reaching itself through
    // its Service would otherwise get its own address as source, which it drops.
    for node in nodes {
        for proto in ["tcp", "udp", "sctp"] {
            for port in SERVED_PORTS {
                node.dnat(vip, port, backend, port, proto).map_err(|e| e.to_string())?;
            }
        }
        let tool = if backend.is_ipv4() { "iptables" } else { "ip6tables" };
        let b = backend.to_string();
        node.ns.exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-s", &b, "-d", &b, "-j", "MASQUERADE"]).map_err(|e| e.to_string())?;
    }
    if let Some(outside) = outside {
        let home_index = nodes.iter().position(|n| n.name == spec.node).expect("found above");
        for port in SERVED_PORTS {
            outside.serve_pod(home, home_index, i, backend, port)?;
        }
    }
    write(dir, &format!("pod-{}-{}.yaml", spec.namespace, spec.name), &spec.manifest())?;
    write(dir, &format!("svc-{}-{}.yaml", spec.namespace, spec.name), &service(&spec, i, vip, Some(backend)))?;
    Ok(LivePod { spec, net, _servers: servers, vip, index: i })
}

/// A step's `takeOver`: pod `old` completes (phase Succeeded; its sandbox goes, and the
/// endpoint controller drops it from its Service), then pod `new` starts on its node
/// with its addresses.
fn take_over(
    nodes: &[NodeNet],
    outside: Option<&Outside>,
    dir: &Path,
    family: Family,
    pods: &mut BTreeMap<String, LivePod>,
    all_specs: &mut [PodSpec],
    new: &str,
    old: &str,
) -> Result<(), String> {
    let gone = pods.remove(old).ok_or(format!("takeOver: pod {old} does not run"))?;
    let home = nodes.iter().find(|n| n.name == gone.spec.node).ok_or("takeOver: unknown node")?;
    // The veth first, at once (a namespace's deletion finishes later), so the addresses
    // are free for the new pod's routes.
    home.ns.ip(&["link", "del", &gone.net.host_veth]).map_err(|e| e.to_string())?;
    write(dir, &format!("pod-{}-{}.yaml", gone.spec.namespace, gone.spec.name), &gone.spec.manifest_in_phase("Succeeded"))?;
    write(dir, &format!("svc-{}-{}.yaml", gone.spec.namespace, gone.spec.name), &service(&gone.spec, gone.index, gone.vip, None))?;
    let index = all_specs.iter().position(|p| p.key() == new).ok_or(format!("takeOver: no pod {new}"))?;
    all_specs[index].ips = gone.spec.ips.clone();
    all_specs[index].node = gone.spec.node.clone();
    drop(gone);
    let live = start_pod(nodes, outside, dir, family, index, all_specs[index].clone())?;
    pods.insert(new.to_string(), live);
    Ok(())
}

fn service(spec: &PodSpec, index: usize, vip: IpAddr, backend: Option<IpAddr>) -> Value {
    let mut ports = Vec::new();
    for proto in PROTOCOLS {
        for port in SERVED_PORTS {
            ports.push(json!({"name": format!("service-port-{}-{port}", proto.to_lowercase()), "port": port, "targetPort": port, "protocol": proto, "nodePort": node_port(index, port)}));
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s-{}-{}", spec.namespace, spec.name), "namespace": spec.namespace},
         "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()], "selector": {"pod": spec.name}, "ports": ports},
         "status": {"loadBalancer": {"ingress": [{"ip": load_balancer_ip(index, Family::of(vip)).to_string()}]}}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": format!("s-{}-{}-1", spec.namespace, spec.name), "namespace": spec.namespace, "labels": {"kubernetes.io/service-name": format!("s-{}-{}", spec.namespace, spec.name)}},
         "addressType": if vip.is_ipv4() { "IPv4" } else { "IPv6" }, "endpoints": backend.map(|b| vec![json!({"addresses": [b.to_string()]})]).unwrap_or_default()}]})
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
/// match or the deadline passes. `rows[i]` is row `i`'s client (its namespace, and the
/// source address it binds, if any: TCP only); `columns[j]` holds the addresses column `j`
/// stands for: a cell is observed as expected only when every one of them behaves so.
fn poll_matrix(
    rows: &[Option<(NetnsHandle, Option<IpAddr>)>],
    expected: &Reachability,
    columns: &[Vec<SocketAddr>],
    probe: Probe,
    opts: RunOptions,
    must_drop: bool,
) -> Result<Reachability, String> {
    let (n, m) = (expected.pods.len(), expected.targets.len());
    if columns.len() != m || rows.len() != n {
        return Err(format!("{} column(s) of addresses for {m} target(s)", columns.len()));
    }
    let mut observed = Reachability::unchecked(expected.pods.clone(), expected.targets.clone());
    let mut pending: Vec<(usize, usize)> =
        (0..n).flat_map(|i| (0..m).map(move |j| (i, j))).filter(|&(i, j)| expected.cells[i][j] != Expect::Unchecked).collect();
    // A checked cell needs a client and an address to probe (a pod that does not run has
    // only `-` cells: the case's validation sees to it).
    if let Some(&(i, j)) = pending.iter().find(|&&(i, j)| rows[i].is_none() || columns[j].is_empty()) {
        return Err(format!("{} -> {}: no running pod to probe", expected.pods[i], expected.targets[j]));
    }
    let deadline = Instant::now() + opts.deadline;
    loop {
        let handles: Vec<_> = pending
            .iter()
            .flat_map(|&(i, j)| columns[j].iter().map(move |&dst| (i, j, dst)))
            .map(|(i, j, dst)| {
                let (ns, src) = rows[i].clone().expect("checked above");
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

fn tempfile_dir() -> Result<TempDir, String> {
    let p = std::env::temp_dir().join(unique("conformance-"));
    std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
    Ok(TempDir(p))
}
