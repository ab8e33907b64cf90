//! Datapath benchmark (not a test). Between two pods on an emulated node (routed through
//! the node's namespace), for each enforcement mechanism — none, policy-agent, the same
//! policy as an iptables ruleset in kube-router's style, and as an nftables ruleset with
//! sets — holding 10, 1,000 and 10,000 rules on the server's ingress and on the client's
//! egress (the matching rule last; see `conformance::bench_rules`):
//! - new TCP connections per second (connect, 1-byte exchange, close), parallel clients;
//! - UDP request/response per second, parallel clients;
//! - bulk TCP throughput, one stream;
//! - connect latency, p50 and p99, one client connecting in sequence.
//!
//! One mechanism is on the path at a time; each is checked to enforce (a client, a port
//! and a peer outside the policy are blocked) before it is measured. Every configuration
//! is measured once per round, interleaved; figures are medians over rounds. Prints
//! tables and writes JSON.
//!
//! Run as root: `bash scripts/bench.sh` (or `cargo run --release -p conformance --bin bench -- --help`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use conformance::bench_rules::{BULK_PORT, BenchPolicy, NAMESPACE, NFT_TABLE, RR_PORT};
use conformance::netns::{NetnsHandle, unique};
use conformance::rig::{NODE, Rig};
use conformance::traffic::{serve_load, serve_sink};
use conformance::programs::{PROGRAMS, RunStats, enable_stats};
use policy_agent::datapath::{FlowConfig, MapSizes};
use policy_model::{Change, ObjectKey, Pod, Protocol};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Seconds for each of TCP connections/s and UDP request/response/s.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Seconds of bulk TCP transfer.
    #[arg(long, default_value_t = 2.0)]
    bulk_seconds: f64,
    /// Seconds of sequential connects for the latency percentiles.
    #[arg(long, default_value_t = 1.0)]
    latency_seconds: f64,
    /// Seconds of the TCP connection loop run before each configuration's measurements
    /// and not counted. The first seconds after a configuration is put on the path
    /// (namespaces made, 20,000 rules loaded, another configuration taken off) run with
    /// idle CPU time that the rest do not have, whichever configuration it is (seen in
    /// `perf` as 7–30 % idle in the first 1–3 s, then 1 %), so without it a short
    /// measurement reads that transient as the configuration's cost. 0: none.
    #[arg(long, default_value_t = 3.0)]
    warmup_seconds: f64,
    /// Rounds: every configuration is measured once per round, in turn; figures are
    /// medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client threads for connections/s and request/response/s.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rule counts (per side: server ingress and client egress).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    rules: Vec<usize>,
    /// The iptables flavour: `iptables` (Debian's default, the nf_tables backend) or
    /// `iptables-legacy` (x_tables; once used, its empty filter table stays hooked in the
    /// node's namespace for the rest of the run).
    #[arg(long, default_value = "iptables")]
    iptables: String,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With policy-agent, also two ClusterNetworkPolicies on the path (see
    /// `cluster_policies`): the tiers compile into the same tables, and this shows it.
    /// `--cluster-policies` alone: with them; `--cluster-policies off,on`: policy-agent
    /// both without and with them, side by side in each round (`+cnp` in the names).
    #[arg(long, value_delimiter = ',', num_args = 0..=1, default_missing_value = "on", default_value = "off", value_parser = ["off", "on"])]
    cluster_policies: Vec<String>,
    /// The mechanisms to measure (of none, floor, policy-agent, iptables, nftables).
    /// `none` is always measured: every ratio is against it. `floor` attaches a program
    /// that passes every packet where policy-agent attaches its pod programs (tcx ingress
    /// and egress of each pod's host veth): what policy-agent's own work adds is the
    /// difference between the two.
    #[arg(long, value_delimiter = ',', default_value = "none,policy-agent,iptables,nftables")]
    mechanisms: Vec<String>,
    /// policy-agent once per flow-event setting (none, denied, sampled:N, all), so the
    /// cost of the events reads side by side. The default is the agent's default.
    #[arg(long, value_delimiter = ',', default_value = "denied")]
    flow_events: Vec<String>,
    /// Also the cost of each of the agent's programs per run, from the kernel's BPF
    /// statistics, for each kind of traffic. The statistics cost a little per run
    /// themselves, so every configuration pays them in such a run.
    #[arg(long)]
    program_stats: bool,
}

