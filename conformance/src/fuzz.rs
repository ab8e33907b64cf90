//! `conformance fuzz`: random cases in the cyclonus generator families (targets, peers,
//! ports and protocols, ipBlock with except, named ports, endPort, policy and label
//! changes over steps), with expectations from policy-model's reference evaluator
//! ([`policy_model::verdict`]) over the same expanded manifests the runner writes.
//!
//! A case is a pure function of (seed, index, families): ChaCha8 is a fixed algorithm and
//! every draw below goes through `next_u64`, so a seed gives the same cases on every
//! machine and with every `rand` release.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use policy_model::{ClusterState, Family, Flow, IpProtocol, Prefix, Protocol, verdict};
use rand::rngs::ChaCha8Rng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use crate::case::{Case, DEFAULT_PODS, Expect, ProbeSpec, ProbeTarget, Reachability, Step};
use crate::cluster::{Families, NAMESPACES, PodSpec, SERVED_PORTS, make_pods};
use crate::model::{CaseOutcome, ModelCluster};
use crate::runner::RunOptions;

/// Pod labels selectors use and label changes set: `pod` is the upstream one.
const POD_LABELS: [(&str, &[&str]); 3] = [("pod", &["a", "b", "c"]), ("app", &["web", "db"]), ("tier", &["1", "2"])];
/// Namespace labels: the immutable default label (selected, never changed) and two more.
const NS_LABELS: [(&str, &[&str]); 3] =
    [("kubernetes.io/metadata.name", &["x", "y", "z"]), ("team", &["red", "blue"]), ("env", &["prod", "dev"])];
const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];
/// IPv4 prefix lengths for ipBlocks around a pod (IPv6 ones are these + 96 from /24 on,
/// so that they cover the same pods: pods sit at .10–.18 and ::a–::12).
const BLOCK_LENGTHS: [u8; 9] = [0, 8, 16, 24, 28, 29, 30, 31, 32];
const EXCEPT_LENGTHS: [u8; 6] = [24, 28, 29, 30, 31, 32];
/// Blocks that hold no pod of the probe family (another family, outside the cluster, or
/// the IPv4-mapped block no pod address is in).
const FOREIGN_BLOCKS: [&str; 5] = ["192.0.2.0/24", "2001:db8::/64", "0.0.0.0/0", "::/0", "::ffff:0:0/96"];
/// Numbered ports: the served 80 and 81 and two neighbours nothing serves.
const NUMBERED_PORTS: [u16; 6] = [80, 81, 80, 81, 79, 82];
/// endPort ranges: cyclonus's 53–80 and 53–84, and ranges that start or end at 80 or 81
/// (edges of the range-to-prefix split) or miss both.
const PORT_RANGES: [(u16, u16); 12] =
    [(53, 80), (53, 84), (80, 81), (81, 84), (79, 80), (81, 81), (82, 90), (1, 80), (81, 65535), (64, 80), (80, 95), (72, 79)];
const PROTOCOL_NAMES: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// The name a generated case carries.
pub fn case_name(seed: u64, index: u64, families: Families) -> String {
    format!("fuzz-{}-s{seed}-{index}", family_word(families))
}

pub fn family_word(families: Families) -> &'static str {
    match families {
        Families::Ipv4 => "ipv4",
        Families::Ipv6 => "ipv6",
        Families::Dual => "dual",
    }
}

/// What `conformance fuzz` runs.
#[derive(Debug, Clone)]
pub struct FuzzRun {
    pub seed: u64,
    pub indices: Range<u64>,
    /// Where failing cases (all cases with `emit`) are written.
    pub out: PathBuf,
    /// Write the cases without running them.
    pub emit: bool,
    /// Mix ClusterNetworkPolicies (both tiers, every action and peer kind) into the cases.
    pub cluster_policies: bool,
}

