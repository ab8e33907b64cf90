//! Audit mode: audited policies enforce nothing (the enforced tables are those of the
//! cluster without them), and the audit tables give the verdict with them enforcing.

use std::collections::BTreeSet;
use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::props::{NAMESPACES, NODES, PORTS, PodSpec, cases, ns_labels, pod_from, pod_spec, policy_spec};
use super::*;
use crate::audit::{Enforcement, View, compile_pod_with_audit};
use crate::{Change, Direction, NodeCompiler, compile_endpoint};

/// A NetworkPolicy with an enforcement annotation (`None`: no annotation).
fn annotated_policy(ns: &str, name: &str, spec: Value, enforcement: Option<&str>) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    let mut np = mk_policy(ns, name, spec);
    if let Some(e) = enforcement {
        np.metadata.annotations = Some([(crate::ENFORCEMENT_ANNOTATION.to_string(), e.to_string())].into());
    }
    np
}

fn audited_ns(name: &str, kv: &[(&str, &str)], audit: bool) -> Namespace {
    let mut ns = mk_ns(name, kv);
    if audit {
        ns.enforcement = Enforcement::Audit;
    }
    ns
}

const DENY_ALL_INGRESS: fn() -> Value = || json!({"podSelector": {}, "policyTypes": ["Ingress"]});

fn xyz_with(policies: &[(&str, Value, Option<&str>)]) -> ClusterState {
    let mut w = World::xyz();
    w.pod(mk_pod("x", "a", &[("pod", "a")], &["10.244.0.1"]));
    w.pod(mk_pod("x", "b", &[("pod", "b")], &["10.244.0.2"]));
    w.pod(mk_pod("y", "c", &[("pod", "c")], &["10.244.0.3"]));
    for (name, spec, e) in policies {
        w.state.upsert_policy(valid(&annotated_policy("x", name, spec.clone(), *e)));
    }
    w.state
}

fn flow(state: &ClusterState, from: &str, to: &str, port: u16) -> Flow {
    let ip = |k: &str| state.pod(&ObjectKey::parse(k).unwrap()).unwrap().ips[0];
    Flow { src: ip(from), dst: ip(to), protocol: IpProtocol::TCP, port }
}

#[test]
fn the_annotation_reads_audit_enforce_and_reports_anything_else() {
    let np = |e: Option<&str>| valid(&annotated_policy("x", "p", DENY_ALL_INGRESS(), e)).enforcement;
    assert_eq!(np(None), Enforcement::Enforce);
    assert_eq!(np(Some("enforce")), Enforcement::Enforce);
    assert_eq!(np(Some("audit")), Enforcement::Audit);
    let bad = np(Some("Audit"));
    assert!(!bad.is_audit(), "an invalid value enforces (fail closed)");
    let err = bad.error("NetworkPolicy", &ObjectKey::new("x", "p")).expect("reported").to_string();
    assert_eq!(
        err,
        "NetworkPolicy x/p is invalid: metadata.annotations[policy-agent.io/enforcement]: Unsupported value: \"Audit\": \
         supported values: \"audit\", \"enforce\" (enforced until fixed)"
    );
    assert!(Enforcement::Audit.error("NetworkPolicy", &ObjectKey::new("x", "p")).is_none());

    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
        "metadata": {"name": "x", "annotations": {"policy-agent.io/enforcement": "audit", "other": "1"}}
    }))
    .unwrap();
    assert_eq!(Namespace::from_k8s(&ns).unwrap().enforcement, Enforcement::Audit);
}

/// An audited default-deny: the enforced tables and verdict are those without it, the
/// audit tables and the audit view's verdict those with it, naming it.
#[test]
fn an_audited_policy_enforces_nothing_and_its_audit_tables_deny() {
    let mut state = xyz_with(&[("deny", DENY_ALL_INGRESS(), Some("audit"))]);
    let f = flow(&state, "x/a", "x/b", 80);
    assert!(verdict(&state, &f).allowed, "enforced: as if the audited policy did not exist");
    assert!(!state.with_view(View::Audit, |s| verdict(s, &f)).allowed, "audit view: denied");
    let b = state.pod(&ObjectKey::new("x", "b")).unwrap().clone();
    let t = compile_pod_with_audit(&mut state, &b);
    assert!(!t.ingress.isolated, "the enforced table ignores the audited policy");
    let audit = t.audit.ingress.as_ref().expect("an audit table for ingress");
    assert_eq!(audit.audited, vec![ObjectKey::new("x", "deny")]);
    assert!(audit.table.isolated && !audit.table.allows(f.src, f.protocol, f.port));
    assert!(t.audit.egress.is_none(), "the policy has no egress side");
    assert_eq!(state.view(), View::Enforced, "the view is restored");
}

