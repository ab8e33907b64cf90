//! The node compiler with ClusterNetworkPolicies: what each change recompiles, rejected and
//! fail-closed policies reported, and incremental equal to a full compile.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::tests::props::{NAMESPACES, NODES, PodSpec, cases, check_against_full, ns_labels, pod_from, pod_spec, policy_spec};
use crate::tests::{labels, mk_ns, mk_policy};
use crate::{Change, Node, NodeCompiler, ObjectKey};

fn upsert(name: &str, spec: Value) -> Change {
    Change::UpsertClusterPolicy(Box::new(mk_cnp(name, spec)))
}

fn k(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

fn setup() -> NodeCompiler {
    let mut c = NodeCompiler::new("n1");
    let mut changes = vec![Change::UpsertNamespace(mk_ns("x", &[])), Change::UpsertNamespace(mk_ns("y", &[]))];
    for (i, key) in ["x/a", "x/b", "y/a"].iter().enumerate() {
        let key = k(key);
        changes.push(Change::UpsertPod(crate::tests::mk_pod(&key.namespace, &key.name, &[], &[&format!("10.244.0.{}", i + 1)])));
    }
    c.apply(changes);
    c
}

#[test]
fn a_cluster_policy_recompiles_its_subjects_and_isolates_them() {
    let mut c = setup();
    let r = c.apply([upsert(
        "deny",
        json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
    )]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    assert!(r.rejected.is_empty() && r.cluster_policy_warnings.is_empty());
    assert!(c.endpoint(&k("x/a")).unwrap().tables.ingress.isolated);
    assert!(!c.endpoint(&k("y/a")).unwrap().tables.ingress.isolated);
    let r = c.apply([Change::DeleteClusterPolicy("deny".into())]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    assert!(!c.endpoint(&k("x/a")).unwrap().tables.ingress.isolated);
}

#[test]
fn a_rejected_update_keeps_the_last_valid_version() {
    let mut c = setup();
    let good = json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]});
    c.apply([upsert("p", good)]);
    let r = c.apply([upsert("p", json!({"tier": "Admin", "priority": 5000, "subject": {"namespaces": {}}}))]);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].key, ObjectKey::new("", "p"));
    assert_eq!(r.rejected[0].errors[0].field, "spec.priority");
    assert!(r.changed.is_empty());
    assert_eq!(c.state().cluster_policy("p").unwrap().priority, 1);
    assert_eq!(c.rejected().count(), 1);
    c.apply([Change::DeleteClusterPolicy("p".into())]);
    assert_eq!(c.rejected().count(), 0);
}

#[test]
fn fail_closed_peers_are_reported() {
    let mut c = setup();
    let r = c.apply([upsert(
        "dns",
        json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
        "egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]}),
    )]);
    assert_eq!(r.cluster_policy_warnings.len(), 1);
    assert!(
        r.cluster_policy_warnings[0].to_string().starts_with("ClusterNetworkPolicy dns: spec.egress[0].to: "),
        "{}",
        r.cluster_policy_warnings[0]
    );
}

