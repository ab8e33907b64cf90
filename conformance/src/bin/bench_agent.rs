//! Agent benchmark (not a test): the real agent (`policy-agent run --manifests`, release
//! build, its default poll interval) in an emulated node's network namespace.
//!
//! 1. Time to enforce a policy change: a manifest written (temp file + rename) that flips
//!    whether pod x/a may connect to x/b, alternately deny and allow; timed from just
//!    before the write to the first probe that shows the new verdict on real traffic.
//! 2. Time to enforce a new pod: its manifest and a policy selecting it are known; its
//!    veth and namespace are made (as the CNI does) and timed until its policy is
//!    enforced (a flow it allows passes, one it denies is blocked). Any denied probe that
//!    passes on the way is counted as a leak.
//!
//!    Both run on a node with only the benchmark's pods, then with the synthetic cluster
//!    (`policy_model::workload`: 10,000 pods, 2,000 policies, 100 of the pods on this node,
//!    one manifest file per object) present as well.
//! 3. Memory: VmRSS and VmHWM of the agent once ready with the synthetic cluster (10,000
//!    and 11,000 pods, 2,000 policies, 100 local pods), and with nothing, and the growth
//!    per 1,000 pods. The local pods have no interfaces there (memory does not depend on
//!    them; the datapath maps are preallocated by the kernel, outside the agent's RSS).
//!
//! With `--source api` the agent watches the API stand-in (`conformance::apiserver`, in the
//! node's namespace, objects shaped as a real API server returns them) instead of reading
//! manifests, and the benchmark measures:
//! 4. Memory as in 3 (10,000, 11,000 and 50,000 pods; 2,000 policies; 100 local pods).
//! 5. Resume after an API restart: the API stops for `--outage-secs`, comes back with a
//!    new version base (every watch gets 410), a policy change is made at once, and the
//!    time until real traffic shows it is measured (`--outages` times).
//!
//! Run as root: `bash scripts/bench.sh`, or `cargo build --release -p policy-agent -p conformance
//! && target/release/bench_agent [--changes 200] [--new-pods 30] [--json FILE]`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use conformance::agent_process::AgentProcess;
use conformance::cluster::{PodSpec, namespace_manifest, pod_address};
use conformance::netns::{NetnsHandle, unique};
use conformance::topology::{NodeNet, PodNet};
use conformance::traffic::{Servers, serve};
use policy_model::workload::Workload;
use policy_model::{Family, Pod};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Policy changes to time (alternately deny and allow).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// New pods to time.
    #[arg(long, default_value_t = 30)]
    new_pods: usize,
    /// Skip the runs with the synthetic cluster present (time to enforce on an empty node only).
    #[arg(long)]
    no_background: bool,
    /// Skip the memory measurement.
    #[arg(long)]
    no_memory: bool,
    /// Only the memory measurement.
    #[arg(long)]
    memory_only: bool,
    /// The agent's --poll-interval-ms (default: the agent's own default).
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Where the agent reads the cluster from: manifests (time to enforce and memory), or
    /// the API stand-in (memory and resume after API restarts).
    #[arg(long, value_enum, default_value = "manifests")]
    source: Source,
    /// With `--source api`: API restarts to time.
    #[arg(long, default_value_t = 20)]
    outages: usize,
    /// With `--source api`: how long each API outage lasts, in seconds.
    #[arg(long, default_value_t = 3.0)]
    outage_secs: f64,
    /// With `--source api`: the pod counts to measure memory at (with 2,000 policies).
    #[arg(long, value_delimiter = ',', default_value = "10000,11000,50000")]
    api_pods: Vec<usize>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only the big-policy case: three policies for every pod of a namespace, each allowing
    /// the 32,768 odd ports of one protocol, applied and then deleted; reports the time to
    /// enforce each, policy changes made meanwhile, and the control loop's longest pass.
    #[arg(long)]
    big_policies: bool,
    /// Only write the synthetic cluster's manifests (10,000 pods, 2,000 policies, 100 pods on
    /// node-0) into this directory, for profiling the agent by hand.
    #[arg(long, value_name = "DIR")]
    write_manifests: Option<PathBuf>,
}

