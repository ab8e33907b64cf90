//! The agent end to end: `policy-agent run --manifests` in an emulated node's namespace,
//! real traffic between pods, and the manifests changing under it. After each change the
//! probes must show what the model (`policy-agent matrix` over the same files) says.
//! Needs root and BPF; fails, never skips, without them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use conformance::agent_process::AgentProcess;
use conformance::cluster::{Families, PodSpec, namespace_manifest, pod_address};
use conformance::netns::unique;
use conformance::topology::{NodeNet, PodNet, Topology};
use conformance::traffic::{Servers, probe, serve};
use policy_agent::manifests::Manifests;
use policy_agent::matrix::{Probe, compute};
use policy_model::{Family, Protocol};
use serde_json::json;

const NODE: &str = "node-1";

struct Cluster {
    node: NodeNet,
    pods: BTreeMap<String, (PodSpec, PodNet, Servers)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_topology(Topology::Routed)
    }

    fn with_topology(topology: Topology) -> Cluster {
        let node =
            NodeNet::create_with(&unique("pen"), NODE, &["10.250.0.1".parse().unwrap(), "fd10:250::1".parse().unwrap()], topology, 0)
                .expect("node (root needed)");
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster { node, pods: BTreeMap::new(), dir };
        for ns in ["x", "y"] {
            c.write(&format!("ns-{ns}.yaml"), namespace_manifest(ns, &BTreeMap::new()));
        }
        c.write(
            "node.yaml",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}, {"type": "InternalIP", "address": "fd10:250::1"}]}}),
        );
        for (i, key) in ["x/a", "x/b", "y/a"].iter().enumerate() {
            c.add_pod(key, i);
        }
        c
    }

    fn write(&self, name: &str, v: serde_json::Value) {
        std::fs::write(self.dir.path().join(name), serde_yaml_ng::to_string(&v).unwrap()).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }

    /// Network first (as the CNI does), then the manifest (as the API reports the pod).
    fn add_pod(&mut self, key: &str, index: usize) {
        self.add_pod_network(key, index);
        self.write_pod(key);
    }

    fn relabel_pod(&mut self, key: &str, labels: &[(&str, &str)]) {
        let (spec, _, _) = self.pods.get_mut(key).unwrap();
        spec.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let m = spec.manifest();
        let (ns, name) = key.split_once('/').unwrap();
        self.write(&format!("pod-{ns}-{name}.yaml"), m);
    }

    /// Probes every ordered pair over TCP 80 (IPv4 and IPv6) until they all show what the
    /// model says of the manifests, or the deadline passes.
    fn converge(&self, what: &str) {
        let (state, errors) = Manifests::read_dir(self.dir.path()).unwrap().state();
        assert!(errors.is_empty(), "{errors:?}");
        let probe_spec = Probe { port: 80, protocol: Protocol::Tcp };
        let m = compute(&state, &[probe_spec], None);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut wrong = Vec::new();
            for (from, (_, from_net, _)) in &self.pods {
                for (to, (to_spec, _, _)) in &self.pods {
                    if from == to {
                        continue;
                    }
                    for (fi, family) in [(0usize, "ipv4"), (1, "ipv6")] {
                        let want =
                            m.results.iter().find(|c| &c.from == from && &c.to == to && c.family.as_str() == family).expect("cell").allowed;
                        let got =
                            probe(&from_net.ns, Protocol::Tcp, SocketAddr::new(to_spec.ips[fi], 80), Duration::from_millis(300)).unwrap();
                        if got != want {
                            wrong.push(format!("{from} -> {to} {family}: model says {}, traffic {}", want, got));
                        }
                    }
                }
            }
            if wrong.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: the datapath does not match the model:\n{}", wrong.join("\n"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn policy(name: &str, ns: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn dump(agent: &AgentProcess, extra: &[&str]) -> String {
    let out = std::process::Command::new(conformance::agent_process::agent_binary().unwrap())
        .arg("dump")
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn agent_follows_manifest_changes() {
    let _ = Families::Dual;
    let mut c = Cluster::new();
    let mut agent = AgentProcess::start(&c.node.ns, NODE, c.dir.path(), &[]).expect("agent");
    agent.wait_ready(Duration::from_secs(10)).unwrap();
    c.converge("no policies");

    // A policy is added: x/a admits only pods labelled role=client.
    c.write(
        "np-a.yaml",
        policy(
            "a-from-clients",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}),
        ),
    );
    c.converge("policy added");

    // A pod's labels change: x/b becomes a client.
    c.relabel_pod("x/b", &[("pod", "b"), ("role", "client")]);
    c.converge("pod label changed");

    // A namespace's labels change, and a policy selects by them.
    c.write(
        "np-b.yaml",
        policy(
            "b-from-trusted",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"trust": "yes"}}}]}]}),
        ),
    );
    c.converge("second policy added");
    c.write("ns-y.yaml", namespace_manifest("y", &[("trust".to_string(), "yes".to_string())].into()));
    c.converge("namespace label changed");

    // A policy is deleted.
    c.remove("np-a.yaml");
    c.converge("policy deleted");

    // A new pod that a policy selects.
    c.write("np-c.yaml", policy("c-deny", "y", json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"]})));
    c.add_pod("y/c", 3);
    c.converge("new selected pod");

    let text = dump(&agent, &[]);
    for pod in ["x/a", "x/b", "y/a", "y/c"] {
        assert!(text.contains(pod), "dump lists {pod}:\n{text}");
    }
    assert!(text.contains("isolated by x/b-from-trusted") && text.contains("pod y/c"), "dump shows the tables:\n{text}");
    let json: serde_json::Value = serde_json::from_str(&dump(&agent, &["-o", "json", "--pod", "y/c"])).unwrap();
    assert_eq!(json["endpoints"][0]["pod"], "y/c");
    assert_eq!(json["endpoints"][0]["ingress"]["isolated"], true);
    assert!(json["endpoints"][0]["kernel_revision"].as_u64().is_some());

    // The agent goes away: what it enforced stays enforced.
    agent.stop();
    c.converge("agent stopped");
    assert!(!agent.log_text().contains("ERROR"), "{}", agent.log_text());
}

/// A rule with 15,000 ports makes a cell wider than any format width (std panics above
/// 65,535): `dump` cuts it with a marker, `-o json` keeps it whole, and a reader that goes
/// away (`dump | head`) ends the output quietly. The agent's log (a file) has no colour.
#[test]
fn dump_survives_wide_cells_and_a_closed_pipe() {
    let c = Cluster::new();
    let mut agent = AgentProcess::start(&c.node.ns, NODE, c.dir.path(), &[]).expect("agent");
    agent.wait_ready(Duration::from_secs(10)).unwrap();
    let ports: Vec<serde_json::Value> = (0..15_000).map(|i| json!({"port": 1000 + 2 * i})).collect();
    c.write(
        "np-wide.yaml",
        policy(
            "wide",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"ports": ports}]}),
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = dump(&agent, &[]);
        if text.contains("isolated by x/wide") {
            break text;
        }
        assert!(Instant::now() < deadline, "the wide policy was not enforced:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(text.contains("chars, -o json for all]"), "the wide cell is cut with a marker:\n{}", &text[..text.len().min(4000)]);
    assert!(text.lines().all(|l| l.chars().count() < 400), "no line is wider than the capped columns");
    let json: serde_json::Value = serde_json::from_str(&dump(&agent, &["-o", "json", "--pod", "x/a"])).unwrap();
    let allows: Vec<String> =
        json["endpoints"][0]["ingress"]["entries"].as_array().unwrap().iter().map(|e| e["allows"].as_str().unwrap().to_string()).collect();
    assert!(allows.iter().any(|a| a.contains("30998")), "-o json keeps the whole cell");

    // `dump -o json | head -1`: the reader closes the pipe after one line, long before the
    // output (the 15,000 ports: more than a pipe's 64 KiB buffer) is written.
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(conformance::agent_process::agent_binary().unwrap())
        .args(["dump", "-o", "json", "--pin-dir"])
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with('{'), "{first}");
    assert!(out.status.success() && !stderr.contains("panicked"), "dump | head: {:?} {stderr}", out.status);
    assert!(!agent.log_text().contains('\u{1b}'), "the log file has no ANSI colour codes");
}

