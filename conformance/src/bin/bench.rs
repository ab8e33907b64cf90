//! Datapath benchmark (not a test): between two pods on an emulated node, new TCP
//! connections per second (connect, 1-byte exchange, close) and UDP request/response per
//! second, with no program, then with the agent's programs holding 10, 1,000 and 10,000
//! rules on the path (the matching rule last, on both the client's egress and the
//! server's ingress). Prints a table and writes JSON.
//!
//! Run as root: `bash scripts/bench.sh` (or `cargo run --release -p conformance --bin bench -- [--seconds 3]
//! [--rounds 3] [--json FILE]`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use conformance::rig::{NODE, Rig};
use conformance::traffic::serve_load;
use policy_model::{Change, ObjectKey, Pod};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds: every configuration is measured once per round, in turn; figures are
    /// medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

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

/// `rules` rules on each side: `rules - 1` that do not match (distinct /32 ipBlocks), then
/// the one that does.
fn policies(rules: usize) -> Vec<Change> {
    let filler = |base: u8| -> Vec<serde_json::Value> {
        (0..rules.saturating_sub(1))
            .map(|i| json!({"to_or_from": [{"ipBlock": {"cidr": format!("10.{}.{}.{}/32", base + (i / 62_500) as u8, (i / 250) % 250, 1 + i % 250)}}], "ports": [{"port": 9000}]}))
            .collect()
    };
    let rules_for = |dir: &str, peer: serde_json::Value, base: u8| -> serde_json::Value {
        let key = if dir == "ingress" { "from" } else { "to" };
        let mut v: Vec<serde_json::Value> = filler(base)
            .into_iter()
            .map(|mut r| {
                let p = r["to_or_from"].take();
                json!({key: p, "ports": r["ports"].take()})
            })
            .collect();
        v.push(json!({key: [peer], "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 8080}]}));
        serde_json::Value::Array(v)
    };
    let np = |name: &str, spec: serde_json::Value| {
        Change::UpsertPolicy(Box::new(
            serde_json::from_value(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": "x"}, "spec": spec}))
                .unwrap(),
        ))
    };
    vec![
        np(
            "server",
            json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"],
            "ingress": rules_for("ingress", json!({"podSelector": {"matchLabels": {"pod": "client"}}}), 100)}),
        ),
        np(
            "client",
            json!({"podSelector": {"matchLabels": {"pod": "client"}}, "policyTypes": ["Egress"],
            "egress": rules_for("egress", json!({"podSelector": {"matchLabels": {"pod": "server"}}}), 150)}),
        ),
    ]
}

/// Runs `op` on `clients` threads in the client's namespace for `secs`; operations per second.
fn rate(rig: &Rig, clients: usize, secs: u64, op: fn(SocketAddr) -> bool, dst: SocketAddr) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let ns = rig.pod("x/client").net.ns.handle();
    let mut hs = Vec::new();
    for _ in 0..clients {
        let (stop, count, failures) = (stop.clone(), count.clone(), failures.clone());
        hs.push(
            ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if op(dst) {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .expect("client thread"),
        );
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let f = failures.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("  ({f} failed operations)");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn tcp_connect(dst: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)) else { return false };
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

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rig = Rig::new(vec![pod("x/client", "client", "10.244.0.10"), pod("x/server", "server", "10.244.0.11")])
        .context("building the emulated node (needs root and BPF; run scripts/setup.sh)")?;
    let _load = serve_load(&rig.pod("x/server").net.ns, 8080, 4)?;
    // Hundreds of thousands of short connections: let the client reuse TIME_WAIT ports,
    // or the port search, not the datapath, becomes what is measured.
    let client = &rig.pod("x/client").net.ns;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let dst = SocketAddr::new(rig.ip("x/server", true), 8080);

    let measure = |rig: &Rig| -> (f64, f64) {
        (rate(rig, args.clients, args.seconds, tcp_connect, dst), rate(rig, args.clients, args.seconds, udp_rr, dst))
    };
    let configs: [Option<usize>; 4] = [None, Some(10), Some(1_000), Some(10_000)];
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configs.len()];
    for round in 0..args.rounds {
        for (i, config) in configs.iter().enumerate() {
            match config {
                // No program: the agent gone and its pins removed (so the links detach).
                None => {
                    rig.stop_agent();
                    std::fs::remove_dir_all(&rig.pin_dir).ok();
                    eprintln!("round {}: no program", round + 1);
                    samples[i].push(measure(&rig));
                    rig.start_agent()?;
                }
                Some(rules) => {
                    rig.apply(policies(*rules))?;
                    eprintln!("round {}: {rules} rules", round + 1);
                    samples[i].push(measure(&rig));
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for (config, s) in configs.iter().zip(&samples) {
        let name = match config {
            None => "no program".to_string(),
            Some(r) => format!("policy-agent, {r} rules"),
        };
        rows.push((name, median(s.iter().map(|x| x.0).collect()), median(s.iter().map(|x| x.1).collect())));
    }
    let (base_c, base_u) = (rows[0].1, rows[0].2);
    println!("{:<36} {:>12} {:>7} {:>16} {:>7}", "datapath", "TCP conn/s", "ratio", "UDP req-resp/s", "ratio");
    let mut out = Vec::new();
    for (name, c, u) in &rows {
        println!("{name:<36} {c:>12.0} {:>7.3} {u:>16.0} {:>7.3}", c / base_c, u / base_u);
        out.push(
            json!({"datapath": name, "tcp_connections_per_s": c, "tcp_ratio": c / base_c, "udp_rr_per_s": u, "udp_ratio": u / base_u}),
        );
    }
    if let Some(path) = args.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(
                &json!({"datapath": out, "seconds": args.seconds, "clients": args.clients, "rounds": args.rounds, "statistic": "median over rounds"}),
            )?,
        )?;
    }
    Ok(())
}