/// Generates and runs the cases with `run` (the real-traffic runner, or the model-level
/// one in tests), printing PASS/FAIL per case like `conformance run`; each failing case
/// is written to `out` as a case file that `conformance run` reproduces. Returns
/// (passed, failed).
pub fn run_fuzz(fuzz: &FuzzRun, opts: RunOptions, mut run: impl FnMut(&Case, RunOptions) -> Result<CaseOutcome, String>) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for index in fuzz.indices.clone() {
        let case = generate_with(fuzz.seed, index, opts.families, opts.nodes, fuzz.cluster_policies);
        if fuzz.emit {
            match write_case(&fuzz.out, fuzz.seed, index, opts, &case, "") {
                Ok(path) => println!("wrote {}", path.display()),
                Err(e) => println!("cannot write case {}: {e}", case.name),
            }
            continue;
        }
        let report = match run(&case, opts) {
            Ok(o) if o.passed() => {
                println!("PASS {}", case.name);
                passed += 1;
                continue;
            }
            Ok(o) => o.report(),
            Err(e) => format!("  setup: {e}\n"),
        };
        failed += 1;
        let written = match write_case(&fuzz.out, fuzz.seed, index, opts, &case, &report) {
            Ok(path) => format!("case file: {}", path.display()),
            Err(e) => format!("cannot write the case file: {e}"),
        };
        println!("FAIL {} (seed {}, case {index}; {written})\n{report}", case.name, fuzz.seed);
    }
    (passed, failed)
}

/// Writes `case` as `<out>/<name>.yaml`, headed by how to regenerate and rerun it and by
/// the failure `report` (as comments).
/// The expectations hold for the pods' addresses in `opts`'s layout (node count), so the
/// rerun line names it.
pub fn write_case(out: &Path, seed: u64, index: u64, opts: RunOptions, case: &Case, report: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{}.yaml", case.name));
    let family = family_word(opts.families);
    let topology = match opts.topology {
        crate::topology::Topology::Routed => "routed",
        crate::topology::Topology::Bridge => "bridge",
        crate::topology::Topology::ProxyArp => "proxy-arp",
    };
    let mut layout = format!("--family {family} --topology {topology} --nodes {}", opts.nodes);
    if case.name.starts_with("fuzz-cnp-") {
        layout.push_str(" --cluster-policies");
    }
    let mut text = format!(
        "# conformance fuzz --seed {seed} --start {index} --cases 1 {layout}\n# rerun: conformance run {layout} {}\n",
        path.display()
    );
    for line in report.lines() {
        text.push_str(&format!("#{line}\n"));
    }
    text.push_str(&case.to_yaml());
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Case `index` of seed `seed`, with its expectations filled in, for pods on one node.
pub fn generate(seed: u64, index: u64, families: Families) -> Case {
    generate_for(seed, index, families, 1)
}

/// Case `index` of seed `seed` for pods spread over `nodes` nodes: the pods' addresses
/// depend on the layout, and so do the ipBlocks drawn around them and the expectations.
pub fn generate_for(seed: u64, index: u64, families: Families, nodes: usize) -> Case {
    generate_with(seed, index, families, nodes, false)
}

/// As [`generate_for`]; with `cluster_policies`, the steps also create, replace and
/// delete ClusterNetworkPolicies (a separate family of cases: `fuzz-cnp-...`; the
/// NetworkPolicy-only cases of a seed stay what they were).
pub fn generate_with(seed: u64, index: u64, families: Families, nodes: usize, cluster_policies: bool) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // One ChaCha stream per case: case i is the same however many cases run before it.
    rng.set_stream(index);
    let names: Vec<String> = DEFAULT_PODS.iter().map(|s| s.to_string()).collect();
    let mut g = Generator {
        rng,
        family: families.primary(),
        pods: make_pods(&names, families, nodes),
        live: BTreeSet::new(),
        next_policy: 0,
        cluster_policies,
        live_cluster: BTreeSet::new(),
    };
    let steps = (0..1 + g.below(3)).map(|i| g.step(i == 0)).collect();
    let name = case_name(seed, index, families);
    let name = if cluster_policies { name.replacen("fuzz-", "fuzz-cnp-", 1) } else { name };
    let mut case = Case {
        name,
        pods: None,
        blocked_must_drop: false,
        later: Vec::new(),
        later_namespaces: Vec::new(),
        container_ports: BTreeMap::new(),
        services: BTreeMap::new(),
        steps,
    };
    fill_expectations(&mut case, families, nodes).unwrap_or_else(|e| panic!("generated case {} is inconsistent: {e}", case.name));
    case
}

