//! The real agent (`policy-agent run --kubeconfig`) against the API stand-in, in an
//! emulated node's network namespace with real pods and traffic: what the API lists and
//! watches is enforced; after API outages of 5 s, 30 s and 120 s, each ended by a restart
//! with a new version base (every watch gets 410), a change made right after the API is
//! back is enforced (within a generous deadline; the time is printed, `bench_agent`
//! measures it); an invalid NetworkPolicy becomes a Kubernetes Event naming it, as does an
//! invalid enforcement annotation (and a valid `audit` one audits).
//! Needs root and BPF; fails, never skips, without them.
//!
//! `API_SOURCE_OUTAGES=5,30,120` (seconds) sets the outages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use conformance::agent_process::AgentProcess;
use conformance::apiserver::{ApiServer, objects};
use conformance::cluster::{PodSpec, pod_address};
use conformance::netns::unique;
use conformance::topology::{NodeNet, PodNet};
use conformance::traffic::{Servers, probe};
use policy_model::{Family, Protocol};
use serde_json::{Value, json};

const NODE: &str = "node-1";

struct Cluster {
    node: NodeNet,
    api: ApiServer,
    pods: Vec<(PodSpec, PodNet, Servers)>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let addresses = ["10.250.0.1".parse().unwrap(), "fd10:250::1".parse().unwrap()];
        let node = NodeNet::create(&unique("pap"), NODE, &addresses).expect("node (root needed)");
        let api = ApiServer::start_in(&node.ns.handle()).expect("API stand-in");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        for ns in ["x", "y"] {
            api.apply_json(objects::namespace(&policy_model::Namespace::new(ns.to_string(), Default::default())));
        }
        api.apply_json(objects::node(NODE, &addresses));
        let mut pods = Vec::new();
        for (i, key) in ["x/a", "x/b", "y/a"].iter().enumerate() {
            let (ns, name) = key.split_once('/').unwrap();
            let ips = vec![pod_address(Family::Ipv4, 0, i), pod_address(Family::Ipv6, 0, i)];
            let net = node.add_pod(&unique("pap"), &format!("pa{i}"), &ips).unwrap();
            let servers = conformance::traffic::serve(&net.ns, &[80]).unwrap();
            let spec = PodSpec {
                namespace: ns.into(),
                name: name.into(),
                labels: [("pod".to_string(), name.to_string())].into(),
                node: NODE.into(),
                ips,
            };
            // As a real API server shows it (managedFields, owner, full spec and status).
            let model = policy_model::Pod::from_k8s(&serde_json::from_value(spec.manifest()).unwrap()).unwrap();
            api.apply_json(objects::pod(&model));
            pods.push((spec, net, servers));
        }
        Cluster { node, api, pods, kubeconfig, _dir: dir }
    }

    fn agent(&self) -> AgentProcess {
        let mut agent = AgentProcess::start_api(&self.node.ns, NODE, &self.kubeconfig, Some(20), &[]).expect("agent");
        agent.wait_ready(Duration::from_secs(20)).unwrap();
        agent
    }

    fn pod(&self, key: &str) -> &(PodSpec, PodNet, Servers) {
        self.pods.iter().find(|p| p.0.key() == key).unwrap()
    }

    fn tcp(&self, from: &str, to: &str) -> bool {
        let dst = SocketAddr::new(self.pod(to).0.ips[0], 80);
        probe(&self.pod(from).1.ns, Protocol::Tcp, dst, Duration::from_millis(300)).unwrap()
    }

    /// Waits until x/a → x/b shows `allowed`; the time it took.
    fn wait_for(&self, allowed: bool, deadline: Duration, agent: &AgentProcess, what: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            let sent = t0.elapsed();
            if self.tcp("x/a", "x/b") == allowed {
                return sent;
            }
            assert!(
                t0.elapsed() < deadline,
                "{what}: x/a -> x/b still {} after {deadline:?}:\n{}",
                if allowed { "blocked" } else { "allowed" },
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// x/b admits only pods labelled pod=a (`allow`) or pod=nobody.
fn b_ingress(allow: bool) -> Value {
    objects::network_policy_json(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-ingress", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": if allow { "a" } else { "nobody" }}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}}))
}