#[test]
fn node_labels_recompile_the_users_of_node_peers() {
    let mut c = setup();
    c.apply([Change::UpsertNode(Node { name: "n2".into(), addresses: vec!["10.250.0.2".parse().unwrap()] })]);
    c.apply([upsert(
        "nodes",
        json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
        "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "db"}}}]}]}),
    )]);
    let before = c.endpoint(&k("x/a")).unwrap().revision;
    let r = c.apply([Change::UpsertNodeLabels { node: "n2".into(), labels: labels(&[("role", "db")]) }]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    assert_ne!(c.endpoint(&k("x/a")).unwrap().revision, before);
    assert!(!c.endpoint(&k("x/a")).unwrap().tables.egress.allows("10.250.0.2".parse().unwrap(), crate::IpProtocol::TCP, 5432));
}

/// A hostNetwork pod's address is its node's: a nodes peer covers it as soon as the pod
/// appears, with the compiler's rule cache warm.
#[test]
fn a_host_network_pod_reaches_the_users_of_node_peers() {
    let mut c = setup();
    c.apply([Change::UpsertNodeLabels { node: "n2".into(), labels: labels(&[("role", "db")]) }]);
    c.apply([upsert(
        "nodes",
        json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
        "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "db"}}}]}]}),
    )]);
    let ip = "10.250.0.9".parse().unwrap();
    assert!(c.endpoint(&k("x/a")).unwrap().tables.egress.allows(ip, crate::IpProtocol::TCP, 5432));
    let mut host = crate::tests::mk_pod("y", "agent", &[], &["10.250.0.9"]);
    host.node = Some("n2".into());
    host.host_network = true;
    let r = c.apply([Change::UpsertPod(host)]);
    assert_eq!(r.changed, vec![k("x/a"), k("x/b")]);
    assert!(!c.endpoint(&k("x/a")).unwrap().tables.egress.allows(ip, crate::IpProtocol::TCP, 5432));
    check_against_full(&c, None).unwrap();
}

/// A pod behind another at the same address becomes its owner when the first goes: a
/// rule matching it must cover the address from then on.
#[test]
fn ownership_moving_to_a_matched_pod_reaches_cluster_policy_subjects() {
    let mut c = setup();
    c.apply([upsert(
        "deny",
        json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
        "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "bad"}}}}]}]}),
    )]);
    // y/a holds 10.244.0.3; y/z (a later key, so not the owner) is matched and shares it.
    let mut z = crate::tests::mk_pod("y", "z", &[("app", "bad")], &["10.244.0.3"]);
    z.node = Some("n2".into());
    c.apply([Change::UpsertPod(z)]);
    let ip = "10.244.0.3".parse().unwrap();
    assert!(c.endpoint(&k("x/a")).unwrap().tables.ingress.allows(ip, crate::IpProtocol::TCP, 80));
    let r = c.apply([Change::DeletePod(k("y/a"))]);
    assert!(r.changed.contains(&k("x/a")), "{r:?}");
    assert!(!c.endpoint(&k("x/a")).unwrap().tables.ingress.allows(ip, crate::IpProtocol::TCP, 80));
    check_against_full(&c, None).unwrap();
}

#[derive(Debug, Clone)]
enum Step {
    Pod(usize, PodSpec),
    DeletePod(usize, usize),
    Policy(usize, (usize, Value)),
    Cnp(usize, Value),
    DeleteCnp(usize),
    Namespace(usize, Vec<(&'static str, &'static str)>),
    NodeLabels(usize, bool),
    Node(usize, bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..7usize, pod_spec()).prop_map(|(i, s)| Step::Pod(i, s)),
        (0..3usize, 0..7usize).prop_map(|(n, i)| Step::DeletePod(n, i)),
        (0..3usize, policy_spec()).prop_map(|(i, p)| Step::Policy(i, p)),
        (0..3usize, super::props::cnp_spec()).prop_map(|(i, s)| Step::Cnp(i, s)),
        (0..3usize).prop_map(Step::DeleteCnp),
        (0..3usize, ns_labels()).prop_map(|(i, l)| Step::Namespace(i, l[0].clone())),
        (0..2usize, any::<bool>()).prop_map(|(i, b)| Step::NodeLabels(i, b)),
        (0..2usize, any::<bool>()).prop_map(|(i, b)| Step::Node(i, b)),
    ]
}

fn node(i: usize) -> Node {
    let (name, v4, v6) = NODES[i];
    Node { name: name.into(), addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()] }
}