/// Probe timeout: a connection not made within it counts as blocked, so this is the
/// resolution of a "blocked" observation. A blocked observation is confirmed with a
/// longer probe before it counts.
const PROBE_TIMEOUT: Duration = Duration::from_millis(5);
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(200);
/// A change not enforced within this is reported as a timeout.
const GIVE_UP: Duration = Duration::from_secs(20);
/// The benchmark's pods are in 10.244.200.0/24 (fd10:244:0:200::/64), apart from the
/// synthetic cluster's.
const POD_SUBNET: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    Manifests,
    Api,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.source == Source::Api {
        return api_main(&args);
    }
    if let Some(dir) = &args.write_manifests {
        let n = write_workload(dir, &Workload::default())?;
        println!("wrote {n} files to {}", dir.display());
        return Ok(());
    }
    if args.big_policies {
        return big_policies(&args);
    }
    let mut out = serde_json::Map::new();
    let mut table: Vec<(String, String)> = Vec::new();
    if !args.memory_only {
        let backgrounds: &[bool] = if args.no_background { &[false] } else { &[false, true] };
        for &background in backgrounds {
            let label = if background { "with 10k pods/2k policies" } else { "bench pods only" };
            eprintln!("== time to enforce, {label}");
            let figures = enforce_scenario(&args, background)?;
            for (name, s) in &figures {
                table.push((format!("{name} ({label})"), s.row()));
            }
            out.insert(
                if background { "with_background" } else { "without_background" }.to_string(),
                Value::Object(figures.iter().map(|(k, s)| (k.clone(), s.json())).collect()),
            );
        }
    }
    if !args.no_memory || args.memory_only {
        eprintln!("== memory");
        let mem = memory(&args)?;
        for (k, v) in mem.as_object().expect("object") {
            table.push((format!("memory: {k}"), v.to_string()));
        }
        out.insert("memory".into(), mem);
    }
    out.insert(
        "resolution".into(),
        json!({"probe_timeout_ms": PROBE_TIMEOUT.as_secs_f64() * 1e3, "note": "a blocked observation is a TCP connect that did not complete within probe_timeout_ms (confirmed by a 200 ms probe); an allowed one completes the TCP handshake"}),
    );
    println!("\n{:<62} figures", "measurement");
    for (k, v) in &table {
        println!("{k:<62} {v}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(out))?).with_context(|| format!("writing {}", path.display()))?;
        println!("\nwritten: {}", path.display());
    }
    Ok(())
}

/// Latencies in milliseconds.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    timeouts: usize,
    leaks: usize,
    /// Extra figures (e.g. setup time of a pod).
    extra: BTreeMap<String, f64>,
}

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    fn row(&self) -> String {
        let mut s = format!(
            "n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
            self.ms.len(),
            self.quantile(0.5),
            self.quantile(0.99),
            self.sorted().last().copied().unwrap_or(f64::NAN)
        );
        if self.timeouts > 0 {
            s += &format!(" TIMEOUTS={}", self.timeouts);
        }
        if self.leaks > 0 {
            s += &format!(" LEAKS={}", self.leaks);
        }
        for (k, v) in &self.extra {
            s += &format!(" {k}={v:.1}");
        }
        s
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "n": self.ms.len(),
            "p50_ms": self.quantile(0.5),
            "p99_ms": self.quantile(0.99),
            "max_ms": self.sorted().last().copied(),
            "timeouts": self.timeouts,
            "leaks": self.leaks,
        });
        for (k, x) in &self.extra {
            v[k] = json!(x);
        }
        v
    }
}

/// Writes through a temporary file and a rename, so the agent never reads half a file.
fn write_atomic(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml_ng::to_string(v)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn policy(name: &str, ns: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The synthetic cluster's pod as a Pod manifest.
fn pod_manifest(p: &Pod) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.key.name, "namespace": p.key.namespace, "labels": p.labels},
        "spec": {"nodeName": p.node, "containers": [{"name": "app", "image": "app",
            "ports": p.named_ports.iter().map(|n| json!({"name": n.name, "containerPort": n.port, "protocol": n.protocol.to_string()})).collect::<Vec<_>>()}]},
        "status": {"phase": "Running", "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    })
}

/// Writes the synthetic cluster under `dir`, one file per object.
fn write_workload(dir: &Path, w: &Workload) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut files = 0;
    for i in 0..w.namespaces {
        let ns = w.namespace(i);
        std::fs::write(dir.join(format!("{}.yaml", ns.name)), serde_yaml_ng::to_string(&namespace_manifest(&ns.name, &ns.labels.to_map()))?)?;
        for j in 0..w.pods_per_namespace {
            let p = w.pod(i, j, None);
            std::fs::write(dir.join(format!("pod-{}-{}.yaml", p.key.namespace, p.key.name)), serde_yaml_ng::to_string(&pod_manifest(&p))?)?;
        }
        for np in w.policies(i, json!("http")) {
            let name = format!("np-{}-{}.yaml", ns.name, np.metadata.name.as_deref().unwrap_or_default());
            std::fs::write(dir.join(name), serde_yaml_ng::to_string(&np)?)?;
        }
        files += 1 + w.pods_per_namespace + policy_model::workload::POLICIES_PER_NAMESPACE;
    }
    Ok(files)
}