/// Every policy of a namespace annotated `audit` is audited; an enforced policy next to
/// an audited one still denies what it denies.
#[test]
fn a_namespace_annotation_audits_its_policies_and_enforced_ones_still_deny() {
    let mut state = xyz_with(&[
        ("deny", DENY_ALL_INGRESS(), Some("audit")),
        ("only-80", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80}]}]}), None),
    ]);
    // x/a: the enforced policy allows port 80 only.
    let to_a_81 = flow(&state, "x/b", "x/a", 81);
    let to_a_80 = flow(&state, "x/b", "x/a", 80);
    assert!(!verdict(&state, &to_a_81).allowed && verdict(&state, &to_a_80).allowed);
    let a = state.pod(&ObjectKey::new("x", "a")).unwrap().clone();
    let t = compile_pod_with_audit(&mut state, &a);
    assert!(t.ingress.isolated && !t.ingress.allows(to_a_81.src, IpProtocol::TCP, 81));
    // With the audited deny-all enforcing, port 80 stays allowed (NetworkPolicies add up):
    // the audit view changes nothing for x/a.
    assert!(t.audit.ingress.is_none(), "{:?}", t.audit);

    // The namespace audits: the enforced policy is audited too.
    state.upsert_namespace(audited_ns("x", &[], true));
    assert!(verdict(&state, &to_a_81).allowed);
    assert!(!state.with_view(View::Audit, |s| verdict(s, &to_a_81)).allowed);
    let t = compile_pod_with_audit(&mut state, &a);
    assert!(!t.ingress.isolated);
    assert_eq!(t.audit.ingress.as_ref().unwrap().audited, vec![ObjectKey::new("x", "deny"), ObjectKey::new("x", "only-80")]);
}

/// The compiler follows annotation changes of policies and namespaces, and the node's
/// switch, recompiling the pods they touch.
#[test]
fn the_compiler_follows_annotations_and_the_node_switch() {
    let mut c = NodeCompiler::new("n1");
    let mut init = vec![Change::UpsertNamespace(mk_ns("x", &[]))];
    for (name, ip) in [("a", "10.244.0.1"), ("b", "10.244.0.2")] {
        init.push(Change::UpsertPod(mk_pod("x", name, &[("pod", name)], &[ip])));
    }
    init.push(Change::UpsertPolicy(Box::new(annotated_policy("x", "deny", DENY_ALL_INGRESS(), Some("audit")))));
    let r = c.apply(init);
    assert!(r.annotation_errors.is_empty());
    let b = ObjectKey::new("x", "b");
    let isolated = |c: &NodeCompiler| c.endpoint(&b).unwrap().tables.ingress.isolated;
    let audited = |c: &NodeCompiler| c.endpoint(&b).unwrap().tables.audit.ingress.is_some();
    assert!(!isolated(&c) && audited(&c));

    // Enforced: the annotation removed.
    let rev = c.endpoint(&b).unwrap().revision;
    let r = c.apply([Change::UpsertPolicy(Box::new(annotated_policy("x", "deny", DENY_ALL_INGRESS(), None)))]);
    assert!(r.changed.contains(&b) && isolated(&c) && !audited(&c));
    assert_ne!(c.endpoint(&b).unwrap().revision, rev);

    // The namespace audits it.
    let r = c.apply([Change::UpsertNamespace(audited_ns("x", &[], true))]);
    assert!(r.changed.contains(&b) && !isolated(&c) && audited(&c));
    let r = c.apply([Change::UpsertNamespace(audited_ns("x", &[], false))]);
    assert!(r.changed.contains(&b) && isolated(&c) && !audited(&c));

    // An invalid value: reported, naming the object and the annotation, and enforced.
    let r = c.apply([Change::UpsertPolicy(Box::new(annotated_policy("x", "deny", DENY_ALL_INGRESS(), Some("dry-run"))))]);
    assert_eq!(r.annotation_errors.len(), 1);
    let text = r.annotation_errors[0].to_string();
    assert!(text.contains("NetworkPolicy x/deny") && text.contains("metadata.annotations[policy-agent.io/enforcement]"), "{text}");
    assert!(isolated(&c));
    let mut bad_ns = mk_ns("x", &[]);
    bad_ns.enforcement = Enforcement::Invalid("yes".into());
    let r = c.apply([Change::UpsertNamespace(bad_ns)]);
    assert!(r.annotation_errors[0].to_string().starts_with("Namespace x is invalid"), "{:?}", r.annotation_errors);
    assert!(isolated(&c));

    // The node audits everything.
    let r = c.set_audit_all(true);
    assert!(r.changed.contains(&b) && !isolated(&c) && audited(&c));
    let r = c.set_audit_all(false);
    assert!(r.changed.contains(&b) && isolated(&c) && !audited(&c));
}

