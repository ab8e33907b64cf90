//! Upgrades and rollbacks of the agent under real traffic, with no enforcement gap.
//!
//! One emulated node, three dual-stack pods, policies with allows and denies in both
//! directions (TCP and UDP). Probers run throughout and count wrong verdicts (an allowed
//! flow that fails, a denied flow that passes; probes time out at 500 ms, below TCP's
//! first retransmission), while agents replace one another on one pin directory:
//!
//! 1. the previous release (commit `OLD_COMMIT`, built here from a git worktree), then
//!    this build: migration from the legacy pins;
//! 2. this build, then the previous release again (rollback), then this build (legacy
//!    pins beside its own stale generation);
//! 3. this build restarted with other map sizes;
//! 4. a migration killed (SIGKILL) between filling the new maps and swapping the
//!    programs (`POLICY_AGENT_TEST_PAUSE_BEFORE_SWAP`), then a fresh start.
//!
//! Two TCP connections are held open throughout and must still work after each step.
//! Needs root, BPF, git, tar and cargo; the old build goes to a build cache outside the
//! clone (`~/.cache/policy-agent/upgrade-old-<commit>`; see `build_cache`), so that only
//! the first run on a machine builds it (set `POLICY_AGENT_OLD_BIN` to use a prebuilt
//! binary instead).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use conformance::agent_process::{AgentOptions, AgentProcess};
use conformance::cluster::{PodSpec, namespace_manifest, pod_address};
use conformance::netns::{Netns, NetnsHandle, unique};
use conformance::topology::{NodeNet, PodNet, Topology};
use conformance::traffic::{Servers, probe_in, serve};
use policy_agent::datapath::{PAUSE_BEFORE_SWAP_ENV, PAUSE_BETWEEN_SWAPS_ENV};
use policy_agent::datapath::migrate::{self, Generation};
use policy_model::{Family, Protocol};
use serde_json::json;

/// The release before layouts were versioned (maps at the root of the pin directory).
const OLD_COMMIT: &str = "0668bde";
const NODE: &str = "node-1";
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long this build waits after each link it swaps in a migration (a test hook).
const SWAP_PAUSE_MS: u64 = 150;
/// The port of the echo servers that hold connections open.
const HELD_PORT: u16 = 82;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where the previous release is built: a build cache outside the clone (the commit never
/// changes, so a later run, even from a fresh clone, only checks it is up to date):
/// `$POLICY_AGENT_BUILD_CACHE`, else `$XDG_CACHE_HOME/policy-agent` or
/// `~/.cache/policy-agent`, else `target/`.
fn build_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("POLICY_AGENT_BUILD_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("policy-agent"),
        None => repo_root().join("target"),
    }
}

/// The previous release's agent: `OLD_COMMIT`'s sources exported (`git archive`) into the
/// build cache and built there.
fn old_agent() -> PathBuf {
    if let Ok(p) = std::env::var("POLICY_AGENT_OLD_BIN") {
        return PathBuf::from(p);
    }
    let root = repo_root();
    let git = |args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(&root).args(args).output().expect("git");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let wanted = git(&["rev-parse", &format!("{OLD_COMMIT}^{{commit}}")]);
    assert!(wanted.0, "commit {OLD_COMMIT} is not in this repository (a shallow clone?): {}", wanted.1);
    let dir = build_cache().join(format!("upgrade-old-{}", wanted.1));
    let (src, target) = (dir.join("src"), dir.join("target"));
    let marker = dir.join("exported");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.1.as_str()) {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).expect("creating the build cache");
        let archive = Command::new("git").arg("-C").arg(&root).args(["archive", "--format=tar", &wanted.1]).output().expect("git archive");
        assert!(archive.status.success(), "git archive {OLD_COMMIT}: {}", String::from_utf8_lossy(&archive.stderr));
        let mut tar = Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(std::process::Stdio::piped()).spawn().expect("tar");
        tar.stdin.take().expect("stdin").write_all(&archive.stdout).expect("tar input");
        assert!(tar.wait().expect("tar").success(), "unpacking {OLD_COMMIT}");
        std::fs::write(&marker, &wanted.1).expect("writing the marker");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&src).args(["build", "-p", "policy-agent", "--locked"]).env("CARGO_TARGET_DIR", &target);
    // What cargo set for this test run is not for the nested build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("cargo");
    assert!(out.status.success(), "building the agent of {OLD_COMMIT}:\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("the agent of {OLD_COMMIT} built (or checked) in {} in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
    target.join("debug/policy-agent")
}

