//! Running a case against the model: the cluster becomes manifests, the manifests go
//! through the same loading and `matrix` code as `policy-agent matrix`, and each probe's
//! matrix is compared with the case's expectation.

use std::collections::BTreeMap;

use policy_agent::manifests::Manifests;
use policy_agent::matrix::{Probe, compute};
use policy_model::{Family, Flow, IpProtocol, ObjectKey, compile_pod, verdict};
use serde_json::Value;

use crate::case::{Case, Connection, ContainerPort, Expect, LifeEvent, Phase, ProbeSource, ProbeTarget, Reachability, Reuse, Step};
use crate::cluster::{
    Families, NAMESPACES, PodSpec, expand_placeholders, host_network_pod_manifest, make_pods, namespace_manifest, node_addresses,
    node_manifest, node_name,
};

/// The outcome of one probe.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    pub step: usize,
    pub probe: Probe,
    pub expected: Reachability,
    pub observed: Reachability,
    /// Pairs (from, to) where they differ.
    pub wrong: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct CaseOutcome {
    pub name: String,
    pub probes: Vec<ProbeOutcome>,
    /// Problems that stop the case (bad manifests, internal disagreements).
    pub errors: Vec<String>,
}

impl CaseOutcome {
    pub fn passed(&self) -> bool {
        self.errors.is_empty() && self.probes.iter().all(|p| p.wrong.is_empty())
    }

    /// Expected and observed matrices side by side, for each failing probe.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for e in &self.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        for p in self.probes.iter().filter(|p| !p.wrong.is_empty()) {
            out.push_str(&format!("  step {} probe {}: {} wrong cell(s)\n", p.step + 1, p.probe, p.wrong.len()));
            let exp = p.expected.render();
            let obs = p.observed.render();
            let w = exp.iter().map(String::len).max().unwrap_or(0);
            out.push_str(&format!("    {:w$}   {}\n", "expected", "observed"));
            for (a, b) in exp.iter().zip(&obs) {
                out.push_str(&format!("    {a:w$}   {b}\n"));
            }
        }
        out
    }
}

/// The emulated cluster as objects, mutated step by step as the runner mutates the
/// manifests it writes.
pub struct ModelCluster {
    pub pods: Vec<PodSpec>,
    /// The nodes (name, addresses), as the real-traffic runner makes them.
    pub nodes: Vec<(String, Vec<std::net::IpAddr>)>,
    /// The namespaces that exist, with their labels.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: BTreeMap<ObjectKey, Value>,
    /// The phase of every pod whose object exists (Pending, Running, Succeeded, Failed).
    pub phases: BTreeMap<String, &'static str>,
    /// Container ports beyond the served ones, by pod.
    pub container_ports: BTreeMap<String, Vec<ContainerPort>>,
    families: Families,
}

impl ModelCluster {
    /// The cluster before any step: pods `names` (labels `pod=<name>`) on one node, and
    /// namespaces x, y, z without labels of their own.
    pub fn new(names: &[String], families: Families) -> ModelCluster {
        ModelCluster::with_nodes(names, families, 1)
    }

    /// The same with the pods spread over `nodes` nodes, as the real-traffic runner spreads
    /// them (their addresses depend on it, and so may what an ipBlock holds).
    pub fn with_nodes(names: &[String], families: Families, nodes: usize) -> ModelCluster {
        ModelCluster {
            pods: make_pods(names, families, nodes),
            nodes: (0..nodes.max(1)).map(|i| (node_name(i), node_addresses(i).to_vec())).collect(),
            namespace_labels: namespaces_of(names).into_iter().map(|n| (n, BTreeMap::new())).collect(),
            policies: BTreeMap::new(),
            phases: names.iter().map(|n| (n.clone(), "Running")).collect(),
            container_ports: BTreeMap::new(),
            families,
        }
    }

    /// The cluster of `case` before its first step: its later pods and namespaces do not
    /// exist yet.
    pub fn for_case(case: &Case, families: Families, nodes: usize) -> ModelCluster {
        let mut c = ModelCluster::with_nodes(&case.pod_names(), families, nodes);
        c.phases.retain(|p, _| !case.later.contains(p));
        for ns in case.services.keys().filter_map(|k| k.split_once('/').map(|(n, _)| n.to_string())) {
            c.namespace_labels.entry(ns).or_default();
        }
        c.namespace_labels.retain(|n, _| !case.later_namespaces.contains(n));
        c.container_ports = case.container_ports.clone();
        c
    }