/// `--enforcement audit` with ClusterNetworkPolicies: they are audited too.
#[test]
fn the_node_switch_audits_cluster_network_policies() {
    let mut state = xyz_with(&[]);
    state.upsert_cluster_policy(crate::cnp::tests::valid_cnp(
        "deny-from-y",
        json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
               "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}),
    ));
    let f = flow(&state, "y/c", "x/a", 80);
    assert!(!verdict(&state, &f).allowed);
    state.set_audit_all(true);
    assert!(verdict(&state, &f).allowed, "enforced view: no cluster policy");
    assert!(!state.with_view(View::Audit, |s| verdict(s, &f)).allowed);
    let a = state.pod(&ObjectKey::new("x", "a")).unwrap().clone();
    let t = compile_pod_with_audit(&mut state, &a);
    assert!(!t.ingress.isolated);
    let audit = t.audit.ingress.as_ref().expect("audit table");
    assert_eq!(audit.audited, vec![ObjectKey::new("", "deny-from-y")]);
    assert!(!audit.table.allows(f.src, f.protocol, f.port));
}

// ---- property test ----

#[derive(Debug, Clone)]
enum Step {
    Pod(usize, PodSpec),
    DeletePod(usize, usize),
    Policy(usize, (usize, Value), usize),
    DeletePolicy(usize, usize),
    Namespace(usize, Vec<(&'static str, &'static str)>, bool),
    ClusterPolicy(usize, Value),
    DeleteClusterPolicy(usize),
    AuditAll(bool),
}

/// No annotation, `audit`, `enforce`, or an invalid value.
const ANNOTATIONS: [Option<&str>; 4] = [None, Some("audit"), Some("enforce"), Some("bogus")];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..7usize, pod_spec()).prop_map(|(i, s)| Step::Pod(i, s)),
        1 => (0..3usize, 0..7usize).prop_map(|(n, i)| Step::DeletePod(n, i)),
        3 => (0..5usize, policy_spec(), 0..ANNOTATIONS.len()).prop_map(|(i, p, a)| Step::Policy(i, p, a)),
        1 => (0..3usize, 0..5usize).prop_map(|(n, i)| Step::DeletePolicy(n, i)),
        2 => (0..3usize, ns_labels(), any::<bool>()).prop_map(|(i, l, a)| Step::Namespace(i, l[0].clone(), a)),
        1 => (0..2usize, crate::cnp::tests::props::cnp_spec()).prop_map(|(i, s)| Step::ClusterPolicy(i, s)),
        1 => (0..2usize).prop_map(Step::DeleteClusterPolicy),
        1 => any::<bool>().prop_map(Step::AuditAll),
    ]
}

fn change(s: Step) -> Result<Change, bool> {
    Ok(match s {
        Step::Pod(i, spec) => Change::UpsertPod(pod_from(i, &spec)),
        Step::DeletePod(n, i) => Change::DeletePod(ObjectKey::new(NAMESPACES[n], format!("p{i}"))),
        Step::Policy(i, (n, spec), a) => {
            Change::UpsertPolicy(Box::new(annotated_policy(NAMESPACES[n], &format!("np{i}"), spec, ANNOTATIONS[a])))
        }
        Step::DeletePolicy(n, i) => Change::DeletePolicy(ObjectKey::new(NAMESPACES[n], format!("np{i}"))),
        Step::Namespace(i, l, a) => Change::UpsertNamespace(audited_ns(NAMESPACES[i], &l, a)),
        Step::ClusterPolicy(i, spec) => Change::UpsertClusterPolicy(Box::new(crate::cnp::tests::mk_cnp(&format!("cnp{i}"), spec))),
        Step::DeleteClusterPolicy(i) => Change::DeleteClusterPolicy(format!("cnp{i}")),
        Step::AuditAll(on) => return Err(on),
    })
}