/// An echo server on `HELD_PORT`: every connection stays open, each byte comes back.
fn serve_echo(ns: &Netns, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    ns.spawn(move || {
        let l = TcpListener::bind(("::", HELD_PORT)).expect("bind echo");
        l.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        let mut b = [0u8; 1];
                        while let Ok(1) = c.read(&mut b) {
                            if c.write_all(&b).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .unwrap()
}

struct Pod {
    spec: PodSpec,
    net: PodNet,
    _servers: Servers,
}

struct Cluster {
    node: NodeNet,
    pods: BTreeMap<&'static str, Pod>,
    dir: tempfile::TempDir,
    stop_echo: Arc<AtomicBool>,
    echo: Vec<JoinHandle<()>>,
}

impl Cluster {
    fn new() -> Cluster {
        let node = NodeNet::create_with(
            &unique("pup"),
            NODE,
            &["10.250.0.1".parse().unwrap(), "fd10:250::1".parse().unwrap()],
            Topology::Routed,
            0,
        )
        .expect("node (root needed)");
        let dir = tempfile::tempdir().unwrap();
        let stop_echo = Arc::new(AtomicBool::new(false));
        let mut c = Cluster { node, pods: BTreeMap::new(), dir, stop_echo, echo: Vec::new() };
        for ns in ["x", "y"] {
            c.write(&format!("ns-{ns}.yaml"), namespace_manifest(ns, &BTreeMap::new()));
        }
        c.write(
            "node.yaml",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}, {"type": "InternalIP", "address": "fd10:250::1"}]}}),
        );
        for (i, key) in ["x/a", "x/b", "y/a"].into_iter().enumerate() {
            let (ns, name) = key.split_once('/').unwrap();
            let ips = vec![pod_address(Family::Ipv4, 0, i), pod_address(Family::Ipv6, 0, i)];
            let net = c.node.add_pod(&unique("pupp"), &format!("pu{i}"), &ips).unwrap();
            let servers = serve(&net.ns, &[80, 81]).unwrap();
            if key != "y/a" {
                c.echo.push(serve_echo(&net.ns, c.stop_echo.clone()));
            }
            let spec = PodSpec {
                namespace: ns.into(),
                name: name.into(),
                labels: [("pod".to_string(), name.to_string())].into(),
                node: NODE.into(),
                ips,
            };
            c.write(&format!("pod-{ns}-{name}.yaml"), spec.manifest());
            c.pods.insert(key, Pod { spec, net, _servers: servers });
        }
        let policy = |name: &str, ns: &str, spec: serde_json::Value| json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec});
        let ports = json!([{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": HELD_PORT}, {"protocol": "UDP", "port": 81}]);
        // x/b admits pods labelled a, from any namespace, on TCP 80 and 82 and UDP 81.
        c.write(
            "np-b.yaml",
            policy(
                "b-from-a",
                "x",
                json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}], "ports": ports}]}),
            ),
        );
        // x/a may reach x/b on those ports and y/a on TCP 80, nothing else (its replies
        // pass by connection tracking).
        c.write(
            "np-a.yaml",
            policy(
                "a-egress",
                "x",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": ports},
                    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}],
                     "ports": [{"protocol": "TCP", "port": 80}]}]}),
            ),
        );
        // y/a admits only x/a, on TCP 80.
        c.write(
            "np-ya.yaml",
            policy(
                "a-from-x-a",
                "y",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}],
                             "ports": [{"protocol": "TCP", "port": 80}]}]}),
            ),
        );
        c
    }

    fn write(&self, name: &str, v: serde_json::Value) {
        std::fs::write(self.dir.path().join(name), serde_yaml_ng::to_string(&v).unwrap()).unwrap();
    }

    fn ns(&self, pod: &str) -> NetnsHandle {
        self.pods[pod].net.ns.handle()
    }

    fn addr(&self, pod: &str, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.pods[pod].spec.ip(family).unwrap(), port)
    }

    /// The flows probed, with the verdict the policies give them.
    fn flows(&self) -> Vec<Flow> {
        let f = |from: &'static str, to: &'static str, protocol: Protocol, port: u16, family: Family, allowed: bool| Flow {
            name: format!("{from} -> {to} {protocol}/{port} {}", if family == Family::Ipv4 { "v4" } else { "v6" }),
            from: if from == "node" { self.node.ns.handle() } else { self.ns(from) },
            to: self.addr(to, family, port),
            protocol,
            allowed,
        };
        use Family::{Ipv4, Ipv6};
        use Protocol::{Tcp, Udp};
        vec![
            f("x/a", "x/b", Tcp, 80, Ipv4, true),
            f("x/a", "x/b", Udp, 81, Ipv4, true),
            f("x/a", "x/b", Tcp, 80, Ipv6, true),
            f("x/a", "y/a", Tcp, 80, Ipv4, true),
            f("x/a", "y/a", Udp, 81, Ipv4, false),
            f("x/a", "x/b", Tcp, 81, Ipv4, false),
            f("y/a", "x/b", Tcp, 80, Ipv4, true),
            f("y/a", "x/b", Tcp, 81, Ipv6, false),
            f("x/b", "x/a", Tcp, 80, Ipv4, true),
            f("x/b", "x/a", Udp, 81, Ipv6, true),
            f("x/b", "y/a", Tcp, 80, Ipv4, false),
            f("x/b", "y/a", Udp, 81, Ipv4, false),
            // From the node (always admitted) to a pod whose egress is isolated: only
            // connection tracking lets the replies out, so a hook that does not know the
            // flow drops them.
            f("node", "x/a", Tcp, 80, Ipv4, true),
            f("node", "x/a", Udp, 81, Ipv6, true),
        ]
    }

    fn start(&self, binary: Option<&Path>, pin_dir: &Path, sizes: (u32, u32), env: &[(&str, &str)]) -> AgentProcess {
        self.start_extra(binary, pin_dir, sizes, env, &[])
    }

    /// A GET in the node's namespace (the agent's metrics server).
    fn http(&self, addr: &'static str, path: &'static str) -> String {
        self.node
            .ns
            .run(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
            .unwrap()
    }

    fn start_extra(&self, binary: Option<&Path>, pin_dir: &Path, sizes: (u32, u32), env: &[(&str, &str)], extra: &[&str]) -> AgentProcess {
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if binary.is_none() {
            // This build swaps links slowly: flows then cross hooks of both builds, which
            // shared (or read-through) connection tracking must cover.
            env.push((PAUSE_BETWEEN_SWAPS_ENV.to_string(), SWAP_PAUSE_MS.to_string()));
        }
        let opts = AgentOptions { binary: binary.map(Path::to_path_buf), pin_dir: Some(pin_dir.to_path_buf()), sizes: Some(sizes), env };
        AgentProcess::start_with(&self.node.ns, NODE, &[self.dir.path()], Some(20), extra, opts).expect("agent")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_echo.store(true, Ordering::Relaxed);
        for h in self.echo.drain(..) {
            let _ = h.join();
        }
    }
}

