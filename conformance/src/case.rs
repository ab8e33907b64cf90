//! Case files: upstream-style NetworkPolicy tests as data (see conformance/cases/).

use std::collections::BTreeMap;
use std::path::Path;

use policy_model::{Family, Protocol};
use serde::{Deserialize, Serialize};

/// One case file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// `ns/pod` names; default: x, y, z × a, b, c.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<String>>,
    /// A blocked cell passes only if the probe was dropped (timed out), as the upstream
    /// ClusterNetworkPolicy suite demands; a refusal (RST, ICMP unreachable) fails it.
    #[serde(default, rename = "blockedMustDrop", skip_serializing_if = "std::ops::Not::not")]
    pub blocked_must_drop: bool,
    /// Pods of `pods` that do not exist until a step starts them (`start`, `pending`,
    /// `takeOver`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later: Vec<String>,
    /// Namespaces (of `later` pods only) that do not exist until a step's
    /// `createNamespace`.
    #[serde(default, rename = "laterNamespaces", skip_serializing_if = "Vec::is_empty")]
    pub later_namespaces: Vec<String>,
    /// Container ports of pods beyond the ones every pod serves (TCP, UDP and SCTP on 80
    /// and 81, named `serve-80-tcp`...), by pod: served for real, and named in the Pod.
    #[serde(default, rename = "containerPorts", skip_serializing_if = "BTreeMap::is_empty")]
    pub container_ports: BTreeMap<String, Vec<ContainerPort>>,
    /// Services the case declares, by `ns/name`, beside the one the harness gives each pod
    /// (see [`ServiceSpec`]). kube-proxy's rules follow their endpoints step by step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceSpec>,
    pub steps: Vec<Step>,
}

/// A port a pod's container serves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    /// The port name (an IANA_SVC_NAME), for named `targetPort`s and policy ports.
    pub name: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// A Service of the case, as `kubectl get svc -o yaml` would show its spec.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type", skip_serializing_if = "ServiceType::is_cluster_ip")]
    pub kind: ServiceType,
    /// `None` makes the Service headless: no virtual address; clients reach the backends'
    /// own addresses (what its DNS name resolves to).
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// The backends: running pods of the Service's namespace with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePortSpec>,
    /// Backends of a Service without a selector, as a hand-made EndpointSlice holds them:
    /// `node-0`, `node-1` (a node's own address, where its host-network pods serve; the
    /// `kubernetes` Service's API servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// NodePort and LoadBalancer: `Local` keeps the client's address (no masquerade).
    #[serde(default, skip_serializing_if = "TrafficPolicy::is_cluster")]
    pub external_traffic_policy: TrafficPolicy,
    /// ExternalName: the DNS name the Service stands for. The harness resolves
    /// `<outside client>.example` (`outside-a.example`) to that client's address, where
    /// the outside network serves the Service's ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn is_cluster_ip(&self) -> bool {
        *self == ServiceType::ClusterIP
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn is_cluster(&self) -> bool {
        *self == TrafficPolicy::Cluster
    }
}

/// One port of a case's Service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// A number, or the name of a container port of each backend; default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// How a pod ends (a step's `finish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Phase {
    Succeeded,
    Failed,
}

