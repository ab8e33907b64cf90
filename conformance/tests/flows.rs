//! Flow events on real traffic: `policy-agent run --manifests` in an emulated node, real
//! connections between pods, and what the agent reports of them in its flow log
//! (`--flow-log FILE`), on its observe socket (`policy-agent observe`) and in its metrics.
//! Needs root and BPF; fails, never skips, without them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conformance::agent_process::{AgentOptions, AgentProcess, agent_binary};
use conformance::cluster::{PodSpec, namespace_manifest, pod_address};
use conformance::netns::unique;
use conformance::topology::{NodeNet, PodNet, Topology};
use conformance::traffic::{Servers, probe, serve};
use policy_model::{Family, Protocol};
use serde_json::{Value, json};

const NODE: &str = "node-1";

struct Cluster {
    node: NodeNet,
    pods: BTreeMap<String, (PodSpec, PodNet, Servers)>,
    dir: tempfile::TempDir,
    /// The flow log and the observe socket.
    work: tempfile::TempDir,
}

impl Cluster {
    fn new(pods: &[&str]) -> Cluster {
        let node = NodeNet::create_with(
            &unique("pfn"),
            NODE,
            &["10.250.0.1".parse().unwrap(), "fd10:250::1".parse().unwrap()],
            Topology::Routed,
            0,
        )
        .expect("node (root needed)");
        let mut c = Cluster { node, pods: BTreeMap::new(), dir: tempfile::tempdir().unwrap(), work: tempfile::tempdir().unwrap() };
        for ns in ["x", "y"] {
            c.write(&format!("ns-{ns}.yaml"), namespace_manifest(ns, &BTreeMap::new()));
        }
        c.write(
            "node.yaml",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}, {"type": "InternalIP", "address": "fd10:250::1"}]}}),
        );
        for (i, key) in pods.iter().enumerate() {
            let (ns, name) = key.split_once('/').unwrap();
            let ips = vec![pod_address(Family::Ipv4, 0, i), pod_address(Family::Ipv6, 0, i)];
            let net = c.node.add_pod(&unique("pfp"), &format!("pf{i}"), &ips).unwrap();
            let servers = serve(&net.ns, &[80, 81]).unwrap();
            let spec = PodSpec {
                namespace: ns.into(),
                name: name.into(),
                labels: [("pod".to_string(), name.to_string())].into(),
                node: NODE.into(),
                ips,
            };
            c.write_pod(&spec);
            c.pods.insert(key.to_string(), (spec, net, servers));
        }
        c
    }

    fn write(&self, name: &str, v: Value) {
        std::fs::write(self.dir.path().join(name), serde_yaml_ng::to_string(&v).unwrap()).unwrap();
    }

    fn pod_file(key: &str) -> String {
        format!("pod-{}.yaml", key.replace('/', "-"))
    }

    fn write_pod(&self, spec: &PodSpec) {
        self.write(&Cluster::pod_file(&spec.key()), spec.manifest());
    }

    fn flow_log(&self) -> PathBuf {
        self.work.path().join("flows.jsonl")
    }

    fn socket(&self) -> PathBuf {
        self.work.path().join("observe.sock")
    }

    fn start(&self, extra: &[&str]) -> AgentProcess {
        self.start_with(extra, AgentOptions::default())
    }

    fn start_with(&self, extra: &[&str], opts: AgentOptions) -> AgentProcess {
        let log = self.flow_log();
        let sock = self.socket();
        let mut args = vec!["--flow-log", log.to_str().unwrap(), "--observe-socket", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut agent = AgentProcess::start_with(&self.node.ns, NODE, &[self.dir.path()], Some(20), &args, opts).expect("agent");
        agent.wait_ready(Duration::from_secs(20)).unwrap();
        agent
    }

    fn net(&self, key: &str) -> &PodNet {
        &self.pods[key].1
    }

    fn ip(&self, key: &str) -> IpAddr {
        self.pods[key].0.ips[0]
    }

    /// Probes TCP `port` from `from` to `to` until it gives `want` (10 s at most).
    fn until(&self, from: &str, to: &str, port: u16, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let dst = SocketAddr::new(self.ip(to), port);
        loop {
            if probe(&self.net(from).ns, Protocol::Tcp, dst, Duration::from_millis(300)).unwrap() == want {
                return;
            }
            assert!(Instant::now() < deadline, "{from} -> {to}:{port} never became {}", if want { "allowed" } else { "blocked" });
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn policy(name: &str, ns: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// One TCP connection attempt that sends exactly one SYN: a 300 ms timeout is below TCP's
/// first retransmission (1 s), and the socket is closed after it.
fn one_syn(c: &Cluster, from: &str, dst: SocketAddr) -> bool {
    c.net(from).ns.run(move || TcpStream::connect_timeout(&dst, Duration::from_millis(300)).is_ok()).unwrap()
}

/// The flow log's lines, parsed.
fn log_flows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a flow log line is not JSON ({e}): {l}")))
        .collect()
}

/// Waits until `pred` holds for at least `n` flows of the log (10 s at most), then 1.5 s
/// more (a duplicate would have time to show), and returns those flows.
fn wait_flows(path: &Path, n: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = log_flows(path).into_iter().filter(|f| pred(f)).collect();
        if found.len() >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} flows in the log after 10 s:\n{}",
            found.len(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    log_flows(path).into_iter().filter(|f| pred(f)).collect()
}

fn to_port(f: &Value, ip: IpAddr, port: u16) -> bool {
    f["destination"]["ip"] == ip.to_string() && f["destination"]["port"] == port
}

fn observe(c: &Cluster, args: &[&str]) -> String {
    let out =
        std::process::Command::new(agent_binary().unwrap()).arg("observe").arg("--socket").arg(c.socket()).args(args).output().unwrap();
    assert!(out.status.success(), "observe {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn has_policy(f: &Value, ns: &str, name: &str, role: &str, rule: Option<u64>) -> bool {
    f["policies"].as_array().unwrap().iter().any(|p| {
        p["kind"] == "NetworkPolicy"
            && p["namespace"] == ns
            && p["name"] == name
            && p["role"] == role
            && rule.is_none_or(|r| p["rule"] == r)
    })
}

/// x/b admits x/a on TCP 81 only. A connection from x/a to port 8080 and one from y/c to
/// port 8081 are denied: each is exactly one event (one SYN), naming both pods, the
/// isolating policy and why, in the flow log and in `observe` (JSON and text); `observe`
/// filters, and ends quietly when its reader goes away.
#[test]
fn a_denied_connection_is_one_event_naming_both_pods_and_the_policy() {
    let c = Cluster::new(&["x/a", "x/b", "y/c"]);
    c.write(
        "np.yaml",
        policy(
            "b-ingress",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 81, "protocol": "TCP"}]}]}),
        ),
    );
    let agent = c.start(&[]);
    c.until("x/a", "x/b", 80, false);
    c.until("x/a", "x/b", 81, true);
    let (a, b, cc) = (c.ip("x/a"), c.ip("x/b"), c.ip("y/c"));

    assert!(!one_syn(&c, "x/a", SocketAddr::new(b, 8080)), "x/a -> x/b:8080 is denied");
    assert!(!one_syn(&c, "y/c", SocketAddr::new(b, 8081)), "y/c -> x/b:8081 is denied");
    let log = c.flow_log();
    let ab = wait_flows(&log, 1, "x/a -> x/b:8080", |f| to_port(f, b, 8080));
    assert_eq!(ab.len(), 1, "one denied connection (one SYN), one event: {ab:#?}");
    let f = &ab[0];
    assert_eq!(f["verdict"], "denied");
    assert_eq!(f["direction"], "ingress");
    assert_eq!(f["subject"], "x/b");
    assert_eq!(f["node"], NODE);
    assert_eq!(f["protocol"], "TCP");
    assert_eq!(
        (f["source"]["kind"].as_str(), f["source"]["namespace"].as_str(), f["source"]["pod"].as_str()),
        (Some("pod"), Some("x"), Some("a"))
    );
    assert_eq!(f["source"]["ip"], a.to_string());
    assert_eq!((f["destination"]["namespace"].as_str(), f["destination"]["pod"].as_str()), (Some("x"), Some("b")));
    assert_eq!(f["decided_by"], "port_not_allowed", "x/a is a peer of x/b's rule, on another port: {f:#}");
    assert!(has_policy(f, "x", "b-ingress", "isolates", None), "the isolating policy is named: {f:#}");
    assert!(has_policy(f, "x", "b-ingress", "allows", Some(0)), "the rule for this peer is named: {f:#}");
    assert_eq!(f["tables_exact"], true);
    assert!(f["time"].as_str().unwrap().ends_with('Z'));

    let cb = wait_flows(&log, 1, "y/c -> x/b:8081", |f| to_port(f, b, 8081));
    assert_eq!(cb.len(), 1, "{cb:#?}");
    let f = &cb[0];
    assert_eq!(
        (f["source"]["namespace"].as_str(), f["source"]["pod"].as_str(), f["source"]["ip"].as_str()),
        (Some("y"), Some("c"), Some(cc.to_string().as_str()))
    );
    assert_eq!(f["decided_by"], "no_rule");
    assert!(has_policy(f, "x", "b-ingress", "isolates", None), "{f:#}");
    assert!(f["reason"].as_str().unwrap().contains("isolated by x/b-ingress; no rule allows this peer"), "{f:#}");

    // The allowed probes made no events (denied flows only, by default).
    assert!(log_flows(&log).iter().all(|f| f["verdict"] == "denied"), "only denied flows are reported by default");

    // observe -o json: the same flows, filtered.
    let json_lines: Vec<Value> = observe(&c, &["-o", "json", "--pod", "y/c"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(json_lines.iter().any(|f| to_port(f, b, 8081)), "observe --pod y/c shows y/c's flow: {json_lines:#?}");
    assert!(json_lines.iter().all(|f| f["source"]["pod"] == "c" || f["destination"]["pod"] == "c"), "--pod filters: {json_lines:#?}");
    let ab_observed: Vec<Value> = observe(&c, &["-o", "json", "--verdict", "denied"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|f| to_port(f, b, 8080))
        .collect();
    assert_eq!(ab_observed, ab, "observe and the flow log carry the same flow");
    assert_eq!(observe(&c, &["--verdict", "allowed"]), "", "no allowed flows were reported");
    let last = observe(&c, &["-o", "json", "--last", "1"]);
    assert_eq!(last.lines().count(), 1, "{last}");
    let text = observe(&c, &["--namespace", "y"]);
    let line = text.lines().find(|l| l.contains(":8081")).unwrap_or_else(|| panic!("observe text: {text}"));
    assert!(
        line.contains("y/c:")
            && line.contains("-> x/b:8081 TCP  DENIED  (ingress of x/b: isolated by x/b-ingress; no rule allows this peer)"),
        "{line}"
    );

    // `observe --follow | head -1`: the reader goes away; observe ends without a panic
    // once it has something more to write.
    let mut child = std::process::Command::new(agent_binary().unwrap())
        .args(["observe", "--follow", "-o", "json", "--socket"])
        .arg(c.socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    drop(stdout);
    for port in 9100..9103 {
        let _ = one_syn(&c, "y/c", SocketAddr::new(b, port));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "observe --follow did not end after its reader went away");
        let _ = one_syn(&c, "y/c", SocketAddr::new(b, 9200));
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success() && !stderr.contains("panicked"), "observe | head: {status:?} {stderr}");
    assert!(first.starts_with('{'), "{first}");
    assert!(!agent.log_text().contains("ERROR"), "{}", agent.log_text());
}

/// With `--flow-events all`: a connection that goes on for a hundred exchanges is reported
/// once per judging side (x/a's egress, not isolated; x/b's ingress, allowed by a named
/// rule), never for its later packets.
#[test]
fn established_flows_emit_nothing_after_their_first_judgment() {
    let c = Cluster::new(&["x/a", "x/b"]);
    c.write(
        "np.yaml",
        policy(
            "b-ingress",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 9000, "protocol": "TCP"}]}]}),
        ),
    );
    let server = c
        .net("x/b")
        .ns
        .spawn(|| {
            let l = TcpListener::bind(("0.0.0.0", 9000)).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _agent = c.start(&["--flow-events", "all"]);
    c.until("x/a", "x/b", 80, false);
    let b = c.ip("x/b");
    let exchanged = c
        .net("x/a")
        .ns
        .run(move || {
            let mut s = TcpStream::connect_timeout(&SocketAddr::new(b, 9000), Duration::from_secs(2)).expect("x/a -> x/b:9000 is allowed");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut n = 0;
            for i in 0..100u8 {
                let mut buf = [0u8; 1];
                s.write_all(&[i]).unwrap();
                s.read_exact(&mut buf).unwrap();
                assert_eq!(buf[0], i);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
        .unwrap();
    assert_eq!(exchanged, 100);
    server.join().unwrap();
    let flows = wait_flows(&c.flow_log(), 2, "x/a -> x/b:9000", |f| to_port(f, b, 9000));
    assert_eq!(flows.len(), 2, "one event per judging side, none for the 200 packets after: {flows:#?}");
    let egress = flows.iter().find(|f| f["direction"] == "egress").expect("x/a's egress event");
    assert_eq!(
        (egress["subject"].as_str(), egress["verdict"].as_str(), egress["decided_by"].as_str()),
        (Some("x/a"), Some("allowed"), Some("not_isolated"))
    );
    let ingress = flows.iter().find(|f| f["direction"] == "ingress").expect("x/b's ingress event");
    assert_eq!(
        (ingress["subject"].as_str(), ingress["verdict"].as_str(), ingress["decided_by"].as_str()),
        (Some("x/b"), Some("allowed"), Some("rule"))
    );
    assert!(has_policy(ingress, "x", "b-ingress", "allows", Some(0)), "the allowing rule is named: {ingress:#}");
    assert_eq!((ingress["source"]["pod"].as_str(), ingress["destination"]["pod"].as_str()), (Some("a"), Some("b")));
}

/// A pod's address is reused by a new pod (another namespace and name, the same network
/// namespace and veth): flows before the change name the old pod, flows after it the new.
#[test]
fn a_reused_pod_address_names_the_pod_that_held_it() {
    let c = Cluster::new(&["x/a", "x/b"]);
    c.write("np.yaml", policy("b-deny", "x", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]})));
    let agent = c.start(&[]);
    c.until("x/a", "x/b", 80, false);
    let b = c.ip("x/b");
    assert!(!one_syn(&c, "x/a", SocketAddr::new(b, 7000)));
    let before = wait_flows(&c.flow_log(), 1, "the old pod's flow", |f| to_port(f, b, 7000));
    assert_eq!((before[0]["source"]["namespace"].as_str(), before[0]["source"]["pod"].as_str()), (Some("x"), Some("a")), "{before:#?}");

    // x/a goes; y/new comes with its addresses.
    std::fs::remove_file(c.dir.path().join(Cluster::pod_file("x/a"))).unwrap();
    let dump = |pod: &str| -> bool {
        let out = std::process::Command::new(agent_binary().unwrap())
            .args(["dump", "-o", "json", "--pin-dir"])
            .arg(&agent.pin_dir)
            .arg("--state-file")
            .arg(&agent.state_file)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["endpoints"].as_array().is_some_and(|e| e.iter().any(|e| e["pod"] == pod))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while dump("x/a") {
        assert!(Instant::now() < deadline, "x/a was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut reused = c.pods["x/a"].0.clone();
    reused.namespace = "y".into();
    reused.name = "new".into();
    reused.labels = [("pod".to_string(), "new".to_string())].into();
    c.write_pod(&reused);
    while !dump("y/new") {
        assert!(Instant::now() < deadline, "y/new was not enforced");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!one_syn(&c, "x/a", SocketAddr::new(b, 7001)));
    let after = wait_flows(&c.flow_log(), 1, "the new pod's flow", |f| to_port(f, b, 7001));
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!((after[0]["source"]["namespace"].as_str(), after[0]["source"]["pod"].as_str()), (Some("y"), Some("new")), "{after:#?}");
    assert_eq!(after[0]["source"]["ip"], before[0]["source"]["ip"], "the same address");
    // The earlier flow still names the pod of its time.
    let old = log_flows(&c.flow_log()).into_iter().find(|f| to_port(f, b, 7000)).unwrap();
    assert_eq!(old["source"]["pod"], "a");
}

/// The online CPUs (what the agent splits the rate over), from `0-3,6`-style ranges.
fn online_cpus() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("/sys/devices/system/cpu/online");
    text.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}")) as u64
}

/// A flood of 3,000 denied UDP datagrams (each judged anew: a denied flow is never
/// tracked) with the node's rate at 100 events/s: the events written stay within the
/// rate limit, every judgment is either an event or counted as suppressed (or ring-full),
/// the log holds exactly the events written, and allowed traffic passes meanwhile.
#[test]
fn a_flood_of_denied_flows_stays_within_the_rate_limit_and_is_counted() {
    let c = Cluster::new(&["x/a", "x/b", "y/c"]);
    c.write(
        "np.yaml",
        policy(
            "b-ingress",
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}], "ports": [{"port": 80, "protocol": "TCP"}]}]}),
        ),
    );
    let agent = c.start(&["--flow-event-rate", "100", "--metrics-addr", "127.0.0.1:9464"]);
    c.until("x/a", "x/b", 80, true);
    c.until("y/c", "x/b", 80, false);
    let metrics = || -> String {
        c.node
            .ns
            .run(|| {
                let mut s = TcpStream::connect("127.0.0.1:9464").unwrap();
                write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
            .unwrap()
    };
    // The counters are read from the kernel once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let m0 = metrics();
    let (e0, s0, r0) = (
        metric(&m0, "policy_agent_flow_events_total"),
        metric(&m0, "policy_agent_flow_events_suppressed_total"),
        metric(&m0, "policy_agent_flow_events_ring_full_total"),
    );

    let b = c.ip("x/b");
    const FLOOD: usize = 3000;
    let allowed_probes = {
        let a = c.net("x/a").ns.handle();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..10 {
                results.push(conformance::traffic::probe_in(&a, Protocol::Tcp, SocketAddr::new(b, 80), Duration::from_secs(1)).unwrap());
                std::thread::sleep(Duration::from_millis(30));
            }
            results
        })
    };
    let started = Instant::now();
    let sent = c
        .net("y/c")
        .ns
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = 0;
            for i in 0..FLOOD {
                if s.send_to(&(i as u32).to_be_bytes(), SocketAddr::new(b, 9999)).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(sent, FLOOD);
    let probes = allowed_probes.join().unwrap();
    assert!(probes.iter().all(|ok| *ok), "allowed traffic passes during the flood: {probes:?}");

    std::thread::sleep(Duration::from_millis(2500));
    let m1 = metrics();
    let (e1, s1, r1) = (
        metric(&m1, "policy_agent_flow_events_total"),
        metric(&m1, "policy_agent_flow_events_suppressed_total"),
        metric(&m1, "policy_agent_flow_events_ring_full_total"),
    );
    let (emitted, suppressed, ring_full) = (e1 - e0, s1 - s0, r1 - r0);
    let cpus = online_cpus();
    // 100/s over the node's CPUs, each with a burst of 0.1 s of its share (+1).
    let cost = cpus as f64 / 100.0;
    let bound = ((elapsed / cost).ceil() as u64 + (0.1 / cost) as u64 + 2) * cpus;
    eprintln!(
        "flood of {FLOOD} in {elapsed:.3} s on {cpus} CPUs: {emitted} events, {suppressed} suppressed, {ring_full} ring-full (bound {bound})"
    );
    assert_eq!(emitted + suppressed + ring_full, FLOOD as u64, "every judgment of the flood is an event or counted");
    assert!(emitted >= 1 && emitted <= bound, "{emitted} events for a rate of 100/s over {elapsed:.3} s (bound {bound})");
    assert!(suppressed >= FLOOD as u64 - bound, "{suppressed} suppressed");
    let logged = log_flows(&c.flow_log()).into_iter().filter(|f| to_port(f, b, 9999)).count() as u64;
    assert_eq!(logged, emitted, "the log holds every event written");
    let verdicts = metric(
        &m1.lines()
            .filter(|l| {
                l.contains("namespace=\"x\"")
                    && l.contains("pod=\"b\"")
                    && l.contains("verdict=\"denied\"")
                    && l.contains("direction=\"ingress\"")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        "policy_agent_flow_verdicts_total",
    );
    assert!(verdicts >= emitted, "policy_agent_flow_verdicts_total counts x/b's denied flows: {verdicts}");
    assert!(!agent.log_text().contains("ERROR"), "{}", agent.log_text());
}

// ---- audit mode (issue 14 item 4) ----

/// A policy annotated `policy-agent.io/enforcement: audit`.
fn audited(mut p: Value) -> Value {
    p["metadata"]["annotations"] = json!({"policy-agent.io/enforcement": "audit"});
    p
}

fn deny_ingress(name: &str, ns: &str, pod: &str) -> Value {
    policy(name, ns, json!({"podSelector": {"matchLabels": {"pod": pod}}, "policyTypes": ["Ingress"]}))
}

fn deny_egress(name: &str, ns: &str, pod: &str) -> Value {
    policy(name, ns, json!({"podSelector": {"matchLabels": {"pod": pod}}, "policyTypes": ["Egress"]}))
}

fn flows_with(path: &Path, verdict: &str) -> Vec<Value> {
    log_flows(path).into_iter().filter(|f| f["verdict"] == verdict).collect()
}

/// An audited default-deny on x/b lets x/a's connections through; each is reported once
/// (its later packets emit nothing) with verdict `audit`, the audited policy named, in the
/// flow log, `observe --verdict audit` and the metrics. Removing the annotation enforces
/// it: the next connection is denied (verdict `denied`).
#[test]
fn an_audited_default_deny_lets_traffic_through_and_reports_it_as_audit() {
    let c = Cluster::new(&["x/a", "x/b"]);
    c.write("np.yaml", audited(deny_ingress("deny", "x", "b")));
    let agent = c.start(&["--metrics-addr", "127.0.0.1:9465"]);
    c.until("x/a", "x/b", 80, true);
    let b = c.ip("x/b");
    assert!(one_syn(&c, "x/a", SocketAddr::new(b, 81)), "x/a -> x/b:81 passes");
    let log = c.flow_log();
    let f81 = wait_flows(&log, 1, "the audited flow to :81", |f| to_port(f, b, 81));
    assert_eq!(f81.len(), 1, "one connection, one event: {f81:#?}");
    let f = &f81[0];
    assert_eq!(
        (f["verdict"].as_str(), f["direction"].as_str(), f["subject"].as_str()),
        (Some("audit"), Some("ingress"), Some("x/b")),
        "{f:#}"
    );
    assert_eq!((f["source"]["pod"].as_str(), f["destination"]["pod"].as_str()), (Some("a"), Some("b")));
    assert!(has_policy(f, "x", "deny", "audited", None), "the audited policy is named: {f:#}");
    assert_eq!(f["decided_by"], "no_rule", "{f:#}");
    assert!(f["reason"].as_str().unwrap().starts_with("allowed; audited x/deny would deny it"), "{f:#}");
    assert!(flows_with(&log, "denied").is_empty(), "nothing is denied: {:#?}", log_flows(&log));

    let observed: Vec<Value> =
        observe(&c, &["-o", "json", "--verdict", "audit"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(observed.iter().any(|o| o == f), "observe --verdict audit shows it: {observed:#?}");
    assert!(observed.iter().all(|o| o["verdict"] == "audit"));
    let text = observe(&c, &["--verdict", "audit", "--last", "1"]);
    eprintln!("observe --verdict audit --last 1:\n{text}");
    assert!(text.contains("AUDIT  (ingress of x/b: allowed; audited x/deny would deny it"), "{text}");
    let metrics = c
        .node
        .ns
        .run(|| {
            let mut s = TcpStream::connect("127.0.0.1:9465").unwrap();
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("policy_agent_flow_verdicts_total{")
                && l.contains("verdict=\"audit\"")
                && l.contains("pod=\"b\"")
                && l.contains("policy=\"x/deny\"")),
        "the metrics count audit verdicts, under the audited policy"
    );

    // Enforced once the annotation goes.
    c.write("np.yaml", deny_ingress("deny", "x", "b"));
    c.until("x/a", "x/b", 80, false);
    assert!(!one_syn(&c, "x/a", SocketAddr::new(b, 82)));
    let denied = wait_flows(&log, 1, "the denied flow to :82", |f| to_port(f, b, 82));
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0]["verdict"], "denied");
    assert!(
        has_policy(&denied[0], "x", "deny", "isolates", None) && !has_policy(&denied[0], "x", "deny", "audited", None),
        "{:#}",
        denied[0]
    );
    assert!(!agent.log_text().contains("ERROR"), "{}", agent.log_text());
}

/// A Namespace annotated `audit` audits every policy in it (x/a's egress and x/b's ingress
/// here: one audit event each), while in another namespace an enforced policy beside an
/// audited one that would allow more still denies what it denies (verdict `denied`, naming
/// the enforced policy), and what it allows raises no audit event. An invalid annotation
/// value is reported, naming the object and the annotation, and the policy is enforced.
#[test]
fn a_namespace_annotation_audits_its_policies_and_enforced_policies_still_deny() {
    let c = Cluster::new(&["x/a", "x/b", "y/c", "y/d"]);
    let mut ns = namespace_manifest("x", &BTreeMap::new());
    ns["metadata"]["annotations"] = json!({"policy-agent.io/enforcement": "audit"});
    c.write("ns-x.yaml", ns);
    c.write("np-x-in.yaml", deny_ingress("deny-in", "x", "b"));
    c.write("np-x-out.yaml", deny_egress("deny-out", "x", "a"));
    c.write(
        "np-y-audited.yaml",
        audited(policy(
            "allow-7200",
            "y",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"ports": [{"port": 7200, "protocol": "TCP"}]}]}),
        )),
    );
    c.write(
        "np-y-enforced.yaml",
        policy(
            "only-81",
            "y",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]}),
        ),
    );
    let mut bad = deny_ingress("bad", "y", "d");
    bad["metadata"]["annotations"] = json!({"policy-agent.io/enforcement": "Audit"});
    c.write("np-y-bad.yaml", bad);
    let _extra = (serve(&c.net("x/b").ns, &[7100]).unwrap(), serve(&c.net("y/c").ns, &[7200]).unwrap());
    let agent = c.start(&[]);
    c.until("x/a", "x/b", 80, true);
    c.until("x/b", "y/c", 80, false);
    c.until("x/b", "y/c", 81, true);
    c.until("x/b", "y/d", 80, false);
    let (b, cc) = (c.ip("x/b"), c.ip("y/c"));
    let log = c.flow_log();

    assert!(one_syn(&c, "x/a", SocketAddr::new(b, 7100)), "the namespace's policies are audited");
    let ab = wait_flows(&log, 2, "x/a -> x/b:7100, both sides", |f| to_port(f, b, 7100));
    assert_eq!(ab.len(), 2, "one audit event per side: {ab:#?}");
    let egress = ab.iter().find(|f| f["direction"] == "egress").expect("x/a's egress");
    assert_eq!((egress["verdict"].as_str(), egress["subject"].as_str()), (Some("audit"), Some("x/a")), "{egress:#}");
    assert!(has_policy(egress, "x", "deny-out", "audited", None), "{egress:#}");
    let ingress = ab.iter().find(|f| f["direction"] == "ingress").expect("x/b's ingress");
    assert_eq!((ingress["verdict"].as_str(), ingress["subject"].as_str()), (Some("audit"), Some("x/b")), "{ingress:#}");
    assert!(has_policy(ingress, "x", "deny-in", "audited", None), "{ingress:#}");

    // y/c: the enforced policy denies :7200 (denied, not audit, though the audited policy
    // would allow it) and allows :81 (no event).
    assert!(!one_syn(&c, "x/b", SocketAddr::new(cc, 7200)));
    assert!(one_syn(&c, "x/b", SocketAddr::new(cc, 81)));
    let denied = wait_flows(&log, 1, "x/b -> y/c:7200", |f| to_port(f, cc, 7200));
    assert_eq!(denied.len(), 1, "{denied:#?}");
    let d = &denied[0];
    assert_eq!((d["verdict"].as_str(), d["subject"].as_str()), (Some("denied"), Some("y/c")), "{d:#}");
    assert!(has_policy(d, "y", "only-81", "isolates", None), "the enforced policy is named: {d:#}");
    assert!(!has_policy(d, "y", "allow-7200", "isolates", None) && !has_policy(d, "y", "allow-7200", "audited", None), "{d:#}");
    assert!(
        log_flows(&log).iter().all(|f| !to_port(f, cc, 81) || f["verdict"] != "audit"),
        "no audit event where the audited policy changes nothing"
    );

    let text = agent.log_text();
    assert!(
        text.contains(
            "NetworkPolicy y/bad is invalid: metadata.annotations[policy-agent.io/enforcement]: Unsupported value: \\\"Audit\\\""
        ) || text
            .contains("NetworkPolicy y/bad is invalid: metadata.annotations[policy-agent.io/enforcement]: Unsupported value: \"Audit\""),
        "the invalid value is reported, naming the object and the annotation:\n{text}"
    );
}

