//! Case files: upstream-style NetworkPolicy tests as data (see conformance/cases/).

use std::collections::BTreeMap;
use std::path::Path;

use policy_model::Protocol;
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
    /// Pods of `pods` that do not exist until a step's `takeOver` starts them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later: Vec<String>,
    pub steps: Vec<Step>,
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

/// The rows of a `from: outside` probe.
pub const OUTSIDE_CLIENTS: [&str; 2] = ["outside-a", "outside-b"];

/// The address of outside client `name` in `family` (documentation ranges, which only
/// ever exist inside the test's namespaces).
pub fn outside_address(name: &str, family: policy_model::Family) -> Option<std::net::IpAddr> {
    let i = OUTSIDE_CLIENTS.iter().position(|c| *c == name)?;
    Some(match family {
        policy_model::Family::Ipv4 => std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 10 + i as u8)),
        policy_model::Family::Ipv6 => std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10 + i as u16)),
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
        let pods = self.pod_names();
        for p in &pods {
            // w: a fourth namespace, for ClusterNetworkPolicy cases (upstream's suite uses four).
            let ok = p.split_once('/').is_some_and(|(ns, name)| ["x", "y", "z", "w"].contains(&ns) && !name.is_empty());
            if !ok {
                return Err(format!("pod {p:?}: expected x|y|z|w/NAME"));
            }
        }
        for p in &self.later {
            if !pods.contains(p) {
                return Err(format!("later: {p} is not one of the case's pods"));
            }
        }
        // Pods that do not exist at a step (not started yet, or completed): their rows and
        // columns must be `-`.
        let mut absent: Vec<String> = self.later.clone();
        let mut opened: Vec<&String> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            for name in step.reuse.keys() {
                if !opened.contains(&name) {
                    return Err(format!("steps[{i}].reuse: no connection {name:?} was opened in an earlier step"));
                }
            }
            for (new, old) in &step.take_over {
                if !absent.contains(new) || absent.contains(old) || !pods.contains(old) {
                    return Err(format!("steps[{i}].takeOver: {new} must be a `later` pod not yet started, {old} a running pod"));
                }
                absent.retain(|p| p != new);
                absent.push(old.clone());
            }
            for (j, probe) in step.probes.iter().enumerate() {
                let r = Reachability::parse(&probe.expect).map_err(|e| format!("steps[{i}].probes[{j}].expect: {e}"))?;
                let rows: Vec<String> = match probe.from {
                    ProbeSource::Pods => pods.clone(),
                    ProbeSource::Outside => OUTSIDE_CLIENTS.iter().map(|c| c.to_string()).collect(),
                };
                if r.pods != rows {
                    return Err(format!("steps[{i}].probes[{j}].expect: rows {:?}, expected {:?} in order", r.pods, rows));
                }
                if probe.from == ProbeSource::Outside && (probe.to != ProbeTarget::Pods || probe.protocol != Protocol::Tcp) {
                    return Err(format!("steps[{i}].probes[{j}]: `from: outside` probes the case's pods over TCP"));
                }
                if probe.from != ProbeSource::Outside && probe.via != Via::NodePort {
                    return Err(format!("steps[{i}].probes[{j}]: `via` is for `from: outside` probes"));
                }
                let columns = match probe.to {
                    ProbeTarget::Pods => pods.clone(),
                    ProbeTarget::Nodes => vec![NODES_COLUMN.to_string()],
                };
                if r.targets != columns {
                    return Err(format!("steps[{i}].probes[{j}].expect: header {:?}, expected {:?}", r.targets, columns));
                }
                for (row, from) in r.pods.iter().enumerate() {
                    for (col, to) in r.targets.iter().enumerate() {
                        if (absent.contains(from) || absent.contains(to)) && r.cells[row][col] != Expect::Unchecked {
                            return Err(format!("steps[{i}].probes[{j}].expect: {from} -> {to}: a pod that does not run then has `-`"));
                        }
                    }
                }
            }
            for (name, c) in &step.open {
                if opened.contains(&name) {
                    return Err(format!("steps[{i}].open: {name:?} is opened twice"));
                }
                for p in [&c.from, &c.to] {
                    if !pods.contains(p) || absent.contains(p) {
                        return Err(format!("steps[{i}].open.{name}: {p} is not a running pod of the case"));
                    }
                }
                opened.push(name);
            }
        }
        Ok(())
    }
}

impl Reachability {
    /// Parses the text form: a header `- p1 p2 ...`, then one row per client: the same
    /// pods in the same order, or (header `- nodes`, or rows of [`OUTSIDE_CLIENTS`]) any
    /// clients, one cell per column each.
    pub fn parse(text: &str) -> Result<Reachability, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header: Vec<&str> = lines.next().ok_or("empty matrix")?.split_whitespace().collect();
        if header.first() != Some(&"-") {
            return Err("the header must start with `-`".into());
        }
        let targets: Vec<String> = header[1..].iter().map(|s| s.to_string()).collect();
        let mut lines = lines.peekable();
        let outside = lines.peek().is_some_and(|l| OUTSIDE_CLIENTS.iter().any(|c| l.split_whitespace().next() == Some(*c)));
        let square = targets != [NODES_COLUMN] && !outside;
        let mut pods = Vec::new();
        let mut cells = Vec::new();
        for (i, line) in lines.enumerate() {
            let row: Vec<&str> = line.split_whitespace().collect();
            let name = *row.first().ok_or("empty row")?;
            if square {
                let expected_pod = targets.get(i).ok_or_else(|| format!("more rows than columns at {line:?}"))?;
                if name != expected_pod {
                    return Err(format!("row {} must start with {expected_pod}, found {line:?}", i + 1));
                }
            } else if pods.iter().any(|p| p == name) {
                return Err(format!("row {name} twice"));
            }
            let expected_pod = name.to_string();
            pods.push(expected_pod.clone());
            if row.len() != targets.len() + 1 {
                return Err(format!("row {expected_pod} has {} cells, expected {}", row.len() - 1, targets.len()));
            }
            let parsed: Result<Vec<Expect>, String> = row[1..]
                .iter()
                .map(|c| match *c {
                    "." => Ok(Expect::Connected),
                    "X" => Ok(Expect::Blocked),
                    "-" => Ok(Expect::Unchecked),
                    other => Err(format!("cell {other:?} in row {expected_pod}: expected `.`, `X` or `-`")),
                })
                .collect();
            cells.push(parsed?);
        }
        if square && cells.len() != targets.len() {
            return Err(format!("{} rows for {} pods", cells.len(), targets.len()));
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
    }

    #[test]
    fn a_node_matrix_on_a_pod_probe_and_a_pod_matrix_on_a_node_probe_are_refused() {
        let pod_probe = NODE_CASE.replace("    to: nodes\n", "");
        assert!(Case::parse("t", &pod_probe).unwrap_err().to_string().contains("header"));
        let square = NODE_CASE.replace("- nodes\n      x/a .\n      y/b X", "- x/a y/b\n      x/a - .\n      y/b X -");
        assert!(Case::parse("t", &square).unwrap_err().to_string().contains("header"));
        assert!(Case::parse("t", &square.replace("    to: nodes\n", "")).is_ok());
    }
}