/// An Admin policy whose first rule passes the client to the NetworkPolicy tier (the
/// rules before it deny addresses the bench never uses), and a Baseline default-deny
/// below the NetworkPolicies: every verdict `check` expects stays the same.
fn cluster_policies() -> Vec<Change> {
    let cnp = |name: &str, spec: Value| {
        let v = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec});
        Change::UpsertClusterPolicy(Box::new(serde_json::from_value(v).expect("a well-formed ClusterNetworkPolicy")))
    };
    vec![
        cnp(
            "bench-admin",
            json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                "ingress": [
                    {"name": "no-test-net", "action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": "none"}}}}]},
                    {"name": "client-to-owners", "action": "Pass", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "client"}}}}]}],
                "egress": [
                    {"name": "no-metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]},
                    {"name": "server-to-owners", "action": "Pass", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "server"}}}}]}]}),
        ),
        cnp(
            "bench-baseline",
            json!({"tier": "Baseline", "priority": 10, "subject": {"namespaces": {}},
                "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}]}),
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mechanism {
    None,
    /// policy-agent with the flow events of `Bench::flow_events[events]`, with the
    /// bench's ClusterNetworkPolicies or not.
    Agent { events: usize, tiers: bool },
    Iptables,
    Nftables,
    /// A program that passes every packet, on the same hooks as policy-agent's pod
    /// programs: the floor of any enforcement by tc programs.
    Floor,
}

impl Mechanism {
    /// The configurations `args` asks for, in the order of a round.
    fn chosen(args: &Args) -> Result<Vec<Mechanism>> {
        let mut out = vec![Mechanism::None];
        for m in &args.mechanisms {
            match m.as_str() {
                "none" => {}
                "policy-agent" => {
                    for tiers in [false, true].into_iter().filter(|t| args.cluster_policies.contains(&(if *t { "on" } else { "off" }).to_string())) {
                        out.extend((0..args.flow_events.len()).map(|events| Mechanism::Agent { events, tiers }));
                    }
                }
                "iptables" => out.push(Mechanism::Iptables),
                "nftables" => out.push(Mechanism::Nftables),
                "floor" => out.push(Mechanism::Floor),
                other => bail!("--mechanisms: {other:?} is none of none, floor, policy-agent, iptables, nftables"),
            }
        }
        out.dedup();
        Ok(out)
    }
}

/// One configuration's figures in one round (or their medians).
#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    tcp_connections_per_s: f64,
    udp_rr_per_s: f64,
    bulk_gbit_per_s: f64,
    connect_p50_us: f64,
    connect_p99_us: f64,
    /// With `--program-stats`: per program and traffic, (runs per operation, ns per run).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    programs: BTreeMap<String, (f64, f64)>,
}

/// (JSON key, table title, how to read it from figures).
type Metric = (&'static str, &'static str, fn(&Figures) -> f64);
const METRICS: [Metric; 5] = [
    ("tcp_connections_per_s", "TCP connections/s (connect, 1-byte exchange, close)", |f| f.tcp_connections_per_s),
    ("udp_rr_per_s", "UDP request/response/s", |f| f.udp_rr_per_s),
    ("bulk_gbit_per_s", "bulk TCP, Gbit/s (one stream)", |f| f.bulk_gbit_per_s),
    ("connect_p50_us", "connect latency p50, µs (lower is better)", |f| f.connect_p50_us),
    ("connect_p99_us", "connect latency p99, µs (lower is better)", |f| f.connect_p99_us),
];

const CLIENT: &str = "x/client";
const SERVER: &str = "x/server";
const INTRUDER: &str = "x/intruder";

fn pod(key: &str, label: &str, v4: &str) -> Pod {
    Pod {
        key: ObjectKey::parse(key).unwrap(),
        labels: [("pod".to_string(), label.to_string())].into(),
        ips: vec![v4.parse().unwrap()],
        node: Some(NODE.into()),
        host_network: false,
        named_ports: vec![],
    }
}

/// Runs `op` on `clients` threads in `ns` for `secs`; successful operations per second.
fn rate(ns: &NetnsHandle, clients: usize, secs: f64, (what, op): (&str, fn(SocketAddr) -> bool), dst: SocketAddr) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..clients {
        let (stop, count, failures) = (stop.clone(), count.clone(), failures.clone());
        hs.push(ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if op(dst) {
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?);
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let f = failures.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("    ({f} failed {what} operations: a 1 s timeout or an error)");
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Connect, 1-byte exchange, close.
fn tcp_connect(dst: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(1)) else { return false };
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && matches!(s.read(&mut b), Ok(1))
}

thread_local! {
    static UDP: std::net::UdpSocket = {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        s
    };
}

fn udp_rr(dst: SocketAddr) -> bool {
    UDP.with(|s| {
        let mut b = [0u8; 8];
        s.send_to(b"x", dst).is_ok() && matches!(s.recv_from(&mut b), Ok((1, _)))
    })
}

/// One TCP stream to the sink for `secs`: Gbit/s written.
fn bulk(ns: &NetnsHandle, dst: SocketAddr, secs: f64) -> Result<f64> {
    ns.run(move || -> Result<f64> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1)).context("bulk connect")?;
        let mut greeting = [0u8; 1];
        s.read_exact(&mut greeting).context("bulk greeting")?;
        let buf = vec![0x5au8; 256 * 1024];
        let (start, mut bytes) = (Instant::now(), 0u64);
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&buf).context("bulk write")?;
            bytes += buf.len() as u64;
        }
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    })?
}