/// A TCP connection made (the handshake passed the policy both ways), from the calling
/// thread's namespace. No data is exchanged: the test servers answer one connection at a
/// time, and waiting on them would measure them, not the policy.
fn tcp_ok(dst: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&dst, timeout).is_ok()
}

/// A blocked (dropped) connection, as opposed to a refused one: the connect times out.
fn tcp_blocked(dst: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&dst, timeout) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

struct BenchPod {
    spec: PodSpec,
    net: PodNet,
    _servers: Servers,
}

struct BenchNode {
    node: NodeNet,
    dir: PathBuf,
    pods: BTreeMap<String, BenchPod>,
    next_index: usize,
}

impl BenchNode {
    fn new(node_name: &str) -> Result<BenchNode> {
        let node = NodeNet::create(&unique("bag"), node_name, &["10.250.0.1".parse()?, "fd10:250::1".parse()?])
            .map_err(|e| anyhow!("node namespace (root needed): {e}"))?;
        let dir = std::env::temp_dir().join(unique("bag-manifests-"));
        std::fs::create_dir_all(&dir)?;
        let b = BenchNode { node, dir, pods: BTreeMap::new(), next_index: 0 };
        b.write("ns-x.yaml", &namespace_manifest("x", &BTreeMap::new()))?;
        b.write(
            "node.yaml",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}, {"type": "InternalIP", "address": "fd10:250::1"}]}}),
        )?;
        Ok(b)
    }

    fn write(&self, name: &str, v: &Value) -> Result<()> {
        write_atomic(&self.dir.join(name), v)
    }

    fn spec(&mut self, name: &str, labels: &[(&str, &str)]) -> PodSpec {
        let i = self.next_index;
        self.next_index += 1;
        PodSpec {
            namespace: "x".into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            node: self.node.name.clone(),
            ips: vec![pod_address(Family::Ipv4, POD_SUBNET, i), pod_address(Family::Ipv6, POD_SUBNET, i)],
        }
    }

    /// Network (as the CNI makes it) with servers on 80.
    fn network(&self, spec: PodSpec) -> Result<BenchPod> {
        let net = self.node.add_pod(&unique("bap"), &unique("bav"), &spec.ips).map_err(|e| anyhow!("{e}"))?;
        let servers = serve(&net.ns, &[80]).map_err(|e| anyhow!("{e}"))?;
        Ok(BenchPod { spec, net, _servers: servers })
    }

    fn write_pod(&self, spec: &PodSpec) -> Result<()> {
        self.write(&format!("pod-{}-{}.yaml", spec.namespace, spec.name), &spec.manifest())
    }

    fn add_pod(&mut self, name: &str) -> Result<()> {
        let spec = self.spec(name, &[("pod", name)]);
        self.write_pod(&spec)?;
        let p = self.network(spec)?;
        self.pods.insert(name.to_string(), p);
        Ok(())
    }

    fn addr(&self, pod: &str) -> SocketAddr {
        SocketAddr::new(self.pods[pod].spec.ips[0], 80)
    }

    fn ns(&self, pod: &str) -> NetnsHandle {
        self.pods[pod].net.ns.handle()
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn flip_policy(allow: bool) -> Value {
    // The two versions differ in length as well as content.
    let from = if allow { "a" } else { "nobody-at-all" };
    policy(
        "b-ingress",
        "x",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": from}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
    )
}

/// A policy of namespace x selecting every pod, allowing the odd ports of `protocol`.
fn odd_ports(protocol: &str) -> Value {
    let ports: Vec<Value> = (1..=65535u32).step_by(2).map(|p| json!({"protocol": protocol, "port": p})).collect();
    policy(&format!("odd-{}", protocol.to_lowercase()), "x", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": ports}]}))
}

/// Polls `check` (in `ns`) until it holds; the time it took.
fn until(ns: &NetnsHandle, check: impl Fn() -> bool + Send + Clone + 'static) -> Result<Duration> {
    let started = Instant::now();
    let ok = ns.run(move || {
        let deadline = Instant::now() + GIVE_UP * 6;
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    })?;
    ensure!(ok, "not enforced within {:?}", GIVE_UP * 6);
    Ok(started.elapsed())
}

/// A metric's value from the agent's /metrics (in the node's namespace).
fn metric(ns: &NetnsHandle, addr: SocketAddr, name: &'static str) -> Result<f64> {
    let body = ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out)?;
        Ok(out)
    })??;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow!("no {name} in /metrics"))
}

