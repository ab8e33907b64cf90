//! Why a flow is allowed or blocked, in an operator's words.

use std::fmt::Write as _;
use std::net::IpAddr;

use std::collections::BTreeSet;

use policy_model::cnp::DecidedBy;
use policy_model::{
    AddressOwner, ClusterState, Decision, Direction, Family, Flow, IpProtocol, ObjectKey, Pod, RuleMatch, RuleRef, TierVerdict, Verdict,
    View, rule_matches_for, verdict,
};
use serde::Serialize;

use crate::describe;

/// `NS/POD` or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    Pod(ObjectKey),
    Address(IpAddr),
}

impl std::str::FromStr for Party {
    type Err = String;
    fn from_str(s: &str) -> Result<Party, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Party::Address(ip));
        }
        ObjectKey::parse(s).map(Party::Pod).ok_or_else(|| format!("{s:?}: expected NAMESPACE/POD or an IP address"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleCheck {
    #[serde(flatten)]
    pub rule: RuleRef,
    #[serde(flatten)]
    pub matched: RuleMatch,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowExplanation {
    pub family: Family,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_is: String,
    pub dst_is: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Every rule of the policies isolating the source (egress) and destination (ingress).
    pub egress_rules: Vec<RuleCheck>,
    pub ingress_rules: Vec<RuleCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    pub flows: Vec<FlowExplanation>,
    /// Whether ClusterNetworkPolicies exist: the text then walks the tiers.
    #[serde(skip)]
    pub tiered: bool,
    /// When some policy is audited (`policy-agent.io/enforcement: audit`, or the node's
    /// `--enforcement audit`): the verdict with the audited policies enforcing. `allowed`
    /// and `flows` above are what is enforced (as if audited policies did not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditExplanation>,
}

/// The verdict with audited policies enforcing.
#[derive(Debug, Clone, Serialize)]
pub struct AuditExplanation {
    pub allowed: bool,
    /// The audited policies of the sides whose verdict they change (empty: they change
    /// nothing for this flow).
    pub changed_by: Vec<ObjectKey>,
    /// Every audited policy that applies to either side.
    pub audited: Vec<ObjectKey>,
    pub flows: Vec<FlowExplanation>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("pod {0} is not in the manifests")]
    UnknownPod(ObjectKey),
    #[error("pod {0} has no address (status.podIPs is empty)")]
    NoAddress(ObjectKey),
    #[error("{from} and {to} share no address family")]
    NoCommonFamily { from: String, to: String },
    #[error("node {0} is not in the manifests")]
    UnknownNode(String),
}

fn addresses(state: &ClusterState, party: &Party) -> Result<Vec<IpAddr>, ExplainError> {
    match party {
        Party::Address(ip) => Ok(vec![*ip]),
        Party::Pod(key) => {
            let pod = state.pod(key).ok_or_else(|| ExplainError::UnknownPod(key.clone()))?;
            let ips: Vec<IpAddr> = if pod.host_network { pod.ips.clone() } else { state.owned_ips(pod).collect() };
            if ips.is_empty() {
                return Err(ExplainError::NoAddress(key.clone()));
            }
            Ok(ips)
        }
    }
}

fn who(state: &ClusterState, ip: IpAddr) -> String {
    match state.owner(ip) {
        AddressOwner::Pod(p) => format!("pod {}", p.key),
        AddressOwner::Node(n) => format!("node {n}"),
        AddressOwner::External => "an address of no pod or node".to_string(),
    }
}

fn label(party: &Party) -> String {
    match party {
        Party::Pod(k) => k.to_string(),
        Party::Address(ip) => ip.to_string(),
    }
}

fn checks(state: &ClusterState, subject: Option<&Pod>, direction: Direction, flow: &Flow) -> Vec<RuleCheck> {
    let Some(subject) = subject else {
        return Vec::new();
    };
    rule_matches_for(state, subject, direction, flow)
        .into_iter()
        .map(|(rule, matched)| {
            let policy = state.policy(&rule.policy).expect("rule of a known policy");
            let r = &policy.rules(direction).expect("isolating direction")[rule.rule];
            RuleCheck { text: describe::rule(policy, direction, r), rule, matched }
        })
        .collect()
}

pub fn explain(state: &ClusterState, from: &Party, to: &Party, protocol: IpProtocol, port: u16) -> Result<Explanation, ExplainError> {
    let flows = explain_flows(state, from, to, protocol, port)?;
    let audit = state.has_audited().then(|| {
        let mut audit_view = state.clone();
        audit_view.set_view(View::Audit);
        let audit_flows = explain_flows(&audit_view, from, to, protocol, port).expect("the same addresses as the enforced view");
        let (mut changed_by, mut audited) = (BTreeSet::new(), BTreeSet::new());
        for (f, a) in flows.iter().zip(&audit_flows) {
            for (addr, direction, before, after) in [
                (f.src, Direction::Egress, &f.verdict.egress_tiers, &a.verdict.egress_tiers),
                (f.dst, Direction::Ingress, &f.verdict.ingress_tiers, &a.verdict.ingress_tiers),
            ] {
                let Some(pod) = audit_view.pod_at(addr).filter(|p| !p.host_network) else { continue };
                let keys = policy_model::audit::audited_for(&audit_view, pod, direction);
                if before.allowed != after.allowed {
                    changed_by.extend(keys.iter().cloned());
                }
                audited.extend(keys);
            }
        }
        AuditExplanation {
            allowed: audit_flows.iter().all(|f| f.verdict.allowed),
            changed_by: changed_by.into_iter().collect(),
            audited: audited.into_iter().collect(),
            flows: audit_flows,
        }
    });
    Ok(Explanation {
        from: label(from),
        to: label(to),
        port,
        protocol: protocol.to_string(),
        allowed: flows.iter().all(|f| f.verdict.allowed),
        flows,
        tiered: state.cluster_policies().next().is_some(),
        audit,
    })
}

/// `explain --node-port`: the client's flow to each backend of a NodePort, judged by the
/// client's own address as the datapath judges it (see [`crate::node_port`]).
#[derive(Debug, Clone, Serialize)]
pub struct NodePortExplanation {
    pub from: String,
    #[serde(flatten)]
    pub node_port: crate::node_port::NodePort,
    /// The node the client connects to (`--via-node`); none: each backend's own node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via_node: Option<String>,
    /// Every backend the connection can reach allows it (kube-proxy may pick any).
    pub allowed: bool,
    /// One per backend, in the order of `backends`.
    pub explanations: Vec<BackendExplanation>,
}

/// How a NodePort connection reaches one backend, and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct BackendExplanation {
    /// What arrives at the backend: the client's own address, or (entering at another node
    /// under `externalTrafficPolicy: Cluster`) that node's address, as its masquerade
    /// leaves it; `None`: `Local` never sends the connection to this backend.
    pub judged_as: Option<String>,
    #[serde(flatten)]
    pub explanation: Option<Explanation>,
}

impl BackendExplanation {
    fn allowed(&self) -> Option<bool> {
        self.explanation.as_ref().map(|e| e.allowed)
    }
}

/// Explains a NodePort connection from `from`, entering at node `via_node` (none: the node
/// of each backend, where the datapath traces the client through the masquerade). From
/// another node, `Local` reaches only that node's backends, and `Cluster` masquerades the
/// client to that node's address before it crosses to a backend elsewhere: the backend's
/// node sees, and judges, that address (a forwarded packet: no node exemption).
pub fn explain_node_port(
    state: &ClusterState,
    from: &Party,
    node_port: crate::node_port::NodePort,
    protocol: IpProtocol,
    via_node: Option<&str>,
) -> Result<NodePortExplanation, ExplainError> {
    if let Some(n) = via_node
        && state.node(n).is_none()
    {
        return Err(ExplainError::UnknownNode(n.to_string()));
    }
    let local = node_port.external_traffic_policy == "Local";
    let client_family = addresses(state, from)?.first().map(|a| Family::of(*a));
    let mut explanations = Vec::new();
    for b in &node_port.backends {
        let backend_node = state.pods().find(|p| p.key == b.pod).and_then(|p| p.node.clone());
        let same_node = via_node.is_none() || via_node == backend_node.as_deref();
        let (judged_as, explanation) = match (same_node, local, via_node) {
            (true, _, _) | (_, _, None) => (Some(label(from)), Some(explain(state, from, &Party::Pod(b.pod.clone()), protocol, b.port)?)),
            (false, true, _) => (None, None),
            (false, false, Some(n)) => {
                let node_addr = state
                    .node(n)
                    .and_then(|node| node.addresses.iter().copied().find(|a| Some(Family::of(*a)) == client_family))
                    .ok_or_else(|| ExplainError::UnknownNode(format!("{n} (no address of the client's family)")))?;
                let e = explain(state, &Party::Address(node_addr), &Party::Pod(b.pod.clone()), protocol, b.port)?;
                (Some(node_addr.to_string()), Some(e))
            }
        };
        explanations.push(BackendExplanation { judged_as, explanation });
    }
    let reached: Vec<bool> = explanations.iter().filter_map(BackendExplanation::allowed).collect();
    let allowed = !reached.is_empty() && reached.iter().all(|a| *a);
    Ok(NodePortExplanation { from: label(from), via_node: via_node.map(str::to_string), allowed, node_port, explanations })
}

impl NodePortExplanation {
    pub fn render_text(&self) -> String {
        let np = &self.node_port;
        let reached: Vec<bool> = self.explanations.iter().filter_map(BackendExplanation::allowed).collect();
        let allowed = reached.iter().filter(|a| **a).count();
        let verdict = match allowed {
            _ if reached.is_empty() => "BLOCKED (no backend is reached)".to_string(),
            0 => "BLOCKED".to_string(),
            n if n == reached.len() => "ALLOWED".to_string(),
            n => format!("ALLOWED to {n} of {} backends", reached.len()),
        };
        let at = self.via_node.as_ref().map(|n| format!(" on node {n}")).unwrap_or_default();
        let mut out = format!(
            "{} -> NodePort {}/{}{at} of Service {} (port {}, externalTrafficPolicy {}): {verdict}\n",
            self.from, np.node_port, np.protocol, np.service, np.port, np.external_traffic_policy
        );
        out.push_str(
            "  judged by the client's own address, as the datapath judges it: kube-proxy's masquerade does not change the verdict",
        );
        out.push_str(if self.via_node.is_some() {
            " on the node the client enters\n"
        } else {
            " (entering at each backend's node; see --via-node)\n"
        });
        for (b, e) in np.backends.iter().zip(&self.explanations) {
            let _ = write!(out, "  via NodePort {} of Service {} to backend {} port {}", np.node_port, np.service, b.pod, b.port);
            match (&e.judged_as, &e.explanation) {
                (None, _) | (_, None) => {
                    let _ = writeln!(out, ": not reached (externalTrafficPolicy Local sends only to the node's own backends)");
                }
                (Some(as_), Some(x)) => {
                    if *as_ != self.from {
                        let _ = write!(out, ", on another node: masqueraded by the node the client enters, judged as {as_}");
                    }
                    let _ = writeln!(out, ":");
                    for line in x.render_text().lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                }
            }
        }
        out
    }
}

/// Each address family's flow, explained in the state's view.
fn explain_flows(
    state: &ClusterState,
    from: &Party,
    to: &Party,
    protocol: IpProtocol,
    port: u16,
) -> Result<Vec<FlowExplanation>, ExplainError> {
    let srcs = addresses(state, from)?;
    let dsts = addresses(state, to)?;
    let mut flows = Vec::new();
    for src in &srcs {
        let Some(dst) = dsts.iter().find(|d| d.is_ipv4() == src.is_ipv4()) else {
            continue;
        };
        let flow = Flow { src: *src, dst: *dst, protocol, port };
        let v = verdict(state, &flow);
        let src_pod = state.pod_at(flow.src);
        let dst_pod = state.pod_at(flow.dst);
        flows.push(FlowExplanation {
            family: Family::of(*src),
            src: *src,
            dst: *dst,
            src_is: who(state, *src),
            dst_is: who(state, *dst),
            egress_rules: checks(state, src_pod, Direction::Egress, &flow),
            ingress_rules: checks(state, dst_pod, Direction::Ingress, &flow),
            verdict: v,
        });
    }
    if flows.is_empty() {
        return Err(ExplainError::NoCommonFamily { from: label(from), to: label(to) });
    }
    Ok(flows)
}

fn side(out: &mut String, title: &str, decision: &Decision, rules: &[RuleCheck], direction: Direction) {
    let _ = match decision {
        Decision::NotAPod => writeln!(out, "  {title}: no policy applies (not a pod of the cluster)"),
        Decision::SelfTraffic => {
            writeln!(out, "  {title}: allowed (a pod can always reach itself)")
        }
        Decision::FromOwnNode { node } => writeln!(out, "  {title}: allowed (traffic from the pod's own node {node} is always allowed)"),
        Decision::NotIsolated => writeln!(out, "  {title}: allowed (not isolated: no NetworkPolicy selects the pod for {direction})"),
        Decision::Allowed { .. } => writeln!(out, "  {title}: allowed"),
        Decision::Denied { .. } => writeln!(out, "  {title}: BLOCKED (isolated, and no rule allows this)"),
    };
    let isolated_by = match decision {
        Decision::Allowed { isolated_by, .. } | Decision::Denied { isolated_by } => isolated_by,
        _ => return,
    };
    let names: Vec<String> = isolated_by.iter().map(|k| k.to_string()).collect();
    let _ = writeln!(out, "    isolated by {}", names.join(", "));
    for k in isolated_by {
        let of_policy: Vec<&RuleCheck> = rules.iter().filter(|r| &r.rule.policy == k).collect();
        if of_policy.is_empty() {
            let _ = writeln!(out, "    {k}: no {direction} rules (allows nothing)");
        }
        for r in of_policy {
            let status = match (r.matched.peer, r.matched.port) {
                (true, true) => "ALLOWS",
                (false, true) => "peer does not match",
                (true, false) => "port does not match",
                (false, false) => "neither peer nor port match",
            };
            let _ = writeln!(out, "    {k} {direction} rule #{}: {}  [{status}]", r.rule.rule, r.text);
        }
    }
}

/// One side's walk through the tiers (Admin, NetworkPolicy, Baseline, default allow):
/// the Pass rules that sent it on, the decision and who took it, and a warning when
/// policies of equal tier and priority would decide otherwise.
fn tiers(out: &mut String, title: &str, t: &TierVerdict) {
    let verdict = if t.allowed { "allowed" } else { "BLOCKED" };
    let _ = match &t.decided_by {
        DecidedBy::Exempt => writeln!(out, "  {title} tiers: {verdict} (not subject to ClusterNetworkPolicy)"),
        DecidedBy::ClusterRule { rule } => writeln!(
            out,
            "  {title} tiers: {verdict} by {} tier ClusterNetworkPolicy {} (priority {}), rule #{}{}: {}",
            rule.tier,
            rule.policy,
            rule.priority,
            rule.rule,
            if rule.name.is_empty() { String::new() } else { format!(" {:?}", rule.name) },
            rule.action
        ),
        DecidedBy::NetworkPolicy => writeln!(out, "  {title} tiers: {verdict} by the NetworkPolicy tier (below)"),
        DecidedBy::DefaultAllow => writeln!(out, "  {title} tiers: {verdict} (no tier decided: default allow)"),
    };
    for p in &t.passed_by {
        let _ = writeln!(
            out,
            "    passed on by {} tier ClusterNetworkPolicy {} (priority {}), rule #{}{}",
            p.tier,
            p.policy,
            p.priority,
            p.rule,
            if p.name.is_empty() { String::new() } else { format!(" {:?}", p.name) }
        );
    }
    if !t.ambiguous_with.is_empty() {
        let _ = writeln!(
            out,
            "    WARNING: {} share this tier and priority and would act otherwise; upstream lets an implementation apply any of them, this agent applies them in name order",
            t.ambiguous_with.join(", ")
        );
    }
}

impl Explanation {
    /// Families that reach the same verdict for the same reasons are shown once. With
    /// audited policies, the verdict they would give follows.
    pub fn render_text(&self) -> String {
        let mut out = self.render_flows(&self.flows);
        let Some(a) = &self.audit else { return out };
        let names = |keys: &[ObjectKey]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
        let verdict = |allowed: bool| if allowed { "ALLOWED" } else { "BLOCKED" };
        if a.changed_by.is_empty() {
            if !a.audited.is_empty() {
                let _ = writeln!(
                    out,
                    "audit: the audited policies ({}) change nothing here: {} either way",
                    names(&a.audited),
                    verdict(a.allowed)
                );
            }
            return out;
        }
        let _ = writeln!(
            out,
            "AUDIT: enforced, this is {}; with the audited policies enforcing it would be {} (changed by audited {})",
            verdict(self.allowed),
            verdict(a.allowed),
            names(&a.changed_by)
        );
        let _ = writeln!(out, "with the audited policies enforcing:");
        for line in self.render_flows(&a.flows).lines() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    fn render_flows(&self, all: &[FlowExplanation]) -> String {
        let mut groups: Vec<(Vec<&FlowExplanation>, String)> = Vec::new();
        for f in all {
            let mut body = String::new();
            if self.tiered {
                tiers(&mut body, &format!("egress of {}", f.src_is), &f.verdict.egress_tiers);
                tiers(&mut body, &format!("ingress of {}", f.dst_is), &f.verdict.ingress_tiers);
            }
            side(&mut body, &format!("egress of {}", f.src_is), &f.verdict.egress, &f.egress_rules, Direction::Egress);
            side(&mut body, &format!("ingress of {}", f.dst_is), &f.verdict.ingress, &f.ingress_rules, Direction::Ingress);
            match groups.iter_mut().find(|(_, b)| *b == body) {
                Some((flows, _)) => flows.push(f),
                None => groups.push((vec![f], body)),
            }
        }
        let mut out = String::new();
        for (flows, body) in groups {
            let families: Vec<&str> = flows.iter().map(|f| f.family.as_str()).collect();
            let _ = writeln!(
                out,
                "{} -> {} {}/{} ({}): {}",
                self.from,
                self.to,
                self.protocol,
                self.port,
                families.join(" and "),
                if flows[0].verdict.allowed { "ALLOWED" } else { "BLOCKED" }
            );
            for f in &flows {
                let _ = writeln!(out, "  from {} ({}) to {} ({})", f.src, f.src_is, f.dst, f.dst_is);
            }
            out.push_str(&body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::Manifests;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: []}
status: {podIPs: [{ip: 10.244.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
spec: {nodeName: n1, containers: []}
status: {podIPs: [{ip: 10.244.0.11}]}
"#;

    fn cnp(name: &str, tier: &str, priority: u16, action: &str) -> String {
        format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{tier: {tier}, priority: {priority}, subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}, ingress: [{{name: r-{name}, action: {action}, from: [{{namespaces: {{}}}}]}}]}}\n"
        )
    }

    fn text(extra: &str) -> String {
        let mut m = Manifests::default();
        m.add_yaml("t", &format!("{PODS}{extra}"));
        let (state, errors) = m.state();
        assert!(errors.is_empty(), "{errors:?}");
        let from = Party::Pod(ObjectKey::new("y", "b"));
        let to = Party::Pod(ObjectKey::new("x", "a"));
        explain(&state, &from, &to, IpProtocol::TCP, 80).unwrap().render_text()
    }

    /// Each tier's decision with policy, rule name, priority and action; the Pass that
    /// sent it on; and the equal-priority warning.
    #[test]
    fn tiers_are_shown_with_provenance() {
        let t = text(&format!("{}{}", cnp("pass", "Admin", 5, "Pass"), cnp("deny", "Baseline", 9, "Deny")));
        assert!(t.contains("BLOCKED"), "{t}");
        assert!(
            t.contains(
                "ingress of pod x/a tiers: BLOCKED by Baseline tier ClusterNetworkPolicy deny (priority 9), rule #0 \"r-deny\": Deny"
            ),
            "{t}"
        );
        assert!(t.contains("passed on by Admin tier ClusterNetworkPolicy pass (priority 5), rule #0 \"r-pass\""), "{t}");
        assert!(!t.contains("WARNING"), "{t}");
        let t = text(&format!("{}{}", cnp("one", "Admin", 5, "Accept"), cnp("two", "Admin", 5, "Deny")));
        assert!(t.contains("WARNING: two share this tier and priority"), "{t}");
        // Without ClusterNetworkPolicies the text is as before: no tier lines.
        assert!(!text("").contains("tiers:"));
    }

    fn deny_all(name: &str, annotation: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x{annotation}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
        )
    }

    /// Both verdicts: the enforced one (as if audited policies did not exist) and the one
    /// with them enforcing, naming the audited policy that changes it.
    #[test]
    fn audited_policies_are_shown_beside_the_enforced_verdict() {
        let t = text(&deny_all("deny", ", annotations: {policy-agent.io/enforcement: audit}"));
        assert!(t.starts_with("y/b -> x/a TCP/80 (ipv4): ALLOWED"), "{t}");
        assert!(
            t.contains(
                "AUDIT: enforced, this is ALLOWED; with the audited policies enforcing it would be BLOCKED (changed by audited x/deny)"
            ),
            "{t}"
        );
        assert!(t.contains("  ingress of pod x/a: BLOCKED (isolated, and no rule allows this)"), "{t}");
        // Enforced: no audit section.
        assert!(!text(&deny_all("deny", "")).contains("audit"), "{}", text(&deny_all("deny", "")));
        // An audited policy that changes nothing here (an enforced one denies already).
        let t = text(&format!("{}{}", deny_all("deny", ""), deny_all("also", ", annotations: {policy-agent.io/enforcement: audit}")));
        assert!(t.contains("BLOCKED") && t.contains("audit: the audited policies (x/also) change nothing here: BLOCKED either way"), "{t}");
    }
}