/// One lifecycle change of a step: [`Step::lifecycle`] lists a step's in the one order
/// that validation, the model-level runner and the live runner all follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeEvent<'a> {
    DeleteNamespace(&'a str),
    CreateNamespace(&'a str),
    /// Pod `old` completes and pod `new` starts with its node and addresses.
    TakeOver {
        new: &'a str,
        old: &'a str,
    },
    Finish(&'a str, Phase),
    DeletePod(&'a str),
    Pending(&'a str),
    Start(&'a str),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    /// NetworkPolicy and ClusterNetworkPolicy manifests to create (placeholders not yet
    /// expanded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apply: Vec<serde_json::Value>,
    /// Manifests that replace objects of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub update: Vec<serde_json::Value>,
    /// Policies to delete: `ns/name` names a NetworkPolicy, a bare `name` a
    /// ClusterNetworkPolicy (cluster-scoped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    /// Labels merged into namespaces.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_namespace: BTreeMap<String, BTreeMap<String, Option<String>>>,
    /// Labels merged into pods; `null` removes a label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_pod: BTreeMap<String, BTreeMap<String, Option<String>>>,
    /// `new: old`: pod `old` completes (phase Succeeded, as a Job's pod does; its sandbox
    /// goes and its addresses are free), and pod `new` (one of the case's `later` pods)
    /// starts on `old`'s node with `old`'s addresses, as a reused IP does. Applied before
    /// the policies of the step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub take_over: BTreeMap<String, String>,
    /// Later namespaces that now exist (without labels: `labelNamespace` in the same step
    /// adds some). First in a step, after `deleteNamespace`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_namespace: Vec<String>,
    /// Namespaces deleted with everything in them: pods, Services, NetworkPolicies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_namespace: Vec<String>,
    /// Later pods that now exist, scheduled to their node but with no address yet
    /// (phase Pending, no `podIPs`), as a pod is while its sandbox starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Later or pending pods that start: their sandbox, addresses (their own, never
    /// reused) and servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<String>,
    /// Running pods whose containers end with this phase: the sandbox and its addresses
    /// go, the Pod object stays (as a Job's pods do).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub finish: BTreeMap<String, Phase>,
    /// Pods deleted (running, pending or finished ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete_pod: Vec<String>,
    /// Connections opened in an earlier step (`open`), used again after this step's
    /// probes (which show its changes in force: give the step a probe whose answer
    /// changed): whether an exchange on each still goes through. An established flow that
    /// the policies now deny must stop; one they still allow must keep working.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reuse: BTreeMap<String, Reuse>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeSpec>,
    /// TCP connections to open after this step's probes and keep for later steps' `reuse`,
    /// by name: from a pod to another pod's Service, as probes go. Opening must succeed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub open: BTreeMap<String, Connection>,
}

impl Step {
    /// The step's lifecycle changes, in order: namespaces deleted, namespaces created,
    /// take-overs, pods finishing, pods deleted, pods pending, pods starting (all before
    /// the step's policies and labels).
    pub fn lifecycle(&self) -> impl Iterator<Item = LifeEvent<'_>> {
        self.delete_namespace
            .iter()
            .map(|n| LifeEvent::DeleteNamespace(n))
            .chain(self.create_namespace.iter().map(|n| LifeEvent::CreateNamespace(n)))
            .chain(self.take_over.iter().map(|(new, old)| LifeEvent::TakeOver { new, old }))
            .chain(self.finish.iter().map(|(p, phase)| LifeEvent::Finish(p, *phase)))
            .chain(self.delete_pod.iter().map(|p| LifeEvent::DeletePod(p)))
            .chain(self.pending.iter().map(|p| LifeEvent::Pending(p)))
            .chain(self.start.iter().map(|p| LifeEvent::Start(p)))
    }
}

/// A connection a case keeps across steps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub from: String,
    pub to: String,
    pub port: u16,
}

/// What a kept connection must do when used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    Connected,
    Blocked,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    pub port: u16,
    pub protocol: Protocol,
    /// Who connects (the rows): the case's pods (default), or `outside`.
    #[serde(default, skip_serializing_if = "ProbeSource::is_pods")]
    pub from: ProbeSource,
    /// How a `from: outside` probe reaches each pod.
    #[serde(default, skip_serializing_if = "Via::is_node_port")]
    pub via: Via,
    /// What the columns are: the case's pods (default), or `nodes`.
    #[serde(default, skip_serializing_if = "ProbeTarget::is_pods")]
    pub to: ProbeTarget,
    pub expect: String,
}

/// The clients a probe connects from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeSource {
    /// The case's pods: one row each, in order.
    #[default]
    Pods,
    /// Two clients beyond the nodes, rows [`OUTSIDE_CLIENTS`] (addresses
    /// [`outside_address`], also as placeholders `${ip:outside-a}`...). Each reaches
    /// every pod (the columns) through its Service's NodePort on the pod's own node, as
    /// kube-proxy serves `externalTrafficPolicy: Cluster`: DNAT to the pod, and masquerade
    /// to the node's own address (what MASQUERADE picks where host veths hold no
    /// address). The API leaves policy after SNAT undefined; this agent judges the
    /// client by its own address, and these cases expect that. TCP only.
    Outside,
    /// One row, [`NODE_ROW`]: the node each column's pod runs on, from its own stack and
    /// its InternalIP (kubelet probes, host processes, host-network pods), which the API
    /// always lets in. TCP to the case's pods (at their own addresses, as kubelet probes
    /// connect) only.
    Node,
}

impl ProbeSource {
    pub fn is_pods(&self) -> bool {
        *self == ProbeSource::Pods
    }
}

/// How an outside client reaches a pod, as kube-proxy serves its Service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Via {
    /// The NodePort on the pod's node, `externalTrafficPolicy: Cluster`: DNAT, and the
    /// masquerade (KUBE-MARK-MASQ).
    #[default]
    NodePort,
    /// The NodePort of the same Service with `externalTrafficPolicy: Local`: DNAT only,
    /// the client's address reaches the pod.
    NodePortLocal,
    /// The Service's LoadBalancer ingress IP (one per pod, which the outside routes to the
    /// pod's node), `externalTrafficPolicy: Cluster`: DNAT and the masquerade.
    LoadBalancer,
}

impl Via {
    pub fn is_node_port(&self) -> bool {
        *self == Via::NodePort
    }
}

/// The one row of a `from: node` probe.
pub const NODE_ROW: &str = "node";

/// The rows of a `from: outside` probe.
pub const OUTSIDE_CLIENTS: [&str; 2] = ["outside-a", "outside-b"];

/// The address of outside client `name` in `family` (documentation ranges, which only
/// ever exist inside the test's namespaces).
pub fn outside_address(name: &str, family: Family) -> Option<std::net::IpAddr> {
    let i = OUTSIDE_CLIENTS.iter().position(|c| *c == name)?;
    Some(match family {
        Family::Ipv4 => std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 10 + i as u8)),
        Family::Ipv6 => std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10 + i as u16)),
    })
}