fn change(s: Step) -> Change {
    match s {
        Step::Pod(i, spec) => Change::UpsertPod(pod_from(i, &spec)),
        Step::DeletePod(n, i) => Change::DeletePod(ObjectKey::new(NAMESPACES[n], format!("p{i}"))),
        Step::Policy(i, (n, spec)) => Change::UpsertPolicy(Box::new(mk_policy(NAMESPACES[n], &format!("np{i}"), spec))),
        Step::Cnp(i, spec) => upsert(&format!("cnp{i}"), spec),
        Step::DeleteCnp(i) => Change::DeleteClusterPolicy(format!("cnp{i}")),
        Step::Namespace(i, l) => Change::UpsertNamespace(mk_ns(NAMESPACES[i], &l)),
        Step::NodeLabels(i, linux) => Change::UpsertNodeLabels {
            node: NODES[i].0.into(),
            labels: if linux { labels(&[("kubernetes.io/os", "linux"), ("zone", "a")]) } else { labels(&[("zone", "b")]) },
        },
        Step::Node(i, present) => {
            if present {
                Change::UpsertNode(node(i))
            } else {
                Change::DeleteNode(NODES[i].0.into())
            }
        }
    }
}

/// The generated cluster as changes: namespaces, the two nodes, pods, then the cluster
/// policies.
fn initial_cluster(ns: &[Vec<(&str, &str)>], pods: &[PodSpec], cnps: &[Value]) -> Vec<Change> {
    let mut initial = vec![];
    for (i, l) in ns.iter().enumerate() {
        initial.push(Change::UpsertNamespace(mk_ns(NAMESPACES[i], l)));
    }
    initial.extend([Change::UpsertNode(node(0)), Change::UpsertNode(node(1))]);
    for (i, s) in pods.iter().enumerate() {
        initial.push(Change::UpsertPod(pod_from(i, s)));
    }
    for (i, spec) in cnps.iter().enumerate() {
        initial.push(upsert(&format!("cnp{i}"), spec.clone()));
    }
    initial
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// With ClusterNetworkPolicies, after every batch the incremental compiler's tables
    /// equal a fresh compile, and every endpoint whose tables changed was reported.
    #[test]
    fn incremental_with_cluster_policies_equals_full_compile(
        ns in ns_labels(),
        pods in prop::collection::vec(pod_spec(), 1..7),
        cnps in prop::collection::vec(super::props::cnp_spec(), 1..3),
        batches in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..6),
    ) {
        let mut c = NodeCompiler::new("n1");
        let initial = initial_cluster(&ns, &pods, &cnps);
        let r = c.apply(initial);
        prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        check_against_full(&c, None)?;
        for batch in batches {
            let before = c.clone();
            let report = c.apply(batch.into_iter().map(change).collect::<Vec<_>>());
            check_against_full(&c, Some((&before, &report)))?;
        }
    }
}