/// `--enforcement audit`: the whole node enforces nothing; what its (unannotated) policies
/// would deny passes and is reported as `audit`.
#[test]
fn the_node_switch_audits_every_policy() {
    let c = Cluster::new(&["x/a", "x/b"]);
    c.write("np.yaml", deny_ingress("deny", "x", "b"));
    let _extra = serve(&c.net("x/b").ns, &[7300]).unwrap();
    let _agent = c.start(&["--enforcement", "audit"]);
    c.until("x/a", "x/b", 80, true);
    let b = c.ip("x/b");
    assert!(one_syn(&c, "x/a", SocketAddr::new(b, 7300)));
    let f = wait_flows(&c.flow_log(), 1, "x/a -> x/b:7300", |f| to_port(f, b, 7300));
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["verdict"], "audit");
    assert!(has_policy(&f[0], "x", "deny", "audited", None), "{:#}", f[0]);
}

/// A pod whose tables do not fit (here: more peers than `--max-peer-entries`) is
/// fail-closed: the new flows it drops are reported, in both directions, as decided by
/// that. And `--flow-events sampled:N` reports about one allowed flow in N, while denied
/// ones are all still reported.
#[test]
fn a_fail_closed_pod_reports_what_it_drops_and_sampling_reports_one_allowed_flow_in_n() {
    let c = Cluster::new(&["x/a", "x/b", "y/c"]);
    // 100 peers of x/b's ingress: more than the 64 entries the peer table is given.
    let peers: Vec<Value> = (0..100).map(|i| json!({"ipBlock": {"cidr": format!("10.99.{i}.0/24")}})).collect();
    c.write(
        "np.yaml",
        policy("b-big", "x", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"], "ingress": [{"from": peers}]})),
    );
    let _agent = c.start_with(&["--flow-events", "sampled:10"], AgentOptions { sizes: Some((64, 16384)), ..Default::default() });
    c.until("x/a", "x/b", 80, false);
    let (a, b, cc) = (c.ip("x/a"), c.ip("x/b"), c.ip("y/c"));
    let log = c.flow_log();

    assert!(!one_syn(&c, "x/a", SocketAddr::new(b, 8080)), "x/a -> x/b:8080 is dropped: x/b is fail-closed");
    // (x/a's egress allows it, and may report that too: one allowed flow in 10 is.)
    let f = wait_flows(&log, 1, "x/a -> x/b:8080", |f| to_port(f, b, 8080) && f["verdict"] == "denied");
    assert_eq!(f.len(), 1, "one SYN, one denied event: {f:#?}");
    let f = &f[0];
    assert_eq!((f["verdict"].as_str(), f["direction"].as_str(), f["subject"].as_str()), (Some("denied"), Some("ingress"), Some("x/b")), "{f:#}");
    assert_eq!(f["decided_by"], "fail_closed", "{f:#}");
    assert!(f["reason"].as_str().unwrap().contains("fail-closed"), "{f:#}");

    // Its egress too: nothing leaves it.
    assert!(!one_syn(&c, "x/b", SocketAddr::new(a, 8081)), "x/b -> x/a:8081 is dropped");
    let f = wait_flows(&log, 1, "x/b -> x/a:8081", |f| to_port(f, a, 8081) && f["verdict"] == "denied");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!((f[0]["verdict"].as_str(), f[0]["direction"].as_str(), f[0]["decided_by"].as_str()), (Some("denied"), Some("egress"), Some("fail_closed")));

    // x/a -> y/c: nothing isolates either; one allowed connection in 10 is reported, by
    // each end's hook (x/a's egress, y/c's ingress). 300 connections, 5 ms apart (well
    // within the rate limit): 600 judgments, so about 60 events (sd 7). One in 100 would
    // give about 6, all would give 600: the bounds are 5 standard deviations.
    let connections = 300;
    let dst = SocketAddr::new(cc, 80);
    let ok = c.net("x/a").ns.run(move || {
        (0..connections)
            .filter(|_| {
                std::thread::sleep(Duration::from_millis(5));
                TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok()
            })
            .count()
    });
    assert_eq!(ok.unwrap(), connections, "x/a -> y/c is allowed");
    std::thread::sleep(Duration::from_secs(2));
    let allowed: Vec<Value> = log_flows(&log).into_iter().filter(|f| f["verdict"] == "allowed" && to_port(f, cc, 80)).collect();
    assert!(
        (20..=110).contains(&allowed.len()),
        "sampled:10 over {connections} connections judged by two hooks: about 60 allowed events, got {}",
        allowed.len()
    );
    assert!(allowed.iter().all(|f| f["decided_by"] == "not_isolated"), "{allowed:#?}");
}