/// The servers a probe reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeTarget {
    /// The case's pods: a square matrix, rows and columns the case's pods in order.
    #[default]
    Pods,
    /// The nodes' own addresses, served in each node's network namespace as upstream's
    /// host-network pods serve them: one column, `nodes`, whose cell must hold for every
    /// node of the run (one or two).
    Nodes,
    /// Services the case declares: the header names them (`ns/name`, any of the case's,
    /// in any order), and the probe's port is a port of each. A cell holds for every
    /// address its Service stands for: the ClusterIP and each backend at its target port
    /// (what the ClusterIP translates to: it picks one at random per connection); a
    /// headless one's backends (as a client that resolved its DNS name connects); an
    /// ExternalName's outside address. From `outside`: the NodePort (`via: nodePort`) on
    /// the node of the Service's first backend, or the LoadBalancer IP.
    Services,
}

impl ProbeTarget {
    pub fn is_pods(&self) -> bool {
        *self == ProbeTarget::Pods
    }
}

/// The one column of a `to: nodes` matrix.
pub const NODES_COLUMN: &str = "nodes";

/// One expected cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Connected,
    Blocked,
    Unchecked,
    /// Observed only: blocked by a refusal where a drop was required.
    Refused,
}

impl Expect {
    pub fn mark(self) -> char {
        match self {
            Expect::Connected => '.',
            Expect::Blocked => 'X',
            Expect::Unchecked => '-',
            Expect::Refused => 'R',
        }
    }
}

/// A parsed expectation matrix: rows are clients, columns servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    /// The rows (clients).
    pub pods: Vec<String>,
    /// The columns (servers): the same pods, or [`NODES_COLUMN`].
    pub targets: Vec<String>,
    /// `cells[from][to]`.
    pub cells: Vec<Vec<Expect>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not a case file: {source}")]
    Parse { path: String, source: serde_yaml_ng::Error },
    #[error("{0}")]
    Invalid(String),
}

pub const DEFAULT_PODS: [&str; 9] = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];

impl Case {
    pub fn load(path: &Path) -> Result<Case, CaseError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CaseError::Read { path: p.clone(), source })?;
        Case::parse(&p, &text)
    }

    /// Parses and validates the text of a case file; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<Case, CaseError> {
        let case: Case =
            serde_yaml_ng::from_str(text).map_err(|source_error| CaseError::Parse { path: source.to_string(), source: source_error })?;
        case.validate().map_err(|e| CaseError::Invalid(format!("{source}: {e}")))?;
        Ok(case)
    }

    /// The case-file text (what `conformance/cases/*.yaml` hold); [`Case::parse`] reads it
    /// back to an equal case.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a case serializes: plain data with string keys")
    }

    pub fn pod_names(&self) -> Vec<String> {
        self.pods.clone().unwrap_or_else(|| DEFAULT_PODS.iter().map(|s| s.to_string()).collect())
    }

    fn validate(&self) -> Result<(), String> {
        self.validate_objects()?;
        let mut life = Lifecycle::new(self);
        let mut opened: Vec<(&String, &Connection)> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            life.step(self, step).map_err(|e| format!("steps[{i}].{e}"))?;
            for name in step.reuse.keys() {
                let Some((_, c)) = opened.iter().find(|(n, _)| *n == name) else {
                    return Err(format!("steps[{i}].reuse: no connection {name:?} was opened in an earlier step"));
                };
                // A stopped end took its socket with it: there is nothing left to use.
                if let Some(p) = [&c.from, &c.to].into_iter().find(|p| !life.runs(p)) {
                    return Err(format!("steps[{i}].reuse.{name}: {p} no longer runs, and its end of the connection went with it"));
                }
            }
            for (j, probe) in step.probes.iter().enumerate() {
                self.validate_probe(probe, &life).map_err(|e| format!("steps[{i}].probes[{j}]{e}"))?;
            }
            for (name, c) in &step.open {
                if opened.iter().any(|(n, _)| *n == name) {
                    return Err(format!("steps[{i}].open: {name:?} is opened twice"));
                }
                for p in [&c.from, &c.to] {
                    if !life.runs(p) {
                        return Err(format!("steps[{i}].open.{name}: {p} is not a running pod of the case"));
                    }
                }
                opened.push((name, c));
            }
        }
        Ok(())
    }

    /// The pods, namespaces, container ports and Services, before any step.
    fn validate_objects(&self) -> Result<(), String> {
        let pods = self.pod_names();
        for p in &pods {
            let ok = p.split_once('/').is_some_and(|(ns, name)| is_dns_label(ns) && is_dns_label(name));
            if !ok {
                return Err(format!("pod {p:?}: expected NAMESPACE/NAME, both DNS labels"));
            }
        }
        for p in &self.later {
            if !pods.contains(p) {
                return Err(format!("later: {p} is not one of the case's pods"));
            }
        }
        for ns in &self.later_namespaces {
            if let Some(p) = pods.iter().find(|p| p.split_once('/').is_some_and(|(n, _)| n == ns) && !self.later.contains(p)) {
                return Err(format!("laterNamespaces: {ns} holds {p}, which is not a `later` pod"));
            }
        }
        for (p, ports) in &self.container_ports {
            if !pods.contains(p) {
                return Err(format!("containerPorts: {p} is not one of the case's pods"));
            }
            if let Some(c) = ports.iter().find(|c| c.port == 0 || c.name.is_empty() || c.name.len() > 15) {
                return Err(format!("containerPorts.{p}: {c:?}: a port 1-65535 with a name of 1-15 characters"));
            }
        }
        for (key, svc) in &self.services {
            svc.validate().map_err(|e| format!("services.{key}: {e}"))?;
            if !key.split_once('/').is_some_and(|(ns, name)| is_dns_label(ns) && is_dns_label(name)) {
                return Err(format!("services.{key}: expected NAMESPACE/NAME"));
            }
        }
        Ok(())
    }

    /// One probe of a step, with the pods that run then (`life`); errors start with what
    /// follows `probes[j]`.
    fn validate_probe(&self, probe: &ProbeSpec, life: &Lifecycle) -> Result<(), String> {
        let r = Reachability::parse(&probe.expect).map_err(|e| format!(".expect: {e}"))?;
        let pods = self.pod_names();
        let rows: Vec<String> = match probe.from {
            ProbeSource::Pods => pods.clone(),
            ProbeSource::Outside => OUTSIDE_CLIENTS.iter().map(|c| c.to_string()).collect(),
            ProbeSource::Node => vec![NODE_ROW.to_string()],
        };
        if r.pods != rows {
            return Err(format!(".expect: rows {:?}, expected {:?} in order", r.pods, rows));
        }
        if probe.from == ProbeSource::Outside && (probe.to == ProbeTarget::Nodes || probe.protocol != Protocol::Tcp) {
            return Err(": `from: outside` probes the case's pods or Services over TCP".into());
        }
        if probe.from == ProbeSource::Node && (probe.to != ProbeTarget::Pods || probe.protocol != Protocol::Tcp) {
            return Err(": `from: node` probes the case's pods over TCP".into());
        }
        if probe.from != ProbeSource::Outside && probe.via != Via::NodePort {
            return Err(": `via` is for `from: outside` probes".into());
        }
        match probe.to {
            ProbeTarget::Pods if r.targets != pods => return Err(format!(".expect: header {:?}, expected {:?}", r.targets, pods)),
            ProbeTarget::Nodes if r.targets != [NODES_COLUMN] => {
                return Err(format!(".expect: header {:?}, expected {:?}", r.targets, [NODES_COLUMN]));
            }
            ProbeTarget::Services => {
                for t in &r.targets {
                    let svc = self.services.get(t).ok_or_else(|| format!(".expect: header: {t} is not a Service of the case"))?;
                    svc.reached_by(probe).map_err(|e| format!(": {t}: {e}"))?;
                }
            }
            _ => {}
        }
        for (row, from) in r.pods.iter().enumerate() {
            for (col, to) in r.targets.iter().enumerate() {
                let absent = |p: &String| pods.contains(p) && !life.runs(p);
                let pod_column = probe.to == ProbeTarget::Pods;
                if (absent(from) || (pod_column && absent(to))) && r.cells[row][col] != Expect::Unchecked {
                    return Err(format!(".expect: {from} -> {to}: a pod that does not run then has `-`"));
                }
            }
        }
        Ok(())
    }
}