/// A pod that stops being a pod holder of an address (it becomes hostNetwork,
/// same address, e.g. deleted and recreated under one name during a relist) hands the
/// address to the next holder; a CNP rule matching that holder must cover it.
#[test]
fn a_pod_turning_host_network_hands_its_address_to_a_matched_holder() {
    let mut c = NodeCompiler::new("n1");
    let mut a = crate::tests::mk_pod("y", "a", &[], &["10.244.0.3"]);
    a.node = Some("n2".into());
    let mut z = crate::tests::mk_pod("y", "z", &[("app", "bad")], &["10.244.0.3"]);
    z.node = Some("n2".into());
    c.apply([
        Change::UpsertNamespace(mk_ns("x", &[])),
        Change::UpsertNamespace(mk_ns("y", &[])),
        Change::UpsertPod(crate::tests::mk_pod("x", "a", &[], &["10.244.0.1"])),
        Change::UpsertPod(a.clone()),
        Change::UpsertPod(z),
        upsert("deny", json!({"tier": "Admin", "priority": 1,
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
            "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "bad"}}}}]}]})),
    ]);
    check_against_full(&c, None).unwrap();
    let before = c.clone();
    a.host_network = true;
    let r = c.apply([Change::UpsertPod(a)]);
    check_against_full(&c, Some((&before, &r))).unwrap();
}

/// A pod elsewhere taking this node's address changes every local endpoint's
/// own-node entries.
#[test]
fn a_pod_elsewhere_taking_this_nodes_address_changes_own_node_entries() {
    let mut c = NodeCompiler::new("n1");
    c.apply([
        Change::UpsertNamespace(mk_ns("x", &[])),
        Change::UpsertNode(Node { name: "n1".into(), addresses: vec!["10.250.0.1".parse().unwrap()] }),
        Change::UpsertPod(crate::tests::mk_pod("x", "a", &[], &["10.244.0.1"])),
        Change::UpsertPolicy(Box::new(mk_policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})))),
    ]);
    check_against_full(&c, None).unwrap();
    let before = c.clone();
    let mut z = crate::tests::mk_pod("y", "z", &[], &["10.250.0.1"]);
    z.node = Some("n2".into());
    let r = c.apply([Change::UpsertPod(z)]);
    check_against_full(&c, Some((&before, &r))).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// As above, with pods recreated with hostNetwork flipped and the same
    /// addresses (a relist), and the node's audit switch flipped between batches.
    #[test]
    fn incremental_with_host_network_flips_and_audit_switches_equals_full_compile(
        ns in ns_labels(),
        pods in prop::collection::vec(pod_spec(), 1..7),
        cnps in prop::collection::vec(super::props::cnp_spec(), 1..3),
        batches in prop::collection::vec(prop::collection::vec(prop_oneof![4 => step().prop_map(Some), 1 => (0..3usize, 0..7usize).prop_map(|(n, i)| None.or(Some(Step::DeletePod(100 + n, i))))], 1..4), 1..6),
        audit_flips in prop::collection::vec(any::<bool>(), 6),
    ) {
        let mut c = NodeCompiler::new("n1");
        let initial = initial_cluster(&ns, &pods, &cnps);
        c.apply(initial);
        for (b, batch) in batches.into_iter().enumerate() {
            let before = c.clone();
            let mut changes = vec![];
            for s in batch.into_iter().flatten() {
                match s {
                    // (Encoded as a DeletePod of namespace 100 + n.) Flip hostNetwork of an
                    // existing pod, keeping its addresses.
                    Step::DeletePod(n, i) if n >= 100 => {
                        if let Some(p) = c.state().pod(&ObjectKey::new(NAMESPACES[n - 100], format!("p{i}"))) {
                            let mut p = p.clone();
                            p.host_network = !p.host_network;
                            changes.push(Change::UpsertPod(p));
                        }
                    }
                    s => changes.push(change(s)),
                }
            }
            let mut report = c.apply(changes);
            if audit_flips[b] {
                let r = c.set_audit_all(!c.state().audit_all());
                report.changed.extend(r.changed);
            }
            if !c.state().audit_all() {
                check_against_full(&c, Some((&before, &report)))?;
            }
        }
    }
}

// Pods drawing their addresses from a small shared pool: addresses move between pods and
// collide, equal a node's (n2) or a `networks` /32 or /128 of the generator; several pod
// changes per batch. What the patch (`crate::cnp::patch`) must refuse.

const POOL: [&str; 9] =
    ["10.244.0.1", "10.244.0.11", "10.244.1.6", "10.244.0.6", "fd10:244::1", "fd10:244:0:1::6", "fd10:244::6", "10.244.0.7", "10.250.0.2"];

fn pooled_pod() -> impl Strategy<Value = Change> {
    (0..5usize, pod_spec(), prop::collection::btree_set(0..POOL.len(), 0..3)).prop_map(|(i, spec, ips)| {
        let mut pod = pod_from(i, &spec);
        if !pod.host_network {
            pod.ips = ips.into_iter().map(|j| POOL[j].parse().unwrap()).collect();
        }
        Change::UpsertPod(pod)
    })
}

