//! The datapath on real veths in network namespaces, with real sockets. Needs root and
//! BPF; fails (never skips) without them.

use conformance::rig::Rig;
use policy_model::{Change, NamedPort, ObjectKey, Pod, Protocol};
use serde_json::json;

fn pod(key: &str, labels: &[(&str, &str)], v4: &str, v6: &str) -> Pod {
    let mut named_ports = Vec::new();
    for port in [80u16, 81] {
        for p in Protocol::ALL {
            named_ports.push(NamedPort {
                name: format!("serve-{port}-{}", p.as_str().to_lowercase()),
                port,
                protocol: p,
            });
        }
    }
    Pod {
        key: ObjectKey::parse(key).unwrap(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
        node: Some(conformance::rig::NODE.into()),
        host_network: false,
        named_ports,
    }
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Change {
    Change::UpsertPolicy(Box::new(
        serde_json::from_value(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})).unwrap(),
    ))
}

fn three_pods() -> Rig {
    Rig::new(vec![
        pod("x/a", &[("pod", "a")], "10.244.0.10", "fd10:244::a"),
        pod("x/b", &[("pod", "b")], "10.244.0.11", "fd10:244::b"),
        pod("y/a", &[("pod", "a")], "10.244.0.12", "fd10:244::c"),
    ])
    .expect("rig (needs root, BPF and iproute2: run scripts/setup.sh)")
}

#[test]
fn default_deny_ingress() {
    let mut rig = three_pods();
    assert!(
        rig.probe("x/a", "x/b", Protocol::Tcp, 80, false),
        "no policy: allowed"
    );
    rig.apply(vec![policy(
        "x",
        "deny",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}),
    )])
    .unwrap();
    assert!(
        !rig.probe("x/a", "x/b", Protocol::Tcp, 80, false),
        "x/b isolated"
    );
    assert!(
        !rig.probe("y/a", "x/b", Protocol::Tcp, 80, true),
        "x/b isolated over IPv6"
    );
    assert!(
        rig.probe("x/b", "x/a", Protocol::Tcp, 80, false),
        "x/b's egress is not isolated"
    );
    assert!(
        rig.probe("y/a", "x/a", Protocol::Tcp, 80, false),
        "x/a is not isolated"
    );
}
