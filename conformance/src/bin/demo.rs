//! The agent's main job on an emulated node, no cluster needed: the pods of
//! `examples/cluster` in network namespaces (each serving its container ports), the example
//! policies of `deploy/examples`, the real `policy-agent run` enforcing them, the
//! reachability observed with real connections (next to what the model says), a NodePort
//! reached from outside through kube-proxy-style DNAT and masquerade (each client judged
//! by its own address, next to `policy-agent explain --node-port`), then `policy-agent
//! dump` and `observe`.
//!
//! Run as root from the repository: `bash scripts/demo.sh`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use conformance::agent_process::{AgentProcess, agent_binary};
use conformance::netns::unique;
use conformance::topology::NodeNet;
use conformance::traffic::{probe, serve};
use policy_agent::manifests::Manifests;
use policy_agent::matrix::{Probe, compute};
use policy_model::Protocol;

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cluster = root.join("examples/cluster");
    let policies = root.join("deploy/examples");
    let (state, errors) =
        Manifests::read_dirs(&[cluster.clone(), policies.clone()]).map_err(|(d, e)| anyhow::anyhow!("{}: {e}", d.display()))?.state();
    if !errors.is_empty() {
        bail!("invalid example manifests: {errors:?}");
    }
    let node = state.nodes().next().context("examples/cluster has a Node")?;
    println!(
        "Emulating node {} ({}) with {} pods; policies from deploy/examples/\n",
        node.name,
        node.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        state.pods().count()
    );
    let node_net = NodeNet::create(&unique("demo-n"), &node.name, &node.addresses)?;

    // Each pod: its namespace, veth and addresses, serving its container ports.
    let mut pods = Vec::new();
    for (i, pod) in state.pods().filter(|p| !p.host_network && p.node.as_deref() == Some(node.name.as_str())).enumerate() {
        let net = node_net.add_pod(&unique("demo-p"), &format!("demo{i}"), &pod.ips)?;
        let ports: BTreeSet<u16> = pod.named_ports.iter().map(|p| p.port).collect();
        let servers = serve(&net.ns, &ports.into_iter().collect::<Vec<_>>())?;
        println!(
            "  pod {:<24} {:<34} serving {}",
            pod.key.to_string(),
            pod.ips.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
            pod.named_ports.iter().map(|p| format!("{}={}/{}", p.name, p.port, p.protocol)).collect::<Vec<_>>().join(" ")
        );
        let served: BTreeSet<(u16, Protocol)> = pod.named_ports.iter().map(|p| (p.port, p.protocol)).collect();
        pods.push((pod.key.clone(), pod.ips.clone(), net, servers, served));
    }

    let mut agent = AgentProcess::start_multi(&node_net.ns, &node.name, &[&cluster, &policies], &[]).map_err(anyhow::Error::msg)?;
    agent.wait_ready(Duration::from_secs(20)).map_err(anyhow::Error::msg)?;
    println!("\npolicy-agent run is enforcing (pins in {}).\n", agent.pin_dir.display());
    // Give the sync that follows readiness a moment (interfaces are found after the first pass).
    std::thread::sleep(Duration::from_millis(500));

    let probes = [
        Probe { port: 8080, protocol: Protocol::Tcp },
        Probe { port: 5432, protocol: Protocol::Tcp },
        Probe { port: 9090, protocol: Protocol::Tcp },
        Probe { port: 9187, protocol: Protocol::Tcp },
        Probe { port: 53, protocol: Protocol::Udp },
    ];
    let model = compute(&state, &probes, None);
    let width = pods.iter().map(|p| p.0.to_string().len()).max().unwrap_or(5);
    let mut disagreements = 0;
    for p in probes {
        println!(
            "{p}  observed over IPv4 (rows: from, columns: to; . connected, X blocked, - not served or self; * differs from the model)"
        );
        print!("{:width$}", "");
        for (to, ..) in &pods {
            print!(" {:width$}", to.to_string());
        }
        println!();
        for (from, _, from_net, ..) in &pods {
            print!("{:width$}", from.to_string());
            for (to, to_ips, _, _, served) in &pods {
                if from == to || !served.contains(&(p.port, p.protocol)) {
                    print!(" {:width$}", "-");
                    continue;
                }
                let dst = to_ips.iter().find(|a| a.is_ipv4()).copied().context("IPv4 address")?;
                let got = probe(&from_net.ns, p.protocol, SocketAddr::new(dst, p.port), Duration::from_millis(400))?;
                let want = model.mark(&from.to_string(), &to.to_string(), p) == '.';
                if got != want {
                    disagreements += 1;
                }
                let mark = format!("{}{}", if got { "." } else { "X" }, if got != want { "*" } else { "" });
                print!(" {mark:width$}");
            }
            println!();
        }
        println!();
    }
    println!(
        "{}",
        if disagreements == 0 {
            "Every observed connection matches the model (policy-agent matrix).".to_string()
        } else {
            format!("{disagreements} observations differ from the model.")
        }
    );

    disagreements += node_port(&node_net, &[&cluster, &policies])?;

    println!("\n=== policy-agent dump\n");
    let out = std::process::Command::new(agent_binary().map_err(anyhow::Error::msg)?)
        .arg("dump")
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    // The blocked probes above, as the datapath reported them: who, to whom, which policy.
    println!("\n=== policy-agent observe --verdict denied --last 8\n");
    let out = std::process::Command::new(agent_binary().map_err(anyhow::Error::msg)?)
        .args(["observe", "--verdict", "denied", "--last", "8", "--socket"])
        .arg(agent.observe_socket())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    agent.stop();
    if disagreements > 0 {
        bail!("the datapath disagreed with the model");
    }
    Ok(())
}