fn big_policies(args: &Args) -> Result<()> {
    let w = Workload::default();
    let mut b = BenchNode::new(&w.node)?;
    for name in ["a", "b", "c"] {
        b.add_pod(name)?;
    }
    b.write("np-flip.yaml", &flip_policy(true))?;
    let dir = b.dir.clone();
    let metrics: SocketAddr = "127.0.0.1:9479".parse()?;
    let mut agent = AgentProcess::start_with_poll(&b.node.ns, &w.node, &[dir.as_path()], args.poll_interval_ms, &["--metrics-addr", "127.0.0.1:9479"])
        .map_err(|e| anyhow!("starting the agent: {e}"))?;
    agent.wait_ready(Duration::from_secs(60)).map_err(|e| anyhow!("{e}"))?;
    let (a_ns, node_ns) = (b.ns("a"), b.node.ns.handle());
    let (b80, c80) = (b.addr("b"), b.addr("c"));
    until(&a_ns, move || tcp_ok(b80, CONFIRM_TIMEOUT))?;
    let before = metric(&node_ns, metrics, "policy_agent_loop_step_max_seconds")?;
    // Applied: port 80 (even) is no longer allowed to c; b keeps its own policy's allow.
    let t0 = Instant::now();
    for proto in ["TCP", "UDP", "SCTP"] {
        b.write(&format!("np-odd-{}.yaml", proto.to_lowercase()), &odd_ports(proto))?;
    }
    // Meanwhile, another change: x/a may no longer reach x/b.
    b.write("np-flip.yaml", &flip_policy(false))?;
    let flip = until(&a_ns, move || tcp_blocked(b80, CONFIRM_TIMEOUT))?;
    let applied = until(&a_ns, move || tcp_blocked(c80, CONFIRM_TIMEOUT))?.max(t0.elapsed());
    let too_big = metric(&node_ns, metrics, "policy_agent_too_big_endpoints")?;
    let t1 = Instant::now();
    for proto in ["TCP", "UDP", "SCTP"] {
        std::fs::remove_file(b.dir.join(format!("np-odd-{}.yaml", proto.to_lowercase())))?;
    }
    b.write("np-flip.yaml", &flip_policy(true))?;
    let flip_back = until(&a_ns, move || tcp_ok(b80, CONFIRM_TIMEOUT))?;
    let deleted = until(&a_ns, move || tcp_ok(c80, CONFIRM_TIMEOUT))?.max(t1.elapsed());
    let longest = metric(&node_ns, metrics, "policy_agent_loop_step_max_seconds")?;
    let log = agent.log_text();
    agent.stop();
    println!("big policies (3 x 32,768 odd ports, every pod of x; 3 local pods):");
    println!("  applied, enforced on real traffic after      {:>8.1} ms", applied.as_secs_f64() * 1e3);
    println!("  a policy change made meanwhile, enforced in  {:>8.1} ms", flip.as_secs_f64() * 1e3);
    println!("  deleted, enforced after                      {:>8.1} ms", deleted.as_secs_f64() * 1e3);
    println!("  a policy change made meanwhile, enforced in  {:>8.1} ms", flip_back.as_secs_f64() * 1e3);
    println!("  pods too big for the maps                    {too_big}");
    println!("  the control loop's longest pass              {:>8.1} ms (before the big policies: {:.1} ms)", longest * 1e3, before * 1e3);
    ensure!(!log.contains("ERROR"), "agent log has errors:\n{log}");
    Ok(())
}

/// A small deterministic jitter (0..max), so changes fall at every phase of the agent's poll.
fn jitter(state: &mut u64, max: Duration) -> Duration {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    max.mul_f64(((*state >> 33) % 1000) as f64 / 1000.0)
}

