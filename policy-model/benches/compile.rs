//! Compiler benchmark: 10,000 pods in 100 namespaces, 2,000 policies of realistic shapes,
//! 100 pods on the node. Measures a full compile, one pod label change, one policy change,
//! and (printed once) the compiled state's memory.
//!
//! Run: `cargo bench -p policy-model --bench compile`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_model::{Change, NamedPort, Namespace, NodeCompiler, ObjectKey, Pod, Protocol};
use serde_json::json;

/// Counts live heap bytes, to report the compiled state's memory.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; we only add the size
// to (or subtract it from) a counter, which has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`; `new` is non-zero per the
        // GlobalAlloc contract.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const NODE: &str = "node-0";
const TIERS: [&str; 3] = ["web", "api", "db"];

fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn pod(ns: usize, j: usize, app_override: Option<&str>) -> Pod {
    let n = ns * PODS_PER_NS + j;
    let tier = TIERS[j % 3];
    let app = app_override.map(str::to_string).unwrap_or_else(|| format!("app-{}", j % 10));
    Pod {
        key: ObjectKey::new(ns_name(ns), format!("pod-{j:03}")),
        labels: [("app".to_string(), app), ("tier".to_string(), tier.to_string()), ("version".to_string(), format!("v{}", j % 2))].into(),
        ips: vec![format!("10.244.{}.{}", n / 256, n % 256).parse().unwrap(), format!("fd10:244::{n:x}").parse().unwrap()],
        // One pod per namespace on this node: 100 local pods.
        node: Some(if j == 0 { NODE.to_string() } else { format!("node-{}", 1 + n % 50) }),
        host_network: false,
        named_ports: vec![
            NamedPort { name: "http".into(), port: 8000 + (j % 5) as u16, protocol: Protocol::Tcp },
            NamedPort { name: "metrics".into(), port: if tier == "db" { 9187 } else { 9090 }, protocol: Protocol::Tcp },
        ],
    }
}

fn np(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

/// 20 policies per namespace: isolation, same-namespace allow, app-to-app on named ports,
/// cross-namespace by team, monitoring on a named port, egress with ipBlock excepts and
/// DNS, and a NodePort-style endPort range.
fn policies(i: usize, http_port: serde_json::Value) -> Vec<NetworkPolicy> {
    let ns = ns_name(i);
    let mut v = vec![
        np(&ns, "default-deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
        np(
            &ns,
            "allow-same-namespace",
            json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}),
        ),
        np(
            &ns,
            "allow-monitoring",
            json!({"podSelector": {}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}}}], "ports": [{"port": "metrics"}]}]}),
        ),
    ];
    for k in 0..10 {
        let port = if k == 0 { http_port.clone() } else { json!("http") };
        v.push(np(&ns, &format!("app-{k}"), json!({"podSelector": {"matchLabels": {"app": format!("app-{k}")}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (k + 1) % 10)}}}], "ports": [{"port": port}]}]})));
    }
    for k in 0..3 {
        v.push(np(&ns, &format!("cross-team-{k}"), json!({"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (i + k) % 10)}}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}]})));
    }
    v.push(np(&ns, "web-egress", json!({"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}, {"ipBlock": {"cidr": "::/0", "except": ["fc00::/7"]}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-001"}}, "podSelector": {"matchLabels": {"app": "app-0"}}}], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"podSelector": {}}]}]})));
    v.push(np(&ns, "api-egress", json!({"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": 5432}]}]})));
    v.push(np(&ns, "nodeports", json!({"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.13.0/24"]}}], "ports": [{"port": 30000, "endPort": 32767}]}]})));
    v.push(np(&ns, "db-from-api", json!({"podSelector": {"matchLabels": {"tier": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "api"}}}], "ports": [{"port": 5432, "endPort": 5433}]}]})));
    assert_eq!(v.len(), 20);
    v
}

fn cluster() -> Vec<Change> {
    let mut changes = Vec::new();
    for i in 0..NAMESPACES {
        let labels =
            [("team".to_string(), format!("t{}", i % 10)), ("env".to_string(), ["prod", "staging", "dev"][i % 3].to_string())].into();
        changes.push(Change::UpsertNamespace(Namespace::new(ns_name(i), labels)));
    }
    for i in 0..NAMESPACES {
        for j in 0..PODS_PER_NS {
            changes.push(Change::UpsertPod(pod(i, j, None)));
        }
    }
    for i in 0..NAMESPACES {
        changes.extend(policies(i, json!("http")).into_iter().map(|p| Change::UpsertPolicy(Box::new(p))));
    }
    changes
}

fn full_compile() -> NodeCompiler {
    let mut c = NodeCompiler::new(NODE);
    let r = c.apply(cluster());
    assert_eq!(r.added.len(), 100);
    assert!(r.rejected.is_empty());
    c
}

fn bench(cr: &mut Criterion) {
    let changes = cluster();
    let before = LIVE.load(Ordering::Relaxed);
    let compiled = full_compile();
    let after = LIVE.load(Ordering::Relaxed);
    let entries: usize = compiled.endpoints().map(|e| e.tables.entry_count()).sum();
    let max_entries = compiled.endpoints().map(|e| e.tables.entry_count()).max().unwrap_or(0);
    println!(
        "workload: {} objects; compiled state (cluster state + tables of {} endpoints, {entries} entries, at most {max_entries} per endpoint): {:.1} MiB",
        changes.len(),
        compiled.endpoints().count(),
        (after - before) as f64 / (1024.0 * 1024.0),
    );
    drop(changes);

    let mut g = cr.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("full compile (10k pods, 2k policies, 100 local)", |b| b.iter(|| black_box(full_compile())));
    g.finish();

    let mut g = cr.benchmark_group("incremental");
    let mut c = full_compile();
    // A pod in ns-003 that app-to-app and same-namespace peers of the local pod there see.
    let mut flip = false;
    g.bench_function("pod label change", |b| {
        b.iter(|| {
            flip = !flip;
            let app = if flip { "app-7" } else { "app-1" };
            let r = c.apply([Change::UpsertPod(pod(3, 11, Some(app)))]);
            assert!(r.recompiled >= 1);
            black_box(r)
        })
    });
    let mut flip = false;
    g.bench_function("policy change", |b| {
        b.iter(|| {
            flip = !flip;
            let port = if flip { json!(8081) } else { json!("http") };
            let p = policies(0, port).into_iter().find(|p| p.metadata.name.as_deref() == Some("app-0")).unwrap();
            let r = c.apply([Change::UpsertPolicy(Box::new(p))]);
            black_box(r)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