/// The cluster as the API has it with the audited policies deleted (and, when the node
/// audits, every ClusterNetworkPolicy): built afresh, with no annotation anywhere.
fn without_audited(state: &ClusterState) -> ClusterState {
    rebuilt(state, |p| !state.is_audited(p), !state.audit_all())
}

/// The cluster with every policy enforcing: built afresh, with no annotation anywhere.
fn all_enforced(state: &ClusterState) -> ClusterState {
    rebuilt(state, |_| true, true)
}

fn rebuilt(state: &ClusterState, keep: impl Fn(&Policy) -> bool, cluster_policies: bool) -> ClusterState {
    let mut out = ClusterState::new();
    for ns in state.namespaces() {
        out.upsert_namespace(Namespace::new(ns.name.clone(), ns.labels.clone()));
    }
    for n in state.nodes() {
        out.upsert_node(n.clone());
    }
    for p in state.pods() {
        out.upsert_pod(p.clone());
    }
    for p in state.policies().filter(|p| keep(p)) {
        out.upsert_policy(Policy { enforcement: Enforcement::Enforce, ..p.clone() });
    }
    if cluster_policies {
        for p in state.cluster_policies() {
            out.upsert_cluster_policy(p.clone());
        }
    }
    out
}

/// Flows to check: every pair of local and other addresses (both directions), a few
/// ports and protocols.
fn flows(state: &ClusterState) -> Vec<Flow> {
    let mut addrs: BTreeSet<IpAddr> = state.pods().flat_map(|p| p.ips.iter().copied()).collect();
    addrs.extend(NODES.iter().flat_map(|(_, a, b)| [a.parse::<IpAddr>().unwrap(), b.parse().unwrap()]));
    addrs.extend(["8.8.8.8", "2001:db8::1"].map(|a| a.parse::<IpAddr>().unwrap()));
    let local: BTreeSet<IpAddr> =
        state.pods().filter(|p| !p.host_network && p.node.as_deref() == Some("n1")).flat_map(|p| p.ips.iter().copied()).collect();
    let mut out = Vec::new();
    let protos = [(IpProtocol::TCP, PORTS[1]), (IpProtocol::UDP, PORTS[0]), (IpProtocol::TCP, PORTS[3]), (IpProtocol::ICMP, 0)];
    for (i, s) in addrs.iter().enumerate() {
        for (j, d) in addrs.iter().enumerate() {
            if s.is_ipv4() != d.is_ipv4() || !(local.contains(s) || local.contains(d)) {
                continue;
            }
            let (protocol, port) = protos[(i + j) % protos.len()];
            out.push(Flow { src: *s, dst: *d, protocol, port });
        }
    }
    out
}