    fn index_of(&self, key: &str) -> Result<usize, String> {
        self.pods.iter().position(|p| p.key() == key).ok_or(format!("no pod {key}"))
    }

    pub fn runs(&self, key: &str) -> bool {
        self.phases.get(key) == Some(&"Running")
    }

    /// Pod `new` takes over completed pod `old`'s node and addresses (a step's `takeOver`).
    pub fn take_over(&mut self, new: &str, old: &str) -> Result<(), String> {
        let old_spec = self.pods[self.index_of(old).map_err(|e| format!("takeOver: {e}"))?].clone();
        let i = self.index_of(new).map_err(|e| format!("takeOver: {e}"))?;
        self.pods[i].ips = old_spec.ips;
        self.pods[i].node = old_spec.node;
        self.phases.insert(old.to_string(), "Succeeded");
        self.phases.insert(new.to_string(), "Running");
        Ok(())
    }

    /// A step's lifecycle changes, in order (`Step::lifecycle`).
    fn apply_lifecycle(&mut self, step: &Step) -> Vec<String> {
        let mut errors = Vec::new();
        for event in step.lifecycle() {
            match event {
                LifeEvent::DeleteNamespace(ns) => {
                    self.namespace_labels.remove(ns);
                    let in_ns = |k: &String| k.split_once('/').is_some_and(|(n, _)| n == ns);
                    self.phases.retain(|k, _| !in_ns(k));
                    self.policies.retain(|k, _| &*k.namespace != ns);
                }
                LifeEvent::CreateNamespace(ns) => {
                    self.namespace_labels.insert(ns.to_string(), BTreeMap::new());
                }
                LifeEvent::TakeOver { new, old } => {
                    if let Err(e) = self.take_over(new, old) {
                        errors.push(e);
                    }
                }
                LifeEvent::Finish(pod, phase) => {
                    self.phases.insert(pod.to_string(), if phase == Phase::Failed { "Failed" } else { "Succeeded" });
                }
                LifeEvent::DeletePod(pod) => {
                    self.phases.remove(pod);
                }
                LifeEvent::Pending(pod) => {
                    self.phases.insert(pod.to_string(), "Pending");
                }
                LifeEvent::Start(pod) => {
                    self.phases.insert(pod.to_string(), "Running");
                }
            }
        }
        errors
    }

    /// Applies a step's changes (lifecycle, apply, update, delete, then labels, in the
    /// runner's order); returns what went wrong.
    pub fn apply_step(&mut self, step: &Step) -> Vec<String> {
        let mut errors = self.apply_lifecycle(step);
        for (verb, list) in [("apply", &step.apply), ("update", &step.update)] {
            for manifest in list {
                let mut v = manifest.clone();
                if let Err(e) = expand_placeholders(&mut v, &self.pods, self.families.primary()) {
                    errors.push(format!("{verb}: {e}"));
                    continue;
                }
                match policy_key(&v) {
                    Ok(k) => {
                        let exists = self.policies.contains_key(&k);
                        if verb == "update" && !exists {
                            errors.push(format!("update of {k}, which does not exist"));
                        }
                        self.policies.insert(k, v);
                    }
                    Err(e) => errors.push(format!("{verb}: {e}")),
                }
            }
        }
        for d in &step.delete {
            match delete_key(d) {
                Some(k) if self.policies.remove(&k).is_some() => {}
                _ => errors.push(format!("delete {d}: no such policy")),
            }
        }
        for (ns, changes) in &step.label_namespace {
            merge_labels(self.namespace_labels.entry(ns.clone()).or_default(), changes);
        }
        for (pod, changes) in &step.label_pod {
            match self.pods.iter_mut().find(|p| &p.key() == pod) {
                Some(p) => merge_labels(&mut p.labels, changes),
                None => errors.push(format!("labelPod {pod}: no such pod")),
            }
        }
        errors
    }

