//! Per-path cost of the agent's programs (a benchmark, not a test). On an emulated node
//! with the datapath bench's policies (`--rules` per side: the client's egress and the
//! server's ingress), each program runs in the kernel on crafted packets through
//! `BPF_PROG_TEST_RUN`, which reports the mean time per run. One path at a time, on one
//! CPU, with no traffic around: far steadier than whole-connection rates, and it says
//! where the time goes:
//! - the floor: a frame the programs only parse (ARP), and one they drop after the
//!   endpoint lookup (a spoofed source);
//! - established flows and their replies, on each end's hook;
//! - a pod that no policy isolates;
//! - new flows, allowed (each run a fresh flow: parse, endpoint, conntrack miss, both
//!   table lookups, the insert) and denied (a flow event each, within the rate limit);
//! - a node device's `node_ingress`: an arriving SYN (noted for NodePort clients) and an
//!   established packet.
//!
//! `--audit` adds an audited copy of each side's policies: the new-flow figures then
//! carry the audit table's lookup (run it with and without to see that cost).
//!
//! Each path's verdict is checked, so a figure is never that of another path. The
//! verifier's instruction counts come last. Run as root:
//! `cargo run --release -p conformance --bin bench_paths -- --help`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use conformance::bench_rules::{BenchPolicy, RR_PORT};
use conformance::programs::{DROP, PASS, TCP_ACK, TCP_RST, TCP_SYN, TestProgram, instruction_counts, tcp_frame as tcp};
use conformance::rig::{NODE, Rig};
use policy_agent::datapath::{FlowConfig, MapSizes};
use policy_ebpf::program_names::{NODE_INGRESS, POD_EGRESS, POD_INGRESS};
use policy_model::{Change, ObjectKey, Pod};
use serde_json::json;

