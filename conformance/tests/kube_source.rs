//! The agent's API source (`KubeSource`, in process) against the API stand-in over
//! loopback: initial lists (paged), added/modified/deleted events for each kind, an
//! invalid policy, objects shaped as a real server returns them; a restart with a new
//! version base (every watch gets 410) and the relist that deletes what went away; and
//! `blind()` through an outage. The model state that results is asserted.

use std::time::Duration;

use conformance::apiserver::{ApiServer, Kind, objects};
use policy_agent::agent::kube_source::{KubeSource, WatchStatus};
use policy_agent::agent::services::Services;
use policy_model::{NamedPort, NodeCompiler, ObjectKey, Pod, Protocol};
use serde_json::{Value, json};

fn k(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

fn ns(name: &str, labels: Value) -> Value {
    let labels: std::collections::BTreeMap<String, String> = serde_json::from_value(labels).unwrap();
    let labels = labels.into_iter().collect();
    objects::namespace(&policy_model::Namespace::new(name.to_string(), labels))
}

fn pod(ns: &str, name: &str, ip: &str, node: &str) -> Value {
    objects::pod(&Pod {
        key: ObjectKey::new(ns, name),
        labels: [("pod".to_string(), name.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        node: Some(node.into()),
        host_network: false,
        named_ports: vec![NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }],
    })
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    objects::network_policy_json(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
}

struct Run {
    source: KubeSource,
    compiler: NodeCompiler,
    services: Services,
    invalid: Vec<String>,
}

impl Run {
    fn new(api: &ApiServer) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path).unwrap();
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(kc, &Default::default())).unwrap();
        let client = kube::Client::try_from(config).unwrap();
        Run { source: KubeSource::start(client), compiler: NodeCompiler::new("node-1"), services: Services::default(), invalid: Vec::new() }
    }

    /// Applies everything the source reports until `done` holds (or 20 s pass).
    async fn until(&mut self, what: &str, done: impl Fn(&Run) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let d = self.source.drain();
            self.compiler.apply(d.changes);
            self.services.apply(d.services);
            self.invalid.extend(
                d.invalid
                    .iter()
                    .map(|(r, e)| format!("{}/{}: {e}", r.namespace.clone().unwrap_or_default(), r.name.clone().unwrap_or_default())),
            );
            if done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; pods: {:?}; watchers: {:?}",
                self.compiler.state().pods().map(|p| p.key.to_string()).collect::<Vec<_>>(),
                self.source.status()
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), self.source.wait()).await;
        }
    }

    fn pods(&self) -> Vec<String> {
        self.compiler.state().pods().map(|p| p.key.to_string()).collect()
    }
}