fn enforce_scenario(args: &Args, background: bool) -> Result<BTreeMap<String, Samples>> {
    let w = Workload::default();
    let mut b = BenchNode::new(&w.node)?;
    if background {
        let n = write_workload(&b.dir.join("cluster"), &w)?;
        eprintln!("wrote {n} manifest files of the synthetic cluster");
    }
    for name in ["a", "b", "c"] {
        b.add_pod(name)?;
    }
    b.write("np-flip.yaml", &flip_policy(true))?;
    b.write(
        "np-new.yaml",
        &policy(
            "new-pods",
            "x",
            json!({"podSelector": {"matchLabels": {"role": "new"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    )?;
    let dir = b.dir.clone();
    let mut agent = AgentProcess::start_with_poll(&b.node.ns, &w.node, &[dir.as_path()], args.poll_interval_ms, &[])
        .map_err(|e| anyhow!("starting the agent: {e}"))?;
    let started = Instant::now();
    agent.wait_ready(Duration::from_secs(300)).map_err(|e| anyhow!("{e}"))?;
    eprintln!("agent ready after {:.1} s", started.elapsed().as_secs_f64());
    let mut result = BTreeMap::new();

    // Wait for the initial state: a → b allowed.
    let to_b = b.addr("b");
    let a_ns = b.ns("a");
    let initial = a_ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if tcp_ok(to_b, CONFIRM_TIMEOUT) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    if !initial {
        bail!("x/a cannot reach x/b at the start:\n{}", agent.log_text());
    }

    // 1. Policy changes.
    let path = dir.join("np-flip.yaml");
    let changes = args.changes;
    let (allow_to_deny, deny_to_allow) = a_ns.run(move || -> Result<(Samples, Samples)> {
        let mut to_deny = Samples::default();
        let mut to_allow = Samples::default();
        let mut rng = 0x5eed_u64;
        for i in 0..changes {
            let allow = i % 2 == 1;
            std::thread::sleep(Duration::from_millis(20) + jitter(&mut rng, Duration::from_millis(80)));
            let t0 = Instant::now();
            let mut failures: BTreeMap<String, u32> = BTreeMap::new();
            write_atomic(&path, &flip_policy(allow))?;
            let seen = loop {
                if t0.elapsed() > GIVE_UP {
                    break None;
                }
                if allow {
                    match TcpStream::connect_timeout(&to_b, PROBE_TIMEOUT) {
                        Ok(_) => break Some(t0.elapsed()),
                        Err(e) => {
                            *failures.entry(format!("{:?}", e.kind())).or_insert(0u32) += 1;
                        }
                    }
                } else {
                    let sent = t0.elapsed();
                    if tcp_blocked(to_b, PROBE_TIMEOUT) && tcp_blocked(to_b, CONFIRM_TIMEOUT) {
                        break Some(sent);
                    }
                }
            };
            let s = if allow { &mut to_allow } else { &mut to_deny };
            if seen.is_none_or(|d| d > Duration::from_millis(100)) {
                let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default() - t0.elapsed();
                eprintln!(
                    "slow change #{i} ({}): written at unix {:.3}, enforced after {seen:?}; failed probes: {failures:?}",
                    if allow { "allow" } else { "deny" },
                    wall.as_secs_f64()
                );
            }
            match seen {
                Some(d) => s.ms.push(d.as_secs_f64() * 1e3),
                None => s.timeouts += 1,
            }
        }
        Ok((to_deny, to_allow))
    })??;
    let mut all = Samples::default();
    all.ms.extend(&allow_to_deny.ms);
    all.ms.extend(&deny_to_allow.ms);
    all.timeouts = allow_to_deny.timeouts + deny_to_allow.timeouts;
    eprintln!("policy change: {}", all.row());
    if std::env::var_os("BENCH_AGENT_KEEP_LOG").is_some() {
        let copy = std::env::temp_dir().join(format!("bench_agent-{}.log", if background { "background" } else { "plain" }));
        std::fs::write(&copy, agent.log_text())?;
        eprintln!("agent log: {}", copy.display());
    }
    result.insert("policy change".to_string(), all);
    result.insert("policy change, allow->deny".to_string(), allow_to_deny);
    result.insert("policy change, deny->allow".to_string(), deny_to_allow);

    // 2. New pods.
    let mut new_pod = Samples::default();
    let mut setup_ms = Vec::new();
    let mut rng = 0xbeef_u64;
    let a_ns = b.ns("a");
    let c_ns = b.ns("c");
    for k in 0..args.new_pods {
        let name = format!("n{k}");
        let spec = b.spec(&name, &[("pod", &name), ("role", "new")]);
        b.write_pod(&spec)?;
        // The agent knows the pod (it is in the state it publishes) before its veth exists.
        let key = format!("\"x/{name}\"");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&agent.state_file).unwrap_or_default().contains(&key) {
            if Instant::now() > deadline {
                bail!("the agent did not learn pod x/{name}:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(jitter(&mut rng, Duration::from_millis(1000)));
        let t0 = Instant::now();
        let pod = b.network(spec.clone())?;
        let setup = t0.elapsed();
        setup_ms.push(setup.as_secs_f64() * 1e3);
        let dst = SocketAddr::new(spec.ips[0], 80);
        // Allowed: from x/a. Denied: from x/c. Probed in turn, from threads in each pod.
        let allowed = a_ns.spawn(move || {
            while t0.elapsed() < GIVE_UP {
                if tcp_ok(dst, PROBE_TIMEOUT) {
                    return Some(t0.elapsed());
                }
            }
            None
        })?;
        let done = Arc::new(AtomicBool::new(false));
        let done_flag = done.clone();
        let denied = c_ns.spawn(move || {
            let mut leaks = Vec::new();
            // Until x/a's probe is done, and 300 ms more.
            let mut until: Option<Instant> = None;
            while until.is_none_or(|u| Instant::now() < u) && t0.elapsed() < GIVE_UP {
                let sent = t0.elapsed();
                if tcp_ok(dst, PROBE_TIMEOUT) {
                    leaks.push(sent.as_secs_f64() * 1e3);
                }
                if until.is_none() && done_flag.load(Ordering::Relaxed) {
                    until = Some(Instant::now() + Duration::from_millis(300));
                }
            }
            leaks
        })?;
        let allowed_at = allowed.join().expect("probe thread");
        done.store(true, Ordering::Relaxed);
        let leaks = denied.join().expect("probe thread");
        if !leaks.is_empty() {
            eprintln!(
                "x/{name}: a denied flow passed {} times, at {leaks:.1?} ms after its veth was made (enforced at {allowed_at:?})",
                leaks.len()
            );
        }
        new_pod.leaks += leaks.len();
        match allowed_at {
            Some(d) => new_pod.ms.push(d.as_secs_f64() * 1e3),
            None => new_pod.timeouts += 1,
        }
        // Gone again, before the next one.
        drop(pod);
        std::fs::remove_file(dir.join(format!("pod-x-{name}.yaml")))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(&agent.state_file).unwrap_or_default().contains(&key) {
            if Instant::now() > deadline {
                bail!("the agent did not forget pod x/{name}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    setup_ms.sort_by(f64::total_cmp);
    new_pod.extra.insert("setup_p50_ms".into(), setup_ms.get(setup_ms.len() / 2).copied().unwrap_or(f64::NAN));
    eprintln!("new pod: {}", new_pod.row());
    result.insert("new pod veth -> enforced".to_string(), new_pod);
    if agent.log_text().contains("ERROR") {
        eprintln!("agent log has errors:\n{}", agent.log_text());
    }
    agent.stop();
    Ok(result)
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The agent's memory once ready over the synthetic cluster `w` (`None`: no objects).
fn agent_memory(args: &Args, w: Option<&Workload>) -> Result<(u64, u64)> {
    let node_name = Workload::default().node;
    let node = NodeNet::create(&unique("bam"), &node_name, &["10.250.0.1".parse()?]).map_err(|e| anyhow!("{e}"))?;
    let dir = std::env::temp_dir().join(unique("bam-manifests-"));
    std::fs::create_dir_all(&dir)?;
    if let Some(w) = w {
        write_workload(&dir, w)?;
    }
    let mut agent =
        AgentProcess::start_with_poll(&node.ns, &node_name, &[dir.as_path()], args.poll_interval_ms, &[]).map_err(|e| anyhow!("{e}"))?;
    agent.wait_ready(Duration::from_secs(300)).map_err(|e| anyhow!("{e}"))?;
    // Let it settle: a few polls and an interface resolution after the first sync.
    std::thread::sleep(Duration::from_secs(3));
    let pid = agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    let m = rss_kib(pid)?;
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}

fn memory(args: &Args) -> Result<Value> {
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let (empty_rss, empty_hwm) = agent_memory(args, None)?;
    let w10 = Workload::default();
    let w11 = Workload { pods_per_namespace: 110, ..Workload::default() };
    let (rss10, hwm10) = agent_memory(args, Some(&w10))?;
    let (rss11, hwm11) = agent_memory(args, Some(&w11))?;
    let growth = (rss11 as f64 - rss10 as f64) / ((w11.pod_count() - w10.pod_count()) as f64 / 1000.0);
    Ok(json!({
        "no_objects_rss_mib": mib(empty_rss),
        "no_objects_hwm_mib": mib(empty_hwm),
        "pods_10000_rss_mib": mib(rss10),
        "pods_10000_hwm_mib": mib(hwm10),
        "pods_11000_rss_mib": mib(rss11),
        "pods_11000_hwm_mib": mib(hwm11),
        "growth_per_1000_pods_mib": (growth / 1024.0 * 100.0).round() / 100.0,
        "policies": w10.policy_count(),
        "local_pods": w10.namespaces,
    }))
}

/// The synthetic cluster as a real API server would show it.
fn workload_objects(w: &Workload) -> Vec<Value> {
    use conformance::apiserver::objects;
    let mut v = Vec::with_capacity(w.namespaces * (1 + w.pods_per_namespace + policy_model::workload::POLICIES_PER_NAMESPACE));
    for i in 0..w.namespaces {
        v.push(objects::namespace(&w.namespace(i)));
        for j in 0..w.pods_per_namespace {
            v.push(objects::pod(&w.pod(i, j, None)));
        }
        for np in w.policies(i, json!("http")) {
            v.push(objects::network_policy(&np));
        }
    }
    v
}

/// The agent's memory once ready over the API stand-in serving `w` (`None`: nothing but
/// its Node).
fn agent_memory_api(args: &Args, w: Option<&Workload>) -> Result<(u64, u64, f64)> {
    use conformance::apiserver::{ApiServer, objects};
    let node_name = Workload::default().node;
    let node = NodeNet::create(&unique("bam"), &node_name, &["10.250.0.1".parse()?]).map_err(|e| anyhow!("{e}"))?;
    let api = ApiServer::start_in(&node.ns.handle())?;
    api.apply_json(objects::node(&node_name, &["10.250.0.1".parse()?]));
    if let Some(w) = w {
        api.apply_all(workload_objects(w));
    }
    let dir = std::env::temp_dir().join(unique("bam-kc-"));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let t0 = Instant::now();
    let mut agent = AgentProcess::start_api(&node.ns, &node_name, &kubeconfig, args.poll_interval_ms, &[]).map_err(|e| anyhow!("{e}"))?;
    agent.wait_ready(Duration::from_secs(1200)).map_err(|e| anyhow!("{e}"))?;
    let ready = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let pid = agent.pid().ok_or_else(|| anyhow!("agent not running"))?;
    let m = rss_kib(pid)?;
    if agent.log_text().contains("ERROR") {
        eprintln!("agent log has errors:\n{}", agent.log_text());
    }
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok((m.0, m.1, ready))
}

fn api_main(args: &Args) -> Result<()> {
    let mut out = serde_json::Map::new();
    let mut table: Vec<(String, String)> = Vec::new();
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    if !args.no_memory || args.memory_only {
        eprintln!("== memory (API source)");
        let mut mem = serde_json::Map::new();
        let (rss, hwm, _) = agent_memory_api(args, None)?;
        mem.insert("no_objects_rss_mib".into(), json!(mib(rss)));
        mem.insert("no_objects_hwm_mib".into(), json!(mib(hwm)));
        let mut by_pods = Vec::new();
        for &pods in &args.api_pods {
            let w = Workload { pods_per_namespace: pods / 100, ..Workload::default() };
            let (rss, hwm, ready) = agent_memory_api(args, Some(&w))?;
            eprintln!("{pods} pods: VmRSS {} MiB, VmHWM {} MiB, ready after {ready:.1} s", mib(rss), mib(hwm));
            mem.insert(format!("pods_{pods}_rss_mib"), json!(mib(rss)));
            mem.insert(format!("pods_{pods}_hwm_mib"), json!(mib(hwm)));
            mem.insert(format!("pods_{pods}_ready_s"), json!((ready * 10.0).round() / 10.0));
            by_pods.push((pods, rss));
        }
        if let [(p0, r0), (p1, r1), ..] = by_pods.as_slice() {
            let growth = (*r1 as f64 - *r0 as f64) / ((*p1 as f64 - *p0 as f64) / 1000.0);
            mem.insert(format!("growth_per_1000_pods_mib_{p0}_to_{p1}"), json!((growth / 1024.0 * 100.0).round() / 100.0));
        }
        mem.insert("policies".into(), json!(Workload::default().policy_count()));
        mem.insert("local_pods".into(), json!(Workload::default().namespaces));
        for (k, v) in &mem {
            table.push((format!("memory (api): {k}"), v.to_string()));
        }
        out.insert("memory_api".into(), Value::Object(mem));
    }
    if !args.memory_only {
        eprintln!("== resume after API restarts");
        let s = resume_scenario(args)?;
        table.push((format!("first change after an API restart ({:.0} s outages)", args.outage_secs), s.row()));
        out.insert("resume_after_restart".into(), s.json());
    }
    println!("\n{:<62} figures", "measurement");
    for (k, v) in &table {
        println!("{k:<62} {v}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(out))?).with_context(|| format!("writing {}", path.display()))?;
        println!("\nwritten: {}", path.display());
    }
    Ok(())
}

/// Outages of the API (each ended by a restart with a new version base), then a policy
/// change at once: the time until traffic shows it.
fn resume_scenario(args: &Args) -> Result<Samples> {
    use conformance::apiserver::{ApiServer, objects};
    let w = Workload::default();
    let mut b = BenchNode::new(&w.node)?;
    let api = ApiServer::start_in(&b.node.ns.handle())?;
    api.apply_json(objects::namespace(&policy_model::Namespace::new("x".to_string(), Default::default())));
    api.apply_json(objects::node(&w.node, &["10.250.0.1".parse()?, "fd10:250::1".parse()?]));
    if !args.no_background {
        api.apply_all(workload_objects(&w));
    }
    for name in ["a", "b"] {
        let spec = b.spec(name, &[("pod", name)]);
        let model = Pod::from_k8s(&serde_json::from_value(spec.manifest())?).map_err(|e| anyhow!("{e}"))?;
        api.apply_json(objects::pod(&model));
        let p = b.network(spec)?;
        b.pods.insert(name.to_string(), p);
    }
    api.apply_json(objects::network_policy_json(flip_policy(true)));
    let kubeconfig = b.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut agent = AgentProcess::start_api(&b.node.ns, &w.node, &kubeconfig, args.poll_interval_ms, &[]).map_err(|e| anyhow!("{e}"))?;
    agent.wait_ready(Duration::from_secs(300)).map_err(|e| anyhow!("{e}"))?;
    let to_b = b.addr("b");
    let a_ns = b.ns("a");
    let mut samples = Samples::default();
    let mut allow = true;
    let mut unsettled = 0;
    for i in 0..args.outages {
        api.stop();
        std::thread::sleep(Duration::from_secs_f64(args.outage_secs));
        api.restart(1_000_000)?;
        allow = !allow;
        let t0 = Instant::now();
        api.apply_json(objects::network_policy_json(flip_policy(allow)));
        let seen = a_ns.run(move || {
            loop {
                if t0.elapsed() > GIVE_UP {
                    break None;
                }
                let sent = t0.elapsed();
                if allow {
                    if tcp_ok(to_b, PROBE_TIMEOUT) {
                        break Some(sent);
                    }
                } else if tcp_blocked(to_b, PROBE_TIMEOUT) && tcp_blocked(to_b, CONFIRM_TIMEOUT) && tcp_blocked(to_b, CONFIRM_TIMEOUT) {
                    break Some(sent);
                }
            }
        })?;
        eprintln!("restart #{i}: {seen:?}");
        // Every watcher back (and the change settled) before the next outage.
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.log_text().matches("API reachable again").count() < i + 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        // The flip must hold before the next outage: a probe fooled once (a slow
        // handshake on a loaded machine looks like a drop) would otherwise make the next
        // trial measure nothing, as the state it expects may already be there.
        let holds = a_ns.run(move || {
            (0..3).all(|_| if allow { tcp_ok(to_b, CONFIRM_TIMEOUT) } else { tcp_blocked(to_b, CONFIRM_TIMEOUT) })
        })?;
        if !holds {
            eprintln!("restart #{i}: the change does not hold yet; waiting for it");
            unsettled += 1;
            let _ = until(&a_ns, move || if allow { tcp_ok(to_b, CONFIRM_TIMEOUT) } else { tcp_blocked(to_b, CONFIRM_TIMEOUT) });
        }
        match seen {
            Some(d) => samples.ms.push(d.as_secs_f64() * 1e3),
            None => samples.timeouts += 1,
        }
    }
    let log = agent.log_text();
    samples.extra.insert("error_lines".into(), log.lines().filter(|l| l.contains("ERROR")).count() as f64);
    samples.extra.insert("warn_lines".into(), log.lines().filter(|l| l.contains("WARN")).count() as f64);
    samples.extra.insert("unsettled".into(), unsettled as f64);
    samples.extra.insert("loop_over_1s".into(), log.lines().filter(|l| l.contains("busy for over a second")).count() as f64);
    agent.stop();
    Ok(samples)
}