/// Whether `s` is a DNS label (RFC 1123), as namespace, pod and Service names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl ServiceSpec {
    fn validate(&self) -> Result<(), String> {
        if let Some(ip) = &self.cluster_ip
            && ip != "None"
        {
            return Err(format!("clusterIP {ip:?}: the harness assigns addresses; only `None` (headless) may be given"));
        }
        let headless = self.is_headless();
        match self.kind {
            ServiceType::ExternalName => {
                let name = self.external_name.as_deref().ok_or("type ExternalName needs externalName")?;
                if self.external_address(Family::Ipv4).is_none() {
                    return Err(format!("externalName {name:?}: the harness resolves <outside client>.example only"));
                }
                if !self.selector.is_empty() || !self.endpoints.is_empty() || headless {
                    return Err("an ExternalName Service has no selector, endpoints or clusterIP".into());
                }
            }
            _ if self.external_name.is_some() => return Err("externalName is for type ExternalName".into()),
            ServiceType::NodePort | ServiceType::LoadBalancer if headless => {
                return Err("a headless Service is of type ClusterIP".into());
            }
            ServiceType::ClusterIP if self.external_traffic_policy != TrafficPolicy::Cluster => {
                return Err("externalTrafficPolicy is for NodePort and LoadBalancer Services".into());
            }
            _ => {}
        }
        if !self.selector.is_empty() && !self.endpoints.is_empty() {
            return Err("endpoints are for a Service without a selector".into());
        }
        if let Some(e) = self.endpoints.iter().find(|e| node_index(e).is_none()) {
            return Err(format!("endpoints: {e:?}: expected node-0 or node-1"));
        }
        if self.kind != ServiceType::ExternalName && self.ports.is_empty() {
            return Err("ports: a Service needs one".into());
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 || matches!(p.target_port, Some(TargetPort::Number(0))) {
                return Err(format!("ports[{i}]: port 0"));
            }
            if self.ports[..i].iter().any(|q| q.port == p.port && q.protocol == p.protocol) {
                return Err(format!("ports[{i}]: {}/{} twice", p.port, p.protocol.as_str()));
            }
        }
        Ok(())
    }

    pub fn is_headless(&self) -> bool {
        self.cluster_ip.as_deref() == Some("None")
    }

    /// The address an ExternalName Service's name resolves to in the harness.
    pub fn external_address(&self, family: Family) -> Option<std::net::IpAddr> {
        let client = self.external_name.as_deref()?.strip_suffix(".example")?;
        outside_address(client, family)
    }

    /// The port of the Service a probe uses.
    pub fn port(&self, probe: &ProbeSpec) -> Option<&ServicePortSpec> {
        self.ports.iter().find(|p| p.port == probe.port && p.protocol == probe.protocol)
    }

    /// Whether `probe` can reach this Service the way it says.
    fn reached_by(&self, probe: &ProbeSpec) -> Result<(), String> {
        if self.port(probe).is_none() {
            return Err(format!("no port {}/{}", probe.port, probe.protocol.as_str()));
        }
        if probe.from != ProbeSource::Outside {
            return Ok(());
        }
        match (probe.via, self.kind) {
            (Via::NodePort, ServiceType::NodePort | ServiceType::LoadBalancer) | (Via::LoadBalancer, ServiceType::LoadBalancer) => Ok(()),
            (Via::NodePortLocal, _) => {
                Err("`via: nodePortLocal` is for the pods' own Services (a case's says externalTrafficPolicy)".into())
            }
            (via, kind) => Err(format!("a {kind:?} Service has no way in for `via: {via:?}`")),
        }
    }
}