/// In the compiler's state: every local endpoint's enforced tables are those of the
/// cluster without the audited policies (compiled afresh, and deciding as the reference
/// evaluator does there), its audit-view tables those of the cluster with every policy
/// enforcing (the same two ways); and the evaluator's two views agree with both clusters.
fn check_audit(c: &NodeCompiler) -> Result<(), TestCaseError> {
    let state = c.state();
    let without = without_audited(state);
    let with = all_enforced(state);
    let node_addrs = state.node_addresses("n1");
    for ep in c.endpoints() {
        let pod = state.pod(&ep.tables.pod).unwrap();
        let fresh = compile_endpoint(&without, pod, &node_addrs);
        prop_assert!(
            ep.tables.ingress.same_datapath(&fresh.ingress) && ep.tables.egress.same_datapath(&fresh.egress),
            "{}: enforced tables differ from the cluster's without the audited policies:\n{:?}\n{:?}",
            pod.key,
            ep.tables,
            fresh
        );
        let full = compile_endpoint(&with, pod, &node_addrs);
        for d in Direction::BOTH {
            prop_assert!(
                ep.tables.audit_view(d).same_datapath(full.table(d)),
                "{} {d}: audit view differs from the cluster's with every policy enforcing:\n{:?}\n{:?}",
                pod.key,
                ep.tables,
                full
            );
            if let Some(a) = ep.tables.audit.get(d) {
                prop_assert!(!a.audited.is_empty() && !a.table.same_datapath(ep.tables.table(d)), "an audit table only where it differs");
            }
        }
    }
    let mut view = state.clone();
    view.set_view(View::Audit);
    for f in flows(state) {
        let enforced = verdict(state, &f);
        let reference = verdict(&without, &f);
        prop_assert_eq!(enforced.allowed, reference.allowed, "enforced view vs without audited: {:?}", f);
        let audit = verdict(&view, &f);
        let reference_all = verdict(&with, &f);
        prop_assert_eq!(audit.allowed, reference_all.allowed, "audit view vs all enforced: {:?}", f);
        // Each local side's tables against the evaluator's side.
        for (addr, direction, remote) in [(f.src, Direction::Egress, f.dst), (f.dst, Direction::Ingress, f.src)] {
            let Some(ep) = state.pod_at(addr).and_then(|p| c.endpoint(&p.key)) else { continue };
            let (side, side_all) = match direction {
                Direction::Egress => (reference.egress_tiers.allowed, reference_all.egress_tiers.allowed),
                Direction::Ingress => (reference.ingress_tiers.allowed, reference_all.ingress_tiers.allowed),
            };
            prop_assert_eq!(
                ep.tables.table(direction).allows(remote, f.protocol, f.port),
                side,
                "{} {} enforced: {:?}",
                ep.tables.pod,
                direction,
                f
            );
            prop_assert_eq!(
                ep.tables.audit_view(direction).allows(remote, f.protocol, f.port),
                side_all,
                "{} {} audit: {:?}",
                ep.tables.pod,
                direction,
                f
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// Audited policies (by annotation, namespace annotation or the node's switch, with
    /// ClusterNetworkPolicies) in every state of a random sequence of changes: the enforced
    /// tables are exactly those of the cluster without them, and the audit view is the
    /// cluster with them enforcing, against the reference evaluator; incremental
    /// compilation equals a fresh compile throughout.
    #[test]
    fn audited_policies_change_nothing_enforced(
        ns in ns_labels(),
        ns_audit in prop::collection::vec(any::<bool>(), 3),
        pods in prop::collection::vec(pod_spec(), 1..7),
        policies in prop::collection::vec((policy_spec(), 0..ANNOTATIONS.len()), 0..4),
        audit_all in any::<bool>(),
        batches in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..5),
    ) {
        let mut c = NodeCompiler::new("n1");
        c.set_audit_all(audit_all);
        let mut initial = vec![];
        for (i, l) in ns.iter().enumerate() {
            initial.push(Change::UpsertNamespace(audited_ns(NAMESPACES[i], l, ns_audit[i])));
        }
        for (name, v4, v6) in NODES {
            initial.push(Change::UpsertNode(Node { name: name.into(), addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()] }));
        }
        for (i, s) in pods.iter().enumerate() {
            initial.push(Change::UpsertPod(pod_from(i, s)));
        }
        for (i, ((n, spec), a)) in policies.iter().enumerate() {
            initial.push(Change::UpsertPolicy(Box::new(annotated_policy(NAMESPACES[*n], &format!("np{i}"), spec.clone(), ANNOTATIONS[*a]))));
        }
        c.apply(initial);
        check_audit(&c)?;
        check_full_with_audit(&c, &c.clone(), &crate::ChangeReport::default())?;
        for batch in batches {
            let before = c.clone();
            let mut changes = Vec::new();
            let mut reports = Vec::new();
            for s in batch {
                match change(s) {
                    Ok(ch) => changes.push(ch),
                    Err(on) => {
                        reports.push(c.apply(std::mem::take(&mut changes)));
                        reports.push(c.set_audit_all(on));
                    }
                }
            }
            reports.push(c.apply(changes));
            let mut report = crate::ChangeReport::default();
            for r in reports {
                report.changed.extend(r.changed);
                report.added.extend(r.added);
            }
            check_audit(&c)?;
            check_full_with_audit(&c, &before, &report)?;
        }
    }
}

/// As `props::check_against_full`, audit tables included (a fresh compile in the
/// compiler's own state).
fn check_full_with_audit(c: &NodeCompiler, before: &NodeCompiler, report: &crate::ChangeReport) -> Result<(), TestCaseError> {
    let mut state = c.state().clone();
    let local: BTreeSet<ObjectKey> =
        state.pods().filter(|p| !p.host_network && p.node.as_deref() == Some("n1")).map(|p| p.key.clone()).collect();
    let have: BTreeSet<ObjectKey> = c.endpoints().map(|e| e.tables.pod.clone()).collect();
    prop_assert_eq!(&local, &have, "endpoint set");
    for ep in c.endpoints() {
        let pod = state.pod(&ep.tables.pod).unwrap().clone();
        let fresh = compile_pod_with_audit(&mut state, &pod);
        prop_assert!(ep.tables.same_datapath(&fresh), "{} differs from a fresh compile:\n{:?}\n{:?}", pod.key, ep.tables, fresh);
        if let Some(old) = before.endpoint(&pod.key) {
            if !old.tables.same_datapath(&fresh) {
                prop_assert!(report.changed.contains(&pod.key) || report.added.contains(&pod.key), "{} changed unreported", pod.key);
            }
        }
    }
    Ok(())
}

/// A Baseline policy's peers with NetworkPolicies isolating its subject in one
/// view or the other (annotation, namespace, node switch).
#[test]
fn baseline_peers_reach_subjects_isolated_only_in_the_audit_view() {
    for np_ann in [None, Some("audit")] {
        for ns_audit in [false, true] {
            for all in [false, true] {
                for both_nps in [false, true] {
                    let mut c = NodeCompiler::new("n1");
                    c.set_audit_all(all);
                    let mut q = crate::tests::mk_pod("y", "q", &[("app", "bad")], &["10.244.0.9"]);
                    q.node = Some("n2".into());
                    let mut init = vec![
                        Change::UpsertNamespace(audited_ns("x", &[], ns_audit)),
                        Change::UpsertNamespace(audited_ns("y", &[], false)),
                        Change::UpsertPod(crate::tests::mk_pod("x", "a", &[], &["10.244.0.1"])),
                        Change::UpsertPolicy(Box::new(annotated_policy("x", "np", DENY_ALL_INGRESS(), np_ann))),
                        Change::UpsertClusterPolicy(Box::new(crate::cnp::tests::mk_cnp("base", json!({"tier": "Baseline", "priority": 1,
                            "subject": {"namespaces": {}},
                            "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "bad"}}}}]}],
                            "egress": [{"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "bad"}}}}]}]})))),
                    ];
                    if both_nps {
                        init.push(Change::UpsertPolicy(Box::new(annotated_policy("x", "np2",
                            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{"from": [{"podSelector": {}}]}]}), None))));
                    }
                    c.apply(init);
                    let steps: Vec<Vec<Change>> = vec![
                        vec![Change::UpsertPod(q.clone())],
                        vec![Change::UpsertPod({ let mut q = q.clone(); q.labels = crate::tests::labels(&[]); q })],
                        vec![Change::UpsertPod(q.clone()), Change::DeletePolicy(ObjectKey::new("x", "np"))],
                        vec![Change::UpsertPolicy(Box::new(annotated_policy("x", "np", DENY_ALL_INGRESS(), np_ann)))],
                        vec![Change::DeletePod(q.key.clone())],
                        vec![Change::UpsertNamespace(audited_ns("x", &[], !ns_audit)), Change::UpsertPod(q.clone())],
                        vec![Change::DeletePod(q.key.clone()), Change::UpsertNamespace(audited_ns("x", &[], ns_audit))],
                        vec![Change::UpsertPolicy(Box::new(annotated_policy("x", "np", json!({"podSelector": {}, "policyTypes": ["Egress"]}), np_ann))), Change::UpsertPod(q.clone())],
                        vec![Change::DeletePod(q.key.clone())],
                        vec![Change::UpsertPolicy(Box::new(annotated_policy("x", "np", DENY_ALL_INGRESS(), np_ann.map_or(Some("audit"), |_| None))))],
                        vec![Change::UpsertPod(q.clone())],
                    ];
                    for (i, batch) in steps.into_iter().enumerate() {
                        let before = c.clone();
                        let r = c.apply(batch);
                        check_full_with_audit(&c, &before, &r).unwrap_or_else(|e| panic!("np_ann={np_ann:?} ns_audit={ns_audit} all={all} both={both_nps} step {i}: {e}"));
                        let before = c.clone();
                        let r = c.set_audit_all(!c.state().audit_all());
                        check_full_with_audit(&c, &before, &r).unwrap();
                        let before = c.clone();
                        let r = c.set_audit_all(!c.state().audit_all());
                        check_full_with_audit(&c, &before, &r).unwrap();
                    }
                }
            }
        }
    }
}