#[derive(Clone)]
struct Flow {
    name: String,
    from: NetnsHandle,
    to: SocketAddr,
    protocol: Protocol,
    allowed: bool,
}

/// Per phase: probes, wrong verdicts (with what and when).
type PhaseResult = (usize, Vec<String>);

/// Probes every flow continuously on its own thread; counts wrong verdicts per phase.
struct Probers {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    phase_started: Arc<Mutex<Instant>>,
    results: Arc<Mutex<Vec<PhaseResult>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Probers {
    fn start(flows: Vec<Flow>, phases: usize) -> Probers {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let phase_started = Arc::new(Mutex::new(Instant::now()));
        let results = Arc::new(Mutex::new(vec![(0, Vec::new()); phases]));
        let threads = flows
            .into_iter()
            .map(|flow| {
                let (stop, phase, phase_started, results) = (stop.clone(), phase.clone(), phase_started.clone(), results.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let p = phase.load(Ordering::Relaxed);
                        // The namespaces go when the test ends (or fails).
                        let Ok(got) = probe_in(&flow.from, flow.protocol, flow.to, PROBE_TIMEOUT) else { break };
                        let at = phase_started.lock().unwrap().elapsed();
                        let mut r = results.lock().unwrap();
                        // A probe that straddles a phase change counts in the phase it began in.
                        r[p].0 += 1;
                        if got != flow.allowed {
                            r[p].1.push(format!("{}: {} at +{:.2} s", flow.name, if got { "passed" } else { "blocked" }, at.as_secs_f64()));
                        }
                        drop(r);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Probers { stop, phase, phase_started, results, threads }
    }

    fn next_phase(&self) {
        *self.phase_started.lock().unwrap() = Instant::now();
        self.phase.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(mut self) -> Vec<PhaseResult> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.results.lock().unwrap().clone()
    }
}

/// Probes every flow until all show their verdict (the first agent's first sync).
fn converge(flows: &[Flow], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let wrong: Vec<String> = flows
            .iter()
            .filter(|f| probe_in(&f.from, f.protocol, f.to, PROBE_TIMEOUT).unwrap() != f.allowed)
            .map(|f| f.name.clone())
            .collect();
        if wrong.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: wrong verdicts: {wrong:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Held {
    name: &'static str,
    stream: TcpStream,
}

impl Held {
    fn open(name: &'static str, from: NetnsHandle, to: SocketAddr) -> Held {
        let stream = from.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2))).unwrap().expect("held connection");
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut h = Held { name, stream };
        assert!(h.works(), "{name}: a fresh connection works");
        h
    }

    /// One byte out and back.
    fn works(&mut self) -> bool {
        let mut b = [0u8; 1];
        self.stream.write_all(b"p").is_ok() && matches!(self.stream.read(&mut b), Ok(1)) && b[0] == b'p'
    }
}

fn generations(pin_dir: &Path) -> Vec<Generation> {
    migrate::scan(pin_dir).unwrap()
}

fn describe(g: &[Generation]) -> String {
    g.iter()
        .map(|g| if g.legacy { "legacy PA_*".to_string() } else { g.path.file_name().unwrap().to_string_lossy().into_owned() })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Exactly one generation of maps, ours, in a directory; returns its number.
fn one_generation(pin_dir: &Path, what: &str) -> Generation {
    let g = generations(pin_dir);
    assert!(
        g.len() == 1 && !g[0].legacy && g[0].layout == Some(policy_ebpf::LAYOUT_VERSION),
        "{what}: one generation of ours, found: {}",
        describe(&g)
    );
    g[0].clone()
}

/// Removes the shared pin directory at the end (the links detach with it).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The log without its colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut in_escape = false;
    for ch in log.chars() {
        match (in_escape, ch) {
            (false, '\x1b') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

fn wait_log(agent: &AgentProcess, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !agent.log_text().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upgrades_and_rollbacks_under_traffic() {
    let started = Instant::now();
    let old = old_agent();
    let build_time = started.elapsed();
    let c = Cluster::new();
    let pin_dir = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", unique("pa-upgrade-"))));
    let pins = pin_dir.0.as_path();
    let (peers, connections) = (65536, 16384);
    let (other_peers, other_connections) = (70000, 20000);
    let sizes = (peers, connections);
    let flows = c.flows();
    let ready = Duration::from_secs(20);
    let dwell = Duration::from_millis(1500);

    let phases = [
        "old agent running",
        "old -> new (from legacy pins)",
        "new -> old (rollback)",
        "old -> new (legacy + stale own generation)",
        "new, other --max-peer-entries",
        "new, other --max-connections",
        "new, failed migration (maps too small)",
        "new, migration killed before the swap",
        "new, after the killed migration",
    ];

    let mut agent = c.start(Some(&old), pins, sizes, &[]);
    agent.wait_ready(ready).unwrap();
    converge(&flows, "the old agent");
    assert!(generations(pins).iter().any(|g| g.legacy), "the old agent pins at the root");
    let mut held = vec![
        Held::open("x/a -> x/b:82", c.ns("x/a"), c.addr("x/b", Family::Ipv4, HELD_PORT)),
        Held::open("x/b -> x/a:82", c.ns("x/b"), c.addr("x/a", Family::Ipv6, HELD_PORT)),
    ];
    let probers = Probers::start(flows.clone(), phases.len());
    std::thread::sleep(dwell);
    let mut survived: Vec<(usize, &'static str, bool)> = Vec::new();
    let mut check_held = |phase: usize, held: &mut Vec<Held>| {
        for h in held.iter_mut() {
            let ok = h.works();
            survived.push((phase, h.name, ok));
        }
    };

    // 1. Upgrade: the old agent goes, the new one migrates from the legacy pins.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(None, pins, sizes, &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let first = one_generation(pins, "after the upgrade");
    assert!(agent.log_text().contains("migrated"), "{}", agent.log_text());
    check_held(1, &mut held);

    // 2. Rollback: the old agent makes fresh legacy maps; the new generation stays.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(Some(&old), pins, sizes, &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let g = generations(pins);
    assert!(
        g.len() == 2 && g[0].legacy && g[1] == first,
        "after the rollback: legacy pins and the stale generation, found: {}",
        describe(&g)
    );
    check_held(2, &mut held);

    // 3. Upgrade again: legacy pins beside a stale generation of ours.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(None, pins, sizes, &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let second = one_generation(pins, "after the second upgrade");
    assert!(second.number > first.number, "a fresh generation: {} after {}", second.number, first.number);
    check_held(3, &mut held);

    // 4. Other table sizes (--max-peer-entries): connection tracking is shared.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(None, pins, (other_peers, connections), &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let third = one_generation(pins, "after the table size change");
    assert!(third.sizes != second.sizes && third.number > second.number, "new sizes, new generation: {third:?} after {second:?}");
    assert!(plain(&agent.log_text()).contains("connection_tracking_shared=true"), "{}", agent.log_text());
    check_held(4, &mut held);

    // 5. Another connection-tracking size (--max-connections): its entries are copied.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(None, pins, (other_peers, other_connections), &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let fourth = one_generation(pins, "after the connection-tracking size change");
    assert!(fourth.sizes != third.sizes && fourth.number > third.number, "new sizes, new generation: {fourth:?} after {third:?}");
    let text = plain(&agent.log_text());
    assert!(text.contains("connection_tracking_shared=false") && text.contains("connection_tracking_read_through=true"), "{text}");
    check_held(5, &mut held);

    // 6. A migration that fails (tables too big for the new maps): the previous datapath
    // stays in force, unchanged; the agent says why and is not ready.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start_extra(None, pins, (8, other_connections), &[], &["--metrics-addr", "127.0.0.1:9467"]);
    agent.wait_ready(ready).unwrap();
    wait_log(&agent, "migration failed", ready);
    std::thread::sleep(dwell);
    let g = generations(pins);
    assert!(g.len() == 2 && g[0] == fourth, "the previous generation stays beside the failed one, found: {}", describe(&g));
    let readyz = c.http("127.0.0.1:9467", "/readyz");
    assert!(readyz.starts_with("HTTP/1.0 503") || readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    let metrics = c.http("127.0.0.1:9467", "/metrics");
    assert!(
        metrics.contains("policy_agent_migration_pending 1") && !metrics.contains("policy_agent_migration_failures_total 0"),
        "{metrics}"
    );
    check_held(6, &mut held);

    // 7. A migration killed between filling the new maps and swapping the programs.
    probers.next_phase();
    agent.stop();
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = c.start(None, pins, (peers, other_connections), &[(PAUSE_BEFORE_SWAP_ENV, "30")]);
    wait_log(&agent, "pausing before the swap", ready);
    let g = generations(pins);
    assert_eq!(g.len(), 3, "mid-migration: the one in force, the failed one and the new one, found: {}", describe(&g));
    agent.kill();
    std::thread::sleep(dwell);
    let g = generations(pins);
    assert_eq!(g.len(), 3, "after the kill: every generation stays, found: {}", describe(&g));
    check_held(7, &mut held);

    // 8. The next start migrates again, into a fresh generation, and removes the others.
    probers.next_phase();
    let mut agent = c.start(None, pins, (peers, other_connections), &[]);
    agent.wait_ready(ready).unwrap();
    std::thread::sleep(dwell);
    let last = one_generation(pins, "after the resumed migration");
    assert!(last.number > g.iter().map(|g| g.number).max().unwrap(), "a fresh generation: {last:?} after {}", describe(&g));
    check_held(8, &mut held);
    let log = agent.log_text();
    agent.stop();

    let results = probers.finish();
    let total = started.elapsed();
    let mut report = format!("upgrade test: old build {:.1} s, total {:.1} s\n", build_time.as_secs_f64(), total.as_secs_f64());
    for (i, name) in phases.iter().enumerate() {
        let (n, wrong) = &results[i];
        let conns: Vec<String> =
            survived.iter().filter(|(p, _, _)| *p == i).map(|(_, h, ok)| format!("{h} {}", if *ok { "kept" } else { "BROKEN" })).collect();
        report +=
            &format!("  {name}: {n} probes, {} wrong; {}\n", wrong.len(), if conns.is_empty() { "-".into() } else { conns.join(", ") });
        for w in wrong.iter().take(10) {
            report += &format!("      {w}\n");
        }
    }
    eprintln!("{report}");
    for (i, name) in phases.iter().enumerate() {
        assert!(results[i].1.is_empty(), "{name}: wrong verdicts:\n{report}");
    }
    assert!(survived.iter().all(|(_, _, ok)| *ok), "held connections broke:\n{report}");
    assert!(!log.contains("ERROR"), "{log}");
}