/// Replays the case's steps on the model cluster and writes each probe's expectation as
/// the reference evaluator judges it; self pairs are left unchecked, as upstream does.
pub fn fill_expectations(case: &mut Case, families: Families, nodes: usize) -> Result<(), String> {
    let names = case.pod_names();
    let mut cluster = ModelCluster::with_nodes(&names, families, nodes);
    for (si, step) in case.steps.iter_mut().enumerate() {
        let mut errors = cluster.apply_step(step);
        let (state, manifest_errors) = cluster.manifests().state();
        errors.extend(manifest_errors.iter().map(ToString::to_string));
        if !errors.is_empty() {
            return Err(format!("step {}: {}", si + 1, errors.join("; ")));
        }
        for probe in &mut step.probes {
            let r = reference_matrix(&state, &cluster.pods, probe.port, probe.protocol, families.probe_family());
            // Trailing blanks would make the YAML a quoted one-line string.
            probe.expect = r.render().iter().map(|l| format!("{}\n", l.trim_end())).collect();
        }
    }
    Ok(())
}

/// Every ordered pair of `pods` judged by [`verdict`] for one port and protocol in `family`.
pub fn reference_matrix(state: &ClusterState, pods: &[PodSpec], port: u16, protocol: Protocol, family: Family) -> Reachability {
    let cells = pods
        .iter()
        .map(|from| {
            pods.iter()
                .map(|to| {
                    if from.key() == to.key() {
                        return Expect::Unchecked;
                    }
                    let (Some(src), Some(dst)) = (from.ip(family), to.ip(family)) else {
                        return Expect::Unchecked;
                    };
                    let flow = Flow { src, dst, protocol: IpProtocol::from(protocol), port };
                    if verdict(state, &flow).allowed { Expect::Connected } else { Expect::Blocked }
                })
                .collect()
        })
        .collect();
    let keys: Vec<String> = pods.iter().map(PodSpec::key).collect();
    Reachability { pods: keys.clone(), targets: keys, cells }
}

struct Generator {
    rng: ChaCha8Rng,
    /// The family `${..}` placeholders expand to.
    family: Family,
    pods: Vec<PodSpec>,
    /// Policies that exist after the steps generated so far: (namespace, name).
    live: BTreeSet<(String, String)>,
    next_policy: usize,
    /// Whether steps also draw ClusterNetworkPolicy actions.
    cluster_policies: bool,
    /// ClusterNetworkPolicies that exist after the steps generated so far: (name, number).
    live_cluster: BTreeSet<(String, usize)>,
}

#[derive(Clone, Copy)]
enum Direction {
    Ingress,
    Egress,
}