    pub fn manifests(&self) -> Manifests {
        let mut m = Manifests::default();
        for (ns, labels) in &self.namespace_labels {
            m.add_value("namespaces", serde_yaml_ng::to_value(namespace_manifest(ns, labels)).expect("json to yaml"));
        }
        for (i, (name, addresses)) in self.nodes.iter().enumerate() {
            m.add_value(&format!("node {name}"), serde_yaml_ng::to_value(node_manifest(name, addresses)).expect("json to yaml"));
            let host = host_network_pod_manifest(i, addresses);
            m.add_value(&format!("host-network pod on {name}"), serde_yaml_ng::to_value(host).expect("json to yaml"));
        }
        for p in &self.pods {
            let Some(phase) = self.phases.get(&p.key()) else { continue };
            let extra = self.container_ports.get(&p.key()).map_or(&[][..], Vec::as_slice);
            m.add_value(&format!("pod {}", p.key()), serde_yaml_ng::to_value(p.manifest_with(phase, extra)).expect("json to yaml"));
        }
        for (k, v) in &self.policies {
            m.add_value(&format!("policy {k}"), serde_yaml_ng::to_value(v).expect("json to yaml"));
        }
        m
    }

    /// `case`'s Services as they stand, with endpoints from the running pods.
    pub fn services<'c>(&self, case: &'c Case, family: Family) -> Vec<crate::service::Resolved<'c>> {
        let views: Vec<crate::service::PodView> = self
            .pods
            .iter()
            .filter(|p| self.runs(&p.key()))
            .map(|p| crate::service::PodView {
                spec: p,
                extra_ports: self.container_ports.get(&p.key()).map_or(&[][..], Vec::as_slice),
                node: self.nodes.iter().position(|(n, _)| *n == p.node).unwrap_or(0),
            })
            .collect();
        let namespaces: Vec<String> = self.namespace_labels.keys().cloned().collect();
        crate::service::resolve(&case.services, &views, &namespaces, family)
    }
}

/// The case's namespaces: x, y and z always (as upstream's NetworkPolicy suite has them,
/// pods or not), plus any other its pods live in.
pub fn namespaces_of(pods: &[String]) -> Vec<String> {
    let mut out: Vec<String> = NAMESPACES.iter().map(|n| n.to_string()).collect();
    for p in pods {
        if let Some((ns, _)) = p.split_once('/')
            && !out.iter().any(|n| n == ns)
        {
            out.push(ns.to_string());
        }
    }
    out
}

/// A policy manifest's key: `ns/name` for a NetworkPolicy; a ClusterNetworkPolicy is
/// cluster-scoped, so its key has an empty namespace (and `delete` names it bare).
pub fn policy_key(v: &Value) -> Result<ObjectKey, String> {
    let name = v.pointer("/metadata/name").and_then(Value::as_str).ok_or("policy without metadata.name")?;
    if is_cluster_policy(v) {
        return Ok(ObjectKey::new("", name));
    }
    let ns = v.pointer("/metadata/namespace").and_then(Value::as_str).ok_or("policy without metadata.namespace")?;
    Ok(ObjectKey::new(ns, name))
}

pub fn is_cluster_policy(v: &Value) -> bool {
    v.get("kind").and_then(Value::as_str) == Some("ClusterNetworkPolicy")
}

/// What a `delete` entry names: `ns/name` a NetworkPolicy, a bare name (no `/`) a
/// ClusterNetworkPolicy.
pub fn delete_key(entry: &str) -> Option<ObjectKey> {
    if entry.contains('/') { ObjectKey::parse(entry) } else { (!entry.is_empty()).then(|| ObjectKey::new("", entry)) }
}

/// Merges label changes into `labels`: `Some` sets a label, `None` removes it.
pub(crate) fn merge_labels(labels: &mut BTreeMap<String, String>, changes: &BTreeMap<String, Option<String>>) {
    for (k, v) in changes {
        match v {
            Some(v) => labels.insert(k.clone(), v.clone()),
            None => labels.remove(k),
        };
    }
}