#[test]
fn metrics_and_health() {
    let c = Cluster::new();
    let mut agent = AgentProcess::start(&c.node.ns, NODE, c.dir.path(), &["--metrics-addr", "127.0.0.1:9464"]).expect("agent");
    agent.wait_ready(Duration::from_secs(10)).unwrap();
    c.write("np.yaml", policy("deny-b", "x", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]})));
    c.converge("policy");
    let get = |path: &'static str| -> String {
        c.node
            .ns
            .run(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect("127.0.0.1:9464").unwrap();
                write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
            .unwrap()
    };
    assert!(get("/healthz").starts_with("HTTP/1.0 200"));
    assert!(get("/readyz").starts_with("HTTP/1.0 200"));
    std::thread::sleep(Duration::from_millis(1200));
    let m = get("/metrics");
    assert!(m.contains("policy_agent_packets_total{pod=\"x/b\",direction=\"ingress\",verdict=\"denied\"}"), "{m}");
    assert!(m.contains("policy_agent_reconcile_duration_seconds_count"), "{m}");
    assert!(m.contains("policy_agent_endpoints 3"), "{m}");
    let _ = Path::new("");
}

/// The agent learns Service addresses from Service and EndpointSlice manifests (no
/// --service-cidr): an egress rule naming the backend pod and its targetPort allows the
/// connection to the ClusterIP, because the judgment waits for DNAT.
#[test]
fn services_from_manifests_are_judged_after_dnat() {
    let c = Cluster::new();
    let b4 = c.pods["x/b"].0.ips[0];
    c.node
        .ns
        .exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                "10.96.0.10",
                "-p",
                "tcp",
                "--dport",
                "8080",
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{b4}:80"),
            ],
        )
        .unwrap();
    c.write(
        "np.yaml",
        policy(
            "a-to-b",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
        ),
    );
    let mut agent = AgentProcess::start(&c.node.ns, NODE, c.dir.path(), &[]).expect("agent");
    agent.wait_ready(Duration::from_secs(10)).unwrap();
    let vip: SocketAddr = "10.96.0.10:8080".parse().unwrap();
    let a = &c.pods["x/a"].1.ns;
    let probe_vip = || probe(a, Protocol::Tcp, vip, Duration::from_millis(300)).unwrap();
    // Not yet a known Service: judged before DNAT against 10.96.0.10 itself, not pod b.
    c.converge("policy");
    assert!(!probe_vip(), "without the Service, the ClusterIP is just an address the policy does not allow");
    c.write("svc.yaml", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s-x-b", "namespace": "x"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"pod": "b"}, "ports": [{"port": 8080, "targetPort": 80}]}}));
    c.write(
        "eps.yaml",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "s-x-b-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "s-x-b"}},
        "addressType": "IPv4", "endpoints": [{"addresses": [b4.to_string()]}], "ports": [{"port": 80, "protocol": "TCP"}]}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe_vip() {
        assert!(Instant::now() < deadline, "the ClusterIP of a pod-backed Service is judged on the backend:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// The network of a pod (as the CNI makes it), without telling the agent anything.
    fn add_pod_network(&mut self, key: &str, index: usize) {
        let (ns, name) = key.split_once('/').unwrap();
        let ips = vec![pod_address(Family::Ipv4, 0, index), pod_address(Family::Ipv6, 0, index)];
        let net = self.node.add_pod(&unique("pep"), &format!("pe{index}"), &ips).unwrap();
        let servers = serve(&net.ns, &[80, 81]).unwrap();
        let spec = PodSpec {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            node: NODE.into(),
            ips,
        };
        self.pods.insert(key.to_string(), (spec, net, servers));
    }

    /// The pod's manifest as the API shows it before its sandbox has an address.
    fn write_scheduled(&self, key: &str, index: usize) {
        let (ns, name) = key.split_once('/').unwrap();
        let spec = PodSpec {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            node: NODE.into(),
            ips: vec![],
        };
        let _ = index;
        self.write(&format!("pod-{ns}-{name}.yaml"), spec.manifest());
    }

    fn write_pod(&self, key: &str) {
        let (ns, name) = key.split_once('/').unwrap();
        self.write(&format!("pod-{ns}-{name}.yaml"), self.pods[key].0.manifest());
    }

    fn tcp(&self, from: &str, to: &str) -> bool {
        probe(&self.pods[from].1.ns, Protocol::Tcp, SocketAddr::new(self.pods[to].0.ips[0], 80), Duration::from_millis(300)).unwrap()
    }
}

/// A new pod that a policy selects: its veth is held fail-closed from the moment it
/// appears until the agent knows the pod; then its policy applies. A pod no policy selects
/// is not delayed.
#[test]
fn new_selected_pods_are_held_until_known() {
    held_until_known(Topology::Routed);
}

/// The same behind a bridge: the agent finds each pod's veth through the neighbour table
/// and the bridge's forwarding database.
#[test]
fn new_selected_pods_are_held_until_known_bridged() {
    held_until_known(Topology::Bridge);
}

fn held_until_known(topology: Topology) {
    let mut c = Cluster::with_topology(topology);
    let mut agent = AgentProcess::start(&c.node.ns, NODE, c.dir.path(), &[]).expect("agent");
    agent.wait_ready(Duration::from_secs(10)).unwrap();
    c.write(
        "np.yaml",
        policy(
            "c-from-a",
            "y",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    );
    // Scheduled to this node, no address yet; then the CNI makes its network.
    c.write_scheduled("y/c", 3);
    std::thread::sleep(Duration::from_millis(300));
    c.add_pod_network("y/c", 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log_text().contains("holding a new interface") {
        assert!(Instant::now() < deadline, "the new veth was not held:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Held: nothing passes, not even what its policy will allow, nor its own egress.
    assert!(!c.tcp("x/a", "y/c"), "held: x/a is blocked until the pod is known");
    assert!(!c.tcp("y/a", "y/c"));
    assert!(!c.tcp("y/c", "x/b"), "held: egress too");
    // The API reports the address: the pod is known, its policy applies.
    c.write_pod("y/c");
    c.converge("pod known");
    assert!(c.tcp("x/a", "y/c") && c.tcp("y/a", "y/c") && !c.tcp("x/b", "y/c") && c.tcp("y/c", "x/b"));

    // A pod no policy selects is not held: it talks before the agent even knows it.
    c.write_scheduled("x/d", 4);
    std::thread::sleep(Duration::from_millis(300));
    c.add_pod_network("x/d", 4);
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.tcp("x/d", "x/a") && c.tcp("x/a", "x/d"), "an unselected new pod is not delayed");
    c.write_pod("x/d");
    c.converge("all known");
}
