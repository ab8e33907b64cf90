//! Random clusters mixing ClusterNetworkPolicies of every tier, priority, action and peer
//! kind with NetworkPolicies: the compiled tables must give the reference evaluator's
//! verdict for every flow.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::tests::props::{CIDRS, NODES, PORT_NAMES, PORTS, cases, check_flows, flow_picks, ns_labels, pod_spec, policy_spec, selector, world};

fn action() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["Accept", "Deny", "Pass"])
}

fn namespaced_pod() -> impl Strategy<Value = Value> {
    (prop::option::of(selector()), selector()).prop_map(|(ns, pods)| match ns {
        Some(ns) => json!({"namespaceSelector": ns, "podSelector": pods}),
        None => json!({"podSelector": pods}),
    })
}

fn node_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(vec!["a", "b"]).prop_map(|z| json!({"matchLabels": {"zone": z}})),
        Just(json!({"matchLabels": {"kubernetes.io/os": "linux"}})),
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]})),
    ]
}

/// One peer; `egress` adds nodes, networks and domain names. Rarely, `{}`: a peer of a
/// newer API (fails closed).
fn peer(egress: bool) -> BoxedStrategy<Value> {
    let pods = prop_oneof![
        Just(json!({"namespaces": {}})),
        selector().prop_map(|s| json!({"namespaces": s})),
        namespaced_pod().prop_map(|p| json!({"pods": p})),
    ];
    if !egress {
        return prop_oneof![10 => pods, 1 => Just(json!({}))].boxed();
    }
    let networks = prop::collection::btree_set(0..CIDRS.len(), 1..3)
        .prop_map(|ix| json!({"networks": ix.into_iter().map(|i| CIDRS[i]).collect::<Vec<_>>()}));
    prop_oneof![
        6 => pods,
        3 => networks,
        2 => node_selector().prop_map(|s| json!({"nodes": s})),
        1 => Just(json!({"domainNames": ["example.com", "*.example.org"]})),
        1 => Just(json!({})),
    ]
    .boxed()
}

fn protocol_entry() -> impl Strategy<Value = Value> {
    let proto = prop::sample::select(vec!["tcp", "udp", "sctp"]);
    let port = prop_oneof![
        prop::sample::select(PORTS.to_vec()).prop_map(|p| json!({"number": p})),
        (prop::sample::select(PORTS.to_vec()), prop::sample::select(vec![1u16, 30, 8000]))
            .prop_map(|(s, d)| json!({"range": {"start": s, "end": s + d}})),
    ];
    prop_oneof![
        4 => (proto, port).prop_map(|(p, port)| json!({p: {"destinationPort": port}})),
        1 => prop::sample::select(PORT_NAMES.to_vec()).prop_map(|n| json!({"destinationNamedPort": n})),
    ]
}

fn rule(egress: bool) -> impl Strategy<Value = Value> {
    let peers = prop::collection::vec(peer(egress), 1..3);
    let protocols = prop::option::of(prop::collection::vec(protocol_entry(), 1..3));
    (action(), peers, protocols, prop::sample::select(vec!["", "r"])).prop_map(move |(action, mut peers, protocols, name)| {
        // CEL: domainNames peers only in Accept rules.
        if action != "Accept" {
            peers.retain(|p| p.get("domainNames").is_none());
            if peers.is_empty() {
                peers.push(json!({"namespaces": {}}));
            }
        }
        let podless = peers.iter().any(|p| p.get("networks").is_some() || p.get("nodes").is_some() || p.get("domainNames").is_some());
        let mut r = json!({"action": action});
        if !name.is_empty() {
            r["name"] = json!(name);
        }
        r[if egress { "to" } else { "from" }] = Value::Array(peers);
        if let Some(mut ps) = protocols {
            // CEL: no named ports with networks/nodes/domainNames peers.
            if podless {
                ps.retain(|p| p.get("destinationNamedPort").is_none());
            }
            if !ps.is_empty() {
                r["protocols"] = Value::Array(ps);
            }
        }
        r
    })
}