fn pooled_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => pooled_pod(),
        2 => (0..3usize, 0..5usize).prop_map(|(n, i)| Change::DeletePod(ObjectKey::new(NAMESPACES[n], format!("p{i}")))),
        1 => step().prop_map(change),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), max_shrink_iters: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn pooled_addresses_incremental_equals_full_compile(
        ns in ns_labels(),
        pods in prop::collection::vec(pooled_pod(), 1..7),
        cnps in prop::collection::vec(super::props::cnp_spec(), 1..3),
        batches in prop::collection::vec(prop::collection::vec(pooled_change(), 1..5), 1..6),
    ) {
        let mut c = NodeCompiler::new("n1");
        let mut initial = initial_cluster(&ns, &[], &cnps);
        initial.extend(pods);
        c.apply(initial);
        check_against_full(&c, None)?;
        for batch in batches {
            let before = c.clone();
            let report = c.apply(batch);
            check_against_full(&c, Some((&before, &report)))?;
        }
    }
}

/// `patch_peer_pods` called directly on each endpoint's last tables after a batch
/// of pod changes only (every changed pod a peer, the subject itself unchanged): whenever
/// it patches, the table must equal a fresh compile's.
fn direct_patch(before: &NodeCompiler, after: &NodeCompiler, changed: &[ObjectKey]) -> Result<(), TestCaseError> {
    use crate::cnp::patch::{PeerPod, patch_peer_pods};
    let state = after.state();
    let node_addrs = state.node_addresses("n1");
    let addresses: Vec<Vec<std::net::IpAddr>> = changed
        .iter()
        .map(|k| {
            let mut a: Vec<std::net::IpAddr> = before.state().pod(k).map(|p| p.ips.clone()).unwrap_or_default();
            a.extend(state.pod(k).map(|p| p.ips.clone()).unwrap_or_default());
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect();
    let peers: Vec<PeerPod> = changed.iter().zip(&addresses).map(|(key, a)| PeerPod { key, addresses: a }).collect();
    for ep in after.endpoints() {
        let key = &ep.tables.pod;
        if changed.contains(key) {
            continue;
        }
        let Some(old) = before.endpoint(key) else { continue };
        let pod = state.pod(key).unwrap();
        let fresh = crate::compile_endpoint(state, pod, &node_addrs);
        for d in crate::policy::Direction::BOTH {
            let mut t = old.tables.table(d).clone();
            if patch_peer_pods(state, pod, d, &mut t, &peers).is_some() {
                prop_assert!(t.same_datapath(fresh.table(d)), "{key} {d:?}: patched\n{t:?}\nfresh\n{:?}", fresh.table(d));
                let unused = (0..t.port_sets.len() as u32).find(|i| !t.entries.iter().any(|e| e.port_set == *i));
                prop_assert!(unused.is_none(), "{key} {d:?}: port set {unused:?} is left unused\n{t:?}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), max_shrink_iters: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn patches_equal_a_full_compile_whenever_they_apply(
        ns in ns_labels(),
        pods in prop::collection::vec(pooled_pod(), 1..7),
        cnps in prop::collection::vec(super::props::cnp_spec(), 1..3),
        batches in prop::collection::vec(prop::collection::vec(prop_oneof![
            3 => pooled_pod(),
            1 => (0..3usize, 0..5usize).prop_map(|(n, i)| Change::DeletePod(ObjectKey::new(NAMESPACES[n], format!("p{i}")))),
        ], 1..4), 1..6),
    ) {
        let mut c = NodeCompiler::new("n1");
        let mut initial = initial_cluster(&ns, &[], &cnps);
        initial.extend(pods);
        c.apply(initial);
        for batch in batches {
            let before = c.clone();
            let changed: Vec<ObjectKey> = batch.iter().map(|ch| match ch {
                Change::UpsertPod(p) => p.key.clone(),
                Change::DeletePod(k) => k.clone(),
                _ => unreachable!(),
            }).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let report = c.apply(batch);
            check_against_full(&c, Some((&before, &report)))?;
            direct_patch(&before, &c, &changed)?;
        }
    }
}