/// One client connecting in sequence for `secs` (each connection also does the 1-byte
/// exchange and closes, as in the rate loop): (p50, p99) of the connect() time, µs, and
/// the number of connections.
fn connect_latency(ns: &NetnsHandle, dst: SocketAddr, secs: f64) -> Result<(f64, f64, usize)> {
    let mut samples = ns.run(move || {
        let (start, mut samples) = (Instant::now(), Vec::new());
        while start.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(1)) else { continue };
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            let mut b = [0u8; 1];
            let _ = s.write_all(b"x").and_then(|_| s.read(&mut b));
        }
        samples
    })?;
    ensure!(samples.len() >= 100, "only {} connects succeeded in the latency loop", samples.len());
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Ok((pct(0.50), pct(0.99), samples.len()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

struct Bench {
    rig: Rig,
    args: Args,
    dir: PathBuf,
    client: NetnsHandle,
    rr: SocketAddr,
    bulk: SocketAddr,
    policies: BTreeMap<usize, BenchPolicy>,
    /// The configurations of a round, in order.
    mechanisms: Vec<Mechanism>,
    /// `--flow-events`, parsed: `Mechanism::Agent { events: i, .. }` runs with the i-th.
    flow_events: Vec<(String, FlowConfig)>,
    /// While `Mechanism::Floor` is on the path: its programs (dropping them detaches them)
    /// and the directory of their (unused) maps' pins.
    floor: Option<(aya::Ebpf, PathBuf)>,
    /// Held while BPF statistics are wanted (`--program-stats`).
    _stats: Option<std::os::fd::OwnedFd>,
}

impl Bench {
    fn name(&self, m: Mechanism) -> String {
        match m {
            Mechanism::None => "none".into(),
            Mechanism::Agent { events, tiers } => {
                let mut name = if self.flow_events.len() == 1 { "policy-agent".to_string() } else { format!("agent/{}", self.flow_events[events].0) };
                if tiers && self.args.cluster_policies.len() > 1 {
                    name.push_str("+cnp");
                }
                name
            }
            Mechanism::Iptables => "iptables".into(),
            Mechanism::Nftables => "nftables".into(),
            Mechanism::Floor => "floor".into(),
        }
    }

    fn node_exec(&self, program: &str, args: &[&str]) -> Result<String> {
        Ok(self.rig.node.ns.exec(program, args)?)
    }

    fn rules_file(&self, n: usize, kind: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{n}.{kind}"));
        if !path.exists() {
            let p = &self.policies[&n];
            std::fs::write(&path, if kind == "nft" { p.nft_ruleset() } else { p.iptables_restore() })?;
        }
        Ok(path)
    }

    /// Puts `mechanism` with `n` rules on the path; returns how long loading took.
    fn activate(&mut self, mechanism: Mechanism, n: usize) -> Result<Duration> {
        let t = Instant::now();
        match mechanism {
            Mechanism::None => {}
            Mechanism::Agent { events, tiers } => {
                self.rig.set_flow_events(self.flow_events[events].1);
                self.rig.start_agent()?;
                let mut changes = self.policies[&n].network_policies();
                if tiers {
                    changes.extend(cluster_policies());
                }
                self.rig.apply(changes)?;
            }
            Mechanism::Iptables => {
                let file = self.rules_file(n, "ipt")?;
                self.node_exec(&format!("{}-restore", self.args.iptables), &[file.to_str().unwrap()])?;
            }
            Mechanism::Nftables => {
                let file = self.rules_file(n, "nft")?;
                self.node_exec("nft", &["-f", file.to_str().unwrap()])?;
            }
            Mechanism::Floor => self.floor = Some(attach_floor(&self.rig)?),
        }
        Ok(t.elapsed())
    }

    /// Takes `mechanism` off the path, and checks that nothing is left on it.
    fn deactivate(&mut self, mechanism: Mechanism) -> Result<()> {
        match mechanism {
            Mechanism::None => {}
            Mechanism::Agent { tiers, .. } => {
                let mut delete: Vec<Change> = ["bench-server", "bench-client"].map(|n| Change::DeletePolicy(ObjectKey::new(NAMESPACE, n))).into();
                if tiers {
                    delete.extend(["bench-admin", "bench-baseline"].map(|n| Change::DeleteClusterPolicy(n.to_string())));
                }
                self.rig.apply(delete)?;
                self.rig.detach();
                self.rig.compact_history();
            }
            Mechanism::Iptables => {
                // Flushes the filter table and deletes its chains; the nf_tables backend's
                // tables themselves go with the flush below.
                let empty = self.dir.join("empty.ipt");
                std::fs::write(&empty, "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")?;
                self.node_exec(&format!("{}-restore", self.args.iptables), &[empty.to_str().unwrap()])?;
                self.node_exec("nft", &["flush", "ruleset"])?;
            }
            Mechanism::Nftables => {
                self.node_exec("nft", &["delete", "table", "ip", NFT_TABLE])?;
            }
            Mechanism::Floor => {
                if let Some((ebpf, pins)) = self.floor.take() {
                    drop(ebpf);
                    std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
                }
                // Closing the last descriptors detached and unloads it (the kernel frees it
                // after a grace period).
                let loaded = || {
                    aya::programs::loaded_programs()
                        .filter_map(Result::ok)
                        .any(|p| p.name_as_str() == Some(policy_ebpf::program_names::PASS_ALL))
                };
                let t = Instant::now();
                while loaded() && t.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                ensure!(!loaded(), "the floor's program is still loaded after it was detached");
            }
        }
        let nft = self.node_exec("nft", &["list", "ruleset"])?;
        ensure!(nft.trim().is_empty(), "nftables rules left in the node's namespace after {}:\n{nft}", self.name(mechanism));
        let ipt = self.node_exec(&format!("{}-save", self.args.iptables), &[])?;
        ensure!(!ipt.lines().any(|l| l.starts_with("-A ")), "iptables rules left after {}:\n{ipt}", self.name(mechanism));
        ensure!(!self.rig.pin_dir.exists(), "agent pins left after {}", self.name(mechanism));
        Ok(())
    }

    /// Fails unless the path allows exactly what the policy allows (with no enforcement:
    /// everything, so that the blocked probes are known to reach working servers).
    fn check(&self, mechanism: Mechanism, n: usize) -> Result<()> {
        let rig = &self.rig;
        let server = rig.ip(SERVER, true);
        let intruder = rig.ip(INTRUDER, true);
        let enforced = !matches!(mechanism, Mechanism::None | Mechanism::Floor);
        let probes: [(&str, &str, IpAddr, Protocol, u16, bool); 7] = [
            ("client → server TCP", CLIENT, server, Protocol::Tcp, RR_PORT, true),
            ("client → server UDP", CLIENT, server, Protocol::Udp, RR_PORT, true),
            ("client → server TCP (bulk)", CLIENT, server, Protocol::Tcp, BULK_PORT, true),
            ("client → server, a port outside the policy", CLIENT, server, Protocol::Tcp, 80, !enforced),
            ("another pod → server TCP", INTRUDER, server, Protocol::Tcp, RR_PORT, !enforced),
            ("another pod → server UDP", INTRUDER, server, Protocol::Udp, RR_PORT, !enforced),
            ("client → another pod (egress)", CLIENT, intruder, Protocol::Tcp, 80, !enforced),
        ];
        for (what, from, dst, protocol, port, expected) in probes {
            let got = rig.probe_addr(from, dst, protocol, port);
            if got != expected {
                bail!(
                    "{} with {n} rules does not enforce the policy: {what} (port {port}) is {}",
                    self.name(mechanism),
                    if got { "allowed, expected blocked" } else { "blocked, expected allowed" }
                );
            }
        }
        Ok(())
    }

    fn measure(&self, mechanism: Mechanism) -> Result<Figures> {
        let a = &self.args;
        // Per-program costs: only where there are programs, and only when asked for.
        let stats = self._stats.is_some() && matches!(mechanism, Mechanism::Agent { .. } | Mechanism::Floor);
        let mut programs = BTreeMap::new();
        let mut cost = |traffic: &str, before: Option<RunStats>, ops: f64| {
            let Some(before) = before else { return };
            for (name, (runs, ns)) in RunStats::snapshot().since(&before) {
                programs.insert(format!("{name} {traffic}"), (runs as f64 / ops.max(1.0), ns));
            }
        };
        let snap = || stats.then(RunStats::snapshot);
        if a.warmup_seconds > 0.0 {
            rate(&self.client, a.clients, a.warmup_seconds, ("TCP connect (warm-up)", tcp_connect), self.rr)?;
        }
        let before = snap();
        let tcp_connections_per_s = rate(&self.client, a.clients, a.seconds, ("TCP connect", tcp_connect), self.rr)?;
        cost("tcp", before, tcp_connections_per_s * a.seconds);
        let before = snap();
        let udp_rr_per_s = rate(&self.client, a.clients, a.seconds, ("UDP request/response", udp_rr), self.rr)?;
        cost("udp", before, udp_rr_per_s * a.seconds);
        let before = snap();
        let bulk_gbit_per_s = bulk(&self.client, self.bulk, a.bulk_seconds)?;
        // Per 64 KiB written: the size of a full segment with offloads.
        cost("bulk", before, bulk_gbit_per_s * 1e9 / 8.0 * a.bulk_seconds / 65536.0);
        let before = snap();
        let (connect_p50_us, connect_p99_us, connects) = connect_latency(&self.client, self.rr, a.latency_seconds)?;
        cost("connect", before, connects as f64);
        Ok(Figures { tcp_connections_per_s, udp_rr_per_s, bulk_gbit_per_s, connect_p50_us, connect_p99_us, programs })
    }

    fn run_one(&mut self, round: usize, mechanism: Mechanism, n: usize) -> Result<Figures> {
        let load = self.activate(mechanism, n)?;
        self.check(mechanism, n)?;
        let f = self.measure(mechanism)?;
        eprintln!(
            "round {}: {:<12} {:>6} rules (loaded in {:>5.2} s): {:>8.0} conn/s {:>8.0} UDP rr/s {:>6.2} Gbit/s connect p50 {:>5.0} µs p99 {:>6.0} µs",
            round + 1,
            self.name(mechanism),
            n.to_string(),
            load.as_secs_f64(),
            f.tcp_connections_per_s,
            f.udp_rr_per_s,
            f.bulk_gbit_per_s,
            f.connect_p50_us,
            f.connect_p99_us
        );
        self.deactivate(mechanism)?;
        Ok(f)
    }
}

/// Loads the agent's kernel object with its maps pinned apart, and attaches `pass_all`
/// (tcx, ingress and egress) to every pod's host veth, in the node's namespace.
fn attach_floor(rig: &Rig) -> Result<(aya::Ebpf, PathBuf)> {
    use aya::programs::tc::TcAttachOptions;
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
    let pins = PathBuf::from(format!("/sys/fs/bpf/pa-bench-floor-{}", std::process::id()));
    std::fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
    let interfaces = rig.pod_interfaces();
    let dir = pins.clone();
    let ebpf = rig.node.ns.run(move || -> Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&dir).load(policy_agent::datapath::program_bytes())?;
        let name = policy_ebpf::program_names::PASS_ALL;
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("pass_all missing")?.try_into()?;
        prog.load()?;
        for interface in &interfaces {
            for point in [TcAttachType::Ingress, TcAttachType::Egress] {
                prog.attach_with_options(interface, point, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .with_context(|| format!("attaching {name} to {interface}"))?;
            }
        }
        Ok(ebpf)
    })??;
    Ok((ebpf, pins))
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(!args.rules.is_empty() && args.rounds > 0, "at least one rule count and one round");
    let (client_ip, server_ip, intruder_ip) = ("10.244.0.10", "10.244.0.11", "10.244.0.12");
    let mut rig = Rig::with_sizes(
        vec![pod(CLIENT, "client", client_ip), pod(SERVER, "server", server_ip), pod(INTRUDER, "intruder", intruder_ip)],
        MapSizes::default(),
    )
    .context("building the emulated node (needs root and BPF; run scripts/setup.sh)")?;
    let policies: BTreeMap<usize, BenchPolicy> =
        args.rules.iter().map(|&n| (n, BenchPolicy::generate(n, client_ip.parse().unwrap(), server_ip.parse().unwrap()))).collect();
    // The pods the pod peers select, once for all rule counts (the largest has them all).
    let largest = policies.values().last().expect("a rule count");
    rig.apply(largest.peer_pods().into_iter().map(Change::UpsertPod).collect())?;
    rig.detach();

    let _load = serve_load(&rig.pod(SERVER).net.ns, RR_PORT, 4)?;
    let _sink = serve_sink(&rig.pod(SERVER).net.ns, BULK_PORT)?;
    // Hundreds of thousands of short connections: let the client reuse TIME_WAIT ports,
    // or the port search, not the datapath, becomes what is measured.
    let client_ns = &rig.pod(CLIENT).net.ns;
    client_ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client_ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let client = client_ns.handle();
    let server = IpAddr::V4(server_ip.parse::<Ipv4Addr>()?);
    let dir = std::env::temp_dir().join(unique("pa-bench-"));
    std::fs::create_dir_all(&dir)?;
    let mechanisms = Mechanism::chosen(&args)?;
    let flow_events = args
        .flow_events
        .iter()
        .map(|f| FlowConfig::parse(f).map(|c| (f.clone(), c)).map_err(|e| anyhow::anyhow!("--flow-events: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let stats = if args.program_stats { Some(enable_stats()?) } else { None };
    let mut bench = Bench {
        rr: SocketAddr::new(server, RR_PORT),
        bulk: SocketAddr::new(server, BULK_PORT),
        rig,
        args,
        dir: dir.clone(),
        client,
        policies,
        mechanisms,
        flow_events,
        floor: None,
        _stats: stats,
    };
    let result = run(&mut bench);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(bench: &mut Bench) -> Result<()> {
    let rules = bench.args.rules.clone();
    let mut samples: BTreeMap<(Mechanism, usize), Vec<Figures>> = BTreeMap::new();
    for round in 0..bench.args.rounds {
        for &n in &rules {
            // The baseline is measured with each rule count, in the same rotation as the
            // mechanisms: a run's short connections leave TIME_WAIT sockets behind that slow
            // the next measurements' port allocation, so whatever always went first (the
            // baseline did) would look faster than it is. Rotate the order from round to
            // round, so that no configuration always follows another.
            let mut order = bench.mechanisms.clone();
            let len = order.len();
            order.rotate_left(round % len);
            for m in order {
                let f = bench.run_one(round, m, n)?;
                samples.entry((m, n)).or_default().push(f);
            }
        }
    }
    let medians: BTreeMap<(Mechanism, usize), Figures> = samples
        .iter()
        .map(|(k, v)| {
            let m = |get: fn(&Figures) -> f64| median(v.iter().map(get).collect());
            let f = Figures {
                tcp_connections_per_s: m(|f| f.tcp_connections_per_s),
                udp_rr_per_s: m(|f| f.udp_rr_per_s),
                bulk_gbit_per_s: m(|f| f.bulk_gbit_per_s),
                connect_p50_us: m(|f| f.connect_p50_us),
                connect_p99_us: m(|f| f.connect_p99_us),
                programs: v[0]
                    .programs
                    .keys()
                    .map(|k| {
                        let get = |i: usize| median(v.iter().filter_map(|f| f.programs.get(k)).map(|p| if i == 0 { p.0 } else { p.1 }).collect());
                        (k.clone(), (get(0), get(1)))
                    })
                    .collect(),
            };
            (*k, f)
        })
        .collect();
    report(bench, &rules, &samples, &medians)
}

fn report(
    bench: &Bench,
    rules: &[usize],
    samples: &BTreeMap<(Mechanism, usize), Vec<Figures>>,
    medians: &BTreeMap<(Mechanism, usize), Figures>,
) -> Result<()> {
    let a = &bench.args;
    let fig = |m: Mechanism, n: usize| &medians[&(m, n)];
    let ms = &bench.mechanisms;
    let has = |m: Mechanism| ms.contains(&m);
    let agents: Vec<Mechanism> = ms.iter().copied().filter(|m| matches!(m, Mechanism::Agent { .. })).collect();
    println!("\nDatapath between two pods on an emulated node; rules per side (server ingress and client egress), matching rule last;");
    println!(
        "{} clients for the rates; medians of {} interleaved rounds; iptables: {}. Ratios are quotients (a:b = a / b; for latency, < 1 is better).",
        a.clients, a.rounds, a.iptables
    );
    for (_, title, get) in METRICS {
        println!("\n{title}");
        let mut head = format!("{:>7}", "rules");
        for &m in ms {
            head += &format!(" {:>14}", bench.name(m));
        }
        head += " |";
        for &m in ms.iter().filter(|m| **m != Mechanism::None) {
            head += &format!(" {:>14}", format!("{}:none", bench.name(m)));
        }
        if has(Mechanism::Iptables) || has(Mechanism::Nftables) {
            head += " |";
            for &ag in &agents {
                for other in [Mechanism::Iptables, Mechanism::Nftables].into_iter().filter(|m| has(*m)) {
                    head += &format!(" {:>14}", format!("{}:{}", bench.name(ag), &bench.name(other)[..3]));
                }
            }
        }
        println!("{head}");
        for &n in rules {
            let v = |m| get(fig(m, n));
            let base = v(Mechanism::None);
            let prec = if base < 100.0 { 2 } else { 0 };
            let mut line = format!("{n:>7}");
            for &m in ms {
                line += &format!(" {:>14.prec$}", v(m));
            }
            line += " |";
            for &m in ms.iter().filter(|m| **m != Mechanism::None) {
                line += &format!(" {:>14.3}", v(m) / base);
            }
            if has(Mechanism::Iptables) || has(Mechanism::Nftables) {
                line += " |";
                for &ag in &agents {
                    for other in [Mechanism::Iptables, Mechanism::Nftables].into_iter().filter(|m| has(*m)) {
                        line += &format!(" {:>14.3}", v(ag) / v(other));
                    }
                }
            }
            println!("{line}");
        }
    }
    if a.rounds > 1 {
        report_round_ratios(bench, rules, samples, &agents);
    }
    if a.program_stats {
        report_program_stats(bench, rules, medians, &agents);
    }

    // The issues' targets, at 10,000 rules (or the largest count measured).
    let top = *rules.iter().max().expect("a rule count");
    let ratio = |f: fn(&Figures) -> f64, m: Mechanism, other: Mechanism| f(fig(m, top)) / f(fig(other, top));
    let conn: fn(&Figures) -> f64 = |f| f.tcp_connections_per_s;
    let mut targets = Vec::new();
    for &ag in &agents {
        let name = bench.name(ag);
        targets.push((format!("{name}: connections/s ≥ 0.97 × no enforcement"), ratio(conn, ag, Mechanism::None), 0.97, true));
        targets.push((format!("{name}: UDP request/response ≥ 0.97 × none"), ratio(|f| f.udp_rr_per_s, ag, Mechanism::None), 0.97, true));
        targets.push((format!("{name}: connect p50 ≤ 1.05 × none"), ratio(|f| f.connect_p50_us, ag, Mechanism::None), 1.05, false));
        if has(Mechanism::Iptables) {
            targets.push((format!("{name}: connections/s ≥ 10 × iptables"), ratio(conn, ag, Mechanism::Iptables), 10.0, true));
        }
        if has(Mechanism::Nftables) {
            targets.push((format!("{name}: connections/s ≥ nftables"), ratio(conn, ag, Mechanism::Nftables), 1.0, true));
        }
    }
    println!("\nTargets at {top} rules:");
    for (what, got, need, at_least) in &targets {
        let met = if *at_least { got >= need } else { got <= need };
        println!("  {:<56} {got:>8.3} ({} {need}) {}", what, if *at_least { "≥" } else { "≤" }, if met { "MET" } else { "NOT MET" });
    }

    if let Some(path) = &a.json {
        write_json(path, bench, rules, samples, medians, &targets, top)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}

/// Each round's ratio of one configuration to another, over the rounds: their median and
/// range. The two figures of a pair come from the same round, so what drifts between
/// rounds (other tenants of the host, the kernel's state) cancels in each ratio, and the
/// range shows how far one round can be off. Against `none` for every configuration, and
/// each policy-agent configuration against `floor` when it was measured.
fn report_round_ratios(bench: &Bench, rules: &[usize], samples: &BTreeMap<(Mechanism, usize), Vec<Figures>>, agents: &[Mechanism]) {
    let mut pairs: Vec<(Mechanism, Mechanism)> = bench.mechanisms.iter().filter(|m| **m != Mechanism::None).map(|&m| (m, Mechanism::None)).collect();
    if bench.mechanisms.contains(&Mechanism::Floor) {
        pairs.extend(agents.iter().map(|&ag| (ag, Mechanism::Floor)));
    }
    println!("\nPer-round ratios: the median of each round's a:b (least–most over {} rounds)", bench.args.rounds);
    for &n in rules {
        println!("  {n} rules");
        for (_, title, get) in METRICS {
            let what = title.split(" (").next().unwrap_or(title);
            let mut line = format!("    {what:<26}");
            for &(m, other) in &pairs {
                let ratios: Vec<f64> = samples[&(m, n)].iter().zip(&samples[&(other, n)]).map(|(x, y)| get(x) / get(y)).collect();
                let least = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let most = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let name = format!("{}:{}", bench.name(m), bench.name(other));
                line += &format!("  {name} {:.3} ({least:.3}–{most:.3})", median(ratios));
            }
            println!("{line}");
        }
    }
}

/// The cost of each program per run (kernel BPF statistics), per kind of traffic.
fn report_program_stats(bench: &Bench, rules: &[usize], medians: &BTreeMap<(Mechanism, usize), Figures>, agents: &[Mechanism]) {
    println!(
        "\nPer-program cost from BPF statistics: ns per run (runs per TCP connection, per UDP request/response, per 64 KiB of bulk, per sequential connection of the latency loop)"
    );
    println!("{:>7} {:>16} {:>12} {:>18} {:>18} {:>18} {:>18}", "rules", "configuration", "program", "tcp", "udp", "bulk", "connect");
    let floor = bench.mechanisms.iter().copied().filter(|m| *m == Mechanism::Floor);
    for &n in rules {
        for ag in floor.clone().chain(agents.iter().copied()) {
            let programs: &[&str] = if ag == Mechanism::Floor { &[policy_ebpf::program_names::PASS_ALL] } else { &PROGRAMS };
            for &prog in programs {
                let cell = |traffic: &str| {
                    medians[&(ag, n)].programs.get(&format!("{prog} {traffic}")).map_or("-".to_string(), |(runs, ns)| format!("{ns:.0} ({runs:.1})"))
                };
                println!(
                    "{n:>7} {:>16} {prog:>12} {:>18} {:>18} {:>18} {:>18}",
                    bench.name(ag),
                    cell("tcp"),
                    cell("udp"),
                    cell("bulk"),
                    cell("connect")
                );
            }
        }
    }
}

fn write_json(
    path: &Path,
    bench: &Bench,
    rules: &[usize],
    samples: &BTreeMap<(Mechanism, usize), Vec<Figures>>,
    medians: &BTreeMap<(Mechanism, usize), Figures>,
    targets: &[(String, f64, f64, bool)],
    top: usize,
) -> Result<()> {
    let a = &bench.args;
    let as_map = |f: &Figures| -> BTreeMap<&'static str, f64> { METRICS.iter().map(|(k, _, get)| (*k, get(f))).collect() };
    let ratios = |f: &Figures, other: &Figures| -> BTreeMap<&'static str, f64> {
        METRICS.iter().map(|(k, _, get)| (*k, get(f) / get(other))).collect()
    };
    let mut results = Vec::new();
    for &n in rules {
        // "none" at n rules: the baseline measured alongside that rule count.
        let none = &medians[&(Mechanism::None, n)];
        for &m in &bench.mechanisms {
            let f = &medians[&(m, n)];
            let vs = |other: Mechanism| medians.get(&(other, n)).map(|o| ratios(f, o));
            results.push(json!({
                "mechanism": bench.name(m),
                "flow_events": match m { Mechanism::Agent { events, .. } => Some(&bench.flow_events[events].0), _ => None },
                "cluster_policies": matches!(m, Mechanism::Agent { tiers: true, .. }),
                "rules": n,
                "median": as_map(f),
                "programs": f.programs,
                "ratio_vs_none": ratios(f, none),
                "ratio_vs_iptables": vs(Mechanism::Iptables),
                "ratio_vs_nftables": vs(Mechanism::Nftables),
                "rounds": samples[&(m, n)],
            }));
        }
    }
    let targets: Vec<Value> = targets
        .iter()
        .map(|(what, got, need, at_least)| {
            json!({"target": what, "rules": top, "ratio": got, "required": need, "met": if *at_least { got >= need } else { got <= need }})
        })
        .collect();
    let doc = json!({
        "settings": {
            "seconds": a.seconds, "bulk_seconds": a.bulk_seconds, "latency_seconds": a.latency_seconds, "warmup_seconds": a.warmup_seconds,
            "rounds": a.rounds, "clients": a.clients, "rules_per_side": rules, "iptables": a.iptables,
            "statistic": "median over rounds; ratio_vs_X = this / X (for latency, < 1 is better)",
        },
        "results": results,
        "targets": targets,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}