/// The index of node placeholder `node-0`, `node-1`.
pub fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < 2)
}

/// What exists at a step of a case, as its validation walks the steps.
struct Lifecycle {
    /// Pods by state.
    pods: BTreeMap<String, PodLife>,
    namespaces: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodLife {
    NotYet,
    Pending,
    Running,
    Finished,
    Deleted,
}

impl Lifecycle {
    fn new(case: &Case) -> Lifecycle {
        let pods = case
            .pod_names()
            .into_iter()
            .map(|p| {
                let l = if case.later.contains(&p) { PodLife::NotYet } else { PodLife::Running };
                (p, l)
            })
            .collect();
        let namespaces =
            crate::model::namespaces_of(&case.pod_names()).into_iter().filter(|n| !case.later_namespaces.contains(n)).collect();
        Lifecycle { pods, namespaces }
    }

    fn runs(&self, pod: &str) -> bool {
        self.pods.get(pod) == Some(&PodLife::Running)
    }

    fn state(&self, pod: &str) -> Result<PodLife, String> {
        self.pods.get(pod).copied().ok_or_else(|| format!("{pod} is not one of the case's pods"))
    }

    fn set(&mut self, pod: &str, from: &[PodLife], to: PodLife, what: &str) -> Result<(), String> {
        let now = self.state(pod)?;
        if !from.contains(&now) {
            return Err(format!("{what}: {pod} is {now:?}, expected one of {from:?}"));
        }
        let ns = pod.split_once('/').map_or("", |(n, _)| n);
        if matches!(to, PodLife::Pending | PodLife::Running) && !self.namespaces.iter().any(|n| n == ns) {
            return Err(format!("{what}: {pod}'s namespace {ns} does not exist then"));
        }
        self.pods.insert(pod.to_string(), to);
        Ok(())
    }

    fn event(&mut self, case: &Case, event: LifeEvent) -> Result<(), String> {
        match event {
            LifeEvent::DeleteNamespace(ns) => {
                if !self.namespaces.iter().any(|n| n == ns) {
                    return Err(format!("deleteNamespace: {ns} does not exist then"));
                }
                self.namespaces.retain(|n| n != ns);
                for (p, l) in self.pods.iter_mut() {
                    if p.split_once('/').is_some_and(|(n, _)| n == ns) && *l != PodLife::NotYet {
                        *l = PodLife::Deleted;
                    }
                }
            }
            LifeEvent::CreateNamespace(ns) => {
                if !case.later_namespaces.iter().any(|n| n == ns) || self.namespaces.iter().any(|n| n == ns) {
                    return Err(format!("createNamespace: {ns} must be one of laterNamespaces that does not exist yet"));
                }
                self.namespaces.push(ns.to_string());
            }
            LifeEvent::TakeOver { new, old } => {
                self.set(old, &[PodLife::Running], PodLife::Finished, "takeOver")
                    .and_then(|()| self.set(new, &[PodLife::NotYet], PodLife::Running, "takeOver"))
                    .map_err(|e| format!("{e} ({new} must be a `later` pod not yet started, {old} a running pod)"))?;
            }
            LifeEvent::Finish(pod, _) => self.set(pod, &[PodLife::Running], PodLife::Finished, "finish")?,
            LifeEvent::DeletePod(pod) => {
                self.set(pod, &[PodLife::Running, PodLife::Pending, PodLife::Finished], PodLife::Deleted, "deletePod")?
            }
            LifeEvent::Pending(pod) => self.set(pod, &[PodLife::NotYet], PodLife::Pending, "pending")?,
            LifeEvent::Start(pod) => self.set(pod, &[PodLife::NotYet, PodLife::Pending], PodLife::Running, "start")?,
        }
        Ok(())
    }