/// Runs a case at model level. In a dual-stack cluster the pods have both addresses (so
/// both families' tables are compiled) and probes use the primary family, as upstream's
/// probes through single-stack Services do.
pub fn run_case(case: &Case, families: Families) -> CaseOutcome {
    let names = case.pod_names();
    let mut cluster = ModelCluster::for_case(case, families, 1);
    let keys: Vec<ObjectKey> = names.iter().filter_map(|n| ObjectKey::parse(n)).collect();
    let mut outcome = CaseOutcome { name: case.name.clone(), probes: Vec::new(), errors: Vec::new() };

    let mut opened: BTreeMap<String, Connection> = BTreeMap::new();
    for (si, step) in case.steps.iter().enumerate() {
        let errors = cluster.apply_step(step);
        outcome.errors.extend(errors.iter().map(|e| format!("step {}: {e}", si + 1)));

        let (state, errors) = cluster.manifests().state();
        outcome.errors.extend(errors.iter().map(|e| format!("step {}: {e}", si + 1)));

        // A kept connection is judged again under the step's policies: its answer is a
        // new connection's.
        for (name, want) in &step.reuse {
            let Some(c) = opened.get(name) else { continue };
            let got = connection_verdict(&state, c, &keys, families.probe_family());
            outcome.probes.push(reuse_outcome(si, c, *want, got));
        }
        for spec in &step.probes {
            let expected = Reachability::parse(&spec.expect).expect("validated when the case was loaded");
            let probe = Probe { port: spec.port, protocol: spec.protocol };
            if spec.to == ProbeTarget::Services || spec.from == ProbeSource::Node {
                let family = families.probe_family();
                let services = cluster.services(case, family);
                let (observed, wrong, errors) = judge_cells(&expected, |from, to| match spec.from {
                    ProbeSource::Node => own_node_flow(&state, &cluster, from, to, probe, family),
                    _ => service_flows(&state, &services, spec, from, to, family),
                });
                outcome.errors.extend(errors.iter().map(|e| format!("step {}: internal: {e}", si + 1)));
                outcome.probes.push(ProbeOutcome { step: si, probe, expected, observed, wrong });
                continue;
            }
            if spec.from == ProbeSource::Outside {
                let (observed, wrong, errors) = outside_probe(&state, &expected, probe, families.probe_family());
                outcome.errors.extend(errors.iter().map(|e| format!("step {}: internal: {e}", si + 1)));
                outcome.probes.push(ProbeOutcome { step: si, probe, expected, observed, wrong });
                continue;
            }
            if spec.to == ProbeTarget::Nodes {
                let (observed, wrong, errors) = node_probe(&cluster, &state, &expected, probe, families.probe_family());
                outcome.errors.extend(errors.iter().map(|e| format!("step {}: internal: {e}", si + 1)));
                outcome.probes.push(ProbeOutcome { step: si, probe, expected, observed, wrong });
                continue;
            }
            let m = compute(&state, &[probe], Some(&keys));
            outcome.errors.extend(m.disagreements.iter().map(|d| format!("step {}: internal: {d}", si + 1)));
            let mut observed = Reachability { pods: expected.pods.clone(), targets: expected.targets.clone(), cells: Vec::new() };
            let mut wrong = Vec::new();
            for (i, from) in expected.pods.iter().enumerate() {
                let mut row = Vec::new();
                for (j, to) in expected.pods.iter().enumerate() {
                    let cell = match m.mark_in(from, to, probe, &[families.probe_family()]) {
                        '.' => Expect::Connected,
                        'X' => Expect::Blocked,
                        // Mixed families or no shared family: never what a case expects.
                        _ => Expect::Unchecked,
                    };
                    let want = expected.cells[i][j];
                    let shown = if want == Expect::Unchecked { Expect::Unchecked } else { cell };
                    if want != Expect::Unchecked && cell != want {
                        wrong.push((from.clone(), to.clone()));
                    }
                    row.push(shown);
                }
                observed.cells.push(row);
            }
            outcome.probes.push(ProbeOutcome { step: si, probe, expected, observed, wrong });
        }
        for (name, c) in &step.open {
            if connection_verdict(&state, c, &keys, families.probe_family()) != Reuse::Connected {
                outcome.errors.push(format!("step {}: open {name}: {} -> {} is blocked", si + 1, c.from, c.to));
            }
            opened.insert(name.clone(), c.clone());
        }
    }
    outcome
}

/// Whether a new TCP connection `c` is allowed in `state` (over `family`).
fn connection_verdict(state: &policy_model::ClusterState, c: &Connection, keys: &[ObjectKey], family: Family) -> Reuse {
    let probe = Probe { port: c.port, protocol: policy_model::Protocol::Tcp };
    match compute(state, &[probe], Some(keys)).mark_in(&c.from, &c.to, probe, &[family]) {
        '.' => Reuse::Connected,
        _ => Reuse::Blocked,
    }
}