#[derive(Parser, Clone)]
struct Args {
    /// Rules per side (the client's egress, the server's ingress), the matching one last.
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Runs per measurement of a repeated path.
    #[arg(long, default_value_t = 200_000)]
    runs: u32,
    /// New flows measured one by one (each a run of its own).
    #[arg(long, default_value_t = 20_000)]
    new_flows: u16,
    /// Measurements per path; the figure is the least of them.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Flow events of the agent: none, denied, sampled:N or all.
    #[arg(long, default_value = "denied")]
    flow_events: String,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also give each side an audited copy of its policies (annotation
    /// `policy-agent.io/enforcement: audit`, the same rules): new flows then pay the audit
    /// table's lookup too; established flows are unchanged.
    #[arg(long)]
    audit: bool,
}

const CLIENT: (&str, [u8; 4]) = ("x/client", [10, 244, 0, 10]);
const SERVER: (&str, [u8; 4]) = ("x/server", [10, 244, 0, 11]);
const INTRUDER: (&str, [u8; 4]) = ("x/intruder", [10, 244, 0, 12]);

fn pod((key, ip): (&str, [u8; 4])) -> Pod {
    Pod {
        key: ObjectKey::parse(key).unwrap(),
        labels: [("pod".to_string(), key.trim_start_matches("x/").to_string())].into(),
        ips: vec![Ipv4Addr::from(ip).into()],
        node: Some(NODE.into()),
        host_network: false,
        named_ports: vec![],
    }
}

/// An ARP request: no IP, so the programs parse it and let it pass.
fn arp() -> Vec<u8> {
    let mut f = vec![0u8; 14 + 28];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f
}

/// The host-side veths: (client, server, intruder).
struct Veths {
    client: u32,
    server: u32,
    intruder: u32,
}

/// The least of the means: interference (other work on the CPU, frequency changes) only
/// ever adds time, so the least is the closest to the path's own cost.
fn least(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

/// One measured path: what, which program, its figure (ns per run).
struct Figure {
    path: &'static str,
    program: &'static str,
    ns: f64,
}

/// Runs `frame` `args.runs` times, `args.rounds` times over: the least of the means.
fn repeated(prog: &TestProgram, frame: &[u8], ifindex: u32, expect: i32, args: &Args) -> Result<f64> {
    let mut means = Vec::new();
    for _ in 0..args.rounds {
        let (ret, d) = prog.run(frame, ifindex, args.runs)?;
        ensure!(ret == expect, "verdict {ret}, expected {expect}");
        means.push(d.as_nanos() as f64);
    }
    Ok(least(means))
}

fn measure(args: &Args, v: &Veths) -> Result<Vec<Figure>> {
    // One CPU for the whole run: per-CPU state (the flow records between hooks) is what a
    // packet crossing two hooks sees.
    let mut one = nix::sched::CpuSet::new();
    one.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one)?;
    let (egress, ingress) = (TestProgram::find(POD_EGRESS)?, TestProgram::find(POD_INGRESS)?);
    let (c, s, i) = (CLIENT.1, SERVER.1, INTRUDER.1);
    let mut out = Vec::new();
    let mut put = |path, program, ns: Result<f64>| -> Result<()> {
        let ns = ns.with_context(|| format!("path {path:?}"))?;
        out.push(Figure { path, program, ns });
        Ok(())
    };

    put("parse only (ARP)", POD_EGRESS, repeated(&egress, &arp(), v.client, PASS, args))?;
    put(
        "spoofed source (parse + endpoint)",
        POD_EGRESS,
        repeated(&egress, &tcp([10, 244, 0, 99], s, 40000, RR_PORT, TCP_SYN), v.client, DROP, args),
    )?;

    // An established client → server flow: its first packet seen by both hooks, as on the
    // wire (the sender's egress tracks it, the receiver's ingress approves its side).
    let syn = tcp(c, s, 40000, RR_PORT, TCP_SYN);
    ensure!(egress.run(&syn, v.client, 1)?.0 == PASS, "the client's SYN is dropped at its egress");
    ensure!(ingress.run(&syn, v.server, 1)?.0 == PASS, "the client's SYN is dropped at the server's ingress");
    let ack = tcp(c, s, 40000, RR_PORT, TCP_ACK);
    put("established: sender's egress", POD_EGRESS, repeated(&egress, &ack, v.client, PASS, args))?;
    put("established: receiver's ingress", POD_INGRESS, repeated(&ingress, &ack, v.server, PASS, args))?;
    // As on the wire: the receiver's hook runs right after the sender's, on the same CPU
    // (the thread is pinned), one packet at a time; against the receiver's hook alone,
    // one packet at a time (both carry the cost of a single run's setup).
    let (mut after, mut alone) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let (mut a, mut b) = (0f64, 0f64);
        for _ in 0..args.new_flows {
            ensure!(egress.run(&ack, v.client, 1)?.0 == PASS, "the established ACK dropped at the client's egress");
            let (ret, d) = ingress.run(&ack, v.server, 1)?;
            ensure!(ret == PASS, "the established ACK dropped at the server's ingress");
            a += d.as_nanos() as f64;
            let (ret, d) = ingress.run(&ack, v.server, 1)?;
            ensure!(ret == PASS, "the established ACK dropped at the server's ingress");
            b += d.as_nanos() as f64;
        }
        after.push(a / args.new_flows as f64);
        alone.push(b / args.new_flows as f64);
    }
    put("one run: receiver's ingress after sender's", POD_INGRESS, Ok(least(after)))?;
    put("one run: receiver's ingress alone", POD_INGRESS, Ok(least(alone)))?;
    let reply = tcp(s, c, RR_PORT, 40000, TCP_ACK);
    put("reply: server's egress", POD_EGRESS, repeated(&egress, &reply, v.server, PASS, args))?;
    put("reply: client's ingress", POD_INGRESS, repeated(&ingress, &reply, v.client, PASS, args))?;

    // intruder → client: nothing isolates the intruder, nor the client's ingress.
    let syn = tcp(i, c, 40001, 80, TCP_SYN);
    ensure!(egress.run(&syn, v.intruder, 1)?.0 == PASS, "intruder → client dropped at the intruder's egress");
    ensure!(ingress.run(&syn, v.client, 1)?.0 == PASS, "intruder → client dropped at the client's ingress");
    let ack = tcp(i, c, 40001, 80, TCP_ACK);
    put("not isolated, established: egress", POD_EGRESS, repeated(&egress, &ack, v.intruder, PASS, args))?;
    put("not isolated, established: ingress", POD_INGRESS, repeated(&ingress, &ack, v.client, PASS, args))?;
    // The client's reply at the intruder's ingress: a pod nothing isolates in either
    // direction (the client is isolated for egress, so its hooks track every flow).
    let reply = tcp(c, i, 80, 40001, TCP_ACK);
    put("nothing isolates, reply: ingress", POD_INGRESS, repeated(&ingress, &reply, v.intruder, PASS, args))?;