    /// A step's lifecycle changes, in the order the runners make them.
    fn step(&mut self, case: &Case, step: &Step) -> Result<(), String> {
        for event in step.lifecycle() {
            self.event(case, event)?;
        }
        for pod in step.label_pod.keys() {
            if matches!(self.state(pod)?, PodLife::NotYet | PodLife::Deleted) {
                return Err(format!("labelPod: {pod} does not exist then"));
            }
        }
        if let Some(ns) = step.label_namespace.keys().find(|ns| !self.namespaces.contains(ns)) {
            return Err(format!("labelNamespace: namespace {ns} does not exist then"));
        }
        // The API server refuses a namespaced object in a namespace that does not exist.
        for (verb, manifests) in [("apply", &step.apply), ("update", &step.update)] {
            for (j, m) in manifests.iter().enumerate() {
                if let Some(ns) = m.pointer("/metadata/namespace").and_then(|v| v.as_str()) {
                    if !self.namespaces.iter().any(|n| n == ns) {
                        return Err(format!("{verb}[{j}]: namespace {ns} does not exist then"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Reachability {
    /// Parses the text form: a header `- t1 t2 ...` (the columns), then one row per
    /// client, its name and one cell per column. Which rows and columns a probe has is
    /// the case's validation's business.
    pub fn parse(text: &str) -> Result<Reachability, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header: Vec<&str> = lines.next().ok_or("empty matrix")?.split_whitespace().collect();
        if header.first() != Some(&"-") {
            return Err("the header must start with `-`".into());
        }
        let targets: Vec<String> = header[1..].iter().map(|s| s.to_string()).collect();
        let mut pods: Vec<String> = Vec::new();
        let mut cells = Vec::new();
        for line in lines {
            let row: Vec<&str> = line.split_whitespace().collect();
            let name = row[0].to_string();
            if pods.contains(&name) {
                return Err(format!("row {name} twice"));
            }
            if row.len() != targets.len() + 1 {
                return Err(format!("row {name} has {} cells, expected {}", row.len() - 1, targets.len()));
            }
            let parsed: Result<Vec<Expect>, String> = row[1..]
                .iter()
                .map(|c| match *c {
                    "." => Ok(Expect::Connected),
                    "X" => Ok(Expect::Blocked),
                    "-" => Ok(Expect::Unchecked),
                    other => Err(format!("cell {other:?} in row {name}: expected `.`, `X` or `-`")),
                })
                .collect();
            cells.push(parsed?);
            pods.push(name);
        }
        if pods.is_empty() {
            return Err("no rows".into());
        }
        Ok(Reachability { pods, targets, cells })
    }

    /// A matrix of `pods` × `targets`, every cell unchecked.
    pub fn unchecked(pods: Vec<String>, targets: Vec<String>) -> Reachability {
        let cells = vec![vec![Expect::Unchecked; targets.len()]; pods.len()];
        Reachability { pods, targets, cells }
    }

    /// The text form, aligned.
    pub fn render(&self) -> Vec<String> {
        let w = self.pods.iter().chain(&self.targets).map(String::len).max().unwrap_or(1);
        let mut out = vec![format!("{:w$} {}", "-", self.targets.iter().map(|p| format!("{p:w$}")).collect::<Vec<_>>().join(" "))];
        for (i, from) in self.pods.iter().enumerate() {
            out.push(format!("{from:w$} {}", self.cells[i].iter().map(|c| format!("{:w$}", c.mark())).collect::<Vec<_>>().join(" ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_CASE: &str = "name: n\npods: [x/a, y/b]\nsteps:\n- probes:\n  - port: 80\n    protocol: TCP\n    to: nodes\n    expect: |\n      - nodes\n      x/a .\n      y/b X\n";

    #[test]
    fn a_node_probe_has_one_column_and_the_cases_pods_as_rows() {
        let case = Case::parse("t", NODE_CASE).unwrap();
        let probe = &case.steps[0].probes[0];
        assert_eq!(probe.to, ProbeTarget::Nodes);
        let r = Reachability::parse(&probe.expect).unwrap();
        assert_eq!(r.pods, ["x/a", "y/b"]);
        assert_eq!(r.targets, [NODES_COLUMN]);
        assert_eq!(r.cells, [[Expect::Connected], [Expect::Blocked]]);
        // Written back, read again: the same case.
        assert_eq!(Case::parse("t", &case.to_yaml()).unwrap(), case);
    }

    #[test]
    fn an_outside_probe_has_the_outside_clients_as_rows_and_tcp_only() {
        let case = "name: o\npods: [x/a, y/b]\nsteps:\n- probes:\n  - port: 80\n    protocol: TCP\n    from: outside\n    expect: |\n      - x/a y/b\n      outside-a . X\n      outside-b X X\n";
        let c = Case::parse("t", case).unwrap();
        assert_eq!(c.steps[0].probes[0].from, ProbeSource::Outside);
        let r = Reachability::parse(&c.steps[0].probes[0].expect).unwrap();
        assert_eq!(r.pods, OUTSIDE_CLIENTS);
        assert_eq!(r.cells, [[Expect::Connected, Expect::Blocked], [Expect::Blocked, Expect::Blocked]]);
        assert_eq!(Case::parse("t", &c.to_yaml()).unwrap(), c);
        assert!(Case::parse("t", &case.replace("protocol: TCP", "protocol: UDP")).unwrap_err().to_string().contains("over TCP"));
        assert!(Case::parse("t", &case.replace("    from: outside\n", "")).unwrap_err().to_string().contains("rows"));
        assert!(Case::parse("t", &case.replace("outside-b X X", "outside-c X X")).is_err());
    }

    #[test]
    fn a_later_pod_runs_from_its_take_over_and_the_pod_it_replaces_stops() {
        let case = "name: l\npods: [x/a, x/b]\nlater: [x/b]\nsteps:\n- probes:\n  - {port: 80, protocol: TCP, expect: \"- x/a x/b\\nx/a - -\\nx/b - -\"}\n- takeOver: {x/b: x/a}\n  probes:\n  - {port: 80, protocol: TCP, expect: \"- x/a x/b\\nx/a - -\\nx/b - -\"}\n";
        let c = Case::parse("t", case).unwrap();
        assert_eq!(c.later, ["x/b"]);
        assert_eq!(c.steps[1].take_over.get("x/b").map(String::as_str), Some("x/a"));
        assert_eq!(Case::parse("t", &c.to_yaml()).unwrap(), c);
        // x/b does not run in step 1, x/a no longer in step 2: their cells must be `-`.
        let err = Case::parse("t", &case.replacen("x/a - -", "x/a - .", 1)).unwrap_err().to_string();
        assert!(err.contains("does not run"), "{err}");
        let err = Case::parse("t", &case.replacen("x/b - -", "x/b . -", 2).replacen("x/b . -", "x/b - -", 1)).unwrap_err().to_string();
        assert!(err.contains("does not run"), "{err}");
        assert!(Case::parse("t", &case.replace("later: [x/b]\n", "")).unwrap_err().to_string().contains("takeOver"));
        assert!(Case::parse("t", &case.replace("later: [x/b]", "later: [x/c]")).unwrap_err().to_string().contains("later"));
    }

    #[test]
    fn a_kept_connection_is_opened_before_it_is_reused() {
        let case = "name: k\npods: [x/a, x/b]\nsteps:\n- open:\n    ab: {from: x/a, to: x/b, port: 80}\n- reuse: {ab: blocked}\n";
        let c = Case::parse("t", case).unwrap();
        assert_eq!(c.steps[1].reuse.get("ab"), Some(&Reuse::Blocked));
        assert_eq!(Case::parse("t", &c.to_yaml()).unwrap(), c);
        assert!(
            Case::parse("t", &case.replace("reuse: {ab: blocked}", "reuse: {cd: blocked}"))
                .unwrap_err()
                .to_string()
                .contains("no connection")
        );
        assert!(Case::parse("t", &case.replace("to: x/b", "to: x/z")).unwrap_err().to_string().contains("not a running pod"));
        // An end that stopped took the connection with it.
        let later = "name: k\npods: [x/a, x/b]\nsteps:\n- open:\n    ab: {from: x/a, to: x/b, port: 80}\n- finish: {x/b: Succeeded}\n- reuse: {ab: blocked}\n";
        assert!(Case::parse("t", later).unwrap_err().to_string().contains("steps[2].reuse.ab: x/b no longer runs"));
    }

    #[test]
    fn a_node_matrix_on_a_pod_probe_and_a_pod_matrix_on_a_node_probe_are_refused() {
        let pod_probe = NODE_CASE.replace("    to: nodes\n", "");
        assert!(Case::parse("t", &pod_probe).unwrap_err().to_string().contains("header"));
        let square = NODE_CASE.replace("- nodes\n      x/a .\n      y/b X", "- x/a y/b\n      x/a - .\n      y/b X -");
        assert!(Case::parse("t", &square).unwrap_err().to_string().contains("header"));
        assert!(Case::parse("t", &square.replace("    to: nodes\n", "")).is_ok());
    }

    const SERVICE_CASE: &str = "name: s
pods: [x/a, x/b]
containerPorts:
  x/b: [{name: web, port: 8080}]
services:
  x/web:
    type: NodePort
    selector: {pod: b}
    ports: [{port: 80, targetPort: web}]
  x/ext:
    type: ExternalName
    externalName: outside-a.example
    ports: [{port: 80}]
steps:
- probes:
  - port: 80
    protocol: TCP
    to: services
    expect: |
      - x/web x/ext
      x/a . .
      x/b - .
";

    #[test]
    fn a_case_declares_services_and_probes_reach_them_by_their_ports() {
        let c = Case::parse("t", SERVICE_CASE).unwrap();
        assert_eq!(c.services["x/web"].ports[0].target_port, Some(TargetPort::Name("web".into())));
        assert_eq!(c.services["x/ext"].external_address(Family::Ipv4), outside_address("outside-a", Family::Ipv4));
        assert_eq!(Case::parse("t", &c.to_yaml()).unwrap(), c);
        let err = |text: &str| Case::parse("t", text).unwrap_err().to_string();
        assert!(err(&SERVICE_CASE.replace("- x/web x/ext", "- x/web x/nope")).contains("not a Service of the case"));
        assert!(err(&SERVICE_CASE.replace("  - port: 80\n", "  - port: 81\n")).contains("no port 81/TCP"));
        assert!(err(&SERVICE_CASE.replace("outside-a.example", "example.com")).contains("outside client"));
        assert!(
            err(&SERVICE_CASE.replace("    selector: {pod: b}\n", "    selector: {pod: b}\n    endpoints: [node-0]\n"))
                .contains("without a selector")
        );
        assert!(err(&SERVICE_CASE.replace("type: NodePort", "type: NodePort\n    clusterIP: None")).contains("headless"));
        assert!(
            err(&SERVICE_CASE.replace("type: NodePort", "type: ClusterIP\n    externalTrafficPolicy: Local"))
                .contains("externalTrafficPolicy")
        );
        // From outside: a NodePort Service by its NodePort; an ExternalName has no way in.
        let outside = SERVICE_CASE
            .replace("    to: services\n", "    to: services\n    from: outside\n")
            .replace("x/a . .\n      x/b - .", "outside-a . .\n      outside-b X X");
        assert!(err(&outside).contains("no way in"));
        let outside =
            outside.replace("- x/web x/ext", "- x/web").replace("outside-a . .", "outside-a .").replace("outside-b X X", "outside-b X");
        assert!(Case::parse("t", &outside).is_ok());
        assert!(err(&outside.replace("    from: outside\n", "    from: outside\n    via: nodePortLocal\n")).contains("nodePortLocal"));
    }

    #[test]
    fn lifecycle_steps_follow_each_pod_and_namespace() {
        let case = "name: l
pods: [x/a, w/a]
later: [w/a]
laterNamespaces: [w]
steps:
- createNamespace: [w]
  pending: [w/a]
  probes:
  - {port: 80, protocol: TCP, expect: \"- x/a w/a\\nx/a - -\\nw/a - -\"}
- start: [w/a]
  probes:
  - {port: 80, protocol: TCP, expect: \"- x/a w/a\\nx/a - .\\nw/a . -\"}
- finish: {w/a: Failed}
- deletePod: [w/a]
- deleteNamespace: [w]
";
        let c = Case::parse("t", case).unwrap();
        assert_eq!(c.steps[2].finish.get("w/a"), Some(&Phase::Failed));
        assert_eq!(Case::parse("t", &c.to_yaml()).unwrap(), c);
        let err = |text: &str| Case::parse("t", text).unwrap_err().to_string();
        // A pending pod has no address: its cells are `-`.
        assert!(err(&case.replacen("x/a - -", "x/a - .", 1)).contains("does not run"));
        // A pod starts in a namespace that exists, once.
        assert!(err(&case.replace("- createNamespace: [w]\n  pending", "- pending")).contains("namespace w does not exist"));
        assert!(err(&case.replace("- finish: {w/a: Failed}", "- start: [w/a]")).contains("Running"));
        // Only a running pod finishes; a deleted one is not deleted again.
        assert!(err(&case.replace("- deletePod: [w/a]", "- finish: {w/a: Succeeded}")).contains("finish"));
        assert!(err(&case.replace("- deleteNamespace: [w]", "- deletePod: [w/a]")).contains("Deleted"));
        // Namespaces: only a later one is created, and it holds later pods only.
        assert!(err(&case.replace("laterNamespaces: [w]", "laterNamespaces: []")).contains("createNamespace"));
        assert!(err(&case.replace("later: [w/a]", "later: []")).contains("laterNamespaces"));
        assert!(err(&case.replace("- deleteNamespace: [w]", "- deleteNamespace: [v]")).contains("does not exist"));
        // A policy only in a namespace that exists.
        let policy = "  apply:\n  - {kind: NetworkPolicy, metadata: {name: p, namespace: w}, spec: {podSelector: {}}}\n";
        assert!(Case::parse("t", &case.replace("- start: [w/a]\n", &format!("- start: [w/a]\n{policy}"))).is_ok());
        let too_early = case.replace("- createNamespace: [w]\n", &format!("- probes: []\n{policy}- createNamespace: [w]\n"));
        assert!(err(&too_early).contains("steps[0].apply[0]: namespace w does not exist then"), "{}", err(&too_early));
        let too_late = format!("{case}{}", policy.replacen("  apply", "- apply", 1));
        assert!(err(&too_late).contains("steps[5].apply[0]: namespace w does not exist then"), "{}", err(&too_late));
    }

    #[test]
    fn a_node_probe_has_one_row_and_reaches_the_pods_over_tcp() {
        let case = "name: n\npods: [x/a]\nsteps:\n- probes:\n  - {port: 80, protocol: TCP, from: node, expect: \"- x/a\\nnode .\"}\n";
        let c = Case::parse("t", case).unwrap();
        assert_eq!(c.steps[0].probes[0].from, ProbeSource::Node);
        assert!(Case::parse("t", &case.replace("TCP", "UDP")).unwrap_err().to_string().contains("from: node"));
        assert!(Case::parse("t", &case.replace("node .", "x/a .")).unwrap_err().to_string().contains("rows"));
    }
}