/// A `reuse` check as a one-cell probe outcome (`from` row, `to` column).
pub fn reuse_outcome(step: usize, c: &Connection, want: Reuse, got: Reuse) -> ProbeOutcome {
    let cell = |r: Reuse| if r == Reuse::Connected { Expect::Connected } else { Expect::Blocked };
    let one = |r: Reuse| Reachability { pods: vec![c.from.clone()], targets: vec![c.to.clone()], cells: vec![vec![cell(r)]] };
    let wrong = if want == got { Vec::new() } else { vec![(c.from.clone(), c.to.clone())] };
    ProbeOutcome {
        step,
        probe: Probe { port: c.port, protocol: policy_model::Protocol::Tcp },
        expected: one(want),
        observed: one(got),
        wrong,
    }
}

/// The pod named `key` (`ns/name`) and its own address of `family`.
fn pod_address<'a>(
    state: &'a policy_model::ClusterState,
    key: &str,
    family: Family,
) -> Result<(&'a policy_model::Pod, std::net::IpAddr), String> {
    let pod = ObjectKey::parse(key).and_then(|k| state.pods().find(|p| p.key == k)).ok_or_else(|| format!("no pod {key}"))?;
    let addr = state.owned_ips(pod).find(|a| Family::of(*a) == family).ok_or_else(|| format!("{key} has no {family} address"))?;
    Ok((pod, addr))
}