/// Runs blocking control of the stand-in off the async test's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_events_for_every_kind() {
    let api = std::sync::Arc::new(blocking(|| ApiServer::start_local().unwrap()).await);
    api.apply_all([ns("x", json!({})), ns("y", json!({}))]);
    // More pods than a list page.
    api.apply_all((0..250).map(|i| pod("z", &format!("p{i:03}"), &format!("10.244.9.{}", i % 250), "node-9")));
    api.apply_all([pod("x", "a", "10.244.0.1", "node-1"), pod("y", "b", "10.244.0.2", "node-2")]);
    api.apply_json(np("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})));
    api.apply_json(objects::node("node-1", &["10.250.0.1".parse().unwrap()]));
    api.apply_json(objects::node("node-2", &["10.250.0.2".parse().unwrap()]));
    api.apply_json(objects::service("x", "web", &["10.96.0.10".parse().unwrap()], json!({"pod": "a"}), 80, 8080));
    let mut run = Run::new(&api);
    assert!(run.source.blind(), "blind before the first lists");
    run.until("the first lists", |r| r.source.synced() && !r.source.blind()).await;
    assert_eq!(run.pods().len(), 252);
    assert_eq!(run.compiler.state().node("node-1").unwrap().addresses, vec!["10.250.0.1".parse::<std::net::IpAddr>().unwrap()]);
    // Every Node: ClusterNetworkPolicy `nodes` peers select any of them.
    assert_eq!(run.compiler.state().node("node-2").unwrap().addresses, vec!["10.250.0.2".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(run.compiler.state().pod(&k("x/a")).unwrap().resolve_named_port("http", Protocol::Tcp), Some(8080));

    // Events of every kind.
    api.apply_json(ns("y", json!({"team": "blue"})));
    api.apply_json(ns("w", json!({})));
    api.apply_json(pod("x", "c", "10.244.0.3", "node-1"));
    api.delete(Kind::Pod, "y", "b").unwrap();
    api.apply_json(np("x", "deny", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]})));
    api.apply_json(np("x", "bad", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]})));
    api.apply_json(np("y", "gone", json!({"podSelector": {}})));
    api.delete(Kind::NetworkPolicy, "y", "gone").unwrap();
    api.apply_json(objects::endpoint_slice("x", "web-abc", "web", &["10.244.0.1".parse().unwrap()], 8080));
    run.until("the events", |r| {
        let st = r.compiler.state();
        !r.services.deferred(st).all.is_empty()
            && st.pod(&k("x/c")).is_some()
            && st.pod(&k("y/b")).is_none()
            && st.namespace("w").is_some()
            && st.policy(&k("y/gone")).is_none()
            && r.compiler.rejected().count() == 1
            && st.policy(&k("x/deny")).is_some_and(|p| !p.pod_selector.is_everything())
    })
    .await;
    let deferred: Vec<String> = run.services.deferred(run.compiler.state()).all.iter().map(|p| p.to_string()).collect();
    assert_eq!(deferred, ["10.96.0.10/32"], "the Service backed by pod x/a is judged after DNAT");
    let st = run.compiler.state();
    assert_eq!(st.namespace("y").unwrap().labels.get("team"), Some("blue"), "namespace modified");
    let endpoints: Vec<String> = run.compiler.endpoints().map(|e| e.tables.pod.to_string()).collect();
    assert_eq!(endpoints, ["x/a", "x/c"], "node-1's pods are the endpoints");
    assert!(run.compiler.endpoint(&k("x/a")).unwrap().tables.ingress.isolated, "x/deny now selects pod=a");
    assert!(!run.compiler.endpoint(&k("x/c")).unwrap().tables.ingress.isolated);
    assert_eq!(run.invalid.len(), 1, "{:?}", run.invalid);
    assert!(run.invalid[0].starts_with("x/bad: NetworkPolicy x/bad is invalid: spec.ingress[0].ports[0].endPort"), "{:?}", run.invalid);
    assert!(!run.source.blind());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_it_relists_and_deletes_what_is_gone() {
    let api = std::sync::Arc::new(blocking(|| ApiServer::start_local().unwrap()).await);
    api.apply_all([ns("x", json!({})), pod("x", "a", "10.244.0.1", "node-1"), pod("x", "b", "10.244.0.2", "node-1")]);
    let mut run = Run::new(&api);
    run.until("the first lists", |r| !r.source.blind() && r.compiler.state().pod(&k("x/b")).is_some()).await;

    // The API goes away: the source is blind (failing), the state stays.
    let a = api.clone();
    blocking(move || a.stop()).await;
    run.until("the outage to be seen", |r| r.source.status().values().any(|s| matches!(s, WatchStatus::Failing(_)))).await;
    assert!(run.source.blind());
    assert_eq!(run.pods(), ["x/a", "x/b"], "the last known state stays");
    // While it is away, x/b goes and x/d comes; it restarts with a new version base.
    api.delete(Kind::Pod, "x", "b").unwrap();
    api.apply_json(pod("x", "d", "10.244.0.4", "node-1"));
    let a = api.clone();
    let before = api.requests().get("GET pods").copied().unwrap_or(0);
    blocking(move || a.restart(1_000_000).unwrap()).await;
    run.until("the relist", |r| r.compiler.state().pod(&k("x/d")).is_some() && r.compiler.state().pod(&k("x/b")).is_none()).await;
    run.until("the view to be current", |r| !r.source.blind()).await;
    assert_eq!(run.pods(), ["x/a", "x/d"]);
    assert!(api.requests()["GET pods"] > before, "relisted");

    // A watch that falls out of the window (410 on a live watch, no failure) relists at
    // once, and the view is never called failing.
    api.set_window(3);
    let a = api.clone();
    blocking(move || a.apply_all((0..10).map(|i| pod("x", &format!("e{i}"), &format!("10.244.1.{i}"), "node-2")))).await;
    run.until("the relist after 410", |r| r.compiler.state().pod(&k("x/e9")).is_some() && !r.source.blind()).await;
    assert_eq!(run.pods().len(), 12);
    assert!(run.invalid.is_empty());
}

fn cnp(name: &str, priority: u16) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
            "ingress": [{"name": "r", "action": "Deny", "from": [{"namespaces": {}}]}]}})
}

/// Without the ClusterNetworkPolicy CRD (404) the view is complete and NetworkPolicies
/// flow; once the CRD is installed its objects are picked up, invalid ones reported with
/// a reference, and Node labels (which `nodes` peers read) follow the Nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_policies_once_their_crd_is_installed() {
    let api = std::sync::Arc::new(blocking(|| ApiServer::start_local().unwrap()).await);
    api.apply_all([ns("x", json!({})), pod("x", "a", "10.244.0.1", "node-1")]);
    let mut node = objects::node("node-2", &["10.250.0.2".parse().unwrap()]);
    node["metadata"]["labels"] = json!({"zone": "a"});
    api.apply_json(node.clone());
    let mut run = Run::new(&api);
    run.until("the first lists, without the CRD", |r| r.source.synced() && !r.source.blind()).await;
    assert_eq!(run.source.status().get("clusternetworkpolicies"), Some(&WatchStatus::Current));
    assert_eq!(run.compiler.state().node_labels("node-2").get("zone"), Some("a"));
    api.apply_json(np("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]})));
    run.until("a NetworkPolicy meanwhile", |r| r.compiler.state().policies().count() == 1).await;

    api.install_cluster_policy_crd();
    api.apply_json(cnp("c", 5));
    let mut bad = cnp("bad", 5);
    bad["spec"]["priority"] = json!(1001);
    api.apply_json(bad);
    node["metadata"]["labels"] = json!({"zone": "b"});
    api.apply_json(node);
    // The CRD is looked for again with backoff (1 s, doubling): within a few seconds.
    run.until("the CRD's objects", |r| {
        r.compiler.state().cluster_policy("c").is_some()
            && r.invalid.iter().any(|i| i.contains("bad"))
            && r.compiler.state().node_labels("node-2").get("zone") == Some("b")
    })
    .await;
    assert!(run.compiler.state().cluster_policy("bad").is_none(), "an invalid policy is not enforced");
    assert!(!run.source.blind());
    api.delete(Kind::ClusterNetworkPolicy, "", "c").unwrap();
    run.until("a deleted ClusterNetworkPolicy", |r| r.compiler.state().cluster_policy("c").is_none()).await;
}
