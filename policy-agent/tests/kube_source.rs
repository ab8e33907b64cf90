//! The watch path against a mocked API server (kube's `Client` over a tower-test mock):
//! initial lists, added/modified/deleted events for each kind, an invalid policy, a watch
//! error and the relist that follows; the model state that results is asserted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use policy_agent::agent::kube_source::KubeSource;
use policy_agent::agent::services::Services;
use policy_model::{NodeCompiler, ObjectKey};
use serde_json::{Value, json};

/// What the mock API answers, per collection path.
#[derive(Default)]
struct Script {
    /// List bodies in order; the last one answers every later list.
    lists: VecDeque<Value>,
    /// Watch bodies (newline-separated events) in order; then watches are held open.
    watches: VecDeque<Vec<Value>>,
}

type Scripts = Arc<Mutex<BTreeMap<&'static str, Script>>>;

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items})
}

fn event(ty: &str, object: Value) -> Value {
    json!({"type": ty, "object": object})
}

fn ns(name: &str, labels: Value, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels, "resourceVersion": rv}})
}

fn pod(ns: &str, name: &str, ip: &str, node: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}, "resourceVersion": rv,
        "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
}

fn np(ns: &str, name: &str, spec: Value, rv: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns, "resourceVersion": rv}, "spec": spec})
}

fn node(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "resourceVersion": rv}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn kind_of(path: &str) -> &'static str {
    match path {
        "/api/v1/namespaces" => "namespaces",
        "/api/v1/pods" => "pods",
        "/apis/networking.k8s.io/v1/networkpolicies" => "networkpolicies",
        "/api/v1/nodes" => "nodes",
        "/api/v1/services" => "services",
        "/apis/discovery.k8s.io/v1/endpointslices" => "endpointslices",
        other => panic!("unexpected request for {other}"),
    }
}

/// Starts the mock API; returns a client for it.
fn mock_api(scripts: Scripts) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let kind = kind_of(req.uri().path());
            let watch = req.uri().query().unwrap_or_default().split('&').any(|p| p == "watch=true" || p == "watch=1");
            let mut s = scripts.lock().unwrap();
            let script = s.get_mut(kind).expect("scripted kind");
            if watch {
                match script.watches.pop_front() {
                    Some(events) => {
                        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
                        send.send_response(Response::builder().status(200).body(Body::from(body.into_bytes())).unwrap());
                    }
                    // Nothing more to say: hold the watch open, as an idle API server does.
                    None => held.push(send),
                }
            } else {
                let body =
                    if script.lists.len() > 1 { script.lists.pop_front().unwrap() } else { script.lists.front().cloned().expect("a list") };
                send.send_response(Response::builder().status(200).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap());
            }
        }
    });
    kube::Client::new(service, "default")
}

/// Applies everything the source reports until `done` holds (or 20 s pass).
async fn run_until(
    source: &mut KubeSource,
    compiler: &mut NodeCompiler,
    services: &mut Services,
    invalid: &mut Vec<String>,
    done: impl Fn(&NodeCompiler, &KubeSource, &Services) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = source.drain();
        compiler.apply(d.changes);
        services.apply(d.services);
        invalid.extend(
            d.invalid
                .iter()
                .map(|(r, e)| format!("{}/{}: {e}", r.namespace.clone().unwrap_or_default(), r.name.clone().unwrap_or_default())),
        );
        if done(compiler, source, services) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; state: {:?}",
            compiler.state().pods().map(|p| p.key.to_string()).collect::<Vec<_>>()
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), source.wait()).await;
    }
}