/// A `from: outside` probe at model level: each outside client to each pod's address of
/// `family` on the probe's port, judged by the reference evaluator with the client as the
/// source (the agent traces a NodePort client through kube-proxy's masquerade) and by the
/// pod's compiled ingress table, for a forwarded packet.
fn outside_probe(
    state: &policy_model::ClusterState,
    expected: &Reachability,
    probe: Probe,
    family: Family,
) -> (Reachability, Vec<(String, String)>, Vec<String>) {
    let mut observed = Reachability::unchecked(expected.pods.clone(), expected.targets.clone());
    let mut wrong = Vec::new();
    let mut errors = Vec::new();
    for (i, from) in expected.pods.iter().enumerate() {
        let Some(src) = crate::case::outside_address(from, family) else {
            errors.push(format!("no outside client {from}"));
            continue;
        };
        for (j, to) in expected.targets.iter().enumerate() {
            let want = expected.cells[i][j];
            if want == Expect::Unchecked {
                continue;
            }
            let (pod, dst) = match pod_address(state, to, family) {
                Ok(found) => found,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let flow = Flow { src, dst, protocol: IpProtocol::from(probe.protocol), port: probe.port };
            let allowed = policy_model::verdict_forwarded(state, &flow).allowed;
            if compile_pod(state, pod).ingress.allows_from(src, flow.protocol, flow.port, false) != allowed {
                errors.push(format!("{from} -> {to} {probe}: the reference and the compiled ingress table disagree"));
            }
            let got = if allowed { Expect::Connected } else { Expect::Blocked };
            observed.cells[i][j] = got;
            if got != want {
                wrong.push((from.clone(), to.clone()));
            }
        }
    }
    (observed, wrong, errors)
}

/// A `to: nodes` probe at model level: each row's pod to every node's address of `family`,
/// judged by the reference evaluator and by the pod's compiled egress table (a node has no
/// ingress table); a cell is what every node gives, or the first that differs from the
/// expectation. Returns the observed matrix, the wrong cells and any disagreement between
/// the evaluator and the tables.
fn node_probe(
    cluster: &ModelCluster,
    state: &policy_model::ClusterState,
    expected: &Reachability,
    probe: Probe,
    family: Family,
) -> (Reachability, Vec<(String, String)>, Vec<String>) {
    let mut observed = Reachability::unchecked(expected.pods.clone(), expected.targets.clone());
    let mut wrong = Vec::new();
    let mut errors = Vec::new();
    for (i, from) in expected.pods.iter().enumerate() {
        let want = expected.cells[i][0];
        if want == Expect::Unchecked {
            continue;
        }
        let (pod, src) = match pod_address(state, from, family) {
            Ok(found) => found,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let tables = compile_pod(state, pod);
        let mut cell = None;
        for (name, addresses) in &cluster.nodes {
            let Some(dst) = addresses.iter().copied().find(|a| Family::of(*a) == family) else { continue };
            let flow = Flow { src, dst, protocol: IpProtocol::from(probe.protocol), port: probe.port };
            let allowed = verdict(state, &flow).allowed;
            if tables.egress.allows(dst, flow.protocol, flow.port) != allowed {
                errors.push(format!("{from} -> node {name} {probe}: the reference and the compiled egress table disagree"));
            }
            let got = if allowed { Expect::Connected } else { Expect::Blocked };
            if cell.is_none() || cell == Some(want) {
                cell = Some(got);
            }
        }
        let got = cell.unwrap_or(Expect::Unchecked);
        observed.cells[i][0] = got;
        if got != want {
            wrong.push((from.clone(), expected.targets[0].clone()));
        }
    }
    (observed, wrong, errors)
}

/// A probe judged cell by cell: `judge(row, column)` gives whether each connection the
/// cell stands for is allowed; the cell shows the first answer that differs from the
/// expectation, if any. Returns the observed matrix, the wrong cells and the errors.
fn judge_cells(
    expected: &Reachability,
    mut judge: impl FnMut(&str, &str) -> Result<Vec<bool>, String>,
) -> (Reachability, Vec<(String, String)>, Vec<String>) {
    let mut observed = Reachability::unchecked(expected.pods.clone(), expected.targets.clone());
    let mut wrong = Vec::new();
    let mut errors = Vec::new();
    for (i, from) in expected.pods.iter().enumerate() {
        for (j, to) in expected.targets.iter().enumerate() {
            let want = expected.cells[i][j];
            if want == Expect::Unchecked {
                continue;
            }
            let answers = match judge(from, to) {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    errors.push(format!("{from} -> {to}: nothing to connect to"));
                    continue;
                }
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let as_expect = |ok: bool| if ok { Expect::Connected } else { Expect::Blocked };
            let got = answers.iter().map(|ok| as_expect(*ok)).find(|g| *g != want).unwrap_or(want);
            observed.cells[i][j] = got;
            if got != want {
                wrong.push((from.clone(), to.clone()));
            }
        }
    }
    (observed, wrong, errors)
}

/// A `from: node` cell: pod `to`'s own node connects from its InternalIP, from its own
/// stack (the node exemption applies). The reference evaluator and the pod's compiled
/// ingress table must agree.
fn own_node_flow(
    state: &policy_model::ClusterState,
    cluster: &ModelCluster,
    _from: &str,
    to: &str,
    probe: Probe,
    family: Family,
) -> Result<Vec<bool>, String> {
    let (pod, dst) = pod_address(state, to, family)?;
    let node = cluster.nodes.iter().find(|(n, _)| Some(n.as_str()) == pod.node.as_deref()).ok_or(format!("{to} has no node"))?;
    let src = node.1.iter().copied().find(|a| Family::of(*a) == family).ok_or("node without an address of the family")?;
    let flow = Flow { src, dst, protocol: IpProtocol::from(probe.protocol), port: probe.port };
    let allowed = verdict(state, &flow).allowed;
    if compile_pod(state, pod).ingress.allows_from(src, flow.protocol, flow.port, true) != allowed {
        return Err(format!("node -> {to} {probe}: the reference and the compiled ingress table disagree"));
    }
    Ok(vec![allowed])
}

/// A cell of a `to: services` probe: each connection from `from` (a pod, or an outside
/// client) to Service `to` as kube-proxy translates it, judged by the reference evaluator
/// (an outside client's as forwarded: no node exemption).
fn service_flows(
    state: &policy_model::ClusterState,
    services: &[crate::service::Resolved],
    spec: &crate::case::ProbeSpec,
    from: &str,
    to: &str,
    family: Family,
) -> Result<Vec<bool>, String> {
    let svc = services.iter().find(|s| s.key == to).ok_or(format!("no Service {to} then"))?;
    let protocol = IpProtocol::from(spec.protocol);
    let flow = |src, dst: std::net::SocketAddr| Flow { src, dst: dst.ip(), protocol, port: dst.port() };
    Ok(if spec.from == ProbeSource::Outside {
        let src = crate::case::outside_address(from, family).ok_or(format!("no outside client {from}"))?;
        svc.outside_judged(spec.port).into_iter().map(|d| policy_model::verdict_forwarded(state, &flow(src, d)).allowed).collect()
    } else {
        let (_, src) = pod_address(state, from, family)?;
        svc.judged(spec.port, spec.protocol, family).into_iter().map(|d| verdict(state, &flow(src, d)).allowed).collect()
    })
}