pub(crate) fn cnp_spec() -> impl Strategy<Value = Value> {
    let subject = prop_oneof![Just(json!({"namespaces": {}})), selector().prop_map(|s| json!({"namespaces": s})), namespaced_pod().prop_map(|p| json!({"pods": p}))];
    let tier = prop::sample::select(vec!["Admin", "Baseline"]);
    (tier, 0..3i64, subject, prop::collection::vec(rule(false), 0..4), prop::collection::vec(rule(true), 0..4)).prop_map(
        |(tier, priority, subject, ingress, egress)| {
            let mut spec = json!({"tier": tier, "priority": priority, "subject": subject});
            if !ingress.is_empty() {
                spec["ingress"] = Value::Array(ingress);
            }
            if !egress.is_empty() {
                spec["egress"] = Value::Array(egress);
            }
            spec
        },
    )
}

fn node_labels() -> impl Strategy<Value = Vec<Vec<(&'static str, &'static str)>>> {
    prop::collection::vec(
        (any::<bool>(), prop::option::of(prop::sample::select(vec!["a", "b"]))).prop_map(|(linux, zone)| {
            let mut v = vec![];
            if linux {
                v.push(("kubernetes.io/os", "linux"));
            }
            if let Some(z) = zone {
                v.push(("zone", z));
            }
            v
        }),
        NODES.len(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1_000), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// With ClusterNetworkPolicies in every tier, the compiled tables agree with the
    /// reference evaluator on every flow.
    #[test]
    fn tiered_tables_match_reference(
        ns in ns_labels(),
        nodes in node_labels(),
        pods in prop::collection::vec(pod_spec(), 1..7),
        policies in prop::collection::vec(policy_spec(), 0..3),
        cnps in prop::collection::vec(cnp_spec(), 1..4),
        picks in flow_picks(),
    ) {
        let mut state = world(&ns, &pods, &policies);
        for (i, l) in nodes.iter().enumerate() {
            state.set_node_labels(NODES[i].0, crate::tests::labels(l));
        }
        for (i, spec) in cnps.iter().enumerate() {
            let cnp = ClusterPolicy::from_manifest(&mk_cnp(&format!("cnp{i}"), spec.clone()))
                .unwrap_or_else(|e| panic!("generated policies are valid: {e}\n{spec}"));
            state.upsert_cluster_policy(cnp);
        }
        check_flows(&state, &picks)?;
    }
}

/// Not a test of the model: how often each kind of decider appears in generated flows
/// (run with --ignored --nocapture to check the generator still reaches every case).
#[test]
#[ignore]
fn generator_coverage() {
    use crate::cnp::DecidedBy;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;
    let mut runner = TestRunner::deterministic();
    let strat = (ns_labels(), node_labels(), prop::collection::vec(pod_spec(), 1..7), prop::collection::vec(policy_spec(), 0..3), prop::collection::vec(cnp_spec(), 1..4));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        let (ns, nodes, pods, policies, cnps) = strat.new_tree(&mut runner).unwrap().current();
        let mut state = world(&ns, &pods, &policies);
        for (i, l) in nodes.iter().enumerate() {
            state.set_node_labels(NODES[i].0, crate::tests::labels(l));
        }
        for (i, spec) in cnps.iter().enumerate() {
            state.upsert_cluster_policy(ClusterPolicy::from_manifest(&mk_cnp(&format!("cnp{i}"), spec.clone())).unwrap());
        }
        let addrs: Vec<std::net::IpAddr> = state.pods().flat_map(|p| p.ips.clone()).chain(["8.8.8.8".parse().unwrap(), "10.250.0.1".parse().unwrap()]).collect();
        for s in &addrs {
            for d in &addrs {
                if s.is_ipv4() != d.is_ipv4() { continue; }
                for proto in [crate::IpProtocol::TCP, crate::IpProtocol::ICMP] {
                    let v = crate::verdict(&state, &crate::Flow { src: *s, dst: *d, protocol: proto, port: 80 });
                    for t in [&v.egress_tiers, &v.ingress_tiers] {
                        let k = match &t.decided_by {
                            DecidedBy::ClusterRule { rule } => format!("{:?} {:?}", rule.tier, rule.action),
                            other => format!("{other:?}"),
                        };
                        *counts.entry(k).or_default() += 1;
                        if !t.passed_by.is_empty() { *counts.entry(format!("passed {:?}", t.passed_by[0].tier)).or_default() += 1; }
                        if !t.ambiguous_with.is_empty() { *counts.entry("ambiguous".into()).or_default() += 1; }
                    }
                }
            }
        }
    }
    println!("{counts:#?}");
}