impl Generator {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.next_u64() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// An index into `weights`, drawn in proportion to them.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut r = self.rng.next_u64() % weights.iter().sum::<u64>();
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        unreachable!("r < sum of weights")
    }

    fn step(&mut self, first: bool) -> Step {
        let mut step = Step::default();
        // Policies this step already creates, replaces or deletes: one action each, since
        // the runner applies, then updates, then deletes.
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        if first {
            // Pods start with `pod=<name>` only: give some of them the other labels, so
            // that selectors on those select something from the start.
            for _ in 0..self.below(5) {
                let i = self.below(self.pods.len());
                let pod = self.pods[i].key();
                let (key, values) = self.pick(&POD_LABELS[1..]);
                let value = self.pick(values).to_string();
                step.label_pod.entry(pod).or_default().insert(key.to_string(), Some(value));
            }
            for _ in 0..self.below(3) {
                let ns = self.pick(&NAMESPACES).to_string();
                let (key, values) = self.pick(&NS_LABELS[1..]);
                let value = self.pick(values).to_string();
                step.label_namespace.entry(ns).or_default().insert(key.to_string(), Some(value));
            }
        }
        let mut touched_cluster: BTreeSet<String> = BTreeSet::new();
        for _ in 0..1 + self.below(3) {
            // apply, update, delete, label a namespace, label a pod; then (with cluster
            // policies) apply, update and delete a ClusterNetworkPolicy
            let weights: &[u64] = match (first, self.cluster_policies) {
                (true, false) => &[80, 0, 0, 10, 10],
                (false, false) => &[30, 20, 15, 15, 20],
                (true, true) => &[40, 0, 0, 10, 10, 40, 0, 0],
                (false, true) => &[15, 10, 10, 15, 15, 15, 12, 8],
            };
            let mut action = self.weighted(weights);
            if action >= 5 {
                self.cluster_action(action - 5, &mut step, &mut touched_cluster);
                continue;
            }
            let existing: Vec<(String, String)> = self.live.difference(&touched).cloned().collect();
            if (action == 1 || action == 2) && existing.is_empty() {
                action = 0;
            }
            match action {
                0 => {
                    let ns = self.pick(&NAMESPACES).to_string();
                    let name = format!("p{}", self.next_policy);
                    self.next_policy += 1;
                    step.apply.push(self.policy(&ns, &name));
                    self.live.insert((ns.clone(), name.clone()));
                    touched.insert((ns, name));
                }
                1 => {
                    let (ns, name) = existing[self.below(existing.len())].clone();
                    step.update.push(self.policy(&ns, &name));
                    touched.insert((ns, name));
                }
                2 => {
                    let (ns, name) = existing[self.below(existing.len())].clone();
                    step.delete.push(format!("{ns}/{name}"));
                    self.live.remove(&(ns.clone(), name.clone()));
                    touched.insert((ns, name));
                }
                3 => {
                    let ns = self.pick(&NAMESPACES).to_string();
                    let changes = self.label_changes(&NS_LABELS[1..], 25);
                    step.label_namespace.entry(ns).or_default().extend(changes);
                }
                _ => {
                    let i = self.below(self.pods.len());
                    let pod = self.pods[i].key();
                    let changes = self.label_changes(&POD_LABELS, 30);
                    step.label_pod.entry(pod).or_default().extend(changes);
                }
            }
        }
        let mut probes: Vec<(u16, Protocol)> = Vec::new();
        for _ in 0..1 + self.below(2) {
            let p = (self.pick(&SERVED_PORTS), self.pick(&Protocol::ALL));
            if !probes.contains(&p) {
                probes.push(p);
            }
        }
        step.probes = probes
            .into_iter()
            .map(|(port, protocol)| ProbeSpec {
                port,
                protocol,
                from: crate::case::ProbeSource::Pods,
                via: crate::case::Via::NodePort,
                to: ProbeTarget::Pods,
                expect: String::new(),
            })
            .collect();
        step
    }

    /// 0: a new ClusterNetworkPolicy; 1: one replaced; 2: one deleted (a new one when
    /// none is left that this step has not touched).
    fn cluster_action(&mut self, action: usize, step: &mut Step, touched: &mut BTreeSet<String>) {
        let existing: Vec<(String, usize)> = self.live_cluster.iter().filter(|(n, _)| !touched.contains(n)).cloned().collect();
        let action = if existing.is_empty() { 0 } else { action };
        match action {
            0 => {
                let number = self.next_policy;
                self.next_policy += 1;
                let name = format!("c{number}");
                step.apply.push(self.cluster_policy(&name, number));
                self.live_cluster.insert((name.clone(), number));
                touched.insert(name);
            }
            1 => {
                let (name, number) = existing[self.below(existing.len())].clone();
                step.update.push(self.cluster_policy(&name, number));
                touched.insert(name);
            }
            _ => {
                let (name, number) = existing[self.below(existing.len())].clone();
                step.delete.push(name.clone());
                self.live_cluster.remove(&(name.clone(), number));
                touched.insert(name);
            }
        }
    }

    /// A ClusterNetworkPolicy: either tier; a priority of its own (upstream leaves the
    /// order of equal priorities to the implementation, so no two policies share one; an
    /// update may move it within its band); a namespace or pod subject; Accept, Deny and
    /// Pass rules over namespace, pod and (egress) network peers, with or without ports.
    fn cluster_policy(&mut self, name: &str, number: usize) -> Value {
        let tier = if self.chance(50) { "Admin" } else { "Baseline" };
        let priority = (number * 7 + self.below(7)) % 1001;
        let subject = if self.chance(50) {
            json!({"namespaces": self.broad_selector(&NS_LABELS, 50)})
        } else {
            json!({"pods": {"namespaceSelector": self.broad_selector(&NS_LABELS, 50), "podSelector": self.broad_selector(&POD_LABELS, 60)}})
        };
        let mut spec = Map::new();
        spec.insert("tier".into(), json!(tier));
        spec.insert("priority".into(), json!(priority));
        spec.insert("subject".into(), subject);
        let (ingress, egress) = match self.weighted(&[30, 30, 40]) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        if ingress {
            let rules: Vec<Value> = (0..1 + self.below(3)).map(|i| self.cluster_rule(Direction::Ingress, i)).collect();
            spec.insert("ingress".into(), Value::Array(rules));
        }
        if egress {
            let rules: Vec<Value> = (0..1 + self.below(3)).map(|i| self.cluster_rule(Direction::Egress, i)).collect();
            spec.insert("egress".into(), Value::Array(rules));
        }
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": spec,
        })
    }

    fn cluster_rule(&mut self, direction: Direction, index: usize) -> Value {
        let action = ["Accept", "Deny", "Pass"][self.weighted(&[40, 40, 20])];
        let peers: Vec<Value> = (0..1 + self.below(2)).map(|_| self.cluster_peer(direction)).collect();
        let mut rule = Map::new();
        rule.insert("name".into(), json!(format!("r{index}")));
        rule.insert("action".into(), json!(action));
        rule.insert(
            match direction {
                Direction::Ingress => "from",
                Direction::Egress => "to",
            }
            .into(),
            Value::Array(peers),
        );
        // Upstream's CEL rule: no named port beside a networks (or nodes) peer.
        let named = !rule.values().any(|peers| peers.as_array().is_some_and(|a| a.iter().any(|p| p.get("networks").is_some())));
        if self.chance(55) {
            let protocols: Vec<Value> = (0..1 + self.below(2)).map(|_| self.cluster_protocol(named)).collect();
            rule.insert("protocols".into(), Value::Array(protocols));
        }
        Value::Object(rule)
    }

    /// A selector that is `{}` more often than [`Self::selector`]'s: a tier's rules
    /// interact (a Pass hands over, a later Deny or Accept decides) only where their
    /// peers overlap, and random selectors rarely do.
    fn broad_selector(&mut self, vocabulary: &[(&str, &[&str])], first_key_percent: u64) -> Value {
        if self.chance(35) { json!({}) } else { self.selector(vocabulary, first_key_percent) }
    }

    fn cluster_peer(&mut self, direction: Direction) -> Value {
        let kinds: &[u64] = match direction {
            Direction::Ingress => &[45, 55],
            Direction::Egress => &[35, 40, 25],
        };
        match self.weighted(kinds) {
            0 => json!({"namespaces": self.broad_selector(&NS_LABELS, 50)}),
            1 => {
                json!({"pods": {"namespaceSelector": self.broad_selector(&NS_LABELS, 50), "podSelector": self.broad_selector(&POD_LABELS, 60)}})
            }
            _ => {
                // A CIDR only (`except` is NetworkPolicy's); one per peer, since two
                // placeholders may expand to the same block, which the schema refuses.
                json!({"networks": [self.ip_block()["cidr"].clone()]})
            }
        }
    }

    /// One protocol entry: a port number, a range, or (if `named`) a named port.
    fn cluster_protocol(&mut self, named: bool) -> Value {
        let protocol = self.pick(&["tcp", "udp", "sctp"]);
        match self.weighted(&[50, 30, if named { 20 } else { 0 }]) {
            0 => json!({protocol: {"destinationPort": {"number": self.pick(&NUMBERED_PORTS)}}}),
            1 => {
                let (start, end) = self.pick(&PORT_RANGES);
                // Upstream's CEL rule: start < end.
                let end = if end == start { end + 1 } else { end };
                json!({protocol: {"destinationPort": {"range": {"start": start, "end": end}}}})
            }
            _ => {
                let port = self.pick(&SERVED_PORTS);
                json!({"destinationNamedPort": format!("serve-{port}-{}", self.pick(&["tcp", "udp", "sctp"]))})
            }
        }
    }

    /// One or two label changes; `remove_percent` of them remove the label.
    fn label_changes(&mut self, vocabulary: &[(&str, &[&str])], remove_percent: u64) -> BTreeMap<String, Option<String>> {
        let mut changes = BTreeMap::new();
        for _ in 0..1 + self.below(2) {
            let (key, values) = self.pick(vocabulary);
            let value = if self.chance(remove_percent) { None } else { Some(self.pick(values).to_string()) };
            changes.insert(key.to_string(), value);
        }
        changes
    }

    fn policy(&mut self, ns: &str, name: &str) -> Value {
        let mut spec = Map::new();
        spec.insert("podSelector".into(), self.selector(&POD_LABELS, 60));
        // policyTypes missing (the API server defaults it from the rules), or explicit.
        let types: Option<&[&str]> = match self.weighted(&[15, 30, 25, 25, 5]) {
            0 => None,
            1 => Some(&["Ingress"]),
            2 => Some(&["Egress"]),
            3 => Some(&["Ingress", "Egress"]),
            _ => Some(&["Egress", "Ingress"]),
        };
        let has = |t: &str| types.is_none_or(|types| types.contains(&t));
        if let Some(types) = types {
            spec.insert("policyTypes".into(), json!(types));
        }
        // Rules of a direction the policy does not isolate are ignored; include some.
        if has("Ingress") || self.chance(10) {
            if let Some(rules) = self.rules(Direction::Ingress) {
                spec.insert("ingress".into(), rules);
            }
        }
        if has("Egress") || self.chance(10) {
            if let Some(rules) = self.rules(Direction::Egress) {
                spec.insert("egress".into(), rules);
            }
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        })
    }

    /// A rule list: missing, empty (deny all), `[{}]` (allow all) or random rules.
    fn rules(&mut self, direction: Direction) -> Option<Value> {
        match self.weighted(&[10, 15, 10, 65]) {
            0 => None,
            1 => Some(json!([])),
            2 => Some(json!([{}])),
            _ => Some(Value::Array((0..1 + self.below(2)).map(|_| self.rule(direction)).collect())),
        }
    }

    fn rule(&mut self, direction: Direction) -> Value {
        let mut rule = Map::new();
        let peers_key = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        match self.weighted(&[30, 8, 62]) {
            0 => {}
            1 => {
                rule.insert(peers_key.into(), json!([]));
            }
            _ => {
                let peers = (0..1 + self.below(3)).map(|_| self.peer()).collect();
                rule.insert(peers_key.into(), Value::Array(peers));
            }
        }
        match self.weighted(&[35, 7, 58]) {
            0 => {}
            1 => {
                rule.insert("ports".into(), json!([]));
            }
            _ => {
                let ports = (0..1 + self.below(3)).map(|_| self.port()).collect();
                rule.insert("ports".into(), Value::Array(ports));
            }
        }
        Value::Object(rule)
    }

    fn peer(&mut self) -> Value {
        match self.weighted(&[25, 20, 25, 30]) {
            0 => json!({"podSelector": self.selector(&POD_LABELS, 60)}),
            1 => json!({"namespaceSelector": self.selector(&NS_LABELS, 50)}),
            2 => json!({"namespaceSelector": self.selector(&NS_LABELS, 50), "podSelector": self.selector(&POD_LABELS, 60)}),
            _ => json!({"ipBlock": self.ip_block()}),
        }
    }

    /// A label selector: `{}`, matchLabels, matchExpressions (all four operators) or both.
    /// `first_key_percent` of the keys are the vocabulary's first (the upstream label).
    fn selector(&mut self, vocabulary: &[(&str, &[&str])], first_key_percent: u64) -> Value {
        let mut sel = Map::new();
        let kind = self.weighted(&[20, 35, 30, 15]);
        if kind == 1 || kind == 3 {
            let mut labels = Map::new();
            for _ in 0..1 + usize::from(self.chance(20)) {
                let (key, values) = self.label_key(vocabulary, first_key_percent);
                labels.insert(key.into(), json!(self.pick(values)));
            }
            sel.insert("matchLabels".into(), Value::Object(labels));
        }
        if kind == 2 || kind == 3 {
            let exprs = (0..1 + usize::from(self.chance(25)))
                .map(|_| {
                    let (key, values) = self.label_key(vocabulary, first_key_percent);
                    let operator = self.pick(&OPERATORS);
                    if operator == "In" || operator == "NotIn" {
                        let mut chosen: Vec<&str> = (0..1 + self.below(2)).map(|_| self.pick(values)).collect();
                        chosen.sort_unstable();
                        chosen.dedup();
                        json!({"key": key, "operator": operator, "values": chosen})
                    } else {
                        json!({"key": key, "operator": operator})
                    }
                })
                .collect();
            sel.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(sel)
    }

    fn label_key<'a>(&mut self, vocabulary: &[(&'a str, &'a [&'a str])], first_key_percent: u64) -> (&'a str, &'a [&'a str]) {
        if self.chance(first_key_percent) { vocabulary[0] } else { vocabulary[1 + self.below(vocabulary.len() - 1)] }
    }

    fn prefix_len(&self, v4_len: u8) -> u8 {
        match self.family {
            Family::Ipv6 if v4_len >= 24 => v4_len + 96,
            _ => v4_len,
        }
    }

    /// An ipBlock around a pod's address (`${net:..}`/`${host:..}`, so the same case
    /// works in both families), sometimes with except blocks around pods inside it.
    fn ip_block(&mut self) -> Value {
        if self.chance(8) {
            return json!({"cidr": self.pick(&FOREIGN_BLOCKS)});
        }
        let around = self.below(self.pods.len());
        let key = self.pods[around].key();
        let v4_len = self.pick(&BLOCK_LENGTHS);
        let len = self.prefix_len(v4_len);
        let cidr = if v4_len == 32 && self.chance(50) { format!("${{host:{key}}}") } else { format!("${{net:{key}:{len}}}") };
        let mut block = Map::new();
        block.insert("cidr".into(), json!(cidr));
        if v4_len < 32 && self.chance(50) {
            let addr = self.pods[around].ip(self.family).expect("pods have an address of the primary family");
            let prefix = Prefix::new(addr, len).expect("length within the family");
            let inside: Vec<String> =
                self.pods.iter().filter(|p| p.ip(self.family).is_some_and(|a| prefix.contains_addr(a))).map(PodSpec::key).collect();
            let longer: Vec<u8> = EXCEPT_LENGTHS.iter().copied().filter(|l| *l > v4_len).collect();
            let mut except = Vec::new();
            for _ in 0..1 + self.below(2) {
                let q = inside[self.below(inside.len())].clone();
                let l = self.pick(&longer);
                let text = if l == 32 { format!("${{host:{q}}}") } else { format!("${{net:{q}:{}}}", self.prefix_len(l)) };
                if !except.contains(&text) {
                    except.push(text);
                }
            }
            block.insert("except".into(), json!(except));
        }
        Value::Object(block)
    }

    /// A port entry: protocol missing (TCP) or explicit; no port, a number, a name
    /// (`serve-<port>-<proto>`, sometimes of another protocol or not served) or a range.
    fn port(&mut self) -> Value {
        let protocol: Option<&str> = if self.chance(25) { None } else { Some(self.pick(&PROTOCOL_NAMES)) };
        let mut p = Map::new();
        if let Some(proto) = protocol {
            p.insert("protocol".into(), json!(proto));
        }
        match self.weighted(&[20, 35, 30, 15]) {
            0 => {}
            1 => {
                p.insert("port".into(), json!(self.pick(&NUMBERED_PORTS)));
            }
            2 => {
                let port = self.pick(&SERVED_PORTS);
                let name = match self.weighted(&[70, 20, 10]) {
                    0 => format!("serve-{port}-{}", protocol.unwrap_or("TCP").to_lowercase()),
                    1 => format!("serve-{port}-{}", self.pick(&PROTOCOL_NAMES).to_lowercase()),
                    _ => self.pick(&["serve-82-tcp", "http"]).to_string(),
                };
                p.insert("port".into(), json!(name));
            }
            _ => {
                let (start, end) = self.pick(&PORT_RANGES);
                p.insert("port".into(), json!(start));
                p.insert("endPort".into(), json!(end));
            }
        }
        Value::Object(p)
    }
}