/// The NodePort of Service shop/frontend (examples/cluster), reached from an outside
/// network: kube-proxy's DNAT to the frontend and, for `externalTrafficPolicy: Cluster`,
/// its masquerade to the node's address (as with a CNI whose host veths hold no address).
/// Each client is judged by its own address: what `explain --node-port` says. Returns the
/// number of disagreements.
fn node_port(node: &NodeNet, manifests: &[&PathBuf]) -> Result<usize> {
    println!("=== NodePort 30080 of Service shop/frontend, from outside (DNAT, masquerade to the node's 10.250.0.1)\n");
    let ext = conformance::netns::Netns::create(&unique("demo-x"))?;
    node.ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ext.name()])?;
    node.ns.ip(&["-4", "addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    node.ns.ip(&["link", "set", "up0", "up"])?;
    for a in ["198.51.100.10/24", "198.51.100.66/24"] {
        ext.ip(&["-4", "addr", "add", a, "dev", "eth0"])?;
    }
    ext.ip(&["link", "set", "eth0", "up"])?;
    node.ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "198.51.100.1",
            "-p",
            "tcp",
            "--dport",
            "30080",
            "-j",
            "DNAT",
            "--to-destination",
            "10.244.1.10:8080",
        ],
    )?;
    node.ns.exec(
        "iptables",
        &["-t", "nat", "-A", "POSTROUTING", "-s", "198.51.100.0/24", "!", "-o", "up0", "-j", "SNAT", "--to-source", "10.250.0.1"],
    )?;
    // The agent finds the new node device on its next pass and puts its programs on it.
    std::thread::sleep(Duration::from_secs(2));
    let mut disagreements = 0;
    for client in ["198.51.100.10", "198.51.100.66"] {
        let got = conformance::traffic::probe_tcp_from(&ext, client.parse()?, "198.51.100.1:30080".parse()?, Duration::from_millis(400))?;
        let mut cmd = std::process::Command::new(agent_binary().map_err(anyhow::Error::msg)?);
        cmd.args(["explain", "--from", client, "--node-port", "30080"]);
        for m in manifests {
            cmd.arg("--manifests").arg(m);
        }
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let want = text.lines().next().is_some_and(|l| l.ends_with(": ALLOWED"));
        if got != want {
            disagreements += 1;
        }
        println!(
            "  {client} -> 198.51.100.1:30080  observed: {}{}",
            if got { "connected" } else { "blocked" },
            if got != want { "  (* differs from explain)" } else { "" }
        );
        for line in text.lines().take(2) {
            println!("    explain: {line}");
        }
    }
    println!();
    Ok(disagreements)
}