fn outages() -> Vec<u64> {
    std::env::var("API_SOURCE_OUTAGES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().expect("seconds")).collect())
        .unwrap_or_else(|| vec![5, 30, 120])
}

#[test]
fn api_changes_are_enforced_and_resume_at_once_after_api_restarts() {
    let c = Cluster::new();
    let agent = c.agent();
    c.wait_for(true, Duration::from_secs(10), &agent, "no policy");
    assert!(c.tcp("y/a", "x/b"));

    // Watched changes are enforced: a policy added, then changed.
    c.api.apply_json(b_ingress(true));
    let t = c.wait_for(true, Duration::from_secs(10), &agent, "policy added");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.tcp("y/a", "x/b") {
        assert!(Instant::now() < deadline, "y/a -> x/b is not blocked by x/b-ingress:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.api.apply_json(b_ingress(false));
    let t2 = c.wait_for(false, Duration::from_secs(10), &agent, "policy changed");
    eprintln!("policy added: enforced after {t:?}; changed: {t2:?}");

    let mut allow = false;
    for (n, secs) in outages().into_iter().enumerate() {
        c.api.stop();
        std::thread::sleep(Duration::from_secs(secs) / 2);
        assert_eq!(c.tcp("x/a", "x/b"), allow, "during the outage the last known state stays enforced");
        std::thread::sleep(Duration::from_secs(secs) / 2);
        // Back with a new version base: every watch's version is gone (410).
        c.api.restart(1_000_000).unwrap();
        allow = !allow;
        c.api.apply_json(b_ingress(allow));
        let took = c.wait_for(allow, Duration::from_secs(10), &agent, &format!("the change after a {secs} s outage"));
        eprintln!("outage {n}: {secs} s; the first change after the API restart was enforced after {took:?}");
        // Every watcher back before the next outage (each retries within 1 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.log_text().matches("API reachable again").count() < n + 1 {
            assert!(Instant::now() < deadline, "the agent does not say the API is back:\n{}", agent.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let log = agent.log_text();
    let n = outages().len();
    assert_eq!(log.matches("API unreachable; enforcing the last known state").count(), n, "one warning per outage:\n{log}");
    assert_eq!(log.matches("API reachable again").count(), n, "{log}");
    assert!(!log.contains("ERROR"), "no error lines (the client library's included):\n{log}");
    // The stand-in serves no ClusterNetworkPolicy CRD: said once, whatever the restarts
    // (each relist meets the 404 again), and NetworkPolicies are enforced meanwhile.
    let missing_crd = log.lines().filter(|l| l.contains("WARN") && l.contains("CRD not installed")).count();
    assert_eq!(missing_crd, 1, "the missing CRD is said once:\n{log}");
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(warns, n + 1, "nothing else warns:\n{log}");
}

#[test]
fn an_invalid_policy_becomes_an_event_naming_it() {
    let c = Cluster::new();
    let agent = c.agent();
    c.api.apply_json(objects::network_policy_json(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}})));
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        if let Some(e) = c.api.events().into_iter().find(|e| e["regarding"]["name"] == "bad") {
            break e;
        }
        assert!(Instant::now() < deadline, "no Event for x/bad; events: {:?}\n{}", c.api.events(), agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(event["regarding"]["namespace"], "x");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["regarding"]["apiVersion"], "networking.k8s.io/v1");
    assert!(event["regarding"]["uid"].is_string(), "the reference names the object's uid: {event}");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "Invalid");
    assert_eq!(event["reportingController"], "policy-agent");
    assert!(event["note"].as_str().unwrap().contains("spec.ingress[0].ports[0].endPort"), "{event}");
    assert_eq!(event["metadata"]["namespace"], "x");
}

impl Cluster {
    /// A pod's network as the CNI makes it (veth, addresses, servers), without telling the API.
    fn add_pod_network(&mut self, key: &str, index: usize) {
        let (ns, name) = key.split_once('/').unwrap();
        let ips = vec![pod_address(Family::Ipv4, 0, index), pod_address(Family::Ipv6, 0, index)];
        let net = self.node.add_pod(&unique("pap"), &format!("pa{index}"), &ips).unwrap();
        let servers = conformance::traffic::serve(&net.ns, &[80]).unwrap();
        let spec = PodSpec {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            node: NODE.into(),
            ips,
        };
        self.pods.push((spec, net, servers));
    }

    /// The pod as the API shows it once its sandbox has addresses.
    fn publish_pod(&self, key: &str) {
        let model = policy_model::Pod::from_k8s(&serde_json::from_value(self.pod(key).0.manifest()).unwrap()).unwrap();
        self.api.apply_json(objects::pod(&model));
    }

    fn agent_with(&self, extra: &[&str]) -> AgentProcess {
        let mut agent = AgentProcess::start_api(&self.node.ns, NODE, &self.kubeconfig, Some(20), extra).expect("agent");
        agent.wait_ready(Duration::from_secs(20)).unwrap();
        agent
    }
}

fn wait_log(agent: &AgentProcess, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !agent.log_text().contains(what) {
        assert!(Instant::now() < deadline, "no \"{what}\" in the agent's log:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// x/c admits only pods labelled pod=a.
fn c_ingress() -> Value {
    objects::network_policy_json(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "c-ingress", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}))
}

/// A pod created while the API is down is unknown to the agent: its veth is held
/// fail-closed (nothing in, nothing out) until the API is back and the pod is known; then
/// exactly its policy applies.
#[test]
fn a_pod_created_during_an_outage_is_held_until_known() {
    let mut c = Cluster::new();
    c.api.apply_json(c_ingress());
    let agent = c.agent();
    c.api.stop();
    c.add_pod_network("x/c", 3);
    wait_log(&agent, "holding a new interface", Duration::from_secs(10));
    assert!(!c.tcp("x/a", "x/c"), "held: even what its policy will allow is blocked");
    assert!(!c.tcp("y/a", "x/c"), "held");
    assert!(!c.tcp("x/c", "x/b"), "held: its egress too");
    assert!(c.tcp("x/a", "x/b"), "known pods are not affected");
    c.api.restart(1_000_000).unwrap();
    c.publish_pod("x/c");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.tcp("x/a", "x/c") {
        assert!(Instant::now() < deadline, "x/c's policy does not apply once it is known:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!c.tcp("y/a", "x/c"), "its policy, exactly");
    assert!(c.tcp("x/c", "x/b"), "its egress is not isolated");
}

/// The hold is bounded: a veth whose pod is still unknown after --max-hold-seconds is
/// released with a warning (a long outage must not cut new pods off for good).
#[test]
fn a_blind_hold_is_bounded() {
    let mut c = Cluster::new();
    let agent = c.agent_with(&["--max-hold-seconds", "4"]);
    c.api.stop();
    let held_at = Instant::now();
    c.add_pod_network("x/c", 3);
    wait_log(&agent, "holding a new interface", Duration::from_secs(10));
    assert!(!c.tcp("x/a", "x/c"), "held");
    wait_log(&agent, "released a held interface", Duration::from_secs(15));
    assert!(held_at.elapsed() >= Duration::from_secs(4), "not released before the bound");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.tcp("x/a", "x/c") {
        assert!(Instant::now() < deadline, "released: its traffic passes until its pod is known:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An enforcement annotation the agent does not know (issue 14) is a Kubernetes Event
/// naming the object and the annotation, and the policy is enforced meanwhile; the same
/// for a Namespace's annotation. A valid `audit` one, from the API, audits.
#[test]
fn an_invalid_enforcement_annotation_becomes_an_event_and_the_policy_is_enforced() {
    let c = Cluster::new();
    let agent = c.agent();
    c.wait_for(true, Duration::from_secs(10), &agent, "no policy");
    c.api.apply_json(objects::network_policy_json(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-ingress", "namespace": "x", "annotations": {"policy-agent.io/enforcement": "sometimes"}},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}})));
    c.wait_for(false, Duration::from_secs(10), &agent, "a default-deny with an invalid enforcement annotation is enforced");
    let event = wait_event(&c, "b-ingress", &agent);
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy", "{event}");
    assert_eq!(event["regarding"]["namespace"], "x", "{event}");
    assert_eq!(event["type"], "Warning", "{event}");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(note.contains("policy-agent.io/enforcement") && note.contains("sometimes"), "{event}");

    let mut ns = objects::namespace(&policy_model::Namespace::new("x".to_string(), Default::default()));
    ns["metadata"]["annotations"] = json!({"policy-agent.io/enforcement": "maybe"});
    c.api.apply_json(ns);
    let event = wait_event(&c, "x", &agent);
    assert_eq!(event["regarding"]["kind"], "Namespace", "{event}");
    assert!(event["note"].as_str().unwrap_or_default().contains("maybe"), "{event}");
    // Still enforced: an invalid Namespace annotation audits nothing.
    c.wait_for(false, Duration::from_secs(2), &agent, "still enforced");
    // Audit mode from the API: the annotation on the policy (the agent once dropped it
    // when decoding NetworkPolicies from the API) lets the traffic through.
    c.api.apply_json(objects::network_policy_json(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-ingress", "namespace": "x", "annotations": {"policy-agent.io/enforcement": "audit"}},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}})));
    c.wait_for(true, Duration::from_secs(10), &agent, "the audited default-deny lets x/a through");
}

/// The agent's `InvalidAnnotation` Event about `name`, within 10 s.
fn wait_event(c: &Cluster, name: &str, agent: &AgentProcess) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = c.api.events().into_iter().find(|e| e["regarding"]["name"] == name && e["reason"] == "InvalidAnnotation") {
            return e;
        }
        assert!(Instant::now() < deadline, "no InvalidAnnotation Event for {name}; events: {:?}\n{}", c.api.events(), agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