fn k(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

#[tokio::test]
async fn lists_then_events_for_every_kind() {
    let scripts: Scripts = Arc::new(Mutex::new(BTreeMap::new()));
    {
        let mut s = scripts.lock().unwrap();
        s.insert(
            "namespaces",
            Script {
                lists: [list("Namespace", "10", vec![ns("x", json!({}), "1"), ns("y", json!({}), "2")])].into(),
                watches: [vec![event("MODIFIED", ns("y", json!({"team": "blue"}), "11")), event("ADDED", ns("z", json!({}), "12"))]].into(),
            },
        );
        s.insert(
            "pods",
            Script {
                lists: [list("Pod", "20", vec![pod("x", "a", "10.244.0.1", "node-1", "3"), pod("y", "b", "10.244.0.2", "node-2", "4")])]
                    .into(),
                watches: [vec![
                    event("ADDED", pod("x", "c", "10.244.0.3", "node-1", "21")),
                    event("DELETED", pod("y", "b", "10.244.0.2", "node-2", "22")),
                ]]
                .into(),
            },
        );
        s.insert(
            "networkpolicies",
            Script {
                lists: [list("NetworkPolicy", "30", vec![np("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]}), "5")])]
                    .into(),
                watches: [vec![
                    event(
                        "MODIFIED",
                        np("x", "deny", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}), "31"),
                    ),
                    event("ADDED", np("x", "bad", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}), "32")),
                    event("ADDED", np("y", "gone", json!({"podSelector": {}}), "33")),
                    event("DELETED", np("y", "gone", json!({"podSelector": {}}), "34")),
                ]]
                .into(),
            },
        );
        s.insert("nodes", Script { lists: [list("Node", "40", vec![node("node-1", "10.250.0.1", "6")])].into(), watches: VecDeque::new() });
        s.insert(
            "services",
            Script {
                lists: [list(
                    "Service",
                    "50",
                    vec![
                        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x", "resourceVersion": "7"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}}),
                    ],
                )]
                .into(),
                watches: VecDeque::new(),
            },
        );
        s.insert(
            "endpointslices",
            Script {
                lists: [list("EndpointSlice", "60", vec![])].into(),
                watches: [vec![event(
                    "ADDED",
                    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-abc", "namespace": "x", "resourceVersion": "61", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.0.1"]}]}),
                )]]
                .into(),
            },
        );
    }
    let mut source = KubeSource::start(mock_api(scripts), "node-1");
    let mut compiler = NodeCompiler::new("node-1");
    let mut services = Services::default();
    let mut invalid = Vec::new();
    run_until(&mut source, &mut compiler, &mut services, &mut invalid, |c, s, svc| {
        s.synced()
            && !svc.deferred(c.state()).is_empty()
            && c.state().pod(&k("x/c")).is_some()
            && c.state().pod(&k("y/b")).is_none()
            && c.state().namespace("z").is_some()
            && c.state().policy(&k("y/gone")).is_none()
            && c.rejected().count() == 1
            && c.state().policy(&k("x/deny")).is_some_and(|p| !p.pod_selector.is_everything())
    })
    .await;
    let deferred: Vec<String> = services.deferred(compiler.state()).iter().map(|p| p.to_string()).collect();
    assert_eq!(deferred, ["10.96.0.10/32"], "the Service backed by pod x/a is judged after DNAT");
    let st = compiler.state();
    assert_eq!(st.namespace("y").unwrap().labels.get("team").map(String::as_str), Some("blue"), "namespace modified");
    assert_eq!(st.pods().map(|p| p.key.to_string()).collect::<Vec<_>>(), ["x/a", "x/c"]);
    assert_eq!(st.node("node-1").unwrap().addresses, vec!["10.250.0.1".parse::<std::net::IpAddr>().unwrap()]);
    let endpoints: Vec<String> = compiler.endpoints().map(|e| e.tables.pod.to_string()).collect();
    assert_eq!(endpoints, ["x/a", "x/c"], "node-1's pods are the endpoints");
    assert!(compiler.endpoint(&k("x/a")).unwrap().tables.ingress.isolated, "x/deny now selects pod=a");
    assert!(!compiler.endpoint(&k("x/c")).unwrap().tables.ingress.isolated);
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert!(invalid[0].starts_with("x/bad: NetworkPolicy x/bad is invalid: spec.ingress[0].ports[0].endPort"), "{invalid:?}");
}

#[tokio::test]
async fn a_watch_error_relists_and_deletes_what_is_gone() {
    let scripts: Scripts = Arc::new(Mutex::new(BTreeMap::new()));
    {
        let mut s = scripts.lock().unwrap();
        for (kind, list_kind) in [
            ("namespaces", "Namespace"),
            ("networkpolicies", "NetworkPolicy"),
            ("nodes", "Node"),
            ("services", "Service"),
            ("endpointslices", "EndpointSlice"),
        ] {
            let items = if kind == "namespaces" { vec![ns("x", json!({}), "1")] } else { vec![] };
            s.insert(kind, Script { lists: [list(list_kind, "1", items)].into(), watches: VecDeque::new() });
        }
        s.insert("pods", Script {
            lists: [
                list("Pod", "20", vec![pod("x", "a", "10.244.0.1", "node-1", "3"), pod("x", "b", "10.244.0.2", "node-1", "4")]),
                // After the error: x/b is gone while we were not watching, x/d appeared.
                list("Pod", "50", vec![pod("x", "a", "10.244.0.1", "node-1", "3"), pod("x", "d", "10.244.0.4", "node-1", "45")]),
            ]
            .into(),
            watches: [vec![event("ERROR", json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}))]].into(),
        });
    }
    let mut source = KubeSource::start(mock_api(scripts), "node-1");
    let mut compiler = NodeCompiler::new("node-1");
    let mut services = Services::default();
    let mut invalid = Vec::new();
    run_until(&mut source, &mut compiler, &mut services, &mut invalid, |c, s, _| s.synced() && c.state().pod(&k("x/b")).is_some()).await;
    run_until(&mut source, &mut compiler, &mut services, &mut invalid, |c, _, _| {
        c.state().pod(&k("x/d")).is_some() && c.state().pod(&k("x/b")).is_none()
    })
    .await;
    assert_eq!(compiler.state().pods().map(|p| p.key.to_string()).collect::<Vec<_>>(), ["x/a", "x/d"]);
    assert!(invalid.is_empty());
}