    // New flows, one run each (a repeated run would find the flow tracked): the mean of
    // single runs also carries one clock read each.
    let (mut e_ns, mut i_ns, mut rst_ns) = (0f64, 0f64, 0f64);
    for k in 0..args.new_flows {
        // The same judgment without the insert: a reset never starts a flow.
        let rst = tcp(c, s, 1024 + k, RR_PORT, TCP_RST);
        let (ret, d) = egress.run(&rst, v.client, 1)?;
        ensure!(ret == PASS, "reset {k} dropped at the client's egress");
        rst_ns += d.as_nanos() as f64;
        let syn = tcp(c, s, 1024 + k, RR_PORT, TCP_SYN);
        let (ret, d) = egress.run(&syn, v.client, 1)?;
        ensure!(ret == PASS, "new flow {k} dropped at the client's egress");
        e_ns += d.as_nanos() as f64;
        let (ret, d) = ingress.run(&syn, v.server, 1)?;
        ensure!(ret == PASS, "new flow {k} dropped at the server's ingress");
        i_ns += d.as_nanos() as f64;
    }
    put("new flow, allowed, no insert (RST): egress", POD_EGRESS, Ok(rst_ns / args.new_flows.max(1) as f64))?;
    put("new flow, allowed: sender's egress", POD_EGRESS, Ok(e_ns / args.new_flows.max(1) as f64))?;
    put("new flow, allowed: receiver's ingress", POD_INGRESS, Ok(i_ns / args.new_flows.max(1) as f64))?;

    // Denied flows are never tracked: every run judges them anew.
    put("new flow, denied: egress", POD_EGRESS, repeated(&egress, &tcp(c, s, 40002, 80, TCP_SYN), v.client, DROP, args))?;
    let syn = tcp(i, s, 40003, RR_PORT, TCP_SYN);
    ensure!(egress.run(&syn, v.intruder, 1)?.0 == PASS, "intruder → server dropped at the intruder's egress");
    put("new flow, denied: receiver's ingress", POD_INGRESS, repeated(&ingress, &syn, v.server, DROP, args))?;

    // A node device's arrivals: a SYN is noted (parse, a 40-byte record, the skb's tag);
    // an established packet is only parsed.
    let node_in = TestProgram::find(NODE_INGRESS)?;
    let outside = [198, 51, 100, 10];
    let node = [10, 250, 0, 1];
    put(
        "node device: arriving SYN (noted)",
        NODE_INGRESS,
        repeated(&node_in, &tcp(outside, node, 40004, 30080, TCP_SYN), v.client, PASS, args),
    )?;
    put("node device: arriving ACK", NODE_INGRESS, repeated(&node_in, &tcp(outside, node, 40004, 30080, TCP_ACK), v.client, PASS, args))?;
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0 && args.rounds > 0 && args.new_flows > 0, "--runs, --rounds and --new-flows must be positive");
    let flows = FlowConfig::parse(&args.flow_events).map_err(|e| anyhow::anyhow!("--flow-events: {e}"))?;
    let mut rig = Rig::with_sizes(vec![pod(CLIENT), pod(SERVER), pod(INTRUDER)], MapSizes::default())
        .context("building the emulated node (needs root and BPF; run scripts/setup.sh)")?;
    if flows != FlowConfig::default() {
        rig.set_flow_events(flows);
        rig.stop_agent();
        rig.start_agent()?;
    }
    let policy = BenchPolicy::generate(args.rules, Ipv4Addr::from(CLIENT.1), Ipv4Addr::from(SERVER.1));
    let mut changes: Vec<Change> = policy.peer_pods().into_iter().map(Change::UpsertPod).collect();
    changes.extend(policy.network_policies());
    if args.audit {
        changes.extend(policy.audited_copies());
    }
    rig.apply(changes)?;
    let veths = Veths { client: rig.node.ifindex("pv0")?, server: rig.node.ifindex("pv1")?, intruder: rig.node.ifindex("pv2")? };
    let (figures, counts) = {
        let args = args.clone();
        rig.node.ns.run(move || measure(&args, &veths).map(|f| (f, instruction_counts())))??
    };
    rig.detach();

    println!(
        "\nPer-path cost (BPF_PROG_TEST_RUN, mean ns per run, least of {} × {} runs), {} rules per side{}, flow events: {}",
        args.rounds,
        args.runs,
        args.rules,
        if args.audit { " and as many audited" } else { "" },
        args.flow_events
    );
    println!("{:<40} {:>12} {:>10}", "path", "program", "ns/run");
    for f in &figures {
        println!("{:<40} {:>12} {:>10.1}", f.path, f.program, f.ns);
    }
    println!("\nVerifier: instructions processed, and program size (instructions)");
    for (name, (verified, size)) in &counts {
        println!("{name:<12} {verified:>8} {size:>8}");
    }
    if counts.is_empty() {
        bail!("no program found for the instruction counts");
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "settings": {"rules_per_side": args.rules, "audited_copies": args.audit, "runs": args.runs, "rounds": args.rounds, "new_flows": args.new_flows, "flow_events": args.flow_events},
            "paths": figures.iter().map(|f| json!({"path": f.path, "program": f.program, "ns_per_run": f.ns})).collect::<Vec<_>>(),
            "programs": counts.iter().map(|(n, (v, s))| (n.to_string(), json!({"verified_instructions": v, "size_instructions": s}))).collect::<BTreeMap<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}
